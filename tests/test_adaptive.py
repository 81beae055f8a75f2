"""Input-adaptive allocation (global / adaptive) and per-KV-head budgets: exact totals, floors, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import depthkv
from depthkv.allocation import (
    AllocatorError,
    BudgetError,
    SensitivityView,
    adaptive,
    allocate,
    global_budget,
    head_split,
    head_split_layers,
    rank_curves,
    select_top,
)
from depthkv.allocation.adaptive import take_best
from depthkv.allocation.optimal import allocate_optimal
from depthkv.allocation.registry import make_request
from depthkv.engine import Plan, Protection, Session, clone_cache, prune_layer, score_prefill
from depthkv.engine import session as engine_session
from depthkv.engine.cache import kv_bytes, kv_bytes_ragged
from depthkv.engine.runner import forward_with_cache

PROPS = settings(max_examples=150, deadline=None, derandomize=True)


def _scores(rng: np.random.Generator, n_layers: int, kvh: int, n: int) -> list[np.ndarray]:
    return [rng.gamma(0.5, size=(1, kvh, n)) ** (1 + i % 3) for i in range(n_layers)]


def _view(n_layers: int, rng: np.random.Generator) -> SensitivityView:
    probes = (0.5, 0.9, 1.0)
    curves = np.sort(rng.uniform(0, 1, size=(n_layers, 3)), axis=1)
    return SensitivityView(probes, curves)


@PROPS
@given(st.integers(1, 12), st.integers(1, 3), st.integers(24, 300), st.floats(0.0, 0.95), st.integers(0, 10_000),
       st.sampled_from(["none", "mean"]))
def test_global_is_exact_and_respects_floors(n_layers, kvh, n, ratio, seed, normalise):
    rng = np.random.default_rng(seed)
    floor = 20
    if global_budget(n_layers, n, ratio) < n_layers * floor:
        return
    b = allocate("global", n_layers, n, ratio, scores=_scores(rng, n_layers, kvh, n), min_tokens=floor,
                 normalise=normalise)
    assert b.total == global_budget(n_layers, n, ratio)
    assert all(floor <= t <= n for t in b.tokens)


@PROPS
@given(st.integers(2, 10), st.integers(32, 300), st.floats(0.3, 0.95), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_adaptive_keeps_its_share_of_the_static_optimum(n_layers, n, ratio, share, seed):
    rng = np.random.default_rng(seed)
    view = _view(n_layers, rng)
    if global_budget(n_layers, n, ratio) < n_layers * 20:
        return
    opt = allocate("optimal", n_layers, n, ratio, sensitivity=view, min_tokens=20)
    b = allocate("adaptive", n_layers, n, ratio, sensitivity=view, scores=_scores(rng, n_layers, 2, n),
                 min_tokens=20, floor_share=share)
    assert b.total == opt.total
    assert all(t >= max(20, int(np.floor(share * o))) for t, o in zip(b.tokens, opt.tokens))
    if share == 1.0:
        assert b.tokens == opt.tokens


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.6, 0.8, 0.9])
def test_adaptive_with_the_whole_floor_is_optimal(seed, ratio):
    """floor_share 1: the floors take the whole budget, so the split is the static optimum whatever the scores
    (``adaptive+heads`` at share 1 is ``optimal+heads``)."""
    rng = np.random.default_rng(seed)
    view = _view(8, rng)
    opt = allocate("optimal", 8, 500, ratio, sensitivity=view, min_tokens=20)
    b = allocate("adaptive", 8, 500, ratio, sensitivity=view, scores=_scores(rng, 8, 2, 500), min_tokens=20,
                 floor_share=1.0)
    assert b.tokens == opt.tokens


@PROPS
@given(st.integers(2, 8), st.integers(64, 400), st.sampled_from([0.8, 0.9]), st.floats(0.0, 1.0),
       st.integers(0, 10_000))
def test_adaptive_joint_keeps_its_share_of_the_refined_split(n_layers, n, ratio, share, seed):
    """adaptive-joint: exact total, and every layer keeps floor_share of what optimal-joint gives it."""
    rng = np.random.default_rng(seed)
    raw = rng.dirichlet(np.ones(n_layers)) * n_layers * (1 - ratio)  # kept shares, mean 1 - ratio
    view = SensitivityView((0.5, 0.9, 1.0), np.sort(rng.uniform(0, 1, size=(n_layers, 3)), axis=1),
                           refined={ratio: np.minimum(raw, 1.0).tolist()})
    if global_budget(n_layers, n, ratio) < n_layers * 20:
        return
    try:
        joint = allocate("optimal-joint", n_layers, n, ratio, sensitivity=view, min_tokens=20)
    except BudgetError:
        return
    b = allocate("adaptive-joint", n_layers, n, ratio, sensitivity=view, scores=_scores(rng, n_layers, 2, n),
                 min_tokens=20, floor_share=share)
    assert b.total == joint.total == global_budget(n_layers, n, ratio) and b.strategy == "adaptive-joint"
    assert all(max(20, int(np.floor(share * j))) <= t <= n for t, j in zip(b.tokens, joint.tokens))
    if share == 1.0:
        assert b.tokens == joint.tokens


def test_adaptive_joint_refuses_a_ratio_without_refined_shares():
    view = SensitivityView((0.5, 1.0), np.array([[0.1, 0.2], [0.3, 0.4]]), refined={0.8: [0.1, 0.3]})
    scores = [np.ones((1, 1, 100))] * 2
    assert allocate("adaptive-joint", 2, 100, 0.8, sensitivity=view, scores=scores, min_tokens=5).total == 40
    with pytest.raises(AllocatorError, match="no refined budgets for ratio 0.6"):
        allocate("adaptive-joint", 2, 100, 0.6, sensitivity=view, scores=scores, min_tokens=5)


def test_global_follows_the_scores():
    """A layer whose attention is concentrated on many tokens gets more of them than a flat one."""
    n = 100
    flat = np.full((1, 2, n), 0.01)
    peaked = np.zeros((1, 2, n))
    peaked[..., :60] = 0.5
    b = allocate("global", 2, n, 0.5, scores=[flat, peaked], min_tokens=10)
    assert b.tokens == (40, 60)


def test_adaptive_needs_scores_and_profile():
    with pytest.raises(AllocatorError, match="scores"):
        allocate("global", 2, 50, 0.5)
    with pytest.raises(AllocatorError, match="sensitivity"):
        allocate("adaptive", 2, 50, 0.5, scores=[np.ones((1, 1, 50))] * 2)


def test_rank_curves_are_non_increasing_with_inf_first():
    s = np.array([[[0.1, np.inf, 0.3, -0.2]]])
    c = rank_curves([s])[0]
    assert np.all(np.diff(c) <= 0) and np.isfinite(c).all() and c[0] > c[1]


@PROPS
@given(st.integers(1, 4), st.integers(30, 200), st.integers(0, 10_000), st.data())
def test_head_split_is_exact(kvh, n, seed, data):
    rng = np.random.default_rng(seed)
    floor = 20
    budget = data.draw(st.integers(floor, n))
    counts = head_split(rng.gamma(0.3, size=(1, kvh, n)), budget, floor)
    assert counts.sum() == budget * kvh
    assert counts.min() >= floor and counts.max() <= n


def _ids(n, seed=0):
    return torch.randint(5, 250, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_head_budgets_equal_a_masked_full_cache(tiny_models, arch):
    """Per-head ragged layers (padding masked) give the same logits as the full cache with exactly the kept
    keys of each head visible: padding never leaks into attention, and layer budgets stay exact."""
    model = tiny_models(arch)
    ctx, question = _ids(90), _ids(5, seed=2)
    sp = score_prefill(model, ctx, [depthkv.scorers.get_scorer("snapkv")], Protection())
    budgets = depthkv.allocation.uniform(4, 90, 0.7, min_tokens=20)
    pruned = sp.prune("snapkv", budgets, head_budgets=True)
    masks = {}
    for i, layer in enumerate(pruned.layers):
        valid = layer.valid if layer.valid is not None else torch.ones_like(layer.kept_pos, dtype=torch.bool)
        assert int(valid.sum()) == budgets.tokens[i] * 2  # the layer's budget, over its 2 KV heads
        vis = torch.zeros(1, 2, 90, dtype=torch.bool)
        vis.scatter_(-1, layer.kept_pos.long(), valid)
        masks[i] = vis
    assert kv_bytes_ragged(pruned) == 2 * sum(budgets.tokens) * 2 * 16 * 4  # K+V, 2 heads, d=16, fp32
    assert kv_bytes(pruned) >= kv_bytes_ragged(pruned)
    with Session(model) as s:
        s.set_plan(Plan(kind="off"))
        got = forward_with_cache(model, question, pruned, logits_to_keep=5)
    with Session(model) as s:
        s.set_plan(Plan(kind="ablate", key_masks=masks))
        want = forward_with_cache(model, question, clone_cache(sp.cache), logits_to_keep=5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_press_head_budgets_and_global_generate(tiny_models):
    model = tiny_models("llama")
    ids = _ids(100)
    for strategy in ("uniform", "global"):
        p = depthkv.press(model, "snapkv", 0.6, strategy=strategy, head_budgets=True)
        with p:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert out.shape[1] == 106
        assert p.budgets.total == global_budget(4, 100, 0.6)
        comp = p.compress(ids)
        assert kv_bytes_ragged(comp.cache) == 2 * p.budgets.total * 2 * 16 * 4
    with pytest.raises(ValueError, match="post"):
        depthkv.press(model, "snapkv", 0.6, head_budgets=True, mode="chunked")
    with pytest.raises(ValueError, match="post"):
        depthkv.press(model, "snapkv", 0.6, strategy="global", mode="chunked")


# ---------------------------------------------------------------- the vectorised path equals the definition
# The reference below is the pointwise definition, computed the plain way: numpy per layer, then the generic
# ``select_top`` solver (its own binary search, no shortcut) over ``priority(l, k) = curves[l, k - 1]``.


def _ref_curves(scores, normalise="none"):
    rows = [(s.detach().float().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)).astype(np.float64)
            for s in scores]
    rows = [r.reshape(-1, r.shape[-1]) for r in rows]
    finite = np.concatenate([r[np.isfinite(r)] for r in rows])
    top = float(finite.max()) if finite.size else 0.0
    low = float(finite.min()) if finite.size else 0.0
    out = []
    for a in rows:
        a = np.where(np.isfinite(a), a, top + 1.0) - min(low, 0.0)
        c = (-np.sort(-a, axis=-1)).mean(axis=0)
        if normalise == "mean":
            fin = c[c <= top + 1.0 - min(low, 0.0) - 1e-12]
            c = c / (float(fin.mean()) if fin.size and fin.mean() > 0 else 1.0)
        out.append(np.minimum.accumulate(c))
    return np.stack(out)


def _ref_select(need, lo, hi, curves, method="auto"):
    return select_top(need, lo, hi, lambda layers, k: curves[layers, k - 1], method=method)


def _ref_allocate(strategy, n_layers, n, ratio, scores, protected=(), floor=20, normalise="none", view=None,
                  share=0.5):
    req = make_request(n_layers, n, ratio, protected=protected, min_tokens=floor)
    free = list(req.free)
    lo = np.full(len(free), req.floor, dtype=np.int64)
    if strategy == "adaptive":
        static = np.asarray(allocate_optimal(req, view).tokens)
        lo = np.maximum(lo, np.floor(share * static[free]).astype(np.int64))
    hi = np.full(len(free), n, dtype=np.int64)
    lo = np.minimum(lo, hi)
    picked = _ref_select(req.rest - int(lo.sum()), lo, hi, _ref_curves(scores, normalise)[free])
    tokens = [n] * n_layers
    for i, t in zip(free, picked):
        tokens[i] = int(t)
    return tuple(tokens)


def _tied_scores(rng, n_layers, rows, n, levels, kind):
    """Scores with many exact ties (few distinct levels), some protected (+inf), NaN and negative values."""
    out = []
    for _ in range(n_layers):
        s = rng.integers(0, levels, size=(1, rows, n)).astype(np.float64) / levels - 0.1
        s[..., : rng.integers(0, 5)] = np.inf
        if rng.random() < 0.3:
            s[0, 0, rng.integers(0, n)] = np.nan
        out.append(s if kind == "numpy" else torch.tensor(s, dtype=getattr(torch, kind)))
    return out


EXACT = settings(max_examples=60, deadline=None, derandomize=True)


@EXACT
@given(st.integers(1, 6), st.sampled_from([1, 2, 3, 6, 8, 16]), st.integers(2, 120), st.sampled_from([2, 5, 1000]),
       st.sampled_from(["numpy", "float32", "bfloat16"]), st.sampled_from(["none", "mean"]), st.integers(0, 10_000))
def test_rank_curves_equal_the_reference_bit_for_bit(n_layers, rows, n, levels, kind, normalise, seed):
    scores = _tied_scores(np.random.default_rng(seed), n_layers, rows, n, levels, kind)
    np.testing.assert_array_equal(rank_curves(scores, normalise), _ref_curves(scores, normalise))


def test_rank_curves_layers_of_different_head_counts():
    rng = np.random.default_rng(3)
    scores = [rng.gamma(0.5, size=(1, h, 64)) for h in (1, 4, 2)]
    np.testing.assert_array_equal(rank_curves(scores), _ref_curves(scores))


@EXACT
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 60), st.integers(0, 10_000), st.data())
def test_take_best_equals_select_top(rows, batch, width, seed, data):
    """Ties at the threshold are filled k ascending, then row ascending: the same units as both solvers."""
    rng = np.random.default_rng(seed)
    curves = -np.sort(-rng.integers(0, 4, size=(batch, rows, width)).astype(np.float64), axis=-1)
    lo = rng.integers(0, width + 1, size=rows)
    hi = np.array([rng.integers(a, width + 1) for a in lo])
    need = data.draw(st.integers(0, int((hi - lo).sum())))
    got = take_best(need, lo, hi, torch.from_numpy(curves))
    for b in range(batch):
        for method in ("enumerate", "bisect"):
            np.testing.assert_array_equal(got[b], _ref_select(need, lo, hi, curves[b], method))
    np.testing.assert_array_equal(take_best(need, lo, hi, curves[0]), got[0])


def test_take_best_rejects_what_select_top_rejects():
    curves = np.zeros((2, 5))
    with pytest.raises(BudgetError, match="cannot place 9 units"):
        take_best(9, [0, 2], [5, 5], curves)
    with pytest.raises(BudgetError, match="lo <= hi"):
        take_best(1, [3, 0], [2, 5], curves)


@EXACT
@given(st.integers(1, 8), st.integers(1, 4), st.integers(24, 200), st.floats(0.0, 0.95), st.sampled_from([3, 50, 0]),
       st.sampled_from(["numpy", "float32"]), st.sampled_from(["none", "mean"]), st.booleans(), st.integers(0, 10_000))
def test_global_equals_the_reference(n_layers, kvh, n, ratio, levels, kind, normalise, protect, seed):
    rng = np.random.default_rng(seed)
    scores = (_tied_scores(rng, n_layers, kvh, n, levels, kind) if levels else
              [torch.tensor(s, dtype=torch.float32) if kind == "float32" else s for s in _scores(rng, n_layers, kvh, n)])
    protected = (0,) if protect and n_layers > 1 else ()
    try:
        want = _ref_allocate("global", n_layers, n, ratio, scores, protected, normalise=normalise)
    except BudgetError:
        with pytest.raises(BudgetError):
            allocate("global", n_layers, n, ratio, scores=scores, protected=protected, min_tokens=20,
                     normalise=normalise)
        return
    got = allocate("global", n_layers, n, ratio, scores=scores, protected=protected, min_tokens=20, normalise=normalise)
    assert got.tokens == want


@EXACT
@given(st.integers(2, 8), st.integers(32, 200), st.floats(0.3, 0.95), st.floats(0.0, 1.0), st.sampled_from([3, 0]),
       st.integers(0, 10_000))
def test_adaptive_equals_the_reference(n_layers, n, ratio, share, levels, seed):
    rng = np.random.default_rng(seed)
    view = _view(n_layers, rng)
    scores = _tied_scores(rng, n_layers, 2, n, levels, "numpy") if levels else _scores(rng, n_layers, 2, n)
    if global_budget(n_layers, n, ratio) < n_layers * 20:
        return
    got = allocate("adaptive", n_layers, n, ratio, sensitivity=view, scores=scores, min_tokens=20, floor_share=share)
    assert got.tokens == _ref_allocate("adaptive", n_layers, n, ratio, scores, view=view, share=share)


@EXACT
@given(st.integers(1, 3), st.integers(1, 8), st.integers(20, 150), st.sampled_from([2, 1000]),
       st.sampled_from(["numpy", "float32"]), st.integers(0, 10_000), st.data())
def test_head_split_equals_the_reference(batch, kvh, n, levels, kind, seed, data):
    rng = np.random.default_rng(seed)
    s = np.concatenate([_tied_scores(rng, 1, kvh, n, levels, "numpy")[0] for _ in range(batch)])
    floor = data.draw(st.integers(1, 30))
    budget = data.draw(st.integers(1, n))
    lo = np.full(kvh, min(floor, n, budget))
    want = np.stack([_ref_select(budget * kvh - int(lo.sum()), lo, np.full(kvh, n),
                                 _ref_curves([row[h][None] for h in range(kvh)])) for row in s])
    got = head_split(s if kind == "numpy" else torch.tensor(s, dtype=torch.float32), budget, floor)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64 and got.shape == (batch, kvh)


def test_accelerator_code_path_gives_the_same_budgets(monkeypatch):
    """The sort-based selection used on GPUs (torch sort, threshold by a full sort) equals the host one."""
    rng = np.random.default_rng(11)
    view = _view(6, rng)
    inputs = [[torch.tensor(s, dtype=torch.float32) for s in _tied_scores(rng, 6, 4, 300, 7, "numpy")],
              [torch.tensor(s, dtype=torch.float32) for s in _scores(rng, 6, 4, 300)]]  # with and without ties
    layers = [torch.tensor(np.concatenate([_tied_scores(rng, 1, 4, 300, 3, "numpy")[0]] * 2), dtype=torch.float32),
              torch.tensor(rng.gamma(0.3, size=(2, 4, 300)), dtype=torch.float32)]
    cases = [(s, r, scores) for s in ("global", "adaptive") for r in (0.3, 0.7) for scores in inputs]

    def run():
        return ([allocate(s, 6, 300, r, scores=sc, sensitivity=view, protected=(0,), min_tokens=20).tokens
                 for s, r, sc in cases], [head_split(x, 70, 20).tolist() for x in layers])

    host = run()
    assert host[0] == [_ref_allocate(s, 6, 300, r, sc, (0,), view=view) for s, r, sc in cases]
    monkeypatch.setattr(adaptive, "HOST_DEVICES", ())
    assert run() == host


# ---------------------------------------------------------------- per-head budgets of many layers in one pass


def _sorted_head_split(layer_scores, budget, floor):
    """The per-layer head split as it was computed before the batched pass: every head's mapped scores
    sorted into a rank curve, then ``take_best`` over the curves (an independent route to the same budgets)."""
    shape = tuple(np.shape(layer_scores))
    b, kvh, n = shape
    lo = np.full(kvh, min(floor, n, budget), dtype=np.int64)
    if b == 0:
        return np.zeros((0, kvh), dtype=np.int64)
    device = adaptive._work_device([layer_scores])
    y = adaptive._inf_for_nonfinite(adaptive._as_rows(layer_scores, device).reshape(b, kvh, 1, n))
    top, low = adaptive._finite_range(y, (1, 2, 3))
    curves = torch.cummin(adaptive._sorted_head_mean(y, top, low), dim=-1).values
    return take_best(budget * kvh - int(lo.sum()), lo, np.full(kvh, n), curves)


def _ref_head_split(layer_scores, budget, floor):
    """The pointwise definition: per batch row, ``select_top`` over each head's rank curve."""
    s = layer_scores.float().numpy() if isinstance(layer_scores, torch.Tensor) else np.asarray(layer_scores)
    _, kvh, n = s.shape
    lo = np.full(kvh, min(floor, n, budget))
    return np.stack([_ref_select(budget * kvh - int(lo.sum()), lo, np.full(kvh, n),
                                 _ref_curves([row[h][None] for h in range(kvh)])) for row in s])


