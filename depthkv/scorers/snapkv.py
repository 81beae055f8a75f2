"""SnapKV (Li et al. 2024): the last ``window`` queries vote, votes are smoothed by 1-D average pooling.

The observation window's own tokens get the highest score so they are kept first, as SnapKV keeps its
window. In a chunked prefill the window is the last ``window`` queries of the current chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from depthkv.scorers.base import ScoreInputs, Scorer, attention_blocks


@dataclass
class SnapKV(Scorer):
    window: int = 32
    kernel: int = 5
    name = "snapkv"
    needs_attention = True

    def __post_init__(self) -> None:
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV needs window >= 1 and an odd kernel >= 1, got {self.window}, {self.kernel}")

    def score(self, x: ScoreInputs) -> torch.Tensor:
        nq, nk = x.query.shape[2], x.key.shape[2]
        w = min(self.window, nq)
        votes = torch.zeros(x.key.shape[0], x.key.shape[1], nk, device=x.key.device)
        for _, _, probs in attention_blocks(x, q_start=nq - w):
            votes += probs.sum(dim=3).mean(dim=2)
        votes = votes / w
        if self.kernel > 1:
            b, h, k = votes.shape
            votes = F.avg_pool1d(votes.reshape(b * h, 1, k), self.kernel, stride=1, padding=self.kernel // 2,
                                 count_include_pad=False).reshape(b, h, k)
        votes[..., nk - w:] = votes.max() + 1.0
        return votes
