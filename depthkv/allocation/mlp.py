"""MLP: middle-layer protection (DepthKV paper, arXiv 2604.24647, "MLP" allocator).

The two middle layers ``floor(L/2)`` and ``floor(L/2) + 1`` (0-based) keep their whole cache; every other
unprotected layer is pruned uniformly so that the global budget is met exactly.
"""

from __future__ import annotations

from depthkv.allocation.budgets import Budgets, uniform
from depthkv.allocation.registry import AllocationRequest, register_allocator
from depthkv.allocation.sensitivity import SensitivityView


def middle_layers(n_layers: int, k: int = 2) -> tuple[int, ...]:
    """The ``k`` consecutive middle layers the paper protects.

    The block is centred on ``floor(L/2) + 1/2`` so that ``k = 2`` gives the paper's layers
    ``floor(L/2), floor(L/2) + 1`` and ``k = 4, 6`` grow it by one layer on each side (L = 32:
    k=2 -> 16..17, k=4 -> 15..18, k=6 -> 14..19). The block is shifted down to fit when it would pass
    the last layer (L = 2, k = 2 -> layers 0, 1; L = 1 -> layer 0) and is every layer when k >= L.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k >= n_layers:
        return tuple(range(n_layers))
    start = n_layers // 2 + 1 - (k + 1) // 2
    start = max(0, min(start, n_layers - k))
    return tuple(range(start, start + k))


@register_allocator("mlp")
def allocate_mlp(request: AllocationRequest, sensitivity: SensitivityView | None = None) -> Budgets:
    """MLP (DepthKV paper): protect layers floor(L/2) and floor(L/2)+1, prune the rest uniformly.

    On 1- and 2-layer models the middle block covers every layer (see ``middle_layers``), so only ratios
    that round to keeping everything can be met; others raise BudgetError.
    """
    mid = middle_layers(request.n_layers, 2)
    req = request.with_protected(mid)
    req.check_feasible("mlp", why=f" (mlp keeps the middle layers {list(mid)} whole)")
    b = uniform(req.n_layers, req.context_len, req.ratio, protected=req.protected, min_tokens=req.floor)
    return Budgets(b.tokens, b.context_len, b.ratio, "mlp", b.protected)
