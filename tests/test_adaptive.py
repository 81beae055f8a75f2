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
    SensitivityView,
    allocate,
    global_budget,
    head_split,
    rank_curves,
)
from depthkv.engine import Plan, Protection, Session, clone_cache, score_prefill
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
