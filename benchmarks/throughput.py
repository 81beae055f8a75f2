"""Decode throughput at equal memory: the largest batch that fits, pruned fast path vs plain HF ``generate``.

KV pruning pays in serving by fitting more sequences into the same accelerator memory. For a model shape, a
context length N and a pruning ratio r this finds the LARGEST batch B whose weights + kept KV + decode buffers
+ activations fit in ``--memory-gib``, really builds it, and times greedy decoding at that batch:

* fast: :class:`depthkv.engine.static.StaticPrunedCache` (per-layer buffers ``[B, KVH, B_l + horizon, D]``)
  decoded by :class:`~depthkv.engine.static.FastDecoder`, one step captured as a CUDA graph and replayed
  ``--steps`` times (CUDA events, synchronised); on CPU the same step runs eagerly. Ratio 0 = the full cache
  on the fast path.
* hf: plain ``model.generate`` over a full ``DynamicCache`` (N tokens per row, ``input_ids`` [B, N + 1] so one
  token is fed), greedy, ``min_new_tokens = max_new_tokens`` so that EOS never stops it, at ITS own largest
  batch: a warm-up call, then a timed call of ``--hf-steps`` tokens.

No prefill: caches are built directly from seeded random K/V of the exact per-layer shapes (uniform budgets
from ``depthkv.allocation``, or a DepthKV-like uneven vector, as ``fast_decode.py``). A random model's prefill
is not what is measured, and a 128k prefill per batch would cost more than the whole benchmark.

Fitting rule: ``base + B * (per_seq + c) + a <= memory``. ``base`` = memory held before the row (weights);
``per_seq`` = the exact cache bytes of one sequence (fast: the padded static buffers of the kept tokens plus
the horizon slots; hf: N + warm-up + timed tokens per layer); ``a + c * B`` = activations, workspace, CUDA
graph pool and HF's ``torch.cat`` growth of the cache (one layer copied per step), measured as the allocator's
peak reserved memory of the same run at two small batches (on CUDA; CPU keeps no allocation statistics, so
there the reserve is 0 and the run is a plumbing check). If building or running the fitted batch still
raises ``torch.OutOfMemoryError``, B steps down by ~10% and the row records how often.

Bound: bytes read per step = weights read (the input embedding table only if it is tied to the LM head) +
the batch's KV, over ``--bandwidth-gbs`` (default 4800 GB/s, an H200's HBM3e peak); bound tokens/s = B / that
time. Every row reports its fraction of the bound and its speed-up over the HF full-cache row of its context.

Results: ``OUT/throughput.json`` (meta + rows) and ``OUT/throughput.csv``, rewritten atomically after every
row; rows already there (same context, ratio, budgets, path) are skipped, so an interrupted run resumes.
Cost per row: three builds (two small probes and the fitted batch), one graph capture, ``--steps`` replays.

    python benchmarks/throughput.py --model random:llama-3.1-8b --contexts 8192,32768,131072 \
        --ratios 0,0.6,0.8,0.9 --out benchmarks/results/throughput_h200
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from _common import (
    DEFAULT_PROFILE,
    SHAPES,
    build_model,
    command_line,
    depthkv_view,
    parse_list,
    versions,
    write_results,
)

from depthkv.io import atomic_write

GIB = 2**30
RESULTS_JSON = "throughput.json"
RESULTS_CSV = "throughput.csv"
BUDGET_KINDS = ("uniform", "depthkv")
CSV_COLUMNS = ("context", "ratio", "budgets", "path", "batch", "kv_gib", "peak_gib", "ms_per_step", "tokens_per_s",
               "bound_tokens_per_s", "fraction_of_bound", "speedup_vs_hf", "batch_fitted", "oom_retries",
               "capped", "error")


class BenchError(Exception):
    """Bad input or an unusable results folder: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ the fitting rule
@dataclass(frozen=True)
class Fit:
    """The largest batch under the memory limit and the reserve model it was fitted with."""

    batch: int
    reserve_fixed: int  # a: bytes beyond weights and caches that do not grow with the batch
    reserve_per_seq: int  # c: bytes per sequence beyond its cache (activations, HF's cat growth)
    capped: bool  # True when --max-batch, not memory, set the batch
    probes: tuple[tuple[int, int], ...] = ()  # (batch, peak reserved bytes) of the measured small runs


