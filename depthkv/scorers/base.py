"""The scorer interface: one small class per token-importance method, higher score = keep.

A scorer sees one layer's post-RoPE queries of the current forward, the layer's physical keys/values
(already holding this forward's tokens) and the logical position of each key. It returns one score per
(batch, KV head, key). GQA: score per query head, then reduce within each KV group (mean for most scorers).

Two kinds of scorer exist:

* in-prefill scorers (SnapKV, H2O, ...) score the keys from the queries of the prefill itself;
* context-pass scorers (``context_pass = True``, e.g. KVzip) need queries that are not in the prompt: after
  the prefill the engine feeds extra tokens (a reconstruction of the context), the scorer reads the
  attention those queries pay to the first ``n_context`` keys, and the extra tokens are dropped again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class ScoreInputs:
    query: torch.Tensor  # [B, H, Q, d] post-RoPE queries of this forward (the last Q tokens of the keys)
    key: torch.Tensor  # [B, KVH, K, d] post-RoPE keys of the layer's cache, physical order
    value: torch.Tensor  # [B, KVH, K, d]
    positions: torch.Tensor  # [B, KVH, K] logical positions of the keys
    scaling: float  # softmax scale of the model's attention (1/sqrt(d) for most models)
    layer_idx: int
    inv_freq: torch.Tensor | None = None  # [d/2] RoPE inverse frequencies of the model (None: unknown)
    n_context: int | None = None  # context-pass forwards: keys [0, n_context) are the context being scored
    # context-pass forwards: logical positions [start, end) of the context chunk these queries replay
    replay_span: tuple[int, int] | None = None
    # results several scorers of one forward share (e.g. H2O's attention mass, which H2O with values reuses);
    # not copied by dataclasses.replace, so a per-sequence view starts empty
    memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)


class Scorer:
    """Base class. ``cumulative`` scorers add up over chunks of a chunked prefill (H2O's running sums)."""

    name: ClassVar[str] = ""
    cumulative: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False
    context_pass: ClassVar[bool] = False
    whole_context: ClassVar[bool] = False  # ``finish`` needs the whole context's scores: no chunk-by-chunk pruning

    def score(self, x: ScoreInputs) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *,
               layer_idx: int | None = None, inv_freq: torch.Tensor | None = None, position: int | None = None,
               group=None) -> torch.Tensor:
        """Context-pass scorers: a last step over one layer's scores [B, KVH, N], max-accumulated over every
        replayed chunk, with the layer's cached keys and values [B, KVH, >=N, d] (the first N are the scored
        tokens), the layer's index, the model's RoPE frequencies (None: not rotary), the logical position right
        after the context and the tensor-parallel group (None: heads not sharded). Most scorers have none."""
        return scores

    def replay_key(self) -> tuple | None:
        """Context-pass scorers: what their replay's raw scores depend on. Two scorers with the same key get the
        same raw scores from one replay (only ``finish`` / ``finish_layers`` differ), so the engine replays once
        for both; None: never shared."""
        return None

    def finish_layers(self, layers: list[torch.Tensor | None], group=None) -> list[torch.Tensor | None]:
        """Context-pass scorers: a last step over every layer's finished scores at once (``None``: a layer not
        scored), e.g. a ranking shared across layers; ``group``: the tensor-parallel process group, if the heads
        are sharded. Most scorers have none."""
        return layers

    def check_model(self, identity: dict) -> None:
        """Raise unless this scorer's own data (if any) was made for the model ``identity`` describes
        (``depthkv.models.identity.model_identity``); most scorers carry none."""

    def bind(self, tokenizer) -> Scorer:
        """This scorer, completed with what it needs from the tokenizer (most need nothing)."""
        return self


def grouped_queries(x: ScoreInputs) -> torch.Tensor:
    """Queries as [B, KVH, G, Q, d] so that each KV head meets its own query group."""
    b, h, q, d = x.query.shape
    return x.query.reshape(b, x.key.shape[1], h // x.key.shape[1], q, d)


def attention_blocks(
    x: ScoreInputs, q_start: int = 0, max_elems: int = 1 << 26, visible: torch.Tensor | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Causal softmax attention of queries [q_start, Q) in blocks: yields (i0, i1, probs [B,KVH,G,i1-i0,K]).

    ``visible`` ([B, KVH, K] bool, optional): keys outside it are left out of every query's softmax.

    Never materialises the full N x N matrix of all heads: each block holds at most ``max_elems`` floats.
    Query i (of Q) sits at physical key index K - Q + i and sees keys 0..K-Q+i.
    """
    # on GPU the matmul runs in the model's dtype (fp32 accumulation in the tensor cores), softmax in fp32;
    # on CPU everything is fp32 (half-precision matmuls are slow there)
    dtype = x.query.dtype if x.query.is_cuda else torch.float32
    qg = grouped_queries(x).to(dtype)
    k = x.key.to(dtype)
    b, kvh, g, nq, _ = qg.shape
    nk = k.shape[2]
    block = max(1, min(nq, max_elems // max(1, b * kvh * g * nk)))
    key_idx = torch.arange(nk, device=k.device)
    for i0 in range(q_start, nq, block):
        i1 = min(nq, i0 + block)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", qg[:, :, :, i0:i1], k).float() * x.scaling
        last_visible = nk - nq + torch.arange(i0, i1, device=k.device)
        hidden = key_idx[None, :] > last_visible[:, None]  # [blk, K]
        logits.masked_fill_(hidden, float("-inf"))
        if visible is not None:
            logits.masked_fill_(~visible[:, :, None, None, :], float("-inf"))
        yield i0, i1, torch.softmax(logits, dim=-1)
