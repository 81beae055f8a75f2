"""Tensor-parallel decoding with depthkv: memory and decode speed per GPU, full cache vs pruned, 2+ ranks.

A model too large for one GPU is split with transformers' tensor-parallel plan (``tp_plan="auto"``): every rank
holds a column shard of the q/k/v projections, so its attention sees ``KVH / world`` KV heads and depthkv prunes
that shard rank-locally (``depthkv.engine.tensor_parallel``). For every shape, context length N and ratio R:

* model: a random-initialised Llama of a ``_common.SHAPES`` entry (seed 0 on every rank, so the replicated
  weights agree), built straight into its shards in memory: ``from_pretrained(None, config=..., state_dict={},
  distributed_config=DistributedConfig(tp_plan="auto"))`` creates the model on the meta device, shards it and
  initialises the missing (here: all) weights per rank, so no checkpoint is written. ``--weights disk`` (or
  ``auto``, when the in-memory route fails on this transformers version) saves a random checkpoint to a
  temporary folder instead (rank 0 writes, all ranks load their shards; the time is recorded);
* one greedy ``model.generate`` of ``--new-tokens`` T tokens from N random token ids: R = 0 with no press at
  all, R > 0 inside ``depthkv.press(model, scorer, ratio=R)`` (the HF path; the fast path is refused under
  tensor parallelism). Post mode prunes each layer right after its attention in the prefill;
* timing: a logits processor stamps the wall clock (after a device synchronisation) at every generation step.
  Its first stamp follows the prefill (+ pruning), the others each follow one 1-token decode forward, so
  ``decode_ms_per_step`` = (last - first) / (T - 1): HF's whole per-step cost (forward, collectives, token
  choice), with the prefill left out and no second prefill to subtract;
* memory per rank: the local shards' parameter bytes, the cache's bytes (``depthkv.engine.cache.kv_bytes``;
  ``kv_context_bytes`` leaves the T - 1 decoded tokens out) and ``torch.cuda.max_memory_allocated`` over the
  call (CPU: the peak resident set, VmHWM);
* checks: every rank's cache layer holds ``KVH / world`` heads and exactly its budget (N unpruned) plus the
  T - 1 decoded tokens; all ranks chose the same tokens; the replicated weights are equal on every rank. A
  failed check is written into the results and makes the run exit 1 (after writing).
* ``--strategy global`` (input-adaptive budgets, the only kind that communicates under tensor parallelism)
  also records the time and bytes of its one all-gather of token scores per pruning.

Rank 0 writes ``DIR/tp_decode.json`` (meta, rows with per-rank values) and ``DIR/tp_decode.csv`` atomically
after every configuration and prints a table (values per GPU are the largest over the ranks).

    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --shapes llama-3.1-8b,llama-3.1-70b-4l \
        --contexts 32768 --out benchmarks/results/tp_decode_h200x2
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --shapes tiny-32l --contexts 128 --new-tokens 4 \
        --device cpu --out /tmp/tp_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from _common import (
    MIN_TOKENS,
    SHAPES,
    build_model,
    command_line,
    random_ids,
    rss_fields,
    rss_mark,
    versions,
    write_results,
)

GIB = 1024**3
CSV_FIELDS = ("shape", "context", "ratio", "scorer", "strategy", "mode", "world_size", "kv_heads_per_rank",
              "new_tokens", "weights_bytes_per_gpu", "kv_bytes_per_gpu", "kv_context_bytes_per_gpu",
              "kv_full_context_bytes_per_gpu", "peak_bytes_per_gpu", "rss_peak_mb", "prefill_s",
              "decode_ms_per_step", "speedup", "allgather_ms", "allgather_bytes", "cache_ok", "ranks_agree",
              "error")


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures; the same on every rank."""

    shapes: tuple[str, ...]
    contexts: tuple[int, ...]
    ratios: tuple[float, ...]
    new_tokens: int
    scorer: str
    strategy: str | None
    mode: str
    chunk_size: int
    device: str  # "cuda" or "cpu"
    dtype: str
    weights: str  # "auto", "memory" or "disk"
    out: Path
    tmp_dir: str | None


