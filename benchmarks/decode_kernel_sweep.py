"""Tune the split-KV decode kernel: time a grid of KernelConfigs on decode-step attention shapes, pick the best.

The fast decode path's attention (``depthkv.engine.decode_kernel``) is bound by reading each layer's kept K/V
once per step. How fast it streams them depends on the key tile (``block_n``), warps per program, the
software-pipelining depth of the key loop (``num_stages``) and the number of splits per (row, KV head)
(``target_programs`` -> ``KernelConfig.split``). This script measures them on the shapes one decode step
really has and reports which config is fastest, per shape and over all shapes together.

Shapes (``--shapes BxC,...``): batch B and kept tokens C of one layer's buffer, for one model shape
(``--kv-heads``, ``--group`` query heads per KV head, ``--head-dim``, ``--dtype``; default Llama-3.1-8B in
bf16). The buffer is C rounded up to ``--block`` slots (as the fast path allocates it) and every (row, KV head)
holds C valid tokens, or, with ``--ragged``, a seeded random count in [C/2, C]. Defaults: 32k context at
pruning ratio 0.8 with the largest batch that fits an H200 (151 x 6554), 128k at 0.8 (38 x 26214) and 0.9
(75 x 13107), one 128k sequence at 0.8 (1 x 26214), and a large batch of short buffers (512 x 1638).

Grid, in two stages so that it stays within ``--time-budget-s`` (~3 minutes on an H200):
1. every tile (block_n x num_warps x num_stages) with the default split rule, less two kinds unlikely to win
   (block_n 32 with 8 warps: 256 threads for a 16 x 32 score tile; block_n 128 with 2 warps: ptxas spills
   registers at head_dim 128); a tile that fails (e.g. over the shared-memory limit) is recorded, not chosen;
2. the ``--top`` fastest tiles (sum of times over the shapes) with every other ``--target-programs`` and
   ``--max-split`` value.
Configs are run one after another over all shapes, so a budget that runs out leaves whole configs out.

Each (config, shape): one call checked against the default config's output (max abs difference; a config off
by more than ``--tolerance`` times the output's scale is marked wrong and never chosen), then the call captured
in a CUDA graph and replayed (``triton.testing.do_bench_cudagraph``, median; the fast path replays graphs too).
Bytes: K + V of the valid prefixes + the query and output; GB/s and the fraction of ``--bandwidth-gbs``.

Results: ``OUT/decode_kernel_sweep.json`` (meta + one row per (config, shape)), ``OUT/decode_kernel_sweep.csv``,
``OUT/best_kernel.json`` (the best config over all shapes, by the sum of times) and that config printed as one
JSON line, for ``benchmarks/throughput.py --kernel``:

    python benchmarks/decode_kernel_sweep.py --out benchmarks/results/decode_kernel_h200
    python benchmarks/throughput.py --contexts 32768 --ratios 0,0.8 \
        --kernel "$(cat benchmarks/results/decode_kernel_h200/best_kernel.json)" --out ...

On CPU (``--device cpu``, only with ``TRITON_INTERPRET=1``) the same plumbing runs the kernel in the Triton
interpreter and times it with the wall clock: a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from _common import command_line, parse_list, parse_pairs, versions, write_results

from depthkv.io import atomic_write, write_json

RESULTS_JSON = "decode_kernel_sweep.json"
RESULTS_CSV = "decode_kernel_sweep.csv"
BEST_JSON = "best_kernel.json"
DEFAULT_SHAPES = "151x6554,38x26214,75x13107,1x26214,512x1638"
CSV_COLUMNS = ("stage", "config", "shape", "batch", "slots", "n_split", "chunk", "programs", "us", "gbs",
               "fraction_of_bandwidth", "speedup_vs_default", "max_abs_diff", "ok", "error")
TRUTHY = ("1", "true", "on", "yes")


class SweepError(Exception):
    """Bad input: reported as one line, exit code 2."""


@dataclass(frozen=True)
class Shape:
    batch: int
    tokens: int  # valid tokens per (row, KV head) (the most, with --ragged)

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.tokens}"


def config_label(cfg) -> str:
    return (f"bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} t{cfg.target_programs} m{cfg.max_split} "
            f"c{cfg.min_chunk}")


def prunable(block_n: int, num_warps: int) -> bool:
    """Tiles unlikely to win (see the module docstring): too many warps for a small tile, too few for a big one."""
    return (block_n <= 32 and num_warps >= 8) or (block_n >= 128 and num_warps <= 2)


def tile_grid(base, block_ns: list[int], warps: list[int], stages: list[int]) -> list:
    """Stage 1: every (block_n, num_warps, num_stages) not pruned, with ``base``'s split rule; ``base`` first."""
    out = [base]
    for bn, w, s in itertools.product(block_ns, warps, stages):
        cfg = replace(base, block_n=bn, num_warps=w, num_stages=s)
        if not prunable(bn, w) and cfg not in out:
            out.append(cfg)
    return out


