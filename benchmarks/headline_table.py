"""Headline tables and plots of ``depthkv eval`` runs: suite-mean retention and paired differences with CIs.

Reads one or more results folders (``depthkv eval`` runs, and ``benchmarks/kvpress_agnostic.py`` runs whose
``kvpress:<press>`` rows join as one more method on the samples they share) and rows files an earlier table
wrote (``--rows-csv``: each of its runs comes back with the kind, date, model and context length recorded there,
so committed rows are tabulated again with new runs on the same samples), keeps the rows of one setting, and
writes:

* ``PREFIX.md``: the full-cache score per task; suite-mean retention per method and ratio, one table per
  scorer; paired differences of every non-baseline method against each baseline; per-task mean scores;
* ``PREFIX.json``: every number of those tables (and the per-task CIs);
* ``PREFIX.png`` (suite retention vs ratio, one panel per scorer, 95 % CI bands) and ``PREFIX_tasks.png``
  (mean score vs ratio, one panel per task and scorer);
* with ``--rows-csv``: the scored rows as a compact CSV (gzipped when larger than 256 kB: the committed results stay small).

Definitions. Retention of a method on a task = its mean score / the full cache's mean score on the same
samples (kvpress rows are divided by the full cache of their own harness). Suite-mean retention = the mean
of the task retentions over the tasks whose full-cache mean reaches ``--min-full`` (a task the full cache
fails measures nothing; those tasks are listed, and still shown per task). Paired difference = mean over
tasks of the per-task mean of (method - baseline) on the samples both scored, at the same ratio and with the
same scorer (a kvpress baseline, or one given with its scorer as ``METHOD/SCORER``: with every scorer, e.g. a
new scorer against ``adaptive+heads/kvzip``), for every method against each baseline and for each baseline
against the ones listed before it (``--baselines uniform,kvpress:kvzip``: everything against uniform, depthkv
against kvpress's KVzip).
Every 95 % CI is a percentile bootstrap (``depthkv.calibration.stats``) that resamples sample ids within
each task and recomputes numerator and denominator together; the verdict says whether a difference
CI lies above 0 (``for``), below 0 (``against``) or covers it (``inconclusive``). CIs are per comparison,
not corrected for the number of comparisons.

Rows that occur in several folders (the same task, sample, setting, method, scorer and ratio: e.g. the
full-cache rows every ``depthkv eval`` run writes) are compared; the first folder's row is used and the
comparison is reported (``--strict-duplicates``: a differing score is an error). Runs of the same methods under
other conditions (another profile, e.g. one with tuned floor shares; a profile calibrated at another length)
are told apart with ``--tag RUN=TAG``: the rows of folder RUN, except the full cache's, are labelled
``METHOD@TAG`` (``adaptive+heads@floors``), so both appear and are paired like any two methods.

    python benchmarks/headline_table.py runs/aw4k runs/aw4kj --setting aware --baselines uniform,pyramid \
        --out docs/results/qwen_gpu_4k/aware --rows-csv docs/results/qwen_gpu_4k/rows_aware.csv

Each output names the command that made it and the model, runs and dates from the folders' ``config.json``.
The CSV carries them as leading ``#`` lines (``pandas.read_csv(path, comment="#")``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import math
import re
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import command_line
from retention_table import label

from depthkv.calibration.stats import bootstrap_ci, paired_diff_ci, stratified_bootstrap_ci
from depthkv.eval.results import EvalError, load_rows, read_config
from depthkv.extras import MissingExtraError, pyplot
from depthkv.io import atomic_write, write_bytes, write_json

FULL = "full"
KVPRESS_FULL = "full (kvpress harness)"
# kvpress presses that wrap another press's scores sit in the panel of the scores they rank (AdaKV over Expected
# Attention next to Expected Attention)
PRESS_SCORER = {"adakv_ea": "expected_attention"}
FULLS = (FULL, KVPRESS_FULL)
CSV_FIELDS = ("task", "sample_id", "setting", "method", "scorer", "ratio", "score", "kv_share", "new_tokens",
              "seconds", "run")
ROW_KEYS = ("task", "sample_id", "setting", "method", "scorer", "ratio", "status", "score")
SAME_SCORE = 1e-6  # repeated rows closer than this agree (a rows CSV keeps 6 significant digits)
GZIP_ABOVE = 256_000  # bytes of CSV text above which the rows file is written gzipped


class InputError(ValueError):
    """Bad arguments or folders: reported as one line, exit code 2, nothing written."""


@dataclass(frozen=True)
class Options:
    """What to read and how to summarise it."""

    folders: tuple[Path, ...]
    setting: str
    baselines: tuple[str, ...]
    min_full: float = 0.1
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    strict_duplicates: bool = False
    tasks: tuple[str, ...] = ()  # only these tasks (empty: every task in the folders)
    tags: tuple[tuple[str, str], ...] = ()  # (run folder name, tag): its methods are labelled METHOD@TAG


@dataclass
class Run:
    """One results folder and its ``config.json``."""

    folder: Path
    harness: str  # "depthkv" or "kvpress"
    config: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def model(self) -> str | None:
        m = self.config.get("model")
        return m.get("name") if isinstance(m, dict) else m

    @property
    def context_tokens(self) -> int | None:
        v = self.config.get("run", self.config).get("context_tokens")
        return int(v) if v is not None else None

    def describe(self) -> dict[str, Any]:
        """The provenance of this run as the outputs state it."""
        run, profile = self.config.get("run", self.config), self.config.get("profile")
        return {"folder": self.name, "kind": self.config.get("kind", "?"), "model": self.model,
                "created": self.config.get("created"), "command": self.config.get("command"),
                "device": self.config.get("device"), "dtype": run.get("dtype"),
                "context_tokens": self.context_tokens, "samples_per_task": run.get("samples"),
                "profile_sha256": profile.get("sha256") if isinstance(profile, dict) else None}


@dataclass
class Data:
    """Scores of one setting keyed by (task, method label, ratio) -> {sample id: score}, plus what was merged."""

    runs: list[Run]
    scores: dict[tuple[str, str, float], dict[str, float]]
    rows: list[dict]  # the rows used, each with "run" added (for the CSV)
    duplicates: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- labels


def scorer_of(lbl: str) -> str | None:
    """The scorer panel of a label: ``optimal/snapkv`` -> snapkv, ``kvpress:kvzip`` -> kvzip, full -> None."""
    if lbl in FULLS:
        return None
    if lbl.startswith("kvpress:"):
        press = lbl.split(":", 1)[1]
        return PRESS_SCORER.get(press, press)
    return lbl.rsplit("/", 1)[1]


def method_of(lbl: str) -> str:
    """The method of a label without its scorer: ``optimal/snapkv`` -> optimal; kvpress labels stay whole."""
    if lbl in FULLS or lbl.startswith("kvpress:"):
        return lbl
    return lbl.rsplit("/", 1)[0]


def reference_of(lbl: str) -> str:
    """The full-cache label a method's retention is divided by: its own harness's."""
    return KVPRESS_FULL if lbl.startswith("kvpress:") else FULL


def whole_label(baseline: str) -> bool:
    """A baseline that names one label (a kvpress press, or ``METHOD/SCORER``): paired with every scorer."""
    return baseline.startswith("kvpress:") or "/" in baseline


def baseline_label(baseline: str, scorer: str | None) -> str:
    """The label of ``baseline`` for a method with ``scorer`` (a whole-label baseline stays as it is)."""
    return baseline if whole_label(baseline) else f"{baseline}/{scorer}"


def shown_baseline(p: dict) -> str:
    """A paired row's baseline as the tables show it: its method, with its scorer when that is another."""
    b = p["baseline"]
    return b if scorer_of(b) not in (None, p["scorer"]) and not b.startswith("kvpress:") else method_of(b)