# ------------------------------------------------------------------------------------------ arguments


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """The run's configuration; any bad value is one ``error:`` line and exit code 2, before any model work."""
    ap = argparse.ArgumentParser(prog="tp_decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.1-8b,llama-3.1-70b-4l", help=f"from: {', '.join(SHAPES)}")
    ap.add_argument("--contexts", default="32768", help="context lengths N, comma-separated")
    ap.add_argument("--ratios", default="0,0.8", help="shares of the KV pairs removed; 0: no press at all")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per configuration (>= 2)")
    ap.add_argument("--scorer", default="snapkv")
    ap.add_argument("--strategy", default=None, help="allocator splitting the ratio across layers (default: "
                    "uniform); 'global' ranks all heads' scores through one all-gather")
    ap.add_argument("--mode", choices=("post", "chunked"), default="post", help="depthkv's pruning mode")
    ap.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk of --mode chunked")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="cuda: NCCL, one GPU per rank; cpu: gloo (auto: cuda when there is one)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--weights", choices=("auto", "memory", "disk"), default="auto",
                    help="memory: initialise the shards in place; disk: save a random checkpoint to a temporary "
                         "folder first; auto: memory, disk if that fails")
    ap.add_argument("--tmp-dir", default=None, help="folder for the --weights disk checkpoint (default: system's)")
    ap.add_argument("--out", type=Path, required=True, help="folder for tp_decode.json and tp_decode.csv")
    args = ap.parse_args(argv)
    try:
        shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
        contexts, ratios = _ints(args.contexts), _floats(args.ratios)
    except ValueError as exc:
        ap.error(f"--contexts and --ratios take comma-separated numbers ({exc})")
    unknown = [s for s in shapes if s not in SHAPES]
    if not shapes or unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(SHAPES)}")
    if not contexts or min(contexts) <= MIN_TOKENS:
        ap.error(f"--contexts must be above the protected window of {MIN_TOKENS} tokens")
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
        ap.error("--ratios must lie in [0, 1)")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the first token follows the prefill; decode steps come after)")
    if args.chunk_size < 1:
        ap.error("--chunk-size must be positive")
    for shape in shapes:
        too_long = [n for n in contexts if n + args.new_tokens > SHAPES[shape]["max_position_embeddings"]]
        if too_long:
            ap.error(f"context {too_long[0]} + {args.new_tokens} new tokens exceeds {shape}'s "
                     f"{SHAPES[shape]['max_position_embeddings']} positions")
    if args.tmp_dir is not None and not Path(args.tmp_dir).is_dir():
        ap.error(f"--tmp-dir {args.tmp_dir} is not a folder")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} exists and is not a folder")
    return BenchConfig(shapes, contexts, ratios, args.new_tokens, args.scorer, args.strategy, args.mode,
                       args.chunk_size, args.device, args.dtype, args.weights, args.out, args.tmp_dir)


def check_setup(cfg: BenchConfig, world: int) -> BenchConfig:
    """The checks that need torch and depthkv (scorer, allocator, devices, head counts); ``ValueError`` with one
    line on a problem. Returns the config with ``device`` and ``dtype`` resolved."""
    import torch

    from depthkv.allocation import BudgetSpec
    from depthkv.scorers import get_scorer

    if world < 2:
        raise ValueError("run under torchrun with 2 or more processes, e.g. torchrun --nproc-per-node 2 "
                         "benchmarks/tp_decode.py ...")
    get_scorer(cfg.scorer)  # unknown name: ValueError naming the known ones
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"{world} ranks need {world} GPUs, this machine has {torch.cuda.device_count()} "
                         "(use --device cpu for a smoke test)")
    for shape in cfg.shapes:
        fields = SHAPES[shape]
        if fields["num_key_value_heads"] % world or fields["num_attention_heads"] % world:
            raise ValueError(f"{shape} has {fields['num_key_value_heads']} KV heads: they cannot be split "
                             f"across {world} ranks")
        n_layers = fields["num_hidden_layers"]
        for r in (r for r in cfg.ratios if r > 0):
            spec = BudgetSpec(r, cfg.strategy or "uniform", None, (), MIN_TOKENS)
            spec.validate(n_layers)
            if spec.needs_scores and cfg.mode == "chunked":
                raise ValueError(f"allocator {cfg.strategy!r} ranks the whole context's scores: use --mode post")
            if not spec.needs_scores:
                for n in cfg.contexts:
                    spec.for_context(n_layers, n)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return BenchConfig(**{**asdict(cfg), "device": device, "dtype": dtype})