def split_grid(tiles: list, targets: list[int], max_splits: list[int], seen: set) -> list:
    """Stage 2: each of ``tiles`` with every (target_programs, max_split) not in ``seen``."""
    out = []
    for cfg, t, m in itertools.product(tiles, targets, max_splits):
        new = replace(cfg, target_programs=t, max_split=m)
        if new not in seen and new not in out:
            out.append(new)
    return out


# ------------------------------------------------------------------------------------------ one shape's data
@dataclass
class Problem:
    shape: Shape
    q: object
    k: object
    v: object
    pos: object
    scale: float
    bytes: int  # K + V of the valid prefixes, the query and the output
    baseline: object = None  # the default config's output
    baseline_ms: float | None = None
    ref_error: float | None = None  # the default config's max abs difference from a float32 reference


def make_problem(shape: Shape, a: argparse.Namespace, dtype, device, seed: int) -> Problem:
    import torch

    slots = math.ceil(shape.tokens / a.block) * a.block
    gen = torch.Generator(device=device).manual_seed(seed)
    b, kvh, g, d = shape.batch, a.kv_heads, a.group, a.head_dim
    q = torch.randn(b, kvh, g, d, generator=gen, device=device, dtype=dtype)
    k = torch.randn(b, kvh, slots, d, generator=gen, device=device, dtype=dtype)
    v = torch.randn(b, kvh, slots, d, generator=gen, device=device, dtype=dtype)
    if a.ragged:
        lo = max(1, shape.tokens // 2)
        valid = torch.randint(lo, shape.tokens + 1, (b, kvh), generator=gen, device=device)
    else:
        valid = torch.full((b, kvh), shape.tokens, device=device)
    elem = q.element_size()
    nbytes = int(valid.sum()) * 2 * d * elem + 2 * q.numel() * elem
    return Problem(shape, q, k, v, valid - 1, 1 / math.sqrt(d), nbytes)


def reference_error(p: Problem, out, rows: int = 2) -> float:
    """Max abs difference of ``out`` from float32 softmax attention on the first ``rows`` rows."""
    import torch

    n = min(rows, p.shape.batch)
    q, k, v = p.q[:n].float(), p.k[:n].float(), p.v[:n].float()
    s = torch.einsum("bhgd,bhcd->bhgc", q, k) * p.scale
    valid = torch.arange(k.shape[2], device=k.device)[None, None, :] <= p.pos[:n, :, None]
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    ref = torch.einsum("bhgc,bhcd->bhgd", s.softmax(-1), v)
    return float((out[:n].float() - ref).abs().max())


def timer(device, a: argparse.Namespace):
    """ms per call of a function: CUDA-graph replays on CUDA, the wall clock over ``--cpu-reps`` calls on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        return lambda fn: float(do_bench_cudagraph(fn, rep=a.rep_ms, return_mode="median"))

    def wall(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(a.cpu_reps):
            fn()
        return 1000 * (time.perf_counter() - t) / a.cpu_reps

    return wall


def measure(cfg, p: Problem, time_fn, a: argparse.Namespace, stage: int) -> dict:
    """One (config, shape) row: output check against the default config's output, then timing."""
    from depthkv.engine.decode_kernel import decode_attention

    b, kvh, slots = p.k.shape[:3]
    n_split, chunk = cfg.split(b, kvh, slots)
    row = {"stage": stage, "config": config_label(cfg), **cfg.to_dict(), "shape": p.shape.label,
           "batch": p.shape.batch, "tokens": p.shape.tokens, "slots": slots, "n_split": n_split, "chunk": chunk,
           "programs": b * kvh * n_split, "bytes": p.bytes}

    def call():
        return decode_attention(p.q, p.k, p.v, p.pos, p.scale, cfg)

    try:
        out = call()
        diff = float((out.float() - p.baseline.float()).abs().max())
        del out
        ms = time_fn(call)
    except Exception as exc:  # a tile over the shared-memory limit, a compile failure: recorded, not chosen
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        return {**row, "ok": False, "error": msg[:300]}
    scale = float(p.baseline.float().abs().max())
    gbs = p.bytes / (ms * 1e-3) / 1e9
    row.update(max_abs_diff=diff, ok=diff <= a.tolerance * max(scale, 1e-6), error=None,
               ms=ms, us=round(1000 * ms, 2), gbs=round(gbs, 1),
               fraction_of_bandwidth=round(gbs / a.bandwidth_gbs, 4),
               speedup_vs_default=round(p.baseline_ms / ms, 3) if p.baseline_ms else None)
    if not row["ok"]:
        row["error"] = f"output differs from the default config's by {diff:.3g} (output scale {scale:.3g})"
    return row


# ------------------------------------------------------------------------------------------ summaries
def best_per_shape(rows: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for r in rows:
        if r["ok"] and (r["shape"] not in best or r["ms"] < best[r["shape"]]["ms"]):
            best[r["shape"]] = r
    return best


def totals(rows: list[dict], shapes: list[str]) -> list[tuple[float, str]]:
    """(sum of ms over all shapes, config label) of the configs that ran correctly on every shape, fastest first."""
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["ok"]:
            by.setdefault(r["config"], {})[r["shape"]] = r["ms"]
    return sorted((sum(t.values()), c) for c, t in by.items() if set(t) == set(shapes))


def fmt(x, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], shapes: list[str], default_label: str, top: int) -> None:
    """Per shape: the ``top`` fastest configs and the default, as a markdown table."""
    print("| shape | config | splits x chunk | us | GB/s | of bandwidth | vs default | max abs diff |")
    print("|" + "---|" * 8)
    for s in shapes:
        mine = sorted((r for r in rows if r["shape"] == s and r["ok"]), key=lambda r: r["ms"])
        show = mine[:top] + [r for r in mine[top:] if r["config"] == default_label]
        for r in show:
            tag = " (default)" if r["config"] == default_label else ""
            print(f"| {s} | {r['config']}{tag} | {r['n_split']} x {r['chunk']} | {r['us']:.1f} | {r['gbs']:.0f} | "
                  f"{r['fraction_of_bandwidth']:.3f} | {fmt(r['speedup_vs_default'], '.3f')} | "
                  f"{r['max_abs_diff']:.2g} |")
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"not chosen: {r['config']} on {r['shape']}: {r['error']}")


