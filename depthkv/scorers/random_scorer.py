"""Uniform random scores, seeded per layer: the floor any real scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthkv.scorers.base import ScoreInputs, Scorer


@dataclass
class RandomScorer(Scorer):
    seed: int = 0
    name = "random"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + x.layer_idx)
        return torch.rand(x.key.shape[:3], generator=gen).to(x.key.device)
