"""Engine contract on tiny random Llama and Qwen2 models (float32, seeded, no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import depthkv
from depthkv.allocation import BudgetError, Budgets, uniform
from depthkv.engine import (
    Plan,
    Protection,
    PrunedLayer,
    Session,
    full_kv_bytes,
    kv_bytes,
    layer_lengths,
    score_prefill,
)
from depthkv.engine.runner import cache_kwarg, forward_with_cache
from depthkv.scorers import SCORERS, ScoreInputs, attention_blocks, get_scorer
from tests.conftest import ARCHS, IMPLS, SCORER_OPTIONS

GEN = dict(max_new_tokens=8, do_sample=False)
PROT = dict(n_sink=2, n_recent=4)


# ---------------------------------------------------------------------------------------------- ratio = 0
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["post", "chunked"])
def test_ratio_zero_reproduces_full_cache(tiny_models, prompt_ids, arch, impl, mode):
    model = tiny_models(arch, impl)
    ref = model.generate(prompt_ids, **GEN)
    for scorer in SCORERS:
        if mode == "chunked" and get_scorer(scorer).whole_context:
            continue  # refused in chunked mode (tests/test_kvzip_value.py)
        with depthkv.press(model, scorer, ratio=0.0, mode=mode, chunk_size=32, **PROT,
                           **SCORER_OPTIONS.get(scorer, {})) as p:
            out = model.generate(prompt_ids, **GEN)
        assert torch.equal(out, ref), (scorer, out, ref)
        assert p.budgets is not None and p.budgets.kept_share == 1.0
    assert model.config._attn_implementation == impl  # restored on exit


def test_pruning_changes_output_and_restores_model(tiny_models, prompt_ids):
    """A test that cannot fail is worthless: heavy pruning must change this model's greedy output."""
    model = tiny_models("llama", "sdpa")
    ref = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)
    with depthkv.press(model, "random", ratio=0.9, **PROT):
        out = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)
    assert not torch.equal(out, ref)
    assert torch.equal(model.generate(prompt_ids, max_new_tokens=12, do_sample=False), ref)


