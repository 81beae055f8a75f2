"""Batches of prompts of different lengths (left-padded, HF's layout) give what each prompt gives alone.

Tiny random Llama/Qwen2 models in float32, greedy decoding. Each sequence of a padded batch gets the
budgets of its own length, is scored and pruned on its own tokens, never keeps padding, and holds exactly
its own budget of KV bytes.
"""

from __future__ import annotations

import pytest
import torch

import depthkv
from depthkv.allocation import BudgetError, Budgets
from depthkv.engine import PrunedLayer, kv_bytes_per_sequence, score_prefill
from depthkv.engine.runner import forward_with_cache, padded_inputs
from depthkv.engine.session import Plan, Session
from depthkv.scorers import SCORERS, get_scorer
from tests.conftest import ARCHS

PROT = dict(n_sink=2, n_recent=4)
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
LENGTHS = (41, 58, 30)  # the longest in the middle: padding on both neighbours
IN_PREFILL = sorted(name for name in SCORERS if not get_scorer(name).context_pass)  # replays: batch 1
KV_SLOT = 2 * 16 * 4  # keys + values of one token of one KV head: head_dim 16, float32


def prompts(lengths=LENGTHS, seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 250, (1, n), generator=gen) for n in lengths]


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the left-padded batch (pad id 0), as a tokenizer with padding_side='left'."""
    n = max(s.shape[1] for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - s.shape[1]:] = s[0]
        mask[i, n - s.shape[1]:] = 1
    return ids, mask


def kept_sets(layer: PrunedLayer, row: int, pad: int) -> list[list[int]]:
    """Per KV head, the sorted positions (relative to the sequence's first real token) of the valid kept slots."""
    pos = layer.kept_pos[row].long()
    valid = layer.valid[row] if layer.valid is not None else torch.ones_like(pos, dtype=torch.bool)
    return [sorted((pos[h][valid[h]] - pad).tolist()) for h in range(pos.shape[0])]


def run_press(model, ids, mask=None, **press_kwargs):
    with depthkv.press(model, **PROT, **press_kwargs) as p:
        out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                             return_dict_in_generate=True, **GEN)
    return out, p


def check_batch_equals_alone(model, seqs, **press_kwargs):
    """Batch vs each prompt alone: same tokens, same kept positions per layer and head, no padding kept."""
    ids, mask = left_pad(seqs)
    n = ids.shape[1]
    batch, p = run_press(model, ids, mask, **press_kwargs)
    assert len(p.sequence_budgets) == len(seqs)
    pruned_something = False
    for i, s in enumerate(seqs):
        alone, q = run_press(model, s, **press_kwargs)
        pad = n - s.shape[1]
        assert torch.equal(batch.sequences[i, n:], alone.sequences[0, s.shape[1]:]), i
        assert p.sequence_budgets[i] == q.budgets  # the sequence's own length sets its budgets
        for layer_idx, (got, want) in enumerate(zip(batch.cache.layers, alone.cache.layers)):
            assert isinstance(got, PrunedLayer) and got.logical_len == n + GEN["max_new_tokens"] - 1
            sets = kept_sets(got, i, pad)
            assert sets == kept_sets(want, 0, 0), (i, layer_idx)
            assert bool((got.kept_pos[i].long() >= pad).all())  # padding is never kept, not even as filler
            if not press_kwargs.get("head_budgets"):
                assert all(len(h) == q.budgets.tokens[layer_idx] for h in sets)
            pruned_something |= len(sets[0]) < s.shape[1]
    assert pruned_something


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scorer", IN_PREFILL)
def test_padded_batch_equals_each_prompt_alone(tiny_models, arch, scorer):
    check_batch_equals_alone(tiny_models(arch), prompts(), scorer=scorer, ratio=0.6)


@pytest.mark.parametrize("press_kwargs", [
    dict(scorer="snapkv", ratio=0.5, head_budgets=True),  # per-head budgets inside each sequence
    dict(scorer="h2o", ratio=0.6, strategy="global"),  # budgets from each sequence's own scores
    dict(scorer="knorm", ratio=0.5, strategy="pyramid", protected_layers=(0,)),
])
def test_padded_batch_with_other_budget_rules(tiny_models, press_kwargs):
    check_batch_equals_alone(tiny_models("qwen2", "eager"), prompts(seed=3), **press_kwargs)


