"""Retention (score / full-cache score) of depthkv and kvpress methods on the same samples, with paired CIs.

Reads one or more ``depthkv eval`` folders and ``benchmarks/kvpress_agnostic.py`` folders (both write
``results.jsonl`` rows keyed by task, sample, setting, method, scorer, ratio), keeps the samples every
compared method has, and prints a Markdown table: per task and ratio the mean score of each method, its
retention (mean score / the full cache's mean score in the same harness), and the paired difference of the
best depthkv method to each kvpress method with a 95 % bootstrap CI (``paired_diff_ci``). Suite mean
retention per ratio closes the table. Writes the numbers as JSON too.

    python benchmarks/retention_table.py runs/depthkv runs/kvpress --setting agnostic \
        --json docs/results/agnostic_qwen/retention.json --md docs/results/agnostic_qwen/retention.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from depthkv.calibration.stats import bootstrap_ci, paired_diff_ci
from depthkv.io import write_json


def label(row: dict) -> str:
    """Method label: ``full``, ``kvpress:kvzip``, or ``<allocator>/<scorer>`` for depthkv."""
    if row["method"] == "full" or row["method"].startswith("kvpress:"):
        return row["method"]
    return f"{row['method']}/{row['scorer']}"


def read(folders: list[Path], setting: str) -> dict[tuple[str, str, float], dict[str, float]]:
    """{(task, method label, ratio): {sample id: score}}; each harness's full cache is labelled by folder kind."""
    out: dict[tuple[str, str, float], dict[str, float]] = defaultdict(dict)
    for folder in folders:
        kvpress = "kvpress" in json.loads((folder / "config.json").read_text()).get("kind", "")
        with open(folder / "results.jsonl") as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("setting") != setting or row.get("status") != "ok" or row.get("score") is None:
                    continue
                name = label(row)
                if name == "full":
                    name = "full (kvpress harness)" if kvpress else "full"
                out[(row["task"], name, float(row["ratio"]))][row["sample_id"]] = float(row["score"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--setting", default="agnostic")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    data = read(args.folders, args.setting)
    tasks = sorted({t for t, _, _ in data})
    ratios = sorted({r for _, m, r in data if m != "full" and not m.startswith("full ")})
    methods = sorted({m for _, m, _ in data if not m.startswith("full")})
    lines = [f"| task | ratio | full | {' | '.join(methods)} |", "|---|---:|---:|" + "---:|" * len(methods)]
    table: list[dict] = []
    suite: dict[tuple[str, float], list[float]] = defaultdict(list)
    for task in tasks:
        full = data.get((task, "full", 0.0), {})
        if not full:
            print(f"warning: no full-cache rows for {task}; skipped", file=sys.stderr)
            continue
        full_mean = float(np.mean(list(full.values())))
        for r in ratios:
            cells = []
            for m in methods:
                scores = data.get((task, m, r), {})
                ids = sorted(set(scores) & set(full))
                if not ids:
                    cells.append("–")
                    continue
                x = np.array([scores[i] for i in ids])
                ci = bootstrap_ci(x)
                ret = float(x.mean()) / full_mean if full_mean > 0 else float("nan")
                suite[(m, r)].append(ret)
                table.append({"task": task, "ratio": r, "method": m, "n": len(ids), "mean": float(x.mean()),
                              "ci": [float(ci.low), float(ci.high)], "retention": ret, "full_mean": full_mean})
                cells.append(f"{x.mean():.2f} ({ret:.2f})")
            lines.append(f"| {task} | {r:g} | {full_mean:.2f} | {' | '.join(cells)} |")
    lines.append("")
    lines.append("Suite-mean retention (mean over tasks of score / full-cache score):")
    lines.append("")
    lines.append(f"| ratio | {' | '.join(methods)} |")
    lines.append("|---:|" + "---:|" * len(methods))
    for r in ratios:
        vals = [f"{np.mean(suite[(m, r)]):.2f}" if suite.get((m, r)) else "–" for m in methods]
        lines.append(f"| {r:g} | {' | '.join(vals)} |")
    # paired differences: every depthkv method against every kvpress method, pooled over tasks
    pairs = []
    dk = [m for m in methods if not m.startswith("kvpress:")]
    kp = [m for m in methods if m.startswith("kvpress:")]
    for r in ratios:
        for a in dk:
            for b in kp:
                xa, xb = [], []
                for task in tasks:
                    sa, sb = data.get((task, a, r), {}), data.get((task, b, r), {})
                    for i in sorted(set(sa) & set(sb)):
                        xa.append(sa[i])
                        xb.append(sb[i])
                if len(xa) >= 2:
                    ci = paired_diff_ci(np.array(xa), np.array(xb))
                    pairs.append({"ratio": r, "depthkv": a, "kvpress": b, "n": len(xa), "diff": float(ci.estimate),
                                  "ci": [float(ci.low), float(ci.high)]})
    if pairs:
        lines += ["", "Paired difference depthkv - kvpress (all tasks pooled, 95 % bootstrap CI):", "",
                  "| ratio | depthkv | kvpress | n | diff [95 % CI] |", "|---:|---|---|---:|---|"]
        for p in sorted(pairs, key=lambda p: (p["ratio"], -p["diff"])):
            lines.append(f"| {p['ratio']:g} | {p['depthkv']} | {p['kvpress']} | {p['n']} | "
                         f"{p['diff']:+.2f} [{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}] |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    if args.json:
        write_json(args.json, {"setting": args.setting, "folders": [str(f) for f in args.folders], "cells": table,
                               "suite": [{"method": m, "ratio": r, "retention": float(np.mean(v))}
                                         for (m, r), v in sorted(suite.items())], "paired": pairs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
