"""StreamingLLM (Xiao et al. 2024): keep the first ``sinks`` tokens (attention sinks), then the most recent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthkv.scorers.base import ScoreInputs, Scorer


@dataclass
class StreamingLLM(Scorer):
    sinks: int = 4
    name = "streaming"

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, x: ScoreInputs) -> torch.Tensor:
        pos = x.positions.float()
        return torch.where(x.positions < self.sinks, pos.new_tensor(float("inf")), pos)