def test_unpadded_batch_scores_each_sequence_alone(tiny_models):
    """Even without padding each row is scored alone: the random scorer's draws do not depend on the batch."""
    model = tiny_models("llama")
    ids = torch.cat(prompts((40, 40)))
    batch, _ = run_press(model, ids, scorer="random", ratio=0.7)
    for i in range(2):
        alone, _ = run_press(model, ids[i:i + 1], scorer="random", ratio=0.7)
        assert torch.equal(batch.sequences[i], alone.sequences[0])


def test_ratio_zero_batch_equals_unpruned_generate(tiny_models):
    model = tiny_models("llama")
    ids, mask = left_pad(prompts())
    ref = model.generate(ids, attention_mask=mask, **GEN)
    out, p = run_press(model, ids, mask, scorer="snapkv", ratio=0.0)
    assert torch.equal(out.sequences, ref)
    assert [b.context_len for b in p.sequence_budgets] == list(LENGTHS)


# ---------------------------------------------------------------------------------------------- evaluation path
def question_logits(model, cache, ids, mask, question):
    """Logits of ``question`` [B, Q] appended to a (pruned) cache of the padded prompt: the decode-time mask."""
    q = question.shape[1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], q, dtype=mask.dtype)], dim=1)
    positions = mask.sum(-1, keepdim=True) + torch.arange(q)[None, :]
    with Session(model) as s:
        s.set_plan(Plan(kind="off"))
        return forward_with_cache(model, question, cache, logits_to_keep=q, attention_mask=full_mask,
                                  position_ids=positions)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("equal_budgets", [False, True])
