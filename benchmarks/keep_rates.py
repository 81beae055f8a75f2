"""Does a scorer keep what a task's question will need? Share of KV pairs kept on the inserted facts vs overall.

In needle, multikey and vartrack the question needs only the facts the generator inserted into the haystack
(the needle sentences; vartrack's assignment statements ``VAR X = ...``). This prefills each sample's context
once, as the query-agnostic setting does (the question comes after compression), scores it with one scorer,
builds the budgets of each split at each ratio (``BudgetSpec``, as ``depthkv eval`` does) and picks the kept
tokens per layer and KV head exactly as pruning does (``depthkv.engine.session.choose_tokens``, protected window
included; ``+heads``: per-head budgets). It reports, averaged over layers and samples, the share of (KV head,
token) pairs kept on fact tokens against the share kept overall (about 1 - ratio): a scorer that sees the facts
keeps them above that base rate, one that does not keeps them at it. Its ``fact_min_layer`` is the layer that
keeps the least of the facts. Run it on the calibration split (the default) when choosing a scorer.

    python benchmarks/keep_rates.py --model qwen2.5-coder-1.5b --tasks vartrack,needle --samples 4 \\
        --context-tokens 2048 --scorer kvzip --profile docs/results/qwen_gpu_4k/profile_kvzip_agnostic_refined.json \\
        --out benchmarks/results/keep_rates_qwen_kvzip.json
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any

from _common import command_line, versions, write_results

VARTRACK_STATEMENT = re.compile(r"VAR [A-Z]+ = (?:VAR [A-Z]+|\d+)\.")


def fact_spans(task: str, context: str, meta: dict[str, Any]) -> list[tuple[int, int]]:
    """Character spans of ``context`` that hold the facts the generator inserted (the question's evidence)."""
    if task == "vartrack":
        return [m.span() for m in VARTRACK_STATEMENT.finditer(context)]
    if task == "needle":
        return [m.span() for m in re.finditer(re.escape(meta["needle"]), context)]
    if task == "multikey":  # each key's sentence: from the full stop before the key to the one after it
        spans = []
        for key in meta["keys"]:
            for m in re.finditer(re.escape(key), context):
                end = context.find(".", m.end())
                spans.append((context.rfind(".", 0, m.start()) + 1, len(context) if end < 0 else end + 1))
        return spans
    raise ValueError(f"keep_rates: no facts known for task {task!r} (needle, multikey, vartrack)")


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens (character ``offsets`` [start, end) each) overlap any of ``spans``."""
    return [any(s < b and e > a for a, b in spans) for s, e in offsets]


def token_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, character span of each token in it), by decoding growing prefixes (exact for any
    tokenizer; quadratic, fine for a diagnostic)."""
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    starts = [0] + ends[:-1]
    return tokenizer.decode(ids), list(zip(starts, ends))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", default="vartrack,needle")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--context-tokens", type=int, default=2048)
    ap.add_argument("--split", default="calib", choices=("calib", "eval"))
    ap.add_argument("--scorer", default="kvzip")
    ap.add_argument("--profile", default=None, help="a profile (for optimal / adaptive); without: uniform only")
    ap.add_argument("--strategies", default="uniform,optimal,adaptive")
    ap.add_argument("--ratios", default="0.8,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from depthkv.allocation import BudgetSpec
    from depthkv.engine import score_prefill
    from depthkv.engine.session import Protection, choose_tokens, layer_positions
    from depthkv.eval.runner import prompt_ids
    from depthkv.models import load_model
    from depthkv.scorers import get_scorer
    from depthkv.tasks.prompt import token_counter
    from depthkv.tasks.registry import generate

    strategies = [s for s in args.strategies.split(",") if s]
    if args.profile is None:
        strategies = ["uniform"]
    ratios = [float(r) for r in args.ratios.split(",")]
    lm = load_model(args.model, device=args.device)
    model, tok = lm.model, lm.tokenizer
    scorer = get_scorer(args.scorer).bind(tok)  # KVzip's repeat prompt needs the model's tokenizer
    protection = Protection()
    n_layers = model.config.num_hidden_layers
    cells: dict[str, dict[str, list[float]]] = {}
    samples_out = []
    torch.manual_seed(args.seed)
    for task in args.tasks.split(","):
        for s in generate(task, args.samples, args.seed, context_tokens=args.context_tokens,
                          count_tokens=token_counter(tok), split=args.split):
            prefix, _ = prompt_ids(tok, s, "agnostic", model.device)
            ids = prefix[0].tolist()
            text, offsets = token_offsets(tok, ids)
            fact = np.array(token_mask(offsets, fact_spans(task, text, s.meta)))
            if not fact.any():
                raise SystemExit(f"error: no fact tokens found in {s.id}")
            t0 = time.perf_counter()
            sp = score_prefill(model, prefix, [scorer], protection)
            seconds = time.perf_counter() - t0
            scores = sp.scores[scorer.name]
            for strategy in strategies:
                for ratio in ratios:
                    budgets = BudgetSpec(ratio, strategy, args.profile, (), protection.size).for_context(
                        n_layers, len(ids), scores)
                    for heads in (False, True):
                        per_layer_fact, per_layer_all = [], []
                        for li, layer in enumerate(sp.cache.layers):
                            keep, valid = choose_tokens(scores[li], layer_positions(layer), layer.get_seq_length(),
                                                        budgets.tokens[li], protection, heads)
                            kept = torch.zeros(scores[li].shape[1], len(ids), dtype=torch.bool)
                            for h in range(keep.shape[1]):
                                idx = keep[0, h] if valid is None else keep[0, h][valid[0, h]]
                                kept[h, idx.cpu()] = True
                            share = kept.float().mean(0).numpy()  # per token: share of KV heads keeping it
                            per_layer_fact.append(float(share[fact].mean()))
                            per_layer_all.append(float(share.mean()))
                        key = f"{task}|{strategy}{'+heads' if heads else ''}|{ratio:g}"
                        c = cells.setdefault(key, {"fact": [], "all": [], "fact_min_layer": [], "per_layer": []})
                        c["per_layer"].append(per_layer_fact)
                        c["fact"].append(float(np.mean(per_layer_fact)))
                        c["all"].append(float(np.mean(per_layer_all)))
                        c["fact_min_layer"].append(float(np.min(per_layer_fact)))
            samples_out.append({"task": task, "id": s.id, "tokens": len(ids), "fact_tokens": int(fact.sum()),
                                "scoring_seconds": round(seconds, 2)})
            print(f"[keep_rates] {s.id}: {len(ids)} tokens, {int(fact.sum())} fact tokens, scored in "
                  f"{seconds:.1f} s", flush=True)
    rows = []
    print("| task | split | ratio | fact tokens kept | all tokens kept | fact, least-keeping layer |")
    print("|---|---|---:|---:|---:|---:|")
    for key, c in cells.items():
        task, split, ratio = key.split("|")
        row = {"task": task, "split": split, "ratio": float(ratio), "n": len(c["fact"]),
               "fact_kept": float(np.mean(c["fact"])), "all_kept": float(np.mean(c["all"])),
               "fact_min_layer": float(np.mean(c["fact_min_layer"])),
               "fact_per_layer": [round(float(x), 4) for x in np.mean(c["per_layer"], axis=0)]}
        rows.append(row)
        print(f"| {task} | {split} | {ratio} | {row['fact_kept']:.3f} | {row['all_kept']:.3f} | "
              f"{row['fact_min_layer']:.3f} |")
    if args.out:
        meta = {"kind": "depthkv-keep-rates", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": command_line(__file__, argv),
                "args": vars(args), "versions": versions(), "device": str(model.device), "samples": samples_out}
        write_results(args.out, meta, rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
