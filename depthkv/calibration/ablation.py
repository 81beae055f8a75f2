"""Measured per-layer sensitivity: prune ONE layer at a time and teacher-force the answer.

Per sample, one prefill (with every scorer's token scores, via
``score_prefill``); for each layer l and probe ratio r, layer l alone is pruned to r by top-k + gather on
those scores and the answer tokens are teacher-forced through the model. Degradation is the increase of the
answer's mean NLL and the mean KL(full || pruned) of the next-token distributions, compared with the full
cache. No generation, no second prefill: cost is one prefill plus L x R short forwards per sample, run ``batch`` probes at a time
and starting at the ablated layer (see ``measure_sensitivity``).

Query-aware items (the question inside the prefill) prefill the prompt minus its last token, so that the
*first* answer token is already predicted through the pruned cache (the prefill's own logits are computed
before any pruning). Query-agnostic items (``question_ids`` given) prefill and prune the context part
alone, then teacher-force question + answer through the pruned cache, as a context compressed before its
question is known is used; KL and NLL are still measured on the answer tokens only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from depthkv.engine.runner import ScoredPrefill, cache_kwarg, forward_with_cache, score_prefill
from depthkv.engine.session import Plan, Protection, Session, kept_indices
from depthkv.models.layers import decoder_body, decoder_layers
from depthkv.scorers import Scorer

WINDOW_ONLY = 1.0  # probe ratio meaning "only the protected sinks + recent window left"


@dataclass
class CalibrationItem:
    """One calibration example as token ids: the prompt, the answer to force and, for the query-agnostic
    setting, the question part that follows the pruned context (``prompt_ids`` is then the context part)."""

    prompt_ids: torch.Tensor  # [1, P]: context + question (aware) or the context part alone (agnostic)
    answer_ids: torch.Tensor  # [1, T]
    sample_id: str = ""
    question_ids: torch.Tensor | None = None  # [1, Q]: agnostic only

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix that is prefilled and pruned [1, N], tokens forced through the pruned cache [1, F]); the
        last T forced positions predict the answer."""
        if self.question_ids is None:
            return self.prompt_ids[:, :-1], torch.cat([self.prompt_ids[:, -1:], self.answer_ids[:, :-1]], 1)
        return self.prompt_ids, torch.cat([self.question_ids, self.answer_ids[:, :-1]], 1)

    @property
    def context_len(self) -> int:
        """Tokens in the pruned prefix (what the probe ratios refer to)."""
        return int(self.prompt_ids.shape[1]) - (1 if self.question_ids is None else 0)


@dataclass
class AblationResult:
    """Per-sample degradation of every single-layer ablation: arrays [S, L, R]."""

    probe_ratios: tuple[float, ...]
    nll_delta: np.ndarray
    kl: np.ndarray
    full_nll: np.ndarray  # [S]
    context_lens: list[int]
    seconds: float


def _shared_layer(layer, batch: int = 1) -> DynamicLayer:
    """A fresh layer over the same tensors (broadcast to ``batch`` rows): appends make new tensors."""
    new = DynamicLayer()
    keys, values = layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)
    new.lazy_initialization(keys, values)
    new.keys, new.values = keys, values
    return new


def shared_cache(cache: DynamicCache, batch: int = 1) -> DynamicCache:
    """A cache that reads ``cache``'s tensors without ever writing to them."""
    out = DynamicCache()
    out.layers = [_shared_layer(layer, batch) for layer in cache.layers]
    return out


def probe_keep_mask(sp: ScoredPrefill, scorer: str, layer_idx: int, budget: int) -> torch.Tensor:
    """[KVH, N] bool: the context tokens layer ``layer_idx`` keeps at ``budget`` (same choice as eviction)."""
    layer = sp.cache.layers[layer_idx]
    keep = kept_indices(layer, sp.scores[scorer][layer_idx], budget, sp.protection)[0]  # [KVH, budget]
    mask = torch.zeros(keep.shape[0], layer.keys.shape[-2], dtype=torch.bool, device=keep.device)
    return mask.scatter_(-1, keep, True)


@contextmanager
def layers_from(model: nn.Module, start: int):
    """Run only decoder layers ``start..L-1``; the caller feeds the hidden state that enters layer ``start``.

    A probe that prunes layer l leaves the forced tokens' states below l untouched, so they are taken from
    the reference pass instead of being recomputed (halves the cost on average). Models that mix attention
    types per layer (sliding windows) index masks by position in the loop, so they always run all layers.
    """
    inner = decoder_body(model)
    layers = inner.layers
    types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if start == 0 or len(types) > 1:
        yield 0
        return
    inner.layers = nn.ModuleList(list(layers)[start:])
    try:
        yield start
    finally:
        inner.layers = layers


