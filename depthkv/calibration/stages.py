"""Capture per-layer hidden representations at the paper's four stages with forward hooks.

Stages of decoder layer l (llama / mistral / qwen2 / qwen3 / gemma / phi3 layout: ``input_layernorm``,
``self_attn``, ``post_attention_layernorm``, ``mlp``):

==============  =========================================================  ===================================
stage           meaning                                                    hook
==============  =========================================================  ===================================
``attn_in``     (a) input of attention = the layer's input, pre-norm       pre-hook on the decoder layer
``attn_out``    (b) attention output before the residual add               hook on ``self_attn`` (output[0])
``attn_resid``  (c) post-attention residual stream = (a) + (b)             pre-hook on ``post_attention_layernorm``
``mlp_out``     (d) MLP output before the residual add                     hook on ``mlp``
==============  =========================================================  ===================================

Gemma-2/3 "sandwich" layers (with ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``) normalise
a sub-block's output before adding it, so there (b) is the output of ``post_attention_layernorm``, (c) the
input of ``pre_feedforward_layernorm`` and (d) the output of ``post_feedforward_layernorm`` -- in both
layouts (b) and (d) are exactly what is added to the residual stream and (c) == (a) + (b).

What is stored, per (stage, layer, sample):

* ``pool=True``: the mean over the sample's valid (unpadded) tokens, float64 on the CPU, [d];
* ``keep_tokens=True``: the token matrix [k, d] (float32, CPU), ``k = min(T, max_tokens)`` tokens drawn
  without replacement by a seeded choice (the same token subset for every layer and stage of a sample,
  kept in sequence order);
* ``token_fn`` given: instead of the matrix, what ``token_fn`` returns for it. It is called once per
  (stage, layer) and forward with the list of the batch rows' float64 matrices [k_b, d] (on the model's
  device) and returns one result per row (e.g. a batched metric kernel), so no token matrix outlives
  the forward.

For batched, padded forwards call :meth:`StageCapture.set_batch` with the attention mask and the sample
ids of the rows before each forward; without it every row is treated as unpadded and row ``b`` is
sample ``b`` (a later forward overwrites earlier samples with the same ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from depthkv.models.layers import decoder_layers

__all__ = [
    "STAGES",
    "STAGE_DESCRIPTIONS",
    "StageCapture",
    "capture_stages",
    "stage_hook_points",
]

STAGES: tuple[str, ...] = ("attn_in", "attn_out", "attn_resid", "mlp_out")
STAGE_DESCRIPTIONS: dict[str, str] = {
    "attn_in": "(a) input of attention: the decoder layer's input hidden state, pre-norm",
    "attn_out": "(b) attention output before the residual add",
    "attn_resid": "(c) post-attention residual stream: (a) + (b)",
    "mlp_out": "(d) MLP output before the residual add",
}

_LLAMA_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def _is_decoder_layer(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, p, None), nn.Module) for p in _LLAMA_PARTS)


def stage_hook_points(layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``stage -> (module, "pre" | "post")``: where each stage's tensor is read in one decoder layer."""
    if not _is_decoder_layer(layer):
        raise ValueError(f"not a llama-style decoder layer: {type(layer).__name__}")
    pre_ff = getattr(layer, "pre_feedforward_layernorm", None)
    post_ff = getattr(layer, "post_feedforward_layernorm", None)
    if isinstance(pre_ff, nn.Module) and isinstance(post_ff, nn.Module):  # gemma-2/3 sandwich norms
        return {
            "attn_in": (layer, "pre"),
            "attn_out": (layer.post_attention_layernorm, "post"),
            "attn_resid": (pre_ff, "pre"),
            "mlp_out": (post_ff, "post"),
        }
    return {
        "attn_in": (layer, "pre"),
        "attn_out": (layer.self_attn, "post"),
        "attn_resid": (layer.post_attention_layernorm, "pre"),
        "mlp_out": (layer.mlp, "post"),
    }


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise TypeError(f"cannot find a hidden-state tensor in {type(x).__name__}")


