"""optimal-joint: the ``optimal`` budgets refined against the JOINT degradation of pruning every layer at once.

``optimal`` minimises the sum of single-layer degradations, each measured with only that layer pruned. When
every layer is pruned together the damage compounds, which those curves cannot see (on a flat-sensitivity
model at a high ratio the optimiser cuts many layers to the protected window and quality collapses).
``depthkv refine`` (``depthkv.calibration.refine``) starts from the ``optimal`` vector at a target ratio and
moves tokens between layers by measured marginal effects with all layers pruned, keeping a move only when
the measured joint degradation on the calibration samples improves. The result is stored in the profile as
per-layer *shares* of the context (``B_l / N``), one vector per refined ratio.

This allocator turns the stored shares into exact integer budgets for any context length N: the free layers
share ``round(L * N * (1 - ratio)) - |protected| * N`` tokens in proportion to their shares by the bounded
Webster divisor method (``apportion``), every layer within ``[floor, N]``; protected layers keep N. For the
refinement's own context length (and no protected layers) it reproduces the refined vector exactly. A ratio
the profile has no refined vector for is refused: refined vectors are measured, never interpolated. Unlike
the curve-based allocators, vectors refined at different ratios are independent, so a larger ratio is not
guaranteed to give every layer fewer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from depthkv.allocation.apportion import apportion
from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.registry import AllocationRequest, make_request, register_allocator
from depthkv.allocation.sensitivity import SensitivityView

NAME = "optimal-joint"


def tokens_from_shares(
    shares: Sequence[float] | np.ndarray, request: AllocationRequest, strategy: str = NAME
) -> Budgets:
    """Exact integer budgets for ``request`` in proportion to per-layer ``shares`` (kept share of the context).

    Free layers split ``request.rest`` by the bounded Webster method within ``[request.floor, N]``; protected
    layers keep N. Raises BudgetError when the request cannot be met.
    """
    w = np.asarray(shares, dtype=np.float64).reshape(-1)
    if w.size != request.n_layers:
        raise BudgetError(f"{strategy}: {w.size} shares for a {request.n_layers}-layer model")
    lo = request.check_feasible(strategy)
    free = list(request.free)
    if not free:
        return request.budgets([], strategy)
    n = request.context_len
    if request.rest > n * len(free):
        raise BudgetError(
            f"{strategy}: protected layers {list(request.protected)} force more than N tokens into a layer"
        )
    tokens = apportion(request.rest, w[free], np.full(len(free), lo), np.full(len(free), n))
    return request.budgets(tokens, strategy)


def budgets_from_shares(
    shares: Sequence[float] | np.ndarray,
    context_len: int,
    ratio: float,
    *,
    protected: Sequence[int] = (),
    min_tokens: int = 1,
    strategy: str = NAME,
) -> Budgets:
    """``tokens_from_shares`` for a plain (N, ratio, protected, floor) request."""
    n_layers = int(np.asarray(shares).size)
    request = make_request(n_layers, context_len, ratio, protected=protected, min_tokens=min_tokens)
    return tokens_from_shares(shares, request, strategy)


@register_allocator(NAME, needs=("degradation", "refined"))
def allocate_optimal_joint(request: AllocationRequest, sensitivity: SensitivityView | None = None) -> Budgets:
    """Optimal-joint: the optimal vector refined on the joint degradation of all layers pruned (depthkv refine).

    Reads the per-layer shares the profile holds for exactly this ratio (``depthkv refine`` adds them) and
    apportions them to integer budgets for this context length; refuses a ratio without refined shares.
    """
    shares = sensitivity.refined_shares(request.ratio, NAME)
    return tokens_from_shares(shares, request)
