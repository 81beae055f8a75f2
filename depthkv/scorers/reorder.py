"""Re-ordering a head's scores by a second signal without changing them: the budgets stay, the kept tokens move.

An allocator reads the distribution of each layer's (and head's) scores; a second signal that should only change
*which* tokens fill a head's budget must leave that distribution alone. :func:`blend_reorder` orders a head's tokens
by ``rank(score) + weight * rank(signal)`` and hands them the head's own score values in that order, so the head
keeps the same multiset of scores (``kvzip_v`` blends in value norms this way). :func:`consensus` is one such
signal: how high a position ranks across every layer and head, the agreement of all of them on which tokens of the
context matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim (0 = smallest; ties by position), as float32."""
    return _int_ranks(x).to(torch.float32)


def _int_ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x, dim=-1, stable=True), dim=-1, stable=True)


def blend_reorder(scores: torch.Tensor, signal: torch.Tensor, weight: float) -> torch.Tensor:
    """``scores`` [B, KVH, N] permuted within each (sequence, head): the token with the highest
    ``rank(score) + weight * rank(signal)`` gets the head's highest score, and so on (same multiset per head).
    ``signal`` broadcasts to ``scores`` ([B, 1, N] for one signal shared by all heads); ties keep the position
    order."""
    if weight == 0:
        return scores
    blend = ranks(scores) + weight * ranks(signal.float()).expand_as(scores)
    order = torch.argsort(blend, dim=-1, stable=True)  # ascending blended rank
    ascending = torch.sort(scores, dim=-1, stable=True).values
    out = torch.empty_like(scores)
    out.scatter_(-1, order, ascending)
    return out


def consensus(layers: Sequence[torch.Tensor | None], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[B, 1, N] mean over every layer and KV head of each position's rank percentile within its head (0 = the
    head's lowest score, 1 = its highest); ``None`` layers (not scored) are skipped. Under tensor parallelism
    (``group``: each rank holds a shard of the heads) the sums are all-reduced, so every rank gets the mean over
    all heads."""
    scored = [s for s in layers if s is not None]
    if not scored:
        raise ValueError("consensus needs at least one scored layer")
    n = scored[0].shape[-1]
    if any(s.shape[-1] != n or s.shape[0] != scored[0].shape[0] for s in scored):
        raise ValueError("consensus needs every layer's scores over the same context tokens")
    device = scored[0].device
    # integer rank sums: exact whatever the order of the additions, so sharded heads give the very same consensus
    total = torch.zeros(scored[0].shape[0], 1, n, dtype=torch.int64, device=device)
    heads = torch.zeros(1, dtype=torch.int64, device=device)
    for s in scored:
        total += _int_ranks(s).sum(dim=1, keepdim=True).to(device)
        heads += s.shape[1]
    if group is not None:
        dist.all_reduce(total, group=group)
        dist.all_reduce(heads, group=group)
    return total.to(torch.float32) / float(int(heads.item()) * max(1, n - 1))
