"""MGA: metric-guided allocation (DepthKV paper, arXiv 2604.24647, "MGA" allocator).

The paper scores each layer from its InfoNCE (lower InfoNCE = more critical layer), turns the score
s(l) (higher = more robust) into shares a(l) = s(l) / sum_{j pruned} s(j), and prunes each layer at a
ratio proportional to its share, r(l) = c * a(l), capped at ratio_max = 0.7; whatever the cap cuts is
redistributed over the unsaturated layers until mean_l r(l) = ratio exactly (water-filling).

Score transform (the paper leaves it open), default ``transform="shift"``:

    s(l) = (m(l) - min m) / (max m - min m) + eps        (m = InfoNCE over the pruned layers, eps = 0.1)

so the layer with the lowest InfoNCE gets the smallest score and is pruned least (its ratio is
``eps / (1 + eps)`` = 1/11 of the most robust layer's, before the cap), the scale and offset of the metric
do not matter, and equal metrics give uniform pruning. ``transform="raw"`` uses s = m (m must be > 0),
``transform="rank"`` uses s = 1 + rank of m (ties averaged).

Integer budgets: tokens REMOVED per layer are apportioned by the bounded divisor method with weights
s(l) and bound ``N - max(min_tokens, ceil(N * (1 - ratio_max)))``, i.e. the integer water-filling; the
total is exact and every layer's budget is monotone in ratio. When the cap makes the target unreachable a
BudgetError states the maximum reachable ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from depthkv.allocation.apportion import apportion, water_fill
from depthkv.allocation.budgets import BudgetError, Budgets, check_ratio
from depthkv.allocation.registry import AllocationRequest, register_allocator
from depthkv.allocation.sensitivity import SensitivityView

TRANSFORMS = ("shift", "raw", "rank")


def robustness_scores(metric: np.ndarray, transform: str = "shift", eps: float = 0.1) -> np.ndarray:
    """Scores s > 0, higher = more robust (prune more), from InfoNCE values (lower = more critical)."""
    m = np.asarray(metric, dtype=np.float64)
    if transform == "shift":
        if not eps > 0:
            raise BudgetError(f"eps must be > 0, got {eps}")
        span = float(m.max() - m.min()) if m.size else 0.0
        if span <= 0:
            return np.ones_like(m)
        return (m - m.min()) / span + eps
    if transform == "raw":
        if np.any(m <= 0):
            raise BudgetError("transform='raw' needs a strictly positive metric; use 'shift' or 'rank'")
        return m.copy()
    if transform == "rank":
        return rankdata(m) if m.size else m.copy()
    raise BudgetError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}")


def keep_floor(context_len: int, ratio_max: float, floor: int = 1) -> int:
    """Fewest tokens a layer may keep under the cap: ``max(floor, ceil(N * (1 - ratio_max)))``."""
    if not 0.0 < ratio_max <= 1.0:
        raise BudgetError(f"ratio_max must lie in (0, 1], got {ratio_max}")
    return max(int(floor), math.ceil(context_len * (1.0 - ratio_max) - 1e-9))


def mga_ratios(
    metric: Sequence[float] | np.ndarray,
    ratio: float,
    *,
    protected: Sequence[int] = (),
    ratio_max: float = 0.7,
    transform: str = "shift",
    eps: float = 0.1,
) -> np.ndarray:
    """The continuous per-layer ratios of MGA (before integer rounding): water-filling of L * ratio.

    Protected layers get 0; ``mean(result) == ratio``; no entry exceeds ``ratio_max``.
    """
    m = np.asarray(metric, dtype=np.float64)
    ratio = check_ratio(ratio)
    free = [i for i in range(m.size) if i not in set(protected)]
    out = np.zeros(m.size)
    if not free:
        if ratio > 0:
            raise BudgetError("every layer is protected: only ratio = 0 is reachable")
        return out
    s = robustness_scores(m[free], transform, eps)
    if m.size * ratio > len(free) * ratio_max + 1e-12:
        raise BudgetError(
            f"mga: ratio {ratio} needs a mean ratio of {m.size * ratio / len(free):.4f} on {len(free)} pruned layers, "
            f"above the cap ratio_max = {ratio_max}; the maximum reachable ratio is {len(free) * ratio_max / m.size:.4f}"
        )
    out[free] = water_fill(s / s.sum(), m.size * ratio, ratio_max)
    return out


def mga_budgets(
    request: AllocationRequest,
    metric: np.ndarray,
    strategy: str,
    *,
    ratio_max: float,
    transform: str,
    eps: float,
    note: str = "",
) -> Budgets:
    """Integer MGA on ``request``'s free layers (shared with MLMA, which only protects more layers)."""
    ratio_max = float(ratio_max)
    n = request.context_len
    lo = keep_floor(n, ratio_max, request.floor)
    why = (
        ""
        if lo == request.floor
        else f" (cap ratio_max = {ratio_max}: at most {n - lo} of {n} tokens removed per layer)"
    )
    request.check_feasible(strategy, lo, why + note)
    free = request.free
    if not free:
        return request.budgets([], strategy)
    s = robustness_scores(np.asarray(metric, dtype=np.float64)[list(free)], transform, eps)
    removed_total = len(free) * n - request.rest
    removed = apportion(removed_total, s, np.zeros(len(free)), np.full(len(free), n - lo))
    return request.budgets(n - removed, strategy)


@register_allocator("mga", needs=("metric",))
def allocate_mga(
    request: AllocationRequest,
    sensitivity: SensitivityView | None = None,
    *,
    ratio_max: float = 0.7,
    transform: str = "shift",
    eps: float = 0.1,
) -> Budgets:
    """MGA (DepthKV paper): per-layer ratio proportional to an InfoNCE robustness score, capped at ratio_max.

    Lower InfoNCE = more critical = pruned less. Water-filling over the unsaturated layers meets the
    global budget exactly; see the module docstring for the score transform and the integer rounding.
    """
    metric = sensitivity.require("metric", "mga")
    return mga_budgets(request, metric, "mga", ratio_max=ratio_max, transform=transform, eps=eps)
