"""The engine's runtime: hooks that score tokens during prefill and physically prune each layer's cache.

A ``Session`` attaches to a HF causal LM for the duration of a ``with`` block:

* it switches the model to ``depthkv_<sdpa|eager>`` attention (mask alignment for per-layer lengths);
* a forward pre-hook on every attention module hands the module the cache of the current forward;
* during a forward that the session's ``plan`` marks for scoring, the attention call computes the scorers'
  token scores from the post-RoPE queries/keys (``before_attention``);
* after the module's forward a hook prunes the layer's cache to its budget (``_after_attention``).

Plans: ``post`` (prune once, right after the prefill, as kvpress does), ``chunked`` (prune after every chunk
of a driven prefill), ``score`` (collect every requested scorer's scores, prune nothing: the
score-once/prune-many path), ``reconstruct`` (a context-pass scorer such as KVzip reads the attention that
replayed tokens pay to the context; max-accumulated, nothing pruned), ``off`` (only align masks, e.g. while
decoding from a pruned cache).

Budgets that depend on the input's scores (``global``/``adaptive`` allocators) or per-KV-head budgets need
every layer's scores before any layer is pruned: ``Plan.defer`` then holds the pruning back until the last
layer's attention of the prefill has run, and prunes all layers at once (``prune_all``).

Batches: each sequence is scored on its own tokens (``score_sequences``) and pruned to the budgets of its own
length (``sequence_budgets``), so it keeps what it would keep alone; a left-padded batch never keeps padding,
and sequences that keep different numbers of tokens are stored ragged (``PrunedLayer.valid``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.allocation.builder import BudgetPolicy, policy_needs_scores
from depthkv.engine.attention import align_mask, left_padding, register, restrict_keys, wrapped_name
from depthkv.engine.cache import PrunedLayer, gather_ragged, gather_tokens, kv_bytes, layer_positions
from depthkv.engine.tensor_parallel import gather_head_scores, tp_group
from depthkv.scorers import ScoreInputs, Scorer


@dataclass(frozen=True)
class Protection:
    """Tokens a layer always keeps, counted inside its budget: attention sinks and a recent window."""

    n_sink: int = 4
    n_recent: int = 16

    def __post_init__(self) -> None:
        if self.n_sink < 0 or self.n_recent < 0:
            raise ValueError(f"protected window sizes must be >= 0, got sinks={self.n_sink}, recent={self.n_recent}")

    @property
    def size(self) -> int:
        return self.n_sink + self.n_recent

    def check_context(self, context_len: int) -> None:
        if context_len < self.size:
            raise BudgetError(
                f"context of {context_len} tokens is shorter than the protected window "
                f"({self.n_sink} sinks + {self.n_recent} recent = {self.size} tokens)"
            )

    def apply(self, scores: torch.Tensor, positions: torch.Tensor, logical_len: int) -> torch.Tensor:
        """Scores with protected tokens lifted to +inf so that top-k keeps them first."""
        if self.size == 0:
            return scores
        keep = (positions < self.n_sink) | (positions >= logical_len - self.n_recent)
        return scores.masked_fill(keep, float("inf"))


def select_tokens(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices [B, KVH, budget] of the top-scoring tokens of each KV head, in sequence order."""
    if budget >= scores.shape[-1]:
        b, h, k = scores.shape
        return torch.arange(k, device=scores.device).expand(b, h, k)
    return scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with q_proj/layer_idx found")
    mods.sort(key=lambda m: m.layer_idx)
    return mods


@dataclass
class Plan:
    """What the session does in the forwards to come."""

    kind: str = "off"  # off | post | chunked | score | ablate
    scorers: Sequence[Scorer] = ()
    policy: BudgetPolicy | None = None
    protection: Protection = field(default_factory=Protection)
    context_len: int | None = None  # chunked: the full context length the budgets refer to
    defer: bool = False  # post: prune every layer once the last one is scored (score-dependent budgets)
    head_budgets: bool = False  # split each layer's budget across its KV heads by their scores
    # ablate: layer -> [B, KVH, N] bool, the context keys each batch row may see in that layer (masking, no
    # eviction: lets one batched forward hold probes that prune different layers by different amounts)
    key_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    # reconstruct: logical positions [start, end) of the context chunk the forward replays
    replay_span: tuple[int, int] | None = None