# ------------------------------------------------------------------------------------------ model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers at error verbosity: building from no checkpoint reports every weight as missing."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def tp_from_memory(shape: str, dtype):
    """The shape's random Llama, sharded by transformers' plan and initialised on each rank without a checkpoint."""
    import torch
    import transformers
    from transformers.distributed import DistributedConfig

    cfg = transformers.LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)  # identical on every rank: replicated weights (embeddings, norms) must agree
    with quiet_transformers():
        return transformers.LlamaForCausalLM.from_pretrained(
            None, config=cfg, state_dict={}, distributed_config=DistributedConfig(tp_plan="auto"), dtype=dtype,
            attn_implementation="sdpa").eval()


def tp_from_disk(shape: str, dtype, device, tmp_dir: str | None) -> tuple[Any, float]:
    """The shape's random Llama saved by rank 0 to a temporary folder (ranks on one host) and loaded by every rank
    as its shards; (model, seconds rank 0 spent building and writing the checkpoint). The folder is removed
    afterwards; a failed write fails every rank (no rank waits for a checkpoint that never comes)."""
    import torch
    import torch.distributed as dist
    import transformers
    from transformers.distributed import DistributedConfig

    rank = dist.get_rank()
    folder, write_s, problem = None, 0.0, None
    try:
        if rank == 0:
            t0 = time.perf_counter()
            try:
                folder = tempfile.mkdtemp(prefix="tp_decode_", dir=tmp_dir)
                full = build_model(f"random:{shape}", str(device), dtype)
                full.save_pretrained(folder)
                del full
            except Exception as exc:
                where = folder or f"a new folder in {tmp_dir or tempfile.gettempdir()}"
                problem = f"writing the random checkpoint to {where} failed: {exc!r}"[:300]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_s = time.perf_counter() - t0
        box: list[Any] = [folder, problem]
        dist.broadcast_object_list(box, src=0)
        folder, problem = box
        if problem is not None:
            raise RuntimeError(problem)
        with quiet_transformers():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, distributed_config=DistributedConfig(tp_plan="auto"), dtype=dtype,
                attn_implementation="sdpa").eval()
        dist.barrier()  # every rank has read its shards before rank 0 removes the folder
    finally:
        if rank == 0 and folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return model, write_s


def build(cfg: BenchConfig, shape: str, dtype, device) -> tuple[Any, dict]:
    """(sharded model, how it was made). ``auto`` tries the in-memory route and falls back to the checkpoint
    on every rank when it failed on any rank (the ranks agree through one all-reduce)."""
    import torch
    import torch.distributed as dist

    info: dict[str, Any] = {"weights_source": None, "build_s": None, "memory_route_error": None}
    t0 = time.perf_counter()
    model = None
    if cfg.weights in ("auto", "memory"):
        try:
            model = tp_from_memory(shape, dtype)
        except Exception as exc:
            info["memory_route_error"] = repr(exc)[:300]
            model = None
        failed = torch.tensor([0.0 if model is not None else 1.0], device=device)
        dist.all_reduce(failed)  # every rank learns whether any rank failed: none waits for the others
        if failed.item() > 0:
            if cfg.weights == "memory":
                raise RuntimeError("building the sharded model in memory failed: "
                                   f"{info['memory_route_error'] or 'on another rank'} (try --weights disk)")
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            info["weights_source"] = "memory"
    if model is None:
        model, write_s = tp_from_disk(shape, dtype, device, cfg.tmp_dir)
        info.update(weights_source="disk", checkpoint_write_s=round(write_s, 2))
    if device.type == "cuda":
        torch.cuda.synchronize()
    info["build_s"] = round(time.perf_counter() - t0, 2)
    # no pad token in these configs: say which one generate may use, instead of a warning per call
    model.generation_config.pad_token_id = model.config.eos_token_id
    return model, info


def local(t):
    """A rank's own part of a parameter (the local shard of a DTensor, the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t) -> bool:
    """True for a DTensor split across ranks (any placement other than Replicate)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(not p.is_replicate() for p in placements)


