"""Scorers that need no attention weights: StreamingLLM, key norm, random."""

from __future__ import annotations

import torch

from depthkv.scorers.base import ScoreInputs, Scorer


class StreamingLLM(Scorer):
    """StreamingLLM (Xiao et al. 2024): keep ``sinks`` first tokens, then the most recent ones."""

    name = "streaming"

    def __init__(self, sinks: int = 4):
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        self.sinks = sinks

    def score(self, x: ScoreInputs) -> torch.Tensor:
        pos = x.positions.float()
        return torch.where(x.positions < self.sinks, pos.new_tensor(float("inf")), pos)

    def __repr__(self) -> str:
        return f"StreamingLLM(sinks={self.sinks})"


class KeyNorm(Scorer):
    """Key-norm (Devoto et al. 2024): tokens with a *low* L2 key norm draw attention, so keep them."""

    name = "knorm"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return -x.key.float().norm(dim=-1)


class RandomScorer(Scorer):
    """Uniform random scores, seeded per layer: the floor any real scorer must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, x: ScoreInputs) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + x.layer_idx)
        return torch.rand(x.key.shape[:3], generator=gen).to(x.key.device)

    def __repr__(self) -> str:
        return f"RandomScorer(seed={self.seed})"