def reserve_model(base: int, per_seq: int, probes: list[tuple[int, int]]) -> tuple[int, int]:
    """(a, c) of ``extra(B) = a + c * B`` from the peak memory of runs at small batches.

    ``extra(B) = peak(B) - base - B * per_seq``; two probes give a line, one probe a constant; both
    coefficients are clamped at 0 (allocator rounding can make a tiny slope negative).
    """
    if not probes:
        return 0, 0
    extra = [(b, peak - base - b * per_seq) for b, peak in sorted(probes)]
    if len(extra) == 1:
        return max(0, extra[0][1]), 0
    (b1, e1), (b2, e2) = extra[0], extra[-1]
    c = max(0.0, (e2 - e1) / (b2 - b1))
    return max(0, math.ceil(e1 - c * b1)), math.ceil(c)


def largest_batch(limit: int, base: int, per_seq: int, reserve_fixed: int, reserve_per_seq: int,
                  cap: int) -> tuple[int, bool]:
    """(largest B with ``base + a + B * (per_seq + c) <= limit``, capped at ``cap``; whether the cap bound it)."""
    room = limit - base - reserve_fixed
    b = room // (per_seq + reserve_per_seq) if room > 0 else 0
    return (cap, True) if b > cap else (int(b), False)


def probe_batches(analytic: int) -> list[int]:
    """Small batches to measure the reserve at: 1 and ~a quarter of the analytic batch (2..16), apart enough
    that allocator rounding does not dominate the fitted per-sequence slope."""
    if analytic <= 1:
        return [1]
    return [1, max(2, min(16, analytic // 4))]


# ------------------------------------------------------------------------------------------ model facts
@dataclass(frozen=True)
class Shape:
    n_layers: int
    kv_heads: int
    head_dim: int
    elem: int  # bytes per K/V element
    vocab: int

    @property
    def token_bytes(self) -> int:
        """K + V bytes of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.elem

    @classmethod
    def of(cls, model) -> Shape:
        cfg = model.config.get_text_config(decoder=True)
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, d, model.dtype.itemsize, cfg.vocab_size)


def static_bytes_per_seq(shape: Shape, lengths: list[int], horizon: int, block: int) -> int:
    """Bytes of one sequence's :class:`StaticPrunedCache` buffers: each layer's B_l + horizon slots, rounded up
    to a multiple of ``block`` (at least one block), as the cache allocates them."""
    slots = sum(max(block, math.ceil((n + horizon) / block) * block) for n in lengths)
    return slots * shape.token_bytes


def weights_read_bytes(model) -> int:
    """Parameter bytes one decode step reads: all but the input embedding table (a step gathers B rows of it),
    unless that table is the LM head too."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    return total if tied else total - emb.numel() * emb.element_size()


# ------------------------------------------------------------------------------------------ device helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release(dev: torch.device) -> None:
    """Give the caching allocator's free blocks back (CUDA), so the next row starts from the weights alone."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(dev: torch.device) -> None:
    release(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peaks(dev: torch.device) -> tuple[int | None, int | None]:
    """(peak allocated, peak reserved) bytes since :func:`reset_peak`; (None, None) on CPU."""
    if dev.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)


def held(dev: torch.device) -> int | None:
    """Bytes the caching allocator holds now (after :func:`release`: essentially the weights)."""
    return torch.cuda.memory_reserved(dev) if dev.type == "cuda" else None


# ------------------------------------------------------------------------------------------ the two paths
def static_random_cache(model, shape: Shape, n: int, lengths: list[int], batch: int, horizon: int, block: int,
                        seed: int):
    """A :class:`StaticPrunedCache` of ``batch`` rows whose layer l holds ``lengths[l]`` seeded random tokens.

    The source cache is zero-stride views of one zero (no memory); the buffers are then filled in place, so
    the build never holds more than the buffers themselves.
    """
    from transformers.cache_utils import DynamicCache

    from depthkv.engine.cache import PrunedLayer
    from depthkv.engine.static import StaticPrunedCache

    dev, dt = model.device, model.dtype
    zero = torch.zeros((), dtype=dt, device=dev)
    zpos = torch.zeros((), dtype=torch.int32, device=dev)
    src = DynamicCache()
    src.layers = []
    for b in lengths:
        kv = zero.expand(batch, shape.kv_heads, b, shape.head_dim)
        src.layers.append(PrunedLayer(kv, kv, zpos.expand(batch, shape.kv_heads, b), prefix_end=n))
    static = StaticPrunedCache(src, horizon, block=block)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for i, b in enumerate(lengths):
        for buf in static.buffers(i):
            buf[:, :, :b].normal_(generator=gen)
    return static


def dynamic_random_cache(model, shape: Shape, n: int, batch: int, seed: int):
    """A full HF ``DynamicCache`` of ``batch`` rows x ``n`` seeded random tokens per layer (no copy on build)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    dev, dt = model.device, model.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    cache = DynamicCache()
    cache.layers = []
    for _ in range(shape.n_layers):
        k = torch.empty(batch, shape.kv_heads, n, shape.head_dim, dtype=dt, device=dev).normal_(generator=gen)
        v = torch.empty_like(k).normal_(generator=gen)
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


@dataclass
class Timing:
    ms_per_step: float
    peak_allocated: int | None
    peak_reserved: int | None
    cache_bytes: int  # bytes the batch's cache occupies at the end of the run


@torch.no_grad()
def run_fast(model, shape: Shape, n: int, lengths: list[int], batch: int, steps: int, cfg, seed: int) -> Timing:
    """Build the batch's static cache, warm up, capture one step (CUDA) and time ``steps`` steps."""
    from depthkv.engine.static import FastDecoder

    dev = model.device
    horizon = cfg.warmup_steps + steps + 1
    reset_peak(dev)
    static = static_random_cache(model, shape, n, lengths, batch, horizon, cfg.block, seed)
    dec = FastDecoder(model, static, cfg)
    feed = torch.randint(0, shape.vocab, (batch, 1), generator=torch.Generator().manual_seed(seed)).to(dev)
    dec.run(feed, cfg.warmup_steps)  # real steps, eager (on a side stream on CUDA, as capture requires)
    if dev.type == "cuda" and cfg.cuda_graph:
        dec.capture()
        sync(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            dec.graph.replay()
        b.record()
        sync(dev)
        ms = a.elapsed_time(b) / steps
    else:
        t = time.perf_counter()
        for _ in range(steps):
            dec.step()
        sync(dev)
        ms = 1000 * (time.perf_counter() - t) / steps
    dec.steps_done += steps
    pa, pr = peaks(dev)
    out = Timing(ms, pa, pr, static.storage_bytes())
    del dec, static
    return out


@torch.no_grad()
def run_hf(model, shape: Shape, n: int, batch: int, steps: int, warm: int, seed: int) -> Timing:
    """Plain ``model.generate`` over a full random cache of ``n`` tokens per row: ``warm`` tokens, then
    ``steps`` tokens timed (the cache keeps growing by ``torch.cat``, as in any HF decode)."""
    from depthkv.engine.runner import cache_kwarg

    dev = model.device
    reset_peak(dev)
    cache = dynamic_random_cache(model, shape, n, batch, seed)
    ids = torch.randint(0, shape.vocab, (batch, n + 1), generator=torch.Generator().manual_seed(seed)).to(dev)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0

    def generate(inp, past, k):
        return model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), **{cache_kwarg(model): past},
                              max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=pad)

    ids = generate(ids, cache, warm)
    sync(dev)
    t = time.perf_counter()
    out = generate(ids, cache, steps)
    sync(dev)
    ms = 1000 * (time.perf_counter() - t) / steps
    if out.shape[1] != ids.shape[1] + steps:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, {steps} requested")
    pa, pr = peaks(dev)
    used = sum(x.keys.numel() * x.keys.element_size() + x.values.numel() * x.values.element_size()
               for x in cache.layers)
    del cache, ids, out
    return Timing(ms, pa, pr, used)


# ------------------------------------------------------------------------------------------ one row
@dataclass(frozen=True)
class RowSpec:
    context: int
    ratio: float
    budgets: str  # full | uniform | depthkv
    path: str  # fast | hf

    @property
    def key(self) -> tuple:
        return row_key(asdict(self))


def row_key(row: dict) -> tuple:
    return int(row["context"]), round(float(row["ratio"]), 6), str(row["budgets"]), str(row["path"])


@dataclass
class Bench:
    """Everything a row needs: the model, its facts, the memory limit and the run settings."""

    model: object
    shape: Shape
    dev: torch.device
    limit: int
    weights_read: int
    max_batch: int
    steps: int
    hf_steps: int
    hf_warm: int
    bandwidth: float  # bytes/s
    fast_cfg: object
    view: object = None  # SensitivityView of the DepthKV-like budgets (None: uniform only)
    probe: bool = False  # measure the reserve at small batches (needs allocator statistics: CUDA)

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def lengths_for(bench: Bench, spec: RowSpec) -> list[int]:
    from fast_decode import budget_vector

    return budget_vector(spec.budgets if spec.ratio > 0 else "uniform", bench.shape.n_layers, spec.context,
                         spec.ratio, bench.view)


def measure_row(bench: Bench, spec: RowSpec) -> dict:
    """Fit the largest batch for ``spec``, build and time it (stepping down on OOM); the result row."""
    shape, n, dev = bench.shape, spec.context, bench.dev
    seed = n * 1000 + round(spec.ratio * 100)
    if spec.path == "fast":
        lengths = lengths_for(bench, spec)
        horizon = bench.fast_cfg.warmup_steps + bench.steps + 1
        per_seq = static_bytes_per_seq(shape, lengths, horizon, bench.fast_cfg.block)

        def run(b: int) -> Timing:
            return run_fast(bench.model, shape, n, lengths, b, bench.steps, bench.fast_cfg, seed)
    else:
        lengths = [n] * shape.n_layers
        per_seq = shape.n_layers * (n + bench.hf_warm + bench.hf_steps) * shape.token_bytes

        def run(b: int) -> Timing:
            return run_hf(bench.model, shape, n, b, bench.hf_steps, bench.hf_warm, seed)

    kv_per_seq = sum(lengths) * shape.token_bytes  # what one step reads of one sequence's context
    release(dev)
    base = held(dev)  # CUDA: what the allocator holds with no row alive (weights); CPU: the parameters
    if base is None:
        base = sum(p.numel() * p.element_size() for p in bench.model.parameters())
    analytic, _ = largest_batch(bench.limit, base, per_seq, 0, 0, bench.max_batch)
    probes: list[tuple[int, int]] = []
    if bench.probe and analytic >= 1:
        for b in probe_batches(analytic):
            t = attempt(run, b, dev)
            if t is None:
                break
            probes.append((b, t.peak_reserved))
            bench.say(f"    probe B={b}: peak reserved {t.peak_reserved / GIB:.2f} GiB")
        if not probes:  # even one sequence does not fit
            analytic = 0
    a, c = reserve_model(base, per_seq, probes)
    fitted, capped = largest_batch(bench.limit, base, per_seq, a, c, bench.max_batch) if analytic else (0, False)
    row = {**asdict(spec), "batch_fitted": fitted, "capped": capped, "per_seq_bytes": per_seq,
           "kv_bytes_per_seq": kv_per_seq, "base_bytes": base, "reserve_fixed_bytes": a,
           "reserve_per_seq_bytes": c, "probes": [list(p) for p in probes],
           "layer_tokens_min": min(lengths), "layer_tokens_max": max(lengths), "oom_retries": 0}
    bench.say(f"    fit: per sequence {per_seq / 2**20:.1f} MiB + reserve {c / 2**20:.2f} MiB, fixed "
              f"{a / 2**20:.0f} MiB -> B={fitted}{' (capped)' if capped else ''}")
    batch, timing = fitted, None
    while batch >= 1:
        timing = attempt(run, batch, dev)
        if timing is not None:
            break
        row["oom_retries"] += 1
        bench.say(f"    out of memory at B={batch}; stepping down")
        batch = min(batch - 1, int(batch * 0.9))
    if timing is None:
        row.update(batch=0, error="does not fit: not even one sequence within the memory limit" if fitted == 0
                   else f"out of memory down to B=1 ({row['oom_retries']} tries)")
        return row
    bound_s = (bench.weights_read + batch * kv_per_seq) / bench.bandwidth
    tps = batch * 1000 / timing.ms_per_step
    row.update(batch=batch, kv_bytes=batch * kv_per_seq, cache_bytes=timing.cache_bytes,
               peak_allocated_bytes=timing.peak_allocated, peak_reserved_bytes=timing.peak_reserved,
               ms_per_step=round(timing.ms_per_step, 3), tokens_per_s=round(tps, 1),
               bound_ms_per_step=round(1000 * bound_s, 3), bound_tokens_per_s=round(batch / bound_s, 1),
               fraction_of_bound=float(f"{tps * bound_s / batch:.4g}"))
    return row


def attempt(run, batch: int, dev: torch.device) -> Timing | None:
    """``run(batch)``, or None after an out-of-memory error (its tensors released before returning)."""
    try:
        return run(batch)
    except torch.OutOfMemoryError:
        pass
    release(dev)  # outside the except block: the traceback, and the tensors its frames hold, are gone
    return None


# ------------------------------------------------------------------------------------------ results
def add_speedups(rows: list[dict]) -> None:
    """tokens/s over the HF full-cache row of the same context (None where either is missing)."""
    hf = {r["context"]: r.get("tokens_per_s") for r in rows if r["path"] == "hf"}
    for r in rows:
        base, tps = hf.get(r["context"]), r.get("tokens_per_s")
        r["speedup_vs_hf"] = round(tps / base, 2) if base and tps else None


def csv_row(r: dict) -> dict:
    out = {k: r.get(k) for k in CSV_COLUMNS}
    out["kv_gib"] = round(r["kv_bytes"] / GIB, 3) if r.get("kv_bytes") is not None else None
    pa = r.get("peak_allocated_bytes")
    out["peak_gib"] = round(pa / GIB, 3) if pa is not None else None
    return out


def order(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["context"], r["path"] != "hf", r["ratio"], r["budgets"]))


def save(out: Path, meta: dict, rows: list[dict]) -> None:
    rows = order(rows)
    add_speedups(rows)
    write_results(out / RESULTS_JSON, meta, rows)
    with atomic_write(out / RESULTS_CSV, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(csv_row(r) for r in rows)


def fmt(x, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print("| context | ratio | budgets | path | batch | kv GiB | peak GiB | ms/step | tokens/s | bound tokens/s "
          "| of bound | vs HF |")
    print("|" + "---|" * 12)
    for r in order(rows):
        c = csv_row(r)
        print(f"| {r['context']} | {r['ratio']} | {r['budgets']} | {r['path']} | {r['batch']} | "
              f"{fmt(c['kv_gib'], '.2f')} | {fmt(c['peak_gib'], '.2f')} | {fmt(r.get('ms_per_step'), '.2f')} | "
              f"{fmt(r.get('tokens_per_s'), '.0f')} | {fmt(r.get('bound_tokens_per_s'), '.0f')} | "
              f"{fmt(r.get('fraction_of_bound'), '.2f')} | {fmt(r.get('speedup_vs_hf'), '.2f')} |")


def load_previous(out: Path, settings: dict) -> tuple[list[dict], dict | None]:
    """Rows (and meta) of an earlier run into ``out``; BenchError if unreadable or made with other settings."""
    import json

    path = out / RESULTS_JSON
    if not path.exists():
        return [], None
    try:
        data = json.loads(path.read_text())
        rows, meta = list(data["rows"]), dict(data["meta"])
        for r in rows:
            row_key(r)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{path} is not a results file of this benchmark ({type(exc).__name__}); "
                         "use another --out") from None
    old = meta.get("settings", {})
    diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise BenchError(f"{path} was made with other settings ({'; '.join(diff)}); use another --out to keep both")
    return rows, meta


# ------------------------------------------------------------------------------------------ command line
def parse_kernel(text: str | None, attention: str):
    """``--kernel`` JSON as a :class:`~depthkv.engine.decode_kernel.KernelConfig` (None when not given)."""
    import json

    from depthkv.engine.decode_kernel import KernelConfig

    if text is None:
        return None
    if attention in ("split", "sdpa"):
        raise BenchError(f"--kernel configures the Triton attention kernel; --attention {attention} does not use it")
    try:
        return KernelConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise BenchError(f"--kernel: not JSON ({exc.msg}): {text!r}") from None
    except ValueError as exc:
        raise BenchError(f"--kernel: {exc}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.1-8b",
                    help=f"random:SHAPE ({', '.join(SHAPES)}) or a depthkv model name (Llama/Qwen2 family)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--ratios", default="0,0.6,0.8,0.9", help="pruning ratios; 0 = full cache on the fast path")
    ap.add_argument("--budgets", default="uniform", help=f"per-layer budget vectors: {', '.join(BUDGET_KINDS)}")
    ap.add_argument("--steps", type=int, default=32, help="fast path: decode steps timed (graph replays)")
    ap.add_argument("--hf-steps", type=int, default=None, help="HF generate: new tokens timed (default --steps)")
    ap.add_argument("--attention", default="auto", help="fast-path attention: auto|triton|split|sdpa")
    ap.add_argument("--kernel", default=None,
                    help='Triton attention kernel config as JSON, e.g. \'{"block_n":128,"num_warps":8,"num_stages":3}\' '
                         "(fields left out keep their defaults; benchmarks/decode_kernel_sweep.py writes the best)")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="memory to fit into (default: the device's total memory as torch reports it)")
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth of the bound, GB/s")
    ap.add_argument("--out", type=Path, required=True, help="folder for throughput.json and throughput.csv")
    return ap


@dataclass(frozen=True)
class Args:
    contexts: list[int]
    ratios: list[float]
    budgets: list[str]
    device: torch.device
    limit: int
    hf_steps: int


def check_args(a: argparse.Namespace) -> Args:
    contexts = parse_list(a.contexts, int, "--contexts", BenchError)
    ratios = parse_list(a.ratios, float, "--ratios", BenchError)
    budgets = [b.strip() for b in a.budgets.split(",") if b.strip()]
    if any(n < 1 for n in contexts):
        raise BenchError(f"--contexts must be positive, got {contexts}")
    if any(not 0.0 <= r < 1.0 for r in ratios):
        raise BenchError(f"--ratios must lie in [0, 1), got {ratios}")
    bad = [b for b in budgets if b not in BUDGET_KINDS]
    if bad or not budgets:
        raise BenchError(f"--budgets: unknown {bad or budgets}; choose from {', '.join(BUDGET_KINDS)}")
    if a.steps < 1 or (a.hf_steps is not None and a.hf_steps < 1) or a.max_batch < 1:
        raise BenchError("--steps, --hf-steps and --max-batch must be >= 1")
    if a.bandwidth_gbs <= 0:
        raise BenchError("--bandwidth-gbs must be > 0")
    if a.model.startswith("random:") and a.model.split(":", 1)[1] not in SHAPES:
        raise BenchError(f"--model {a.model}: unknown shape; known: {', '.join('random:' + s for s in SHAPES)}")
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device is available")
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    elif dev.type != "cpu":
        raise BenchError(f"--device must be cuda or cpu, got {a.device}")
    if a.memory_gib is None:
        if dev.type != "cuda":
            raise BenchError("--memory-gib is required on CPU (torch reports no memory size there)")
        limit = torch.cuda.get_device_properties(dev).total_memory
    elif a.memory_gib <= 0:
        raise BenchError("--memory-gib must be > 0")
    else:
        limit = int(a.memory_gib * GIB)
    if "depthkv" in budgets and not DEFAULT_PROFILE.exists():
        raise BenchError(f"--budgets depthkv needs the calibration profile {DEFAULT_PROFILE}")
    return Args(contexts, ratios, budgets, dev, limit, a.hf_steps or a.steps)


def plan(args: Args) -> list[RowSpec]:
    specs = []
    for n in args.contexts:
        specs.append(RowSpec(n, 0.0, "full", "hf"))
        for r in args.ratios:
            specs += [RowSpec(n, 0.0, "full", "fast")] if r == 0 else [RowSpec(n, r, b, "fast") for b in args.budgets]
    return specs


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())