def weight_bytes(model) -> int:
    """Bytes of this rank's parameters: its shards of the split weights plus the replicated ones."""
    return sum(local(p).numel() * local(p).element_size() for p in model.parameters())


def replicated_agree(model, device) -> bool:
    """Whether every replicated parameter is bitwise equal on all ranks (checked on a strided sample of each:
    equal random seeds must give equal embeddings and norms, or the ranks would compute different things)."""
    import torch
    import torch.distributed as dist

    samples = []
    for p in model.parameters():
        if is_sharded(p):
            continue
        flat = local(p).detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // 4096)].float())
    mine = torch.cat(samples).to(device) if samples else torch.zeros(1, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return all(torch.equal(parts[0], p) for p in parts[1:])


# ------------------------------------------------------------------------------------------ measurement


def step_clock(sync: Callable[[], None]):
    """A logits processor recording the wall clock at every generation step (after ``sync``)."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            sync()
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


@contextlib.contextmanager
def gather_timer(sync: Callable[[], None]) -> Iterator[dict]:
    """Time and bytes of depthkv's all-gathers of token scores (``global`` budgets under tensor parallelism),
    by wrapping the function the session calls for the duration of the block."""
    import depthkv.engine.session as session

    stats = {"calls": 0, "s": 0.0, "bytes": 0}
    original = session.gather_head_scores

    def timed(scores, group):
        sync()
        t0 = time.perf_counter()
        out = original(scores, group)
        sync()
        stats["s"] += time.perf_counter() - t0
        stats["calls"] += 1
        stats["bytes"] += sum(s.numel() * 4 for s in out)  # every rank's heads, gathered as float32
        return out

    session.gather_head_scores = timed
    try:
        yield stats
    finally:
        session.gather_head_scores = original


def measure(model, cfg: BenchConfig, n: int, ratio: float, device) -> dict:
    """One configuration on this rank: generate ``cfg.new_tokens`` tokens from ``n`` random ids (pressed when
    ``ratio`` > 0); time, memory, the cache's shapes checked against the budgets, and the tokens."""
    import torch
    from transformers import LogitsProcessorList

    import depthkv
    from depthkv.engine.cache import kv_bytes
    from depthkv.engine.tensor_parallel import kv_shards

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = cfg.new_tokens
    ids = random_ids(model, n, device)[:, :n]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mark = None if cuda else rss_mark()
    clock = step_clock(sync)
    press = (depthkv.press(model, cfg.scorer, ratio=ratio, strategy=cfg.strategy, mode=cfg.mode,
                           chunk_size=cfg.chunk_size) if ratio > 0 else contextlib.nullcontext())
    with gather_timer(sync) as gathered, torch.no_grad(), press:
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True)
    times = clock.times
    cache = getattr(out, "cache", None)  # newer transformers; earlier versions call it past_key_values
    cache = out.past_key_values if cache is None else cache
    shapes = [tuple(layer.keys.shape) for layer in cache.layers]
    budgets = list(press.budgets.tokens) if ratio > 0 else [n] * len(shapes)
    heads = model.config.num_key_value_heads // kv_shards(model)
    decoded = steps - 1  # the last token is chosen but never fed back
    expected = [(1, heads, b + decoded) for b in budgets]
    per_token = [2 * s[1] * s[3] * cache.layers[0].keys.element_size() for s in shapes]  # keys + values
    row = {
        "tokens": out.sequences[0, n:].tolist(),
        "layer_lengths": [s[2] for s in shapes],
        "budgets": budgets if ratio > 0 else None,
        "kv_heads": sorted({s[1] for s in shapes}),
        "kv_shards": kv_shards(model),
        "cache_ok": [s[:3] for s in shapes] == expected,
        "kv_bytes": kv_bytes(cache),
        "kv_context_bytes": sum((s[2] - decoded) * b for s, b in zip(shapes, per_token)),
        "prefill_s": round(times[0] - t0, 4),
        "decode_ms_per_step": round(1000 * (times[-1] - times[0]) / (len(times) - 1), 3),
        "decode_steps": len(times) - 1,
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "allgather_calls": gathered["calls"],
        "allgather_ms": round(1000 * gathered["s"], 3) if gathered["calls"] else None,
        "allgather_bytes": gathered["bytes"] if gathered["calls"] else None,
    }
    if not cuda:
        row["rss_peak_mb"] = rss_fields(mark)["rss_peak_mb"]
    del out, cache
    return row


