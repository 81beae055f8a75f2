"""Splitting one global KV budget across layers.

    from depthkv.allocation import allocate, list_allocators, SensitivityView
    b = allocate("mga", 32, 8192, 0.6, sensitivity=SensitivityView.from_metric(infonce), protected=(0,))

Every allocator returns Budgets whose sum is exactly round(L * N * (1 - rho)), or raises BudgetError.
"""

# importing the allocator modules registers them (each imports the registry itself)
from depthkv.allocation import mlma as _mlma  # noqa: F401
from depthkv.allocation.apportion import apportion, select_top, water_fill
from depthkv.allocation.budgets import BudgetError, Budgets, global_budget, spread, uniform
from depthkv.allocation.mga import keep_floor, mga_ratios, robustness_scores
from depthkv.allocation.mlp import middle_layers
from depthkv.allocation.optimal import convex_curve, optimal_curves
from depthkv.allocation.proportional import proportional_weights
from depthkv.allocation.pyramid import pyramid_weights
from depthkv.allocation.registry import (
    ALLOCATORS,
    AllocationRequest,
    AllocatorError,
    AllocatorSpec,
    allocate,
    get_allocator,
    list_allocators,
    make_request,
    register_allocator,
)
from depthkv.allocation.sensitivity import SensitivityError, SensitivityView

__all__ = [
    "ALLOCATORS",
    "AllocationRequest",
    "AllocatorError",
    "AllocatorSpec",
    "BudgetError",
    "Budgets",
    "SensitivityError",
    "SensitivityView",
    "allocate",
    "apportion",
    "convex_curve",
    "get_allocator",
    "global_budget",
    "keep_floor",
    "list_allocators",
    "make_request",
    "mga_ratios",
    "middle_layers",
    "optimal_curves",
    "proportional_weights",
    "pyramid_weights",
    "register_allocator",
    "robustness_scores",
    "select_top",
    "spread",
    "uniform",
    "water_fill",
]
