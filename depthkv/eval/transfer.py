"""Transfer matrix: budgets allocated from a profile calibrated on family A, evaluated on family B.

    python -m depthkv.eval.transfer mix=runs/mix needle=runs/needle multikey=runs/multikey --out DIR

Each folder is a ``depthkv eval`` run of the same model, tasks, samples and settings, with its own
``--profile``; the label (``LABEL=FOLDER``) names the calibration family, by default the profile's
calibration tasks (``mix`` when there are several). The ``uniform`` baseline does not depend on the profile
(same prefill, same budgets, greedy decoding), so it may come from any folder: folders evaluated with
``--methods optimal`` alone reuse the one that has it. Where several folders hold the same uniform cell,
their scores must agree (checked: a difference means the runs are not comparable).

One cell per (calibration label, task, setting, scorer, ratio): the method's mean score with its 95 %
bootstrap CI and the paired difference method - uniform over the same samples with its 95 % CI
(:func:`depthkv.eval.summary.summarise`, which pairs by sample id). Written to ``DIR``: ``transfer.json``
(cells + per-profile allocation summary), ``transfer.csv``, ``transfer.md``, ``transfer_matrix.png``,
``profiles_sensitivity.png`` and ``rows.csv`` (every scored row used: method, task, sample, score, output).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from depthkv.eval.results import EvalError, load_rows, read_config, row_key, write_rows_csv
from depthkv.eval.summary import BASELINE, summarise, write_csv
from depthkv.extras import MissingExtraError, pyplot
from depthkv.io import write_json

FIELDS = ("calibration", "task", "setting", "scorer", "ratio", "n", "score", "score_low", "score_high",
          "uniform", "full", "diff", "diff_low", "diff_high", "wins", "ties", "losses")  # fmt: skip


def default_label(cfg: dict, folder: Path) -> str:
    """The calibration family of a folder's profile: its one task, ``mix`` for several, else the folder name."""
    tasks = (cfg.get("profile") or {}).get("calibration_tasks") or []
    if len(tasks) == 1:
        return str(tasks[0])
    return "mix" if len(tasks) > 1 else folder.name


def parse_folders(specs: Sequence[str]) -> dict[str, Path]:
    """``LABEL=FOLDER`` or ``FOLDER`` (label from the profile) -> {label: folder}, labels unique."""
    out: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        folder = Path(path if sep else spec)
        cfg = read_config(folder)
        if cfg is None:
            raise EvalError(f"{folder} holds no evaluation run (config.json missing)")
        if not sep:
            label = default_label(cfg, folder)
        if label in out:
            raise EvalError(f"label {label!r} given twice ({out[label]} and {folder}); name them LABEL=FOLDER")
        out[label] = folder
    return out


def collect(folders: Mapping[str, Path], method: str = "optimal") -> tuple[list[dict], dict[str, dict]]:
    """Rows for :func:`summarise` from ``{label: folder}`` (see :func:`merge_rows`); every folder must hold a
    run with a profile, all of one model. Returns (rows, {label: config})."""
    configs: dict[str, dict] = {}
    rows: dict[str, list[dict]] = {}
    model = None
    for label, folder in folders.items():
        cfg = read_config(folder)
        if cfg is None:
            raise EvalError(f"{folder} holds no evaluation run (config.json missing)")
        if not cfg.get("profile"):
            raise EvalError(f"{folder} was evaluated without --profile: nothing to transfer")
        sha = cfg["model"]["config_sha256"]
        if model is not None and sha != model:
            raise EvalError(f"{folder} was evaluated on another model than the other folders")
        model = sha
        configs[label] = cfg
        rows[label] = load_rows(folder)
    return merge_rows(rows, method), configs


def merge_rows(rows_by_label: Mapping[str, Iterable[dict]], method: str = "optimal") -> list[dict]:
    """Each label's ``method`` rows renamed ``method@label``, plus one copy of the ``uniform`` and ``full``
    rows, which do not depend on the profile and so must agree wherever two labels hold the same cell."""
    shared: dict[str, dict] = {}
    out: list[dict] = []
    for label, rows in rows_by_label.items():
        for r in rows:
            if r["method"] in (BASELINE, "full"):
                key = row_key(r)
                old = shared.get(key)
                if old is None:
                    shared[key] = r
                elif old.get("status") != r.get("status") or old.get("score") != r.get("score"):
                    raise EvalError(f"{key}: {BASELINE}/full rows differ between folders ({old.get('score')} vs "
                                    f"{r.get('score')}); the runs are not comparable")
            elif r["method"] == method:
                out.append({**r, "method": f"{method}@{label}"})
    if not any(r["method"] == BASELINE for r in shared.values()):
        raise EvalError(f"no folder holds {BASELINE} rows: evaluate one of them with --methods {BASELINE},{method}")
    if not out:
        raise EvalError(f"no folder holds {method} rows")
    return out + list(shared.values())


