"""HF-path decode cost against the number of distinct per-layer cache lengths, per SDPA backend choice.

``model.generate`` over a depthkv cache calls PyTorch's ``scaled_dot_product_attention`` once per layer and step;
with layer-dependent budgets every layer has its own key length, and every step makes each length one longer.
A backend that prepares per shape (cuDNN's attention builds an execution plan per new shape) pays that
preparation for every distinct length at every step. This script times greedy decoding from a pruned random
cache with equal budgets (one length) and with every layer at its own length (about the same total), once with PyTorch's
default backend choice and once with ``depthkv.engine.attention``'s choice on CUDA.

    python benchmarks/hf_uneven_decode.py --out benchmarks/results/hf_uneven_decode_h200.json

Model: a random-initialised Llama with Qwen2.5-1.5B's widths (28 layers, 12 query / 2 KV heads); no prefill is
timed (the cache holds random keys/values at the budgeted lengths).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers
from _common import SHAPES, build_model, command_line, random_cache

SHAPE = "qwen2.5-1.5b"


def time_decode(model, n: int, lengths: list[int], steps: int, native: bool) -> float:
    """ms per new token of greedy ``generate_from_cache``: (time of 2 + steps tokens - time of 2 tokens) / steps,
    after one untimed 2-token run (one-time setup, e.g. a backend's plans for the first lengths, stays out)."""
    from depthkv.engine import attention
    from depthkv.engine.runner import generate_from_cache

    ids = torch.randint(0, 1000, (1, n + 1), generator=torch.Generator().manual_seed(1)).to(model.device)
    previous = attention.SDPA_BACKENDS
    attention.SDPA_BACKENDS = None if native else previous
    try:
        times = []
        for k in (2, 2, steps + 2):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate_from_cache(model, random_cache(model, n, lengths, seed=0), ids, max_new_tokens=k, min_new_tokens=k,
                                do_sample=False, pad_token_id=0)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        attention.SDPA_BACKENDS = previous
    return (times[2] - times[1]) / steps * 1000


def main(argv: list[str] | None = None) -> int:
    from depthkv.io import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    model = build_model(f"random:{SHAPE}", args.device, getattr(torch, args.dtype))
    n_layers = SHAPES[SHAPE]["num_hidden_layers"]
    keep = round(args.context * (1 - args.ratio))
    equal = [keep] * n_layers
    step = max(1, min(8, keep // n_layers))
    spread = [keep + step * (i - n_layers // 2) for i in range(n_layers)]  # 28 distinct lengths, ~same total
    rows = []
    for native in (True, False):
        for name, lengths in (("equal", equal), ("distinct", spread)):
            ms = time_decode(model, args.context, lengths, args.steps, native)
            rows.append({"backends": "pytorch default" if native else "depthkv", "budgets": name,
                         "distinct_lengths": len(set(lengths)), "ms_per_token": round(ms, 2)})
            print(f"{rows[-1]['backends']:>16}  {name:>8}  {len(set(lengths)):>2} lengths  {ms:8.2f} ms/token",
                  flush=True)
    write_json(args.out, {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "context": args.context, "ratio": args.ratio, "steps": args.steps, "shape": {"name": SHAPE, **SHAPES[SHAPE]},
                          "command": command_line(__file__, argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
