"""A cache layer that has physically lost tokens but still knows where the survivors sit in the sequence.

After pruning, layer l's keys/values really are ``[batch, kv_heads, B_l, head_dim]``; different layers have
different lengths. Two facts must survive the eviction:

* the *logical* length (tokens seen so far): HF uses ``get_seq_length`` to place new tokens, so new tokens
  keep their original RoPE positions instead of being compacted;
* the logical position of every kept token of every KV head, so the attention mask that HF builds for the
  logical sequence can be mapped onto this layer's physical keys (see ``depthkv.engine.attention``).

Physical layout of a pruned layer: ``[kept prefix (P tokens, positions kept_pos)][tail: logical prefix_end ..
logical_len, appended unpruned]``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PrunedLayer(DynamicLayer):
    """A DynamicLayer whose first ``P`` physical tokens are a pruned selection of logical [0, prefix_end)."""

    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kept_pos: torch.Tensor, prefix_end: int,
                 valid: torch.Tensor | None = None):
        super().__init__()
        # [B, KVH, P] bool or None: with per-head budgets the heads keep different numbers of tokens; the
        # layer stores the longest and ``valid`` marks the real ones (padding is masked out of attention)
        self.valid = valid
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True
        self.kept_pos = kept_pos  # [B, KVH, P] int32: logical positions of the kept prefix
        self.prefix_end = int(prefix_end)  # logical length at the moment of the last pruning
        self.logical_len = int(prefix_end)

    @property
    def n_prefix(self) -> int:
        return self.kept_pos.shape[-1]

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.logical_len += key_states.shape[-2]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.logical_len

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers <= 5.2x passed cache_position (a tensor), newer ones pass the query length (an int)
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.logical_len + q, 0

    def positions(self) -> torch.Tensor:
        """Logical position of every physical token, ``[B, KVH, K]`` (long)."""
        b, h, _ = self.kept_pos.shape
        tail = torch.arange(self.prefix_end, self.logical_len, device=self.kept_pos.device)
        return torch.cat([self.kept_pos.long(), tail.expand(b, h, -1)], dim=-1)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a pruned cache layer cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.kept_pos = self.kept_pos.repeat_interleave(repeats, dim=0)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.kept_pos = self.kept_pos[indices, ...]
        if self.valid is not None:
            self.valid = self.valid[indices, ...]

    def reset(self) -> None:
        super().reset()
        self.kept_pos = self.kept_pos[..., :0]
        self.prefix_end = self.logical_len = 0


def layer_positions(layer) -> torch.Tensor:
    """Logical positions ``[B, KVH, K]`` of a layer's physical tokens (identity for an unpruned layer)."""
    if isinstance(layer, PrunedLayer):
        return layer.positions()
    b, h, k, _ = layer.keys.shape
    return torch.arange(k, device=layer.keys.device).expand(b, h, k)


def gather_tokens(layer, keep: torch.Tensor) -> PrunedLayer:
    """New PrunedLayer holding only the physical tokens ``keep`` ([B, KVH, budget], sorted) of ``layer``.

    The gathered tensors are fresh allocations: once the old layer is dropped its memory is really freed.
    """
    pos = layer_positions(layer).gather(-1, keep)
    idx = keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
    keys = layer.keys.gather(2, idx)
    values = layer.values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, layer.values.shape[-1]))
    logical = layer.get_seq_length()
    return PrunedLayer(keys, values, pos.to(torch.int32), prefix_end=logical)


def gather_ragged(layer, keep: torch.Tensor, valid: torch.Tensor) -> PrunedLayer:
    """Like :func:`gather_tokens`, for heads that keep different numbers of tokens: ``keep`` [B, KVH, P] holds
    each head's tokens (sequence order) followed by padding slots, ``valid`` [B, KVH, P] says which are real."""
    new = gather_tokens(layer, keep)
    new.valid = None if bool(valid.all()) else valid.clone()
    return new


def kv_bytes_ragged(cache: Cache) -> int:
    """Bytes of the KV pairs really kept: like :func:`kv_bytes`, without the padding of per-head budgets."""
    total = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            continue
        per_token = (layer.keys.shape[-1] * layer.keys.element_size()
                     + layer.values.shape[-1] * layer.values.element_size())
        n = layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2]
        valid = getattr(layer, "valid", None)
        if valid is not None:
            n -= int((~valid).sum())
        total += n * per_token
    return total


