"""Property tests of every registered allocator: exact sum, bounds, protection, caps, monotonicity in ratio."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depthkv.allocation import (
    ALLOCATORS,
    BudgetError,
    SensitivityView,
    allocate,
    apportion,
    global_budget,
    list_allocators,
    middle_layers,
    optimal_curves,
    select_top,
)
from depthkv.allocation.apportion import divisor_priority
from depthkv.allocation.mga import TRANSFORMS

# Allocator properties run 1,000 examples each; the solver cross-checks below (brute force, the two
# solvers against each other) run fewer, to keep this file under a minute on 2 CPUs.
SOLVER = settings(max_examples=200, deadline=None, derandomize=True)
PROPS = settings(
    max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# optimal-joint and adaptive-joint serve only the ratios a profile holds refined vectors for, measured
# independently per ratio (so not monotone across ratios); tests/test_refine.py and tests/test_adaptive.py check
# their totals, floors and caps
NAMES = [n for n in list_allocators() if n not in ("optimal-joint", "adaptive-joint")]
PROBES = (0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0)


def test_registry_has_the_paper_allocators():
    for name in ("uniform", "pyramid", "mlp", "mga", "mlma-2", "mlma-4", "mlma-6", "proportional", "optimal"):
        assert name in ALLOCATORS


def make_view(n_layers: int, ratios: tuple[float, ...], seed: int, tied: bool) -> SensitivityView:
    """Random curves and metric from a seed (cheap to generate); ``tied`` rounds values to force ties."""
    rng = np.random.default_rng(seed)
    deg = rng.uniform(-0.05, 3.0, (n_layers, len(ratios)))
    metric = rng.uniform(0.01, 5.0, n_layers)
    if tied:
        deg = np.round(deg)
        metric = np.round(metric) + 0.5
    return SensitivityView(ratios, deg, metric)


_RATIO_SETS = st.sets(st.sampled_from(PROBES), min_size=1, max_size=4)


@st.composite
def views(draw, n_layers: int) -> SensitivityView:
    ratios = tuple(sorted(draw(_RATIO_SETS)))
    return make_view(n_layers, ratios, draw(st.integers(0, 2**32 - 1)), draw(st.booleans()))


# A flat tuple of pre-built strategies for what matters most to edge cases (sizes, ratios, floor); the
# rest (protected set, probe ratios, curves, options) is derived from a drawn seed, which keeps
# generation cheap enough for 1,000 examples per allocator.
_RAW_CASE = st.tuples(
    st.booleans(),  # small model (1..3 layers)?
    st.integers(1, 12),  # layers
    st.booleans(),  # very short context (1..5 tokens)?
    st.integers(1, 300),  # context length
    st.booleans(),  # long context (x10: the allocators' bisection solver instead of enumeration)?
    st.integers(1, 8),  # min_tokens
    st.integers(0, 9900),  # ratio 1, in 1e-4 steps (integers generate much faster than floats)
    st.integers(0, 9900),  # ratio 2
    st.integers(0, 2**32 - 1),  # seed for the rest
)


def _options(name: str, rng: np.random.Generator, ratios: tuple[float, ...]) -> dict:
    if name == "pyramid":
        return {"beta": float(rng.choice([1.0, 2.0, 20.0, rng.uniform(1.0, 40.0)]))}
    if name == "mga" or name.startswith("mlma"):
        opts = {
            "ratio_max": float(rng.choice([0.7, 0.7, 0.5, 0.9, 1.0])),
            "transform": str(rng.choice(TRANSFORMS)),
        }
        if name == "mlma":
            opts["k"] = int(rng.integers(1, 7))
        return opts
    if name == "proportional":
        probe = None if rng.random() < 0.5 else float(rng.choice(ratios))
        return {"probe_ratio": probe, "floor": float(rng.choice([0.0, 0.1, 1.0]))}
    return {}


def cases(name: str):
    def build(raw) -> dict:
        small, L, short, n, long, min_tokens, r1, r2, seed = raw
        L = (L - 1) % 3 + 1 if small else L
        n = (n - 1) % 5 + 1 if short else (10 * n + seed % 10 if long else n)
        targets = (r1 / 1e4, r2 / 1e4)
        rng = np.random.default_rng(seed)
        ratios = tuple(sorted(rng.choice(PROBES, size=int(rng.integers(1, 5)), replace=False).tolist()))
        n_prot = int(rng.integers(0, min(3, L) + 1))
        protected = tuple(sorted(rng.choice(L, size=n_prot, replace=False).tolist()))
        return dict(
            n_layers=L,
            n=n,
            protected=protected,
            min_tokens=min_tokens,
            view=make_view(L, ratios, seed, bool(rng.random() < 0.3)),
            targets=sorted(targets),
            options=_options(name, rng, ratios),
            scores=input_scores(L, n, rng) if ALLOCATORS[name].needs_scores else None,
        )

    return _RAW_CASE.map(build)


def expected(name: str, c: dict, ratio: float) -> tuple[bool, set[int], int]:
    """Independent feasibility check: (feasible, protected layers, least tokens of a pruned layer)."""
    L, n = c["n_layers"], c["n"]
    prot = set(c["protected"])
    if name == "mlp":
        prot |= set(middle_layers(L, 2))
    if name.startswith("mlma"):
        k = c["options"].get("k", 2) if name == "mlma" else int(name.split("-")[1])
        prot |= set(middle_layers(L, k))
    lo = min(c["min_tokens"], n)
    if name == "mga" or name.startswith("mlma"):
        lo = max(lo, math.ceil(n * (1 - c["options"]["ratio_max"]) - 1e-9))
    free = L - len(prot)
    rest = global_budget(L, n, ratio) - len(prot) * n
    feasible = rest == 0 if free == 0 else rest >= free * lo
    return feasible, prot, lo


def input_scores(n_layers: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Token scores of one input for the input-adaptive allocators: [batch 1, 2 KV heads, N] per layer,
    with ties (rounded values) and a few +inf (protected tokens, as the engine scores them)."""
    out = []
    for _ in range(n_layers):
        s = np.round(rng.exponential(rng.uniform(0.1, 3.0), (1, 2, n)), 2)
        s[..., : int(rng.integers(0, 2))] = np.inf
        out.append(s)
    return out


