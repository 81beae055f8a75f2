"""BudgetSpec: the one rule "ratio + strategy + profile -> per-layer budgets" used by every front end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depthkv.allocation import (
    ALLOCATORS,
    AllocatorError,
    BudgetError,
    Budgets,
    BudgetSpec,
    Profile,
    SensitivityView,
    allocate,
    apportion,
    global_budget,
    middle_layers,
    policy_needs_scores,
    register_allocator,
    uniform,
)
from depthkv.allocation.profile import KIND, SCHEMA_VERSION

PROBES = [0.5, 0.8, 1.0]


def make_profile(n_layers: int, seed: int = 0, identity: dict | None = None, infonce: bool = False) -> Profile:
    """A schema-valid profile with random curves (layer 1 clearly the most sensitive)."""
    rng = np.random.default_rng(seed)
    mean = np.sort(rng.uniform(0.0, 1.0, (n_layers, len(PROBES))), axis=1)
    mean[min(1, n_layers - 1)] *= 10.0
    curves = {"mean": mean.tolist(), "lo": (mean * 0.9).tolist(), "hi": (mean * 1.1).tolist()}
    model = identity or {"name": "toy", "n_layers": n_layers, "config_sha256": "0" * 64}
    data = {"schema_version": SCHEMA_VERSION, "kind": KIND, "model": model, "probe_ratios": PROBES,
            "curves": {"kl": curves, "nll": curves}}
    if infonce:
        data.update(proxy={"stub": True}, infonce_per_layer=rng.uniform(1.0, 2.0, n_layers).tolist())
    return Profile(data)


@pytest.fixture
def toy_allocators():
    """Two toy allocators, removed afterwards: one reads the input's scores, one does not (and would
    fail if it received them: it has no ``scores`` parameter)."""
    seen: dict = {}

    @register_allocator("toy-scores", needs=("scores",))
    def by_scores(request, sensitivity=None, *, scores, bias: float = 0.0):
        """Toy input-adaptive allocator: tokens in proportion to each layer's summed scores."""
        seen["scores"] = scores
        w = [float(np.asarray(scores[i]).sum()) + bias for i in request.free]
        lo, k = request.check_feasible("toy-scores"), len(request.free)
        tokens = apportion(request.rest, w, np.full(k, lo), np.full(k, request.context_len))
        return request.budgets(tokens, "toy-scores")

    @register_allocator("toy-plain")
    def plain(request, sensitivity=None):
        """Toy allocator without needs: the uniform split."""
        seen["plain"] = True
        return uniform(request.n_layers, request.context_len, request.ratio, protected=request.protected,
                       min_tokens=request.floor)

    try:
        yield seen
    finally:
        del ALLOCATORS["toy-scores"], ALLOCATORS["toy-plain"]


# ------------------------------------------------------------------------------------ same as the old paths
@pytest.mark.parametrize("strategy", ["uniform", "pyramid", "optimal", "mga"])
def test_same_budgets_as_allocate_with_the_profile_view(strategy):
    """What Profile.policy, the press, kvpress, eval and the CLI each computed before: allocate with the
    profile's view and the floor capped at the context length."""
    prof = make_profile(6, seed=3, infonce=True)
    spec = BudgetSpec(0.5, strategy, prof, protected=(0,), min_tokens=20)
    policy = spec.policy()  # layer count from the profile
    assert policy.n_layers == 6 and not policy_needs_scores(policy)
    for n in (80, 257, 1000, 4096):
        old = allocate(strategy, 6, n, 0.5, sensitivity=prof.view(), protected=(0,), min_tokens=min(n, 20))
        assert spec.for_context(6, n) == old
        assert policy(n) == old
        assert old.total == global_budget(6, n, 0.5)
    if strategy == "optimal":  # the profile's sensitive layer 1 keeps more than uniform gives it
        u = BudgetSpec(0.5, "uniform", prof, protected=(0,), min_tokens=20).for_context(6, 1000)
        assert spec.for_context(6, 1000).tokens[1] > u.tokens[1]


