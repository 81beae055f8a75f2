"""KVzip with values and copies weighted down: ``kvzip_v`` whose replay counts each token's copying queries at 0.3.

KVzip (arXiv 2505.23416) scores a context token by the largest attention it receives while the model replays the
context. The replay query that predicts a token copies it and pays it near-full attention in the copying heads,
whatever the token is worth to anything else, so every replayed token scores high there and inserted facts rank
about at chance. Here the replay queries within one token of that copying query count only 0.3 of their attention
(``KVzip(self_window=1, self_weight=0.3)``): a token then ranks by how strongly the replay of the *rest* of the
context attends to it — a fact that later text refers to (a variable's value, the link of a chain) rises — and,
among tokens nothing else refers to, still by its own copy. Inside each KV head the order is then blended with the
value norms as in ``kvzip_v`` (VATP, arXiv 2406.12335).

Chosen on the calibration split (Qwen2.5-Coder-1.5B, 4k tokens, 12 samples each of needle, multikey, vartrack,
docqa, gsm_inf and multihop, ``adaptive`` with per-KV-head budgets, the answer's joint KL against the full cache,
``benchmarks/scorer_dev.py``): summed over the four retrieval tasks at ratios 0.8 and 0.9, 1.50 against
``kvzip_v``'s 2.02 and KVzip's 2.37; leaving the copying queries out entirely (weight 0) was far worse (5.0 / 7.7),
since a token nothing refers to then scores almost nothing. Held out (``eval`` split, 40 samples per task, its own
profile): 0.84 / 0.85 of the full-cache score at ratio 0.8 at 4k / 8k tokens against ``kvzip_v``'s 0.80 / 0.80 and
KVzip's 0.79 / 0.82, and 0.66 / 0.66 at 0.9 against ``kvzip_v``'s 0.70 / 0.68; at 0.6 (4k) 0.91 against KVzip's 0.95
and ``kvzip_v``'s 0.87; on SmolLM2-135M at 1k tokens level with KVzip (0.95 / 0.78 against 0.96 / 0.82 at 0.8 / 0.9;
docs/agnostic.md). With ``diversity=0.5`` (``KVzip``'s key-distinctiveness blend) it keeps 0.84 / 0.89 at 0.8 and
0.77 / 0.80 at 0.9 (4k / 8k), the best setting measured here at those ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthkv.scorers.kvzip_value import KVzipValue


@dataclass
class KVzipValueCopy(KVzipValue):
    """``kvzip_v`` with each token's copying queries (within ``self_window`` of it) counted at ``self_weight``."""

    self_window: int | None = 1
    self_weight: float = 0.3
    name = "kvzip_vc"
