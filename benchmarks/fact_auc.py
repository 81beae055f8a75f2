"""Which question-independent score singles out the facts? ROC AUC of each scorer's ranking of the inserted facts.

In needle, multikey and vartrack the question needs only the facts the generator inserted (``keep_rates.py``
finds them). Each sample's context is prefilled once, as the query-agnostic setting does, and scored by every
scorer of ``--scorers`` in that one prefill (context-pass scorers replay it); then, in every layer and KV head,
the area under the ROC curve of the scores with the fact tokens as positives: 0.5 is chance (the facts rank like
any token), 1 puts every fact token above every other. Reported per scorer and task: the mean over layers, heads
and samples, and the share of heads above 0.7. A diagnostic for choosing a signal, not a result: run it on the
calibration split (the default). Besides the registered scorers, ``vnorm`` (the value norm ``||v||``, which
``kvzip_v`` blends in) is accepted.

    python benchmarks/fact_auc.py --model qwen2.5-coder-1.5b --tasks vartrack,multikey,needle --samples 4 \\
        --context-tokens 1024 --scorers kvzip,kvzip_vc,h2o,knorm,keydiff,vnorm --out benchmarks/results/fact_auc.json
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone

from _common import command_line, versions, write_results
from keep_rates import fact_spans, token_mask, token_offsets

FACT_TASKS = ("needle", "multikey", "vartrack")
EXTRA_SIGNALS = ("vnorm",)  # read off the cache, not a registered scorer


class AucError(ValueError):
    """Bad input: one line, exit code 2, nothing written."""


def head_auc(scores, fact):
    """[H] ROC AUC per row of ``scores`` [H, N] with ``fact`` [N] (bool) the positives: the Mann-Whitney U of
    the fact tokens' scores against the others', over the number of pairs (ties count one half)."""
    import numpy as np
    from scipy.stats import mannwhitneyu

    scores, fact = np.asarray(scores, dtype=np.float64), np.asarray(fact, dtype=bool)
    if fact.all() or not fact.any():
        raise ValueError("AUC needs fact tokens and other tokens both")
    u = mannwhitneyu(scores[:, fact], scores[:, ~fact], axis=1).statistic
    return u / (fact.sum() * (~fact).sum())


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fact_auc.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tasks", default="vartrack,multikey,needle")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--split", default="calib", choices=("calib", "eval"))
    ap.add_argument("--scorers", default="kvzip,kvzip_vc,h2o,knorm,keydiff,vnorm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(tasks, scorers), after refusing bad input before any model work."""
    from depthkv.scorers import SCORERS

    tasks = [t for t in args.tasks.split(",") if t]
    scorers = [s for s in args.scorers.split(",") if s]
    bad = [t for t in tasks if t not in FACT_TASKS]
    if bad or not tasks:
        raise AucError(f"--tasks must name some of {', '.join(FACT_TASKS)} (tasks whose facts are known), got "
                       f"{args.tasks!r}")
    unknown = [s for s in scorers if s not in SCORERS and s not in EXTRA_SIGNALS]
    if unknown or not scorers:
        raise AucError(f"unknown scorer(s) {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(sorted(SCORERS) + list(EXTRA_SIGNALS))}")
    if len(set(scorers)) != len(scorers):
        raise AucError("a scorer is listed twice in --scorers")
    if args.samples < 1:
        raise AucError(f"--samples must be >= 1, got {args.samples}")
    return tasks, scorers


def run(args: argparse.Namespace, tasks: list[str], names: list[str]) -> tuple[dict, list[dict]]:
    import numpy as np
    import torch

    from depthkv.engine import Protection, score_prefill
    from depthkv.eval.runner import prompt_ids
    from depthkv.models import load_model
    from depthkv.scorers import get_scorer
    from depthkv.tasks.prompt import token_counter
    from depthkv.tasks.registry import generate

    torch.manual_seed(args.seed)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    scorers = [get_scorer(s).bind(tok) for s in names if s not in EXTRA_SIGNALS]
    protection = Protection(0, 0)  # no protected window: every token is ranked by its score alone
    auc: dict[tuple[str, str], list[np.ndarray]] = {}
    per_sample = []
    for task in tasks:
        for s in generate(task, args.samples, args.seed, context_tokens=args.context_tokens,
                          count_tokens=token_counter(tok), split=args.split):
            prefix, _ = prompt_ids(tok, s, "agnostic", model.device)
            text, offsets = token_offsets(tok, prefix[0].tolist())
            fact = np.array(token_mask(offsets, fact_spans(task, text, s.meta)))
            t0 = time.perf_counter()
            sp = score_prefill(model, prefix, scorers, protection)
            n = prefix.shape[1]
            row = {"task": task, "id": s.id, "tokens": n, "fact_tokens": int(fact.sum())}
            for name in names:
                per_layer = []
                for li, layer in enumerate(sp.cache.layers):
                    if name == "vnorm":
                        sig = layer.values[0, :, :n].float().norm(dim=-1)
                    else:
                        sig = sp.scores[name][li][0, :, :n]
                    per_layer.append(head_auc(sig.cpu().numpy(), fact))
                a = np.stack(per_layer)  # [L, KVH]
                auc.setdefault((task, name), []).append(a)
                row[name] = round(float(a.mean()), 4)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            per_sample.append(row)
            print(f"[fact_auc] {s.id}: {n} tokens, {row['fact_tokens']} fact tokens, "
                  + ", ".join(f"{k} {row[k]:.3f}" for k in names), flush=True)
    rows = []
    for (task, name), arrays in auc.items():
        a = np.stack(arrays)  # [S, L, KVH]
        rows.append({"task": task, "scorer": name, "n": len(arrays), "auc_mean": float(a.mean()),
                     "heads_above_0.7": float((a > 0.7).mean()), "auc_max_head": float(a.mean(0).max()),
                     "auc_per_layer": [round(float(x), 4) for x in a.mean(axis=(0, 2))]})
    meta = {"kind": "depthkv-fact-auc", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": vars(args), "versions": versions(), "device": str(model.device), "samples": per_sample}
    return meta, rows


def table(rows: list[dict]) -> str:
    out = ["| task | scorer | samples | mean AUC over heads | heads with AUC > 0.7 | best head (mean over samples) |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['task']} | {r['scorer']} | {r['n']} | {r['auc_mean']:.3f} | {r['heads_above_0.7']:.2f} | "
                   f"{r['auc_max_head']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        tasks, names = check(args)
    except AucError as exc:
        print(f"fact_auc.py: error: {exc}", file=sys.stderr)
        return 2
    meta, rows = run(args, tasks, names)
    print(table(rows))
    if args.out:
        meta["command"] = command_line(__file__, argv)
        write_results(args.out, meta, rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
