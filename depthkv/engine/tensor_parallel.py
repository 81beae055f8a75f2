"""Tensor-parallel models (transformers' ``tp_plan``): each rank holds a shard of the KV heads.

With transformers' tensor-parallel plan (``from_pretrained(path, tp_plan="auto")`` under ``torchrun``, CPU/gloo
or GPU/NCCL), q/k/v projections are column-parallel by heads, so every rank's attention sees only its own
query and KV heads and its cache holds ``[B, KVH / tp, N, d]``. depthkv's scoring, top-k and eviction are
per KV head and read head counts from the tensors, so they run rank-locally unchanged; budgets come from the
context length only, identical on every rank, and nothing is communicated.

Only budgets that rank scores across heads need more: input-adaptive allocators (``global``) see every layer's
scores of *all* heads through :func:`gather_head_scores` (one all-gather per pruning), so every rank computes
the same budgets as a single process. Per-KV-head budgets (``head_budgets=True``) and the fast decode path are
refused under tensor parallelism (:func:`check_supported`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class TensorParallelError(ValueError):
    """A press option that a tensor-parallel (head-sharded) model cannot honour."""


def tp_group(modules: Sequence[nn.Module]) -> dist.ProcessGroup | None:
    """The process group sharding the KV heads of these attention modules, or None (not sharded).

    Read from the ``k_proj`` weight, a DTensor on the device mesh's ``tp`` dimension when transformers applied
    a tensor-parallel plan (an unnamed one-dimensional mesh counts as tensor-parallel too).
    """
    weight = getattr(getattr(modules[0], "k_proj", None), "weight", None) if modules else None
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None or not dist.is_available() or not dist.is_initialized():
        return None
    names = mesh.mesh_dim_names or ()
    if names and "tp" not in names:
        return None  # sharded for another parallelism (FSDP gathers the weights back: every head is local)
    if not names and mesh.ndim > 1:
        raise TensorParallelError("the model's device mesh has several unnamed dimensions: name the "
                                  "tensor-parallel one 'tp'")
    group = mesh.get_group("tp") if names else mesh.get_group()
    return group if dist.get_world_size(group) > 1 else None


def check_supported(group: dist.ProcessGroup | None, *, head_budgets: bool, fast: bool) -> None:
    """Refuse the options that would need cross-rank token ranking or full (unsharded) weights."""
    if group is None:
        return
    if head_budgets:
        raise TensorParallelError("head_budgets=True ranks tokens across all KV heads of a layer, but this "
                                  "model is tensor-parallel (each rank holds a shard of the heads): drop it")
    if fast:
        raise TensorParallelError("fast=True decodes from the full weights; this model is tensor-parallel: "
                                  "drop fast=True")


def gather_head_scores(scores: Sequence[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every layer's token scores [B, KVH_local, N_l] joined across ranks into [B, KVH, N_l] (heads in rank
    order, as the column-parallel shards are), with a single all-gather of all layers at once."""
    width = max(s.shape[-1] for s in scores)
    stacked = torch.stack([F.pad(s.float(), (0, width - s.shape[-1]), value=float("-inf")) for s in scores])
    parts = [torch.empty_like(stacked) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stacked.contiguous(), group=group)
    full = torch.cat(parts, dim=2)  # [L, B, KVH, W]
    return [full[i, ..., :s.shape[-1]] for i, s in enumerate(scores)]


def kv_shards(model: nn.Module) -> int:
    """Ranks the KV heads of ``model`` are split across (1 for a model that is not tensor-parallel): a rank's
    cache layers hold ``num_key_value_heads // kv_shards(model)`` heads."""
    first = next((m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "layer_idx")), None)
    group = tp_group([first]) if first is not None else None
    return 1 if group is None else dist.get_world_size(group)