class Session:
    """Hooks one model; see the module docstring."""

    def __init__(self, model: nn.Module):
        register()
        self.model = model
        self.modules = attention_modules(model)
        self.n_layers = len(self.modules)
        self.plan = Plan()
        self.scores: dict[str, list[torch.Tensor | None]] = {}
        self.last_budgets: Budgets | None = None
        # one budget vector per sequence of the last pruned batch (each from the sequence's own length)
        self.last_sequence_budgets: list[Budgets] | None = None
        # left padding per sequence [B] of the batch being scored; None for a single unpadded sequence
        self.n_pad: torch.Tensor | None = None
        self._sequence_budget_cache: tuple[tuple, list[Budgets]] | None = None
        self.kept_kv_bytes: int | None = None  # measured on the real tensors after the last pruning pass
        self.peak_kv_bytes = 0  # largest KV footprint seen just before a pruning step (since the last set_plan)
        self._cache = None
        self.inv_freq = rope_inv_freq(model)
        # tensor-parallel model: the group sharding its KV heads (None: every head is local)
        self.tp_group = tp_group(self.modules)
        self._handles: list = []
        self._saved_impl: str | None = None

    # ----------------------------------------------------------------- attach / detach
    def __enter__(self) -> Session:
        cfg = self.model.config
        self._saved_impl = cfg._attn_implementation
        cfg._attn_implementation = wrapped_name(self._saved_impl)
        for m in self.modules:
            m._depthkv_session = self
            self._handles.append(m.register_forward_pre_hook(self._grab_cache, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._after_attention, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self.modules:
            if getattr(m, "_depthkv_session", None) is self:
                del m._depthkv_session
        if self._saved_impl is not None:
            self.model.config._attn_implementation = self._saved_impl
        self._cache = None

    # ----------------------------------------------------------------- hooks
    def _grab_cache(self, module, args, kwargs):
        self._cache = kwargs.get("cache", kwargs.get("past_key_values"))

    def _layer(self, idx: int):
        cache = self._cache
        if cache is None or idx >= len(cache.layers):
            return None
        return cache.layers[idx]

    def _wants_scores(self, layer, n_query: int) -> bool:
        kind = self.plan.kind
        if kind == "off" or n_query < 1 or layer is None:
            return False
        if kind == "post":  # the prefill of a fresh cache; later forwards (questions, decoding) are left alone
            return n_query > 1 and layer.get_seq_length() == n_query
        if kind == "chunked":  # every chunk of a driven prefill, a single-token chunk too
            return self.plan.context_len is not None
        return kind in ("score", "reconstruct")

    def before_attention(self, module, query, key, value, mask):
        idx = module.layer_idx
        layer = self._layer(idx)
        mask = align_mask(mask, layer, key.shape[-2], query.shape[1], query.shape[-2])
        if self.plan.kind == "ablate" and idx in self.plan.key_masks:
            mask = restrict_keys(mask, self.plan.key_masks[idx], query.shape[1], query.shape[-2], key.shape[-2])
        if self._wants_scores(layer, query.shape[-2]):
            n_context = key.shape[-2] - query.shape[-2] if self.plan.kind == "reconstruct" else None
            x = ScoreInputs(query, key, value, layer_positions(layer), module.scaling, idx, self.inv_freq, n_context,
                            self.plan.replay_span if n_context is not None else None)
            if self.plan.kind == "reconstruct":
                self._accumulate_max(x)
                return mask
            self.n_pad = self._padding(mask, query.shape[0], query.shape[-2], key.shape[-2])
            for scorer in self.plan.scorers:
                new = score_sequences(scorer, x, self.n_pad)
                slot = self.scores.setdefault(scorer.name, [None] * self.n_layers)
                prev = slot[idx]
                if scorer.cumulative and self.plan.kind == "chunked" and prev is not None:
                    pad = new.shape[-1] - prev.shape[-1]
                    new = new + torch.nn.functional.pad(prev, (0, pad))
                slot[idx] = new
        return mask

    def _padding(self, mask, batch: int, n_query: int, n_keys: int) -> torch.Tensor | None:
        """Left padding per sequence of the forward being scored; None for one unpadded sequence."""
        n_pad = left_padding(mask, batch)
        if batch == 1 and not bool(n_pad.any()):
            return None
        if bool(n_pad.any()) and (n_query != n_keys or self.plan.kind == "chunked"):
            raise NotImplementedError("padded batches are pruned once after a prefill of the whole prompt "
                                      "(mode='post'); chunked prefills of padded batches are not supported")
        return n_pad

    def _accumulate_max(self, x: ScoreInputs) -> None:
        """Reconstruction pass: element-wise max of this pass's context scores and the ones gathered so far."""
        for scorer in self.plan.scorers:
            new = scorer.score(x).float()
            slot = self.scores.setdefault(scorer.name, [None] * self.n_layers)
            prev = slot[x.layer_idx]
            if prev is not None:
                new = torch.maximum(new, torch.nn.functional.pad(prev, (0, new.shape[-1] - prev.shape[-1])))
            slot[x.layer_idx] = new

    def _after_attention(self, module, args, kwargs, output):
        kind = self.plan.kind
        if kind not in ("post", "chunked"):
            return
        idx = module.layer_idx
        layer = self._layer(idx)
        name = self.plan.scorers[0].name
        slot = self.scores.get(name)
        if layer is None or slot is None or slot[idx] is None:
            return
        if kind == "post" and isinstance(layer, PrunedLayer):
            return  # already pruned in this forward
        if self.plan.defer:
            if idx == self.n_layers - 1 and all(s is not None for s in slot):
                n = layer.get_seq_length() if kind == "post" else self.plan.context_len
                self.prune_all(self._cache, name, n, keep_scores=kind == "chunked" and self.plan.scorers[0].cumulative)
            return
        n_context = layer.get_seq_length() if kind == "post" else self.plan.context_len
        per_sequence = self.sequence_budgets(n_context)
        self.peak_kv_bytes = max(self.peak_kv_bytes, kv_bytes(self._cache))
        scores = slot[idx]
        new_layer, keep = prune_layer(layer, scores, [b.tokens[idx] for b in per_sequence], self.plan.protection,
                                      n_pad=self.n_pad)
        self._cache.layers[idx] = new_layer
        if kind == "chunked" and self.plan.scorers[0].cumulative:
            slot[idx] = scores.gather(-1, keep)
        else:
            slot[idx] = None
        if idx == self.n_layers - 1:
            self.kept_kv_bytes = kv_bytes(self._cache)

    def prune_all(self, cache, scorer_name: str, context_len: int | None = None, keep_scores: bool = False) -> Budgets:
        """Prune every layer of ``cache`` with the scores gathered under ``scorer_name``; the budgets may
        depend on those scores (input-adaptive allocators) and may be split per KV head (``head_budgets``).
        Returns the first sequence's budgets (every sequence's: ``last_sequence_budgets``)."""
        slot = self.scores.get(scorer_name)
        if slot is None or any(s is None for s in slot):
            raise RuntimeError(f"no scores from {scorer_name!r} for every layer: nothing to prune with")
        n = context_len or cache.get_seq_length()
        # head-sharded model: a score-adaptive policy ranks every rank's heads, so all ranks agree
        gather = self.tp_group is not None and policy_needs_scores(self.plan.policy)
        per_sequence = self.sequence_budgets(n, scores=gather_head_scores(slot, self.tp_group) if gather else slot)
        budgets = per_sequence[0]
        self.peak_kv_bytes = max(self.peak_kv_bytes, kv_bytes(cache))
        counts = (layer_head_counts(cache.layers, slot, per_sequence, self.plan.protection, self.n_pad)
                  if self.plan.head_budgets else [None] * len(cache.layers))
        for idx, layer in enumerate(cache.layers):
            cache.layers[idx], keep = prune_layer(layer, slot[idx], [b.tokens[idx] for b in per_sequence],
                                                  self.plan.protection, head_budgets=self.plan.head_budgets,
                                                  n_pad=self.n_pad, head_counts=counts[idx])
            # chunked prefills score the kept tokens again with the next chunk: carry their scores along
            slot[idx] = slot[idx].gather(-1, keep) if keep_scores else None
        self.kept_kv_bytes = kv_bytes(cache)
        return budgets

    # ----------------------------------------------------------------- budgets
    def budgets_for(self, context_len: int, scores=None) -> Budgets:
        """The budget vector for a context of ``context_len`` tokens; a policy that adapts to the input
        (``needs_scores``) gets this input's per-layer ``scores`` and is asked again for every input."""
        adaptive = policy_needs_scores(self.plan.policy)
        if not adaptive and self.last_budgets is not None and self.last_budgets.context_len == context_len:
            return self.last_budgets
        self.plan.protection.check_context(context_len)
        if adaptive:
            if scores is None:
                raise BudgetError("this budget policy adapts to the input and needs its token scores")
            budgets = self.plan.policy(context_len, scores=scores)
        else:
            budgets = self.plan.policy(context_len)
        budgets.check_length(self.n_layers)
        low = [i for i, t in enumerate(budgets.tokens) if t < min(context_len, self.plan.protection.size)]
        if low:
            raise BudgetError(
                f"layer {low[0]} budget {budgets.tokens[low[0]]} is below the protected window "
                f"({self.plan.protection.size} tokens)"
            )
        self.last_budgets = budgets
        return budgets

    def sequence_budgets(self, context_len: int, scores=None) -> list[Budgets]:
        """One budget vector per sequence of the batch being pruned (``last_sequence_budgets``): each from the
        sequence's own length (``context_len`` less its left padding) and, for an input-adaptive policy, its
        own scores, so that a sequence keeps what it would keep alone."""
        if self.n_pad is None:
            out = [self.budgets_for(context_len, scores=scores)]
        else:
            pads = tuple(int(p) for p in self.n_pad)
            key = (context_len, pads)
            cached = self._sequence_budget_cache
            if scores is None and cached is not None and cached[0] == key:
                out = cached[1]
            else:
                out = [self.budgets_for(context_len - p, scores=None if scores is None else
                                        [s[b:b + 1, :, p:] for s in scores]) for b, p in enumerate(pads)]
                self._sequence_budget_cache = (key, out)
        self.last_sequence_budgets = out
        return out

    def set_plan(self, plan: Plan) -> None:
        if plan.policy is not self.plan.policy or plan.protection != self.plan.protection:
            self.last_budgets = None
        self.plan = plan
        self.scores = {}
        self.peak_kv_bytes = 0
        self.n_pad = None
        self._sequence_budget_cache = None


def kept_indices(layer, scores: torch.Tensor, budget: int, protection: Protection) -> torch.Tensor:
    """Physical indices [B, KVH, budget] a layer keeps: protected tokens first, then the top scores."""
    protected = protection.apply(scores, layer_positions(layer), layer.get_seq_length())
    return select_tokens(protected, budget)


def choose_tokens(scores: torch.Tensor, positions: torch.Tensor, logical_len: int, budget: int,
                  protection: Protection, head_budgets: bool = False,
                  counts: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(physical indices [B, KVH, P] to keep, in sequence order; [B, KVH, P] bool of the real ones or None).

    Protected tokens (by logical ``positions``) first, then the top scores: ``budget`` per KV head, or with
    ``head_budgets`` ``budget * KV heads`` in all, split across the heads by ranking every head's scores
    together (AdaKV-style; each head keeps at least the protected window), padding slots last. ``counts``:
    that split ([B, KVH] tokens per head) when already computed (``layer_head_counts``).
    """
    protected = protection.apply(scores, positions, logical_len)
    if not head_budgets:
        return select_tokens(protected, budget), None
    if counts is None:
        from depthkv.allocation.adaptive import head_split

        counts = head_split(protected, budget, min(logical_len, protection.size))
    width = int(counts.max())  # on the host: no wait for the device
    counts = torch.as_tensor(counts, device=scores.device)
    keep = protected.topk(width, dim=-1, sorted=True).indices  # best first, per head
    valid = torch.arange(width, device=scores.device)[None, None, :] < counts[..., None]
    # order each head's kept tokens by sequence position; padding slots (invalid) go last
    order_key = torch.where(valid, keep, keep.new_full((), torch.iinfo(keep.dtype).max))
    order = order_key.argsort(dim=-1)
    return keep.gather(-1, order), valid.gather(-1, order)


def prune_layer(layer, scores: torch.Tensor, budget: int | Sequence[int], protection: Protection, *,
                head_budgets: bool = False, n_pad: torch.Tensor | Sequence[int] | None = None,
                head_counts: np.ndarray | None = None):
    """(new PrunedLayer holding the layer's top-``budget`` tokens per KV head, kept physical indices).

    ``head_budgets``: the layer keeps ``budget * KV heads`` tokens in all, split across its heads by ranking
    every head's scores together (AdaKV-style; each head keeps at least the protected window). Heads then hold
    different numbers of tokens: the layer stores the longest and masks the padding (``PrunedLayer.valid``).

    Batches: ``budget`` may give one budget per sequence and ``n_pad`` the left padding of each sequence of a
    fresh (unpruned) layer. Each sequence is then pruned on its own tokens as if it were alone: its protected
    window is its first ``n_sink`` real tokens and its last ``n_recent``, padding is never kept, and sequences
    that keep different numbers of tokens are stored ragged through the same ``valid`` mask.

    ``head_counts``: the per-head split ([B, KVH]) when already computed for all layers (``layer_head_counts``).
    """
    budgets, pads = _per_sequence(budget, n_pad, scores.shape[0])
    if any(pads) or len(set(budgets)) > 1:
        return _prune_sequences(layer, scores, budgets, pads, protection, head_budgets, head_counts)
    keep, valid = choose_tokens(scores, layer_positions(layer), layer.get_seq_length(), budgets[0], protection,
                                head_budgets, head_counts)
    if valid is None:
        return gather_tokens(layer, keep), keep
    return gather_ragged(layer, keep, valid), keep


def _per_sequence(budget: int | Sequence[int], n_pad: torch.Tensor | Sequence[int] | None,
                  batch: int) -> tuple[list[int], list[int]]:
    """(budget, left padding) of every sequence of a batch, as ``prune_layer`` takes them."""
    budgets = [int(b) for b in budget] if isinstance(budget, Sequence) else [int(budget)] * batch
    pads = [0] * batch if n_pad is None else [int(p) for p in n_pad]
    if len(budgets) != batch or len(pads) != batch:
        raise ValueError(f"{len(budgets)} budgets and {len(pads)} padding counts for a batch of {batch} sequences")
    return budgets, pads


def _prune_sequences(layer, scores: torch.Tensor, budgets: list[int], pads: list[int], protection: Protection,
                     head_budgets: bool, head_counts: np.ndarray | None = None):
    """``prune_layer`` one sequence at a time (see there); filler slots point at a real token, marked invalid."""
    if any(pads) and isinstance(layer, PrunedLayer):
        raise NotImplementedError("a padded batch is pruned once, from its full prefill cache")
    positions, n = layer_positions(layer), layer.get_seq_length()
    keeps, valids = [], []
    for b, (budget, p) in enumerate(zip(budgets, pads)):
        keep, valid = choose_tokens(scores[b:b + 1, :, p:], positions[b:b + 1, :, p:] - p, n - p, budget,
                                    protection, head_budgets, None if head_counts is None else head_counts[b:b + 1])
        keeps.append(keep + p)
        valids.append(torch.ones_like(keep, dtype=torch.bool) if valid is None else valid)
    width = max(k.shape[-1] for k in keeps)
    keep = torch.cat([F.pad(k, (0, width - k.shape[-1]), value=p) for k, p in zip(keeps, pads)])
    valid = torch.cat([F.pad(v, (0, width - v.shape[-1]), value=False) for v in valids])
    return gather_ragged(layer, keep, valid), keep


def layer_head_counts(layers, scores: Sequence[torch.Tensor], per_sequence: Sequence[Budgets],
                      protection: Protection, n_pad: torch.Tensor | Sequence[int] | None = None) -> list[np.ndarray]:
    """Every layer's per-KV-head split ([B, KVH] tokens per head) exactly as ``prune_layer(...,
    head_budgets=True)`` makes it, from one ``head_split_layers`` call: one wait for the device for the
    whole model instead of one per layer. ``per_sequence``: the budget vectors as ``prune_layer`` takes them."""
    from depthkv.allocation.adaptive import head_split_layers

    if len(layers) != len(scores):
        raise ValueError(f"{len(scores)} layers' scores for a cache of {len(layers)} layers")
    entries, budgets, floors, owner = [], [], [], []
    for idx, (layer, s) in enumerate(zip(layers, scores)):
        layer_budgets, pads = _per_sequence([b.tokens[idx] for b in per_sequence], n_pad, s.shape[0])
        positions, n = layer_positions(layer), layer.get_seq_length()
        if any(pads) or len(set(layer_budgets)) > 1:  # each sequence on its own tokens (_prune_sequences)
            for b, (budget, p) in enumerate(zip(layer_budgets, pads)):
                entries.append(protection.apply(s[b:b + 1, :, p:], positions[b:b + 1, :, p:] - p, n - p))
                budgets.append(budget)
                floors.append(min(n - p, protection.size))
                owner.append(idx)
        else:
            entries.append(protection.apply(s, positions, n))
            budgets.append(layer_budgets[0])
            floors.append(min(n, protection.size))
            owner.append(idx)
    rows: list[list[np.ndarray]] = [[] for _ in scores]
    for idx, counts in zip(owner, head_split_layers(entries, budgets, floors)):
        rows[idx].append(counts)
    return [np.concatenate(r) for r in rows]


def score_sequences(scorer: Scorer, x: ScoreInputs, n_pad: torch.Tensor | None) -> torch.Tensor:
    """``scorer``'s token scores [B, KVH, K] (float32).

    With ``n_pad`` (a batch) every sequence is scored alone on its own tokens, at its own positions, exactly as
    a batch of one would be: scores never depend on the other sequences or on padding, which scores -inf.
    """
    if n_pad is None:
        return scorer.score(x).float()
    pads = tuple(int(p) for p in n_pad)
    views = x.memo.get(("sequences", pads))  # one view per sequence, shared by the scorers of this forward
    if views is None:
        n_keys, n_query = x.key.shape[-2], x.query.shape[-2]
        views = [dataclasses.replace(x, query=x.query[b:b + 1, :, max(0, p - (n_keys - n_query)):],
                                     key=x.key[b:b + 1, :, p:], value=x.value[b:b + 1, :, p:],
                                     positions=x.positions[b:b + 1, :, p:] - p) for b, p in enumerate(pads)]
        x.memo[("sequences", pads)] = views
    return torch.cat([F.pad(scorer.score(own).float(), (p, 0), value=float("-inf")) for own, p in zip(views, pads)])


def rope_inv_freq(model: nn.Module) -> torch.Tensor | None:
    """The RoPE inverse frequencies of ``model`` (its rotary embedding's ``inv_freq``), or None."""
    for m in model.modules():
        f = getattr(m, "inv_freq", None)
        if isinstance(f, torch.Tensor):
            return f
    return None
