"""KV memory, peak memory, prefill time and decode speed: full cache vs uniform vs DepthKV-style budgets.

Runs on CPU (real models by alias) or on a GPU (a random-initialised model built from a real config, e.g. the
Llama-3.1-8B shape, since real 8B weights cannot travel here). For every context length and configuration:
prefill (one-shot + post-prefill pruning, or chunked prefill with pruning after each chunk), then greedy
decoding of ``--decode`` tokens with plain HF ``generate`` (``--decode 0``: no decoding). Peak memory is the
device's ``max_memory_allocated`` on GPU. On CPU each configuration runs in a fresh subprocess: load the model,
warm up, reset the kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5, so the load's own peak does not hide
the prefill's), prefill + prune, then read ``VmHWM`` (peak resident set) from ``/proc/self/status``.
tracemalloc would not do: it sees only Python's allocator, not torch's tensor memory.

Methods: ``full``; ``uniform`` / ``pyramid`` (allocators that need no profile); ``depthkv``: the allocator
``--strategy`` (default ``optimal``) over the curves of the calibration profile ``--profile``. When the profile
was made for another layer count (the random Llama-3.1-8B shape has 32 layers, the committed SmolLM2 profile
30), each probe ratio's per-layer degradation is linearly interpolated over relative depth: a stand-in for an
uneven DepthKV allocation, not a calibration of that model.

    python benchmarks/memory_speed.py --model random:llama-3.1-8b --device cuda --contexts 8192,32768,131072 \
        --ratios 0.6,0.8 --out benchmarks/results/memory_speed_h200.json
    OMP_NUM_THREADS=1 python benchmarks/memory_speed.py --model smollm2-135m --contexts 2048,4096 \
        --methods uniform,depthkv --decode 0 --out benchmarks/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import (
    DEFAULT_PROFILE,
    MIN_TOKENS,
    build_model,
    command_line,
    copy_bandwidth,
    cpu_seconds,
    depthkv_view,
    random_ids,
    rss_fields,
    rss_mark,
    write_results,
)


def budgets_for(method: str, n_layers: int, n: int, ratio: float, view=None, strategy: str = "optimal"):
    from depthkv.allocation import allocate

    if method == "full":
        return None
    if method == "depthkv":
        return allocate(strategy, n_layers, n, ratio, sensitivity=view, min_tokens=MIN_TOKENS)
    return allocate({"uniform": "uniform", "pyramid": "pyramid"}[method], n_layers, n, ratio, min_tokens=MIN_TOKENS)


def warm_up(model, device: str, scorer: str, n: int = 512) -> None:
    """Kernels, allocator pools and the scorer's code paths, before anything is measured."""
    import torch

    import depthkv
    from depthkv.engine.runner import forward_with_cache, new_cache

    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1)).to(device)
    forward_with_cache(model, ids, new_cache(model))
    for kw in ({}, dict(mode="chunked", chunk_size=n // 2)):
        with depthkv.press(model, scorer, ratio=0.5, **kw) as p:
            p.compress(ids)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, device: str, n: int, method: str, mode: str, ratio: float, chunk: int, decode: int,
            scorer: str = "snapkv", view=None, strategy: str = "optimal") -> dict:
    import torch

    import depthkv
    from depthkv.engine import clone_cache, full_kv_bytes, kv_bytes
    from depthkv.engine.runner import forward_with_cache, generate_from_cache, new_cache

    cuda = device.startswith("cuda")
    n_layers = model.config.num_hidden_layers
    ids = random_ids(model, n, device)
    prefix = ids[:, :n]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    mark = None if cuda else rss_mark()
    peak_kv = [0]
    b = None
    sync()
    t0 = time.perf_counter()
    if method == "full":
        cache = new_cache(model)
        forward_with_cache(model, prefix, cache)
    else:
        b = budgets_for(method, n_layers, n, ratio, view, strategy)
        kw = dict(mode="chunked", chunk_size=chunk) if mode == "chunked" else {}
        with depthkv.press(model, scorer, budgets=b, **kw) as p:
            cache = p.compress(prefix).cache
            peak_kv[0] = p.session.peak_kv_bytes
    sync()
    prefill_s = time.perf_counter() - t0
    kept = kv_bytes(cache)
    prefill_peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
    rss = None if cuda else rss_fields(mark)
    row = {
        "context": n, "method": method, "mode": mode if method != "full" else "full",
        "ratio": ratio if method != "full" else 0.0,
        "kv_bytes_full": full_kv_bytes(model, n), "kv_bytes_kept": kept,
        # largest KV footprint during the prefill (post mode prunes each layer right after its attention, so
        # even there the full cache of all layers never coexists)
        "kv_bytes_peak_prefill": max(peak_kv[0], kept) if method != "full" else kept,
        "prefill_s": round(prefill_s, 3), "scorer": scorer if method != "full" else None,
        "strategy": (strategy if method == "depthkv" else method) if method != "full" else None,
        "budgets": list(b.tokens) if b is not None else None,
    }
    if cuda:
        row["device_peak_prefill_bytes"] = int(prefill_peak)
    else:
        # peak resident set during the prefill (mark reset after load + warm-up), its growth over the resident
        # set just before the prefill, and the resident set after it with the (pruned) cache still alive
        row.update(rss)
    if decode <= 0:
        if cuda:
            row["device_peak_total_bytes"] = int(torch.cuda.max_memory_allocated())
        del cache
        return row
    # decode: plain HF generate from the (pruned) cache, greedy, fixed token count; timed twice on copies of
    # the cache, the second time after releasing the allocator's cached blocks (to see allocator effects)
    spare = clone_cache(cache) if cuda else None
    sync()
    t1 = time.perf_counter()
    out = generate_from_cache(model, cache, ids, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
    sync()
    decode_s = time.perf_counter() - t1
    steps = out.shape[1] - ids.shape[1]
    second = None
    if cuda:
        del cache
        gc.collect()
        torch.cuda.empty_cache()
        sync()
        t2 = time.perf_counter()
        generate_from_cache(model, spare, ids, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
        sync()
        second = round(1000 * (time.perf_counter() - t2) / max(1, steps), 2)
        cache = spare
    row.update({
        "decode_tokens": steps,
        # the first generated token comes from feeding the last prompt token: every step is a 1-token forward
        "decode_ms_per_step": round(1000 * decode_s / max(1, steps), 2),
        "decode_tok_per_s": round(steps / decode_s, 2),
        "decode_ms_per_step_after_empty_cache": second,
    })
    if cuda:
        row["device_peak_total_bytes"] = int(torch.cuda.max_memory_allocated())
    del cache, out
    return row


def make_plan(contexts: str, ratios: str, methods: str, modes: str, skip: str = "") -> list[tuple]:
    """(context, method, mode, ratio) per configuration; ``skip``: ``method:ratio[:mode]`` items left out."""
    drop = {tuple(x.split(":")) for x in skip.split(",") if x}
    plan = []
    for n in (int(x) for x in contexts.split(",")):
        plan.append((n, "full", "full", 0.0))
        for r in (float(x) for x in ratios.split(",")):
            for method in methods.split(","):
                for mode in modes.split(","):
                    if (method, f"{r:g}") in drop or (method, f"{r:g}", mode) in drop:
                        continue
                    plan.append((n, method, mode, r))
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--ratios", default="0.4,0.6,0.8")
    ap.add_argument("--methods", default="uniform,pyramid", help="uniform, pyramid, depthkv (profile-based)")
    ap.add_argument("--modes", default="post,chunked")
    ap.add_argument("--skip", default="", help="configurations to leave out: method:ratio[:mode],...")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32, help="tokens to decode after the prefill; 0: none")
    ap.add_argument("--scorer", default="snapkv")
    ap.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="calibration profile for --methods depthkv")
    ap.add_argument("--strategy", default="optimal", help="allocator used by --methods depthkv")
    ap.add_argument("--append", action="store_true", help="add the rows to those already in --out")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    dtype = getattr(torch, args.dtype)
    plan = make_plan(args.contexts, args.ratios, args.methods, args.modes, args.skip)
    need_view = "depthkv" in args.methods.split(",")
    if args.one is not None:  # CPU: one configuration per process so that peak RSS is its own
        n, method, mode, r = plan[int(args.one)]
        model = build_model(args.model, args.device, dtype)
        view = depthkv_view(args.profile, model.config.num_hidden_layers)[0] if method == "depthkv" else None
        warm_up(model, args.device, args.scorer)
        c0, w0 = cpu_seconds(), time.perf_counter()
        row = measure(model, args.device, n, method, mode, r, args.chunk_size, args.decode, args.scorer, view,
                      args.strategy)
        row["process_cpu_s"] = round(cpu_seconds() - c0, 2)  # CPU time of the measured part (prefill [+ decode])
        row["process_wall_s"] = round(time.perf_counter() - w0, 2)
        print(json.dumps(row))
        return
    rows, commands = [], []
    if args.append and args.out.exists():
        old = json.loads(args.out.read_text())
        rows = old["rows"]
        commands = old["meta"].get("commands") or [old["meta"]["command"]]
    command = command_line(__file__)
    model = build_model(args.model, args.device, dtype) if args.device != "cpu" else None
    bandwidth = copy_bandwidth(args.device) if args.device.startswith("cuda") else None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else None
    view, view_note = (None, None)
    if need_view:
        from depthkv.models import load_model

        n_layers = (model.config if model is not None else load_model(args.model).model.config).num_hidden_layers
        view, view_note = depthkv_view(args.profile, n_layers)
    if model is not None:
        warm_up(model, args.device, args.scorer)
    meta = {"date": date.today().isoformat(), "model": args.model, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "dtype": args.dtype, "command": command, "commands": commands + [command], "scorer": args.scorer,
            "copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes": weight_bytes,
            "chunk_size": args.chunk_size, "min_tokens": MIN_TOKENS,
            "depthkv_budgets": view_note and f"allocator {args.strategy!r} over {view_note}",
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
            "data": "random token ids (seeded by context length)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, (n, method, mode, r) in enumerate(plan):
        if model is not None:
            try:
                row = measure(model, args.device, n, method, mode, r, args.chunk_size, args.decode, args.scorer,
                              view, args.strategy)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"context": n, "method": method, "mode": mode, "ratio": r, "error": f"OOM: {exc}"[:200]}
                torch.cuda.empty_cache()
            except Exception as exc:  # keep the other configurations of a long device run
                row = {"context": n, "method": method, "mode": mode, "ratio": r, "error": repr(exc)[:300]}
                gc.collect()
                torch.cuda.empty_cache()
        else:
            res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", str(i)], capture_output=True,
                                 text=True)
            if res.returncode != 0:
                print(res.stderr[-1500:], file=sys.stderr)
                row = {"context": n, "method": method, "mode": mode, "ratio": r, "error": res.stderr[-300:]}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["load_average_1min"] = round(os.getloadavg()[0], 2)
        if bandwidth and "error" not in row and "decode_ms_per_step" in row:
            # bytes-read bound of one decode step: every weight and every kept KV byte read once
            bound_ms = 1000 * (weight_bytes + row["kv_bytes_kept"]) / bandwidth
            row["bound_ms"] = round(bound_ms, 2)
            best = row.get("decode_ms_per_step_after_empty_cache") or row["decode_ms_per_step"]
            row["ratio_to_bound"] = round(best / bound_ms, 2)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "budgets"}), flush=True)
        # after every configuration, so that a run stopped at its time limit keeps what it measured
        write_results(args.out, meta, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