def _layer_problems(rng, n_layers, kvh, batch, lengths, levels, kinds):
    """Layers of the given lengths (repeats share one batched step): ties, protected +inf, NaN, -inf,
    negative values, near-equal values that the float64 shift merges, whole layers of +inf."""
    scores, budgets, floors = [], [], []
    for i in range(n_layers):
        n = int(lengths[i % len(lengths)])
        s = np.concatenate(_tied_scores(rng, batch, kvh, n, levels, "numpy"))
        if rng.random() < 0.2:
            s[..., rng.integers(0, n)] = -np.inf
        if rng.random() < 0.2:  # distinct scores made equal by the shift to >= 0: ties made by the map itself
            s = 1e-20 * s
            s[:, 0, -1] = -1.0
        if rng.random() < 0.1:
            s[rng.integers(0, batch)] = np.inf
        kind = kinds[i % len(kinds)]
        scores.append(s if kind == "numpy" else torch.tensor(s, dtype=getattr(torch, kind)))
        floor = int(rng.integers(0, 25))
        budget = int(rng.choice([rng.integers(0, n + 1), min(floor, n), n]))  # at the floor, at N, anywhere
        budgets.append(budget)
        floors.append(floor)
    return scores, budgets, floors


@EXACT
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3),
       st.lists(st.integers(1, 90), min_size=1, max_size=3), st.sampled_from([2, 5, 1000]),
       st.lists(st.sampled_from(["numpy", "float32", "bfloat16"]), min_size=1, max_size=3), st.integers(0, 10_000))
