"""H2O (Zhang et al. 2023) as written in the DepthKV paper ("In-layer token scorers").

s_j = sum_{i>j} alpha_ij: the attention that *later* queries pay to token j (the diagonal is excluded, as
the paper's strict inequality says), averaged over the query heads of each KV group. Sums are linear, so
over a chunked prefill the scores of kept tokens simply accumulate (``cumulative``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthkv.scorers import column_kernel
from depthkv.scorers.base import ScoreInputs, Scorer, attention_blocks


def later_attention_mass(x: ScoreInputs) -> torch.Tensor:
    """sum over later queries of alpha_ij, mean over the query group: [B, KVH, K] (float32).

    Computed once per forward and layer (``x.memo``): H2O and H2O with values, scored together, share it
    (the causal attention of every query is the costly part, quadratic in the context). On CUDA a fused
    Triton kernel computes it without materialising the probabilities (``column_kernel``)."""
    if "later_attention_mass" not in x.memo:
        fused = column_kernel.usable(x)
        x.memo["later_attention_mass"] = column_kernel.later_attention_mass_fused(x) if fused else _blockwise_mass(x)
    return x.memo["later_attention_mass"]


def _blockwise_mass(x: ScoreInputs) -> torch.Tensor:
    """``later_attention_mass`` from the probabilities of ``attention_blocks`` (CPU, or the fused path off)."""
    b, kvh, nk = x.key.shape[0], x.key.shape[1], x.key.shape[2]
    nq = x.query.shape[2]
    total = torch.zeros(b, kvh, nk, dtype=torch.float32, device=x.key.device)
    for i0, i1, probs in attention_blocks(x):
        self_idx = nk - nq + torch.arange(i0, i1, device=x.key.device)
        diag = probs[..., torch.arange(i1 - i0, device=x.key.device), self_idx]  # [B,KVH,G,blk]
        total += probs.sum(dim=3).mean(dim=2)
        total.index_add_(2, self_idx, -diag.mean(dim=2))
    return total


@dataclass
class H2O(Scorer):
    """H2O without values: accumulated attention from later queries."""

    name = "h2o"
    cumulative = True
    needs_attention = True

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return later_attention_mass(x)
