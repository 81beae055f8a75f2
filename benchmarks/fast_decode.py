"""Decode speed of the fixed-shape fast path vs plain HF decoding vs the bytes-read bound.

For every context length N and budget vector (full cache; uniform and DepthKV-like budgets at each ratio) a
pruned cache is built DIRECTLY from seeded random K/V tensors of the per-layer shapes [1, KVH, B_l, D] (prefill
is not what this measures, and a 128k one-shot prefill per configuration would cost minutes). Then:

* HF: ``generate_from_cache`` (plain ``generate`` over the pruned ``DynamicCache``), greedy, ``--hf-steps``
  tokens, called twice; the 2nd (warm) call is reported.
* fast: :class:`depthkv.engine.static.FastDecoder` for each ``--variants`` entry (``split``/``sdpa`` attention,
  ``+compile`` = torch.compile of the per-layer projections/norms/MLP), ms per step of CUDA-graph replays, and
  of the same step run eagerly (no graph), for comparison.
* bound: (weight bytes + kept KV bytes) / measured device copy bandwidth (read + write counted, as
  ``memory_speed.py``); every time also as a ratio to it, and speed-ups over the full cache against the
  speed-up the bound allows.
* ``--breakdown``: graphs of the attention kernels alone and of the weight matmuls (GEMVs) alone, per step.

DepthKV-like budgets: allocator ``optimal`` over the committed SmolLM2-135M calibration curves
(docs/results/profile_smollm2-135m.json, KL), linearly interpolated over relative depth to the model's layer
count: a stand-in for an uneven DepthKV vector (no 8B profile exists), not a calibration of this model.

    python benchmarks/fast_decode.py --model random:llama-3.1-8b --contexts 8192,32768,131072 \
        --ratios 0,0.6,0.8,0.9 --out benchmarks/results/fast_decode_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    DEFAULT_PROFILE,
    MIN_TOKENS,
    build_model,
    command_line,
    copy_bandwidth,
    depthkv_view,
    random_cache,
    write_results,
)

from depthkv.allocation import allocate
from depthkv.allocation.sensitivity import SensitivityView
from depthkv.engine.cache import clone_cache, kv_bytes
from depthkv.engine.runner import generate_from_cache
from depthkv.engine.static import FastConfig, FastDecoder, StaticPrunedCache


def budget_vector(kind: str, n_layers: int, n: int, ratio: float, view: SensitivityView | None) -> list[int]:
    if ratio == 0.0:
        return [n] * n_layers
    if kind == "uniform":
        return list(allocate("uniform", n_layers, n, ratio, min_tokens=MIN_TOKENS).tokens)
    return list(allocate("optimal", n_layers, n, ratio, sensitivity=view, min_tokens=MIN_TOKENS).tokens)


def sync():
    torch.cuda.synchronize()


def time_hf(model, cache, ids, steps: int) -> tuple[float, torch.Tensor]:
    """ms/step of plain HF greedy decoding over a copy of ``cache`` (2nd of two calls) and its tokens."""
    res = []
    out = None
    for _ in range(2):
        c = clone_cache(cache)
        sync()
        t = time.perf_counter()
        out = generate_from_cache(model, c, ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        sync()
        res.append(1000 * (time.perf_counter() - t) / steps)
        del c
    return res[1], out[0, ids.shape[1]:].cpu()


def graph_ms(fn, reps: int = 20) -> float:
    """ms per replay of ``fn`` captured as a CUDA graph (warm-up on a side stream first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    sync()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    sync()
    return a.elapsed_time(b) / reps


def time_fast(model, cache, ids, cfg: FastConfig, steps: int, eager_steps: int, breakdown: bool) -> dict:
    """ms/step of the fixed-shape step: graph replays and eager; optional attention/GEMV breakdown."""
    warm = cfg.warmup_steps
    total = warm + eager_steps + steps + 2
    sync()
    t0 = time.perf_counter()
    static = StaticPrunedCache(clone_cache(cache), horizon=total, block=cfg.block)
    dec = FastDecoder(model, static, replace(cfg, cuda_graph=True))
    sync()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec.run(ids[:, -1:], warm)  # real steps, eager on a side stream (compiles here when cfg.compile)
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(eager_steps):
        dec.step()
    sync()
    eager_ms = 1000 * (time.perf_counter() - t0) / max(1, eager_steps)
    dec.steps_done += eager_steps
    t0 = time.perf_counter()
    dec.capture()
    sync()
    capture_s = time.perf_counter() - t0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(steps):
        dec.graph.replay()
    b.record()
    sync()
    dec.steps_done += steps
    row = {"graph_ms_per_step": round(a.elapsed_time(b) / steps, 3), "eager_ms_per_step": round(eager_ms, 3),
           "build_s": round(build_s, 3), "warmup_s": round(warm_s, 2), "capture_s": round(capture_s, 3),
           "buffer_bytes": static.storage_bytes(), "tokens": dec.out[0, : warm + eager_steps + steps].cpu()}
    if breakdown:
        row.update(breakdown_ms(dec))
        row.update(kernel_profile(dec))
    del dec, static
    return row


def kernel_profile(dec: FastDecoder, top: int = 12) -> dict:
    """Kernels launched by one (eager) step and where their device time goes (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.step()
            sync()
        dec.steps_done += 1
        stats = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                n, t = stats.get(e.name, (0, 0.0))
                stats[e.name] = (n + 1, t + e.device_time)
    except Exception as exc:  # profiler unavailable: say so, keep the timings
        return {"kernel_profile_error": repr(exc)[:200]}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][1])
    return {"kernels_per_step": sum(n for n, _ in stats.values()),
            "kernel_time_ms": round(sum(t for _, t in stats.values()) / 1000, 3),
            "top_kernels": [[name[:90], n, round(t / 1000, 3)] for name, (n, t) in rows[:top]]}


def breakdown_ms(dec: FastDecoder) -> dict:
    """Per-step time of the attention kernels alone and of every weight matmul alone (CUDA graphs)."""
    c = dec.cache
    b, kvh, _, d = c.buffers(0)[0].shape
    q = torch.randn(b, kvh, dec.model.config.num_attention_heads // kvh, d, device=c.device, dtype=c.dtype)

    pos = c.open_slots()  # each layer's, row's and head's last valid slot at the current step

    def attn():
        for i in range(c.n_layers):
            dec.attend(q, *c.buffers(i), c.mask(i, pos[i]) if dec.masked else None, pos[i], dec.scale, c.block)

    hidden = dec.model.config.hidden_size
    x = torch.randn(b, 1, hidden, device=c.device, dtype=c.dtype)
    xi = torch.randn(b, 1, dec.model.config.intermediate_size, device=c.device, dtype=c.dtype)
    xo = torch.randn(b, 1, dec.model.config.num_attention_heads * d, device=c.device, dtype=c.dtype)

    def gemv():
        for pre, post in dec.layers:
            for w in (pre[2], pre[4], pre[6]):
                F.linear(x, w)
            F.linear(xo, post[0])
            F.linear(x, post[4])
            F.linear(x, post[6])
            F.linear(xi, post[8])
        dec.lm_head(x)

    return {"attention_only_ms": round(graph_ms(attn), 3), "matmuls_only_ms": round(graph_ms(gemv), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--ratios", default="0,0.6,0.8,0.9")
    ap.add_argument("--budgets", default="uniform,depthkv")
    ap.add_argument("--variants", default="triton+compile,split+compile,triton,split",
                    help="fast-path variants: attention (triton|split|sdpa), optional +compile")
    ap.add_argument("--steps", type=int, default=64, help="graph replays timed per configuration")
    ap.add_argument("--eager-steps", type=int, default=4)
    ap.add_argument("--hf-steps", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--breakdown", default="131072", help="contexts at which to time attention/GEMVs alone")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, "cuda", dtype)
    n_layers = model.config.num_hidden_layers
    bandwidth = copy_bandwidth("cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    embed_bytes = embed.numel() * embed.element_size()
    view = depthkv_view(DEFAULT_PROFILE, n_layers)[0] if "depthkv" in args.budgets else None
    variants = args.variants.split(",")
    breakdown_at = {int(x) for x in args.breakdown.split(",") if x}
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write), weights {weight_bytes / 1e9:.2f} GB; "
          "pruned caches are built directly from random K/V of the per-layer shapes (no prefill)", flush=True)
    rows = []
    for n in (int(x) for x in args.contexts.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(n))
        ids = ids.to("cuda")
        plan = [("full", 0.0)] + [(k, float(r)) for r in args.ratios.split(",") if float(r) > 0
                                  for k in args.budgets.split(",")]
        for kind, ratio in plan:
            lengths = budget_vector(kind, n_layers, n, ratio, view)
            cache = random_cache(model, n, lengths, seed=n)
            kept = kv_bytes(cache)
            bound = 1000 * (weight_bytes + kept) / bandwidth
            row = {"context": n, "budgets": kind, "ratio": ratio, "kv_bytes_kept": kept,
                   "layer_tokens_min": min(lengths), "layer_tokens_max": max(lengths),
                   "bound_ms": round(bound, 3),
                   "bound_ms_without_embedding": round(1000 * (weight_bytes - embed_bytes + kept) / bandwidth, 3)}
            hf_tokens = None
            if not args.no_hf:
                try:
                    ms, hf_tokens = time_hf(model, cache, ids, args.hf_steps)
                    row.update(hf_ms_per_step=round(ms, 3), hf_ratio_to_bound=round(ms / bound, 2))
                except torch.cuda.OutOfMemoryError as exc:
                    row["hf_error"] = f"OOM: {exc}"[:200]
                gc.collect()
                torch.cuda.empty_cache()
            for var in variants:
                att, _, comp = var.partition("+")
                cfg = FastConfig(attention=att, compile=comp == "compile")
                try:
                    r = time_fast(model, cache, ids, cfg, args.steps, args.eager_steps, n in breakdown_at)
                except Exception as exc:  # an OOM or a failed compile is a result too; keep going
                    row[var] = {"error": repr(exc)[:300]}
                    continue
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
                toks = r.pop("tokens")
                if hf_tokens is not None:
                    k = min(len(toks), len(hf_tokens))
                    same = (toks[:k] == hf_tokens[:k]).long()
                    r["tokens_equal_to_hf_prefix"] = int(same.cumprod(0).sum())
                    r["tokens_compared"] = k
                r["ratio_to_bound"] = round(r["graph_ms_per_step"] / bound, 2)
                r["tokens_per_s"] = round(1000 / r["graph_ms_per_step"], 1)
                row[var] = r
            del cache
            gc.collect()
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    add_speedups(rows, variants)
    meta = {"date": date.today().isoformat(), "model": args.model, "device_name": torch.cuda.get_device_name(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__, "dtype": args.dtype,
            "command": command_line(__file__), "copy_bandwidth_bytes_per_s": bandwidth,
            "weight_bytes": weight_bytes, "embedding_bytes": embed_bytes,
            "cache": "random K/V tensors of the per-layer budget shapes, built directly (no prefill)",
            "depthkv_budgets": "optimal allocator over SmolLM2-135M KL curves interpolated to this depth",
            "hf": f"generate_from_cache, greedy, {args.hf_steps} tokens, 2nd of two calls",
            "fast": f"{args.steps} CUDA-graph replays after {FastConfig().warmup_steps} warm-up + "
                    f"{args.eager_steps} eager steps"}
    write_results(args.out, meta, rows)
    print_table(rows, variants)
    print(f"wrote {args.out}")


def add_speedups(rows: list[dict], variants: list[str]) -> None:
    """Speed-up over the full cache of the same context, measured vs allowed by the bound."""
    full = {r["context"]: r for r in rows if r["budgets"] == "full"}
    for r in rows:
        f = full.get(r["context"])
        if f is None:
            continue
        r["bound_speedup"] = round(f["bound_ms"] / r["bound_ms"], 3)
        for var in variants:
            if "graph_ms_per_step" in r.get(var, {}) and "graph_ms_per_step" in f.get(var, {}):
                s = f[var]["graph_ms_per_step"] / r[var]["graph_ms_per_step"]
                r[var]["speedup_over_full"] = round(s, 3)
                r[var]["speedup_share_of_bound"] = round(s / r["bound_speedup"], 3)
        if "hf_ms_per_step" in r and "hf_ms_per_step" in f:
            r["hf_speedup_over_full"] = round(f["hf_ms_per_step"] / r["hf_ms_per_step"], 3)


def print_table(rows: list[dict], variants: list[str]) -> None:
    head = "| N | budgets | ratio | KV kept GiB | bound ms | HF ms (x bound) |"
    head += "".join(f" {v} ms (x bound) | {v} tok/s | {v} speed-up / allowed |" for v in variants)
    print(head)
    for r in rows:
        line = (f"| {r['context']} | {r['budgets']} | {r['ratio']} | {r['kv_bytes_kept'] / 2**30:.2f} | "
                f"{r['bound_ms']:.2f} | {r.get('hf_ms_per_step', '-')} ({r.get('hf_ratio_to_bound', '-')}) |")
        for v in variants:
            x = r.get(v, {})
            if "graph_ms_per_step" not in x:
                line += " - | - | - |"
                continue
            line += (f" {x['graph_ms_per_step']:.2f} ({x['ratio_to_bound']}) | {x['tokens_per_s']} | "
                     f"{x.get('speedup_over_full', '-')} / {r.get('bound_speedup', '-')} |")
        print(line)


if __name__ == "__main__":
    main()