def test_head_split_layers_equals_head_split_per_layer(n_layers, kvh, batch, lengths, levels, kinds, seed):
    """Bit for bit the per-layer split (before and now) and the pointwise definition, whatever the mix of
    lengths, dtypes, ties, protected tokens, NaN, floors and budgets at the floor or at N."""
    scores, budgets, floors = _layer_problems(np.random.default_rng(seed), n_layers, kvh, batch, lengths, levels,
                                              kinds)
    got = head_split_layers(scores, budgets, floors)
    assert len(got) == n_layers
    for s, b, f, g in zip(scores, budgets, floors, got):
        want = _sorted_head_split(s, b, f)
        np.testing.assert_array_equal(g, want)
        np.testing.assert_array_equal(head_split(s, b, f), want)
        np.testing.assert_array_equal(g, _ref_head_split(s, b, f))
        assert g.dtype == np.int64 and g.shape == (batch, kvh)
        assert (g.sum(-1) == b * kvh).all() and (g >= min(f, s.shape[-1], b)).all()


@pytest.mark.parametrize("step", [1 << 24, 50])
def test_head_split_layers_on_the_accelerator_path_and_in_steps(monkeypatch, step):
    """The device route (stacked rows, one sort for the thresholds, steps of ``HEAD_SPLIT_STEP`` entries)
    gives the host's counts, bit for bit."""
    rng = np.random.default_rng(5)
    problems = [_layer_problems(rng, 7, kvh, batch, (64, 64, 17), levels, ("float32", "numpy", "bfloat16"))
                for kvh, batch, levels in ((2, 1, 3), (4, 2, 1000), (1, 3, 2))]
    host = [head_split_layers(*p) for p in problems]
    monkeypatch.setattr(adaptive, "HOST_DEVICES", ())
    monkeypatch.setattr(adaptive, "HEAD_SPLIT_STEP", step)
    for p, want in zip(problems, host):
        for g, w in zip(head_split_layers(*p), want):
            np.testing.assert_array_equal(g, w)


