"""Integer apportionment that is exact in the total and monotone in it ("house monotone").

Every non-uniform allocator reduces to: give ``need`` indivisible units (tokens kept, or tokens removed)
to layers, layer ``l`` holding between ``lo[l]`` and ``hi[l]``. Rounding a continuous solution with the
largest-remainder rule meets the total but is NOT monotone: raising the total can take a unit away from a
layer (the Alabama paradox). That would break the stated requirement that a larger pruning ratio never
gives any layer more tokens.

The rule used here is monotone by construction. Each layer ``l`` has a priority ``p_l(k)`` for its k-th
unit (k = lo[l]+1 .. hi[l]), non-increasing in ``k``. All units of all layers are put in one fixed total
order: priority descending, then ``k`` ascending, then layer ascending (ties are spread level by level,
not dumped on the first layer). The allocation for ``need`` is ``lo`` plus the first ``need`` units of that
order. A larger ``need`` takes a longer prefix of the same order, so no layer ever loses a unit, and the
sum is exact by construction.

- Divisor (Webster / Sainte-Lague) priorities ``w_l / (k - 1/2)`` give the bounded divisor method:
  ``b_l = clip(round(w_l / t), lo_l, hi_l)`` for a common divisor ``t``. This is the integer version of
  proportional allocation with caps and water-filling redistribution (see ``water_fill``).
- Marginal-gain priorities ``d_l(k-1) - d_l(k)`` of convex curves make the same selection the exact
  greedy optimum of ``sum_l d_l(b_l)`` (used by the ``optimal`` allocator).

Two equivalent solvers: explicit enumeration and sort for small problems, and a bisection on the
priority threshold (with exact float keys) plus an explicit tie fill for large ones (N up to 128k, L up
to ~100), so no allocation enumerates millions of units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from depthkv.allocation.budgets import BudgetError

Priority = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``priority(layers, k)``: float priorities (finite, >= 0) of unit ``k`` of each layer in ``layers``.

A priority object may also offer ``count_ge(theta, lo, hi) -> np.ndarray`` (per layer, ``lo`` plus the
number of units with priority >= theta); the bisection solver then skips its per-layer binary search.
It must agree exactly with the pointwise priorities.
"""

ENUMERATE_LIMIT = 4_000


def _as_int(a: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).reshape(-1).copy()


def select_top(
    need: int,
    lo: Sequence[int] | np.ndarray,
    hi: Sequence[int] | np.ndarray,
    priority: Priority,
    *,
    method: str = "auto",
) -> np.ndarray:
    """``lo`` plus, per layer, how many of its units are among the first ``need`` of the total order.

    ``priority`` must be non-increasing in ``k`` for each layer and give finite values >= 0.
    ``method``: "enumerate", "bisect" or "auto" (enumerate up to ``ENUMERATE_LIMIT`` units); both give
    the same answer.
    """
    lo = _as_int(lo)
    hi = _as_int(hi)
    if lo.shape != hi.shape or np.any(hi < lo):
        raise BudgetError("every layer needs lo <= hi")
    avail = hi - lo
    total = int(avail.sum())
    need = int(need)
    if need < 0 or need > total:
        raise BudgetError(f"cannot place {need} units: the bounds allow between 0 and {total}")
    if need == 0:
        return lo
    if need == total:
        return hi
    if method == "auto":
        method = "enumerate" if total <= ENUMERATE_LIMIT else "bisect"
    if method == "enumerate":
        return _select_enumerate(need, lo, avail, priority)
    if method == "bisect":
        return _select_bisect(need, lo, hi, priority)
    raise ValueError(f"unknown method {method!r}")


def _select_enumerate(need: int, lo: np.ndarray, avail: np.ndarray, priority: Priority) -> np.ndarray:
    n_layers = lo.size
    layer = np.repeat(np.arange(n_layers), avail)
    starts = np.cumsum(avail) - avail
    k = lo[layer] + 1 + (np.arange(layer.size) - starts[layer])
    p = np.asarray(priority(layer, k), dtype=np.float64)
    _check_priorities(p)
    order = np.lexsort((layer, k, -p))
    return lo + np.bincount(layer[order[:need]], minlength=n_layers)


def _check_priorities(p: np.ndarray) -> None:
    if not np.isfinite(p).all() or np.any(p < 0):
        raise ValueError("priorities must be finite and non-negative")


def _key(x: float) -> int:
    return int(np.array(x, dtype=np.float64).view(np.int64))


def _unkey(k: int) -> float:
    return float(np.array(k, dtype=np.int64).view(np.float64))


def _count_ge(theta: float, lo: np.ndarray, hi: np.ndarray, priority: Priority) -> np.ndarray:
    """Per layer, lo + number of units with priority >= theta (a prefix, as priorities do not increase)."""
    fast = getattr(priority, "count_ge", None)
    if fast is not None:
        return np.asarray(fast(theta, lo, hi), dtype=np.int64)
    a = lo.copy()
    b = hi.copy()
    layers = np.arange(lo.size)
    while True:
        act = np.nonzero(a < b)[0]
        if act.size == 0:
            return a
        mid = (a[act] + b[act] + 1) // 2
        ok = np.asarray(priority(layers[act], mid), dtype=np.float64) >= theta
        a[act] = np.where(ok, mid, a[act])
        b[act] = np.where(ok, b[act], mid - 1)