def baseline_rank(lbl: str, rank: dict[str, int]) -> int:
    """Position of ``lbl`` among the baselines (by its label or its method; len(rank) when it is none)."""
    return rank.get(lbl, rank.get(method_of(lbl), len(rank)))


def _rkey(ratio: Any) -> float:
    return round(float(ratio), 6)


# ------------------------------------------------------------------------------------------------ loading


# a rows CSV's provenance line: "model: M (DTYPES), setting S, N context tokens; runs: R (KIND, DATE); ..."
_MODEL_LINE = re.compile(r"^# model: (?P<model>\S+) \((?P<dtype>[^)]*)\), setting (?P<setting>\S+), "
                         r"(?P<ctx>\d+|None) context tokens; runs: (?P<runs>.*)$")
_RUN_ITEM = re.compile(r"^(?P<name>[^\s(]+) \((?P<kind>[^,]+), (?P<created>[^)]+)\)$")


def _sources(paths: Iterable[Path]) -> Iterator[tuple[Path, Run, list[dict]]]:
    """(path, run, rows) for each run: a results folder is one run; a rows CSV written by ``--rows-csv`` holds
    several, each rebuilt with the kind, date, model and context length its provenance lines record (so
    committed rows can be tabulated again with new runs, on the same samples)."""
    for path in paths:
        if path.is_file() and path.name.endswith((".csv", ".csv.gz")):
            yield from _csv_runs(path)
            continue
        if not path.is_dir():
            raise InputError(f"{path}: not a folder or a rows CSV")
        config = read_config(path)
        if config is None:
            raise InputError(f"{path}: no config.json (expected a depthkv eval or kvpress_agnostic.py folder)")
        rows = load_rows(path)
        if not rows:
            raise InputError(f"{path}: no rows in results.jsonl")
        yield path, Run(path, _harness(config), config), rows


def _harness(config: dict) -> str:
    return "kvpress" if "kvpress" in str(config.get("kind", "")) else "depthkv"


def _csv_runs(path: Path) -> list[tuple[Path, Run, list[dict]]]:
    """The runs of a rows CSV (see ``rows_csv``), in the order its provenance line lists them."""
    try:
        with (gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)) as fh:
            text = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the rows CSV ({exc})") from None
    header = next((m for line in text.splitlines() if (m := _MODEL_LINE.match(line))), None)
    if header is None:
        raise InputError(f"{path}: no '# model: ...; runs: ...' line (expected a CSV written by --rows-csv)")
    ctx = None if header["ctx"] == "None" else int(header["ctx"])
    rows_of: dict[str, list[dict]] = defaultdict(list)
    reader = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    if tuple(reader.fieldnames or ()) != CSV_FIELDS:
        raise InputError(f"{path}: columns {reader.fieldnames}, expected {', '.join(CSV_FIELDS)}")
    for i, r in enumerate(reader, 1):
        try:
            row = {**r, "ratio": float(r["ratio"]), "score": float(r["score"]), "scorer": r["scorer"] or None,
                   "status": "ok"}
        except ValueError:
            raise InputError(f"{path}: data row {i} has a ratio or score that is not a number") from None
        rows_of[r["run"]].append(row)
    out = []
    for item in header["runs"].split("; "):
        m = _RUN_ITEM.match(item)
        if m is None:
            raise InputError(f"{path}: cannot read the run {item!r} of its provenance line")
        created = None if m["created"] == "date not recorded" else m["created"]
        config = {"kind": m["kind"], "model": header["model"], "context_tokens": ctx, "dtype": header["dtype"],
                  "created": created, "command": f"rows of {path.name}"}
        if rows_of.get(m["name"]):
            out.append((path, Run(path.parent / m["name"], _harness(config), config), rows_of.pop(m["name"])))
    if rows_of:
        raise InputError(f"{path}: rows of runs its provenance line does not list: {', '.join(sorted(rows_of))}")
    return out


