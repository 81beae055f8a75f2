"""Fixed-shape fast decoding: same greedy tokens as the dynamic path, per-layer buffers, clear errors.

Tiny random Llama/Qwen2 models in float32 on CPU (the step runs eagerly there; on CUDA the same step is
replayed as a CUDA graph). ``DEPTHKV_TEST_DEVICE=cuda`` runs the same comparisons on a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch
import transformers

import depthkv
from depthkv.allocation import Budgets
from depthkv.engine import clone_cache, layer_lengths
from depthkv.engine.runner import generate_from_cache
from depthkv.engine.static import FastConfig, FastDecodeError, FastDecoder, StaticPrunedCache, fast_generate
from depthkv.scorers import SCORERS, get_scorer
from tests.conftest import ARCHS

DEVICE = os.environ.get("DEPTHKV_TEST_DEVICE", "cpu")
PROT = dict(n_sink=2, n_recent=4)  # protected window: 6 tokens
N = 96
# very uneven vectors: window + 2 next to whole layers, a monotone ramp, everything kept
BUDGETS = [(96, 7, 50, 23), (8, 96, 8, 96), (96, 8, 8, 8), (12, 24, 48, 96), (96, 96, 96, 96)]
CONFIGS = [FastConfig(attention="split", block=16), FastConfig(attention="sdpa", block=16),
           FastConfig(attention="split", block=256)]
if DEVICE == "cuda":
    CONFIGS += [FastConfig(attention="triton"), FastConfig(attention="triton", cuda_graph=False)]


@pytest.fixture(scope="module")
def models():
    from tests.conftest import build_tiny

    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = build_tiny(arch).to(DEVICE)
        return built[arch]

    return get


@pytest.fixture
def ids():
    return torch.randint(0, 256, (1, N), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def compress(model, ids, budgets, scorer="snapkv"):
    with depthkv.press(model, scorer, budgets=Budgets(budgets, context_len=ids.shape[1]), **PROT) as p:
        return p.compress(ids)


def dynamic_reference(model, comp, ids, n_new):
    """The dynamic path: first token from the prefill logits, then HF generate over the pruned DynamicCache."""
    first = comp.logits[:, -1].argmax(-1, keepdim=True)
    seq = torch.cat([ids, first], dim=1)
    return generate_from_cache(model, clone_cache(comp.cache), seq, max_new_tokens=n_new - 1, do_sample=False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budgets", BUDGETS)
def test_same_tokens_as_dynamic_path(models, ids, arch, budgets):
    model = models(arch)
    comp = compress(model, ids, budgets)
    assert layer_lengths(comp.cache) == list(budgets)
    ref = dynamic_reference(model, comp, ids, 16)
    for cfg in CONFIGS:
        out = fast_generate(model, clone_cache(comp.cache), ids, 16, logits=comp.logits, config=cfg)
        assert torch.equal(out, ref), (cfg, out[0, N:].tolist(), ref[0, N:].tolist())


def test_pruning_changes_tokens(models, ids):
    """The comparison above has teeth: these budgets change this model's greedy continuation."""
    model = models("llama")
    full = fast_generate(model, compress(model, ids, (96,) * 4).cache, ids, 16,
                         logits=compress(model, ids, (96,) * 4).logits)
    changed = 0
    for budgets in BUDGETS[:-1]:
        comp = compress(model, ids, budgets)
        changed += not torch.equal(fast_generate(model, comp.cache, ids, 16, logits=comp.logits), full)
    assert changed >= 2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["post", "chunked"])