def run(name: str, c: dict, ratio: float):
    try:
        return allocate(
            name,
            c["n_layers"],
            c["n"],
            ratio,
            sensitivity=c["view"],
            protected=c["protected"],
            min_tokens=c["min_tokens"],
            scores=c.get("scores"),
            **c["options"],
        )
    except BudgetError:
        return None


def check_valid(name: str, c: dict, ratio: float, b) -> None:
    feasible, prot, lo = expected(name, c, ratio)
    assert (b is not None) == feasible, f"feasible={feasible} but got {b}"
    if b is None:
        return
    L, n = c["n_layers"], c["n"]
    assert b.n_layers == L and b.context_len == n
    assert b.total == global_budget(L, n, ratio)
    assert all(1 <= t <= n for t in b.tokens)
    assert set(c["protected"]) <= set(b.protected)
    for i, t in enumerate(b.tokens):
        if i in prot:
            assert t == n, (i, b.tokens)
        else:
            assert t >= lo, (i, t, lo, b.tokens)  # floor, and the ratio_max cap for mga / mlma


@pytest.mark.parametrize("name", NAMES)
def test_allocator_properties(name):
    """Both ratios: valid Budgets iff the request is feasible, else BudgetError; and monotone in ratio.

    Valid: sum == round(L*N*(1-ratio)) exactly, every entry in [min(min_tokens, N), N], protected layers
    (user's and the allocator's own middle layers) == N, mga/mlma caps hold. Monotone (required of
    every allocator): a larger ratio never gives any layer more tokens, and is never feasible when a
    smaller one is not. Shape: pyramid non-increasing over layers, mga ordered by InfoNCE.
    """

    @PROPS
    @given(cases(name))
    def prop(c):
        lo_ratio, hi_ratio = c["targets"]
        less, more = run(name, c, lo_ratio), run(name, c, hi_ratio)
        check_valid(name, c, lo_ratio, less)
        check_valid(name, c, hi_ratio, more)
        if more is not None:
            assert less is not None, "a larger ratio was feasible but a smaller one was not"
            assert all(a >= b for a, b in zip(less.tokens, more.tokens)), (less.tokens, more.tokens)
        for b in (less, more):
            if b is not None and name in SHAPE_CHECKS:
                SHAPE_CHECKS[name](c, b)

    prop()


def pyramid_shape(c: dict, b) -> None:
    """Pyramid: budgets never increase from a lower to a higher free layer."""
    free = [b.tokens[i] for i in range(c["n_layers"]) if i not in c["protected"]]
    assert all(x >= y for x, y in zip(free, free[1:])), free


def mga_order(c: dict, b) -> None:
    """MGA: a layer with lower InfoNCE (more critical) never keeps fewer tokens than one with higher."""
    m = c["view"].metric
    free = [i for i in range(c["n_layers"]) if i not in c["protected"]]
    for i, j in itertools.permutations(free, 2):
        if m[i] < m[j]:
            assert b.tokens[i] >= b.tokens[j], (m, b.tokens)


