"""Attention functions that accept caches whose layers hold different numbers of tokens.

HF transformers builds one attention mask per forward, sized for the *logical* sequence (our pruned layers
report logical lengths so that RoPE positions continue at the original context length). A layer that kept
B_l of N context tokens has fewer physical keys than the mask has columns. We register ``depthkv_sdpa`` and
``depthkv_eager`` (transformers' AttentionInterface): they map the mask's columns onto the layer's physical
keys, then call the stock sdpa/eager function. The engine's scoring hook rides on the same call, because it
is the one place where the post-RoPE queries are visible.
"""

from __future__ import annotations

import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from depthkv.engine.cache import PrunedLayer

PREFIX = "depthkv_"
BASES = ("sdpa", "eager")
_registered = False
# SDPA backends depthkv_sdpa allows on CUDA (None: PyTorch's own choice). Layer-dependent budgets give every
# layer its own key length, and each decode step makes every length new; cuDNN's attention prepares an
# execution plan per shape, so it is left out (benchmarks/hf_uneven_decode.py measures the difference).
SDPA_BACKENDS: list | None = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _base_function(module: torch.nn.Module, base: str):
    if base == "sdpa":
        return sdpa_attention_forward
    # eager: the model's own eager function lives in its modeling module
    return sys.modules[type(module).__module__].eager_attention_forward


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """True where a mask lets attention through (bool masks: True; additive float masks: 0)."""
    return mask if mask.dtype == torch.bool else mask == 0


