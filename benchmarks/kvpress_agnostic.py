"""NVIDIA kvpress on the samples of a ``depthkv eval`` run, question after compression (query-agnostic).

kvpress 0.5.x needs transformers < 5.3, so this script runs in kvpress's own environment (``.venv-kvpress``
from ``scripts/kvpress_env.sh``; on a machine without network, wheels put on ``PYTHONPATH``). It rebuilds
exactly the samples of ``depthkv eval`` for the same ``--tasks/--samples/--context-tokens/--seed`` (same
generator, same tokenizer, same prompt split), compresses each context with a kvpress press, appends the
question and decodes greedily with the same token budget per task, and scores with depthkv's metrics. Rows
(``results.jsonl`` in ``--out``) carry the eval rows' keys, so ``benchmarks/retention_table.py`` can pair
them sample by sample with a depthkv eval folder. Resumable: rows already in ``--out`` are skipped.

    python benchmarks/kvpress_agnostic.py --model qwen2.5-coder-1.5b --device cuda --tasks needle,multikey \
        --samples 20 --context-tokens 4096 --ratios 0.6,0.8,0.9 --out runs/kvpress

Presses: ``kvzip`` (KVzipPress: scores from context reconstruction, ranked across all layers and heads),
``expected_attention`` (ExpectedAttentionPress), ``adakv_ea`` (AdaKVPress around ExpectedAttentionPress:
head-level budgets), ``snapkv`` (SnapKVPress, window 32, kernel 5); on request (``--presses``) ``keydiff``
(KeyDiffPress: keys far from their head's mean key). kvpress's KVzip and AdaKV presses mask
evicted keys instead of removing them, so their cache keeps its full size: ``kv_kept_share`` reports the
share of KV pairs left visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import command_line

PRESSES = ("kvzip", "expected_attention", "adakv_ea", "snapkv", "keydiff")
DEFAULT_PRESSES = PRESSES[:4]


def make_press(name: str, ratio: float):
    from kvpress import AdaKVPress, ExpectedAttentionPress, KeyDiffPress, KVzipPress, SnapKVPress

    if name == "kvzip":
        return KVzipPress(compression_ratio=ratio)
    if name == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=ratio)
    if name == "adakv_ea":
        return AdaKVPress(ExpectedAttentionPress(compression_ratio=ratio))
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=5)
    if name == "keydiff":
        return KeyDiffPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")


def visible_share(model, cache, n_ctx: int) -> float:
    """Share of the context's KV pairs the next attention call can see (masked or evicted ones excluded)."""
    total = kept = 0
    for layer, block in zip(cache.layers, model.model.layers):
        b, h, n, _ = layer.keys.shape
        masked = getattr(block.self_attn, "masked_key_indices", None)
        total += b * h * n_ctx
        kept += b * h * n - (0 if masked is None else int(masked[0].numel()))
    return kept / total


def compress(model, ctx, press):
    """Prefill ``ctx`` [1, N] into a new cache under ``press`` (None: the full cache)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
        model.model(input_ids=ctx, past_key_values=cache)
    return cache


def decode(model, cache, question, n_ctx: int, max_new: int, eos: set[int]) -> list[int]:
    """Feed the question after the compressed context (positions continue at N), then greedy tokens."""
    import torch

    dev = question.device
    with torch.no_grad():
        pos = torch.arange(n_ctx, n_ctx + question.shape[1], device=dev)[None]
        out = model(input_ids=question, position_ids=pos, past_key_values=cache, logits_to_keep=1)
        nxt_pos = n_ctx + question.shape[1]
        new: list[int] = []
        for _ in range(max_new):
            tok = int(out.logits[0, -1].argmax())
            new.append(tok)
            if tok in eos:
                break
            out = model(input_ids=torch.tensor([[tok]], device=dev), position_ids=torch.tensor([[nxt_pos]], device=dev),
                        past_key_values=cache, logits_to_keep=1)
            nxt_pos += 1
    return new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    ap.add_argument("--tasks", default="needle,multikey")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", default="0.6,0.8,0.9")
    ap.add_argument("--presses", default=",".join(DEFAULT_PRESSES))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import logging

    import torch

    from depthkv.eval.results import ResultsWriter, cell_key
    from depthkv.eval.runner import MAX_NEW_TOKENS, EvalConfig, load_samples, prompt_ids
    from depthkv.io import write_json
    from depthkv.models import load_model
    from depthkv.tasks.metrics import METRICS, score
    from depthkv.tasks.prompt import token_counter

    logging.getLogger("kvpress").setLevel(logging.ERROR)
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    for p in presses:
        if p not in PRESSES:
            print(f"error: unknown press {p!r}; choose from {', '.join(PRESSES)}", file=sys.stderr)
            return 2
    ratios = [float(r) for r in args.ratios.split(",")]
    kw = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    lm = load_model(args.model, device=args.device, **kw)
    model, tok = lm.model, lm.tokenizer
    dev = model.device
    cfg = EvalConfig(model=args.model, tasks=args.tasks.split(","), samples=args.samples,
                     context_tokens=args.context_tokens, settings=("agnostic",), seed=args.seed, methods=("full",))
    samples = load_samples(cfg, tok)
    count = token_counter(tok)
    eos = {int(tok.eos_token_id)} | {int(e) for e in ([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else (model.generation_config.eos_token_id or []))}
    args.out.mkdir(parents=True, exist_ok=True)
    cfg_path = args.out / "config.json"
    try:  # a resumed run keeps the date it was started
        created = json.loads(cfg_path.read_text()).get("created")
    except (OSError, ValueError, AttributeError):
        created = None
    write_json(cfg_path, {"kind": "kvpress-agnostic", **vars(args), "out": str(args.out), "model_name": lm.name,
                          "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "command": command_line(__file__, argv)},
               indent=1)
    t_start = time.perf_counter()
    with ResultsWriter(args.out / "results.jsonl") as writer:
        for label, group in samples.items():
            max_new = MAX_NEW_TOKENS.get(label.split(":")[0], 64)
            for s in group:
                prefix, full = prompt_ids(tok, s, "agnostic")
                prefix, full = prefix.to(dev), full.to(dev)
                question = full[:, prefix.shape[1]:]
                cells = [("full", 0.0)] + [(f"kvpress:{p}", r) for p in presses for r in ratios]
                for method, ratio in cells:
                    if cell_key(label, s.id, "agnostic", method, None, ratio) in writer.done:
                        continue
                    t0 = time.perf_counter()
                    press = None if method == "full" else make_press(method.split(":", 1)[1], ratio)
                    cache = compress(model, prefix, press)
                    share = visible_share(model, cache, prefix.shape[1])
                    new = decode(model, cache, question, prefix.shape[1], max_new, eos)
                    text = tok.decode(new, skip_special_tokens=True).strip()
                    metrics = {k: float(v) for k, v in score(s, text, None, count_tokens=count).items()}
                    writer.append({
                        "task": label, "sample_id": s.id, "setting": "agnostic", "method": method, "scorer": None,
                        "ratio": ratio, "status": "ok", "context_len": int(prefix.shape[1]), "output": text,
                        "answer": s.answer, "metric": s.metric, "metrics": metrics,
                        "score": metrics[METRICS[s.metric].primary], "primary": METRICS[s.metric].primary,
                        "kv_kept_share": share,
                        "seconds": time.perf_counter() - t0, "new_tokens": len(new),
                    })
                    del cache
                print(f"[kvpress] {label} {s.id} done, {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
