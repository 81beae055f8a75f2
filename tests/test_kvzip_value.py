"""KVzip with values: KVzip's scores re-ordered inside each KV head by value norms (tiny models, no downloads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import depthkv
from depthkv.allocation import BudgetSpec
from depthkv.engine import Protection, score_prefill
from depthkv.engine.cache import layer_lengths
from depthkv.scorers import KVzip, KVzipValue, get_scorer
from depthkv.scorers.kvzip_value import value_reorder
from tests.conftest import KVZIP_PROMPT as PROMPT
from tests.conftest import context_ids as _ids


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.floats(0.0, 4.0), st.integers(0, 10_000))
def test_reorder_keeps_each_heads_scores_and_follows_the_blend(heads, n, weight, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, n, generator=g)
    values = torch.randn(1, heads, n + 3, 4, generator=g)  # more cached values than scored keys: the first n count
    out = value_reorder(scores, values[..., :n, :], weight)
    # the same multiset of scores in every head: allocators that read the distribution give the same budgets
    assert torch.equal(out.sort(-1).values, scores.sort(-1).values)
    norms = values[..., :n, :].norm(dim=-1)
    rank = lambda x: torch.argsort(torch.argsort(x, dim=-1, stable=True), dim=-1, stable=True).float()  # noqa: E731
    blend = rank(scores) + weight * rank(norms)
    for h in range(heads):  # a strictly higher blended rank never gets a lower score
        b, o = blend[0, h], out[0, h]
        higher = b[:, None] > b[None, :]
        assert bool((o[:, None] >= o[None, :])[higher].all())


def test_weight_zero_is_kvzip_and_a_large_weight_orders_by_value_norm():
    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.3]]])
    values = torch.tensor([[[[1.0], [4.0], [2.0], [3.0]]]])  # norms 1, 4, 2, 3
    assert torch.equal(value_reorder(scores, values, 0.0), scores)
    assert torch.equal(value_reorder(scores, values, 100.0), torch.tensor([[[0.1, 0.9, 0.3, 0.5]]]))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), True, "1"])
def test_rejects_a_bad_value_weight(bad):
    with pytest.raises(ValueError, match="value_weight"):
        KVzipValue(value_weight=bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scores_are_kvzips_permuted_and_budgets_unchanged(tiny_models, arch):
    model = tiny_models(arch)
    n = 96
    plain, valued = KVzip(prompt_ids=PROMPT, replay_chunk=40), KVzipValue(prompt_ids=PROMPT, replay_chunk=40)
    sp = score_prefill(model, _ids(n), [plain, valued], Protection(2, 4))
    a, b = sp.scores["kvzip"], sp.scores["kvzip_v"]
    moved = 0
    for layer, (sa, sb) in enumerate(zip(a, b)):
        assert sb.shape == sa.shape == (1, 2, n)
        assert torch.equal(sb.sort(-1).values, sa.sort(-1).values)
        values = sp.cache.layers[layer].values[..., :n, :]
        assert torch.equal(sb, value_reorder(sa, values, 0.5))
        moved += int((sa.argsort(-1, descending=True)[..., :20] != sb.argsort(-1, descending=True)[..., :20]).sum())
    assert moved > 0  # the value norms change which tokens rank first
    for strategy in ("uniform", "global"):  # global ranks the scores of all layers and heads at once
        spec = BudgetSpec(0.7, strategy, None, (), 6)
        assert spec.for_context(4, n, scores=a).tokens == spec.for_context(4, n, scores=b).tokens


def test_press_prunes_after_the_prefill_and_refuses_chunked(tiny_models):
    model = tiny_models("qwen2")
    ctx, question = _ids(80), _ids(6, seed=3)
    ids = torch.cat([ctx, question], dim=1)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    full = depthkv.press(model, "kvzip_v", 0.0, prompt_ids=PROMPT, replay_chunk=30)
    assert full.answer(full.compress(ctx), question, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
    p = depthkv.press(model, "kvzip_v", 0.5, prompt_ids=PROMPT, replay_chunk=30, head_budgets=True)
    comp = p.compress(ctx)
    assert sum(p.budgets.tokens) == 4 * 40  # per-head budgets: each layer padded to its longest head
    assert all(40 <= length < 80 for length in layer_lengths(comp.cache))
    assert p.last_context_pass.forwards == 3
    with pytest.raises(ValueError, match="kvzip_v.*mode='post'"):
        depthkv.press(model, "kvzip_v", 0.5, mode="chunked", chunk_size=32, prompt_ids=PROMPT)


def test_is_registered_as_query_agnostic():
    from depthkv.scorers import QUERY_AGNOSTIC

    s = get_scorer("kvzip_v", value_weight=1.0)
    assert isinstance(s, KVzip) and s.name == "kvzip_v" and s.context_pass and s.whole_context
    assert "kvzip_v" in QUERY_AGNOSTIC


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kvzip_vc_is_kvzip_v_with_its_copies_weighted_down(tiny_models, arch):
    """``kvzip_vc`` = ``kvzip_v`` with self_window=1, self_weight=0.3: the same scores as that option set, other
    scores than plain ``kvzip_v``, and a press that compresses with it end to end."""
    from depthkv.scorers import QUERY_AGNOSTIC, KVzipValueCopy

    model = tiny_models(arch, "eager")
    n = 96
    copy = KVzipValueCopy(prompt_ids=PROMPT, replay_chunk=40)
    assert (copy.self_window, copy.self_weight, copy.value_weight) == (1, 0.3, 0.5) and copy.whole_context
    assert "kvzip_vc" in QUERY_AGNOSTIC and get_scorer("kvzip_vc").name == "kvzip_vc"
    same = KVzipValue(prompt_ids=PROMPT, replay_chunk=40, self_window=1, self_weight=0.3)
    plain = KVzipValue(prompt_ids=PROMPT, replay_chunk=40)
    got = score_prefill(model, _ids(n, seed=5), [copy], Protection(2, 4)).scores["kvzip_vc"]
    want = score_prefill(model, _ids(n, seed=5), [same], Protection(2, 4)).scores["kvzip_v"]
    other = score_prefill(model, _ids(n, seed=5), [plain], Protection(2, 4)).scores["kvzip_v"]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert any(not torch.allclose(g, o) for g, o in zip(got, other, strict=True))
    p = depthkv.press(model, "kvzip_vc", 0.5, prompt_ids=PROMPT, replay_chunk=30, head_budgets=True)
    comp = p.compress(_ids(80))
    assert sum(p.budgets.tokens) == 4 * 40 and all(40 <= length < 80 for length in layer_lengths(comp.cache))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scorers_with_the_same_replay_share_it(tiny_models, arch):
    """``kvzip`` and ``kvzip_v`` (and ``kvzip_vc`` and ``kvzip`` with the same copy options) read the same replay:
    one prefill scores both with one replay, and the scores equal each scorer's own."""
    model = tiny_models(arch)
    ids = _ids(96, seed=2)
    plain, valued = KVzip(prompt_ids=PROMPT, replay_chunk=40), KVzipValue(prompt_ids=PROMPT, replay_chunk=40)
    assert plain.replay_key() == valued.replay_key() != KVzip(prompt_ids=PROMPT, replay_chunk=40,
                                                              self_window=1).replay_key()
    both = score_prefill(model, ids, [plain, valued], Protection(2, 4))
    assert both.context_pass.forwards == 3  # ceil(96 / 40) chunks, replayed once
    for scorer in (plain, valued):
        alone = score_prefill(model, ids, [scorer], Protection(2, 4))
        assert alone.context_pass.forwards == 3
        for a, b in zip(both.scores[scorer.name], alone.scores[scorer.name], strict=True):
            assert torch.equal(a, b)
    # a rescoring of the same prefill reuses the replay; other replay options replay again
    again = both.rescored(model, ids, KVzipValue(prompt_ids=PROMPT, replay_chunk=40, value_weight=2.0))
    assert again.context_pass.forwards == 0
    want = score_prefill(model, ids, [KVzipValue(prompt_ids=PROMPT, replay_chunk=40, value_weight=2.0)],
                         Protection(2, 4)).scores["kvzip_v"]
    for a, b in zip(again.scores["kvzip_v"], want, strict=True):
        assert torch.equal(a, b)
    other = both.rescored(model, ids, KVzip(prompt_ids=PROMPT, replay_chunk=40, self_window=1))
    assert other.context_pass.forwards == 3
    assert not any(torch.equal(a, b) for a, b in zip(other.scores["kvzip"], both.scores["kvzip"]) if a is not None)
