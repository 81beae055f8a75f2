"""MLMA-k: middle layers kept whole, the rest metric-guided (DepthKV paper, arXiv 2604.24647, "MLMA-kL").

The ``k`` middle layers (k = 2, 4, 6 in the paper; block from ``mlp.middle_layers``) keep their whole
cache; the remaining unprotected layers are allocated by the MGA rule (InfoNCE score, cap ratio_max = 0.7,
water-filling). With the cap, fewer pruned layers may not be able to remove enough: e.g. 30 layers with
layer 0 and 4 middle layers protected leave 25 layers that can remove at most 25 * 0.7 / 30 = 58.3 % of
the cache, short of ratio = 0.6. The paper does not say how it resolves this; here such a request raises a
BudgetError stating the maximum reachable ratio instead of missing the budget.
"""

from __future__ import annotations

from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.mga import mga_budgets
from depthkv.allocation.mlp import middle_layers
from depthkv.allocation.registry import AllocationRequest, register_allocator
from depthkv.allocation.sensitivity import SensitivityView


def mlma_budgets(
    request: AllocationRequest,
    sensitivity: SensitivityView,
    k: int,
    strategy: str,
    *,
    ratio_max: float,
    transform: str,
    eps: float,
) -> Budgets:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BudgetError(
            f"{strategy}: k (number of middle layers kept whole) must be a positive integer, got {k!r}"
        )
    metric = sensitivity.require("metric", strategy)
    mid = middle_layers(request.n_layers, k)
    req = request.with_protected(mid)
    note = f"; {strategy} keeps the {len(mid)} middle layers {list(mid)} whole"
    return mga_budgets(req, metric, strategy, ratio_max=ratio_max, transform=transform, eps=eps, note=note)


@register_allocator("mlma", needs=("metric",))
def allocate_mlma(
    request: AllocationRequest,
    sensitivity: SensitivityView | None = None,
    *,
    k: int = 2,
    ratio_max: float = 0.7,
    transform: str = "shift",
    eps: float = 0.1,
) -> Budgets:
    """MLMA-k (DepthKV paper): k middle layers unpruned, the others by MGA (InfoNCE, capped water-filling)."""
    return mlma_budgets(request, sensitivity, k, f"mlma-{k}", ratio_max=ratio_max, transform=transform, eps=eps)


def _register_fixed(k: int) -> None:
    def fixed(
        request: AllocationRequest,
        sensitivity: SensitivityView | None = None,
        *,
        ratio_max: float = 0.7,
        transform: str = "shift",
        eps: float = 0.1,
    ) -> Budgets:
        return mlma_budgets(
            request, sensitivity, k, f"mlma-{k}", ratio_max=ratio_max, transform=transform, eps=eps
        )

    fixed.__name__ = f"allocate_mlma_{k}"
    fixed.__doc__ = (
        f"MLMA-{k} (DepthKV paper): {k} middle layers unpruned, the others by MGA (InfoNCE, capped)."
    )
    register_allocator(f"mlma-{k}", needs=("metric",))(fixed)


for _k in (2, 4, 6):
    _register_fixed(_k)