def test_scored_prefill_batch_matches_single(tiny_models, arch, equal_budgets):
    """score_prefill + prune on a padded batch: every sequence's logits for a question equal its own run's.

    Different budgets per sequence store the layer ragged (``valid``: the ragged mask); equal budgets need no
    ``valid``, and the padding columns of HF's mask are mapped onto the kept keys by their positions.
    """
    model = tiny_models(arch)
    seqs = prompts()
    ids, mask = left_pad(seqs)
    question = torch.randint(5, 250, (3, 5), generator=torch.Generator().manual_seed(11))
    scorers = [get_scorer("snapkv"), get_scorer("h2o")]
    sp = score_prefill(model, ids, scorers, depthkv.Protection(**PROT), attention_mask=mask)
    assert sp.lengths == LENGTHS
    for s, p in zip(sp.scores["snapkv"][0], sp.n_pad):
        assert torch.isinf(s[:, :p]).all() and bool((s[:, :p] < 0).all())  # padding scores -inf
    if equal_budgets:
        budgets = [Budgets((30, 12, 17, 9), context_len=n) for n in LENGTHS]
    else:
        budgets = sp.sequence_budgets("h2o", depthkv.allocation.BudgetSpec(0.6, "pyramid").policy(4))
    cache = sp.prune("h2o", budgets)
    ragged = [len({b.tokens[i] for b in budgets}) > 1 for i in range(4)]
    assert ragged == [layer.valid is not None for layer in cache.layers] and any(ragged) != equal_budgets
    got = question_logits(model, cache, ids, mask, question)
    for i, s in enumerate(seqs):
        alone = score_prefill(model, s, scorers, depthkv.Protection(**PROT))
        want = question_logits(model, alone.prune("h2o", budgets[i]), s, torch.ones_like(s), question[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)
        for layer, single in zip(cache.layers, alone.prune("h2o", budgets[i]).layers):
            assert kept_sets(layer, i, sp.n_pad[i]) == kept_sets(single, 0, 0)


@pytest.mark.parametrize("head_budgets", [False, True])
def test_kv_bytes_per_sequence_equal_each_budget(tiny_models, head_budgets):
    model = tiny_models("llama")
    ids, mask = left_pad(prompts())
    sp = score_prefill(model, ids, [get_scorer("snapkv")], depthkv.Protection(**PROT), attention_mask=mask)
    budgets = depthkv.allocation.uniform(4, max(LENGTHS), 0.6, min_tokens=6)
    per_sequence = [budgets.for_context(n) for n in LENGTHS]
    cache = sp.prune("snapkv", budgets, head_budgets=head_budgets)
    want = [2 * sum(b.tokens) * KV_SLOT for b in per_sequence]  # 2 KV heads
    assert kv_bytes_per_sequence(cache) == want
    assert kv_bytes_per_sequence(cache, mask) == want
    assert len(set(want)) == 3  # the sequences really keep different amounts
    full = sp.full_cache()
    assert kv_bytes_per_sequence(full, mask) == [4 * 2 * n * KV_SLOT for n in LENGTHS]  # padding left out
    assert kv_bytes_per_sequence(full) == [4 * 2 * max(LENGTHS) * KV_SLOT] * 3  # padding is stored


def test_scored_prefill_batch_budgets_and_errors(tiny_models):
    model = tiny_models("llama")
    ids, mask = left_pad(prompts())
    sp = score_prefill(model, ids, [get_scorer("knorm")], depthkv.Protection(**PROT), attention_mask=mask)
    policy = depthkv.allocation.BudgetSpec(0.5, "uniform").policy(4)
    with pytest.raises(ValueError, match="sequence_budgets"):
        sp.budgets("knorm", policy)
    assert [b.context_len for b in sp.sequence_budgets("knorm", policy)] == list(LENGTHS)
    with pytest.raises(ValueError, match="2 budget vectors for a batch of 3"):
        sp.prune("knorm", sp.sequence_budgets("knorm", policy)[:2])


# ---------------------------------------------------------------------------------------------- refusals
def test_padded_batches_refused_where_unsupported(tiny_models):
    model = tiny_models("llama")
    ids, mask = left_pad(prompts())
    with pytest.raises(NotImplementedError, match="padded"):
        with depthkv.press(model, "snapkv", 0.5, mode="chunked", chunk_size=16, **PROT):
            model.generate(ids, attention_mask=mask, **GEN)
    with pytest.raises(NotImplementedError, match="padded"):
        with depthkv.press(model, "kvzip", 0.5, **PROT):
            model.generate(ids, attention_mask=mask, **GEN)
    with pytest.raises(NotImplementedError, match="kvzip"):
        score_prefill(model, ids, [get_scorer("kvzip")], depthkv.Protection(**PROT), attention_mask=mask)
    with pytest.raises(NotImplementedError, match="padded"):
        with depthkv.press(model, "snapkv", 0.5, fast=True, mode="chunked", chunk_size=16, **PROT):
            model.generate(ids, attention_mask=mask, **GEN)
    right = mask.flip(-1)  # right padding: the real tokens do not end together
    with pytest.raises(NotImplementedError, match="left"):
        score_prefill(model, ids.flip(-1), [get_scorer("snapkv")], attention_mask=right)
    with pytest.raises(NotImplementedError, match="left"):
        with depthkv.press(model, "snapkv", 0.5, **PROT):
            model.generate(ids.flip(-1), attention_mask=right, **GEN)


def test_sequence_shorter_than_protected_window_is_refused(tiny_models):
    model = tiny_models("llama")
    ids, mask = left_pad(prompts((40, 5)))
    with pytest.raises(BudgetError, match="protected window"):
        with depthkv.press(model, "snapkv", 0.5, **PROT):
            model.generate(ids, attention_mask=mask, **GEN)
    with pytest.raises(BudgetError, match="protected window"):
        score_prefill(model, ids, [get_scorer("snapkv")], depthkv.Protection(**PROT), attention_mask=mask)


def test_padded_inputs_positions_follow_generate():
    ids, mask = left_pad(prompts((4, 2)))
    kw = padded_inputs(mask, ids)
    assert kw["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert padded_inputs(torch.ones_like(ids), ids) == {}
    with pytest.raises(ValueError, match="does not match"):
        padded_inputs(mask[:, :3], ids)
