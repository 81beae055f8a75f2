"""H2O (Zhang et al. 2023) as written in the DepthKV paper (../shared/paper.md, "In-layer token scorers").

s_j = sum_{i>j} alpha_ij: the attention that *later* queries pay to token j (the diagonal is excluded, as
the paper's strict inequality says), averaged over the query heads of each KV group. The variant with
values multiplies by ||V_j||_p (p = 1 by default, or 2). Sums are linear, so over a chunked prefill the
scores of kept tokens simply accumulate (``cumulative``).
"""

from __future__ import annotations

import torch

from depthkv.scorers.base import ScoreInputs, Scorer, attention_blocks


def later_attention_mass(x: ScoreInputs) -> torch.Tensor:
    """sum over later queries of alpha_ij, mean over the query group: [B, KVH, K] (float32)."""
    b, kvh, nk = x.key.shape[0], x.key.shape[1], x.key.shape[2]
    nq = x.query.shape[2]
    total = torch.zeros(b, kvh, nk, dtype=torch.float32, device=x.key.device)
    for i0, i1, probs in attention_blocks(x):
        self_idx = nk - nq + torch.arange(i0, i1, device=x.key.device)
        diag = probs[..., torch.arange(i1 - i0, device=x.key.device), self_idx]  # [B,KVH,G,blk]
        total += probs.sum(dim=3).mean(dim=2)
        total.index_add_(2, self_idx, -diag.mean(dim=2))
    return total


class H2O(Scorer):
    """H2O without values: accumulated attention from later queries."""

    name = "h2o"
    cumulative = True
    needs_attention = True

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return later_attention_mass(x)


class H2OValue(Scorer):
    """H2O with values: ||V_j||_p times the accumulated attention (paper's "H2O w/ V")."""

    cumulative = True
    needs_attention = True

    def __init__(self, p: int = 1):
        if p not in (1, 2):
            raise ValueError(f"H2O value norm must be l1 or l2, got p={p}")
        self.p = p

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"h2o_v{self.p}"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return later_attention_mass(x) * x.value.float().norm(p=self.p, dim=-1)

    def __repr__(self) -> str:
        return f"H2OValue(p={self.p})"