def test_press_fast_generate_matches_plain_press(models, ids, arch, mode):
    model = models(arch)
    n = N - (1 if mode == "chunked" else 0)  # chunked: the last prompt token is fed by the decoder
    b = Budgets((n, 7, 50, 23), context_len=n)
    kw = dict(budgets=b, mode=mode, chunk_size=40, **PROT)
    gen = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    with depthkv.press(model, "h2o", **kw):
        ref = model.generate(ids, **gen)
    with depthkv.press(model, "h2o", fast=True, **kw) as p:
        out = model.generate(ids, **gen)
    assert torch.equal(out, ref)
    assert p.budgets.tokens == b.tokens
    assert "generate" not in vars(model)  # the wrapper is gone after the block


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_feeds_question_tokens(models, ids, arch):
    """Query-agnostic path: question tokens not in the cache are fed one by one through the fixed-shape step."""
    model = models(arch)
    question = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    kw = dict(budgets=Budgets((8, 96, 30, 12), context_len=N), **PROT)
    with depthkv.press(model, "snapkv", **kw) as p:
        comp = p.compress(ids)
        ref = p.answer(comp, question, max_new_tokens=10, do_sample=False)
    with depthkv.press(model, "snapkv", fast=FastConfig(block=16), **kw) as p:
        out = p.answer(comp, question, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


def test_batch_of_two(models):
    model = models("qwen2")
    ids2 = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(ratio=0.6, **PROT)
    with depthkv.press(model, "snapkv", **kw):
        ref = model.generate(ids2, max_new_tokens=8, do_sample=False)
    with depthkv.press(model, "snapkv", fast=True, **kw):
        out = model.generate(ids2, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)


def test_stops_at_eos_like_generate(models, ids):
    model = models("llama")
    comp = compress(model, ids, (96, 7, 50, 23))
    free = fast_generate(model, clone_cache(comp.cache), ids, 12, logits=comp.logits, eos_token_id=None)
    eos = int(free[0, N + 4])  # a token the greedy continuation produces
    ref = dynamic_reference(model, comp, ids, 12)
    first = comp.logits[:, -1].argmax(-1, keepdim=True)
    ref = generate_from_cache(model, clone_cache(comp.cache), torch.cat([ids, first], 1), max_new_tokens=11,
                              do_sample=False, eos_token_id=eos)
    out = fast_generate(model, clone_cache(comp.cache), ids, 12, logits=comp.logits, eos_token_id=eos)
    assert torch.equal(out, ref) and out.shape[1] < N + 12 and int(out[0, -1]) == eos


# ---------------------------------------------------------------------------------------------- buffers
@pytest.mark.parametrize("budgets", [(96, 7, 50, 23), (8, 96, 8, 96)])
def test_buffers_are_sized_per_layer(models, ids, budgets):
    model = models("llama")
    comp = compress(model, ids, budgets)
    horizon = 20
    static = StaticPrunedCache(comp.cache, horizon, block=16)
    assert static.lengths == list(budgets) and static.logical_len == N
    for i, (layer_k, layer_v, b) in enumerate(zip(static.keys, static.values, budgets)):
        assert layer_k.shape == layer_v.shape == (1, 2, b + horizon, 16)
        assert static.buffers(i)[0].shape[2] - (b + horizon) < 16  # storage rounded up to the block, no more
        assert static.visible(i).tolist() == [[b, b]]  # only the kept context is visible before decoding
        mask = static.mask(i, static.open_slots()[i])
        assert (mask[0, :, 0] == 0).sum(-1).tolist() == [b + 1, b + 1]  # ... and this step's slot
    # the dynamic cache was consumed: its memory is released
    assert all(x.keys.numel() == 0 for x in comp.cache.layers)
    dec = FastDecoder(model, static, FastConfig(block=16))
    dec.run(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), 5)
    for i, b in enumerate(budgets):
        assert static.visible(i).tolist() == [[b + 5, b + 5]]  # one slot opened per step, per layer
    assert int(static.step) == 5 and int(dec.position) == N + 5
    assert static.kept_bytes() == sum(b + 5 for b in budgets) * 2 * 2 * 16 * 4  # K+V, 2 heads, d=16, fp32


