"""Tensor parallelism (transformers' ``tp_plan``) on CPU with gloo: 2 ranks, each holding 1 of the tiny model's 2
KV heads, prune rank-locally and generate exactly the single-process tokens."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

from depthkv.models.tiny import tiny_model
from depthkv.scorers import get_scorer

WORLD = 2
PROMPT = torch.arange(3, 80)[None]  # 77 tokens
QUESTION = torch.arange(100, 110)[None]
NEW = 8
CASES = (("snapkv", None), ("h2o", None), ("snapkv", "global"), ("kvzip", None))
OPTIONS = {"kvzip": {"prompt_ids": (7, 8, 9), "replay_chunk": 40}}  # KVzip: the replay runs rank-locally too

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")


def _run(model, folder: str, tag: str) -> dict:
    """Greedy tokens, cache shapes and budgets of every case, the answer from a compressed context saved and
    loaded back (each rank saves its own shard), and the head_budgets refusal (None if none)."""
    import depthkv
    from depthkv.engine.compressed import CompressedContext
    from depthkv.engine.press import Press, PressConfig

    out = {}
    for scorer, strategy in CASES:
        with depthkv.press(model, scorer=scorer, ratio=0.6, strategy=strategy, **OPTIONS.get(scorer, {})) as p:
            gen = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
            out[scorer, strategy] = (gen.sequences[0, PROMPT.shape[1]:].tolist(),
                                     [tuple(layer.keys.shape) for layer in gen.past_key_values.layers],
                                     list(p.budgets.tokens))
    press = Press(model, PressConfig(scorer="h2o", ratio=0.6))
    saved = press.compress(PROMPT).save(os.path.join(folder, f"context_{tag}.safetensors"))
    answer = press.answer(CompressedContext.load(saved, model), QUESTION, max_new_tokens=NEW, do_sample=False)
    out["answer"] = answer[0, -NEW:].tolist()
    try:
        depthkv.press(model, scorer="snapkv", ratio=0.6, head_budgets=True)
        out["head_budgets"] = None
    except ValueError as e:
        out["head_budgets"] = str(e)
    try:
        depthkv.press(model, scorer="snapkv", ratio=0.6, fast=True)
        out["fast"] = None
    except ValueError as e:
        out["fast"] = str(e)
    return out


def _worker(rank: int, path: str, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                     attn_implementation="eager").eval()
        torch.save(_run(model, results, f"rank{rank}"), os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_generate_the_single_process_tokens(tmp_path):
    import torch.multiprocessing as mp

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    single = _run(model, str(tmp_path), "single")
    assert single["head_budgets"] is None and single["fast"] is None
    # spawn (not fork: forking after the parent used torch can deadlock), with a deadline so a hang fails the test
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "model"), _free_port(), str(tmp_path)), nprocs=WORLD,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the tensor-parallel ranks did not finish within 300 s")
    n = PROMPT.shape[1]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for case in CASES:
            tokens, shapes, budgets = got[case]
            ref_tokens, ref_shapes, ref_budgets = single[case]
            assert tokens == ref_tokens, (rank, case)
            assert budgets == ref_budgets, (rank, case)  # identical on every rank (global: from all heads' scores)
            assert all(b < n for b in budgets), budgets
            # each rank holds its one KV head at the budgeted length (+ the decoded tokens, the last one unfed)
            assert shapes == [(1, 1, s[2], 16) for s in ref_shapes], (rank, case)
            # (a context-pass scorer prefills and prunes all but the last prompt token, which generate then feeds:
            # one more cached)
            fed_after = get_scorer(case[0]).context_pass
            assert [s[2] for s in shapes] == [b + NEW - (not fed_after) for b in budgets], (rank, case)
        assert got["answer"] == single["answer"], rank
        assert "tensor-parallel" in got["head_budgets"] and "tensor-parallel" in got["fast"]
    # the global allocator splits this input unevenly across layers: the gathered scores mattered
    assert len(set(single["snapkv", "global"][2])) > 1
