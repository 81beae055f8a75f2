"""Measured per-layer sensitivity: prune ONE layer at a time and teacher-force the answer.

Design brief, "Calibration": per sample, one prefill (with every scorer's token scores, via
``score_prefill``); for each layer l and probe ratio r, layer l alone is pruned to r by top-k + gather on
those scores and the answer tokens are teacher-forced through the model. Degradation is the increase of the
answer's mean NLL and the mean KL(full || pruned) of the next-token distributions, compared with the full
cache. No generation, no second prefill: cost is one prefill plus L x R short forwards per sample.

The prefill stops one token before the end of the prompt, so that the *first* answer token is already
predicted through the pruned cache (the prefill's own logits are computed before any pruning).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from depthkv.engine.runner import ScoredPrefill, forward_with_cache, score_prefill
from depthkv.engine.session import Protection, Session, prune_layer
from depthkv.scorers import Scorer

WINDOW_ONLY = 1.0  # probe ratio meaning "only the protected sinks + recent window left"


@dataclass
class CalibrationItem:
    """One calibration example as token ids: the prompt (context + question) and the answer to force."""

    prompt_ids: torch.Tensor  # [1, P]
    answer_ids: torch.Tensor  # [1, T]
    sample_id: str = ""


@dataclass
class AblationResult:
    """Per-sample degradation of every single-layer ablation: arrays [S, L, R]."""

    probe_ratios: tuple[float, ...]
    nll_delta: np.ndarray
    kl: np.ndarray
    full_nll: np.ndarray  # [S]
    context_lens: list[int]
    seconds: float


def _shared_layer(layer) -> DynamicLayer:
    """A fresh layer object over the same (unmodified) tensors: appends create new tensors, never write back."""
    new = DynamicLayer()
    new.lazy_initialization(layer.keys, layer.values)
    new.keys, new.values = layer.keys, layer.values
    return new


def single_layer_cache(sp: ScoredPrefill, scorer: str, layer_idx: int, budget: int) -> DynamicCache:
    """Full cache everywhere except ``layer_idx``, which keeps ``budget`` tokens (by ``scorer``)."""
    cache = DynamicCache()
    cache.layers = [_shared_layer(layer) for layer in sp.cache.layers]
    cache.layers[layer_idx] = prune_layer(sp.cache.layers[layer_idx], sp.scores[scorer][layer_idx], budget,
                                          sp.protection)[0]
    return cache


def probe_budget(ratio: float, context_len: int, protection: Protection) -> int:
    """Tokens kept at a probe ratio, never below the protected window; 1.0 = the window alone."""
    floor = max(1, protection.size)
    if ratio >= WINDOW_ONLY:
        return min(context_len, floor)
    return min(context_len, max(floor, int(round(context_len * (1.0 - ratio)))))


def _answer_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL of targets, log-probs) for logits [1, T, V] predicting targets [1, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()
    return nll, logp


@torch.no_grad()
def measure_sensitivity(
    model: torch.nn.Module,
    items: Sequence[CalibrationItem],
    scorer: Scorer,
    probe_ratios: Sequence[float],
    protection: Protection,
    progress: Callable[[int, int], None] | None = None,
) -> AblationResult:
    """Single-layer ablation degradations for every item, layer and probe ratio."""
    ratios = tuple(float(r) for r in probe_ratios)
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"probe ratios must lie in (0, 1] (1 = protected window only), got {ratios}")
    n_layers = len(getattr(model.model, "layers", []))
    s_count = len(items)
    nll_delta = np.zeros((s_count, n_layers, len(ratios)))
    kl = np.zeros_like(nll_delta)
    full_nll = np.zeros(s_count)
    lens = []
    t0 = time.perf_counter()
    total, done = s_count * n_layers * len(ratios), 0
    for s, item in enumerate(items):
        prefix, forced = item.prompt_ids[:, :-1], torch.cat([item.prompt_ids[:, -1:], item.answer_ids[:, :-1]], 1)
        targets = item.answer_ids
        sp = score_prefill(model, prefix, [scorer], protection)
        n = prefix.shape[1]
        lens.append(n)
        ref_cache = DynamicCache()
        ref_cache.layers = [_shared_layer(layer) for layer in sp.cache.layers]
        ref_logits = forward_with_cache(model, forced, ref_cache, logits_to_keep=forced.shape[1])
        ref_nll, ref_logp = _answer_stats(ref_logits, targets)
        full_nll[s] = ref_nll.item()
        with Session(model):  # mask alignment for the pruned layer
            for layer_idx in range(n_layers):
                for r_idx, ratio in enumerate(ratios):
                    cache = single_layer_cache(sp, scorer.name, layer_idx, probe_budget(ratio, n, protection))
                    logits = forward_with_cache(model, forced, cache, logits_to_keep=forced.shape[1])
                    nll, logp = _answer_stats(logits, targets)
                    nll_delta[s, layer_idx, r_idx] = (nll - ref_nll).item()
                    kl[s, layer_idx, r_idx] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
                    done += 1
                    if progress is not None:
                        progress(done, total)
        del sp
    return AblationResult(ratios, nll_delta, kl, full_nll, lens, time.perf_counter() - t0)
