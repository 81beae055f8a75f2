"""``depthkv report DIR [DIR...] -o report.html``: one self-contained HTML page from evaluation folders.

Contents, per run (a run = the rows of every given folder evaluated with the same model and profile):

* the headline table: full vs uniform vs pyramid vs each DepthKV method at each ratio, mean with its 95 %
  bootstrap CI and the paired difference against uniform (same samples, scorer, ratio);
* quality vs ratio, one PNG per (task, setting);
* a depth x length heatmap for tasks whose samples record a needle depth and length (needle, multikey);
* the sensitivity plot of the profile used and the per-layer budgets each method allocated;
* a few example outputs, the full summary table and the commands that produced the folders.

Transfer matrix: give folders evaluated with *different* profiles (e.g. one profile calibrated on needle
data, one on code) on the same tasks and model; the report then adds, per DepthKV method, setting, scorer
and ratio, a matrix (:mod:`depthkv.eval.transfer`): rows = profile (calibration family), columns = evaluated
task, cell = gain over uniform (method - uniform, paired over the same samples, with its 95 % bootstrap CI).

Plots are PNGs (matplotlib, Agg backend) embedded as base64 and also saved next to the HTML, in
``<report name>_files/``; each figure links to its full-size file. Commands are shown with paths relative
to the repository (or working folder) that holds the report. A folder whose run is unfinished is reported
with the number of missing cells (a warning on stderr and a note on the page).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shlex
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from depthkv.eval.results import CONFIG, EvalError, cell_key, load_rows, read_config, row_key
from depthkv.eval.summary import (
    BASELINE,
    MIN_PAIRS,
    REFERENCE_METHODS,
    _method_order,
    dedupe,
    fmt_ci,
    summarise,
    verdict,
)
from depthkv.extras import pyplot


@dataclass
class Run:
    """Rows of one or more folders sharing a model and a profile."""

    model: str
    model_hash: str
    profile_path: str | None
    profile_sha: str | None
    profile_tasks: list[str] | None
    folders: list[Path] = field(default_factory=list)
    configs: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    cells: list[dict] = field(default_factory=list)
    missing: list[tuple[Path, int, int]] = field(default_factory=list)  # (folder, missing, expected) if unfinished

    @property
    def label(self) -> str:
        if not self.profile_path:
            return f"{self.model}, no profile"
        fam = f" (calibrated on {', '.join(self.profile_tasks)})" if self.profile_tasks else ""
        return f"{Path(self.profile_path).name}{fam} [{(self.profile_sha or '')[:8]}]"

    @property
    def methods(self) -> list[str]:
        return _method_order({r["method"] for r in self.rows})


def load_runs(folders: Sequence[str | Path]) -> list[Run]:
    runs: dict[tuple, Run] = {}
    for f in folders:
        f = Path(f)
        if not f.is_dir():
            raise EvalError(f"{f} is not a folder (give the --out folder of depthkv eval)")
        cfg = read_config(f)
        rows = load_rows(f)
        if cfg is None or not rows:
            raise EvalError(f"{f} holds no evaluation results ({CONFIG} / results.jsonl missing or empty)")
        prof = cfg.get("profile") or {}
        key = (cfg["model"]["config_sha256"], prof.get("sha256"))
        run = runs.get(key)
        if run is None:
            run = runs[key] = Run(cfg["model"]["name"], cfg["model"]["config_sha256"], prof.get("path"),
                                  prof.get("sha256"), prof.get("calibration_tasks"))
        run.folders.append(f)
        run.configs.append(cfg)
        run.rows.extend(rows)
        missing, expected = missing_cells(cfg, rows)
        if missing:
            run.missing.append((f, missing, expected))
    out = list(runs.values())
    for run in out:
        run.rows = dedupe(run.rows)
        run.cells = summarise(run.rows)
    return out


def expected_cells(cfg: dict) -> set[str]:
    """Keys of every cell the run recorded in ``config.json`` asks for (samples x settings x cells)."""
    run = cfg.get("run") or {}
    methods = list(run.get("methods") or [])
    cells = [("full", None, 0.0)] if "full" in methods else []
    cells += [(m, s, float(q)) for m in methods if m != "full" for s in run.get("scorers") or []
              for q in run.get("ratios") or []]
    return {cell_key(task, sid, setting, m, s, q)
            for task, ids in (cfg.get("samples") or {}).items() for sid in ids
            for setting in run.get("settings") or [] for m, s, q in cells}


def missing_cells(cfg: dict, rows: Sequence[dict]) -> tuple[int, int]:
    """(cells the folder's run asks for but has no row for, cells it asks for); (0, 0) if unknown."""
    want = expected_cells(cfg)
    return len(want - {row_key(r) for r in rows}), len(want)


def _repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return None


def relative_command(command: str, root: Path) -> str:
    """``command`` with every absolute path under ``root`` written relative to it (shell-quoted)."""
    try:
        parts = shlex.split(command)
    except ValueError:
        return command
    out = []
    for part in parts:
        if os.path.isabs(part):
            for candidate in (Path(part), Path(part).resolve()):
                try:
                    part = candidate.relative_to(root).as_posix() or "."
                    break
                except ValueError:
                    continue
        out.append(part)
    return shlex.join(out)


# ---------------------------------------------------------------------------------------------- plots


_COLORS = {"full": "black", "uniform": "tab:blue", "pyramid": "tab:orange"}
_DEPTHKV_COLORS = ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def _color(method: str, methods: Sequence[str]) -> str:
    if method in _COLORS:
        return _COLORS[method]
    others = [m for m in methods if m not in _COLORS]
    return _DEPTHKV_COLORS[others.index(method) % len(_DEPTHKV_COLORS)] if method in others else "gray"


def plot_quality(cells: Sequence[dict], task: str, setting: str, path: Path, title: str) -> Path:
    """Mean score vs ratio, one line per (method, scorer) with its 95 % CI band; full as a dashed line."""
    plt = pyplot()
    mine = [c for c in cells if c["task"] == task and c["setting"] == setting and c["mean"] is not None]
    methods = _method_order({c["method"] for c in mine})
    scorers = sorted({c["scorer"] for c in mine if c["method"] != "full"})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ratios = sorted({c["ratio"] for c in mine if c["method"] != "full"}) or [0.0, 1.0]
    for c in mine:
        if c["method"] == "full":
            ax.axhline(c["mean"], color="black", ls="--", lw=1, label=f"full cache ({c['mean']:.2f})")
            ax.axhspan(c["ci_low"], c["ci_high"], color="black", alpha=0.06)
    for m in methods:
        if m == "full":
            continue
        for j, s in enumerate(scorers):
            pts = sorted((c["ratio"], c["mean"], c["ci_low"], c["ci_high"]) for c in mine
                         if c["method"] == m and c["scorer"] == s)
            if not pts:
                continue
            x, y, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
            color = _color(m, methods)
            lw = 2.2 if m not in REFERENCE_METHODS else 1.4
            ax.plot(x, y, marker="o", ms=4, lw=lw, ls=styles[j % len(styles)], color=color,
                    label=f"{m}" + (f" / {s}" if len(scorers) > 1 else ""))
            ax.fill_between(x, lo, hi, color=color, alpha=0.12)
    metric = next((c["metric"] for c in mine), "score")
    ax.set_xlabel("ratio (share of KV pairs removed)")
    ax.set_ylabel(f"{metric} (mean, 95 % CI)")
    ax.set_xticks(ratios)
    ax.set_ylim(-0.03, max(1.03, max((c["ci_high"] for c in mine), default=1) + 0.03))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=FULL_SIZE_DPI)
    plt.close(fig)
    return path