def kv_bytes_per_sequence(cache: Cache, attention_mask: torch.Tensor | None = None) -> list[int]:
    """Bytes of the KV pairs each sequence of a batch really holds: the valid slots of its pruned layers (not
    the filler of a ragged layer) and their unpruned tails. ``attention_mask`` [B, logical length] (zeros on
    padding) also leaves the padding of unpruned layers and tails out; without it those count whole."""
    totals = None
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            continue
        batch, kvh, n_keys = layer.keys.shape[:3]
        per_slot = layer.keys.shape[-1] * layer.keys.element_size() + layer.values.shape[-1] * layer.values.element_size()
        pruned = isinstance(layer, PrunedLayer)
        n_prefix = layer.n_prefix if pruned else 0
        start = layer.prefix_end if pruned else 0  # logical position of the first unpruned key
        if attention_mask is None:
            rest = torch.full((batch,), n_keys - n_prefix, dtype=torch.long)
        else:
            rest = attention_mask[:, start:start + n_keys - n_prefix].to(torch.long).sum(-1).cpu()
        slots = rest * kvh
        if pruned:
            slots = slots + (layer.valid.sum(dim=(1, 2)).cpu() if layer.valid is not None else kvh * n_prefix)
        totals = slots * per_slot if totals is None else totals + slots * per_slot
    return [] if totals is None else [int(t) for t in totals]


def kv_bytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of every layer (what pruning saves)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total


def layer_lengths(cache: Cache) -> list[int]:
    """Physical tokens per layer."""
    return [int(layer.keys.shape[-2]) if layer.is_initialized else 0 for layer in cache.layers]


def layer_state(layer) -> tuple[dict[str, torch.Tensor], dict[str, int | str]]:
    """(tensors, scalar facts) of one cache layer: everything needed to rebuild it with :func:`layer_from_state`.

    The one place that knows a layer's fields; saving (``depthkv.engine.compressed``) and copying go through it.
    """
    if isinstance(layer, PrunedLayer):
        tensors = {"keys": layer.keys, "values": layer.values, "kept_pos": layer.kept_pos}
        if layer.valid is not None:
            tensors["valid"] = layer.valid
        return tensors, {"kind": "pruned", "prefix_end": layer.prefix_end, "logical_len": layer.logical_len}
    if not getattr(layer, "is_initialized", False) or layer.keys is None:
        return {}, {"kind": "empty"}
    return {"keys": layer.keys, "values": layer.values}, {"kind": "full"}


def layer_from_state(tensors: dict[str, torch.Tensor], meta: dict) -> DynamicLayer:
    """Rebuild a layer from :func:`layer_state`'s output (tensors used as given); ValueError if inconsistent."""
    kind = meta.get("kind")
    if kind == "empty":
        return DynamicLayer()
    if kind not in ("full", "pruned"):
        raise ValueError(f"unknown cache layer kind {kind!r}")
    missing = [k for k in ("keys", "values") + (("kept_pos",) if kind == "pruned" else ()) if k not in tensors]
    if missing:
        raise ValueError(f"{kind} cache layer lacks the tensor {missing[0]!r}")
    keys, values = tensors["keys"], tensors["values"]
    if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} are not matching "
                         "[batch, kv_heads, tokens, head_dim] tensors")
    if kind == "full":
        layer = DynamicLayer()
        layer.update(keys, values)
        return layer
    kept_pos, prefix_end, logical_len = tensors["kept_pos"], int(meta["prefix_end"]), int(meta["logical_len"])
    n_prefix = kept_pos.shape[-1] if kept_pos.ndim == 3 else -1
    if (kept_pos.shape[:2] != keys.shape[:2] or kept_pos.is_floating_point() or not 0 <= prefix_end <= logical_len
            or n_prefix + logical_len - prefix_end != keys.shape[2]):
        raise ValueError(f"pruned cache layer is inconsistent: {tuple(keys.shape[:3])} keys, kept positions "
                         f"{tuple(kept_pos.shape)}, prefix end {prefix_end}, logical length {logical_len}")
    valid = tensors.get("valid")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != kept_pos.shape):
        raise ValueError(f"pruned cache layer: valid mask {tuple(valid.shape)} does not match kept positions "
                         f"{tuple(kept_pos.shape)}")
    layer = PrunedLayer(keys, values, kept_pos, prefix_end, valid)
    layer.logical_len = logical_len
    return layer


def clone_cache(cache: DynamicCache) -> DynamicCache:
    """An independent copy of a (possibly pruned) cache: same layer types, fresh tensors."""
    new = DynamicCache()
    new.layers = []
    for layer in cache.layers:
        tensors, meta = layer_state(layer)
        new.layers.append(layer_from_state({k: t.clone() for k, t in tensors.items()}, meta))
    return new