def warm_up(model, cfg: BenchConfig, device) -> None:
    """Kernels, collectives' communicators and the scorer's code paths, before anything is measured."""
    import torch

    import depthkv

    n = min(4096, min(cfg.contexts))  # the measured path, on the smallest context (short enough to be quick)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1)).to(device)
    ratio = max(cfg.ratios) or 0.5
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        with depthkv.press(model, cfg.scorer, ratio=ratio, strategy=cfg.strategy, mode=cfg.mode,
                           chunk_size=min(cfg.chunk_size, n)):
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)


def combine(shape: str, n: int, ratio: float, cfg: BenchConfig, model_info: dict, ranks: list[dict]) -> dict:
    """One result row from every rank's measurement: per-GPU values are the largest over the ranks."""
    def most(key: str):
        values = [r[key] for r in ranks if r.get(key) is not None]
        return max(values) if values else None

    from depthkv.engine.press import full_kv_bytes

    row: dict[str, Any] = {
        "shape": shape, "context": n, "ratio": ratio,
        "scorer": cfg.scorer if ratio > 0 else None,
        "strategy": (cfg.strategy or "uniform") if ratio > 0 else None,
        "mode": cfg.mode if ratio > 0 else None,
        "world_size": len(ranks), "new_tokens": cfg.new_tokens,
        "weights_bytes_per_gpu": model_info["weights_bytes"],
    }
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        row["error"] = errors[0]
        return row
    row.update({
        "kv_heads_per_rank": ranks[0]["kv_heads"][0] if len(ranks[0]["kv_heads"]) == 1 else ranks[0]["kv_heads"],
        "kv_bytes_per_gpu": most("kv_bytes"),
        "kv_context_bytes_per_gpu": most("kv_context_bytes"),
        "kv_full_context_bytes_per_gpu": full_kv_bytes(model_info["model"], n) // ranks[0]["kv_shards"],
        "peak_bytes_per_gpu": most("peak_bytes"),
        "rss_peak_mb": most("rss_peak_mb"),
        "prefill_s": most("prefill_s"),
        "decode_ms_per_step": most("decode_ms_per_step"),
        "decode_steps": ranks[0]["decode_steps"],
        "allgather_ms": most("allgather_ms"),
        "allgather_bytes": most("allgather_bytes"),
        "cache_ok": all(r["cache_ok"] and r["kv_shards"] == len(ranks) for r in ranks),
        "ranks_agree": all(r["tokens"] == ranks[0]["tokens"] for r in ranks),
        "tokens": ranks[0]["tokens"],
        "budgets": ranks[0]["budgets"],
        "layer_lengths": ranks[0]["layer_lengths"],
        "per_rank": [{k: r[k] for k in ("kv_bytes", "kv_context_bytes", "peak_bytes", "rss_peak_mb", "prefill_s",
                                        "decode_ms_per_step", "allgather_ms") if k in r} for r in ranks],
    })
    return row


def add_speedups(rows: list[dict]) -> None:
    """``speedup``: decode ms/step of the same shape and context without a press, over this row's."""
    base = {(r["shape"], r["context"]): r["decode_ms_per_step"] for r in rows
            if r["ratio"] == 0 and r.get("decode_ms_per_step")}
    for r in rows:
        ref = base.get((r["shape"], r["context"]))
        ms = r.get("decode_ms_per_step")
        r["speedup"] = round(ref / ms, 3) if ref and ms else None


# ------------------------------------------------------------------------------------------ output


