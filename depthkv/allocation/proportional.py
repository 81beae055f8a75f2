"""Proportional-to-measured: tokens kept in proportion to each layer's measured sensitivity.

Not in the paper: depthkv's "proportional-to-measured" baseline. The sensitivity of layer l is
its measured degradation at one probe ratio (default: the largest, where layers differ most),
``d_l = max(d_l(r), 0)`` (negative values are noise). Weights are ``d_l + floor * mean(d)``: the floor
keeps insensitive layers from being starved; with no measured sensitivity at all the split is uniform.
"""

from __future__ import annotations

import numpy as np

from depthkv.allocation.apportion import apportion
from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.registry import AllocationRequest, register_allocator
from depthkv.allocation.sensitivity import SensitivityView


def proportional_weights(degradation: np.ndarray, floor: float = 0.1) -> np.ndarray:
    """Weights ``max(d, 0) + floor * mean(max(d, 0))``; all ones when nothing is positive."""
    if not (floor >= 0 and np.isfinite(floor)):
        raise BudgetError(f"floor must be a finite number >= 0, got {floor}")
    d = np.maximum(np.asarray(degradation, dtype=np.float64), 0.0)
    mean = float(d.mean()) if d.size else 0.0
    if mean <= 0:
        return np.ones_like(d)
    return d + floor * mean


@register_allocator("proportional", needs=("degradation",))
def allocate_proportional(
    request: AllocationRequest,
    sensitivity: SensitivityView | None = None,
    *,
    probe_ratio: float | None = None,
    floor: float = 0.1,
) -> Budgets:
    """Proportional (measured): tokens kept proportional to degradation at ``probe_ratio`` plus a floor.

    Kept tokens are apportioned by the bounded divisor method on ``[min_tokens, N]``: layers that would
    exceed N keep N and their excess goes to the others in proportion to their weights; the sum is exact
    and every layer's budget is monotone in ratio.
    """
    d = sensitivity.require("degradation", "proportional")
    col = sensitivity.ratio_index(probe_ratio)
    lo = request.check_feasible("proportional")
    free = list(request.free)
    if not free:
        return request.budgets([], "proportional")
    w = proportional_weights(d[free, col], float(floor))
    n = request.context_len
    tokens = apportion(request.rest, w, np.full(len(free), lo), np.full(len(free), n))
    return request.budgets(tokens, "proportional")
