"""Input-adaptive allocation: split the global budget by ranking the current input's token scores.

A static allocator (``optimal``) decides per-layer budgets once per model, from calibration. But which layer
needs its tokens depends on the input too: KVzip (Kim et al. 2025) ranks its scores across all layers and
heads at once for every context, so a layer whose attention is spread thin gives up tokens to one that has
many sharply attended ones. Two allocators do that here, both exact in the global total:

* ``global``: the ranking alone. Each layer's k-th unit is worth the k-th largest of its per-token scores
  (each KV head's scores sorted, then averaged over heads at equal rank: non-increasing in k), and the budget
  goes to the best units of all layers together (``select_top``: exact, monotone in the total).
* ``adaptive``: the same ranking on top of the calibrated profile (the DepthKV paper's future work): every
  layer first keeps ``floor_share`` of what the static ``optimal`` allocation gives it at this ratio (measured
  sensitivity is a floor the input cannot overrule), the rest follows the input's ranking.

Scores are compared as they come (``normalise="none"``; attention-based scorers give probabilities, on one
scale across layers) or after dividing each layer by its mean score (``normalise="mean"``), which suits
scorers whose scale drifts with depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from depthkv.allocation.apportion import select_top
from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.optimal import allocate_optimal
from depthkv.allocation.registry import AllocationRequest, AllocatorError, register_allocator
from depthkv.allocation.sensitivity import SensitivityView

NORMALISE = ("none", "mean")


def _as_array(s: Any) -> np.ndarray:
    if hasattr(s, "detach"):  # a torch tensor, on any device
        s = s.detach().float().cpu().numpy()
    return np.asarray(s, dtype=np.float64)


def rank_curves(scores: Sequence[Any], normalise: str = "none") -> np.ndarray:
    """[L, N] non-increasing unit values: per layer, heads' scores sorted descending, averaged at equal rank.

    Protected tokens (scored +inf by the engine) and any other non-finite score become the largest finite
    value + 1, so they rank first; the curves are shifted to be >= 0 (ranking is unchanged by a shift).
    """
    if normalise not in NORMALISE:
        raise AllocatorError(f"normalise must be one of {NORMALISE}, got {normalise!r}")
    rows = []
    for s in scores:
        a = _as_array(s)
        a = a.reshape(-1, a.shape[-1])  # [batch * kv_heads, N]
        rows.append(a)
    finite = np.concatenate([r[np.isfinite(r)] for r in rows]) if rows else np.zeros(1)
    top = float(finite.max()) if finite.size else 0.0
    low = float(finite.min()) if finite.size else 0.0
    curves = []
    for a in rows:
        a = np.where(np.isfinite(a), a, top + 1.0) - min(low, 0.0)
        c = -np.sort(-a, axis=-1)  # descending per head
        c = c.mean(axis=0)
        if normalise == "mean":
            fin = c[c <= top + 1.0 - min(low, 0.0) - 1e-12]
            m = float(fin.mean()) if fin.size and fin.mean() > 0 else 1.0
            c = c / m
        curves.append(np.minimum.accumulate(c))  # guard against float noise: exactly non-increasing
    return np.stack(curves)


class RankPriority:
    """``select_top`` priorities from rank curves: unit k of layer l is worth ``curves[l, k - 1]``."""

    def __init__(self, curves: np.ndarray):
        self.curves = curves
        self.neg = -curves  # ascending rows, for searchsorted

    def __call__(self, layers: np.ndarray, k: np.ndarray) -> np.ndarray:
        return self.curves[layers, k - 1]

    def count_ge(self, theta: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        n = np.array([np.searchsorted(row, -theta, side="right") for row in self.neg], dtype=np.int64)
        return np.clip(n, lo, hi)


def ranked_budgets(request: AllocationRequest, curves: np.ndarray, lo: np.ndarray, strategy: str) -> Budgets:
    """Budgets with ``lo`` per free layer plus the best-ranked units of all free layers (exact total)."""
    free = np.asarray(request.free, dtype=np.int64)
    n = request.context_len
    hi = np.full(free.size, n, dtype=np.int64)
    lo = np.minimum(np.asarray(lo, dtype=np.int64), hi)
    need = request.rest - int(lo.sum())
    if need < 0:
        raise BudgetError(f"{strategy}: the per-layer floors ({int(lo.sum())} tokens) exceed the budget {request.rest}")
    picked = select_top(need, lo, hi, RankPriority(curves[free]))
    return request.budgets(picked, strategy)


@register_allocator("global", needs=("scores",))
def allocate_global(
    request: AllocationRequest, sensitivity: SensitivityView | None = None, *, scores, normalise: str = "none"
) -> Budgets:
    """Global: rank the input's token scores across layers (KVzip's split), exact total, floors kept."""
    lo = request.check_feasible("global")
    curves = rank_curves(scores, normalise)
    return ranked_budgets(request, curves, np.full(len(request.free), lo), "global")


@register_allocator("adaptive", needs=("degradation", "scores"))
def allocate_adaptive(
    request: AllocationRequest,
    sensitivity: SensitivityView | None = None,
    *,
    scores,
    floor_share: float = 0.5,
    normalise: str = "none",
) -> Budgets:
    """Adaptive: the profile's optimal split as a floor (``floor_share`` of it), the rest by the input's ranking."""
    if not 0.0 <= floor_share <= 1.0:
        raise AllocatorError(f"floor_share must lie in [0, 1], got {floor_share}")
    lo = request.check_feasible("adaptive")
    static = np.asarray(allocate_optimal(request, sensitivity).tokens, dtype=np.int64)
    floors = np.maximum(lo, np.floor(floor_share * static[list(request.free)]).astype(np.int64))
    curves = rank_curves(scores, normalise)
    return ranked_budgets(request, curves, floors, "adaptive")


def head_split(layer_scores: Any, budget: int, floor: int) -> np.ndarray:
    """Tokens per KV head [B, KVH] for one layer: ``budget * KVH`` per batch row, ranked across heads.

    Each head keeps at least ``min(floor, N)``; the rest goes to the best-scored tokens of all heads of the
    layer together (head-level budgets, as AdaKV), so the layer's total stays exactly ``budget * KVH``.
    """
    a = _as_array(layer_scores)
    b, kvh, n = a.shape
    out = np.zeros((b, kvh), dtype=np.int64)
    lo = np.full(kvh, min(floor, n, budget), dtype=np.int64)
    hi = np.full(kvh, n, dtype=np.int64)
    for i in range(b):
        curves = rank_curves([a[i, h][None] for h in range(kvh)])
        out[i] = select_top(budget * kvh - int(lo.sum()), lo, hi, RankPriority(curves))
    return out