def test_uniform_spec_equals_the_uniform_helper():
    """The press's plain-ratio path used budgets.uniform; the builder's uniform gives the same vectors."""
    for n in (96, 97, 150, 333):
        for prot in ((), (0,), (1, 3)):
            assert BudgetSpec(0.3, protected=prot, min_tokens=20).for_context(4, n) == uniform(
                4, n, 0.3, protected=prot, min_tokens=min(n, 20))
    for n in (5, 19, 20):  # shorter than the floor: each layer keeps min(N, floor), only a zero ratio works
        assert BudgetSpec(0.0, min_tokens=20).for_context(4, n) == uniform(4, n, 0.0, min_tokens=n)
        with pytest.raises(BudgetError):
            BudgetSpec(0.3, min_tokens=20).for_context(4, n)


def test_spec_accepts_a_profile_path_or_a_view(tmp_path):
    prof = make_profile(5, seed=1)
    path = tmp_path / "p.json"
    prof.save(path)
    want = BudgetSpec(0.6, "optimal", prof).for_context(5, 512)
    assert BudgetSpec(0.6, "optimal", str(path)).for_context(5, 512) == want
    assert BudgetSpec(0.6, "optimal", path).for_context(5, 512) == want
    assert BudgetSpec(0.6, "optimal", prof.view()).for_context(5, 512) == want
    assert BudgetSpec(0.6, "pyramid", prof, options={"beta": 5.0}).for_context(5, 512) == allocate(
        "pyramid", 5, 512, 0.6, beta=5.0)


def test_press_uses_the_builder(tiny_models):
    import depthkv
    from depthkv.models.identity import model_identity

    model = tiny_models("llama")
    prof = make_profile(4, identity=model_identity(model, "tiny"))
    p = depthkv.press(model, "h2o", ratio=0.5, profile=prof, n_sink=2, n_recent=4)  # optimal by default
    spec = BudgetSpec(0.5, "optimal", prof, min_tokens=6)
    for n in (40, 96):
        assert p.policy(n) == spec.for_context(4, n)
        assert p.policy(n).strategy == "optimal"
    plain = depthkv.press(model, "h2o", ratio=0.5, n_sink=2, n_recent=4, protected_layers=(0,))
    assert plain.policy(96) == uniform(4, 96, 0.5, protected=(0,), min_tokens=6)
    # no protected window at all: the floor is still one token
    assert depthkv.press(model, "h2o", ratio=0.5, n_sink=0, n_recent=0).policy(7) == uniform(4, 7, 0.5)


# ------------------------------------------------------------------------------------------- early errors
@pytest.mark.parametrize(
    "spec, n_layers, err, match",
    [
        (BudgetSpec(0.5, "pyramids"), 4, AllocatorError, "unknown allocator 'pyramids'"),
        (BudgetSpec(0.5, "pyramid", options={"gamma": 1}), 4, AllocatorError, "no option gamma"),
        (BudgetSpec(0.5, "optimal"), 4, AllocatorError, "reads a calibration profile"),
        (BudgetSpec(0.5, "mga"), 4, AllocatorError, "reads a calibration profile"),
        (BudgetSpec(0.5, "optimal", make_profile(6)), 4, AllocatorError, "measured on 6 layers.*has 4"),
        (BudgetSpec(0.5, "uniform", make_profile(6)), 4, AllocatorError, "measured on 6 layers"),
        (BudgetSpec(0.5, "mga", make_profile(4)), 4, AllocatorError, "'mga' needs metric"),
        (BudgetSpec(1.0), 4, BudgetError, r"ratio must lie in \[0, 1\)"),
        (BudgetSpec(-0.1), 4, BudgetError, r"ratio must lie in \[0, 1\)"),
        (BudgetSpec(float("nan")), 4, BudgetError, r"\[0, 1\)"),
        (BudgetSpec("half"), 4, BudgetError, "must be a number"),
        (BudgetSpec(0.5, protected=(4,)), 4, BudgetError, "protected layer 4 does not exist"),
        (BudgetSpec(0.5, min_tokens=0), 4, BudgetError, "min_tokens must be >= 1"),
        (BudgetSpec(0.5), 0, BudgetError, "at least one layer"),
        # unreachable at any context length
        (BudgetSpec(0.5, protected=(0, 1, 2, 3)), 4, BudgetError, "cannot meet ratio 0.5 on 4 layers"),
        (BudgetSpec(0.6, protected=(0, 1, 2)), 4, BudgetError, "cannot meet ratio 0.6"),
        (BudgetSpec(0.8, "mga", SensitivityView.from_metric([1.0, 2.0, 3.0, 4.0])), 4, BudgetError,
         "ratio_max"),
    ],
)
def test_validate_fails_early(spec, n_layers, err, match):
    with pytest.raises(err, match=match):
        spec.validate(n_layers)
    with pytest.raises(err):
        spec.policy(n_layers)


