"""Is token selection the limit of query-agnostic compression? The answer's joint KL when each split keeps what
its scorer ranks first, against an oracle that ranks the task's inserted facts first.

For needle, multikey and vartrack the question needs only the facts the generator inserted (``keep_rates.py``
finds them). Each calibration-split sample is prefilled and scored once, as the query-agnostic setting does;
each split's budgets come from the scorer's own scores (an input-adaptive split ranks them), and the kept tokens
are chosen twice with those budgets: by the scores, and by the scores with every fact token lifted above all
others (the oracle: it knows where the facts are, which no scorer does). Both are measured by the library's
calibration probe (``masked_kl``: the teacher-forced question + answer through the pruned keys, KL against the
full cache), so the gap between them is what a perfect fact-finder would win under the same budgets. A
diagnostic, not a method: run it on the calibration split (the default).

``--probe-question TEXT`` adds a third choice that needs no oracle: the context is prefilled once more with TEXT
(a question that names no fact, e.g. "Which names, numbers and assignments does the text above state?") in the
question's place, and SnapKV's scores of that prefill (what the probe question's window attends to) rank the
context tokens, under the same budgets.

    python benchmarks/fact_oracle.py --model qwen2.5-coder-1.5b --task vartrack --samples 12 --context-tokens 1024 \\
        --profile docs/results/qwen_gpu_4k/profile_kvzip_agnostic_refined.json --out benchmarks/results/fact_oracle.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime, timezone

from _common import check_splits, command_line, versions, write_results
from keep_rates import fact_spans, token_mask, token_offsets

FACT_TASKS = ("needle", "multikey", "vartrack")


class OracleError(ValueError):
    """Bad input: one line, exit code 2, nothing written."""


def oracle_scores(scores: list, fact) -> list:
    """Per-layer scores [1, KVH, N] with every fact token (``fact`` [N] bool) ranked above every other token."""
    out = []
    for s in scores:
        lift = (s.amax() - s.amin() + 1.0) * fact.to(device=s.device, dtype=s.dtype)
        out.append(s + lift)
    return out


def rescored(prepared, scores: list):
    """``prepared`` with other per-layer scores in its scorer's place (same cache, answer and reference)."""
    from depthkv.calibration.refine import PreparedSample

    sp = dataclasses.replace(prepared.sp, scores={prepared.scorer: scores})
    return PreparedSample(sp, prepared.scorer, prepared.hidden_in, prepared.targets, prepared.ref_logp)


def probe_scores(model, tokenizer, sample, question: str, context_ids, protection) -> list:
    """SnapKV's per-layer scores [1, KVH, N] of the context part ``context_ids`` [1, N] when ``question`` follows
    it in the prefill."""
    from depthkv.engine import score_prefill
    from depthkv.eval.runner import prompt_ids
    from depthkv.scorers import get_scorer

    n = context_ids.shape[1]
    prefix, _ = prompt_ids(tokenizer, dataclasses.replace(sample, question=question), "aware", model.device)
    if prefix.shape[1] <= n or not bool((prefix[0, :n] == context_ids[0].to(prefix.device)).all()):
        raise RuntimeError(f"{sample.id}: the probe prompt does not start with the context part")
    sp = score_prefill(model, prefix, [get_scorer("snapkv")], protection)
    return [s[..., :n] for s in sp.scores["snapkv"]]


def split_masks(prepared, split: str, budgets, protection) -> dict:
    """The key masks the split keeps on ``prepared`` (``+heads``: per-KV-head budgets as the engine splits them)."""
    from depthkv.calibration.floors import head_masks
    from depthkv.calibration.refine import budget_masks

    if split.endswith("+heads"):
        return head_masks(prepared, budgets, protection)[1]
    return budget_masks(prepared, budgets.tokens)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fact_oracle.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--task", default="vartrack", help=f"one of {', '.join(FACT_TASKS)}")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--scorer", default="kvzip")
    ap.add_argument("--profile", default=None, help="the profile of the non-uniform splits")
    ap.add_argument("--splits", default="adaptive+heads,uniform+heads")
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-question", default=None, help="also rank by SnapKV scores of this question")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def check(args: argparse.Namespace) -> list[str]:
    """The splits, after refusing bad input before any model work."""
    from depthkv.allocation.budgets import BudgetError, check_ratio

    if args.task not in FACT_TASKS:
        raise OracleError(f"--task must be one of {', '.join(FACT_TASKS)} (tasks whose facts are known), "
                          f"got {args.task!r}")
    try:
        check_ratio(args.ratio)
    except BudgetError as exc:
        raise OracleError(str(exc)) from None
    if args.ratio == 0:
        raise OracleError("--ratio 0 prunes nothing: give a ratio in (0, 1)")
    if args.probe_question is not None and not args.probe_question.strip():
        raise OracleError("--probe-question must not be empty")
    if args.samples < 1:
        raise OracleError(f"--samples must be >= 1, got {args.samples}")
    return check_splits(args.splits, args.profile, OracleError)