def test_horizon_is_enforced(models, ids):
    model = models("llama")
    comp = compress(model, ids, (96, 7, 50, 23))
    dec = FastDecoder(model, StaticPrunedCache(comp.cache, 3, block=16))
    with pytest.raises(FastDecodeError, match="buffers hold 3"):
        dec.run(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), 5)


# ---------------------------------------------------------------------------------------------- errors
def test_unsupported_family_is_refused():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(FastDecodeError, match="model families"):
        fast_generate(model, None, torch.zeros(1, 4, dtype=torch.long), 4)


def test_unsupported_activation_is_refused(models):
    model = models("llama")
    model.config.hidden_act = "gelu"
    try:
        with pytest.raises(FastDecodeError, match="SiLU"):
            depthkv.press(model, "snapkv", ratio=0.5, fast=True)
    finally:
        model.config.hidden_act = "silu"


@pytest.mark.parametrize("bad", [dict(do_sample=True), dict(num_beams=2), dict(min_new_tokens=3),
                                 dict(repetition_penalty=1.3)])
def test_options_that_change_greedy_decoding_are_refused(models, ids, bad):
    model = models("llama")
    with depthkv.press(model, "snapkv", ratio=0.5, fast=True, **PROT):
        with pytest.raises(FastDecodeError):
            model.generate(ids, max_new_tokens=4, **bad)


def test_generation_config_penalty_is_refused(models, ids):
    model = models("qwen2")
    model.generation_config.repetition_penalty = 1.2
    try:
        with depthkv.press(model, "snapkv", ratio=0.5, fast=True, **PROT):
            with pytest.raises(FastDecodeError, match="repetition_penalty"):
                model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_padding_in_the_fed_tokens_is_refused(models, ids):
    model = models("llama")
    comp = compress(model, ids, (96, 7, 50, 23))
    seq = torch.cat([ids, ids[:, :3]], dim=1)
    mask = torch.ones_like(seq)
    mask[0, -2] = 0
    with pytest.raises(FastDecodeError, match="left padding"):
        fast_generate(model, comp.cache, seq, 4, attention_mask=mask)


def test_bad_config_is_refused():
    with pytest.raises(FastDecodeError):
        FastConfig(attention="flash")
    if DEVICE == "cpu":
        with pytest.raises(FastDecodeError, match="CUDA"):
            from tests.conftest import build_tiny

            model = build_tiny("llama")
            ids = torch.randint(0, 256, (1, 32))
            comp = compress(model, ids, (32, 8, 8, 8))
            FastDecoder(model, StaticPrunedCache(comp.cache, 4), FastConfig(compile=True))


def test_cli_fast_with_sampling_is_refused(tmp_path, capsys):
    from depthkv.cli import main

    prompt = tmp_path / "p.txt"
    prompt.write_text("hello " * 40)
    assert main(["generate", "--fast", "--sample", "--prompt-file", str(prompt)]) == 2
    err = capsys.readouterr().err
    assert "greedily" in err and len(err.strip().splitlines()) == 1


def test_cli_fast_compile_needs_fast(tmp_path, capsys):
    from depthkv.cli import main

    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    assert main(["generate", "--fast-compile", "--prompt-file", str(prompt)]) == 2
    assert "only applies with --fast" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ragged rows/heads
GEN = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)


def left_pad(lengths, seed=11):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 250, (1, n), generator=gen) for n in lengths]
    n = max(lengths)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, n - x.shape[1]:], mask[i, n - x.shape[1]:] = x[0], 1
    return [x.to(DEVICE) for x in seqs], ids.to(DEVICE), mask.to(DEVICE)


IN_PREFILL = sorted(name for name in SCORERS if not get_scorer(name).context_pass)  # replays: batch 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scorer,head_budgets", [*((name, False) for name in IN_PREFILL), ("snapkv", True),
                                                 ("knorm", True)])