def depth_length_tasks(rows: Sequence[dict]) -> list[str]:
    """Tasks whose rows carry a needle depth and a length in their sample meta."""
    tasks = {r["task"] for r in rows if "depth" in (r.get("sample_meta") or {})
             and "length" in (r.get("sample_meta") or {})}
    return sorted(tasks)


DEPTH_BINS = np.linspace(0.0, 1.0, 6)
FULL_SIZE_DPI = 150  # the page shows figures at most 620 px wide; each links to this full-size PNG


def plot_depth_heatmap(rows: Sequence[dict], task: str, setting: str, scorer: str, path: Path, title: str) -> Path:
    """Mean score by needle depth (5 bins) x context length, one panel per (method, ratio)."""
    plt = pyplot()
    mine = [r for r in rows if r["task"] == task and r["setting"] == setting and r.get("status") == "ok"
            and (r["method"] == "full" or (r.get("scorer") or "-") == scorer)]
    lengths = sorted({int(r["sample_meta"]["length"]) for r in mine})
    methods = _method_order({r["method"] for r in mine})
    ratios = sorted({float(r["ratio"]) for r in mine if r["method"] != "full"})
    panels = [("full", 0.0)] if "full" in methods else []
    panels += [(m, q) for m in methods if m != "full" for q in ratios]
    ncol = max(1, len(ratios))
    nrow = (1 if "full" in methods else 0) + len([m for m in methods if m != "full"])
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.8 + 1.5 * max(2, len(lengths)) * ncol, 1.4 + 2.1 * nrow),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    im = None
    for m, q in panels:
        if m == "full":
            ax = axes[0, 0]
        else:
            row_i = (1 if "full" in methods else 0) + [x for x in methods if x != "full"].index(m)
            ax = axes[row_i, ratios.index(q)]
        ax.axis("on")
        grid = np.full((len(DEPTH_BINS) - 1, len(lengths)), np.nan)
        counts = np.zeros_like(grid)
        sums = np.zeros_like(grid)
        for r in mine:
            if r["method"] != m or (m != "full" and abs(float(r["ratio"]) - q) > 1e-9):
                continue
            d = float(r["sample_meta"]["depth"])
            b = min(int(np.searchsorted(DEPTH_BINS, d, side="right")) - 1, len(DEPTH_BINS) - 2)
            j = lengths.index(int(r["sample_meta"]["length"]))
            sums[b, j] += float(r["score"])
            counts[b, j] += 1
        with np.errstate(invalid="ignore"):
            grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_title(f"{m}" + ("" if m == "full" else f" @ {q:g}"), fontsize=9)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([str(x) for x in lengths], fontsize=7)
        ax.set_yticks(range(len(DEPTH_BINS) - 1))
        ax.set_yticklabels([f"{DEPTH_BINS[k]:.1f}-{DEPTH_BINS[k + 1]:.1f}" for k in range(len(DEPTH_BINS) - 1)],
                           fontsize=7)
        for (yy, xx), v in np.ndenumerate(grid):
            if counts[yy, xx]:
                ax.text(xx, yy, f"{v:.2f}\n(n={int(counts[yy, xx])})", ha="center", va="center", fontsize=7)
    fig.supxlabel("context length (target tokens)", fontsize=9)
    fig.supylabel("needle depth", fontsize=9)
    fig.suptitle(title, fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="mean score")
    fig.savefig(path, dpi=FULL_SIZE_DPI)
    plt.close(fig)
    return path


