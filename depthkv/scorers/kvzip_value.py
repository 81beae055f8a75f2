"""KVzip with values: KVzip's reconstruction attention, with value norms mixed into the order inside each head.

What a kept token adds to a later output is its attention times its value vector, and tokens with small
values change little even when attended (VATP: Guo et al. 2024, arXiv 2406.12335, who weight H2O's and
SnapKV's attention by ``||v||``). KVzip (arXiv 2505.23416) reads attention alone. Here each KV head orders its
tokens by ``rank(KVzip score) + value_weight * rank(||v||_2)`` (ranks within the head, ties by position) and the
tokens then take KVzip's own score values in that order: every head keeps the same multiset of scores, so an
allocator that reads the score distribution of each layer and head (``uniform``, ``optimal``, ``adaptive``,
per-head budgets) gives the budgets plain KVzip gives, and only which tokens fill them changes.

The order is set once the whole context is replayed (``finish``), so this scorer prunes after the prefill
(``mode="post"``), not chunk by chunk. Development check on the calibration split (Qwen2.5-Coder-1.5B, ~1k
tokens, 6 samples per task, ``adaptive`` with per-head budgets and KVzip's budgets, the answer's joint KL against
the full cache): at ratio 0.9 vartrack 1.20 -> 0.58 and multikey 0.19 -> 0.13; at 0.8 vartrack 0.21 -> 0.18,
multikey 0.002 -> 0.017. Held out (the ``eval`` split, 40 samples each of needle, multikey, vartrack and docqa, the
question after compression, ``adaptive`` with per-head budgets and a profile calibrated with this scorer): 0.70 /
0.68 of the full-cache score at ratio 0.9 at 4k / 8k tokens against plain KVzip's 0.55 / 0.53; level at 0.8; a
little below KVzip at 0.8 on summaries and code; no gain on SmolLM2-135M at 1k tokens (docs/agnostic.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthkv.scorers.kvzip import KVzip
from depthkv.scorers.reorder import blend_reorder


@dataclass
class KVzipValue(KVzip):
    """KVzip's scores re-ordered inside each KV head by ``rank(score) + value_weight * rank(||v||_2)``."""

    value_weight: float = 0.5
    name = "kvzip_v"
    whole_context = True
    finish_options = (*KVzip.finish_options, "value_weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.value_weight, bool) or not isinstance(self.value_weight, (int, float)) \
                or not self.value_weight >= 0:
            raise ValueError(f"KVzipValue needs a value_weight >= 0, got {self.value_weight!r}")

    def finish(self, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, **where) -> torch.Tensor:
        """The value-norm blend first, then KVzip's own finish (``diversity``, the question blend) on its order."""
        return super().finish(value_reorder(scores, values[..., : scores.shape[-1], :], self.value_weight), keys,
                              values, **where)


def value_reorder(scores: torch.Tensor, values: torch.Tensor, weight: float) -> torch.Tensor:
    """``scores`` [B, KVH, N] permuted within each (sequence, head): the token with the highest
    ``rank(score) + weight * rank(||values||_2)`` gets the highest score, and so on (same multiset per head)."""
    return blend_reorder(scores, values.float().norm(dim=-1), weight)
