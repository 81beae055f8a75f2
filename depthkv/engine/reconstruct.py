"""The context pass of KVzip-style scorers: replay the context after the prefill and read the attention.

``reconstruct_scores`` appends, chunk by chunk, ``repeat prompt + context chunk`` to a prefilled cache, lets
the session's ``reconstruct`` plan record (max-accumulated) the attention those replayed tokens pay to the
original context keys, and drops the replayed tokens from the cache again after each chunk, so the cache
ends exactly as it started. Cost: about one more prefill of the context (measured by ``ContextPassStats``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from depthkv.engine.cache import PrunedLayer
from depthkv.engine.session import Plan, Protection, Session
from depthkv.scorers import Scorer


class ContextPassError(ValueError):
    """A context-pass scorer that cannot run: no repeat prompt (tokenizer), or a cache it cannot replay on."""


@dataclass
class ContextPassStats:
    """What the context pass cost: forwards, replayed tokens and wall time."""

    forwards: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: ContextPassStats) -> ContextPassStats:
        return ContextPassStats(self.forwards + other.forwards, self.tokens + other.tokens,
                                self.seconds + other.seconds)


def drop_tail(cache, n: int) -> None:
    """Remove the last ``n`` tokens of every layer (the replayed ones), in place."""
    if n <= 0:
        return
    for layer in cache.layers:
        layer.keys = layer.keys[..., :-n, :]
        layer.values = layer.values[..., :-n, :]
        if isinstance(layer, PrunedLayer):
            layer.logical_len -= n
        elif hasattr(layer, "cumulative_length"):
            layer.cumulative_length -= n


def replay_inputs(scorer: Scorer, context_ids: torch.Tensor) -> list[torch.Tensor]:
    """The token ids fed per chunk: repeat prompt (+ the previous chunk's last tokens) + the chunk."""
    return [ids for ids, _ in replay_chunks(scorer, context_ids)]


def replay_chunks(scorer: Scorer, context_ids: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """``replay_inputs`` with the span [start, end) of ``context_ids`` each replays."""
    if not getattr(scorer, "ready", True):
        raise ContextPassError(
            f"scorer {scorer.name!r} needs its repeat prompt encoded by the model's tokenizer: pass tokenizer= "
            "to depthkv.press (or give the scorer prompt_ids)"
        )
    ids = context_ids[0].tolist()
    size, overlap = scorer.replay_chunk, scorer.overlap
    out = []
    for start in range(0, len(ids), size):
        prompt = list(scorer.prompt_ids) if start == 0 else list(scorer.next_prompt_ids) + ids[max(0, start - overlap):start]
        chunk = ids[start:start + size]
        out.append((torch.tensor([prompt + chunk], dtype=torch.long, device=context_ids.device),
                    (start, start + len(chunk))))
    return out


@torch.no_grad()
def reconstruct_scores(
    model: nn.Module, session: Session, cache, context_ids: torch.Tensor, scorers: list[Scorer],
    protection: Protection | None = None, replays: dict | None = None,
) -> ContextPassStats:
    """Run every context-pass scorer's replay over ``cache`` (which holds ``context_ids``, possibly pruned);
    their scores land in ``session.scores`` next to any gathered before (the previous plan's are kept).

    Scorers whose raw scores are the same (equal ``replay_key``, e.g. ``kvzip`` and ``kvzip_v``) share one replay:
    ``replays`` (``replay_key`` -> raw per-layer scores) remembers each replay of this cache, so a later call given
    the same dict (``ScoredPrefill.rescored``) reuses it too. Only a scorer with no scores gathered before takes or
    leaves a shared replay (one that max-accumulates onto earlier scores has raw scores of its own)."""
    from depthkv.engine.runner import forward_with_cache

    if context_ids.shape[0] != 1:
        raise ContextPassError("context-pass scorers score one sequence at a time (batch 1)")
    stats = ContextPassStats()
    t0 = time.perf_counter()
    kept, prev_plan = session.scores, session.plan
    replays = {} if replays is None else replays
    offset = cache.layers[0].get_seq_length() - context_ids.shape[1]  # context tokens cached before these
    for scorer in scorers:
        key = scorer.replay_key() if scorer.name not in session.scores else None
        if key is not None and key in replays:
            session.scores[scorer.name] = [None if s is None else s.clone() for s in replays[key]]
        else:
            for chunk, (start, end) in replay_chunks(scorer, context_ids):
                session.plan = Plan(kind="reconstruct", scorers=[scorer],
                                    protection=protection or prev_plan.protection,
                                    replay_span=(offset + start, offset + end))
                forward_with_cache(model, chunk, cache)
                drop_tail(cache, chunk.shape[1])
                stats.forwards += 1
                stats.tokens += chunk.shape[1]
            if key is not None and scorer.name in session.scores:
                replays[key] = [None if s is None else s.clone() for s in session.scores[scorer.name]]
        slot = session.scores.get(scorer.name, [])
        for layer, scores in enumerate(slot):
            if scores is not None:
                slot[layer] = scorer.finish(scores, cache.layers[layer].keys, cache.layers[layer].values,
                                            layer_idx=layer, inv_freq=session.inv_freq,
                                            position=offset + context_ids.shape[1], group=session.tp_group)
        if slot:
            session.scores[scorer.name] = scorer.finish_layers(slot, session.tp_group)
    session.plan = prev_plan
    session.scores = kept
    if context_ids.is_cuda:
        torch.cuda.synchronize(context_ids.device)
    stats.seconds = time.perf_counter() - t0
    return stats
