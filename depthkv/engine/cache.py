"""A cache layer that has physically lost tokens but still knows where the survivors sit in the sequence.

After pruning, layer l's keys/values really are ``[batch, kv_heads, B_l, head_dim]``; different layers have
different lengths. Two facts must survive the eviction (design brief, "Engine contract"):

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

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kept_pos: torch.Tensor, prefix_end: int):
        super().__init__()
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

    def physical_length(self) -> int:
        return self.keys.shape[-2]

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

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.kept_pos = self.kept_pos[indices, ...]

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


def clone_cache(cache: DynamicCache) -> DynamicCache:
    """An independent copy of a (possibly pruned) cache: same layer types, fresh tensors."""
    new = DynamicCache()
    new.layers = []
    for layer in cache.layers:
        if isinstance(layer, PrunedLayer):
            c = PrunedLayer(layer.keys.clone(), layer.values.clone(), layer.kept_pos.clone(), layer.prefix_end)
            c.logical_len = layer.logical_len
        else:
            c = DynamicLayer()
            if layer.is_initialized:
                c.update(layer.keys.clone(), layer.values.clone())
        new.layers.append(c)
    return new