SHAPE_CHECKS = {"pyramid": pyramid_shape, "mga": mga_order}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_models_exhaustive(name):
    """1- to 3-layer models, N = 1..5, every ratio step, every protected set: valid or BudgetError."""
    view_cache = {}
    for L, n in itertools.product((1, 2, 3), range(1, 6)):
        rng = np.random.default_rng(L * 10 + n)
        view_cache[L] = SensitivityView((0.5, 1.0), rng.random((L, 2)), rng.random(L) + 0.1)
        for prot_size in range(L + 1):
            for protected in itertools.combinations(range(L), prot_size):
                for min_tokens in (1, 2, 4):
                    c = dict(
                        n_layers=L,
                        n=n,
                        protected=protected,
                        min_tokens=min_tokens,
                        view=view_cache[L],
                        options={"ratio_max": 0.7} if (name == "mga" or name.startswith("mlma")) else {},
                        scores=input_scores(L, n, rng) if ALLOCATORS[name].needs_scores else None,
                    )
                    prev = None
                    for ratio in np.linspace(0, 0.98, 50):
                        b = run(name, c, float(ratio))
                        check_valid(name, c, float(ratio), b)
                        if prev is not None and b is not None:
                            assert all(x >= y for x, y in zip(prev.tokens, b.tokens))
                        if b is not None:
                            prev = b


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    st.integers(1, 3).flatmap(
        lambda L: st.tuples(st.just(L), st.integers(1, 7), views(L), st.integers(0, 9900), st.integers(1, 3))
    )
)
def test_optimal_matches_brute_force(args):
    """Greedy on hull segments is the exact optimum of the convexified problem (brute force, L <= 3, N <= 7)."""
    L, n, view, r, min_tokens = args
    ratio = r / 1e4
    try:
        b = allocate("optimal", L, n, ratio, sensitivity=view, min_tokens=min_tokens)
    except BudgetError:
        assert global_budget(L, n, ratio) < L * min(min_tokens, n)
        return
    lo = min(min_tokens, n)
    curves = optimal_curves(view, range(L), n, lo)
    best = min(curves.value(t) for t in itertools.product(range(lo, n + 1), repeat=L) if sum(t) == b.total)
    assert curves.value(b.tokens) == pytest.approx(best, abs=1e-9)


@SOLVER
@given(st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(0, 1000))
def test_select_top_bisect_equals_enumerate(L, seed, share):
    """The two solvers agree exactly, ties included (weights often equal or zero)."""
    rng = np.random.default_rng(seed)
    w = rng.choice([0.0, 1.0, 2.0, rng.uniform(0, 10)], size=L)
    a, b = rng.integers(0, 31, L), rng.integers(0, 31, L)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    need = int(round(share / 1000 * int((hi - lo).sum())))
    prio = divisor_priority(w)
    e = select_top(need, lo, hi, prio, method="enumerate")
    s = select_top(need, lo, hi, prio, method="bisect")  # closed-form counts
    g = select_top(need, lo, hi, lambda layer, k: prio(layer, k), method="bisect")  # generic binary search
    assert e.tolist() == s.tolist() == g.tolist()
    assert int(e.sum()) == int(lo.sum()) + need
    assert np.all(lo <= e) and np.all(e <= hi)


@SOLVER
@given(
    st.integers(1, 5).flatmap(
        lambda L: st.tuples(st.just(L), views(L), st.integers(2, 60), st.integers(0, 95))
    )
)
def test_optimal_priority_bisect_equals_enumerate(args):
    L, view, n, r = args
    ratio = r / 100
    curves = optimal_curves(view, range(L), n, 1)
    need = global_budget(L, n, ratio) - L
    if need < 0:
        return
    lo, hi = np.ones(L, int), np.full(L, n)
    e = select_top(need, lo, hi, curves, method="enumerate")
    s = select_top(need, lo, hi, curves, method="bisect")  # run-based counts
    g = select_top(need, lo, hi, curves.priority, method="bisect")  # generic binary search
    assert e.tolist() == s.tolist() == g.tolist()


@SOLVER
@given(st.integers(1, 8), st.integers(0, 2**32 - 1), st.integers(1, 2000), st.integers(1, 2000))
def test_apportion_large_totals_monotone(L, seed, t1, t2):
    """The bisection path (large N) is exact and monotone in the total as well."""
    w = np.random.default_rng(seed).uniform(0.01, 10, L)
    hi = np.full(L, 5000)
    lo = np.ones(L, int)
    a, b = sorted((t1 * L, t2 * L))
    x = apportion(a, w, lo, hi, method="bisect")
    y = apportion(b, w, lo, hi, method="bisect")
    assert int(x.sum()) == a and int(y.sum()) == b
    assert np.all(x <= y)
