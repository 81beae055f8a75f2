"""Showing a profile: a terminal summary (rich) and PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from depthkv.extras import pyplot


def print_summary(profile, metric: str = "kl") -> None:
    """Per-layer sensitivity with 95 % CIs, the permutation tests and the best proxy metric."""
    from rich.console import Console
    from rich.table import Table

    d = profile.data
    console = Console()
    curves = d["curves"][metric]
    ratios = d["probe_ratios"]
    t = Table(title=f"{d['model']['name']}: {metric.upper()} increase when only layer l is pruned "
                    f"({d['scorer']['name']}, {d['data']['n_samples']} samples)")
    t.add_column("layer", justify="right")
    for r in ratios:
        t.add_column("window only" if r >= 1.0 else f"r={r:g}", justify="right")
    for layer in range(profile.n_layers):
        t.add_row(str(layer), *(f"{curves['mean'][layer][j]:.3f} [{curves['lo'][layer][j]:.3f}, "
                                f"{curves['hi'][layer][j]:.3f}]" for j in range(len(ratios))))
    console.print(t)
    for m, by_ratio in d["permutation"].items():
        parts = [f"r={r}: p={v['p_value']:.4g}, effect {v['effect_size']:.1f}" for r, v in by_ratio.items()]
        console.print(f"permutation test ({m}, {by_ratio[next(iter(by_ratio))]['n_perm']} perms): " + "; ".join(parts))
    if d.get("best_proxy"):
        b = d["best_proxy"]
        console.print(f"best proxy: {b.get('metric')} at stage {b.get('stage')} "
                      f"(Spearman rho {b.get('rho', float('nan')):.3f}, p {b.get('p', float('nan')):.3g})")
    console.print(f"calibration time: {d['timings']['total_s']:.1f} s")


def plot_sensitivity(profile, folder: str | Path, metric: str = "kl") -> Path:
    """One line per probe ratio: mean degradation per layer with its 95 % CI band."""
    plt = pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = profile.data
    c = d["curves"][metric]
    mean, lo, hi = (np.asarray(c[k]) for k in ("mean", "lo", "hi"))
    layers = np.arange(profile.n_layers)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, r in enumerate(d["probe_ratios"]):
        label = "window only" if r >= 1.0 else f"ratio {r:g}"
        ax.plot(layers, mean[:, j], marker="o", ms=3, label=label)
        ax.fill_between(layers, lo[:, j], hi[:, j], alpha=0.2)
    ax.set_xlabel("layer (pruned alone)")
    ax.set_ylabel(f"{metric.upper()} increase on answer tokens")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(f"{d['model']['name']}: per-layer sensitivity ({d['scorer']['name']}, "
                 f"{d['data']['n_samples']} samples, 95 % CI)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = folder / f"sensitivity_{d['model']['name']}.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_allocation(budgets, uniform_budgets, path: str | Path, profile=None) -> Path:
    """Bars: tokens kept per layer by the chosen allocator beside uniform."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = np.arange(budgets.n_layers)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(layers - 0.2, uniform_budgets.tokens, width=0.4, label="uniform")
    ax.bar(layers + 0.2, budgets.tokens, width=0.4, label=budgets.strategy)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"tokens kept (of {budgets.context_len})")
    name = profile.data["model"]["name"] if profile is not None else ""
    ax.set_title(f"{name} allocation at ratio {budgets.ratio}: {budgets.strategy} vs uniform", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
