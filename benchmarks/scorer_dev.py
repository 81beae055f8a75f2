"""Development check of scorer variants on the CALIBRATION split, question after compression: the answer's
joint KL against the full cache when each variant chooses the kept tokens.

For choosing a scorer's options (e.g. ``KVzip(self_window=1)``, ``KVzipValue(value_weight=1.0)``) on
calibration samples only — the evaluation split, which results are reported on, is never tuned on. Per sample
(``depthkv.calibration.refine.prepare_samples``): one prefill of the context with the first variant's scorer
and one teacher-forced reference pass of question + answer; every further variant replays that same prefill
(``ScoredPrefill.rescored``; one that differs from an earlier variant only in what acts after the replay, e.g.
``value_weight`` or ``consensus``, reuses that replay). For each ratio and split, each variant's own scores give
its budgets (``BudgetSpec.for_context``, as the engine builds them) and its kept tokens (``+heads``: per-KV-head
budgets as the engine splits them), and the calibration probe (``masked_kl``: question and answer forced through the kept
keys only) measures the answer's joint KL against the full cache. Lower is better; the table gives each
variant's mean per task and ratio, the sum over tasks, and the paired difference against the first variant with
a 95 % percentile-bootstrap CI over samples.

A variant is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (values read as JSON, else as text), e.g.
``kvzip``, ``kvzip_v:value_weight=1``, ``kvzip:self_window=1``; the first is the baseline.

    python benchmarks/scorer_dev.py --model qwen2.5-coder-1.5b --device cuda --context-tokens 4096 \\
        --samples 16 --variant kvzip --variant kvzip:self_window=1 --variant kvzip_v \\
        --profile docs/results/qwen_gpu_4k/profile_kvzip_agnostic.json --out /tmp/scorer_dev.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from _common import check_splits, command_line, versions, write_results
from fact_oracle import rescored, split_masks

DEFAULT_TASKS = "needle,multikey,vartrack,docqa"


class DevError(ValueError):
    """Bad input: one line, exit code 2, nothing written."""


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"kvzip:self_window=1,kernel=3"`` -> ("kvzip", {"self_window": 1, "kernel": 3})."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DevError(f"--variant {spec!r}: options are KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return name.strip(), options


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scorer_dev.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated generated tasks (calibration split)")
    ap.add_argument("--samples", type=int, default=8, help="samples per task")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME or NAME:KEY=VALUE,...; repeat; the first is the baseline (default: kvzip, kvzip_v)")
    ap.add_argument("--profile", default=None, help="the profile of the non-uniform splits (agnostic)")
    ap.add_argument("--splits", default="adaptive+heads")
    ap.add_argument("--ratios", default="0.8,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default=None, help="JSON results file")
    return ap.parse_args(argv)


def check(args: argparse.Namespace) -> tuple[list, list[str], list[float], list[str]]:
    """(variants as (label, name, options), splits, ratios, tasks), refusing bad input before any model work."""
    from depthkv.allocation.budgets import BudgetError, check_ratio
    from depthkv.scorers import SCORERS, get_scorer
    from depthkv.tasks import TASKS

    specs = args.variant or ["kvzip", "kvzip_v"]
    variants = []
    for spec in specs:
        name, options = parse_variant(spec)
        if name not in SCORERS:
            raise DevError(f"--variant {spec!r}: unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
        try:
            scorer = get_scorer(name, **options)
        except (TypeError, ValueError) as exc:
            raise DevError(f"--variant {spec!r}: {exc}") from None
        if not scorer.context_pass:
            raise DevError(f"--variant {spec!r}: compares question-independent (context-pass) scorers only")
        variants.append((spec, name, options))
    if len({v[0] for v in variants}) != len(variants):
        raise DevError("a --variant is listed twice")
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS or not TASKS[t].synthetic:
            raise DevError(f"--tasks: {t!r} is not a generated task")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r]
        for r in ratios:
            check_ratio(r)
    except (ValueError, BudgetError) as exc:
        raise DevError(f"--ratios: {exc}") from None
    if 0 in ratios:
        raise DevError("--ratios: 0 prunes nothing")
    splits = check_splits(args.splits, args.profile, DevError)
    if args.samples < 1 or not tasks or not ratios:
        raise DevError("give at least one sample, task and ratio")
    return variants, splits, ratios, tasks


def run(args: argparse.Namespace, variants: list, splits: list[str], ratios: list[float],
        tasks: list[str]) -> tuple[dict, list[dict]]:
    import torch

    from depthkv.allocation import BudgetSpec
    from depthkv.calibration.refine import masked_kl, prepare_samples
    from depthkv.calibration.run import CalibrationConfig, load_items
    from depthkv.engine import Protection
    from depthkv.models import load_model
    from depthkv.scorers import get_scorer

    torch.manual_seed(args.seed)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    scorers = [get_scorer(name, **opts).bind(tok) for _, name, opts in variants]
    labels = [v[0] for v in variants]
    protection = Protection()
    n_layers = model.config.num_hidden_layers
    specs = {(s, r): BudgetSpec(r, s.removesuffix("+heads"), None if s.startswith("uniform") else args.profile,
                                (), protection.size) for s in splits for r in ratios}
    kl: dict = {}  # (task, split, ratio) -> label -> [per-sample KL]
    per_sample: list[dict] = []
    argv = sys.argv[1:] if args.argv is None else args.argv

    def meta() -> dict:
        return {"kind": "depthkv-scorer-dev", "split": "calib", "setting": "agnostic",
                "metric": "joint KL (masked_kl)", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": command_line(__file__, argv), "args": vars(args),
                "variants": {lb: repr(sc) for lb, sc in zip(labels, scorers, strict=True)},
                "versions": versions(), "device": str(model.device), "samples": per_sample}

    for task in tasks:
        cfg = CalibrationConfig(data=task, samples=args.samples, context_tokens=args.context_tokens,
                                setting="agnostic", seed=args.seed)
        items, _ = load_items(tok, cfg, model.device)
        for item in items:
            t0 = time.perf_counter()
            prep = prepare_samples(model, [item], scorers[0], protection)[0]
            prefix = item.split()[0].to(model.device)
            scores = {labels[0]: prep.sp.scores[prep.scorer]}
            for label, scorer in zip(labels[1:], scorers[1:], strict=True):
                scores[label] = prep.sp.rescored(model, prefix, scorer).scores[scorer.name]
            row = {"task": task, "id": item.sample_id, "tokens": prep.context_len}
            for (split, ratio), spec in specs.items():
                masks = []
                for label in labels:
                    budgets = spec.for_context(n_layers, prep.context_len, scores=scores[label])
                    masks.append(split_masks(rescored(prep, scores[label]), split, budgets, protection))
                got = masked_kl(model, prep, masks)
                cell = kl.setdefault((task, split, ratio), {lb: [] for lb in labels})
                for label, value in zip(labels, got, strict=True):
                    cell[label].append(float(value))
                row[f"{split}@{ratio:g}"] = {lb: float(v) for lb, v in zip(labels, got, strict=True)}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            per_sample.append(row)
            print(f"[scorer_dev] {task} {item.sample_id}: {row['tokens']} tokens, {row['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
            if args.out:  # after each sample: a run stopped later (e.g. by a device time limit) keeps what it did
                write_results(args.out, meta(), summary(kl, labels, args))
    return meta(), summary(kl, labels, args)


def summary(kl: dict, labels: list[str], args: argparse.Namespace) -> list[dict]:
    """Per (task, split, ratio): mean KL per variant and the paired difference against the first variant."""
    import numpy as np

    from depthkv.calibration.stats import paired_diff_ci

    rows = []
    for (task, split, ratio), cell in kl.items():
        base = np.array(cell[labels[0]])
        row = {"task": task, "split": split, "ratio": ratio, "n": len(base),
               "mean": {lb: float(np.mean(v)) for lb, v in cell.items()}, "diff_vs_first": {}}
        for label in labels[1:]:
            d = paired_diff_ci(np.array(cell[label]), base, n_boot=args.n_boot, seed=args.seed)
            row["diff_vs_first"][label] = {"mean": float(d.estimate), "low": float(d.low), "high": float(d.high),
                                           "better": int((np.array(cell[label]) < base).sum())}
        rows.append(row)
    return rows


def table(rows: list[dict], labels: list[str]) -> str:
    """Mean KL per variant (and the sum over tasks per split and ratio); differences against the first."""
    head = "| task | split | ratio | n | " + " | ".join(labels) + " | " + " | ".join(
        f"{lb} − {labels[0]} [95 % CI] (better)" for lb in labels[1:]) + " |"
    out = [head, "|" + "---|" * 4 + "---:|" * len(labels) + "---|" * (len(labels) - 1)]
    for r in rows:
        diffs = [r["diff_vs_first"][lb] for lb in labels[1:]]
        out.append(f"| {r['task']} | {r['split']} | {r['ratio']:g} | {r['n']} | "
                   + " | ".join(f"{r['mean'][lb]:.3f}" for lb in labels) + " | "
                   + " | ".join(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['better']})"
                                for d in diffs) + " |")
    for split, ratio in dict.fromkeys((r["split"], r["ratio"]) for r in rows):
        group = [r for r in rows if (r["split"], r["ratio"]) == (split, ratio)]
        out.append(f"| sum | {split} | {ratio:g} | | " + " | ".join(
            f"{sum(r['mean'][lb] for r in group):.3f}" for lb in labels) + " |" + " |" * (len(labels) - 1))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        variants, splits, ratios, tasks = check(args)
    except DevError as exc:
        print(f"scorer_dev.py: error: {exc}", file=sys.stderr)
        return 2
    args.argv = argv
    meta, rows = run(args, variants, splits, ratios, tasks)
    print(table(rows, [v[0] for v in variants]))
    if args.out:
        write_results(args.out, meta, rows)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