def load(folders: Iterable[Path], setting: str, *, strict_duplicates: bool = False,
         tasks: Iterable[str] = (), tags: Iterable[tuple[str, str]] = ()) -> Data:
    """Rows of ``setting`` (and of ``tasks``, when given) from every folder; duplicates of an earlier row are
    compared and left out; ``tags``: (run, tag) pairs, the run's methods labelled ``METHOD@TAG``."""
    only = set(tasks)
    folders = [Path(f) for f in folders]
    tag_of = dict(tags)
    runs: list[Run] = []
    scores: dict[tuple[str, str, float], dict[str, float]] = defaultdict(dict)
    first: dict[tuple, tuple[str, dict]] = {}
    dup: dict[tuple[str, str, str], dict] = {}
    used: list[dict] = []
    skipped: dict[str, int] = {}
    settings_seen: Counter = Counter()
    for folder, run, rows in _sources(folders):
        if run.name in {r.name for r in runs}:
            raise InputError(f"{folder}: a run named {run.name!r} is given twice (runs are named by folder)")
        runs.append(run)
        n_skipped = 0
        for i, row in enumerate(rows, 1):
            missing = [k for k in ROW_KEYS if k not in row]
            if missing:
                raise InputError(f"{folder}: row {i} of run {run.name} lacks {', '.join(missing)}")
            settings_seen[row.get("setting")] += 1
            if row.get("setting") != setting or (only and row["task"] not in only):
                continue
            if row.get("status") != "ok" or row.get("score") is None:
                n_skipped += 1
                continue
            lbl = label(row)
            if run.name in tag_of and lbl != FULL:
                lbl = label({**row, "method": f"{row['method']}@{tag_of[run.name]}"})
            if lbl == FULL and run.harness == "kvpress":
                lbl = KVPRESS_FULL
            key = (row["task"], lbl, 0.0 if lbl in FULLS else _rkey(row["ratio"]))
            sid = row["sample_id"]
            score = float(row["score"])
            if (key, sid) in first:
                src, prev = first[(key, sid)]
                d = dup.setdefault((run.name, src, lbl), {
                    "run": run.name, "first_run": src, "label": lbl, "rows": 0, "score_differs": 0,
                    "output_differs": 0, "output_differs_by_task": Counter(), "output_missing": 0,
                    "max_abs_score_diff": 0.0, "score_differences": []})
                d["rows"] += 1
                delta = abs(score - float(prev["score"]))
                if delta > SAME_SCORE:
                    d["score_differs"] += 1
                    d["max_abs_score_diff"] = max(d["max_abs_score_diff"], delta)
                    d["score_differences"].append({"task": key[0], "sample_id": sid, "ratio": key[2],
                                                   "first": float(prev["score"]), "this": score})
                if row.get("output") is None or prev.get("output") is None:
                    d["output_missing"] += 1  # e.g. rows rebuilt from a CSV: nothing to compare
                elif row["output"] != prev["output"]:
                    d["output_differs"] += 1
                    d["output_differs_by_task"][key[0]] += 1
                continue
            first[(key, sid)] = (run.name, row)
            scores[key][sid] = score
            used.append({**row, "run": run.name, "_label": lbl})
        skipped[run.name] = n_skipped
    unknown = sorted(set(tag_of) - {r.name for r in runs})
    if unknown:
        raise InputError(f"--tag names {', '.join(unknown)}, which is not among the runs' names")
    absent = sorted(only - {key[0] for key in scores})
    if scores and absent:
        raise InputError(f"--tasks: no scored rows of {', '.join(absent)} in setting {setting!r}")
    if not scores:
        found = ", ".join(f"{s} ({n} rows)" for s, n in settings_seen.most_common())
        raise InputError(f"no scored rows with setting {setting!r}; settings found: {found or 'none'}")
    models = {r.model for r in runs}
    if len(models) > 1:
        raise InputError(f"the folders hold different models ({', '.join(sorted(map(str, models)))}); "
                         "compare one model at a time")
    contexts = {r.context_tokens for r in runs if r.context_tokens is not None}
    if len(contexts) > 1:
        raise InputError(f"the folders hold different context lengths ({sorted(contexts)}); "
                         "compare one context length at a time")
    duplicates = []
    for d in dup.values():
        d["output_differs_by_task"] = dict(sorted(d["output_differs_by_task"].items()))
        duplicates.append(d)
    if strict_duplicates:
        bad = [d for d in duplicates if d["score_differs"]]
        if bad:
            d = bad[0]
            raise InputError(f"{d['score_differs']} of {d['rows']} {d['label']!r} rows of {d['run']} score "
                             f"differently from {d['first_run']} (--strict-duplicates)")
    return Data(runs, dict(scores), used, duplicates, skipped)


# ------------------------------------------------------------------------------------------------ numbers