def transfer_cells(rows: Sequence[dict], labels: Sequence[str], method: str = "optimal") -> list[dict[str, Any]]:
    """One dict per (label, task, setting, scorer, ratio), fields :data:`FIELDS`, in label order."""
    cells = summarise(rows)
    full = {(c["task"], c["setting"]): c["mean"] for c in cells if c["method"] == "full"}
    base = {(c["task"], c["setting"], c["scorer"], c["ratio"]): c["mean"] for c in cells if c["method"] == BASELINE}
    out = []
    for label in labels:
        for c in cells:
            if c["method"] != f"{method}@{label}":
                continue
            out.append({
                "calibration": label, "task": c["task"], "setting": c["setting"], "scorer": c["scorer"],
                "ratio": c["ratio"], "n": c["n_pairs"], "score": c["mean"], "score_low": c["ci_low"],
                "score_high": c["ci_high"], "uniform": base.get((c["task"], c["setting"], c["scorer"], c["ratio"])),
                "full": full.get((c["task"], c["setting"])), "diff": c["diff"], "diff_low": c["diff_low"],
                "diff_high": c["diff_high"], "wins": c["wins"], "ties": c["ties"], "losses": c["losses"],
            })
    return out


def versus_reference(rows: Sequence[dict], labels: Sequence[str], method: str = "optimal") -> list[dict]:
    """Paired difference between profiles: ``method@label`` - ``method@labels[0]`` on the same samples, per
    (task, setting, scorer, ratio), mean with a 95 % bootstrap CI and W/T/L."""
    from depthkv.calibration.stats import paired_diff_ci
    from depthkv.eval.results import ratio_key

    scores: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["method"].startswith(f"{method}@") and r.get("status") == "ok" and r.get("score") is not None:
            key = (r["method"], r["task"], r["setting"], r.get("scorer") or "-", ratio_key(r["ratio"]))
            scores.setdefault(key, {})[r["sample_id"]] = float(r["score"])
    out = []
    ref = f"{method}@{labels[0]}"
    for (m, task, setting, scorer, ratio), mine in sorted(scores.items()):
        base = scores.get((ref, task, setting, scorer, ratio), {})
        common = sorted(set(mine) & set(base))
        if m == ref or not common:
            continue
        a, b = np.array([mine[s] for s in common]), np.array([base[s] for s in common])
        d = paired_diff_ci(a, b, n_boot=1000, seed=0)
        out.append({"calibration": m.split("@", 1)[1], "reference": labels[0], "task": task, "setting": setting,
                    "scorer": scorer, "ratio": float(ratio), "n": len(common), "diff": float(d.estimate),
                    "diff_low": float(d.low), "diff_high": float(d.high), "wins": int((a > b).sum()),
                    "ties": int((a == b).sum()), "losses": int((a < b).sum())})
    return out