def run(args: argparse.Namespace, splits: list[str]) -> tuple[dict, list[dict]]:
    import numpy as np
    import torch

    from depthkv.allocation import BudgetSpec
    from depthkv.calibration.refine import masked_kl, prepare_samples
    from depthkv.calibration.run import CalibrationConfig, load_items
    from depthkv.calibration.stats import paired_diff_ci
    from depthkv.engine import Protection
    from depthkv.models import load_model
    from depthkv.scorers import get_scorer
    from depthkv.tasks.prompt import token_counter
    from depthkv.tasks.registry import generate

    torch.manual_seed(args.seed)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    scorer = get_scorer(args.scorer).bind(tok)
    protection = Protection()
    cfg = CalibrationConfig(data=args.task, samples=args.samples, context_tokens=args.context_tokens,
                            setting="agnostic", seed=args.seed)
    items, _ = load_items(tok, cfg, model.device)
    samples = generate(args.task, args.samples, args.seed, context_tokens=args.context_tokens,
                       count_tokens=token_counter(tok), split="calib")
    n_layers = model.config.num_hidden_layers
    strategies = {s: s.removesuffix("+heads") for s in splits}
    specs = {s: BudgetSpec(args.ratio, st, None if st == "uniform" else args.profile, (), protection.size)
             for s, st in strategies.items()}
    choices = ["scorer", "oracle"] + (["probe"] if args.probe_question else [])
    kl = {s: {c: [] for c in choices} for s in splits}
    per_sample = []
    for item, sample in zip(items, samples, strict=True):
        if item.sample_id != sample.id:
            raise RuntimeError(f"calibration items and samples out of step: {item.sample_id} vs {sample.id}")
        t0 = time.perf_counter()
        prep = prepare_samples(model, [item], scorer, protection)[0]
        text, offsets = token_offsets(tok, item.prompt_ids[0].tolist())
        fact = torch.tensor(token_mask(offsets, fact_spans(args.task, text, sample.meta)))
        raw = prep.sp.scores[prep.scorer]
        ranked = {"scorer": prep, "oracle": rescored(prep, oracle_scores(raw, fact))}
        if args.probe_question:
            ranked["probe"] = rescored(prep, probe_scores(model, tok, sample, args.probe_question, item.prompt_ids,
                                                          protection))
        row = {"id": sample.id, "tokens": prep.context_len, "fact_tokens": int(fact.sum())}
        for split, spec in specs.items():
            budgets = spec.for_context(n_layers, prep.context_len, scores=raw)  # the scorer's budgets for all
            got = masked_kl(model, prep, [split_masks(ranked[c], split, budgets, protection) for c in choices])
            row[split] = {c: float(v) for c, v in zip(choices, got, strict=True)}
            for c in choices:
                kl[split][c].append(row[split][c])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        per_sample.append(row)
        print(f"[fact_oracle] {sample.id}: {row['tokens']} tokens, {row['fact_tokens']} fact tokens, "
              f"{row['seconds']:.1f} s", flush=True)
    rows = []
    for split in splits:
        a, b = np.array(kl[split]["scorer"]), np.array(kl[split]["oracle"])
        d = paired_diff_ci(b, a, n_boot=args.n_boot, seed=args.seed)
        row = {"split": split, "n": len(a), "kl_scorer": float(a.mean()), "kl_oracle": float(b.mean()),
               "oracle_minus_scorer": {"mean": float(d.estimate), "low": float(d.low), "high": float(d.high)},
               "oracle_better": int((b < a).sum())}
        if "probe" in kl[split]:
            p = np.array(kl[split]["probe"])
            dp = paired_diff_ci(p, a, n_boot=args.n_boot, seed=args.seed)
            row.update({"kl_probe": float(p.mean()), "probe_better": int((p < a).sum()),
                        "probe_minus_scorer": {"mean": float(dp.estimate), "low": float(dp.low),
                                               "high": float(dp.high)}})
        rows.append(row)
    meta = {"kind": "depthkv-fact-oracle", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": vars(args), "versions": versions(), "device": str(model.device), "samples": per_sample}
    return meta, rows


def table(rows: list[dict], ratio: float) -> str:
    out = [f"| split (ratio {ratio:g}) | samples | joint KL, scorer's tokens | joint KL, facts first (oracle) | "
           "oracle − scorer [95 % CI] | oracle better |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        d = r["oracle_minus_scorer"]
        out.append(f"| {r['split']} | {r['n']} | {r['kl_scorer']:.3f} | {r['kl_oracle']:.3f} | "
                   f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {r['oracle_better']}/{r['n']} |")
    for r in rows:
        if "kl_probe" in r:
            d = r["probe_minus_scorer"]
            out.append(f"| {r['split']}, probe question | {r['n']} | {r['kl_scorer']:.3f} | {r['kl_probe']:.3f} "
                       f"(probe) | {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {r['probe_better']}/{r['n']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        splits = check(args)
    except OracleError as exc:
        print(f"fact_oracle.py: error: {exc}", file=sys.stderr)
        return 2
    meta, rows = run(args, splits)
    print(table(rows, args.ratio))
    if args.out:
        meta["command"] = command_line(__file__, argv)
        write_results(args.out, meta, rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
