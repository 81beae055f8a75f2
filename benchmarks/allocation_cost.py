"""Cost of input-adaptive budget allocation: ``global``, ``adaptive`` and ``global+heads`` on long contexts.

An input-adaptive allocator reads the current input's per-layer token scores ([1, KV heads, N] per layer,
on the model's device) every time it is called: once per sample and ratio in ``depthkv eval``, once per
prefill under ``depthkv.press``. This script times exactly that call on seeded random scores shaped like a
real model's (softmax-like values, the 4 sink and 16 recent tokens scored +inf as the engine's protection
does), without any model:

* ``global``: ``BudgetSpec(ratio, "global").for_context(L, N, scores)``;
* ``adaptive``: the same with ``"adaptive"`` and a calibration profile (the committed SmolLM2 profile,
  interpolated over relative depth to L layers: a stand-in, the cost does not depend on its values);
* ``global+heads``: ``global`` plus the per-KV-head split of every layer's budget, all layers in one
  ``head_split_layers`` call as ``prune(..., head_budgets=True)`` makes it (a depthkv without it: one
  ``head_split`` per layer, as it pruned then).

Each row is the median over ``--repeats`` calls after one warm-up call; on CUDA the device is synchronised
before and after each call. Every row also records a short hash of the budgets it produced, and
``--baseline`` (a JSON file this script wrote earlier, e.g. with an older depthkv) adds its times and checks
that the budgets are identical.

    python benchmarks/allocation_cost.py --device cpu --threads 1 --out benchmarks/results/allocation_cost_cpu.json
    python benchmarks/allocation_cost.py --device cuda --lengths 4096,32768,131072 --out /tmp/after.json

Before/after against an older depthkv (the script only uses the public API, so it runs on either):

    git archive <old-commit> depthkv | tar -x -C /tmp/old_depthkv
    PYTHONPATH=/tmp/old_depthkv python benchmarks/allocation_cost.py --device cuda --out /tmp/before.json
    python benchmarks/allocation_cost.py --device cuda --baseline /tmp/before.json --out /tmp/after.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import (
    DEFAULT_PROFILE,
    MIN_TOKENS,
    ROOT,
    command_line,
    depthkv_view,
    parse_list,
    parse_pairs,
    versions,
    write_results,
)

STRATEGIES = ("global", "adaptive", "global+heads")
N_SINK, N_RECENT = 4, 16  # depthkv's default protected window


class UsageError(ValueError):
    """A bad command-line value: reported in one line, exit code 2."""


def make_scores(n_layers: int, kv_heads: int, n: int, device: str, dtype, seed: int = 0) -> list:
    """Per-layer scores [1, KVH, N]: softmax of Gaussian logits (sharper with depth), protected tokens +inf."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(n_layers):
        logits = torch.randn(1, kv_heads, n, generator=g) * (1.0 + 2.0 * layer / max(n_layers - 1, 1))
        s = torch.softmax(logits, dim=-1)
        s[..., :N_SINK] = float("inf")
        s[..., max(n - N_RECENT, 0):] = float("inf")
        out.append(s.to(device=device, dtype=dtype))
    return out


def budget_hash(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:12]


def one_call(strategy: str, spec_of, n_layers: int, n: int, scores) -> list:
    """One allocation as the engine runs it; returns what it decided (plain ints), for the hash."""
    import depthkv.allocation as allocation

    budgets = spec_of[strategy.split("+")[0]].for_context(n_layers, n, scores)
    if strategy != "global+heads":
        return list(budgets.tokens)
    floor = min(n, N_SINK + N_RECENT)
    if hasattr(allocation, "head_split_layers"):
        return [c.tolist() for c in allocation.head_split_layers(scores, budgets.tokens, floor)]
    return [allocation.head_split(s, b, floor).tolist() for s, b in zip(scores, budgets.tokens)]


