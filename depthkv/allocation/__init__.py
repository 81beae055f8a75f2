"""Splitting one global KV budget across layers.

    from depthkv.allocation import BudgetSpec, allocate, list_allocators, SensitivityView
    b = allocate("mga", 32, 8192, 0.6, sensitivity=SensitivityView.from_metric(infonce), protected=(0,))
    b = BudgetSpec(0.6, "optimal", profile="profile.json", protected=(0,)).for_context(32, 8192)

Every allocator returns Budgets whose sum is exactly round(L * N * (1 - ratio)), or raises BudgetError.
``BudgetSpec`` (``builder``) is the one place front ends turn ratio + strategy + profile into budgets;
``Profile`` (``profile``) is the calibration file allocators read.
"""

# importing the allocator modules registers them (each imports the registry itself)
from depthkv.allocation import mlma as _mlma  # noqa: F401
from depthkv.allocation.adaptive import head_split, head_split_layers, rank_curves
from depthkv.allocation.apportion import apportion, select_top, water_fill
from depthkv.allocation.budgets import BudgetError, Budgets, global_budget, spread, uniform
from depthkv.allocation.builder import BudgetPolicy, BudgetSpec, SpecPolicy, policy_needs_scores
from depthkv.allocation.mga import keep_floor, mga_ratios, robustness_scores
from depthkv.allocation.mlp import middle_layers
from depthkv.allocation.optimal import convex_curve, optimal_curves
from depthkv.allocation.optimal_joint import budgets_from_shares
from depthkv.allocation.profile import Profile, ProfileError
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
    "head_split",
    "head_split_layers",
    "rank_curves",
    "AllocationRequest",
    "AllocatorError",
    "AllocatorSpec",
    "BudgetError",
    "BudgetPolicy",
    "BudgetSpec",
    "Budgets",
    "Profile",
    "ProfileError",
    "SensitivityError",
    "SensitivityView",
    "SpecPolicy",
    "allocate",
    "apportion",
    "budgets_from_shares",
    "convex_curve",
    "get_allocator",
    "global_budget",
    "keep_floor",
    "list_allocators",
    "make_request",
    "mga_ratios",
    "middle_layers",
    "optimal_curves",
    "policy_needs_scores",
    "proportional_weights",
    "pyramid_weights",
    "register_allocator",
    "robustness_scores",
    "select_top",
    "spread",
    "uniform",
    "water_fill",
]