def test_sampled_decoding_runs_and_is_seeded(tiny_models, prompt_ids):
    model = tiny_models("qwen2", "sdpa")
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        with depthkv.press(model, "snapkv", ratio=0.5, **PROT):
            outs.append(model.generate(prompt_ids, max_new_tokens=8, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(3)
    with depthkv.press(model, "snapkv", ratio=0.0, **PROT):
        zero = model.generate(prompt_ids, max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(3)
    assert torch.equal(zero, model.generate(prompt_ids, max_new_tokens=8, do_sample=True, top_k=20))


def test_batch_of_two(tiny_models):
    model = tiny_models("llama", "sdpa")
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    with depthkv.press(model, "h2o", ratio=0.5, **PROT) as p:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 68)
    for i in range(2):  # each row equals the same request made alone
        with depthkv.press(model, "h2o", ratio=0.5, **PROT):
            alone = model.generate(ids[i : i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out[i : i + 1], alone)
    assert p.budgets.total == round(4 * 64 * 0.5)


# ---------------------------------------------------------------------------------------------- physical lengths
UNEVEN = (96, 7, 50, 23)


@pytest.mark.parametrize("mode", ["post", "chunked"])
def test_uneven_budgets_give_exact_physical_lengths(tiny_models, prompt_ids, mode):
    model = tiny_models("qwen2", "sdpa")
    n = prompt_ids.shape[1]
    budgets = Budgets(UNEVEN, context_len=n)
    with depthkv.press(model, "h2o", budgets=budgets, mode=mode, chunk_size=40, **PROT) as p:
        comp = p.compress(prompt_ids)
    assert layer_lengths(comp.cache) == list(UNEVEN)
    for layer, b in zip(comp.cache.layers, UNEVEN):
        assert layer.keys.shape == (1, 2, b, 16) and layer.values.shape == (1, 2, b, 16)
        assert layer.get_seq_length() == n  # logical length: new tokens continue at position n


@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.9])
def test_kv_bytes_match_ratio(tiny_models, prompt_ids, ratio):
    model = tiny_models("llama", "sdpa")
    n = prompt_ids.shape[1]
    with depthkv.press(model, "snapkv", ratio=ratio, **PROT) as p:
        comp = p.compress(prompt_ids)
    full = full_kv_bytes(model, n)
    per_token_layer_head = full // (4 * 2 * n)  # bytes of one token of one layer and KV head
    assert abs(kv_bytes(comp.cache) - (1 - ratio) * full) <= 4 * 2 * per_token_layer_head


# ---------------------------------------------------------------------------------------------- independent reference
_REF_KEEP: dict[int, torch.Tensor] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain eager attention on the FULL cache, hiding tokens per (layer, KV head) with an explicit mask."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., : k.shape[-2]]
    keep = _REF_KEEP[module.layer_idx][..., : k.shape[-2]].repeat_interleave(groups, dim=1)  # [B, H, K]
    logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("ref_hidden", _reference_attention)
AttentionMaskInterface.register("ref_hidden", eager_mask)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_logits_match_masked_full_cache_reference(tiny_models, prompt_ids, arch, impl):
    model = tiny_models(arch, impl)
    n, q = prompt_ids.shape[1], 6
    question = torch.randint(0, 256, (1, q), generator=torch.Generator().manual_seed(9))
    sp = score_prefill(model, prompt_ids, [get_scorer("h2o")], Protection(**PROT))
    pruned = sp.prune("h2o", Budgets(UNEVEN, context_len=n))
    assert layer_lengths(pruned) == list(UNEVEN)
    with Session(model):
        logits = forward_with_cache(model, question, pruned, logits_to_keep=q)
        nxt = logits[:, -1:].argmax(-1)
        step = forward_with_cache(model, nxt, pruned, logits_to_keep=1)  # one decode step too

    full = sp.full_cache()
    for i, layer in enumerate(pruned.layers):
        keep = torch.zeros(1, 2, n + q + 1, dtype=torch.bool)
        keep.scatter_(-1, layer.kept_pos.long(), True)
        keep[..., n:] = True
        _REF_KEEP[i] = keep
    saved = model.config._attn_implementation
    model.config._attn_implementation = "ref_hidden"
    try:
        ref = forward_with_cache(model, question, full, logits_to_keep=q)
        ref_step = forward_with_cache(model, nxt, full, logits_to_keep=1)
    finally:
        model.config._attn_implementation = saved
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(step, ref_step, atol=1e-4, rtol=0)
    # and the pruning mattered: the unmasked full cache gives different logits
    for i in _REF_KEEP:
        _REF_KEEP[i] = torch.ones_like(_REF_KEEP[i])
    model.config._attn_implementation = "ref_hidden"
    try:
        unpruned = forward_with_cache(model, question, sp.full_cache(), logits_to_keep=q)
    finally:
        model.config._attn_implementation = saved
    assert (unpruned - logits).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- top-k per head
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_kept_tokens_are_top_scoring_per_kv_head(tiny_models, prompt_ids, scorer):
    model = tiny_models("llama", "sdpa")
    n = prompt_ids.shape[1]
    prot = Protection(n_sink=2, n_recent=4)
    sp = score_prefill(model, prompt_ids, [get_scorer(scorer, **SCORER_OPTIONS.get(scorer, {}))], prot)
    cache = sp.prune(scorer, Budgets(UNEVEN, context_len=n))
    for layer_idx, layer in enumerate(cache.layers):
        scores = sp.scores[scorer][layer_idx]
        for h in range(2):
            kept = set(layer.kept_pos[0, h].tolist())
            protected = set(range(2)) | set(range(n - 4, n))
            assert protected <= kept
            rest = [j for j in range(n) if j not in protected]
            free = UNEVEN[layer_idx] - len(protected)
            s = scores[0, h]
            threshold = sorted((s[j].item() for j in rest), reverse=True)[free - 1] if free > 0 else float("inf")
            for j in kept - protected:
                assert s[j].item() >= threshold
            for j in set(rest) - kept:
                assert s[j].item() <= threshold


# ---------------------------------------------------------------------------------------------- score once, prune many
def test_score_once_prune_many_needs_no_new_prefill(tiny_models, prompt_ids):
    model = tiny_models("llama", "sdpa")
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        sp = score_prefill(model, prompt_ids, [get_scorer("h2o"), get_scorer("snapkv")], Protection(**PROT))
        assert len(calls) == 1
        caches = [sp.prune(s, uniform(4, prompt_ids.shape[1], r, min_tokens=6))
                  for s in ("h2o", "snapkv") for r in (0.2, 0.5, 0.8)]
        assert len(calls) == 1
    finally:
        handle.remove()
    assert [sum(layer_lengths(c)) for c in caches[:3]] == [
        round(4 * 96 * 0.8), round(4 * 96 * 0.5), round(4 * 96 * 0.2)]
    # the prune-many cache equals what the post-prefill press keeps
    with depthkv.press(model, "snapkv", ratio=0.5, **PROT) as p:
        comp = p.compress(prompt_ids)
    for a, b in zip(comp.cache.layers, caches[4].layers):
        assert torch.equal(a.kept_pos, b.kept_pos) and torch.equal(a.keys, b.keys)


def test_query_agnostic_answers_several_questions(tiny_models, prompt_ids):
    model = tiny_models("qwen2", "sdpa")
    questions = [torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with depthkv.press(model, "knorm", ratio=0.0, **PROT) as p:
        comp = p.compress(prompt_ids)
        answers = [p.answer(comp, qu, **GEN) for qu in questions]
        before = layer_lengths(comp.cache)
    for qu, ans in zip(questions, answers):
        ref = model.generate(torch.cat([prompt_ids, qu], 1), **GEN)
        assert torch.equal(ans, ref)
    assert layer_lengths(comp.cache) == before  # answering works on copies
    with depthkv.press(model, "knorm", ratio=0.7, mode="chunked", chunk_size=32, **PROT) as p:
        comp = p.compress(prompt_ids)
        a1 = p.answer(comp, questions[0], **GEN)
        a2 = p.answer(comp, questions[0], **GEN)
    assert torch.equal(a1, a2) and a1.shape[1] == 96 + 5 + 8


def test_chunked_peak_stays_near_budget(tiny_models, prompt_ids):
    model = tiny_models("llama", "sdpa")
    peak = []
    with depthkv.press(model, "h2o", ratio=0.75, mode="chunked", chunk_size=16, **PROT) as p:
        hook = model.model.register_forward_hook(
            lambda m, a, kw, out: peak.append(max(layer_lengths(kw.get(cache_kwarg(model))))), with_kwargs=True)
        try:
            p.compress(prompt_ids)
        finally:
            hook.remove()
    assert max(peak) <= max(p.budgets.tokens) + 16


# ---------------------------------------------------------------------------------------------- scorers vs naive
def _naive_attention(q, k, scaling):
    b, h, nq, d = q.shape
    kv = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = q @ kv.transpose(-1, -2) * scaling
    nk = k.shape[2]
    causal = torch.arange(nk)[None, :] > (nk - nq + torch.arange(nq))[:, None]
    return torch.softmax(logits.masked_fill(causal, float("-inf")), -1)  # [B, H, Q, K]


def test_h2o_variants_of_one_forward_share_one_attention_pass(tiny_models, monkeypatch):
    """H2O and H2O with values scored in one prefill compute the attention of every query once per layer,
    and each gives the scores it gives alone; a padded batch scores each sequence on its own."""
    from depthkv.scorers import h2o as h2o_module

    model = tiny_models("llama", "sdpa")
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    calls = []
    real = h2o_module.attention_blocks

    def counting(x, *a, **k):
        calls.append(x.layer_idx)
        return real(x, *a, **k)

    monkeypatch.setattr(h2o_module, "attention_blocks", counting)
    both = score_prefill(model, ids, [get_scorer("h2o"), get_scorer("h2o_v1"), get_scorer("h2o_v2")])
    assert sorted(calls) == sorted(list(range(4)) * 2)  # per layer one pass per sequence, for the three scorers
    calls.clear()
    for name in ("h2o", "h2o_v1", "h2o_v2"):
        alone = score_prefill(model, ids, [get_scorer(name)])
        for a, b in zip(alone.scores[name], both.scores[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :5] = 0  # left padding: per-sequence views must not reuse the whole batch's mass
    padded = score_prefill(model, ids, [get_scorer("h2o"), get_scorer("h2o_v1")], attention_mask=mask)
    single = score_prefill(model, ids[1:, 5:], [get_scorer("h2o_v1")])
    for a, b in zip(padded.scores["h2o_v1"], single.scores["h2o_v1"]):
        torch.testing.assert_close(a[1:, :, 5:], b)


def test_h2o_and_snapkv_match_naive_formulas():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    x = ScoreInputs(q, k, v, torch.arange(50).expand(1, 2, 50), 8 ** -0.5, 0)
    a = _naive_attention(q, k, x.scaling)
    later = a.clone()
    idx = torch.arange(40)
    later[:, :, idx, 10 + idx] = 0  # exclude the diagonal: s_j sums alpha_ij over i > j
    h2o = later.sum(2).reshape(1, 2, 2, 50).mean(2)
    torch.testing.assert_close(get_scorer("h2o").score(x), h2o)
    vn = v.norm(p=2, dim=-1)
    torch.testing.assert_close(get_scorer("h2o_v2").score(x), h2o * vn)
    snap = get_scorer("snapkv", window=8, kernel=1).score(x)
    votes = a[:, :, -8:].mean(2).reshape(1, 2, 2, 50).mean(2)
    torch.testing.assert_close(snap[..., :42], votes[..., :42])
    assert (snap[..., 42:] > snap[..., :42].max()).all()
    # small blocks give the same sums as one block (no N x N matrix of all heads is needed)
    blocks = list(attention_blocks(x, max_elems=2 * 2 * 50 * 3))
    assert len(blocks) > 1
    summed = torch.cat([probs for _, _, probs in blocks], dim=3)
    one = next(iter(attention_blocks(x)))[2]
    torch.testing.assert_close(summed, one)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(tiny_models, prompt_ids):
    model = tiny_models("llama", "sdpa")
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(BudgetError, match="ratio"):
            depthkv.press(model, "h2o", ratio=bad)
    with pytest.raises(ValueError, match="unknown scorer"):
        depthkv.press(model, "nope", ratio=0.5)
    with pytest.raises(BudgetError, match="4 layers"):
        depthkv.press(model, "h2o", budgets=Budgets((10, 10, 10), context_len=96))
    with pytest.raises(BudgetError, match="outside"):
        Budgets((0, 10, 10, 10), context_len=96)
    # a ratio whose budget rounds below the protected window
    with depthkv.press(model, "h2o", ratio=0.99, n_sink=4, n_recent=16) as p, pytest.raises(BudgetError):
        p.compress(prompt_ids)
    # context shorter than the protected window
    with depthkv.press(model, "h2o", ratio=0.5, n_sink=64, n_recent=64) as p:
        with pytest.raises(BudgetError, match="shorter than the protected window"):
            p.compress(prompt_ids)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_depthkv_session") for m in model.modules())
    with pytest.raises(ValueError, match="exactly one"):
        depthkv.press(model, "h2o")


def test_plan_off_leaves_scores_empty(tiny_models, prompt_ids):
    model = tiny_models("llama", "eager")
    with Session(model) as s:
        s.set_plan(Plan(kind="off"))
        model(prompt_ids)
        assert s.scores == {}
    assert not isinstance(model, PrunedLayer)


def test_generate_from_scored_prefill_equals_press(tiny_models, prompt_ids):
    """The sweep path (score once, prune, generate) gives what the one-line press gives."""
    from depthkv.engine import generate_from_cache

    model = tiny_models("llama", "sdpa")
    prefix = prompt_ids[:, :-1]
    sp = score_prefill(model, prefix, [get_scorer("h2o")], Protection(**PROT))
    budgets = uniform(4, prefix.shape[1], 0.6, min_tokens=6)
    out = generate_from_cache(model, sp.prune("h2o", budgets), prompt_ids, **GEN)
    with depthkv.press(model, "h2o", budgets=budgets, **PROT) as p:
        ref = p.answer(p.compress(prefix), prompt_ids[:, -1:], **GEN)
    assert torch.equal(out, ref)
    full = generate_from_cache(model, sp.full_cache(), prompt_ids, **GEN)
    assert torch.equal(full, model.generate(prompt_ids, **GEN))