def save(out: Path, meta: dict, rows: list[dict]) -> None:
    write_results(out / RESULTS_JSON, meta, rows)
    with atomic_write(out / RESULTS_CSV, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k) for k in CSV_COLUMNS} for r in rows)


# ------------------------------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="BATCHxTOKENS of one layer's buffer, comma-separated")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--block", type=int, default=256, help="buffer slots are rounded up to a multiple of this")
    ap.add_argument("--ragged", action="store_true", help="valid tokens per (row, KV head) seeded in [C/2, C]")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--num-warps", default="2,4,8")
    ap.add_argument("--num-stages", default="1,2,3,4")
    ap.add_argument("--target-programs", default="1024,2048,4096,8192")
    ap.add_argument("--max-split", default="48")
    ap.add_argument("--top", type=int, default=3, help="tiles of stage 1 carried into the split sweep")
    ap.add_argument("--rep-ms", type=int, default=20, help="CUDA: ms of graph replays per measurement")
    ap.add_argument("--cpu-reps", type=int, default=2, help="CPU (interpreter): timed calls per measurement")
    ap.add_argument("--time-budget-s", type=float, default=170.0,
                    help="start no new config after this many seconds (the sweep stays within a few minutes)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max abs difference from the default config's output, relative to the output's largest "
                         "magnitude (default 2e-2 for bf16/fp16, 1e-4 for fp32)")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="peak memory bandwidth (H200: 4800 GB/s)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N, or cpu with TRITON_INTERPRET=1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="folder for the results")
    return ap