def time_calls(fn, repeats: int, device: str) -> tuple[list[float], list]:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    result = fn()  # warm-up: kernels, allocator caches
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return times, result


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    import torch

    import depthkv
    from depthkv.allocation import BudgetSpec

    dtype = getattr(torch, args.dtype)
    rows = []
    for n_layers, kv_heads in args.shapes:
        view, view_note = depthkv_view(args.profile, n_layers)
        spec_of = {"global": BudgetSpec(args.ratio, "global", min_tokens=MIN_TOKENS),
                   "adaptive": BudgetSpec(args.ratio, "adaptive", view, min_tokens=MIN_TOKENS)}
        for n in args.lengths:
            scores = make_scores(n_layers, kv_heads, n, args.device, dtype)
            for strategy in args.strategies:
                call = functools.partial(one_call, strategy, spec_of, n_layers, n, scores)
                times, result = time_calls(call, args.repeats, args.device)
                rows.append({"n": n, "shape": f"{n_layers}x{kv_heads}", "layers": n_layers, "kv_heads": kv_heads,
                             "strategy": strategy, "ms": round(statistics.median(times), 3),
                             "ms_min": round(min(times), 3), "repeats": args.repeats,
                             "budgets_sha": budget_hash(result)})
                print(f"  {rows[-1]['shape']:>6} N={n:<7} {strategy:<13} {rows[-1]['ms']:10.2f} ms", flush=True)
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(__file__), "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
        else f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "dtype": args.dtype, "ratio": args.ratio,
        "min_tokens": MIN_TOKENS, "protected_window": [N_SINK, N_RECENT], "profile": view_note,
        "versions": versions(), "depthkv_source": str(Path(depthkv.__file__).parent),
    }
    return meta, rows


def load_baseline(path: Path) -> dict[tuple, dict]:
    """Rows of an earlier output of this script, by (N, shape, strategy)."""
    try:
        old = json.loads(path.read_text())["rows"]
        return {(r["n"], r["shape"], r["strategy"]): r for r in old}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--baseline {path}: not a results file of this script ({exc!r})") from None


def with_baseline(rows: list[dict], by_key: dict[tuple, dict]) -> list[dict]:
    """Add the baseline's ``ms_before``, the speed-up and ``same_budgets`` to every row it also measured."""
    for r in rows:
        b = by_key.get((r["n"], r["shape"], r["strategy"]))
        if b is not None:
            r["ms_before"] = b["ms"]
            r["speedup"] = round(b["ms"] / r["ms"], 2) if r["ms"] > 0 else None
            r["same_budgets"] = b["budgets_sha"] == r["budgets_sha"]
    return rows


def table(rows: list[dict]) -> str:
    before = any("ms_before" in r for r in rows)
    head = f"{'N':>7}  {'shape':>6}  {'strategy':<13}" + (f"{'before ms':>11}" if before else "") + f"{'ms':>10}"
    head += f"{'speedup':>9}  same budgets" if before else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['n']:>7}  {r['shape']:>6}  {r['strategy']:<13}"
        if before:
            line += f"{r['ms_before']:>11.2f}" if "ms_before" in r else f"{'-':>11}"
        line += f"{r['ms']:>10.2f}"
        if before and "ms_before" in r:
            line += f"{r['speedup']:>8.1f}x  {'yes' if r['same_budgets'] else 'NO'}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="where the scores live: cpu, cuda, cuda:1, ...")
    ap.add_argument("--lengths", default="1024,4096,8192,16384,32768", help="context lengths N")
    ap.add_argument("--shapes", default="28x2,32x8",
                    help="LAYERSxKV_HEADS: 28x2 = Qwen2.5-1.5B, 32x8 = Llama-3.1-8B")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--ratio", type=float, default=0.8, help="share of the KV pairs removed")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the scores")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="calibration profile for adaptive")
    ap.add_argument("--baseline", type=Path, help="an earlier output of this script: adds before/after columns")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "allocation_cost.json")
    args = ap.parse_args(argv)
    try:
        args.lengths = parse_list(args.lengths, int, "--lengths", UsageError, positive=True)
        args.shapes = parse_pairs(args.shapes, "--shapes", "LAYERSxKV_HEADS", UsageError)
        args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        bad = [s for s in args.strategies if s not in STRATEGIES]
        if bad or not args.strategies:
            raise UsageError(f"--strategies takes some of {', '.join(STRATEGIES)}, got {bad or 'nothing'}")
        if not 0.0 <= args.ratio < 1.0:
            raise UsageError(f"--ratio must lie in [0, 1), got {args.ratio}")
        if args.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        if not args.profile.is_file():
            raise UsageError(f"--profile {args.profile}: no such file")
        baseline = load_baseline(args.baseline) if args.baseline is not None else None
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here")
        torch.empty(0, device=args.device)  # an unknown device name fails here, before any work
        if args.threads is not None:
            torch.set_num_threads(args.threads)
    except UsageError as exc:
        print(f"allocation_cost: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"allocation_cost: --device {args.device}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    meta, rows = run(args)
    if baseline is not None:
        rows = with_baseline(rows, baseline)
        meta["baseline"] = str(args.baseline)
    print(table(rows))
    write_results(args.out, meta, rows)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
