"""KVzip (Kim et al. 2025, arXiv 2505.23416): query-agnostic scores from reconstructing the context.

After the context is prefilled, the model is asked to repeat it ("Repeat the previous context exactly.")
and is teacher-forced with the context itself. A KV pair that the reconstruction needs is attended to
strongly by some reconstruction query; one that nobody looks at while the whole context is rewritten is
unlikely to matter for any later question. Score of context token j in KV head h = the largest attention
probability it receives from any reconstruction query of any query head of h's group.

The engine runs the reconstruction (``depthkv.engine.reconstruct``): the context is replayed in chunks
(``replay_chunk`` tokens each, so 32k+ contexts fit), each chunk after the repeat prompt (and, from the second
chunk on, the last ``overlap`` tokens of the previous one, so the model knows where to resume); scores are
max-accumulated over chunks and the replayed tokens are dropped from the cache again. Its cost is about one
more prefill of the context.

Normalisation (``normalise``). With ``"context"`` (the default) each replay query's softmax runs over every key
it sees: the whole context and the replayed tokens before it. With ``"chunk"`` it runs only over the first
``sink`` keys, the keys of the chunk being replayed and the replayed tokens, as the paper's implementation does
(github.com/snu-mllab/KVzip; kvpress's KVzipPress likewise): a chunk's tokens then compete only with their own
chunk for the replay's attention, and keys of other chunks get nothing from it. The two agree when the context
is a single chunk. On the calibration split (Qwen2.5-Coder-1.5B, ~4k tokens, ratios 0.8 / 0.9) "chunk" was level
at 0.8 and slightly worse at 0.9 (docs/agnostic.md): the default stays "context".

Optional span pooling (``kernel > 1``, not in the paper): a fact is usually a span of several tokens
(``VAR ABCDE = 12345``), and a token-level top-k that keeps part of a span and drops the rest breaks it.
As SnapKV (Li et al. 2024, arXiv 2404.14469) smooths its votes with 1-D pooling, the scores are then
max-pooled over ``kernel`` neighbouring keys, so a high-scoring token lifts its neighbours. On the calibration
split of needle, multikey, vartrack and docqa (Qwen2.5-Coder-1.5B, ratios 0.8 / 0.9) it did not help and
kernel 7 hurt (docs/agnostic.md): the default stays 1.

Optional weighting of the copying queries (``self_window`` / ``self_weight``, not in the paper). While the context
is replayed, the query that predicts token ``p`` (it replays token ``p - 1``) copies ``p`` from the cache and pays it
near-full attention in the copying heads, whatever ``p`` is worth to anything else; so every replayed token scores
high there and inserted facts rank about at chance (docs/agnostic.md). With ``self_window = w`` the replay queries
within ``w`` tokens of that copying query (replaying ``p - 1 - w`` to ``p - 1 + w``) count only ``self_weight`` of
their attention towards key ``p`` (0: none). A token then scores by the attention it gets from the replay of the
*other* parts of the context — how much the rest of the text refers to it — and, among tokens nothing else refers
to, by its own copy. Only the replayed chunk's own tokens are mapped to positions (the repeat prompt and the overlap
before them always count in full). On the calibration split (Qwen2.5-Coder-1.5B, 4k tokens, ratios 0.8 / 0.9,
``benchmarks/scorer_dev.py``) ``self_window=1, self_weight=0.3`` lowered the answer's joint KL summed over needle,
multikey, vartrack and docqa from 2.37 to 1.68 and on gsm_inf / multihop from 0.92 to 0.68, while weight 0 raised it
to 7.7 (a token nothing refers to then scores almost nothing). ``kvzip_vc`` is ``kvzip_v`` with these options.

Optional cross-layer consensus (``consensus = w > 0``, not in the paper). Once every layer is scored, each KV head
re-orders its tokens by ``rank(own score) + w * rank(consensus)``, where the consensus is the mean over all layers
and heads of each position's rank percentile, and the tokens take the head's own score values in that order
(``depthkv.scorers.reorder``): every head keeps its multiset of scores, so the budgets stay, and the heads keep more
of the same positions, as prompt compression (which drops tokens from every layer at once) does. It needs every
layer's scores first, so it prunes after the prefill (``mode="post"``). On the calibration split (Qwen2.5-Coder-1.5B,
4k tokens, ``kvzip_vc`` with ``w`` = 0.5 / 1 / 2 / 8, ``benchmarks/scorer_dev.py``) it raised the answer's joint KL at
every weight, the more the larger ``w`` (needle, multikey and vartrack at 0.8 and 0.9): the heads' own rankings
matter more than their agreement. The default stays 0.

Optional key distinctiveness (``diversity = w > 0``, not in the paper). Once a layer is replayed, each KV head
re-orders its tokens by ``rank(own score) + w * rank(-cos(key, the head's mean key))`` (KeyDiff, arXiv 2504.15364;
``depthkv.scorers.keydiff``), again keeping its multiset of scores, so the budgets stay. Inserted facts rank well
above chance by that distinctiveness where KVzip ranks them at chance (docs/agnostic.md), so the blend lifts them
without giving up the replay's order. It needs the whole context's keys, so it prunes after the prefill. On the
calibration split at ~1k tokens (Qwen2.5-Coder-1.5B on 2 CPUs, 6 samples each of needle, multikey, vartrack and
docqa, ``kvzip_vc`` with ``w`` = 0.5) the answer's joint KL summed over the four fell from 0.27 to 0.23 at ratio 0.8
and from 1.27 to 0.86 at 0.9, most of it on docqa. At 4k on an H200 (12 calibration samples of six families) it
had the lowest summed KL of the variants tried (2.11 against ``kvzip_vc``'s 2.77), and held out (``eval`` split, 40
samples per task, own profile, ``adaptive`` with per-KV-head budgets) ``kvzip_vc`` with ``w`` = 0.5 kept 0.84 / 0.89
of the full-cache score at ratio 0.8 (4k / 8k: level with ``w`` = 0) and 0.77 / 0.80 at 0.9 (+0.10 / +0.12 over
``w`` = 0; docs/agnostic.md). The default stays 0 so that a profile's recorded options keep their meaning: a
profile calibrated with ``w`` = 0.5 builds its scorer with it.

Optional question directions (``question_weight = w > 0`` with ``question_queries``, not in the paper). A context
compressed before its question still meets questions of a kind, and each query head tends to look one way when
they are asked. ``depthkv question-queries`` records that way once per model: the mean pre-RoPE query of the
question and answer tokens of calibration samples, per layer and query head (``depthkv.scorers.question_prior``).
Once a layer is replayed, each KV head re-orders its tokens by ``rank(own order) + w * rank(logit)``, the logit
being what that direction, rotated to just after the context, gives each key (mean over the KV head's query
group); again each head keeps its multiset of scores, so the budgets stay. Chosen on the calibration split (one
H200, 4k tokens, 12 samples each of six families, directions from other calibration samples, the lowest answer KL
summed over ratios 0.8 and 0.9 among ``w`` = 0.5 and 1; benchmarks/results/dev_question_weight_qwen_4k_gpu.json):
``w`` = 0.5, 1.53 against 1.62 for ``kvzip_vc`` with ``diversity=0.5`` (0.28 against 0.52 at 0.8, but 1.25 against
1.10 at 0.9, where needle and multikey rose). Held out (``eval`` split, 40 samples per task of needle, multikey,
vartrack and docqa, own profile, ``adaptive`` with per-KV-head budgets) it kept 0.92 / 0.95 of the full-cache score
at ratio 0.8 (4k / 8k) and 0.82 / 0.88 at 0.9, against 0.84 / 0.89 and 0.77 / 0.80 without it; directions
recorded on code or math questions alone gave 0.92 / 0.90 at 0.8 (4k), so they transfer across question kinds;
on gsm_inf, code_next_line and multihop it was level within noise (-0.04 at 0.8, +0.02 at 0.9, CIs covering 0;
docs/agnostic.md). The profile must be calibrated with the option: the same directions on the ``diversity=0.5``
profile fell to 0.58 at 0.9.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from depthkv.scorers import column_kernel, question_prior
from depthkv.scorers.base import ScoreInputs, Scorer, attention_blocks
from depthkv.scorers.keydiff import key_distinctiveness
from depthkv.scorers.reorder import blend_reorder, consensus

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclass
class KVzip(Scorer):
    """Max attention received during context reconstruction, per KV head (GQA-aware: max over the group).

    ``prompt_ids`` / ``next_prompt_ids``: token ids put before the replayed first / later chunks (the repeat
    instruction, closing the user turn and opening the assistant's when the tokenizer has a chat template).
    ``bind(tokenizer)`` fills them; without a tokenizer give them yourself.
    ``normalise``: ``"context"`` (softmax over every key a replay query sees) or ``"chunk"`` (over the first
    ``sink`` keys, the replayed chunk's own keys and the replayed tokens; the paper's implementation).
    ``self_window`` (None or >= 0): leave out of each key's maximum the replay queries within this many tokens
    of the one that copies it (None: every query counts, the paper's scores); ``self_weight`` in [0, 1]: their
    attention counts this much instead of nothing (1 = the paper's scores).
    ``consensus`` (>= 0): weight of the cross-layer consensus rank in each head's order (0: none, the paper's).
    ``diversity`` (>= 0): weight of the keys' distinctiveness rank (KeyDiff) in each head's order (0: none).
    ``kernel`` (odd, >= 1): width of a max-pool over neighbouring keys applied to each KV head's scores, so
    that multi-token spans are kept whole (SnapKV's pooling); 1 = the paper's scores. Neighbours are taken in
    the cache's order: the context's token order (in a chunked prefill, keys already pruned are skipped).
    Max-pooling commutes with the max over replayed chunks, so pooling each chunk's scores is exact.
    """

    replay_chunk: int = 2048
    overlap: int = 8
    prompt_ids: tuple[int, ...] | None = None
    next_prompt_ids: tuple[int, ...] | None = None
    kernel: int = 1
    normalise: str = "context"
    sink: int = 4
    self_window: int | None = None
    self_weight: float = 0.0
    consensus: float = 0.0
    diversity: float = 0.0
    question_queries: str | None = None
    question_weight: float = 0.0
    name = "kvzip"
    needs_attention = True
    context_pass = True
    #: options that act only after the replay (``finish`` / ``finish_layers``): scorers differing only in them
    #: share one replay
    finish_options: ClassVar[tuple[str, ...]] = ("consensus", "diversity", "question_queries", "question_weight")

    def __post_init__(self) -> None:
        if self.replay_chunk < 1 or self.overlap < 0:
            raise ValueError(f"KVzip needs replay_chunk >= 1 and overlap >= 0, got {self.replay_chunk}, {self.overlap}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"KVzip needs an odd integer kernel >= 1, got {self.kernel!r}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"KVzip normalise must be one of {', '.join(NORMALISATIONS)}, got {self.normalise!r}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"KVzip needs an integer sink >= 0, got {self.sink!r}")
        if self.self_window is not None and (isinstance(self.self_window, bool)
                                             or not isinstance(self.self_window, int) or self.self_window < 0):
            raise ValueError(f"KVzip needs self_window None or an integer >= 0, got {self.self_window!r}")
        if isinstance(self.self_weight, bool) or not isinstance(self.self_weight, (int, float)) \
                or not 0 <= self.self_weight <= 1:
            raise ValueError(f"KVzip needs a self_weight in [0, 1], got {self.self_weight!r}")
        for option in ("consensus", "diversity", "question_weight"):
            weight = getattr(self, option)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise ValueError(f"KVzip needs a {option} weight >= 0, got {weight!r}")
        if self.question_weight > 0 and not self.question_queries:
            raise ValueError("KVzip's question_weight needs question_queries: the path of a file written by "
                             "depthkv question-queries")
        if self.question_queries is not None:
            self.question_queries = str(self.question_queries)
        if self.prompt_ids is not None:
            self.prompt_ids = tuple(int(t) for t in self.prompt_ids)
            self.next_prompt_ids = tuple(int(t) for t in (self.next_prompt_ids or self.prompt_ids))

    def replay_key(self) -> tuple:
        options = tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                        if f.name not in self.finish_options)
        return (type(self).score.__qualname__, *options)

    @property
    def whole_context(self) -> bool:
        """The consensus ranks every layer's scores of the whole context at once, the diversity and question
        blends rank a layer's whole context: no chunk-by-chunk pruning."""
        return self.consensus > 0 or self.diversity > 0 or self.question_weight > 0

    def finish(self, scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *,
               layer_idx: int | None = None, inv_freq: torch.Tensor | None = None, position: int | None = None,
               group=None) -> torch.Tensor:
        """The diversity blend, then the question-direction blend (``layer_idx``, ``inv_freq``: the model's RoPE
        frequencies and ``position``: the first position after the context are needed for it; ``group``: the
        tensor-parallel group when the heads are sharded)."""
        n = scores.shape[-1]
        if self.diversity > 0:
            scores = blend_reorder(scores, key_distinctiveness(keys[..., :n, :]), self.diversity)
        if self.question_weight > 0:
            scores = blend_reorder(scores, self._question_signal(keys[..., :n, :], layer_idx, inv_freq, position,
                                                                 group), self.question_weight)
        return scores

    def _question_signal(self, keys: torch.Tensor, layer_idx: int | None, inv_freq: torch.Tensor | None,
                         position: int | None, group) -> torch.Tensor:
        """[B, KVH, N] logit of each key under this layer's mean calibration-question query (question_prior)."""
        if layer_idx is None or inv_freq is None or position is None:
            raise ValueError("KVzip's question blend needs the layer index, the model's RoPE frequencies and the "
                             "position after the context (a rotary model, scored through depthkv's engine)")
        table = question_prior.load_cached(self.question_queries).table
        if layer_idx >= table.shape[0]:
            raise question_prior.QuestionQueriesError(
                f"{self.question_queries} holds {table.shape[0]} layers; this model has more: record them for "
                "this model (depthkv question-queries)")
        directions = table[layer_idx]
        if group is not None:  # this rank's shard of the KV heads, hence of the query heads
            import torch.distributed as dist

            world, rank = dist.get_world_size(group), dist.get_rank(group)
            per_rank = directions.shape[0] // world
            directions = directions[rank * per_rank:(rank + 1) * per_rank]
        return question_prior.question_logits(directions, keys, inv_freq,
                                              position + question_prior.QUESTION_LEAD)

    def finish_layers(self, layers: list[torch.Tensor | None], group=None) -> list[torch.Tensor | None]:
        if self.consensus == 0:
            return layers
        shared = consensus(layers, group)
        return [None if s is None else blend_reorder(s, shared.to(s.device), self.consensus) for s in layers]

    def check_model(self, identity: dict) -> None:
        """Raise unless the question queries (if any) were recorded on the model ``identity`` describes."""
        if self.question_queries:
            question_prior.load_cached(self.question_queries).check_model(identity, source=self.question_queries)

    @property
    def ready(self) -> bool:
        return self.prompt_ids is not None

    def bind(self, tokenizer) -> KVzip:
        """A copy with the repeat prompts encoded for ``tokenizer`` (chat-formatted when it has a template)."""
        if tokenizer is None:
            return self
        suffix = assistant_turn_opening(tokenizer)
        first = _encode(tokenizer, FIRST_PROMPT) + suffix
        later = _encode(tokenizer, NEXT_PROMPT) + suffix
        return dataclasses.replace(self, prompt_ids=tuple(first), next_prompt_ids=tuple(later))

    def score(self, x: ScoreInputs) -> torch.Tensor:
        if x.n_context is None:
            raise ValueError("KVzip scores context keys from a reconstruction pass; n_context is missing")
        n = x.n_context
        visible = self._visible(x) if self.normalise == "chunk" else None
        if visible is not None:
            sub = _visible_subset(x, visible)
            if sub is not None:  # the same keys visible in every head: score the subset, put the scores back
                x_sub, index = sub
                scores = torch.zeros(x.key.shape[0], x.key.shape[1], n, dtype=torch.float32, device=x.key.device)
                scores.scatter_(-1, index, _max_attention(x_sub, index.shape[-1], None, self.self_window,
                                                          self.self_weight))
                return span_max_pool(scores, self.kernel)
        return span_max_pool(_max_attention(x, n, visible, self.self_window, self.self_weight), self.kernel)

    def _visible(self, x: ScoreInputs) -> torch.Tensor | None:
        """[B, KVH, K] keys in the softmax under ``normalise="chunk"`` (None: no replay span known, all)."""
        if x.replay_span is None:
            return None
        start, end = x.replay_span
        pos = x.positions[..., :x.n_context]
        ctx = (pos < self.sink) | ((pos >= start) & (pos < end))
        tail = torch.ones(*ctx.shape[:2], x.key.shape[2] - x.n_context, dtype=torch.bool, device=ctx.device)
        return torch.cat([ctx, tail], dim=-1)


def _max_attention(x: ScoreInputs, n: int, visible: torch.Tensor | None = None,
                   self_window: int | None = None, self_weight: float = 0.0) -> torch.Tensor:
    """[B, KVH, n] largest attention any query of a KV head's group pays to each of the first n keys (each key's
    copying queries weighted by ``self_weight`` when ``self_window`` is set)."""
    copying = _copying_queries(x, n, self_window)
    if visible is None and copying is None and column_kernel.usable(x):  # CUDA: fused Triton kernel
        return column_kernel.max_attention_fused(x, n)
    best = torch.zeros(x.key.shape[0], x.key.shape[1], n, dtype=torch.float32, device=x.key.device)
    for i0, i1, probs in attention_blocks(x, visible=visible):
        block = probs[..., :n]
        if copying is not None:
            near = copying(i0, i1)
            block = block.masked_fill(near, 0.0) if self_weight == 0 else torch.where(near, block * self_weight, block)
        best = torch.maximum(best, block.amax(dim=(2, 3)))
    return best


def _copying_queries(x: ScoreInputs, n: int, window: int | None):
    """None, or a function (i0, i1) -> [B, KVH, 1, i1-i0, n] bool: query i (of this forward) replays a context
    token within ``window`` positions of the token just before key k (the query that copies k)."""
    if window is None or x.replay_span is None:
        return None
    start, end = x.replay_span
    n_q = x.query.shape[2]
    first = n_q - (end - start)  # the replayed chunk's tokens are the forward's last end - start queries
    if first < 0:
        raise ValueError(f"replay span {x.replay_span} is longer than the forward's {n_q} queries")
    before = x.positions[..., :n].to(torch.long) - 1  # [B, KVH, n]: the position whose replay copies key k

    def mask(i0: int, i1: int) -> torch.Tensor:
        q = torch.arange(i0, i1, device=x.key.device)
        replayed = torch.where(q >= first, start + q - first, torch.full_like(q, -(1 << 40)))  # prompt: far away
        return (replayed[None, None, :, None] - before[:, :, None, :]).abs().le(window).unsqueeze(2)

    return mask


NORMALISATIONS = ("context", "chunk")


def _visible_subset(x: ScoreInputs, visible: torch.Tensor) -> tuple[ScoreInputs, torch.Tensor] | None:
    """``x`` restricted to its visible keys, with the [B, KVH, m] indices of the visible context keys, when
    every (sequence, head) sees the same number of them and the queries are the replayed tokens after the
    context; else None (then the keys are masked instead)."""
    n = x.n_context
    if x.key.shape[2] - x.query.shape[2] != n:
        return None
    counts = visible[..., :n].sum(-1)
    m = int(counts.flatten()[0])
    if not bool((counts == m).all()):
        return None
    index = torch.argsort((~visible[..., :n]).to(torch.int8), dim=-1, stable=True)[..., :m]
    gather = index.unsqueeze(-1).expand(-1, -1, -1, x.key.shape[-1])
    key = torch.cat([x.key.gather(2, gather), x.key[:, :, n:]], dim=2)
    value = torch.cat([x.value.gather(2, gather), x.value[:, :, n:]], dim=2)
    positions = torch.cat([x.positions.gather(2, index), x.positions[..., n:]], dim=-1)
    return dataclasses.replace(x, key=key, value=value, positions=positions, n_context=m), index


def span_max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool ``scores`` [B, KVH, K] along the keys over ``kernel`` (odd) neighbours, same shape out."""
    if kernel == 1:
        return scores
    b, h, k = scores.shape
    pooled = F.max_pool1d(scores.reshape(b * h, 1, k), kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(b, h, k)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_turn_opening(tokenizer) -> list[int]:
    """Token ids that close a user turn and open the assistant's (empty without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return _encode(tokenizer, "\n")
    marker = "\u2063KVZIP\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x" + marker}], tokenize=False,
                                         add_generation_prompt=True)
    tail = text.split(marker, 1)[-1]
    return _encode(tokenizer, tail)
