"""KeyDiff (Park et al. 2025, arXiv 2504.15364): keep the keys that differ most from their head's average key.

Keys that point the way most keys of a head point draw the attention that the head pays to everything alike;
a key far from that direction is one some query must single out. The score of key ``j`` in KV head ``h`` is
``-cos(k_j, anchor_h)``, the anchor being the mean of the head's L2-normalised keys. It reads the keys alone:
no attention, no question, no extra pass, so it prunes chunk by chunk and under any attention implementation.
In a chunked prefill the anchor is taken over the keys the cache holds at that chunk.

Question-independent. On the calibration split (Qwen2.5-Coder-1.5B, ~1k tokens, ``benchmarks/fact_auc.py``)
vartrack's inserted statements rank far above chance by this score (mean ROC AUC 0.72 over KV heads, against
KVzip's 0.49), multikey's and needle's sentences near it; kept alone its tokens lose far more than KVzip's do:
the tokens a head needs besides the facts are not distinctive (docs/agnostic.md). ``KVzip(diversity=w)`` blends
it into KVzip's order instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from depthkv.scorers.base import ScoreInputs, Scorer


def key_distinctiveness(keys: torch.Tensor) -> torch.Tensor:
    """[B, KVH, N] ``-cos(k, anchor)`` of ``keys`` [B, KVH, N, d], anchor = the mean normalised key of the head."""
    unit = F.normalize(keys.float(), dim=-1)
    anchor = F.normalize(unit.mean(dim=2, keepdim=True), dim=-1)
    return -(unit * anchor).sum(dim=-1)


@dataclass
class KeyDiff(Scorer):
    name = "keydiff"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return key_distinctiveness(x.key)
