"""Drivers over a ``Session``: chunked prefill, score-once/prune-many, and query-agnostic compression."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from depthkv.allocation.budgets import Budgets
from depthkv.engine.cache import clone_cache
from depthkv.engine.session import Plan, Protection, Session, prune_layer
from depthkv.scorers import Scorer


def cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x calls the cache argument ``cache``; earlier 5.x releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model: nn.Module) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise NotImplementedError("sliding-window attention layers are not supported by depthkv's engine yet")
    return cache


def check_input_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    return input_ids


@torch.no_grad()
def forward_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: DynamicCache, logits_to_keep: int = 1):
    """One forward that appends ``input_ids`` to ``cache``; returns the logits of the last ``logits_to_keep``."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep, **{cache_kwarg(model): cache})
    return out.logits


@torch.no_grad()
def chunked_prefill(
    model: nn.Module, session: Session, input_ids: torch.Tensor, chunk_size: int, context_len: int | None = None
) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill ``input_ids`` C tokens at a time, pruning every layer to its budget after each chunk.

    The budgets refer to the whole context (``context_len``, default the input length), so the cache never
    holds more than B_l + C tokens in layer l: peak KV memory stays near the budget (paper: C = 1024).
    """
    check_input_ids(input_ids)
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    session.plan.context_len = context_len or input_ids.shape[1]
    cache = new_cache(model)
    logits = None
    for start in range(0, input_ids.shape[1], chunk_size):
        logits = forward_with_cache(model, input_ids[:, start : start + chunk_size], cache)
    return cache, logits


@dataclass
class ScoredPrefill:
    """One full-cache prefill plus every requested scorer's per-layer token scores.

    ``prune(scorer, budgets)`` returns a new, physically pruned cache by top-k + gather: no new prefill.
    The full cache is left untouched, so any number of budget vectors can be applied to one prefill.
    """

    cache: DynamicCache
    scores: dict[str, list[torch.Tensor]]
    logits: torch.Tensor  # logits of the last prefill token
    context_len: int
    protection: Protection

    def prune(self, scorer: str | Scorer, budgets: Budgets) -> DynamicCache:
        name = scorer if isinstance(scorer, str) else scorer.name
        if name not in self.scores:
            raise KeyError(f"scorer {name!r} was not computed in this prefill; have {sorted(self.scores)}")
        budgets = budgets.for_context(self.context_len)
        budgets.check_length(len(self.cache.layers))
        self.protection.check_context(self.context_len)
        out = DynamicCache()
        out.layers = [
            prune_layer(layer, s, b, self.protection)[0]
            for layer, s, b in zip(self.cache.layers, self.scores[name], budgets.tokens)
        ]
        return out

    def full_cache(self) -> DynamicCache:
        """A copy of the unpruned cache (for the reference side of a comparison)."""
        return clone_cache(self.cache)


@torch.no_grad()
def score_prefill(
    model: nn.Module, input_ids: torch.Tensor, scorers: list[Scorer], protection: Protection | None = None
) -> ScoredPrefill:
    """Prefill once with the full cache and collect every scorer's token scores for every layer."""
    check_input_ids(input_ids)
    protection = protection or Protection()
    if not scorers:
        raise ValueError("score_prefill needs at least one scorer")
    protection.check_context(input_ids.shape[1])
    with Session(model) as session:
        session.set_plan(Plan(kind="score", scorers=list(scorers), protection=protection))
        cache = new_cache(model)
        logits = forward_with_cache(model, input_ids, cache)
        scores = {name: list(slot) for name, slot in session.scores.items()}
    return ScoredPrefill(cache, scores, logits, input_ids.shape[1], protection)


@torch.no_grad()
def generate_from_cache(model: nn.Module, cache: DynamicCache, input_ids: torch.Tensor, **generate_kwargs):
    """``model.generate`` continuing from a (pruned) cache that already holds the first tokens of ``input_ids``.

    ``input_ids`` is the whole sequence (cached prefix + tokens still to feed); HF feeds only the tokens
    past the cache's logical length. The cache is consumed (decoding appends to it): pass a copy
    (``clone_cache``) to reuse one pruned context. Runs with mask alignment on and pruning off.
    """
    check_input_ids(input_ids)
    if cache.get_seq_length() >= input_ids.shape[1]:
        raise ValueError("the cache already covers the whole input: leave at least one token to feed")
    with Session(model) as session:
        session.set_plan(Plan(kind="off"))
        kwargs = {cache_kwarg(model): cache, "attention_mask": torch.ones_like(input_ids), **generate_kwargs}
        return model.generate(input_ids=input_ids, **kwargs)