def test_head_split_layers_moves_counts_to_the_host_once(monkeypatch):
    """On the device route all layers' counts, of every length, come back in a single transfer."""
    rng = np.random.default_rng(2)
    scores = [torch.tensor(rng.gamma(0.3, size=(1, 2, n)), dtype=torch.float32) for n in (80, 80, 50, 80, 50)]
    monkeypatch.setattr(adaptive, "HOST_DEVICES", ())
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: calls.append(t.shape) or real_cpu(t, *a, **k))
    got = head_split_layers(scores, [30, 40, 25, 60, 20], 20)
    assert len(calls) == 1
    monkeypatch.undo()
    assert [g.tolist() for g in got] == [head_split(s, b, 20).tolist() for s, b in zip(scores, [30, 40, 25, 60, 20])]


def test_head_split_layers_rejects_bad_input():
    s = np.ones((1, 2, 30))
    with pytest.raises(AllocatorError, match=r"\[batch, kv_heads, N\], got shape \(2, 30\) \(entry 1\)"):
        head_split_layers([s, s[0]], [10, 10], 5)
    with pytest.raises(AllocatorError, match="one budget per entry"):
        head_split_layers([s, s], [10], 5)
    with pytest.raises(AllocatorError, match="one floor"):
        head_split_layers([s, s], [10, 10], [5, 5, 5])
    with pytest.raises(BudgetError, match="cannot place"):
        head_split_layers([s], [31], 5)
    with pytest.raises(BudgetError, match=">= 0"):
        head_split_layers([s], [-1], 5)
    assert head_split_layers([], [], 5) == []
    assert head_split_layers([np.ones((0, 3, 30))], [10], 5)[0].shape == (0, 3)