def left_padding(mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Padding tokens at the start of each sequence [B] (long), read from a causal forward's mask [B, 1|H, Q, K].

    HF hides a left-padded batch's padding from every query, so the keys the last query (a real token: the
    prompts end together) cannot see are exactly the padding. Anything else (right padding, holes) raises.
    """
    if mask is None:  # SDPA's implicit causal mask: no padding
        return torch.zeros(batch, dtype=torch.long)
    vis = _visible(mask[..., -1, :]).any(dim=1).expand(batch, -1)  # [B, K]
    n_pad = (~vis).sum(dim=-1)
    if not torch.equal(vis, torch.arange(vis.shape[-1], device=vis.device)[None, :] >= n_pad[:, None]):
        raise NotImplementedError("only left-padded batches are supported (tokenizer padding_side='left'): "
                                  "the attention mask hides tokens after a sequence's first real token")
    if bool((n_pad == vis.shape[-1]).any()):
        raise ValueError("a sequence of the batch is all padding: its attention mask has no 1")
    return n_pad.cpu()


def align_mask(mask: torch.Tensor | None, layer, n_keys: int, n_query_heads: int,
               n_query: int = 1) -> torch.Tensor | None:
    """The logical mask [B, 1|H, Q, W] restricted to this layer's physical keys [B, *, Q, n_keys]."""
    valid = getattr(layer, "valid", None)
    if valid is not None:
        return _ragged_mask(mask, layer, n_keys, n_query_heads, n_query)
    if mask is None or mask.shape[-1] == n_keys:
        return mask
    if not isinstance(layer, PrunedLayer):
        raise RuntimeError(
            f"attention mask has {mask.shape[-1]} columns but the layer holds {n_keys} keys and was not pruned "
            "by depthkv; was the cache modified elsewhere?"
        )
    r, p = layer.prefix_end, layer.n_prefix
    tail = mask[..., r:]
    if p + tail.shape[-1] != n_keys:
        raise RuntimeError(f"mask/cache mismatch: {p} kept + {tail.shape[-1]} tail != {n_keys} keys")
    prefix = mask[..., :r]
    if bool(_visible(prefix).all()):
        # common case (no padding): every kept context token is visible to every new query
        dev = mask.device
        fill = (torch.ones((), dtype=torch.bool, device=dev) if mask.dtype == torch.bool
                else torch.zeros((), dtype=mask.dtype, device=dev))
        shape = (*mask.shape[:-1], p)
        return torch.cat([fill.expand(shape), tail], dim=-1)
    # padding inside the context: gather each KV head's kept columns, then spread over its query heads
    b, _, q, _ = mask.shape
    kvh = layer.kept_pos.shape[1]
    idx = layer.kept_pos.long()[:, :, None, :].expand(b, kvh, q, p)
    gathered = prefix.expand(b, kvh, q, r).gather(-1, idx)
    gathered = gathered.repeat_interleave(n_query_heads // kvh, dim=1)
    return torch.cat([gathered, tail.expand(b, n_query_heads, q, tail.shape[-1])], dim=-1)


def _ragged_mask(mask: torch.Tensor | None, layer, n_keys: int, n_query_heads: int, n_query: int) -> torch.Tensor:
    """Mask [B, H, Q, n_keys] for a layer whose KV heads kept different numbers of tokens (padding hidden).

    A ``None`` mask (SDPA's implicit causal case) is read as causal over the logical sequence: every kept
    context token is visible, the tail is causal among the new queries.
    """
    r, p = layer.prefix_end, layer.n_prefix
    b, kvh, _ = layer.kept_pos.shape
    device = layer.kept_pos.device
    if mask is None:
        n_tail, q = n_keys - p, n_query
        q_idx = torch.arange(n_tail - q, n_tail, device=device)[:, None]
        tail = (torch.arange(n_tail, device=device)[None, :] <= q_idx)[None, None]  # [1, 1, Q, T]
        prefix_vis = layer.valid[:, :, None, :].expand(b, kvh, q, p)
        vis = torch.cat([prefix_vis, tail.expand(b, kvh, q, n_tail)], dim=-1)
        return vis.repeat_interleave(n_query_heads // kvh, dim=1)
    q = mask.shape[-2]
    if p + mask.shape[-1] - r != n_keys:
        raise RuntimeError(f"mask/cache mismatch: {p} kept + {mask.shape[-1] - r} tail != {n_keys} keys")
    vis = _visible(mask)
    idx = layer.kept_pos.long()[:, :, None, :].expand(b, kvh, q, p)
    prefix_vis = vis[..., :r].expand(b, kvh, q, r).gather(-1, idx) & layer.valid[:, :, None, :]
    full = torch.cat([prefix_vis, vis[..., r:].expand(b, kvh, q, n_keys - p)], dim=-1)
    full = full.repeat_interleave(n_query_heads // kvh, dim=1)
    if mask.dtype == torch.bool:
        return full
    return torch.zeros(full.shape, dtype=mask.dtype, device=mask.device).masked_fill(~full, torch.finfo(mask.dtype).min)


def restrict_keys(mask: torch.Tensor | None, visible: torch.Tensor, n_query_heads: int, n_query: int,
                  n_keys: int) -> torch.Tensor:
    """``mask`` [B, 1|H, Q, K] further limited to the keys ``visible`` [B, KVH, N] among the first N.

    Used by calibration probes (masking instead of eviction, see ``depthkv.calibration.ablation``); a
    ``None`` mask (SDPA's implicit causal case) is materialised as the causal mask of the last Q queries.
    """
    b, kvh, n = visible.shape
    if mask is None:
        q_pos = torch.arange(n_keys - n_query, n_keys, device=visible.device)[:, None]
        mask = (torch.arange(n_keys, device=visible.device)[None, :] <= q_pos)[None, None]
    vis = visible.repeat_interleave(n_query_heads // kvh, dim=1)[:, :, None, :]  # [B, H, 1, N]
    tail = torch.ones((b, n_query_heads, 1, n_keys - n), dtype=torch.bool, device=visible.device)
    vis = torch.cat([vis, tail], dim=-1)
    if mask.dtype == torch.bool:
        return mask & vis
    return mask.masked_fill(~vis, torch.finfo(mask.dtype).min)


def _make(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        session = getattr(module, "_depthkv_session", None)
        if session is not None:
            attention_mask = session.before_attention(module, query, key, value, attention_mask)
        fn = _base_function(module, base)
        if base == "sdpa" and SDPA_BACKENDS is not None and query.is_cuda:
            with sdpa_kernel(SDPA_BACKENDS):
                return fn(module, query, key, value, attention_mask, **kwargs)
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def register() -> None:
    """Register depthkv_sdpa / depthkv_eager with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    for base, mask_fn in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(PREFIX + base, _make(base))
        AttentionMaskInterface.register(PREFIX + base, mask_fn)
    _registered = True


def wrapped_name(current: str) -> str:
    """The depthkv attention name that wraps the model's current implementation."""
    base = current[len(PREFIX):] if current.startswith(PREFIX) else current
    if base not in BASES:
        raise ValueError(
            f"depthkv supports attn_implementation 'sdpa' or 'eager', the model uses {current!r}; "
            "load it with attn_implementation='sdpa'"
        )
    return PREFIX + base
