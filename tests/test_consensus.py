"""Re-ordering by a shared signal and KVzip's cross-layer consensus (tiny models, no downloads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import depthkv
from depthkv.allocation import BudgetSpec
from depthkv.engine import Protection, score_prefill
from depthkv.scorers import KVzip, get_scorer
from depthkv.scorers.reorder import blend_reorder, consensus, ranks
from tests.conftest import KVZIP_PROMPT as PROMPT
from tests.conftest import context_ids as _ids


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.floats(0.0, 4.0), st.integers(0, 10_000))
def test_blend_keeps_each_heads_scores_and_follows_a_shared_signal(heads, n, weight, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, n, generator=g)
    signal = torch.rand(1, 1, n, generator=g)  # one signal for every head
    out = blend_reorder(scores, signal, weight)
    assert torch.equal(out.sort(-1).values, scores.sort(-1).values)
    blend = ranks(scores) + weight * ranks(signal)
    for h in range(heads):  # a strictly higher blended rank never gets a lower score
        b, o = blend[0, h], out[0, h]
        assert bool((o[:, None] >= o[None, :])[b[:, None] > b[None, :]].all())


def test_consensus_is_the_mean_rank_percentile_over_layers_and_heads():
    a = torch.tensor([[[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]]])  # percentiles [0, .5, 1], [1, .5, 0]
    b = torch.tensor([[[5.0, 7.0, 6.0]]])  # [0, 1, .5]
    got = consensus([a, None, b])
    torch.testing.assert_close(got, torch.tensor([[[1 / 3, 2 / 3, 1.5 / 3]]]))
    # a large weight orders every head like the consensus: position 1 first, then 2, then 0
    out = blend_reorder(a, got, 100.0)
    assert torch.equal(out, torch.tensor([[[0.1, 0.9, 0.5], [0.1, 0.3, 0.2]]]))


def test_consensus_refuses_nothing_or_layers_over_other_tokens():
    with pytest.raises(ValueError, match="at least one"):
        consensus([None, None])
    with pytest.raises(ValueError, match="same context tokens"):
        consensus([torch.rand(1, 2, 5), torch.rand(1, 2, 6)])


@pytest.mark.parametrize("option", ["consensus", "diversity"])
@pytest.mark.parametrize("bad", [-0.5, float("nan"), True, "1"])
def test_rejects_a_bad_reorder_weight(option, bad):
    with pytest.raises(ValueError, match=f"{option} weight >= 0"):
        KVzip(**{option: bad})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", ["kvzip", "kvzip_v"])
def test_scores_are_the_plain_ones_reordered_by_their_consensus(tiny_models, arch, name):
    """Each layer and head keeps its scores (so the budgets), re-ordered by ``rank + w * rank(consensus)`` where
    the consensus comes from the plain scorer's finished scores of every layer."""
    model = tiny_models(arch)
    n = 96
    plain = get_scorer(name, prompt_ids=PROMPT, replay_chunk=40)
    shared = get_scorer(name, prompt_ids=PROMPT, replay_chunk=40, consensus=1.5)
    assert shared.whole_context and (plain.whole_context == (name == "kvzip_v"))
    a = score_prefill(model, _ids(n), [plain], Protection(2, 4)).scores[name]
    b = score_prefill(model, _ids(n), [shared], Protection(2, 4)).scores[name]
    c = consensus(a)
    moved = 0
    for sa, sb in zip(a, b, strict=True):
        assert torch.equal(sb, blend_reorder(sa, c, 1.5))
        moved += int((sa.argsort(-1, descending=True)[..., :20] != sb.argsort(-1, descending=True)[..., :20]).sum())
    assert moved > 0
    for strategy in ("uniform", "global"):  # the budgets do not move
        spec = BudgetSpec(0.7, strategy, None, (), 6)
        assert spec.for_context(4, n, scores=a).tokens == spec.for_context(4, n, scores=b).tokens


@pytest.mark.parametrize("option", ["consensus", "diversity"])
def test_press_with_a_whole_context_reorder_prunes_after_the_prefill_and_refuses_chunked(tiny_models, option):
    """KVzip's re-orderings that need the whole context (cross-layer consensus, key distinctiveness): ratio 0 is
    the full cache token for token, budgets stay exact, and chunk-by-chunk pruning is refused."""
    model = tiny_models("qwen2")
    ctx, question = _ids(80), _ids(6, seed=3)
    ids = torch.cat([ctx, question], dim=1)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    full = depthkv.press(model, "kvzip", 0.0, prompt_ids=PROMPT, replay_chunk=30, **{option: 1.0})
    assert full.answer(full.compress(ctx), question, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
    p = depthkv.press(model, "kvzip", 0.5, prompt_ids=PROMPT, replay_chunk=30, head_budgets=True, **{option: 1.0})
    p.compress(ctx)
    assert sum(p.budgets.tokens) == 4 * 40
    with pytest.raises(ValueError, match="kvzip.*mode='post'"):
        depthkv.press(model, "kvzip", 0.5, mode="chunked", chunk_size=32, prompt_ids=PROMPT, **{option: 1.0})
    depthkv.press(model, "kvzip", 0.5, mode="chunked", chunk_size=32, prompt_ids=PROMPT)  # plain KVzip: chunk-able


def _consensus_worker(rank: int, port: int, layers: list, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:  # each rank holds one of the two KV heads of every layer, as under tensor parallelism
        torch.save(consensus([s[:, rank:rank + 1] for s in layers], dist.group.WORLD), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this build")
def test_consensus_over_sharded_heads_equals_the_single_process_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(7)
    layers = [torch.rand(1, 2, 30, generator=g) for _ in range(3)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_consensus_worker, args=(port, layers, str(tmp_path)), nprocs=2, start_method="spawn")
    want = consensus(layers)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), want)