def _num(x: Any) -> float | None:
    """A float for JSON, None for NaN/inf (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _ci(ci) -> list[float | None]:
    return [_num(ci.low), _num(ci.high)]


def verdict(low: float | None, high: float | None, n: int) -> str:
    """``for`` (CI above 0), ``against`` (CI below 0), else ``inconclusive`` (also with fewer than 2 pairs)."""
    if n < 2 or low is None or high is None:
        return "inconclusive"
    if low > 0:
        return "for"
    if high < 0:
        return "against"
    return "inconclusive"


def _ratio_of_means(*groups: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over groups of mean(row 0) / mean(row 1): the suite-mean retention of [score; full] groups."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return sum(g[0].mean(axis=axis) / g[1].mean(axis=axis) for g in groups) / len(groups)


def _mean_of_means(*groups: np.ndarray, axis: int = -1) -> np.ndarray:
    return sum(g.mean(axis=axis) for g in groups) / len(groups)


@dataclass
class Summary:
    """Everything the tables, the JSON file and the plots show."""

    tasks: list[dict]
    labels: list[str]
    scorers: list[str]
    ratios: list[float]
    cells: list[dict]
    suite: list[dict]
    paired: list[dict]
    common: dict | None
    harness_agreement: list[dict]


def _retention_cell(scores: dict[str, float], full: dict[str, float], ids: list[str], opts: Options) -> dict:
    x = np.array([scores[i] for i in ids])
    f = np.array([full[i] for i in ids])
    mean_ci = bootstrap_ci(x, n_boot=opts.n_boot, level=opts.level, seed=opts.seed)
    ret_ci = stratified_bootstrap_ci([np.stack([x, f])], _ratio_of_means, n_boot=opts.n_boot, level=opts.level,
                                     seed=opts.seed)
    return {"n": len(ids), "mean": float(x.mean()), "mean_ci": _ci(mean_ci), "full_mean": float(f.mean()),
            "retention": _num(ret_ci.estimate), "retention_ci": _ci(ret_ci)}


def _suite(data: Data, keys: list[tuple[str, float]], included: list[str], opts: Options,
           ids_for: Callable[[str, str, float], list[str]]) -> list[dict]:
    """Suite-mean retention of each (label, ratio) over the included tasks (all of them must have the cell)."""
    out = []
    for lbl, r in keys:
        groups, missing = [], []
        for task in included:
            ids = ids_for(task, lbl, r)
            if not ids:
                missing.append(task)
                continue
            s, f = data.scores[(task, lbl, r)], data.scores[(task, reference_of(lbl), 0.0)]
            groups.append(np.stack([np.array([s[i] for i in ids]), np.array([f[i] for i in ids])]))
        entry = {"label": lbl, "method": method_of(lbl), "scorer": scorer_of(lbl), "ratio": r,
                 "n_tasks": len(groups), "n_samples": int(sum(g.shape[1] for g in groups)),
                 "missing_tasks": missing, "retention": None, "ci": [None, None]}
        if groups and not missing:
            ci = stratified_bootstrap_ci(groups, _ratio_of_means, n_boot=opts.n_boot, level=opts.level,
                                         seed=opts.seed)
            entry["retention"], entry["ci"] = _num(ci.estimate), _ci(ci)
        out.append(entry)
    return out


def summarise(data: Data, opts: Options) -> Summary:
    """Task table, per-task cells, suite retention, common-sample retention and paired differences."""
    keys = sorted({(lbl, r) for (_, lbl, r) in data.scores if lbl not in FULLS}, key=lambda k: (k[0], k[1]))
    labels = sorted({lbl for lbl, _ in keys})
    methods = {method_of(lbl) for lbl in labels}
    unknown = [b for b in opts.baselines if b not in (labels if "/" in b else methods)]
    if unknown:
        raise InputError(f"unknown baseline {unknown[0]!r}; methods in the data: {', '.join(sorted(methods))}"
                         + (f"; labels: {', '.join(labels)}" if "/" in unknown[0] else ""))
    all_tasks = list(dict.fromkeys(t for (t, _, _) in data.scores))  # the order the runs list them
    tasks = []
    for task in all_tasks:
        full = data.scores.get((task, FULL, 0.0), {})
        entry: dict[str, Any] = {"task": task, "n_full": len(full), "full_mean": None, "included": False,
                                 "reason": None}
        if not full:
            entry["reason"] = "no full-cache rows"
        else:
            entry["full_mean"] = float(np.mean(list(full.values())))
            if entry["full_mean"] < opts.min_full:
                entry["reason"] = f"full-cache mean {entry['full_mean']:.3f} < {opts.min_full:g}"
            else:
                entry["included"] = True
        tasks.append(entry)
    included = [t["task"] for t in tasks if t["included"]]
    if not included:
        raise InputError(f"no task reaches the full-cache floor --min-full {opts.min_full:g}")

    def own_ids(task: str, lbl: str, r: float) -> list[str]:
        s = data.scores.get((task, lbl, r), {})
        return sorted(set(s) & set(data.scores.get((task, reference_of(lbl), 0.0), {})))

    cells = []
    for task in all_tasks:
        for lbl, r in keys:
            ids = own_ids(task, lbl, r)
            if ids:
                cell = _retention_cell(data.scores[(task, lbl, r)], data.scores[(task, reference_of(lbl), 0.0)],
                                       ids, opts)
                cells.append({"task": task, "label": lbl, "method": method_of(lbl), "scorer": scorer_of(lbl),
                              "ratio": r, **cell})
    suite = _suite(data, keys, included, opts, own_ids)

    # the samples every method has: a like-for-like table when some methods ran on fewer samples
    common = None
    common_ids: dict[str, list[str]] = {}
    for task in included:
        sets = [set(data.scores[(task, lbl, r)]) for lbl, r in keys if (task, lbl, r) in data.scores]
        sets += [set(data.scores[(task, f, 0.0)]) for f in FULLS if (task, f, 0.0) in data.scores]
        common_ids[task] = sorted(set.intersection(*sets)) if sets else []
    if any(len(common_ids[t]) < max(len(own_ids(t, lbl, r)) for lbl, r in keys) for t in included):
        common = {"n_per_task": {t: len(v) for t, v in common_ids.items()},
                  "suite": _suite(data, keys, included, opts,
                                  lambda task, lbl, r: common_ids[task] if own_ids(task, lbl, r) else [])}

    paired = []
    rank = {b: i for i, b in enumerate(opts.baselines)}
    key_set = set(keys)
    for bi, base in enumerate(opts.baselines):
        for lbl, r in keys:
            if baseline_rank(lbl, rank) <= bi:  # the baseline itself, or an earlier baseline
                continue
            blbl = baseline_label(base, scorer_of(lbl))
            # a depthkv baseline pairs with the methods of its own scorer; a kvpress press (another tool at the
            # same ratio) or a METHOD/SCORER label with every method, whatever its scorer
            if (blbl, r) not in key_set or (not whole_label(base) and scorer_of(blbl) != scorer_of(lbl)):
                continue
            per_task, groups, missing = [], [], []
            for task in all_tasks:
                a, b = data.scores.get((task, lbl, r), {}), data.scores.get((task, blbl, r), {})
                ids = sorted(set(a) & set(b))
                if not ids:
                    if task in included:
                        missing.append(task)
                    continue
                xa, xb = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
                d = xa - xb
                ci = paired_diff_ci(xa, xb, n_boot=opts.n_boot, level=opts.level, seed=opts.seed)
                lo, hi = _ci(ci)
                per_task.append({"task": task, "included": task in included, "n": len(ids),
                                 "diff": float(d.mean()), "ci": [lo, hi], "verdict": verdict(lo, hi, len(ids))})
                if task in included:
                    groups.append(d)
            entry = {"label": lbl, "method": method_of(lbl), "scorer": scorer_of(lbl), "ratio": r,
                     "baseline": blbl, "n_pairs": int(sum(len(g) for g in groups)), "n_tasks": len(groups),
                     "missing_tasks": missing, "diff": None, "ci": [None, None], "verdict": "inconclusive",
                     "tasks": per_task}
            if groups and not missing:
                ci = stratified_bootstrap_ci(groups, _mean_of_means, n_boot=opts.n_boot, level=opts.level,
                                             seed=opts.seed)
                entry["diff"], entry["ci"] = _num(ci.estimate), _ci(ci)
                entry["verdict"] = verdict(*entry["ci"], entry["n_pairs"])
            paired.append(entry)

    agreement = []
    for task in all_tasks:
        a, b = data.scores.get((task, FULL, 0.0), {}), data.scores.get((task, KVPRESS_FULL, 0.0), {})
        ids = sorted(set(a) & set(b))
        if ids:
            agreement.append({"task": task, "n": len(ids), "depthkv_mean": float(np.mean([a[i] for i in ids])),
                              "kvpress_mean": float(np.mean([b[i] for i in ids])),
                              "score_differs": int(sum(a[i] != b[i] for i in ids))})
    scorers = list(dict.fromkeys(scorer_of(lbl) for (_, lbl, _) in data.scores if lbl not in FULLS))
    ratios = sorted({r for _, r in keys})
    return Summary(tasks, labels, scorers, ratios, cells, suite, paired, common, agreement)


# ------------------------------------------------------------------------------------------------ outputs


def provenance(data: Data, opts: Options, command: str) -> dict[str, Any]:
    """Command, model, data and dates, as every output states them."""
    runs = [r.describe() for r in data.runs]
    dtypes = sorted({str(r["dtype"]) for r in runs if r["dtype"]})
    return {"command": command, "model": data.runs[0].model, "dtype": ", ".join(dtypes) or None,
            "setting": opts.setting, "context_tokens": data.runs[0].context_tokens,
            "dates": sorted({r["created"] for r in runs if r["created"]}), "runs": runs}


def _provenance_lines(meta: dict) -> list[str]:
    runs = "; ".join(f"{r['folder']} ({r['kind']}, {r['created'] or 'date not recorded'})" for r in meta["runs"])
    return [f"made by: {meta['command']}",
            f"model: {meta['model']} ({meta['dtype'] or 'dtype not recorded'}), setting {meta['setting']}, "
            f"{meta['context_tokens']} context tokens; runs: {runs}"]


def _fmt(x: float | None, ci: list | None = None, signed: bool = False, digits: int = 2) -> str:
    """``x [low, high]`` rounded to ``digits``; ``–`` for a missing value."""
    if x is None:
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if ci is None or ci[0] is None:
        return f.format(x)
    return f"{f.format(x)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def _method_order(labels: Iterable[str], baselines: tuple[str, ...]) -> list[str]:
    """Baselines first (in the order given), then the other methods alphabetically."""
    labels = list(labels)
    rank = {b: i for i, b in enumerate(baselines)}
    return sorted(labels, key=lambda lbl: (baseline_rank(lbl, rank), method_of(lbl), lbl))


def render_markdown(s: Summary, meta: dict, opts: Options, data: Data, outputs: dict[str, str],
                    plots: tuple[str, str]) -> str:
    """The Markdown report; ``outputs`` = {file name: what it holds}, ``plots`` = the two PNG file names."""
    pct = f"{100 * opts.level:g} %"
    lines = [f"# {meta['model']}: {opts.setting} setting, {meta['context_tokens']} context tokens", ""]
    lines += [f"- {line}" for line in _provenance_lines(meta)]
    for r in meta["runs"]:
        if r["command"]:
            lines.append(f"- {r['folder']}: `{r['command']}`")
    lines += ["", f"Retention = mean score / full-cache mean score on the same samples (kvpress rows: the full "
              f"cache of their own harness). Suite mean = mean over the included tasks. [low, high] = {pct} "
              f"percentile bootstrap ({opts.n_boot} resamples, seed {opts.seed}) over sample ids within each "
              "task, numerator and denominator resampled together. Verdict: the difference CI lies above 0 "
              "(`for`), below 0 (`against`) or covers 0 (`inconclusive`); per comparison, not corrected "
              "for the number of comparisons.", ""]

    lines += ["## Full-cache score per task", "", "| task | samples | full-cache mean | in suite mean |",
              "|---|---:|---:|---|"]
    for t in s.tasks:
        lines.append(f"| {t['task']} | {t['n_full']} | {_fmt(t['full_mean'])} | "
                     f"{'yes' if t['included'] else 'no: ' + t['reason']} |")
    excluded = [t for t in s.tasks if not t["included"]]
    lines.append("")
    if excluded:
        lines.append("Excluded from the suite means (full cache below --min-full "
                     f"{opts.min_full:g}): {', '.join(t['task'] for t in excluded)}.")
    else:
        lines.append(f"No task excluded (every full-cache mean reaches --min-full {opts.min_full:g}).")
    lines.append("")

    def suite_tables(entries: list[dict], title: str, note: str | None = None) -> None:
        lines.extend([title, ""])
        if note:
            lines.extend([note, ""])
        by = {(e["label"], e["ratio"]): e for e in entries}
        for sc in s.scorers:
            lbls = _method_order([lbl for lbl in s.labels if scorer_of(lbl) == sc], opts.baselines)
            lines.extend([f"### scorer {sc}", "", "| method | " + " | ".join(f"{r:g}" for r in s.ratios) + " |",
                          "|---|" + "---:|" * len(s.ratios)])
            for lbl in lbls:
                cells = []
                for r in s.ratios:
                    e = by.get((lbl, r))
                    cells.append(_fmt(e["retention"], e["ci"]) if e and e["retention"] is not None else "–")
                lines.append(f"| {method_of(lbl)} | " + " | ".join(cells) + " |")
            lines.append("")

    n_inc = sum(t["included"] for t in s.tasks)
    suite_tables(s.suite, f"## Suite-mean retention ({n_inc} tasks; columns: compression ratio)")
    partial = [e for e in s.suite if e["missing_tasks"] and e["n_tasks"]]
    if partial:
        gaps = sorted({t for e in partial for t in e["missing_tasks"]})
        lines += [f"– : missing on some included tasks ({', '.join(gaps)})", ""]
    if s.common:
        n = ", ".join(f"{t} {k}" for t, k in s.common["n_per_task"].items())
        suite_tables(s.common["suite"], "## Suite-mean retention on the samples every method has",
                     f"Samples per task: {n}.")

    among = "; each baseline is also compared with the baselines listed before it" if len(opts.baselines) > 1 else ""
    lines += [f"## Paired differences vs {', '.join(opts.baselines)} (score of method - baseline)", "",
              "Suite mean of the per-task mean differences on the samples both scored (same ratio; same scorer, "
              f"except against a kvpress press){among}.",
              "", "| scorer | ratio | method | baseline | pairs | difference [CI] | verdict |",
              "|---|---:|---|---|---:|---|---|"]
    order = {lbl: i for i, lbl in enumerate(_method_order(s.labels, opts.baselines))}
    paired = sorted(s.paired, key=lambda p: (p["scorer"] or "", p["ratio"], order[p["label"]], p["baseline"]))
    for p in paired:
        lines.append(f"| {p['scorer']} | {p['ratio']:g} | {p['method']} | {shown_baseline(p)} | "
                     f"{p['n_pairs']} | {_fmt(p['diff'], p['ci'], signed=True, digits=3)} | {p['verdict']} |")
    lines += ["", "<details><summary>Per task</summary>", "",
              "| scorer | ratio | method | baseline | task | pairs | difference [CI] | verdict |",
              "|---|---:|---|---|---|---:|---|---|"]
    for p in paired:
        for t in p["tasks"]:
            name = t["task"] if t["included"] else f"{t['task']} (excluded)"
            lines.append(f"| {p['scorer']} | {p['ratio']:g} | {p['method']} | {shown_baseline(p)} | "
                         f"{name} | "
                         f"{t['n']} | {_fmt(t['diff'], t['ci'], signed=True, digits=3)} | {t['verdict']} |")
    lines += ["", "</details>", ""]

    lines += ["## Per-task mean score (retention)", ""]
    by_cell = {(c["task"], c["label"], c["ratio"]): c for c in s.cells}
    full_n = {t["task"]: t["n_full"] for t in s.tasks}
    for sc in s.scorers:
        lbls = _method_order([lbl for lbl in s.labels if scorer_of(lbl) == sc], opts.baselines)
        heads = []
        for lbl in lbls:
            ns = {c["n"] for c in s.cells if c["label"] == lbl and c["n"] != full_n.get(c["task"])}
            heads.append(method_of(lbl) + (f" (n={', '.join(map(str, sorted(ns)))})" if ns else ""))
        lines += [f"### scorer {sc}", "", "| task | full | ratio | " + " | ".join(heads) + " |",
                  "|---|---:|---:|" + "---:|" * len(lbls)]
        for t in s.tasks:
            for r in s.ratios:
                cells = []
                for lbl in lbls:
                    c = by_cell.get((t["task"], lbl, r))
                    cells.append(f"{c['mean']:.2f} ({_fmt(c['retention'])})" if c else "–")
                if any(c != "–" for c in cells):
                    lines.append(f"| {t['task']} | {_fmt(t['full_mean'])} | {r:g} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Rows merged from several folders", ""]
    if not data.duplicates:
        lines += ["No row occurs in more than one folder.", ""]
    for d in data.duplicates:
        text = (f"- {d['run']} repeats {d['rows']} `{d['label']}` rows of {d['first_run']}: "
                f"{d['rows'] - d['score_differs']} with the same score, {d['score_differs']} different")
        if d["score_differences"]:
            ex = ", ".join(f"{x['sample_id']} {x['first']:g} vs {x['this']:g}"
                           for x in d["score_differences"][:5])
            text += f" ({ex}{', ...' if d['score_differs'] > 5 else ''})"
        text += f"; output text differs in {d['output_differs']}"
        if d["output_differs_by_task"]:
            text += " (" + ", ".join(f"{t} {n}" for t, n in d["output_differs_by_task"].items()) + ")"
        if d["output_missing"]:
            text += f", not compared in {d['output_missing']} (no output text in one of the rows)"
        lines.append(text + f". The rows of {d['first_run']} are used.")
    if data.duplicates:
        lines.append("")
    if s.harness_agreement:
        lines += ["The full cache in both harnesses, on the samples both ran:", ""]
    for a in s.harness_agreement:
        lines.append(f"- full cache, depthkv vs kvpress harness, {a['task']}: {a['depthkv_mean']:.3f} vs "
                     f"{a['kvpress_mean']:.3f} on {a['n']} common samples, "
                     f"{a['score_differs']} with a different score")
    if s.harness_agreement:
        lines.append("")
    skipped = {k: v for k, v in data.skipped.items() if v}
    if skipped:
        lines += ["Rows left out (status not ok or no score): "
                  + ", ".join(f"{k} {v}" for k, v in skipped.items()), ""]

    lines += ["## Files", ""]
    lines += [f"- `{name}`: {what}" for name, what in outputs.items()]
    lines += ["", f"![suite-mean retention]({plots[0]})", "", f"![per-task mean score]({plots[1]})", ""]
    return "\n".join(lines)


def _colors(plt, labels: Iterable[str]) -> dict[str, Any]:
    """One colour per method, the same in every panel."""
    methods = sorted({method_of(lbl) for lbl in labels})
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _footer(fig, meta: dict) -> float:
    """Write the provenance lines at the bottom of ``fig``; return the share of its height they take."""
    width, height = fig.get_size_inches()
    lines = [w for line in _provenance_lines(meta) for w in textwrap.wrap(line, int(width * 21))]
    fig.text(0.005, 0.005, "\n".join(lines), fontsize=6, va="bottom", ha="left", color="0.3")
    return (0.1 * len(lines) + 0.1) / height


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    return buf.getvalue()


def render_plots(s: Summary, meta: dict, opts: Options) -> tuple[bytes, bytes]:
    """(suite retention vs ratio, one panel per scorer; per-task mean score vs ratio) as PNG bytes."""
    plt = pyplot("the headline plots")
    colors = _colors(plt, s.labels)
    n_inc = sum(t["included"] for t in s.tasks)
    excluded = [t["task"] for t in s.tasks if not t["included"]]
    by = defaultdict(list)
    for e in s.suite:
        if e["retention"] is not None:
            by[e["label"]].append(e)

    def style(lbl: str) -> dict:
        base = method_of(lbl) in opts.baselines or lbl in opts.baselines
        return {"color": colors[method_of(lbl)], "ls": "--" if base else "-", "marker": "s" if base else "o",
                "ms": 4, "lw": 1.5}

    fig, axes = plt.subplots(1, len(s.scorers), figsize=(max(7.0, 5.2 * len(s.scorers)), 4.8), squeeze=False)
    for ax, sc in zip(axes[0], s.scorers):
        for lbl in _method_order([lbl for lbl in s.labels if scorer_of(lbl) == sc], opts.baselines):
            es = sorted(by.get(lbl, []), key=lambda e: e["ratio"])
            if not es:
                continue
            x = [e["ratio"] for e in es]
            ax.plot(x, [e["retention"] for e in es], label=method_of(lbl), **style(lbl))
            ax.fill_between(x, [e["ci"][0] for e in es], [e["ci"][1] for e in es], color=colors[method_of(lbl)],
                            alpha=0.15, lw=0)
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":", label="full cache")
        ax.set(title=f"scorer {sc}", xlabel="compression ratio (share of KV pairs removed)",
               ylabel="suite-mean retention", xticks=s.ratios)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = f"{meta['model']}, {opts.setting}, {meta['context_tokens']} tokens: mean over {n_inc} tasks"
    if excluded:
        title += f" (excluded, full < {opts.min_full:g}: {', '.join(excluded)})"
    fig.suptitle(textwrap.fill(title + f", {100 * opts.level:g} % CI bands", int(fig.get_size_inches()[0] * 13)),
                 fontsize=10)
    fig.tight_layout(rect=(0, _footer(fig, meta), 1, 1))
    suite_png = _png(fig)
    plt.close(fig)

    by_cell = defaultdict(list)
    for c in s.cells:
        by_cell[(c["task"], c["label"])].append(c)
    tasks = s.tasks
    ncols = min(4, len(tasks))
    per_scorer = -(-len(tasks) // ncols)
    nrows = per_scorer * len(s.scorers)
    height = 2.4 * nrows + 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 3.2 * ncols), height), squeeze=False)
    for ax in axes.flat[len(tasks) * len(s.scorers):]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for block, sc in enumerate(s.scorers):
        for k, t in enumerate(tasks):
            row, col = block * per_scorer + k // ncols, k % ncols
            ax = axes[row][col]
            for lbl in _method_order([lbl for lbl in s.labels if scorer_of(lbl) == sc], opts.baselines):
                cs = sorted(by_cell.get((t["task"], lbl), []), key=lambda c: c["ratio"])
                if not cs:
                    continue
                x = [c["ratio"] for c in cs]
                (h,) = ax.plot(x, [c["mean"] for c in cs], **style(lbl))
                ax.fill_between(x, [c["mean_ci"][0] for c in cs], [c["mean_ci"][1] for c in cs],
                                color=colors[method_of(lbl)], alpha=0.12, lw=0)
                handles.setdefault(method_of(lbl), h)
            if t["full_mean"] is not None:
                handles.setdefault("full cache", ax.axhline(t["full_mean"], color="0.4", lw=0.9, ls=":"))
            name = t["task"] + ("" if t["included"] else " (excluded)")
            ax.set_title(f"{name} / {sc}", fontsize=8)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xticks(s.ratios, [f"{r:g}" for r in s.ratios], rotation=90)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("mean score", fontsize=8)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(8, len(handles)), fontsize=8,
               frameon=False)
    for k in range(min(ncols, len(tasks))):  # the lowest panel of each column names the axis
        axes[(len(s.scorers) - 1) * per_scorer + (len(tasks) - 1 - k) // ncols][k].set_xlabel("ratio", fontsize=8)
    fig.tight_layout(rect=(0, _footer(fig, meta), 1, 1 - 0.4 / height))
    tasks_png = _png(fig)
    plt.close(fig)
    return suite_png, tasks_png


def rows_csv(data: Data, meta: dict) -> str:
    """The scored rows as CSV text with ``#`` provenance lines first."""
    buf = io.StringIO()
    for line in _provenance_lines(meta):
        buf.write(f"# {line}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    rows = sorted(data.rows, key=lambda r: (r["task"], r["_label"], _rkey(r["ratio"]), r["sample_id"], r["run"]))
    for r in rows:
        share = r.get("kv_share", r.get("kv_kept_share"))
        secs = r.get("seconds")
        w.writerow((r["task"], r["sample_id"], r["setting"], r["method"], r.get("scorer") or "",
                    f"{float(r['ratio']):g}", f"{float(r['score']):.6g}",
                    "" if share is None else f"{float(share):.6g}", r.get("new_tokens", ""),
                    "" if secs is None else f"{float(secs):.4g}", r["run"]))
    return buf.getvalue()


def _parse_args(argv: list[str]) -> tuple[Options, Path, Path | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path,
                    help="results folders, or rows CSVs an earlier table wrote with --rows-csv (several are merged)")
    ap.add_argument("--setting", required=True, help="aware or agnostic: the rows' setting to summarise")
    ap.add_argument("--baselines", default="uniform", help="comma-separated baseline methods (default uniform)")
    ap.add_argument("--min-full", type=float, default=0.1,
                    help="tasks whose full-cache mean is below this are left out of suite means (default 0.1)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ap.add_argument("--tasks", default="",
                    help="comma-separated tasks to summarise (default: every task in the folders), e.g. the tasks "
                         "a run stopped at its time limit reached")
    ap.add_argument("--strict-duplicates", action="store_true",
                    help="fail when a row repeated across folders has a different score")
    ap.add_argument("--out", type=Path, required=True,
                    help="output prefix: writes PREFIX.md, PREFIX.json, PREFIX.png, PREFIX_tasks.png")
    ap.add_argument("--tag", action="append", default=[], metavar="RUN=TAG",
                    help="label the methods of run folder RUN as METHOD@TAG (runs of the same methods under other "
                         "conditions, e.g. another profile); repeatable")
    ap.add_argument("--rows-csv", type=Path, default=None,
                    help="also write the scored rows here (as PATH.gz when larger than 256 kB)")
    args = ap.parse_args(argv)
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    if not baselines:
        ap.error("--baselines needs at least one method")
    if not (args.min_full >= 0 and math.isfinite(args.min_full)):
        ap.error(f"--min-full must be a finite number >= 0, got {args.min_full}")
    if args.n_boot < 1:
        ap.error(f"--n-boot must be >= 1, got {args.n_boot}")
    if args.out.suffix in (".md", ".json", ".png"):
        ap.error(f"--out is a prefix without extension (got {args.out})")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    tags = []
    for spec in args.tag:
        run_name, sep, tag = spec.partition("=")
        if not sep or not run_name or not tag or any(c in tag for c in "/@ \t,"):
            ap.error(f"--tag takes RUN=TAG (a folder name, and a tag without '/', '@', ',' or spaces), got {spec!r}")
        tags.append((run_name, tag))
    if len({r for r, _ in tags}) != len(tags):
        ap.error("--tag: one tag per run")
    opts = Options(tuple(args.folders), args.setting, baselines, args.min_full, args.n_boot, 0.95, args.seed,
                   args.strict_duplicates, tasks, tuple(tags))
    return opts, args.out, args.rows_csv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, out, csv_path = _parse_args(argv)
    command = command_line(__file__, argv)
    try:
        data = load(opts.folders, opts.setting, strict_duplicates=opts.strict_duplicates, tasks=opts.tasks,
                    tags=opts.tags)
        summary = summarise(data, opts)
        meta = provenance(data, opts, command)
        suite_png, tasks_png = render_plots(summary, meta, opts)
    except (InputError, EvalError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md_path, json_path = out.with_name(out.name + ".md"), out.with_name(out.name + ".json")
    png_path, tasks_path = out.with_name(out.name + ".png"), out.with_name(out.name + "_tasks.png")
    outputs = {md_path.name: "these tables", json_path.name: "every number of these tables and the per-task CIs",
               png_path.name: "suite-mean retention vs ratio, one panel per scorer, CI bands",
               tasks_path.name: "mean score vs ratio per task and scorer, CI bands; dotted: full cache"}
    csv_payload: bytes | None = None
    if csv_path is not None:
        text = rows_csv(data, meta).encode()
        if len(text) > GZIP_ABOVE:
            csv_payload, csv_final = gzip.compress(text, mtime=0), csv_path.with_name(csv_path.name + ".gz")
        else:
            csv_payload, csv_final = text, csv_path
        outputs[csv_final.name] = f"the {len(data.rows)} scored rows used ({', '.join(CSV_FIELDS)})"
    result = {"meta": meta, "options": {"setting": opts.setting, "baselines": list(opts.baselines),
                                        "min_full": opts.min_full, "n_boot": opts.n_boot, "level": opts.level,
                                        "seed": opts.seed},
              "tasks": summary.tasks, "excluded_tasks": [t["task"] for t in summary.tasks if not t["included"]],
              "scorers": summary.scorers, "ratios": summary.ratios, "labels": summary.labels,
              "suite": summary.suite, "common_samples": summary.common, "paired": summary.paired,
              "cells": summary.cells, "duplicates": data.duplicates,
              "harness_agreement": summary.harness_agreement,
              "skipped_rows": data.skipped}
    md = render_markdown(summary, meta, opts, data, outputs, (png_path.name, tasks_path.name))
    with atomic_write(md_path) as fh:
        fh.write(md)
    write_json(json_path, result)
    write_bytes(png_path, suite_png)
    write_bytes(tasks_path, tasks_png)
    if csv_payload is not None:
        write_bytes(csv_final, csv_payload)
        stale = csv_path if csv_final != csv_path else csv_path.with_name(csv_path.name + ".gz")
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()  # the other form of an earlier run would contradict this one
    for name in outputs:
        print(out.parent / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