def profile_summary(path: str | Path, ratios: Sequence[float], context_tokens: int, *, top: int = 5,
                    min_tokens: int = 20) -> dict[str, Any]:
    """What a profile tells the allocator: the ``top`` layers by mean KL over the probes, their share of the
    summed KL, the ``optimal`` budgets (tokens per layer) at each ratio for ``context_tokens`` and, for a
    mixed calibration set, the per-layer sensitivity of each family's own samples (``by_family``)."""
    from depthkv.allocation import BudgetSpec
    from depthkv.allocation.profile import Profile

    prof = Profile.load(path)
    view = prof.view()
    sens = np.asarray(view.degradation, dtype=float).mean(axis=1)
    order = np.argsort(-sens, kind="stable")
    data = prof.data.get("data") or {}
    by_family = {}
    ids, raw = data.get("sample_ids") or [], (prof.data.get("samples") or {}).get("kl")
    if raw is not None and len(ids) == len(raw) and len({i.split("/")[0] for i in ids}) > 1:
        kl = np.asarray(raw, dtype=float).mean(axis=2)  # [S, L]: mean over the probe ratios
        for fam in sorted({i.split("/")[0] for i in ids}):
            f = kl[[k for k, i in enumerate(ids) if i.split("/")[0] == fam]].mean(axis=0)
            top_f = np.argsort(-f, kind="stable")[:top]
            by_family[fam] = {"n": sum(i.split("/")[0] == fam for i in ids), "top_layers": [int(i) for i in top_f],
                              "sensitivity": [round(float(x), 5) for x in f]}
    budgets = {}
    for r in ratios:
        b = BudgetSpec(float(r), "optimal", view, min_tokens=min_tokens).for_context(prof.n_layers, context_tokens)
        budgets[f"{float(r):g}"] = list(b.tokens)
    return {
        "path": str(path), "calibration": data.get("description"), "tasks": data.get("tasks"),
        "n_samples": data.get("n_samples"), "sensitivity": [round(float(s), 5) for s in sens],
        "top_layers": [int(i) for i in order[:top]],
        "top_share": round(float(sens[order[:top]].sum() / max(sens.sum(), 1e-12)), 4),
        "context_tokens": context_tokens, "optimal_budgets": budgets, "by_family": by_family,
    }


Panel = tuple[tuple[str, str, float], list[tuple[str, list[dict | None]]]]


def panels(cells: Sequence[dict]) -> tuple[list[str], list[str], list[Panel]]:
    """The matrix layout of :func:`transfer_cells`, shared by the markdown, PNG and HTML renderings:
    (calibration labels in order, evaluated tasks, and per (setting, scorer, ratio) one
    ``(label, [cell of each task, None where there is no paired difference])`` row per label)."""
    labels = list(dict.fromkeys(c["calibration"] for c in cells))
    tasks = sorted({c["task"] for c in cells})
    out = []
    for key in sorted({(c["setting"], c["scorer"], c["ratio"]) for c in cells}):
        mine = {(c["calibration"], c["task"]): c for c in cells
                if (c["setting"], c["scorer"], c["ratio"]) == key and c["diff"] is not None}
        out.append((key, [(lab, [mine.get((lab, t)) for t in tasks]) for lab in labels]))
    return labels, tasks, out