def _kept(cache):
    return [(layer.kept_pos.tolist(), None if layer.valid is None else layer.valid.tolist()) for layer in cache.layers]


def _heads_differ(cache) -> bool:
    """Whether some sequence of some layer keeps different numbers of tokens in its KV heads."""
    kept = [layer.valid.sum(-1) for layer in cache.layers if layer.valid is not None]
    return any(bool((k != k[:, :1]).any()) for k in kept)


def test_scored_prefill_head_budgets_equal_pruning_layer_by_layer(tiny_models):
    """``prune(..., head_budgets=True)`` splits all layers in one pass: the same kept tokens as splitting
    each layer on its own, for a left-padded batch whose sequences each keep their own budgets."""
    model = tiny_models("qwen2")
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(5, 250, (1, n), generator=gen) for n in (70, 90, 55)]
    ids = torch.zeros(3, 90, dtype=torch.long)
    mask = torch.zeros(3, 90, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, 90 - s.shape[1]:], mask[i, 90 - s.shape[1]:] = s[0], 1
    sp = score_prefill(model, ids, [depthkv.scorers.get_scorer("knorm")], Protection(), attention_mask=mask)
    budgets = depthkv.allocation.uniform(4, 90, 0.6, min_tokens=20)
    got = sp.prune("knorm", budgets, head_budgets=True)
    per_sequence = [budgets.for_context(n) for n in sp.lengths]
    want = [prune_layer(layer, s, [b.tokens[i] for b in per_sequence], sp.protection, head_budgets=True,
                        n_pad=sp.n_pad)[0] for i, (layer, s) in enumerate(zip(sp.cache.layers, sp.scores["knorm"]))]
    assert _kept(got) == [(w.kept_pos.tolist(), None if w.valid is None else w.valid.tolist()) for w in want]
    assert _heads_differ(got)


def test_press_head_budgets_split_all_layers_at_once(tiny_models, monkeypatch):
    """The press prunes after the prefill with one head split for all layers: the same cache as the
    per-layer split it replaces (forced here by handing ``prune_layer`` no precomputed counts)."""
    model = tiny_models("llama")
    ids = _ids(120, seed=3)
    calls = []
    real = engine_session.layer_head_counts
    monkeypatch.setattr(engine_session, "layer_head_counts", lambda *a, **k: calls.append(1) or real(*a, **k))
    batched = depthkv.press(model, "knorm", 0.7, strategy="global", head_budgets=True).compress(ids)
    assert calls == [1]
    monkeypatch.setattr(engine_session, "layer_head_counts", lambda layers, *a, **k: [None] * len(layers))
    per_layer = depthkv.press(model, "knorm", 0.7, strategy="global", head_budgets=True).compress(ids)
    assert _kept(batched.cache) == _kept(per_layer.cache)
    assert _heads_differ(batched.cache)
