"""Splitting one global KV budget across layers."""

from depthkv.allocation.budgets import BudgetError, Budgets, global_budget, spread, uniform

__all__ = ["BudgetError", "Budgets", "global_budget", "spread", "uniform"]
