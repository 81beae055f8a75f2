"""Pyramid: PyramidKV's linear layer schedule (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression
based on Pyramidal Information Funneling", arXiv 2406.02069).

PyramidKV gives the top layer ``avg / beta`` tokens and the bottom layer ``2 * avg - avg / beta``
(``avg`` = mean budget per pruned layer, default ``beta = 20``), the layers in between on the arithmetic
sequence joining them, so the mean is ``avg``. Here that shape is applied to the free (unprotected)
layers in layer order and the global sum is made exact.
"""

from __future__ import annotations

import numpy as np

from depthkv.allocation.apportion import apportion
from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.registry import AllocationRequest, register_allocator
from depthkv.allocation.sensitivity import SensitivityView


def pyramid_weights(n: int, beta: float = 20.0) -> np.ndarray:
    """Relative budgets of ``n`` layers, bottom to top: from ``2 - 1/beta`` down to ``1/beta``, mean 1."""
    if not beta >= 1.0 or not np.isfinite(beta):
        raise BudgetError(f"pyramid needs beta >= 1 (top layer keeps avg/beta tokens), got {beta}")
    if n == 1:
        return np.ones(1)
    top, bottom = 1.0 / beta, 2.0 - 1.0 / beta
    return bottom + (top - bottom) * np.arange(n) / (n - 1)


@register_allocator("pyramid")
def allocate_pyramid(
    request: AllocationRequest, sensitivity: SensitivityView | None = None, *, beta: float = 20.0
) -> Budgets:
    """Pyramid (PyramidKV, Cai et al. 2024): budgets fall linearly from the bottom to the top layer.

    Unclipped, layer i of the L' free layers (bottom to top) keeps
    ``B_i = B_bottom + (B_top - B_bottom) * i / (L' - 1)`` with ``B_top = T / (beta * L')`` and
    ``B_bottom = 2 T / L' - B_top`` (``T`` = tokens for the free layers), so ``sum B_i = T``.
    Budgets are clipped to ``[min_tokens, N]``; the clipped excess goes to the unclipped layers in
    proportion to the pyramid shape (bounded divisor method, see ``apportion``), which keeps the sum
    exact and makes every layer's budget monotone in ratio. (PyramidKV's code, when the bottom layer would
    exceed the context, flattens the slope instead; both give the same budgets when nothing is clipped.)
    """
    beta = float(beta)
    w = pyramid_weights(max(1, len(request.free)), beta)  # validates beta even when nothing is free
    lo = request.check_feasible("pyramid")
    n_free = len(request.free)
    if n_free == 0:
        return request.budgets([], "pyramid")
    n = request.context_len
    tokens = apportion(request.rest, w, np.full(n_free, lo), np.full(n_free, n))
    return request.budgets(tokens, "pyramid")