def markdown(cells: Sequence[dict], method: str = "optimal", versus: Sequence[dict] = ()) -> str:
    """Matrix per (setting, scorer, ratio): rows = calibration, columns = task; cell = diff [CI], score.
    With ``versus`` (:func:`versus_reference`), a table of the paired differences between profiles."""
    lines = []
    labels, tasks, grids = panels(cells)
    for (setting, scorer, ratio), rows in grids:
        lines.append(f"**ratio {ratio:g}** (query-{setting}, scorer {scorer}); cell: {method} − {BASELINE} "
                     f"[95 % CI], then {method} score / {BASELINE} score (n)")
        lines.append("")
        lines.append("| calibrated on \\ evaluated on | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for lab, row in rows:
            tds = ["–" if c is None else f"{c['diff']:+.2f} [{c['diff_low']:+.2f}, {c['diff_high']:+.2f}]; "
                   f"{c['score']:.2f} / {c['uniform']:.2f} (n={c['n']})" for c in row]
            lines.append(f"| {lab} | " + " | ".join(tds) + " |")
        lines.append("")
    if versus:
        ref = versus[0]["reference"]
        lines += [f"**profile vs profile**: {method} with the row's profile − {method} with the {ref} profile, "
                  "paired over the same samples [95 % CI] W/T/L", "",
                  "| profile | task | ratio | difference | W/T/L |", "|---|---|---|---|---|"]
        for v in versus:
            lines.append(f"| {v['calibration']} | {v['task']} | {v['ratio']:g} | {v['diff']:+.2f} "
                         f"[{v['diff_low']:+.2f}, {v['diff_high']:+.2f}] | {v['wins']}/{v['ties']}/{v['losses']} |")
        lines.append("")
    return "\n".join(lines)


def plot_matrix(cells: Sequence[dict], path: str | Path, title: str, method: str = "optimal") -> Path:
    """Heatmaps of method − uniform (one panel per setting x scorer x ratio), CI and score in each cell."""
    plt = pyplot()
    labels, tasks, grids = panels(cells)
    fig, axes = plt.subplots(1, len(grids), figsize=(1.2 + 2.3 * len(tasks) * len(grids), 1.4 + 0.75 * len(labels)),
                             squeeze=False, layout="constrained")
    im = None
    for ax, ((setting, scorer, ratio), rows) in zip(axes[0], grids):
        grid = np.full((len(labels), len(tasks)), np.nan)
        for i, j, c in ((i, j, c) for i, (_, row) in enumerate(rows) for j, c in enumerate(row) if c is not None):
            grid[i, j] = c["diff"]
            sig = "*" if c["diff_low"] > 0 or c["diff_high"] < 0 else ""
            ax.text(j, i, f"{c['diff']:+.2f}{sig}\n[{c['diff_low']:+.2f}, {c['diff_high']:+.2f}]\n"
                          f"{method} {c['score']:.2f} / unif {c['uniform']:.2f}",
                    ha="center", va="center", fontsize=7)
        im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, fontsize=8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel("evaluated on", fontsize=8)
        ax.set_title(f"ratio {ratio:g} (query-{setting}, {scorer})", fontsize=9)
    axes[0, 0].set_ylabel("profile calibrated on", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=f"{method} − {BASELINE} (paired mean)")
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_profiles(profiles: Mapping[str, dict], path: str | Path, title: str) -> Path:
    """Per-layer sensitivity (mean KL over the probe ratios) of each profile, log scale, top layers marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    for label, info in profiles.items():
        sens = np.clip(np.asarray(info["sensitivity"], dtype=float), 1e-5, None)
        line, = ax.plot(sens, marker=".", ms=4, lw=1.4, label=f"{label} (top {info['top_layers'][:3]})")
        top = info["top_layers"][:3]
        ax.scatter(top, sens[top], s=40, facecolors="none", edgecolors=line.get_color(), zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean KL over probe ratios")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_transfer(folders: Mapping[str, Path], out: str | Path, *, method: str = "optimal",
                   note: str = "") -> dict[str, Any]:
    """Compute the transfer cells of ``folders`` and write transfer.{json,csv,md,png} into ``out``."""
    pyplot("the transfer plots")  # a missing eval extra fails here, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, configs = collect(folders, method)
    labels = list(folders)
    cells = transfer_cells(rows, labels, method)
    ratios = sorted({c["ratio"] for c in cells})
    ctx = [r["context_len"] for r in rows if r.get("context_len")]
    n_ctx = int(round(float(np.mean(ctx)))) if ctx else 1024
    model = next(iter(configs.values()))["model"]["name"]
    result = {
        "kind": "depthkv-transfer", "model": model, "method": method, "baseline": BASELINE, "note": note,
        "folders": {lab: str(f) for lab, f in folders.items()},
        "commands": {lab: cfg.get("command") for lab, cfg in configs.items()},
        "profiles": {lab: profile_summary(cfg["profile"]["path"], ratios, n_ctx) for lab, cfg in configs.items()},
        "cells": cells,
        "versus_reference": versus_reference(rows, labels, method),
    }
    write_json(out / "transfer.json", result)
    write_csv(out / "transfer.csv", cells, FIELDS)
    write_rows_csv(rows, out / "rows.csv")  # every scored row used, small (no budgets/contexts)
    (out / "transfer.md").write_text(markdown(cells, method, result["versus_reference"]) + "\n")
    title = f"{model}: {method} − {BASELINE}, profile from family A (rows) evaluated on family B (columns)"
    plot_matrix(cells, out / "transfer_matrix.png", title + (f"\n{note}" if note else ""), method)
    plot_profiles(result["profiles"], out / "profiles_sensitivity.png",
                  f"{model}: per-layer sensitivity of each profile (circles: top 3 layers)")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m depthkv.eval.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="[LABEL=]FOLDER of depthkv eval runs, one per profile")
    p.add_argument("--out", type=Path, required=True, help="folder for transfer.{json,csv,md,png}")
    p.add_argument("--method", default="optimal")
    p.add_argument("--note", default="", help="a line under the plot title (data, date, command)")
    args = p.parse_args(argv)
    try:
        res = build_transfer(parse_folders(args.folders), args.out, method=args.method, note=args.note)
    except (EvalError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(res["cells"], args.method, res["versus_reference"]))
    print(f"written to {args.out}/transfer.{{json,csv,md}} and transfer_matrix.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