def test_policy_needs_a_layer_count_without_profile():
    with pytest.raises(AllocatorError, match="n_layers"):
        BudgetSpec(0.5, "pyramid").policy()


def test_bad_profile_argument():
    with pytest.raises(AllocatorError, match="profile must be"):
        BudgetSpec(0.5, "optimal", profile=[1, 2, 3])
    with pytest.raises(FileNotFoundError):
        BudgetSpec(0.5, "optimal", profile="/nonexistent/profile.json")


def test_feasible_for_long_contexts_passes_and_short_ones_fail_at_use():
    """ratio 0.99 with a 20-token floor on 4 layers needs N >= 2000: valid, yet a 96-token context fails."""
    spec = BudgetSpec(0.99, min_tokens=20)
    policy = spec.policy(4)
    assert policy(4000).total == global_budget(4, 4000, 0.99)
    with pytest.raises(BudgetError, match="maximum reachable ratio"):
        policy(96)


# ------------------------------------------------------------------------------------------ input scores
def test_scores_reach_only_allocators_that_need_them(toy_allocators):
    seen = toy_allocators
    n, L = 50, 4
    scores = [np.full((1, 2, n), float(i + 1)) for i in range(L)]  # deeper layers score higher
    spec = BudgetSpec(0.5, "toy-scores", min_tokens=5)
    assert spec.needs_scores and ALLOCATORS["toy-scores"].options == {"bias": 0.0}  # scores is no option
    policy = spec.policy(L)  # validate skips the trial: there is no input yet
    assert policy_needs_scores(policy)
    b = policy(n, scores=scores)
    assert seen["scores"] is scores and b.total == global_budget(L, n, 0.5)
    assert list(b.tokens) == sorted(b.tokens) and b.tokens[0] < b.tokens[-1]
    assert b == spec.for_context(L, n, scores)
    # an allocator without the need never receives them (toy-plain has no scores parameter)
    plain = BudgetSpec(0.5, "toy-plain", min_tokens=5)
    assert not plain.needs_scores and not policy_needs_scores(plain.policy(L))
    assert plain.for_context(L, n, scores) == uniform(L, n, 0.5, min_tokens=5) and seen["plain"]
    assert BudgetSpec(0.5, "uniform").for_context(L, n, scores) == uniform(L, n, 0.5)