def _layer_inputs(model: nn.Module, forced: torch.Tensor, cache: DynamicCache, n_logits: int | None = None):
    """Reference forward of the forced tokens: (logits of the last ``n_logits`` (default all), hidden state
    entering every decoder layer)."""
    inputs: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        logits = forward_with_cache(model, forced, cache, logits_to_keep=n_logits or forced.shape[1])
    finally:
        for h in handles:
            h.remove()
    return logits, inputs


def probe_budget(ratio: float, context_len: int, protection: Protection) -> int:
    """Tokens kept at a probe ratio, never below the protected window; 1.0 = the window alone."""
    floor = max(1, protection.size)
    if ratio >= WINDOW_ONLY:
        return min(context_len, floor)
    return min(context_len, max(floor, int(round(context_len * (1.0 - ratio)))))


def _answer_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL of targets per row [B], log-probs) for logits [B, T, V] predicting targets [1, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(-1)
    return nll, logp


@torch.no_grad()
def measure_sensitivity(
    model: torch.nn.Module,
    items: Sequence[CalibrationItem],
    scorer: Scorer,
    probe_ratios: Sequence[float],
    protection: Protection,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 8,
) -> AblationResult:
    """Single-layer ablation degradations for every item, layer and probe ratio.

    ``batch`` probes run in one forward: each row of the batch hides, in its one ablated layer, the tokens
    that eviction would drop (a mask over the shared full cache; the logits equal those of the physically
    pruned cache, tested in tests/test_calibration.py). On a CPU the weights are then read once per
    ``batch`` probes instead of once per probe.
    """
    ratios = tuple(float(r) for r in probe_ratios)
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"probe ratios must lie in (0, 1] (1 = protected window only), got {ratios}")
    if batch < 1:
        raise ValueError(f"probe batch must be >= 1, got {batch}")
    n_layers = len(decoder_layers(model))
    s_count = len(items)
    nll_delta = np.zeros((s_count, n_layers, len(ratios)))
    kl = np.zeros_like(nll_delta)
    full_nll = np.zeros(s_count)
    lens = []
    t0 = time.perf_counter()
    probes = [(layer_idx, r_idx) for layer_idx in range(n_layers) for r_idx in range(len(ratios))]
    total, done = s_count * len(probes), 0
    device = next(model.parameters()).device
    for s, item in enumerate(items):
        prefix, forced = (t.to(device) for t in item.split())  # no-op when the items are already there
        targets = item.answer_ids.to(device)
        sp = score_prefill(model, prefix, [scorer], protection)
        n = prefix.shape[1]
        lens.append(n)
        ref_logits, hidden_in = _layer_inputs(model, forced, shared_cache(sp.cache), targets.shape[1])
        ref_nll, ref_logp = _answer_stats(ref_logits, targets)
        full_nll[s] = ref_nll.item()
        budgets = [probe_budget(r, n, protection) for r in ratios]
        with Session(model) as session:
            for lo in range(0, len(probes), batch):
                chunk = probes[lo : lo + batch]
                rows = len(chunk)
                masks: dict[int, torch.Tensor] = {}
                for row, (layer_idx, r_idx) in enumerate(chunk):
                    if layer_idx not in masks:
                        kvh = sp.cache.layers[layer_idx].keys.shape[1]
                        masks[layer_idx] = torch.ones(rows, kvh, n, dtype=torch.bool, device=prefix.device)
                    masks[layer_idx][row] = probe_keep_mask(sp, scorer.name, layer_idx, budgets[r_idx])
                session.set_plan(Plan(kind="ablate", key_masks=masks))
                with layers_from(model, chunk[0][0]) as start:
                    embeds = hidden_in[start].expand(rows, -1, -1)
                    out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=targets.shape[1],
                                **{cache_kwarg(model): shared_cache(sp.cache, rows)})
                nll, logp = _answer_stats(out.logits, targets)
                kls = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean(-1)
                for row, (layer_idx, r_idx) in enumerate(chunk):
                    nll_delta[s, layer_idx, r_idx] = (nll[row] - ref_nll[0]).item()
                    kl[s, layer_idx, r_idx] = kls[row].item()
                done += rows
                if progress is not None:
                    progress(done, total)
        del sp
    return AblationResult(ratios, nll_delta, kl, full_nll, lens, time.perf_counter() - t0)