class StageCapture:
    """Holds what the hooks of :func:`capture_stages` record; see the module docstring."""

    def __init__(
        self,
        n_layers: int,
        layers: Sequence[int],
        stages: Sequence[str],
        *,
        pool: bool = True,
        keep_tokens: bool = True,
        max_tokens: int | None = 512,
        seed: int = 0,
        token_fn: Callable[[list[torch.Tensor]], Sequence[Any]] | None = None,
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.n_layers = n_layers
        self.layers = tuple(layers)
        self.stages = tuple(stages)
        self.pool = pool
        self.keep_tokens = keep_tokens
        self.max_tokens = max_tokens
        self.seed = seed
        self.token_fn = token_fn
        self.pooled: dict[str, dict[int, dict[int, torch.Tensor]]] = {}
        self.tokens: dict[str, dict[int, dict[int, Any]]] = {}
        self._mask: torch.Tensor | None = None
        self._ids: list[int] | None = None
        self._index_cache: dict[tuple[int, int], torch.Tensor | None] = {}
        self.clear()

    # -- batch bookkeeping ------------------------------------------------------------------------------
    def set_batch(self, attention_mask: torch.Tensor | None = None, sample_ids: Sequence[int] | None = None):
        """Declare the next forward's padding mask [B, T] (1 = real token) and the rows' sample ids."""
        self._mask = None if attention_mask is None else attention_mask.detach().to(torch.bool)
        self._ids = None if sample_ids is None else [int(i) for i in sample_ids]
        if self._mask is not None and self._ids is not None and len(self._ids) != self._mask.shape[0]:
            raise ValueError(f"{len(self._ids)} sample ids for a batch of {self._mask.shape[0]} rows")

    def clear(self) -> None:
        """Forget everything recorded (the hooks stay registered)."""
        self.pooled = {s: {li: {} for li in self.layers} for s in self.stages}
        self.tokens = {s: {li: {} for li in self.layers} for s in self.stages}

    def token_index(self, sample_id: int, n_valid: int, device=None) -> torch.Tensor | None:
        """Sorted indices (on ``device``) of the tokens kept for a sample of ``n_valid`` tokens (None = all)."""
        if self.max_tokens is None or n_valid <= self.max_tokens:
            return None
        key = (sample_id, n_valid, str(device))
        if key not in self._index_cache:
            rng = np.random.default_rng([self.seed, sample_id, 1])
            idx = np.sort(rng.choice(n_valid, size=self.max_tokens, replace=False))
            self._index_cache[key] = torch.as_tensor(idx, dtype=torch.long, device=device)
        return self._index_cache[key]

    # -- recording (called by the hooks) ----------------------------------------------------------------
    def _record(self, stage: str, layer: int, x: torch.Tensor) -> None:
        x = x.detach()
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.ndim != 3:
            raise ValueError(f"stage {stage} of layer {layer}: expected [B, T, d], got {tuple(x.shape)}")
        b, t, _ = x.shape
        mask = self._mask
        if mask is not None:
            if tuple(mask.shape) != (b, t):
                raise ValueError(f"attention mask {tuple(mask.shape)} does not match hidden states {(b, t)}")
            mask = mask.to(x.device)
        ids = self._ids if self._ids is not None else list(range(b))
        if len(ids) != b:
            raise ValueError(f"{len(ids)} sample ids for a batch of {b} rows")
        if self.pool:
            xf = x.to(torch.float64)
            if mask is None:
                pooled = xf.mean(dim=1)
            else:
                m = mask.to(torch.float64).unsqueeze(-1)
                pooled = (xf * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
            pooled = pooled.cpu()
            store = self.pooled[stage][layer]
            for row, sid in enumerate(ids):
                store[sid] = pooled[row]
        if self.keep_tokens or self.token_fn is not None:
            mats = []
            for row, sid in enumerate(ids):
                z = x[row] if mask is None else x[row][mask[row]]
                idx = self.token_index(sid, z.shape[0], z.device)
                if idx is not None:
                    z = z.index_select(0, idx)
                mats.append(z)
            store = self.tokens[stage][layer]
            if self.token_fn is not None:
                results = self.token_fn([z.to(torch.float64) for z in mats])
                if len(results) != len(ids):
                    raise ValueError(f"token_fn returned {len(results)} results for {len(ids)} rows")
                for sid, res in zip(ids, results, strict=True):
                    store[sid] = res
            else:
                for sid, z in zip(ids, mats, strict=True):
                    store[sid] = z.to(torch.float32).cpu().clone()

    # -- reading ------------------------------------------------------------------------------------------
    def sample_ids(self) -> list[int]:
        """Sorted ids of the samples recorded (taken from the first stage/layer)."""
        s, li = self.stages[0], self.layers[0]
        src = self.pooled[s][li] if self.pool else self.tokens[s][li]
        return sorted(src)

    def pooled_array(self, stage: str, sample_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Mean-pooled vectors of one stage as a float64 tensor [N, n_captured_layers, d]."""
        if not self.pool:
            raise RuntimeError("capture was created with pool=False")
        ids = self.sample_ids() if sample_ids is None else list(sample_ids)
        per_layer = self.pooled[stage]
        return torch.stack([torch.stack([per_layer[li][i] for li in self.layers]) for i in ids])

    def token_matrix(self, stage: str, layer: int, sample_id: int = 0) -> Any:
        """The stored token matrix [k, d] (or ``token_fn`` output) of one stage, layer and sample."""
        return self.tokens[stage][layer][sample_id]


@contextmanager
def capture_stages(
    model: nn.Module,
    *,
    stages: Sequence[str] = STAGES,
    layers: Sequence[int] | None = None,
    pool: bool = True,
    keep_tokens: bool = True,
    max_tokens: int | None = 512,
    seed: int = 0,
    token_fn: Callable[[list[torch.Tensor]], Sequence[Any]] | None = None,
) -> Iterator[StageCapture]:
    """Register hooks on every decoder layer (or ``layers``) for ``stages``; yield a :class:`StageCapture`.

    The hooks are removed when the ``with`` block ends, also when it raises.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
    all_layers = decoder_layers(model)
    n = len(all_layers)
    idx = list(range(n)) if layers is None else [int(i) for i in layers]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for {n} layers")
    cap = StageCapture(
        n,
        idx,
        stages,
        pool=pool,
        keep_tokens=keep_tokens,
        max_tokens=max_tokens,
        seed=seed,
        token_fn=token_fn,
    )
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for li in idx:
            points = stage_hook_points(all_layers[li])
            for stage in stages:
                module, kind = points[stage]
                if kind == "pre":

                    def pre_hook(mod, args, kwargs, _s=stage, _l=li):
                        x = args[0] if args else kwargs["hidden_states"]
                        cap._record(_s, _l, _first_tensor(x))

                    handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                else:

                    def post_hook(mod, args, output, _s=stage, _l=li):
                        cap._record(_s, _l, _first_tensor(output))

                    handles.append(module.register_forward_hook(post_hook))
        yield cap
    finally:
        for h in handles:
            h.remove()