def _select_bisect(need: int, lo: np.ndarray, hi: np.ndarray, priority: Priority) -> np.ndarray:
    has = np.nonzero(hi > lo)[0]
    first = np.asarray(priority(has, lo[has] + 1), dtype=np.float64)
    _check_priorities(first)
    # non-negative floats order like their int64 bit patterns: bisect on those (exact, <= 64 steps)
    k_lo, k_hi = _key(0.0), _key(float(first.max())) + 1  # count(k_lo) >= need > count(k_hi)
    while k_hi - k_lo > 1:
        mid = (k_lo + k_hi) // 2
        if int((_count_ge(_unkey(mid), lo, hi, priority) - lo).sum()) >= need:
            k_lo = mid
        else:
            k_hi = mid
    theta = _unkey(k_lo)  # the priority of the need-th unit
    ge = _count_ge(theta, lo, hi, priority)
    gt = _count_ge(_unkey(k_lo + 1), lo, hi, priority)
    return fill_ties(need - int((gt - lo).sum()), gt, ge)


def fill_ties(rem: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Take ``rem`` units from the tie ranges (a_l, b_l] in the order (k ascending, layer ascending)."""

    def taken(kappa: int) -> int:
        return int((np.clip(kappa, a, b) - a).sum())

    lo_k, hi_k = int(a.min()), int(b.max())  # taken(lo_k) = 0 <= rem <= taken(hi_k)
    while hi_k > lo_k:
        mid = (lo_k + hi_k + 1) // 2
        if taken(mid) <= rem:
            lo_k = mid
        else:
            hi_k = mid - 1
    out = np.clip(lo_k, a, b)
    left = rem - int((out - a).sum())
    nxt = np.nonzero((a <= lo_k) & (lo_k < b))[0]
    out[nxt[:left]] += 1
    return out


class DivisorPriority:
    """Webster (Sainte-Lague) priorities ``w_l / (k - 1/2)`` for unit k >= 1 of layer l."""

    def __init__(self, weights: Sequence[float] | np.ndarray):
        self.w = np.asarray(weights, dtype=np.float64).reshape(-1)

    def __call__(self, layers: np.ndarray, k: np.ndarray) -> np.ndarray:
        return self.w[layers] / (np.asarray(k, dtype=np.float64) - 0.5)

    def count_ge(self, theta: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Closed form ``round(w / theta)`` clipped to [lo, hi], then corrected against the pointwise values."""
        if theta <= 0:
            return hi.copy()
        layers = np.arange(lo.size)
        with np.errstate(over="ignore"):
            c = np.clip(np.floor(self.w / theta + 0.5), lo, hi).astype(np.int64)
        while True:  # float rounding can put the estimate one off; a step or two fixes it
            up = (c < hi) & (self(layers, np.maximum(c + 1, 1)) >= theta)
            down = (c > lo) & (self(layers, np.maximum(c, 1)) < theta)
            if not (up.any() or down.any()):
                return c
            c = c + up - down


def divisor_priority(weights: Sequence[float] | np.ndarray) -> DivisorPriority:
    """Webster (Sainte-Lague) priorities ``w_l / (k - 1/2)`` for unit k >= 1 of layer l."""
    return DivisorPriority(weights)


def apportion(
    total: int,
    weights: Sequence[float] | np.ndarray,
    lo: Sequence[int] | np.ndarray,
    hi: Sequence[int] | np.ndarray,
    *,
    method: str = "auto",
) -> np.ndarray:
    """Integers ``b`` with ``lo <= b <= hi``, ``sum(b) == total``, as proportional to ``weights`` as bounds allow.

    Bounded Webster divisor method: ``b_l = clip(round(w_l / t), lo_l, hi_l)`` for one divisor ``t``
    (ties resolved by the fixed order of ``select_top``). Monotone in ``total`` for every layer.
    Raises BudgetError if the bounds cannot hold ``total``.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    lo = _as_int(lo)
    hi = _as_int(hi)
    if w.shape != lo.shape or not np.isfinite(w).all() or np.any(w < 0):
        raise BudgetError(f"weights must be {lo.size} finite non-negative numbers")
    if np.any(lo < 0):
        raise BudgetError("lower bounds must be >= 0")
    need = int(total) - int(lo.sum())
    if need < 0 or int(total) > int(hi.sum()):
        raise BudgetError(
            f"cannot place {total} units within bounds summing to [{int(lo.sum())}, {int(hi.sum())}]"
        )
    return select_top(need, lo, hi, divisor_priority(w), method=method)


def water_fill(
    weights: Sequence[float] | np.ndarray, total: float, cap: float | Sequence[float] | np.ndarray
) -> np.ndarray:
    """Continuous ``x_l = min(c * w_l, cap_l)`` with ``sum(x) == total`` (iterative water-filling).

    Share proportional to ``weights``; whatever a capped entry would exceed goes back to the unsaturated
    entries in proportion to their weights, repeated until nothing exceeds its cap. Raises BudgetError
    when ``total`` exceeds what the caps allow.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    caps = np.broadcast_to(np.asarray(cap, dtype=np.float64), w.shape).astype(np.float64)
    if not np.isfinite(w).all() or np.any(w < 0) or np.any(caps < 0):
        raise BudgetError("weights and caps must be finite and non-negative")
    total = float(total)
    if total < 0:
        raise BudgetError(f"cannot distribute a negative total {total}")
    room = float(caps[w > 0].sum())
    if total > room * (1 + 1e-12) + 1e-12:
        raise BudgetError(f"total {total:g} exceeds what the caps allow ({room:g})")
    x = np.zeros_like(w)
    active = (w > 0) & (caps > 0)
    remaining = total
    while active.any() and remaining > 0:
        y = remaining * w / w[active].sum()
        sat = active & (y >= caps)
        if not sat.any():
            x[active] = y[active]
            break
        x[sat] = caps[sat]
        remaining -= float(caps[sat].sum())
        active &= ~sat
    return x