def write_csv(path: Path, rows: list[dict]) -> None:
    """The rows' scalar fields as CSV, atomically."""
    from depthkv.io import atomic_write

    with atomic_write(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def table(rows: list[dict]) -> str:
    """Plain-text table of the rows (GiB per GPU, the largest over the ranks)."""
    def gib(x):
        return "-" if x is None else f"{x / GIB:.3g}"

    head = ("shape", "context", "ratio", "weights GiB/GPU", "KV GiB/GPU", "peak GiB/GPU", "ms/step", "speed-up")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append((r["shape"], str(r["context"]), f"{r['ratio']:g}", gib(r["weights_bytes_per_gpu"]),
                          "error", "", "", r["error"][:60]))
            continue
        lines.append((r["shape"], str(r["context"]), f"{r['ratio']:g}", gib(r["weights_bytes_per_gpu"]),
                      gib(r["kv_bytes_per_gpu"]), gib(r["peak_bytes_per_gpu"]), f"{r['decode_ms_per_step']:.2f}",
                      "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# ------------------------------------------------------------------------------------------ main


def run(cfg: BenchConfig, rank: int, device) -> int:
    """Every shape, context and ratio on this rank; rank 0 writes the results. Returns the exit code."""
    import torch
    import torch.distributed as dist

    dtype = getattr(torch, cfg.dtype)
    rows: list[dict] = []
    meta: dict[str, Any] = {
        "date": date.today().isoformat(), "command": command_line(__file__, launcher=f"torchrun --nproc-per-node {dist.get_world_size()}"),
        "world_size": dist.get_world_size(), "backend": dist.get_backend(), "device": cfg.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": cfg.dtype, "scorer": cfg.scorer, "strategy": cfg.strategy or "uniform", "mode": cfg.mode,
        "new_tokens": cfg.new_tokens, **versions(),
        "data": "random token ids (seeded by context length); random-initialised weights (seed 0)",
        "timing": "one model.generate per row; decode_ms_per_step = wall time between the first and the last of "
                  "a logits processor's per-step stamps (after a device sync) / (new_tokens - 1): each step is "
                  "one 1-token forward + token choice; the prefill (and pruning) precedes the first stamp",
        "shapes": {},
    }
    json_path, csv_path = cfg.out / "tp_decode.json", cfg.out / "tp_decode.csv"
    for shape in cfg.shapes:
        model, info = build(cfg, shape, dtype, device)
        info["replicated_weights_agree"] = replicated_agree(model, device)
        info["weights_bytes"] = weight_bytes(model)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, info)
        model_info = {**info, "weights_bytes": max(i["weights_bytes"] for i in every), "model": model}
        meta["shapes"][shape] = {**{k: v for k, v in info.items() if k != "weights_bytes"},
                                 "weights_bytes_per_rank": [i["weights_bytes"] for i in every],
                                 "build_s_per_rank": [i["build_s"] for i in every],
                                 "memory_route_error": next((i["memory_route_error"] for i in every
                                                             if i["memory_route_error"]), None),
                                 "config": SHAPES[shape]}
        warm_up(model, cfg, device)
        for n in cfg.contexts:
            for ratio in cfg.ratios:
                try:
                    mine = measure(model, cfg, n, ratio, device)
                except torch.cuda.OutOfMemoryError as exc:
                    mine = {"error": f"OOM: {exc}"[:200]}
                    gc.collect()
                    torch.cuda.empty_cache()
                ranks = [None] * dist.get_world_size()
                dist.all_gather_object(ranks, mine)
                if rank == 0:
                    rows.append(combine(shape, n, ratio, cfg, model_info, ranks))
                    add_speedups(rows)
                    short = {k: v for k, v in rows[-1].items() if k not in ("tokens", "budgets", "layer_lengths",
                                                                             "per_rank")}
                    print(json.dumps(short), flush=True)
                    # after every configuration, so that a run stopped at its time limit keeps what it measured
                    write_results(json_path, meta, rows)
                    write_csv(csv_path, rows)
        del model, model_info
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank != 0:
        return 0
    print(table(rows))
    print(f"wrote {json_path} and {csv_path}")
    failed = [f"{r['shape']} N={r['context']} ratio={r['ratio']:g}" for r in rows
              if "error" not in r and not (r["cache_ok"] and r["ranks_agree"])]
    failed += [f"{s}: replicated weights differ across ranks" for s, i in meta["shapes"].items()
               if not i["replicated_weights_agree"]]
    if failed:
        print(f"tp_decode.py: error: checks failed (cache shapes, rank agreement): {'; '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.device == "cpu":  # before torch starts: transformers places the shards on the detected accelerator
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        cfg = check_setup(cfg, world)
    except ValueError as exc:
        if rank == 0:
            print(f"tp_decode.py: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo")
    try:
        return run(cfg, dist.get_rank(), device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