def budget_ylim(top: float) -> tuple[float, float]:
    """y-range of the budgets plot: from 0, so that a one-token rounding between layers stays a ripple
    instead of filling the axis (matplotlib would zoom onto the tiny spread of a uniform allocation)."""
    return 0.0, max(0.05, min(1.0, top) * 1.08)


def plot_budgets(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """Share of the context each layer keeps, per method, one panel per ratio (mean over samples)."""
    plt = pyplot()
    ok = [r for r in rows if r.get("status") == "ok" and r["method"] != "full" and r.get("budgets")]
    if not ok:
        return None
    ratios = sorted({float(r["ratio"]) for r in ok})
    methods = _method_order({r["method"] for r in ok})
    fig, axes = plt.subplots(1, len(ratios), figsize=(3.6 * len(ratios) + 0.6, 3.2), squeeze=False, sharey=True)
    top = 0.0
    for ax, q in zip(axes[0], ratios):
        for m in methods:
            shares = [np.asarray(r["budgets"], dtype=float) / r["context_len"] for r in ok
                      if r["method"] == m and abs(float(r["ratio"]) - q) < 1e-9]
            if shares:
                mean = np.mean(shares, axis=0)
                top = max(top, float(mean.max()))
                ax.plot(mean, marker=".", ms=3, color=_color(m, methods), label=m,
                        lw=2 if m not in REFERENCE_METHODS else 1.2)
        ax.set_title(f"ratio {q:g}", fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(*budget_ylim(top))
    axes[0, 0].set_ylabel("share of context kept")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=FULL_SIZE_DPI)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- tables


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _ci_html(c: dict | None, diff: bool = False) -> str:
    if c is None:
        return "<td class=na>-</td>"
    if diff:
        if c.get("diff") is None:
            return "<td class=na>-</td>"
        v = verdict(c)
        cls = {"better": "good", "worse": "bad"}.get(v, "")
        return (f"<td class='{cls}'>{c['diff']:+.3f}<br><small>[{c['diff_low']:+.3f}, {c['diff_high']:+.3f}] "
                f"W/T/L {c['wins']}/{c['ties']}/{c['losses']}</small></td>")
    if c["mean"] is None:
        note = "infeasible" if c["n_infeasible"] else "no rows"
        return f"<td class=na>{note}</td>"
    inf = f" <small>({c['n_infeasible']} infeasible)</small>" if c["n_infeasible"] else ""
    return f"<td>{c['mean']:.3f}<br><small>[{c['ci_low']:.3f}, {c['ci_high']:.3f}] n={c['n']}</small>{inf}</td>"


def headline_table(run: Run) -> str:
    """Rows (task, setting, scorer, ratio); columns full | uniform | pyramid | each DepthKV method (+ diff)."""
    cells = {(c["task"], c["setting"], c["method"], c["scorer"], c["ratio"]): c for c in run.cells}
    methods = run.methods
    depthkv = [m for m in methods if m not in REFERENCE_METHODS]
    refs = [m for m in REFERENCE_METHODS if m in methods]
    head = "".join(f"<th>{_esc(m)}</th>" for m in refs)
    head += "".join(f"<th>{_esc(m)}</th><th>{_esc(m)} - {BASELINE}</th>" for m in depthkv)
    if "pyramid" in methods:
        head += f"<th>pyramid - {BASELINE}</th>"
    out = [f"<table class=grid><tr><th>task</th><th>setting</th><th>scorer</th><th>ratio</th>{head}</tr>"]
    keys = sorted({(c["task"], c["setting"], c["scorer"], c["ratio"]) for c in run.cells if c["method"] != "full"})
    for task, setting, scorer, ratio in keys:
        tds = []
        for m in refs:
            if m == "full":
                tds.append(_ci_html(cells.get((task, setting, "full", "-", 0.0))))
            else:
                tds.append(_ci_html(cells.get((task, setting, m, scorer, ratio))))
        for m in depthkv:
            c = cells.get((task, setting, m, scorer, ratio))
            tds.append(_ci_html(c))
            tds.append(_ci_html(c, diff=True))
        if "pyramid" in methods:
            tds.append(_ci_html(cells.get((task, setting, "pyramid", scorer, ratio)), diff=True))
        out.append(f"<tr><td>{_esc(task)}</td><td>{_esc(setting)}</td><td>{_esc(scorer)}</td>"
                   f"<td>{ratio:g}</td>{''.join(tds)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def verdict_lines(run: Run) -> str:
    """Per non-uniform method: in how many cells the paired CI says better / worse / not significant."""
    items = []
    for m in run.methods:
        if m in ("full", BASELINE):
            continue
        cs = [c for c in run.cells if c["method"] == m and c.get("diff") is not None]
        if not cs:
            continue
        v = [verdict(c) for c in cs]
        mean = float(np.mean([c["diff"] for c in cs]))
        few = f", too few pairs (< {MIN_PAIRS}) to tell in {v.count('few')}" if v.count("few") else ""
        items.append(f"<li><b>{_esc(m)}</b> vs {BASELINE}: better in {v.count('better')}, worse in "
                     f"{v.count('worse')}, not significant in {v.count('n.s.')}{few} of {len(cs)} cells "
                     f"(95 % paired bootstrap CI); mean difference over cells {mean:+.3f}</li>")
    return "<ul>" + "".join(items) + "</ul>" if items else "<p>No paired comparisons (no uniform rows).</p>"


def full_table(run: Run) -> str:
    cols = ("task", "setting", "method", "scorer", "ratio", "n", "n_infeasible", "score", "diff vs uniform",
            "kv_share", "seconds")
    out = ["<table class=grid><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for c in run.cells:
        vals = [c["task"], c["setting"], c["method"], c["scorer"], f"{c['ratio']:g}", c["n"], c["n_infeasible"],
                fmt_ci(c["mean"], c["ci_low"], c["ci_high"]),
                fmt_ci(c["diff"], c["diff_low"], c["diff_high"], signed=True),
                "-" if c["kv_share"] is None else f"{c['kv_share']:.3f}",
                "-" if c["seconds"] is None else f"{c['seconds']:.2f}"]
        out.append("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in vals) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def examples_table(run: Run, per_task: int = 1, max_chars: int = 240) -> str:
    """Answer and outputs of the first sample(s) of each task at the highest ratio."""
    out = []
    for task in sorted({r["task"] for r in run.rows}):
        rows = [r for r in run.rows if r["task"] == task]
        setting = sorted({r["setting"] for r in rows})[0]
        ratios = sorted({float(r["ratio"]) for r in rows if r["method"] != "full"})
        top = ratios[-1] if ratios else 0.0
        scorer = sorted({r.get("scorer") or "-" for r in rows if r["method"] != "full"} or {"-"})[0]
        for sid in sorted({r["sample_id"] for r in rows})[:per_task]:
            mine = [r for r in rows if r["sample_id"] == sid and r["setting"] == setting and
                    (r["method"] == "full" or ((r.get("scorer") or "-") == scorer and abs(float(r["ratio"]) - top) < 1e-9))]
            if not mine:
                continue
            ans = mine[0].get("answer") or ""
            out.append(f"<h4>{_esc(task)} / {_esc(sid)} ({_esc(setting)}, {_esc(scorer)}, ratio {top:g})</h4>"
                       f"<p>expected: <code>{_esc(ans[:max_chars])}</code></p><table class=grid>"
                       "<tr><th>method</th><th>score</th><th>output</th></tr>")
            order = {m: i for i, m in enumerate(_method_order({r['method'] for r in mine}))}
            for r in sorted(mine, key=lambda r: order[r["method"]]):
                text = r.get("output") or f"({r.get('status')}: {r.get('error') or ''})"
                sc = "-" if r.get("score") is None else f"{r['score']:.2f}"
                out.append(f"<tr><td>{_esc(r['method'])}</td><td>{sc}</td><td><code>{_esc(text[:max_chars])}</code></td></tr>")
            out.append("</table>")
    return "\n".join(out)


def transfer_matrices(runs: Sequence[Run]) -> list[tuple[str, str, list[dict]]]:
    """(model, method, :func:`depthkv.eval.transfer.transfer_cells`) for each DepthKV method of a model
    evaluated with at least two different profiles; the calibration labels are the runs' labels."""
    from depthkv.eval.transfer import merge_rows, transfer_cells

    out = []
    by_model: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.profile_sha:
            by_model[run.model_hash].append(run)
    for model_runs in by_model.values():
        if len(model_runs) < 2:
            continue
        labels = [run.label for run in model_runs]
        for m in sorted({m for run in model_runs for m in run.methods if m not in REFERENCE_METHODS}):
            try:
                rows = merge_rows({run.label: run.rows for run in model_runs}, m)
            except EvalError:  # no uniform rows, or runs that are not comparable: no matrix for this method
                continue
            cells = transfer_cells(rows, labels, m)
            if cells:
                out.append((model_runs[0].model, m, cells))
    return out


def _verdict_class(c: dict) -> str:
    """CSS class of a paired difference: good / bad when its CI excludes 0, else none."""
    return "good" if c["diff_low"] > 0 else "bad" if c["diff_high"] < 0 else ""


def transfer_html(runs: Sequence[Run]) -> str:
    from depthkv.eval.transfer import panels

    mats = transfer_matrices(runs)
    if not mats:
        return ""
    parts = ["<h2>Transfer matrix</h2><p>Rows: the profile the budgets were allocated from (its calibration "
             "family); columns: the evaluated task. Cell: method - uniform, paired over the same samples, with its "
             "95 % bootstrap CI, and the method's mean score (n samples); one table per setting, scorer and "
             "ratio.</p>"]
    for model, m, cells in mats:
        _, tasks, grids = panels(cells)
        for (setting, scorer, ratio), rows in grids:
            parts.append(f"<h3>{_esc(m)} on {_esc(model)}: ratio {ratio:g} (query-{_esc(setting)}, {_esc(scorer)})"
                         "</h3><table class=grid><tr><th>profile \\ task</th>"
                         + "".join(f"<th>{_esc(t)}</th>" for t in tasks) + "</tr>")
            for lab, row in rows:
                tds = ["<td class=na>-</td>" if c is None else
                       f"<td class='{_verdict_class(c)}'>{c['diff']:+.3f}<br><small>[{c['diff_low']:+.3f}, "
                       f"{c['diff_high']:+.3f}] {m} {c['score']:.3f} n={c['n']}</small></td>" for c in row]
                parts.append(f"<tr><th>{_esc(lab)}</th>{''.join(tds)}</tr>")
            parts.append("</table>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
table.grid{border-collapse:collapse;font-size:12px;margin:0.5em 0}
table.grid td,table.grid th{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
table.grid th{background:#f3f3f3}
td.good{background:#d9f2d9} td.bad{background:#f7d4d4} td.na{color:#999}
img{max-width:100%;border:1px solid #eee;margin:4px 0}
code,pre{background:#f6f6f6;font-size:12px} pre{padding:6px;white-space:pre-wrap}
.figs{display:flex;flex-wrap:wrap;gap:12px} .fig{flex:0 1 620px}
p.warn{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px}
small{color:#555}
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


class _Figures:
    def __init__(self, folder: Path, embed: bool = True):
        self.folder = folder
        self.embed = embed
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{_slug(name)}.png"

    def img(self, path: Path | None, caption: str, command: str | None = None) -> str:
        """A figure at page width that links to its full-size PNG (saved beside the report)."""
        if path is None or not Path(path).exists():
            return ""
        href = Path(path).resolve().relative_to(self.folder.parent.resolve()).as_posix()
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
        else:
            src = href
        cmd = f"<br><small>made by: <code>{_esc(command)}</code></small>" if command else ""
        return (f"<div class=fig><a href='{_esc(href)}' target=_blank title='full-size image'>"
                f"<img src='{src}' alt='{_esc(caption)}'></a><br><small>{_esc(caption)} "
                f"(<a href='{_esc(href)}' target=_blank>full size</a>)</small>{cmd}</div>")


def _command(cfg: dict) -> str:
    cmd = cfg.get("command")
    if cmd:
        return cmd
    run = cfg.get("run", {})
    return (f"depthkv eval --model {run.get('model')} --tasks {','.join(run.get('tasks', []))} --methods "
            f"{','.join(run.get('methods', []))} --scorers {','.join(run.get('scorers', []))} --ratios "
            f"{','.join(str(r) for r in run.get('ratios', []))} --samples {run.get('samples')} --context-tokens "
            f"{run.get('context_tokens')}" + (f" --profile {run['profile']}" if run.get("profile") else ""))


def missing_note(run: Run, root: Path | None = None) -> str:
    """A visible note naming the unfinished folders of ``run`` and how many cells each lacks ('' if none)."""
    if not run.missing:
        return ""
    items = "; ".join(f"<code>{_esc(_show_path(f, root))}</code>: {m:,} of {n:,} cells missing"
                      for f, m, n in run.missing)
    return (f"<p class=warn><b>Incomplete run.</b> {items}. Means and differences below cover only the cells "
            "present; rerun the folder's eval command (it resumes) to finish it.</p>")


def _show_path(path: Path, root: Path | None) -> str:
    if root is not None:
        for candidate in (Path(path), Path(path).resolve()):
            try:
                return candidate.relative_to(root).as_posix() or "."
            except ValueError:
                continue
    return str(path)


def run_section(run: Run, figs: _Figures, idx: int, root: Path | None = None) -> str:
    """One run's section; absolute paths under ``root`` in commands and folder names are shown relative to it."""
    from depthkv.allocation.profile import Profile, ProfileError

    cmds = [_command(c) for c in run.configs]
    if root is not None:
        cmds = [relative_command(c, root) for c in cmds]
    cfg0 = run.configs[0]["run"]
    parts = [f"<h2>Run {idx}: {_esc(run.model)} &mdash; {_esc(run.label)}</h2>", missing_note(run, root),
             "<p>Folders: " + ", ".join(f"<code>{_esc(_show_path(f, root))}</code>" for f in run.folders)
             + f"; {len(run.rows)} rows "
             f"({sum(r.get('status') == 'infeasible' for r in run.rows)} infeasible). Context ~{cfg0.get('context_tokens')} "
             f"tokens; protected window {cfg0.get('n_sink')} sinks + {cfg0.get('n_recent')} recent"
             + ("; layer 0 protected" if cfg0.get("protect_first_layer") else "") + ".</p>",
             "<p>Commands:</p><pre>" + "\n".join(_esc(c) for c in cmds) + "</pre>",
             "<h3>Headline: DepthKV vs uniform vs pyramid</h3>", verdict_lines(run), headline_table(run),
             "<h3>Quality vs ratio</h3><div class=figs>"]
    for task in sorted({c["task"] for c in run.cells}):
        for setting in sorted({c["setting"] for c in run.cells if c["task"] == task}):
            n = max((c["n"] for c in run.cells if c["task"] == task and c["setting"] == setting), default=0)
            title = f"{run.model}: {task}, query-{setting}, {n} samples"
            p = plot_quality(run.cells, task, setting, figs.path(f"run{idx}_quality_{task}_{setting}"), title)
            parts.append(figs.img(p, title, cmds[0]))
    parts.append("</div>")
    dl = depth_length_tasks(run.rows)
    if dl:
        parts.append("<h3>Needle depth x length</h3><div class=figs>")
        for task in dl:
            for setting in sorted({r["setting"] for r in run.rows if r["task"] == task}):
                for scorer in sorted({r.get("scorer") for r in run.rows if r["task"] == task and r.get("scorer")}
                                     or {"-"}):
                    title = f"{run.model}: {task}, query-{setting}, scorer {scorer}: mean score by depth x length"
                    p = plot_depth_heatmap(run.rows, task, setting, scorer,
                                           figs.path(f"run{idx}_heatmap_{task}_{setting}_{scorer}"), title)
                    parts.append(figs.img(p, title, cmds[0]))
        parts.append("</div>")
    parts.append("<h3>Profile and allocation</h3><div class=figs>")
    if run.profile_path:
        try:
            prof = Profile.load(run.profile_path)
            from depthkv.calibration.report import plot_sensitivity

            p = plot_sensitivity(prof, figs.folder / f"run{idx}_profile")
            d = prof.data
            parts.append(figs.img(p, f"per-layer sensitivity of {Path(run.profile_path).name} "
                                     f"({d['data'].get('description', '')})",
                                  (d.get("config") and f"depthkv calibrate --model {run.model} --samples "
                                   f"{d['config'].get('samples')} --context-tokens {d['config'].get('context_tokens')} "
                                   f"--probe-ratios {','.join(str(r) for r in d['probe_ratios'])} --scorer "
                                   f"{d['scorer']['name']}") or None))
        except (OSError, ProfileError, KeyError, json.JSONDecodeError) as exc:
            parts.append(f"<p>profile {_esc(_show_path(Path(run.profile_path), root))} could not be read: "
                         f"{_esc(exc)}</p>")
    p = plot_budgets(run.rows, figs.path(f"run{idx}_budgets"),
                     f"{run.model}: share of the context kept per layer (mean over samples)")
    parts.append(figs.img(p, "per-layer budgets used by each method", cmds[0]))
    parts.append("</div><h3>Example outputs (highest ratio)</h3>")
    parts.append(examples_table(run))
    parts.append("<details><summary>All cells</summary>")
    parts.append(full_table(run))
    parts.append("</details>")
    return "\n".join(parts)


def build_report(
    folders: Sequence[str | Path],
    out: str | Path,
    *,
    embed: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write the HTML report for the evaluation ``folders`` to ``out``; PNGs go to ``<out stem>_files/``.

    ``warn`` receives one line per unfinished folder (default: printed to stderr); the page notes it too.
    Paths in commands are shown relative to the git repository holding the report (else the working folder).
    """
    import depthkv

    pyplot("depthkv report")  # a missing eval extra fails here, before anything is written
    out = Path(out)
    runs = load_runs(folders)
    warn = warn or (lambda line: print(line, file=sys.stderr))
    root = _repo_root(out.resolve().parent) or _repo_root(Path.cwd()) or Path.cwd()
    for run in runs:
        for f, missing, expected in run.missing:
            warn(f"warning: {f}: {missing:,} of {expected:,} cells are missing (unfinished run); the report covers "
                 "the cells present; rerun the folder's eval command to finish it")
    figs = _Figures(out.parent / f"{out.stem}_files", embed=embed)
    body = [f"<h1>depthkv evaluation report</h1><p>{len(runs)} run(s) from {len(folders)} folder(s); "
            f"depthkv {depthkv.__version__}; generated "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}. Scores: mean over samples with a 95 % "
            "percentile-bootstrap CI (1,000 resamples); differences are paired over samples (same sample, scorer, "
            "ratio and setting) against uniform. Green: the CI excludes 0 in favour of the method; red: against "
            f"(called only with at least {MIN_PAIRS} pairs).</p>"]
    body.append(transfer_html(runs))
    for i, run in enumerate(runs, 1):
        body.append(run_section(run, figs, i, root))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>depthkv report</title><style>{CSS}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
