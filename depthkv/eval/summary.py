"""Summary of an evaluation: mean and 95 % bootstrap CI per cell, paired difference against a baseline.

A cell is (task, setting, method, scorer, ratio). Its estimate is the mean headline score over samples with
a percentile-bootstrap CI (``depthkv.calibration.stats.bootstrap_ci``, 1,000 resamples). For every method
other than the baseline (``uniform``) and ``full``, the paired difference method - baseline is taken over
the samples both have at the same task, setting, scorer and ratio, resampling pairs
(``paired_diff_ci``). Infeasible cells are counted, never averaged.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from depthkv.eval.results import ratio_key
from depthkv.io import atomic_write, write_json

BASELINE = "uniform"
REFERENCE_METHODS = ("full", "uniform", "pyramid")  # everything else is a DepthKV (layer-dependent) method
N_BOOT = 1000
LEVEL = 0.95

CSV_FIELDS = (
    "task", "setting", "method", "scorer", "ratio", "metric", "n", "n_infeasible", "mean", "ci_low", "ci_high",
    "baseline", "diff", "diff_low", "diff_high", "n_pairs", "wins", "ties", "losses", "kv_share", "seconds",
)  # fmt: skip


def cell_of(row: dict) -> tuple[str, str, str, str, str]:
    return (row["task"], row["setting"], row["method"], row.get("scorer") or "-", ratio_key(row["ratio"]))


def _method_order(methods: Iterable[str]) -> list[str]:
    ms = set(methods)
    head = [m for m in REFERENCE_METHODS if m in ms]
    return head + sorted(ms - set(head))


def sort_key(cell: dict, method_rank: dict[str, int]) -> tuple:
    return (cell["task"], cell["setting"], method_rank.get(cell["method"], 99), cell["scorer"], float(cell["ratio"]))


def dedupe(rows: Iterable[dict]) -> list[dict]:
    """One row per cell key (the last one wins: rows of a resumed run are never duplicated anyway)."""
    from depthkv.eval.results import row_key

    seen: dict[str, dict] = {}
    for r in rows:
        seen[row_key(r)] = r
    return list(seen.values())


def summarise(
    rows: Iterable[dict], *, baseline: str = BASELINE, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> list[dict[str, Any]]:
    """One dict per cell (fields :data:`CSV_FIELDS`), sorted by task, setting, method, scorer, ratio."""
    from depthkv.calibration.stats import bootstrap_ci, paired_diff_ci

    rows = dedupe(rows)
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_cell[cell_of(r)].append(r)
    out = []
    for key, group in by_cell.items():
        task, setting, method, scorer, ratio = key
        ok = [r for r in group if r.get("status") == "ok" and r.get("score") is not None]
        scores = {r["sample_id"]: float(r["score"]) for r in ok}
        cell: dict[str, Any] = {
            "task": task, "setting": setting, "method": method, "scorer": scorer, "ratio": float(ratio),
            "metric": group[0].get("primary") or group[0].get("metric"), "n": len(ok),
            "n_infeasible": sum(r.get("status") == "infeasible" for r in group),
            "mean": None, "ci_low": None, "ci_high": None, "baseline": None, "diff": None, "diff_low": None,
            "diff_high": None, "n_pairs": 0, "wins": None, "ties": None, "losses": None,
            "kv_share": float(np.mean([r["kv_share"] for r in ok])) if ok else None,
            "seconds": float(np.mean([r["seconds"] for r in ok])) if ok else None,
        }
        if ok:
            values = np.array([scores[k] for k in sorted(scores)])  # sample order never depends on row order
            ci = bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed)
            cell.update(mean=float(ci.estimate), ci_low=float(ci.low), ci_high=float(ci.high))
        if method not in (baseline, "full"):
            base = by_cell.get((task, setting, baseline, scorer, ratio), [])
            base_scores = {r["sample_id"]: float(r["score"]) for r in base
                           if r.get("status") == "ok" and r.get("score") is not None}
            common = sorted(set(scores) & set(base_scores))
            cell["baseline"] = baseline
            if common:
                a = np.array([scores[s] for s in common])
                b = np.array([base_scores[s] for s in common])
                d = paired_diff_ci(a, b, n_boot=n_boot, level=level, seed=seed)
                cell.update(diff=float(d.estimate), diff_low=float(d.low), diff_high=float(d.high),
                            n_pairs=len(common), wins=int(np.sum(a > b)), ties=int(np.sum(a == b)),
                            losses=int(np.sum(a < b)))
        out.append(cell)
    rank = {m: i for i, m in enumerate(_method_order(c["method"] for c in out))}
    out.sort(key=lambda c: sort_key(c, rank))
    return out


def write_summary(folder: str | Path, cells: Sequence[dict], meta: dict | None = None) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.json`` in ``folder`` (each written atomically)."""
    folder = Path(folder)
    csv_path, json_path = folder / "summary.csv", folder / "summary.json"
    write_csv(csv_path, cells, CSV_FIELDS)
    write_json(json_path, {"kind": "depthkv-eval-summary", "baseline": BASELINE, "n_boot": N_BOOT,
                           "level": LEVEL, **(meta or {}), "cells": list(cells)})
    return csv_path, json_path


def write_csv(path: str | Path, records: Iterable[dict], fields: Sequence[str]) -> Path:
    """``records`` as a CSV with the columns ``fields`` (None as an empty field), written atomically."""
    with atomic_write(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    return Path(path)


def fmt_ci(mean: float | None, lo: float | None, hi: float | None, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    s = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{s} [{lo:+.3f}, {hi:+.3f}]" if signed else f"{s} [{lo:.3f}, {hi:.3f}]"


MIN_PAIRS = 5  # fewer pairs: the bootstrap CI is too coarse to call a difference


def verdict(cell: dict) -> str:
    """'better' / 'worse' when the paired CI excludes 0, 'n.s.' when it does not, 'few' under MIN_PAIRS
    pairs ('' without a difference)."""
    if cell.get("diff") is None:
        return ""
    if cell.get("n_pairs", 0) < MIN_PAIRS:
        return "few"
    if cell["diff_low"] > 0:
        return "better"
    if cell["diff_high"] < 0:
        return "worse"
    return "n.s."


def print_summary(cells: Sequence[dict], title: str = "", console=None) -> None:
    """A rich table: score with 95 % CI per cell and the paired difference against uniform."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
            console = Console(width=200)
    t = Table(title=title or "evaluation summary (mean [95 % bootstrap CI]; diff = method - uniform, paired)")
    for col, just in (("task", "left"), ("setting", "left"), ("method", "left"), ("scorer", "left"),
                      ("ratio", "right"), ("n", "right"), ("score", "right"), ("diff vs uniform", "right"),
                      ("W/T/L", "right"), ("KV kept", "right")):
        t.add_column(col, justify=just)
    for c in cells:
        v = verdict(c)
        diff = fmt_ci(c["diff"], c["diff_low"], c["diff_high"], signed=True)
        if v == "better":
            diff = f"[green]{diff}[/green]"
        elif v == "worse":
            diff = f"[red]{diff}[/red]"
        n = str(c["n"]) + (f" ({c['n_infeasible']} infeasible)" if c["n_infeasible"] else "")
        wtl = f"{c['wins']}/{c['ties']}/{c['losses']}" if c.get("wins") is not None else ""
        t.add_row(c["task"], c["setting"], c["method"], c["scorer"], f"{c['ratio']:g}", n,
                  fmt_ci(c["mean"], c["ci_low"], c["ci_high"]), diff, wtl,
                  "-" if c["kv_share"] is None else f"{c['kv_share']:.3f}")
    console.print(t)
