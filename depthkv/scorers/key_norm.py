"""Key norm (Devoto et al. 2024): tokens with a *low* L2 key norm draw attention, so keep them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthkv.scorers.base import ScoreInputs, Scorer


@dataclass
class KeyNorm(Scorer):
    name = "knorm"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return -x.key.float().norm(dim=-1)
