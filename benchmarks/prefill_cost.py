"""Prefill time, peak memory and scoring overhead: full cache vs post-prefill vs chunked pruning.

Each configuration runs in its own subprocess so that the process's peak RSS (ru_maxrss) belongs to that
configuration alone; the model-load RSS is subtracted to isolate the prefill. KV bytes are measured on the
real cache tensors (peak over the prefill for chunked mode, by a hook after every chunk).

    python benchmarks/prefill_cost.py --models smollm2-135m,qwen2.5-coder-1.5b --lengths 2048,4096 \
        --out benchmarks/results/prefill_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import command_line, rss_mark, status_mb, write_results

CONFIGS = [  # (name, mode, scorer)
    ("full", "full", None),
    ("post-snapkv", "post", "snapkv"),
    ("post-h2o", "post", "h2o"),
    ("chunked-snapkv", "chunked", "snapkv"),
    ("chunked-h2o", "chunked", "h2o"),
]


def run_one(model_name: str, length: int, mode: str, scorer: str | None, ratio: float, chunk: int,
            dtype: str) -> dict:
    import torch

    import depthkv
    from depthkv.engine import full_kv_bytes, kv_bytes, layer_lengths
    from depthkv.engine.runner import forward_with_cache, new_cache
    from depthkv.models import load_model

    torch.manual_seed(0)
    lm = load_model(model_name, dtype=getattr(torch, dtype))
    model = lm.model
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 100, (1, length), generator=torch.Generator().manual_seed(0))
    forward_with_cache(model, ids[:, :64], new_cache(model))  # warm-up (allocator, kernels)
    mark = rss_mark()  # the model load's peak does not hide the prefill's
    timing = {"score_s": 0.0}
    peak_kv = [0]

    if scorer is not None:  # time spent inside the scorer, measured around every call
        from depthkv.scorers import get_scorer

        sc = get_scorer(scorer)
        inner = sc.score

        def timed(x):
            t = time.perf_counter()
            out = inner(x)
            timing["score_s"] += time.perf_counter() - t
            return out

        sc.score = timed
    t0 = time.perf_counter()
    if mode == "full":
        cache = new_cache(model)
        forward_with_cache(model, ids, cache)
    else:
        kw = dict(mode="chunked", chunk_size=chunk) if mode == "chunked" else {}
        with depthkv.press(model, sc, ratio=ratio, **kw) as p:
            comp = p.compress(ids)
            peak_kv[0] = p.session.peak_kv_bytes
        cache = comp.cache
    seconds = time.perf_counter() - t0
    kept = kv_bytes(cache)
    return {
        "model": model_name, "context": length, "mode": mode, "scorer": scorer, "ratio": ratio if scorer else 0.0,
        "chunk_size": chunk if mode == "chunked" else None, "dtype": dtype,
        "prefill_s": round(seconds, 3), "score_s": round(timing["score_s"], 3),
        "score_share": round(timing["score_s"] / seconds, 4) if scorer else 0.0,
        "kv_bytes_full": full_kv_bytes(model, length), "kv_bytes_kept": kept,
        "kv_bytes_peak": max(peak_kv[0], kept),
        "kv_share_kept": round(kept / full_kv_bytes(model, length), 4),
        "layer_lengths_min_max": [min(layer_lengths(cache)), max(layer_lengths(cache))],
        "rss_model_mb": round(mark[1], 1), "rss_peak_mb": round(status_mb("VmHWM"), 1),
        "rss_prefill_mb": round(status_mb("VmHWM") - mark[1], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_cost.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()
    if args.one:
        m, n, mode, scorer = args.one.split("|")
        print(json.dumps(run_one(m, int(n), mode, scorer or None, args.ratio, args.chunk_size, args.dtype)))
        return
    wanted = set(args.configs.split(","))
    rows = []
    for m in args.models.split(","):
        for n in (int(x) for x in args.lengths.split(",")):
            for name, mode, scorer in CONFIGS:
                if name not in wanted:
                    continue
                cmd = [sys.executable, __file__, "--one", f"{m}|{n}|{mode}|{scorer or ''}", "--ratio",
                       str(args.ratio), "--chunk-size", str(args.chunk_size), "--dtype", args.dtype]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"configuration {name} on {m} at {n} failed")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["config"] = name
                rows.append(row)
                print(f"{m:22s} {n:6d} {name:15s} prefill {row['prefill_s']:7.2f} s  scoring "
                      f"{100 * row['score_share']:5.1f} %  KV kept {row['kv_share_kept']:.3f}  "
                      f"KV peak {row['kv_bytes_peak'] or row['kv_bytes_kept']:>12,}  "
                      f"RSS +{row['rss_prefill_mb']:.0f} MB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "cores": __import__("os").cpu_count(), "command": command_line(__file__), "ratio": args.ratio,
            "chunk_size": args.chunk_size, "dtype": args.dtype, "data": "random token ids (seed 0)"}
    write_results(args.out, meta, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
