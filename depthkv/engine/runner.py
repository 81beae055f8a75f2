"""Drivers over a ``Session``: chunked prefill, score-once/prune-many, and query-agnostic compression."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from depthkv.allocation.budgets import Budgets
from depthkv.engine.cache import clone_cache, kv_bytes
from depthkv.engine.session import Plan, Protection, Session, layer_head_counts, prune_layer
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
def forward_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: DynamicCache, logits_to_keep: int = 1,
                       **model_kwargs):
    """One forward that appends ``input_ids`` to ``cache``; returns the logits of the last ``logits_to_keep``
    (``model_kwargs``: e.g. ``attention_mask`` and ``position_ids`` of a padded batch)."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep, **{cache_kwarg(model): cache},
                **model_kwargs)
    return out.logits


def padded_inputs(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> dict:
    """Model kwargs of a left-padded batch's prefill: its mask and the RoPE positions generate would use
    (``cumsum(mask) - 1``: each sequence starts at position 0). Empty without padding."""
    if attention_mask is None:
        return {}
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.to(input_ids.device).long()
    if bool(mask.all()):
        return {}
    if bool(((mask[:, 1:] - mask[:, :-1]) < 0).any()):
        raise NotImplementedError("only left-padded batches are supported (tokenizer padding_side='left')")
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {"attention_mask": mask, "position_ids": positions}


@torch.no_grad()
def chunked_prefill(
    model: nn.Module,
    session: Session,
    input_ids: torch.Tensor,
    chunk_size: int,
    context_len: int | None = None,
) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill ``input_ids`` C tokens at a time, pruning every layer to its budget after each chunk.

    The budgets refer to the whole context (``context_len``, default the input length), so the cache never
    holds more than B_l + C tokens in layer l: peak KV memory stays near the budget (paper: C = 1024). Every
    chunk, a last chunk of a single token included, ends with each layer at its budget.
    ``session.kept_kv_bytes`` is measured on the returned cache.
    """
    check_input_ids(input_ids)
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    previous = session.plan.context_len
    session.plan.context_len = context_len or input_ids.shape[1]
    cache = new_cache(model)
    logits = None
    try:
        for start in range(0, input_ids.shape[1], chunk_size):
            logits = forward_with_cache(model, input_ids[:, start : start + chunk_size], cache)
    finally:  # later forwards (questions, decoding) are not chunks of this prefill
        session.plan.context_len = previous
    session.kept_kv_bytes = kv_bytes(cache)
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
    context_pass: object | None = None  # ContextPassStats of the replay scorers (KVzip), if any ran
    n_pad: tuple[int, ...] | None = None  # left padding of each sequence of a padded batch; None: no padding
    # raw scores of the replays run on this cache (``replay_key`` -> per-layer scores), shared by every
    # ``rescored`` copy: a scorer whose replay was already run here is only finished, not replayed again
    replays: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Each sequence's own length (its tokens without padding)."""
        batch = self.logits.shape[0]
        return tuple(self.context_len - p for p in (self.n_pad or (0,) * batch))

    def budgets(self, scorer: str | Scorer, policy) -> Budgets:
        """The budget vector a policy gives this prefill (an input-adaptive one reads this scorer's scores);
        a padded batch has one per sequence: :meth:`sequence_budgets`."""
        if self.n_pad is not None:
            raise ValueError("a padded batch has one budget vector per sequence: use sequence_budgets()")
        name = self._name(scorer)
        if getattr(policy, "needs_scores", False):
            return policy(self.context_len, scores=self.scores[name])
        return policy(self.context_len)

    def sequence_budgets(self, scorer: str | Scorer, policy) -> list[Budgets]:
        """One budget vector per sequence: the policy at the sequence's own length (and, for an input-adaptive
        policy, its own scores): what the sequence would get alone."""
        name = self._name(scorer)
        out = []
        for b, p in enumerate(self.n_pad or (0,) * self.logits.shape[0]):
            n = self.context_len - p
            if getattr(policy, "needs_scores", False):
                out.append(policy(n, scores=[s[b:b + 1, :, p:] for s in self.scores[name]]))
            else:
                out.append(policy(n))
        return out

    def prune(self, scorer: str | Scorer, budgets: Budgets | Sequence[Budgets], *,
              head_budgets: bool = False) -> DynamicCache:
        """A new cache holding ``budgets`` tokens per layer, chosen by ``scorer``'s scores (``head_budgets``:
        each layer's budget split across its KV heads by their scores).

        A batch takes one ``Budgets`` per sequence, or one that is rescaled to each sequence's own length
        (``Budgets.for_context``); sequences keeping different numbers of tokens are stored ragged
        (``PrunedLayer.valid``), padding is never kept.
        """
        name = self._name(scorer)
        lengths = self.lengths
        if isinstance(budgets, Budgets):
            per_sequence = [budgets.for_context(n) for n in lengths]
        elif len(budgets) != len(lengths):
            raise ValueError(f"{len(budgets)} budget vectors for a batch of {len(lengths)} sequences")
        else:
            per_sequence = [b.for_context(n) for b, n in zip(budgets, lengths, strict=True)]
        for b, n in zip(per_sequence, lengths):
            b.check_length(len(self.cache.layers))
            self.protection.check_context(n)
        out = DynamicCache()
        counts = (layer_head_counts(self.cache.layers, self.scores[name], per_sequence, self.protection, self.n_pad)
                  if head_budgets else [None] * len(self.cache.layers))
        out.layers = [
            prune_layer(layer, s, [b.tokens[i] for b in per_sequence], self.protection, head_budgets=head_budgets,
                        n_pad=self.n_pad, head_counts=counts[i])[0]
            for i, (layer, s) in enumerate(zip(self.cache.layers, self.scores[name]))
        ]
        return out

    def _name(self, scorer: str | Scorer) -> str:
        name = scorer if isinstance(scorer, str) else scorer.name
        if name not in self.scores:
            raise KeyError(f"scorer {name!r} was not computed in this prefill; have {sorted(self.scores)}")
        return name

    def full_cache(self) -> DynamicCache:
        """A copy of the unpruned cache (for the reference side of a comparison)."""
        return clone_cache(self.cache)

    @torch.no_grad()
    def rescored(self, model: nn.Module, input_ids: torch.Tensor, scorer: Scorer) -> ScoredPrefill:
        """This prefill with the scores of another context-pass scorer (e.g. a KVzip variant, whose scores
        share the name of the first): its replay runs on this prefill's cache, left as it was, and no second
        prefill is needed. ``input_ids`` are the prefilled ids."""
        from depthkv.engine.reconstruct import reconstruct_scores

        if not scorer.context_pass:
            raise ValueError(f"scorer {scorer.name!r} reads the prefill itself: give it to score_prefill")
        if self.n_pad is not None or tuple(input_ids.shape) != (1, self.context_len):
            raise ValueError(f"rescored() replays the one unpadded sequence of {self.context_len} tokens this "
                             f"prefill holds, got input ids of shape {tuple(input_ids.shape)}")
        with Session(model) as session:
            session.set_plan(Plan(kind="off", protection=self.protection))
            stats = reconstruct_scores(model, session, self.cache, input_ids, [scorer], self.protection,
                                       replays=self.replays)
            scores = {scorer.name: list(session.scores[scorer.name])}
        return dataclasses.replace(self, scores=scores, context_pass=stats)


@torch.no_grad()
def score_prefill(
    model: nn.Module, input_ids: torch.Tensor, scorers: list[Scorer], protection: Protection | None = None,
    attention_mask: torch.Tensor | None = None,
) -> ScoredPrefill:
    """Prefill once with the full cache and collect every scorer's token scores for every layer.

    Context-pass scorers (KVzip) replay the context after the prefill (``depthkv.engine.reconstruct``); what
    that costs is in ``ScoredPrefill.context_pass``. A left-padded batch (``attention_mask`` with zeros on the
    left) is prefilled at the positions ``generate`` uses and each sequence is scored on its own tokens.
    """
    from depthkv.engine.reconstruct import reconstruct_scores

    check_input_ids(input_ids)
    protection = protection or Protection()
    if not scorers:
        raise ValueError("score_prefill needs at least one scorer")
    padded = padded_inputs(attention_mask, input_ids)
    n_pad = None
    if padded:
        n_pad = tuple(int(p) for p in (padded["attention_mask"] == 0).sum(-1))
        if any(s.context_pass for s in scorers):
            raise NotImplementedError("context-pass scorers (kvzip) score one unpadded sequence at a time")
    for n in {input_ids.shape[1] - p for p in n_pad or (0,)}:
        protection.check_context(n)
    in_prefill = [s for s in scorers if not s.context_pass]
    replayed = [s for s in scorers if s.context_pass]
    stats = None
    replays: dict = {}
    with Session(model) as session:
        session.set_plan(Plan(kind="score" if in_prefill else "off", scorers=in_prefill, protection=protection))
        cache = new_cache(model)
        logits = forward_with_cache(model, input_ids, cache, **padded)
        if replayed:
            stats = reconstruct_scores(model, session, cache, input_ids, replayed, protection, replays=replays)
        scores = {name: list(slot) for name, slot in session.scores.items()}
    return ScoredPrefill(cache, scores, logits, input_ids.shape[1], protection, stats, n_pad, replays)


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