def test_padded_batch_equals_each_prompt_alone(models, arch, scorer, head_budgets):
    """Left-padded batch on the fast path: each row = that prompt alone (fast and dynamic), padding dropped."""
    model = models(arch)
    seqs, ids, mask = left_pad((41, 66, 30))
    kw = dict(ratio=0.6, head_budgets=head_budgets, **PROT)
    with depthkv.press(model, scorer, fast=FastConfig(attention="split", block=16), **kw):
        batch = model.generate(ids, attention_mask=mask, **GEN)
    n = ids.shape[1]
    for i, x in enumerate(seqs):
        with depthkv.press(model, scorer, **kw):
            alone = model.generate(x, attention_mask=torch.ones_like(x), **GEN)
        got = batch[i, n:]
        want = alone[0, x.shape[1]:]
        assert torch.equal(got[:want.shape[0]], want), (i, got.tolist(), want.tolist())
        assert bool((got[want.shape[0]:] == 0).all())  # a row that stopped early is padded, as generate does


def _ragged(model, ids, arch_budgets=(60, 20, 40, 30)):
    with depthkv.press(model, "snapkv", budgets=Budgets(arch_budgets, context_len=N), head_budgets=True,
                       **PROT) as p:
        comp = p.compress(ids)
    assert any(layer.valid is not None for layer in comp.cache.layers)  # the heads really kept different counts
    return comp


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_heads_logits_equal_masked_reference(models, ids, arch):
    """Per-KV-head budgets on the fast path: the step's logits equal the dynamic path over the padded+masked
    layers (itself equal to a masked full cache) within 1e-4, and each head stores exactly its own tokens."""
    model = models(arch)
    comp = _ragged(model, ids)
    token = comp.logits[:, -1].argmax(-1, keepdim=True)
    want = forward_with_logits(model, clone_cache(comp.cache), token)
    static = StaticPrunedCache(clone_cache(comp.cache), 4, block=16)
    for i, layer in enumerate(comp.cache.layers):
        counts = layer.valid.sum(-1) if layer.valid is not None else torch.full((1, 2), layer.keys.shape[2])
        assert static.kept[i].tolist() == counts.tolist()
    dec = FastDecoder(model, static, FastConfig(attention="split", block=16, keep_logits=True))
    dec.run(token, 1)
    assert torch.allclose(dec.logits, want[:, -1], atol=1e-4, rtol=0)
    ref = dynamic_reference(model, comp, ids, 12)
    assert torch.equal(fast_generate(model, clone_cache(comp.cache), ids, 12, logits=comp.logits), ref)


def forward_with_logits(model, cache, token):
    from depthkv.engine.runner import forward_with_cache
    from depthkv.engine.session import Plan, Session

    with Session(model) as session:
        session.set_plan(Plan(kind="off"))
        return forward_with_cache(model, token, cache).float()


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_caches_decode_like_each_alone(models, ids, arch):
    """Caches of one prompt pruned differently (uneven budgets, per-head budgets, the full cache), decoded as
    one batch: each row's tokens are that cache's own."""
    from depthkv.engine.static import fast_generate_caches

    model = models(arch)
    comps = [compress(model, ids, (96, 7, 50, 23)), compress(model, ids, (8, 96, 8, 96), scorer="h2o"),
             _ragged(model, ids), compress(model, ids, (96,) * 4)]
    alone = [fast_generate(model, clone_cache(c.cache), ids, 12, logits=c.logits) for c in comps]
    assert len({tuple(a[0, N:].tolist()) for a in alone}) > 1  # the rows differ: the comparison has teeth
    together = fast_generate_caches(model, [clone_cache(c.cache) for c in comps], ids, 12,
                                    logits=torch.cat([c.logits for c in comps]))
    for row, a in zip(together, alone):
        assert torch.equal(row[:a.shape[1]], a[0]), (row.tolist(), a[0].tolist())


