"""The engine's runtime: hooks that score tokens during prefill and physically prune each layer's cache.

A ``Session`` attaches to a HF causal LM for the duration of a ``with`` block:

* it switches the model to ``depthkv_<sdpa|eager>`` attention (mask alignment for per-layer lengths);
* a forward pre-hook on every attention module hands the module the cache of the current forward;
* during a forward that the session's ``plan`` marks for scoring, the attention call computes the scorers'
  token scores from the post-RoPE queries/keys (``before_attention``);
* after the module's forward a hook prunes the layer's cache to its budget (``_after_attention``).

Plans: ``post`` (prune once, right after the prefill, as kvpress does), ``chunked`` (prune after every chunk
of a driven prefill), ``score`` (collect every requested scorer's scores, prune nothing: the
score-once/prune-many path), ``off`` (only align masks, e.g. while decoding from a pruned cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.engine.attention import align_mask, register, restrict_keys, wrapped_name
from depthkv.engine.cache import PrunedLayer, gather_tokens, kv_bytes, layer_positions
from depthkv.scorers import ScoreInputs, Scorer

BudgetPolicy = Callable[[int], Budgets]


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
    # ablate: layer -> [B, KVH, N] bool, the context keys each batch row may see in that layer (masking, no
    # eviction: lets one batched forward hold probes that prune different layers by different amounts)
    key_masks: dict[int, torch.Tensor] = field(default_factory=dict)


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
        self.kept_kv_bytes: int | None = None  # measured on the real tensors after the last pruning pass
        self.peak_kv_bytes = 0  # largest KV footprint seen just before a pruning step (since the last set_plan)
        self._cache = None
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
        if kind == "chunked":
            return n_query > 1
        return kind == "score"

    def before_attention(self, module, query, key, value, mask):
        idx = module.layer_idx
        layer = self._layer(idx)
        mask = align_mask(mask, layer, key.shape[-2], query.shape[1])
        if self.plan.kind == "ablate" and idx in self.plan.key_masks:
            mask = restrict_keys(mask, self.plan.key_masks[idx], query.shape[1], query.shape[-2], key.shape[-2])
        if self._wants_scores(layer, query.shape[-2]):
            x = ScoreInputs(query, key, value, layer_positions(layer), module.scaling, idx)
            for scorer in self.plan.scorers:
                new = scorer.score(x).float()
                slot = self.scores.setdefault(scorer.name, [None] * self.n_layers)
                prev = slot[idx]
                if scorer.cumulative and self.plan.kind == "chunked" and prev is not None:
                    pad = new.shape[-1] - prev.shape[-1]
                    new = new + torch.nn.functional.pad(prev, (0, pad))
                slot[idx] = new
        return mask

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
        n_context = layer.get_seq_length() if kind == "post" else self.plan.context_len
        budgets = self.budgets_for(n_context)
        self.peak_kv_bytes = max(self.peak_kv_bytes, kv_bytes(self._cache))
        scores = slot[idx]
        new_layer, keep = prune_layer(layer, scores, budgets.tokens[idx], self.plan.protection)
        self._cache.layers[idx] = new_layer
        if kind == "chunked" and self.plan.scorers[0].cumulative:
            slot[idx] = scores.gather(-1, keep)
        else:
            slot[idx] = None
        if idx == self.n_layers - 1:
            self.kept_kv_bytes = kv_bytes(self._cache)

    # ----------------------------------------------------------------- budgets
    def budgets_for(self, context_len: int) -> Budgets:
        if self.last_budgets is not None and self.last_budgets.context_len == context_len:
            return self.last_budgets
        self.plan.protection.check_context(context_len)
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

    def set_plan(self, plan: Plan) -> None:
        if plan.policy is not self.plan.policy or plan.protection != self.plan.protection:
            self.last_budgets = None
        self.plan = plan
        self.scores = {}
        self.peak_kv_bytes = 0


def kept_indices(layer, scores: torch.Tensor, budget: int, protection: Protection) -> torch.Tensor:
    """Physical indices [B, KVH, budget] a layer keeps: protected tokens first, then the top scores."""
    protected = protection.apply(scores, layer_positions(layer), layer.get_seq_length())
    return select_tokens(protected, budget)


def prune_layer(layer, scores: torch.Tensor, budget: int, protection: Protection):
    """(new PrunedLayer holding the layer's top-``budget`` tokens per KV head, kept physical indices)."""
    keep = kept_indices(layer, scores, budget, protection)
    return gather_tokens(layer, keep), keep
