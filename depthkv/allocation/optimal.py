"""Optimal: minimise the summed predicted degradation ``sum_l d_l(B_l)`` under the exact global budget.

Not in the paper: an addition of depthkv. Inputs are the measured single-layer curves d_l(r) of a
calibration profile; the paper's premise is that single-layer sensitivities add up well enough to rank
allocations.

Curves. Layer l's curve is taken as a function of tokens KEPT, ``x = round(N * (1 - r))``:
- noise is cleaned: ``d = max(d, 0)``, then made non-decreasing in r (running max), since keeping more
  tokens should never hurt;
- the full cache is the anchor ``d(N) = 0``; probe points are joined piecewise-linearly; a probe below
  the floor ``min_tokens`` (e.g. r = 1.0, "window only") is moved up to the floor (conservative), and
  below the most aggressive probe the last segment is extended linearly down to the floor;
- the curve is replaced by its LOWER CONVEX HULL. The measured curves need not be convex; the hull
  is the tightest convex under-estimate through the measured points, and it makes the problem exactly
  solvable by the method below. (Where a measured curve is concave, the hull interpolates linearly
  between the outer points, i.e. it treats "half way between two probes" as half the cost.)

Method. With convex, non-increasing d_l, the marginal gain of a layer's k-th token,
``g_l(k) = d_l(k-1) - d_l(k)``, is non-increasing in k, and the greedy that hands out the
``T - sum(floors)`` tokens one at a time to the largest marginal gain is EXACTLY optimal for the
integer problem (separable convex resource allocation, Gross 1956; Ibaraki & Katoh 1988). On the hull
the gains are constant along each segment, so the greedy runs over segments, not tokens: the solver
(``apportion.select_top``) finds the gain threshold by an exact bisection (<= 64 steps, each O(number of
hull segments)) and fills ties level by level, so the cost does not grow with N * L (L ~ 80 and
N ~ 128k take a few milliseconds). A DP over tokens would be
O(L * N * T) and far too big; an LP on the same hull gives the same optimum but fractional budgets.
Because the allocation for T tokens is a prefix of one fixed order of all units, a larger ratio never
gives any layer more tokens. Ties (equal gains, e.g. identical or flat curves) are spread evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from depthkv.allocation.apportion import select_top
from depthkv.allocation.budgets import Budgets
from depthkv.allocation.registry import AllocationRequest, register_allocator
from depthkv.allocation.sensitivity import SensitivityView


def convex_curve(
    probe_ratios: Sequence[float], degradation: Sequence[float] | np.ndarray, context_len: int, floor: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints ``(x, y)`` of one layer's convexified curve over kept tokens ``x`` in ``[floor, N]``.

    ``x`` are integers, strictly increasing, from ``floor`` to ``N``; ``y`` is convex, non-increasing,
    ``y[-1] == 0`` (full cache). Evaluate with ``np.interp(k, x, y)``.
    """
    n = int(context_len)
    floor = min(max(1, int(floor)), n)
    r = np.asarray(probe_ratios, dtype=np.float64)
    d = np.maximum.accumulate(np.maximum(np.asarray(degradation, dtype=np.float64), 0.0))
    xs = np.clip(np.round(n * (1.0 - r)).astype(np.int64), floor, n)
    pts: dict[int, float] = {}
    for x, y in zip(xs.tolist(), d.tolist()):
        if x < n:
            pts[x] = max(pts.get(x, 0.0), y)
    pts[n] = 0.0
    hull: list[tuple[int, float]] = []
    for p in sorted(pts.items()):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) <= 0:  # not a left turn: drop the middle
                hull.pop()
            else:
                break
        hull.append(p)
    if hull[0][0] > floor:  # extend the first segment (or a flat zero curve) down to the floor
        if len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[0], hull[1]
            slope = (y1 - y0) / (x1 - x0)
            hull.insert(0, (floor, y0 - slope * (x0 - floor)))
        else:
            hull.insert(0, (floor, 0.0))
    x = np.array([h[0] for h in hull], dtype=np.int64)
    y = np.array([h[1] for h in hull], dtype=np.float64)
    return x, y


def _segment_gains(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-token gain of each segment, forced non-increasing and >= 0 (guards against float noise)."""
    g = (y[:-1] - y[1:]) / (x[1:] - x[:-1])
    g = np.minimum.accumulate(np.maximum(g, 0.0)) + 0.0
    return g


class CurveSet:
    """The convexified curves of the free layers and the greedy priority over their tokens."""

    def __init__(self, curves: list[tuple[np.ndarray, np.ndarray]], context_len: int):
        self.curves = curves
        self.context_len = int(context_len)
        off = self.context_len + 1
        ends, gains = [np.zeros(0, dtype=np.int64)], [np.zeros(0)]
        for i, (x, y) in enumerate(curves):
            if x.size >= 2:
                ends.append(x[1:] + i * off)
                gains.append(_segment_gains(x, y))
        self._ends = np.concatenate(ends)
        self._gains = np.concatenate(gains)
        self._off = off
        sizes = np.array([max(x.size - 1, 0) for x, _ in curves], dtype=np.int64)
        self._stop = np.cumsum(sizes)  # runs of layer i: [stop - size, stop)
        self._start = self._stop - sizes

    def priority(self, layers: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Marginal gain of the k-th kept token of each (free-layer index) ``layers``."""
        idx = np.searchsorted(self._ends, np.asarray(layers) * self._off + np.asarray(k), side="left")
        return self._gains[idx]

    __call__ = priority

    def count_ge(self, theta: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Per layer, the last kept-token count whose marginal gain is >= theta (gains fall along each layer)."""
        csum = np.concatenate([[0], np.cumsum(self._gains >= theta)])
        n_ok = csum[self._stop] - csum[self._start]  # qualifying runs: a prefix of the layer's runs
        last = np.where(n_ok > 0, self._start + n_ok - 1, 0)
        ends = self._ends[last] - np.arange(lo.size) * self._off if self._ends.size else lo
        return np.clip(np.where(n_ok > 0, ends, lo), lo, hi)

    def value(self, tokens: Sequence[int] | np.ndarray) -> float:
        """Predicted total degradation ``sum_l d_l(tokens[l])`` on the convexified curves."""
        return float(sum(np.interp(t, x, y) for t, (x, y) in zip(tokens, self.curves)))


def optimal_curves(
    view: SensitivityView, layers: Sequence[int], context_len: int, floor: int = 1
) -> CurveSet:
    """Convexified curves (see ``convex_curve``) of ``layers`` from a sensitivity view."""
    d = view.require("degradation", "optimal")
    return CurveSet([convex_curve(view.probe_ratios, d[i], context_len, floor) for i in layers], context_len)


@register_allocator("optimal", needs=("degradation",))
def allocate_optimal(request: AllocationRequest, sensitivity: SensitivityView | None = None) -> Budgets:
    """Optimal: minimise sum_l d_l(B_l) over the convexified measured curves, exact global budget.

    Greedy on marginal gains over the lower convex hull of each layer's curve, exact for the convexified
    integer problem; see the module docstring for the curve model and why this method.
    """
    lo = request.check_feasible("optimal")
    free = list(request.free)
    if not free:
        return request.budgets([], "optimal")
    n = request.context_len
    curves = optimal_curves(sensitivity, free, n, lo)
    need = request.rest - lo * len(free)
    tokens = select_top(need, np.full(len(free), lo), np.full(len(free), n), curves)
    return request.budgets(tokens, "optimal")