def check_args(a: argparse.Namespace):
    """(shapes, grid lists, device, dtype) or SweepError; nothing is written before this passes."""
    import torch

    from depthkv.engine import decode_kernel

    shapes = [Shape(b, c) for b, c in parse_pairs(a.shapes, "--shapes", "BATCHxTOKENS", SweepError)]
    grid = {name: parse_list(getattr(a, name), int, "--" + name.replace("_", "-"), SweepError, positive=True)
            for name in ("block_n", "num_warps", "num_stages", "target_programs", "max_split")}
    for name, vals in grid.items():
        for v in vals:
            try:
                decode_kernel.KernelConfig(**{name: v})
            except ValueError as exc:
                raise SweepError(f"--{name.replace('_', '-')}: {exc}") from None
    if min(a.kv_heads, a.group, a.block, a.top, a.rep_ms, a.cpu_reps) < 1:
        raise SweepError("--kv-heads, --group, --block, --top, --rep-ms and --cpu-reps must be >= 1")
    if a.head_dim < 16 or a.head_dim & (a.head_dim - 1):
        raise SweepError(f"--head-dim must be a power of two >= 16, got {a.head_dim}")
    if a.bandwidth_gbs <= 0 or a.time_budget_s <= 0 or (a.tolerance is not None and a.tolerance <= 0):
        raise SweepError("--bandwidth-gbs, --time-budget-s and --tolerance must be > 0")
    if not decode_kernel.available():
        raise SweepError("the triton package is not installed")
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    interpret = os.environ.get("TRITON_INTERPRET", "").lower() in TRUTHY
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SweepError("--device cuda: no CUDA device is available")
        if interpret:
            raise SweepError("TRITON_INTERPRET is set: unset it to time the kernel on the GPU")
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    elif dev.type == "cpu":
        if not interpret:
            raise SweepError("--device cpu runs the kernel in the Triton interpreter: set TRITON_INTERPRET=1")
    else:
        raise SweepError(f"--device must be cuda or cpu, got {a.device}")
    dtype = getattr(torch, a.dtype)
    if a.tolerance is None:
        a.tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return shapes, grid, dev, dtype


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    a = ap.parse_args(argv)
    try:
        shapes, grid, dev, dtype = check_args(a)
    except SweepError as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    import torch
    import triton

    from depthkv.engine.decode_kernel import DEFAULT_CONFIG, decode_attention

    t0 = time.perf_counter()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(__file__, argv), **versions(),
            "triton": triton.__version__, "device": str(dev), "device_name": name,
            "timing": ("median ms of CUDA-graph replays (triton.testing.do_bench_cudagraph, rep "
                       f"{a.rep_ms} ms)" if dev.type == "cuda" else
                       f"wall clock over {a.cpu_reps} calls in the Triton interpreter (plumbing check only)"),
            "model_shape": {"kv_heads": a.kv_heads, "group": a.group, "head_dim": a.head_dim, "dtype": a.dtype},
            "buffer_block": a.block, "ragged": a.ragged, "bandwidth_gbs": a.bandwidth_gbs,
            "tolerance": a.tolerance, "bytes": "K + V of the valid prefixes + query + output",
            "default_config": DEFAULT_CONFIG.to_dict(), "grid": grid, "top": a.top}
    time_fn = timer(dev, a)
    problems = []
    for i, s in enumerate(shapes):  # every shape resident at once: configs run over all shapes in turn
        p = make_problem(s, a, dtype, dev, a.seed + i)
        p.baseline = decode_attention(p.q, p.k, p.v, p.pos, p.scale, DEFAULT_CONFIG)
        p.ref_error = reference_error(p, p.baseline)
        problems.append(p)
        say(f"shape {s.label}: buffer {p.k.shape[2]} slots, {p.bytes / 1e9:.2f} GB per call, default config "
            f"vs float32 reference (2 rows): max abs diff {p.ref_error:.2g}")
    meta["shapes"] = [{"shape": p.shape.label, "batch": p.shape.batch, "tokens": p.shape.tokens,
                       "slots": p.k.shape[2], "bytes": p.bytes, "default_vs_reference": p.ref_error}
                      for p in problems]
    labels = [s.label for s in shapes]
    rows: list[dict] = []
    truncated = False

    def run(configs: list, stage: int) -> None:
        nonlocal truncated
        for j, cfg in enumerate(configs, 1):
            if time.perf_counter() - t0 > a.time_budget_s:
                truncated = True
                say(f"time budget of {a.time_budget_s:.0f} s spent: stage {stage} stops at config {j}/{len(configs)}")
                return
            for p in problems:
                r = measure(cfg, p, time_fn, a, stage)
                if cfg == DEFAULT_CONFIG and r["ok"]:
                    p.baseline_ms = r["ms"]
                    r["speedup_vs_default"] = 1.0
                rows.append(r)
            mine = rows[-len(problems):]
            times = ", ".join(f"{r['shape']} {fmt(r.get('us'), '.0f')} us" for r in mine)
            bad = "; ".join(f"{r['shape']}: {r['error']}" for r in mine if not r["ok"])
            say(f"[stage {stage} {j}/{len(configs)}] {config_label(cfg)}: {times}{'  NOT OK ' + bad if bad else ''}")

    tiles = tile_grid(DEFAULT_CONFIG, grid["block_n"], grid["num_warps"], grid["num_stages"])
    say(f"stage 1: {len(tiles)} tiles x {len(problems)} shapes")
    run(tiles, 1)
    ranked = totals(rows, labels)
    by_label = {config_label(c): c for c in tiles}
    top = [by_label[c] for _, c in ranked[:a.top]]
    stage2 = split_grid(top, grid["target_programs"], grid["max_split"], set(tiles))
    say(f"stage 2: {len(stage2)} split settings of the {len(top)} fastest tiles x {len(problems)} shapes")
    run(stage2, 2)

    everything = {config_label(c): c for c in [*tiles, *stage2]}
    best = best_per_shape(rows)
    ranked = totals(rows, labels)
    meta.update(truncated=truncated, seconds=round(time.perf_counter() - t0, 1),
                best_per_shape={s: {"config": everything[r["config"]].to_dict(), "us": r["us"],
                                    "fraction_of_bandwidth": r["fraction_of_bandwidth"],
                                    "speedup_vs_default": r["speedup_vs_default"]} for s, r in best.items()})
    default_label = config_label(DEFAULT_CONFIG)
    if ranked:
        total, label = ranked[0]
        base_total = next((t for t, c in ranked if c == default_label), None)
        meta["best_overall"] = {"config": everything[label].to_dict(), "sum_ms": round(total, 4),
                                "default_sum_ms": round(base_total, 4) if base_total else None}
    a.out.mkdir(parents=True, exist_ok=True)
    save(a.out, meta, rows)
    print_table(rows, labels, default_label, top=5)
    for s in labels:
        r = best.get(s)
        print(f"best on {s}: " + (f"{r['config']} {r['us']:.1f} us, {r['fraction_of_bandwidth']:.3f} of "
                                   f"bandwidth, x{fmt(r['speedup_vs_default'], '.3f')} vs default" if r else
                                   "none ran correctly"))
    if not ranked:
        print("no config ran correctly on every shape", file=sys.stderr)
        return 1
    best_cfg = meta["best_overall"]
    write_json(a.out / BEST_JSON, best_cfg["config"], indent=None)
    print(f"best overall (sum over {len(labels)} shapes: {best_cfg['sum_ms']:.3f} ms, default "
          f"{fmt(best_cfg['default_sum_ms'], '.3f')} ms); pass it as throughput.py --kernel:")
    print(json.dumps(best_cfg["config"]))
    say(f"wrote {a.out / RESULTS_JSON}, {a.out / RESULTS_CSV} and {a.out / BEST_JSON} "
        f"in {meta['seconds']} s{' (time budget reached: grid truncated)' if truncated else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
