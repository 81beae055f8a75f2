"""H2O with values, the DepthKV paper's "H2O w/ V": ||V_j||_p times H2O's accumulated attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthkv.scorers.base import ScoreInputs, Scorer
from depthkv.scorers.h2o import later_attention_mass


@dataclass
class H2OValue(Scorer):
    """||V_j||_p (p = 1 or 2) times the attention later queries pay to token j."""

    p: int = 1
    cumulative = True
    needs_attention = True

    def __post_init__(self) -> None:
        if self.p not in (1, 2):
            raise ValueError(f"H2O value norm must be l1 or l2, got p={self.p}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"h2o_v{self.p}"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return later_attention_mass(x) * x.value.float().norm(p=self.p, dim=-1)