def test_missing_or_misshapen_scores_are_clear_errors(toy_allocators):
    spec = BudgetSpec(0.5, "toy-scores")
    with pytest.raises(AllocatorError, match="needs the token scores"):
        spec.for_context(4, 50)
    with pytest.raises(AllocatorError, match="cover 3 layers, the request 4"):
        spec.for_context(4, 50, [np.ones((1, 2, 50))] * 3)
    with pytest.raises(AllocatorError, match="layer 2 cover 49 tokens, the context 50"):
        spec.for_context(4, 50, [np.ones((1, 2, 50))] * 2 + [np.ones((1, 2, 49))] * 2)
    with pytest.raises(AllocatorError, match="layer 0 are missing"):
        spec.for_context(4, 50, [None] * 4)
    with pytest.raises(AllocatorError, match="one entry per layer"):
        spec.for_context(4, 50, 7)


def test_registering_a_scores_allocator_needs_the_parameter():
    with pytest.raises(ValueError, match="keyword-only parameter 'scores'"):
        @register_allocator("toy-broken", needs=("scores",))
        def broken(request, sensitivity=None):
            """Lacks the scores parameter."""
    assert "toy-broken" not in ALLOCATORS
    with pytest.raises(ValueError, match="unknown need 'logits'"):
        register_allocator("toy-logits", needs=("logits",))


def test_session_passes_scores_to_an_adaptive_policy_and_caches_only_plain_ones(tiny_models, toy_allocators):
    """The engine's Session: plain budgets cached per context length; input-adaptive ones asked every time."""
    from depthkv.engine.session import Plan, Protection, Session

    session = Session(tiny_models("llama"))
    calls = []

    def plain(n: int) -> Budgets:
        calls.append(n)
        return uniform(4, n, 0.5)

    session.set_plan(Plan(kind="post", policy=plain, protection=Protection(0, 0)))
    assert session.budgets_for(40) is session.budgets_for(40)
    assert calls == [40]
    session.budgets_for(41)
    assert calls == [40, 41]

    policy = BudgetSpec(0.5, "toy-scores").policy(4)
    session.set_plan(Plan(kind="post", policy=policy, protection=Protection(0, 0)))
    low = [np.full((1, 2, 40), 1.0)] * 3 + [np.full((1, 2, 40), 9.0)]
    high = [np.full((1, 2, 40), 9.0)] + [np.full((1, 2, 40), 1.0)] * 3
    a, b = session.budgets_for(40, scores=low), session.budgets_for(40, scores=high)
    assert a.total == b.total == global_budget(4, 40, 0.5)
    assert a.tokens[3] > a.tokens[0] and b.tokens[0] > b.tokens[3]  # not a cached vector


# ------------------------------------------------------------------------------------------- property
SPECS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@SPECS
@given(
    n_layers=st.integers(1, 40),
    context_len=st.integers(1, 20_000),
    ratio=st.floats(0.0, 0.999, allow_nan=False),
    strategy=st.sampled_from(["uniform", "pyramid", "mlp", "optimal", "proportional"]),
    min_tokens=st.integers(1, 64),
    first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_for_context_keeps_the_exact_global_total(n_layers, context_len, ratio, strategy, min_tokens, first,
                                                  seed):
    """Whenever it returns, the vector sums to round(L*N*(1-ratio)) exactly and respects floors and
    protection; it raises BudgetError only when the floors cannot fit (or the protected layers alone
    exceed the budget)."""
    prot = (0,) if first else ()
    spec = BudgetSpec(ratio, strategy, make_profile(n_layers, seed), prot, min_tokens)
    total = global_budget(n_layers, context_len, ratio)
    try:
        b = spec.for_context(n_layers, context_len)
    except BudgetError:
        floor = min(min_tokens, context_len)
        kept_whole = set(prot) | (set(middle_layers(n_layers, 2)) if strategy == "mlp" else set())
        free = n_layers - len(kept_whole)
        rest = total - len(kept_whole) * context_len
        assert (rest != 0) if free == 0 else rest < free * floor
        return
    assert b.total == total
    assert b.n_layers == n_layers and b.context_len == context_len and b.ratio == ratio
    assert all(min(min_tokens, context_len) <= t <= context_len for t in b.tokens)
    assert all(b.tokens[p] == context_len for p in prot)
