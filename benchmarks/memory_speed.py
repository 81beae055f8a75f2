"""KV memory, peak memory, prefill time and decode speed: full cache vs uniform vs DepthKV-style budgets.

Runs on CPU (real models by alias) or on a GPU (a random-initialised model built from a real config, e.g. the
Llama-3.1-8B shape, since real 8B weights cannot travel here). For every context length and configuration:
prefill (one-shot + post-prefill pruning, or chunked prefill with pruning after each chunk), then greedy
decoding of ``--decode`` tokens with plain HF ``generate``. Peak memory is the device's
``max_memory_allocated`` on GPU, the process's peak RSS growth on CPU (each configuration in a fresh
subprocess there).

    python benchmarks/memory_speed.py --model random:llama-3.1-8b --device cuda --contexts 8192,32768,131072 \
        --ratios 0.6,0.8 --out benchmarks/results/memory_speed_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SHAPES = {  # architecture fields of public configs (no weights): random-initialised stand-ins
    "llama-3.1-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def build_model(name: str, device: str, dtype):
    import torch
    import transformers

    if name.startswith("random:"):
        shape = dict(SHAPES[name.split(":", 1)[1]])
        shape.pop("arch")
        cfg = transformers.LlamaConfig(**shape)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        return model.eval()
    from depthkv.models import load_model

    return load_model(name, dtype=dtype).model.to(device)


def copy_bandwidth(device: str, gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy, counting read + write (the decode bound's rate)."""
    import torch

    n = int(gib * 1024**3) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize()
    rate = 2 * a.numel() * a.element_size() * repeats / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return rate


def budgets_for(method: str, n_layers: int, n: int, ratio: float):
    from depthkv.allocation import allocate

    if method == "full":
        return None
    # "depthkv" here: the pyramid-free stand-in needs no profile; real profiles only exist for the real models
    strategy = {"uniform": "uniform", "pyramid": "pyramid"}[method]
    return allocate(strategy, n_layers, n, ratio, min_tokens=20)


def measure(model, device: str, n: int, method: str, mode: str, ratio: float, chunk: int, decode: int,
            scorer: str = "snapkv") -> dict:
    import torch

    import depthkv
    from depthkv.engine import clone_cache, full_kv_bytes, kv_bytes
    from depthkv.engine.runner import forward_with_cache, generate_from_cache, new_cache

    cuda = device.startswith("cuda")
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(n)).to(device)
    prefix = ids[:, :n]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_kv = [0]
    sync()
    t0 = time.perf_counter()
    if method == "full":
        cache = new_cache(model)
        forward_with_cache(model, prefix, cache)
    else:
        b = budgets_for(method, n_layers, n, ratio)
        kw = dict(mode="chunked", chunk_size=chunk) if mode == "chunked" else {}
        with depthkv.press(model, scorer, budgets=b, **kw) as p:
            cache = p.compress(prefix).cache
            peak_kv[0] = p.session.peak_kv_bytes
    sync()
    prefill_s = time.perf_counter() - t0
    kept = kv_bytes(cache)
    prefill_peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
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
    row = {
        "context": n, "method": method, "mode": mode if method != "full" else "full", "ratio": ratio if method != "full" else 0.0,
        "kv_bytes_full": full_kv_bytes(model, n), "kv_bytes_kept": kept,
        # largest KV footprint during the prefill (post mode prunes each layer right after its attention, so
        # even there the full cache of all layers never coexists)
        "kv_bytes_peak_prefill": max(peak_kv[0], kept) if method != "full" else kept,
        "prefill_s": round(prefill_s, 3), "decode_tokens": steps,
        # the first generated token comes from feeding the last prompt token: every step is a 1-token forward
        "decode_ms_per_step": round(1000 * decode_s / max(1, steps), 2),
        "decode_tok_per_s": round(steps / decode_s, 2),
        "decode_ms_per_step_after_empty_cache": second, "scorer": scorer if method != "full" else None,
    }
    if cuda:
        row["device_peak_prefill_bytes"] = int(prefill_peak)
        row["device_peak_total_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        row["rss_growth_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
    del cache, out
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--ratios", default="0.4,0.6,0.8")
    ap.add_argument("--methods", default="uniform,pyramid")
    ap.add_argument("--modes", default="post,chunked")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--scorer", default="snapkv")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    dtype = getattr(torch, args.dtype)
    plan = []
    for n in (int(x) for x in args.contexts.split(",")):
        plan.append((n, "full", "full", 0.0))
        for r in (float(x) for x in args.ratios.split(",")):
            for method in args.methods.split(","):
                for mode in args.modes.split(","):
                    plan.append((n, method, mode, r))
    if args.one is not None:  # CPU: one configuration per process so that peak RSS is its own
        n, method, mode, r = plan[int(args.one)]
        model = build_model(args.model, args.device, dtype)
        print(json.dumps(measure(model, args.device, n, method, mode, r, args.chunk_size, args.decode, args.scorer)))
        return
    rows = []
    model = build_model(args.model, args.device, dtype) if args.device != "cpu" else None
    bandwidth = copy_bandwidth(args.device) if args.device.startswith("cuda") else None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else None
    for i, (n, method, mode, r) in enumerate(plan):
        if model is not None:
            try:
                row = measure(model, args.device, n, method, mode, r, args.chunk_size, args.decode, args.scorer)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"context": n, "method": method, "mode": mode, "ratio": r, "error": f"OOM: {exc}"[:200]}
                torch.cuda.empty_cache()
        else:
            res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", str(i)], capture_output=True,
                                 text=True)
            if res.returncode != 0:
                print(res.stderr[-1500:], file=sys.stderr)
                row = {"context": n, "method": method, "mode": mode, "ratio": r, "error": res.stderr[-300:]}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
        if bandwidth and "error" not in row:
            # bytes-read bound of one decode step: every weight and every kept KV byte read once
            bound_ms = 1000 * (weight_bytes + row["kv_bytes_kept"]) / bandwidth
            row["bound_ms"] = round(bound_ms, 2)
            best = row.get("decode_ms_per_step_after_empty_cache") or row["decode_ms_per_step"]
            row["ratio_to_bound"] = round(best / bound_ms, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"date": date.today().isoformat(), "model": args.model, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "dtype": args.dtype, "command": "python " + " ".join(sys.argv), "scorer": args.scorer,
            "copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes": weight_bytes,
            "data": "random token ids (seeded by context length)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