def main(argv: list[str] | None = None) -> int:
    from depthkv.engine.decode_kernel import default_config, get_default_config
    from depthkv.engine.static import FastConfig, FastDecodeError, check_model

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    a = ap.parse_args(argv)
    try:
        args = check_args(a)
        fast_cfg = FastConfig(attention=a.attention)
        kernel = parse_kernel(a.kernel, a.attention)
        settings = {"model": a.model, "dtype": a.dtype, "device_name": device_name(args.device),
                    "memory_limit_bytes": args.limit, "max_batch": a.max_batch, "steps": a.steps,
                    "hf_steps": args.hf_steps, "attention": a.attention, "block": fast_cfg.block,
                    "bandwidth_gbs": a.bandwidth_gbs, "kernel": kernel.to_dict() if kernel else None}
        rows, meta_old = load_previous(a.out, settings)
    except (BenchError, FastDecodeError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    done = {row_key(r) for r in rows}
    todo = [s for s in plan(args) if s.key not in done]
    for s in plan(args):
        if s.key in done:
            print(f"skip (in results): N={s.context} ratio={s.ratio} {s.budgets} {s.path}", file=sys.stderr)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = command_line(__file__, argv)
    meta = {**(meta_old or {}), "settings": settings, "date": now, "command": command, **versions(),
            "runs": [*(meta_old or {}).get("runs", []), {"date": now, "command": command}],
            "bandwidth_gbs": a.bandwidth_gbs, "kernel": (kernel or get_default_config()).to_dict(),
            "cache": "seeded random K/V of the per-layer budget shapes, built directly (no prefill)",
            "fast": f"StaticPrunedCache + FastDecoder ({a.attention} attention), {fast_cfg.warmup_steps} eager "
                    f"warm-up steps, then {a.steps} steps timed (CUDA-graph replays on CUDA, eager on CPU)",
            "hf": f"model.generate over a full DynamicCache, greedy, 2 warm-up tokens, then {args.hf_steps} "
                  "tokens timed (min_new_tokens = max_new_tokens)",
            "bound": "(weights read + batch KV) / bandwidth_gbs; weights read exclude an untied input embedding",
            "fit": "largest B with base + B * (per_seq + reserve_per_seq) + reserve_fixed <= memory limit; "
                   "reserve fitted to the peak reserved memory of two small-batch runs (CUDA; 0 on CPU)"}
    if not todo:
        print("nothing to run: every row is in the results already", file=sys.stderr)
        if rows:
            print_table(rows)
        return 0
    try:
        model = build_model(a.model, str(args.device), getattr(torch, a.dtype))
        check_model(model)
        view = None
        if "depthkv" in args.budgets:
            view, note = depthkv_view(DEFAULT_PROFILE, model.config.num_hidden_layers)
            meta["depthkv_budgets"] = f"allocator optimal over {note}"
        bench = Bench(model=model, shape=Shape.of(model), dev=args.device, limit=args.limit,
                      weights_read=weights_read_bytes(model), max_batch=a.max_batch, steps=a.steps,
                      hf_steps=args.hf_steps, hf_warm=2, bandwidth=a.bandwidth_gbs * 1e9, fast_cfg=fast_cfg,
                      view=view, probe=args.device.type == "cuda")
        for s in todo:  # budgets first: an unreachable ratio fails before any timing
            if s.path == "fast":
                lengths_for(bench, s)
    except Exception as exc:  # one clear line for a model or budget the benchmark cannot use
        ap.exit(2, f"{ap.prog}: error: {type(exc).__name__}: {exc}\n")
    if args.device.type == "cuda":
        release(args.device)
        free, _ = torch.cuda.mem_get_info(args.device)
        usable = free + torch.cuda.memory_reserved(args.device)
        meta["memory_usable_bytes"] = usable  # what this process can get at most (driver context excluded)
        bench.limit = min(args.limit, usable)
    meta.update(memory_fit_bytes=bench.limit, device=str(args.device),
                weights_read_bytes=bench.weights_read,
                weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    bench.say(f"{a.model} on {settings['device_name']}: fitting into {bench.limit / GIB:.2f} GiB, "
              f"{len(todo)} rows to run")
    with default_config(kernel):  # the Triton attention of every fast row (a graph keeps it once captured)
        for i, s in enumerate(todo, 1):
            bench.say(f"[{i}/{len(todo)}] N={s.context} ratio={s.ratio} budgets={s.budgets} path={s.path}")
            t0 = time.perf_counter()
            row = measure_row(bench, s)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            save(a.out, meta, rows)
            bench.say(f"    B={row['batch']}: {fmt(row.get('ms_per_step'), '.2f')} ms/step, "
                      f"{fmt(row.get('tokens_per_s'), '.0f')} tokens/s ({fmt(row.get('fraction_of_bound'), '.2f')} "
                      f"of the bound), {row['seconds']} s")
    print_table(rows)
    print(f"wrote {a.out / RESULTS_JSON} and {a.out / RESULTS_CSV}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