def test_stacked_caches_need_one_prompt(models, ids):
    from depthkv.engine.static import fast_generate_caches

    model = models("llama")
    a = compress(model, ids, (96, 7, 50, 23))
    b = compress(model, ids[:, :60], (60, 7, 50, 23))
    with pytest.raises(FastDecodeError, match="logical length"):
        fast_generate_caches(model, [a.cache, b.cache], ids, 4, logits=torch.cat([a.logits, b.logits]))


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_different_prompts_decode_like_each_alone(models, ids, arch):
    """Caches of DIFFERENT prompts (other lengths and tokens), each covering all of its prompt but the last
    token, decoded as one batch (fast_generate_rows): each row's tokens are those of its prompt alone."""
    from depthkv.engine.static import fast_generate_rows

    model = models(arch)
    gen = torch.Generator().manual_seed(5)
    other = torch.randint(0, 256, (1, 70), generator=gen).to(ids.device)
    prompts = [ids, other, ids[:, :81]]
    comps = [compress(model, ids[:, :-1], (95, 7, 50, 23)), compress(model, other[:, :-1], (8, 69, 8, 40)),
             compress(model, ids[:, :80], (80,) * 4)]
    alone = [fast_generate(model, clone_cache(c.cache), p, 12)[0, p.shape[1]:] for c, p in zip(comps, prompts)]
    assert len({tuple(a.tolist()) for a in alone}) == 3  # the rows differ: the comparison has teeth
    together = fast_generate_rows(model, [clone_cache(c.cache) for c in comps], [p[:, -1:] for p in prompts], 12)
    for row, a in zip(together, alone):
        assert torch.equal(row[:a.shape[0]], a), (row.tolist(), a.tolist())
    with pytest.raises(FastDecodeError, match="feeds must be one"):
        fast_generate_rows(model, [clone_cache(c.cache) for c in comps], [p[:, -1:] for p in prompts[:2]], 4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stop", [0, 4])
def test_rows_with_feeds_of_different_lengths(models, ids, arch, stop):
    """Caches that still have to be fed 1, 6 and 11 tokens of their prompts (a question each, as after a
    query-agnostic compression) decode together: each row's tokens are those of its prompt alone, with and
    without the early stop (every row's EOS is a token its own greedy continuation produces)."""
    from depthkv.engine.static import fast_generate_rows

    model = models(arch)
    cuts = (95, 90, 85)
    comps = [compress(model, ids[:, :n], (n, 7, 40, 23)) for n in cuts]
    alone = [fast_generate(model, clone_cache(c.cache), ids, 12, eos_token_id=None)[0, N:] for c in comps]
    assert len({tuple(a.tolist()) for a in alone}) > 1
    eos = [int(alone[0][3]), int(alone[2][6])]
    want = [fast_generate(model, clone_cache(c.cache), ids, 12, eos_token_id=eos, pad_token_id=0)[0, N:]
            for c in comps]
    cfg = FastConfig(attention="split", block=16, stop_check=stop)
    together = fast_generate_rows(model, [clone_cache(c.cache) for c in comps], [ids[:, n:] for n in cuts], 12,
                                  config=cfg, eos_token_id=eos, pad_token_id=0)
    for row, w in zip(together, want):
        n = min(row.shape[0], w.shape[0])
        assert torch.equal(row[:n], w[:n]) and bool((row[n:] == 0).all()) and bool((w[n:] == 0).all()), (
            row.tolist(), w.tolist())


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_the_first_is_current(ids):
    """The Triton kernel and the CUDA graph run on the cache's device even when another one is current."""
    from tests.conftest import build_tiny

    model = build_tiny("llama").to("cuda:1")
    x = ids.to("cuda:1")
    comp = compress(model, x, (96, 7, 50, 23))
    ref = dynamic_reference(model, comp, x, 12)
    with torch.cuda.device(0):
        out = fast_generate(model, clone_cache(comp.cache), x, 12, logits=comp.logits,
                            config=FastConfig(attention="triton"))
    assert torch.equal(out, ref)


def test_answers_until_eos_cut_each_row_where_generate_stops():
    from depthkv.engine.static import answers_until_eos

    out = torch.tensor([[7, 7, 1, 2, 9, 5, 5], [7, 7, 3, 4, 4, 4, 4], [7, 7, 8, 0, 9, 1, 1]])
    assert answers_until_eos(out, 2, [9, 8]) == [[1, 2, 9], [3, 4, 4, 4, 4], [8]]
    assert answers_until_eos(out, 2, []) == [[1, 2, 9, 5, 5], [3, 4, 4, 4, 4], [8, 0, 9, 1, 1]]


# ---------------------------------------------------------------------------------------------- early stop
STOP = FastConfig(attention="split", block=16, stop_check=4)
NEVER = FastConfig(attention="split", block=16, stop_check=0)


@pytest.fixture
def decoders(monkeypatch):
    """The FastDecoders that fast_generate runs, kept so that a test can read their ``steps_done``."""
    seen = []
    run = FastDecoder.run

    def spy(self, *args, **kwargs):
        seen.append(self)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(FastDecoder, "run", spy)
    return seen


def steps_until_all_ended(rows: list[list[int]], eos: list[int], every: int) -> int:
    """Decode steps the early stop runs: new token 0 comes from the prefill logits, token j >= 1 from step j;
    the check after every ``every`` steps sees all tokens up to there."""
    last = max(next(j for j, t in enumerate(r) if t in eos) for r in rows)
    return every * math.ceil(last / every)


def hf_with_eos(model, comp, ids, n_new, eos):
    """HF generate over the pruned dynamic cache (first token from the prefill logits), stopping at ``eos``."""
    first = comp.logits[:, -1].argmax(-1, keepdim=True)
    return generate_from_cache(model, clone_cache(comp.cache), torch.cat([ids, first], 1), max_new_tokens=n_new - 1,
                               do_sample=False, eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_runs_fewer_steps_same_tokens(models, ids, arch, decoders):
    model = models(arch)
    comp = compress(model, ids, (96, 7, 50, 23))
    free = fast_generate(model, clone_cache(comp.cache), ids, 24, logits=comp.logits, eos_token_id=None)
    cont = free[0, N:].tolist()
    eos = cont[5]  # a token the greedy continuation produces early
    want_steps = steps_until_all_ended([cont], [eos], 4)
    decoders.clear()
    out = fast_generate(model, clone_cache(comp.cache), ids, 24, logits=comp.logits, config=STOP, eos_token_id=eos)
    assert [d.steps_done for d in decoders] == [want_steps] and want_steps < 23
    decoders.clear()
    full = fast_generate(model, clone_cache(comp.cache), ids, 24, logits=comp.logits, config=NEVER, eos_token_id=eos)
    assert [d.steps_done for d in decoders] == [23]  # stop_check=0: every step, as before
    assert torch.equal(out, full) and torch.equal(out, hf_with_eos(model, comp, ids, 24, eos))
    assert int(out[0, -1]) == eos and out.shape[1] <= N + 6


def test_early_stop_on_the_first_token_runs_no_step(models, ids, decoders):
    """The first new token (from the prefill logits) is already the EOS: generate stops there, and the fast
    path decodes nothing more (stop_check=0 decodes every step and cuts to the same single token)."""
    model = models("llama")
    comp = compress(model, ids, (8, 96, 8, 96))
    eos = int(comp.logits[0, -1].argmax())
    out = fast_generate(model, clone_cache(comp.cache), ids, 24, logits=comp.logits, config=STOP, eos_token_id=eos)
    full = fast_generate(model, clone_cache(comp.cache), ids, 24, logits=comp.logits, config=NEVER, eos_token_id=eos)
    assert [d.steps_done for d in decoders] == [0, 23]
    assert torch.equal(out, full) and out[0, N:].tolist() == [eos]


def test_stacked_rows_stop_when_the_last_one_ends(models, ids, decoders):
    """Several caches decoded together: the batch stops only once every row has produced one of the EOS ids;
    the rows that ended first are padded after their EOS, as generate pads them."""
    from depthkv.engine.static import fast_generate_caches

    model = models("llama")
    comps = [compress(model, ids, (96, 7, 50, 23)), compress(model, ids, (8, 96, 8, 96))]
    rows = [fast_generate(model, clone_cache(c.cache), ids, 24, logits=c.logits, eos_token_id=None)[0, N:].tolist()
            for c in comps]
    eos = [rows[0][4], rows[1][7]]  # each row's own EOS (a row stops at whichever of the two comes first)
    want_steps = steps_until_all_ended(rows, eos, 4)
    assert 4 < want_steps < 23  # a row ends at a later check than the first one

    def together(config):
        decoders.clear()
        out = fast_generate_caches(model, [clone_cache(c.cache) for c in comps], ids, 24, config=config,
                                   logits=torch.cat([c.logits for c in comps]), eos_token_id=eos, pad_token_id=0)
        return out, decoders[0].steps_done

    out, steps = together(STOP)
    full, full_steps = together(NEVER)
    assert (steps, full_steps) == (want_steps, 23) and torch.equal(out, full)
    for row, comp in zip(out, comps):
        ref = hf_with_eos(model, comp, ids, 24, eos)[0]
        assert torch.equal(row[:ref.shape[0]], ref) and bool((row[ref.shape[0]:] == 0).all())


def test_row_that_never_ends_runs_every_step(models, ids, decoders):
    """One row emits the EOS early, the other never does: all max_new_tokens are decoded, as generate does."""
    from depthkv.engine.static import fast_generate_caches

    model = models("llama")
    comps = [compress(model, ids, (96, 7, 50, 23)), compress(model, ids, (8, 96, 8, 96))]
    rows = [fast_generate(model, clone_cache(c.cache), ids, 24, logits=c.logits, eos_token_id=None)[0, N:].tolist()
            for c in comps]
    eos = next(t for t in rows[0][1:8] if t not in rows[1])
    decoders.clear()
    out = fast_generate_caches(model, [clone_cache(c.cache) for c in comps], ids, 24, eos_token_id=eos,
                               config=replace(STOP, stop_check=1), logits=torch.cat([c.logits for c in comps]),
                               pad_token_id=0)
    assert [d.steps_done for d in decoders] == [23] and out.shape[1] == N + 24
    assert out[1, N:].tolist() == rows[1]  # the row that never ended: its whole greedy continuation
    ref = hf_with_eos(model, comps[0], ids, 24, eos)[0]
    assert torch.equal(out[0, :ref.shape[0]], ref) and bool((out[0, ref.shape[0]:] == 0).all())


def test_decoder_run_stops_early_only_with_eos(models, ids):
    """FastDecoder.run itself: with EOS ids it returns the tokens up to the check that saw every row end;
    without them (or with stop_check=0) it decodes all n_new tokens."""
    model = models("qwen2")
    comp = compress(model, ids, (96, 7, 50, 23))
    token = comp.logits[:, -1].argmax(-1, keepdim=True)

    def run(config, **kw):
        dec = FastDecoder(model, StaticPrunedCache(clone_cache(comp.cache), 20, block=16), config)
        return dec.run(token, 20, **kw).tolist(), dec.steps_done

    free, steps = run(STOP)
    assert steps == 20 and len(free[0]) == 20
    eos = free[0][2]
    assert run(STOP, eos=[eos]) == ([free[0][:4]], 4)
    assert run(NEVER, eos=[eos]) == (free, 20)
    assert run(STOP, eos=[eos], ended=torch.tensor([True])) == ([[]], 0)


@pytest.mark.parametrize("bad", [-1, -16])
def test_negative_stop_check_is_refused(bad):
    with pytest.raises(FastDecodeError, match="stop_check"):
        FastConfig(stop_check=bad)
