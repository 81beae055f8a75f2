"""Fused Triton kernels for the column reductions of causal softmax attention that two scorers need.

H2O (Zhang et al. 2023, arXiv 2306.14048) scores key j by the attention later queries pay to it,
``sum_{i, pos(i) != j} P_ij`` averaged over the query heads of each KV group; KVzip (Kim et al. 2025,
arXiv 2505.23416) by the largest probability any reconstruction query of the group pays to it,
``max_{g, i} P_ij`` for the context keys ``j < n_context``. The torch path (``attention_blocks``) writes and
re-reads the fp32 probabilities block by block: at 16k tokens about ``H x 16k x 16k`` floats per layer, a
quadratic, memory-bound stream that dominates these scorers' GPU time on long contexts.

Here nothing quadratic touches memory. Two passes, as FlashAttention's backward pass recomputes probabilities
from the row statistics (Dao 2023, arXiv 2307.08691):

1. ``_row_lse``: one program per (query tile, batch x query head) streams the visible keys with an online
   max / sum (base-2 exponentials, the GPU's native ``exp2``) and writes each query row's log-sum-exp;
2. ``_column_reduce``: one program per (key tile, batch x KV head) keeps its keys in registers, loops over the
   G query heads of the group and over the query tiles that can see those keys, recomputes
   ``P = exp2(s * q.k - lse)`` and reduces it into one value per key: the sum (diagonal skipped, then divided
   by G) or the maximum.

``q.k`` runs in the inputs' dtype (bf16 / fp16 / fp32, fp32 accumulation; fp32 inputs use IEEE products, not
TF32), the softmax statistics and the reductions in fp32. Causality is ``attention_blocks``'s: query ``i`` of
``Q`` sits at physical key ``K - Q + i`` and sees keys ``0 .. K - Q + i``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from depthkv.scorers.base import ScoreInputs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the scorers keep the torch path
    triton = None

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
ENV_SWITCH = "DEPTHKV_FUSED_SCORES"  # "0" turns the fused path off (the torch path is then used on GPU too)


def available() -> bool:
    """Whether triton can be imported (the kernels exist)."""
    return triton is not None


def usable(x: ScoreInputs) -> bool:
    """Whether the scorers should take the fused path for ``x``: its queries and keys are CUDA tensors, triton
    is importable and the environment variable ``DEPTHKV_FUSED_SCORES`` is not ``0``."""
    return (triton is not None and os.environ.get(ENV_SWITCH, "1").strip() != "0"
            and x.query.device.type == "cuda" and x.key.device.type == "cuda")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class ColumnKernelConfig:
    """Tiling of both passes: ``block_m`` queries by ``block_n`` keys per step (powers of two >= 16, the
    smallest ``tl.dot`` tile), ``num_warps`` per program, ``num_stages`` software-pipelining depth of the loops."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not (_pow2(v) and v >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if not (_pow2(self.num_warps) and self.num_warps <= 32):
            raise ValueError(f"num_warps must be a power of two <= 32, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_CONFIG = ColumnKernelConfig()


if triton is not None:

    @triton.jit
    def _row_lse(q_ptr, k_ptr, lse_ptr, qk_scale, n_q, n_k, n_heads, group,
                 s_qb, s_qh, s_qi, s_kb, s_kh, s_kj,
                 D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 NUM_STAGES: tl.constexpr, IEEE: tl.constexpr):
        """Program (query tile, batch x query head): base-2 log-sum-exp of ``qk_scale * q.k`` of each query row
        over its visible keys, written to ``lse[b, h, i]``."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        rows = pid_m * BM + tl.arange(0, BM)
        cols = tl.arange(0, DP)
        row_ok = rows < n_q
        q_head = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
        k_head = k_ptr + b.to(tl.int64) * s_kb + (h // group).to(tl.int64) * s_kh
        q = tl.load(q_head + rows[:, None] * s_qi + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < D),
                    other=0.0)
        last = n_k - n_q + rows  # physical key of each query row: the last one it sees
        m = tl.full([BM], float("-inf"), tl.float32)
        lsum = tl.zeros([BM], tl.float32)
        end = tl.minimum(n_k, n_k - n_q + pid_m * BM + BM)  # past the last key any row of the tile sees
        for off in tl.range(0, end, BN, num_stages=NUM_STAGES):
            n = off + tl.arange(0, BN)
            k = tl.load(k_head + n[:, None] * s_kj + cols[None, :], mask=(n[:, None] < n_k) & (cols[None, :] < D),
                        other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n[None, :] <= last[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            lsum = lsum * tl.exp2(m - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
            m = m_new
        tl.store(lse_ptr + bh.to(tl.int64) * n_q + rows, m + tl.log2(lsum), mask=row_ok)

    @triton.jit
    def _column_reduce(q_ptr, k_ptr, lse_ptr, out_ptr, qk_scale, n_q, n_k, n_cols, n_kvh,
                       s_qb, s_qh, s_qi, s_kb, s_kh, s_kj,
                       G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       NUM_STAGES: tl.constexpr, IEEE: tl.constexpr, SUM: tl.constexpr):
        """Program (key tile, batch x KV head): for keys ``j < n_cols`` of the tile, the sum over the group's G
        heads and all queries of ``P_ij`` without the diagonal, divided by G (``SUM``), or its maximum."""
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1)
        b = bkv // n_kvh
        kvh = bkv % n_kvh
        n = pid_n * BN + tl.arange(0, BN)
        cols = tl.arange(0, DP)
        key_ok = n < n_cols
        k = tl.load(k_ptr + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh + n[:, None] * s_kj + cols[None, :],
                    mask=key_ok[:, None] & (cols[None, :] < D), other=0.0)
        offset = n_k - n_q  # query i sits at physical key offset + i
        # the first query that sees the tile's first key, rounded down to a whole query tile
        start = tl.maximum(pid_n * BN - offset, 0) // BM * BM
        acc = tl.zeros([BN], tl.float32)
        for g in range(G):
            h = kvh * G + g
            q_head = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
            lse_head = lse_ptr + (b * n_kvh * G + h).to(tl.int64) * n_q
            for i0 in tl.range(start, n_q, BM, num_stages=NUM_STAGES):
                rows = i0 + tl.arange(0, BM)
                row_ok = rows < n_q
                q = tl.load(q_head + rows[:, None] * s_qi + cols[None, :],
                            mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
                lse = tl.load(lse_head + rows, mask=row_ok, other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                pos = offset + rows
                seen = row_ok[:, None] & key_ok[None, :] & (n[None, :] <= pos[:, None])
                if SUM:
                    seen = seen & (n[None, :] != pos[:, None])
                s = tl.where(seen, s * qk_scale, float("-inf"))
                p = tl.exp2(s - lse[:, None])
                if SUM:
                    acc += tl.sum(p, 0)
                else:
                    acc = tl.maximum(acc, tl.max(p, 0))
        if SUM:
            acc = acc / G
        tl.store(out_ptr + bkv.to(tl.int64) * n_cols + n, acc, mask=key_ok)


def _column_scores(x: ScoreInputs, n_cols: int, sum_mode: bool, config: ColumnKernelConfig | None) -> torch.Tensor:
    """Both passes on ``x``; ``[B, KVH, n_cols]`` float32."""
    cfg = config or DEFAULT_CONFIG
    q, k = x.query, x.key
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"queries must be [B, H, Q, d] and keys [B, KVH, K, d], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    b, h, nq, d = q.shape
    kvh, nk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or kvh < 1 or h % kvh:
        raise ValueError(f"keys {tuple(k.shape)} do not match queries {tuple(q.shape)}: same batch and head_dim, "
                         "query heads a multiple of the KV heads")
    if nq > nk:
        raise ValueError(f"the {nq} queries must be the last of the {nk} keys (Q <= K)")
    if not 0 <= n_cols <= nk:
        raise ValueError(f"n_context must lie in [0, {nk}], got {n_cols}")
    if triton is None:
        raise RuntimeError("the fused scorer kernels need the triton package")
    if nq == 0 or n_cols == 0:
        return torch.zeros(b, kvh, n_cols, dtype=torch.float32, device=k.device)
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    q = q.to(dtype)
    k = k.to(dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    g = h // kvh
    dp = max(16, 1 << (d - 1).bit_length())  # head_dim padded to a power of two >= 16 (masked lanes are 0)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=k.device)
    out = torch.empty(b, kvh, n_cols, dtype=torch.float32, device=k.device)
    scale = float(x.scaling) * LOG2E
    ieee = dtype == torch.float32
    strides = (*q.stride()[:3], *k.stride()[:3])
    tiles = dict(D=d, DP=dp, BM=cfg.block_m, BN=cfg.block_n, NUM_STAGES=cfg.num_stages, IEEE=ieee,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # Triton launches on the current device: make it the tensors' one (CPU tensors: the interpreter)
    guard = torch.cuda.device(k.device) if k.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _row_lse[(triton.cdiv(nq, cfg.block_m), b * h)](q, k, lse, scale, nq, nk, h, g, *strides, **tiles)
        _column_reduce[(triton.cdiv(n_cols, cfg.block_n), b * kvh)](q, k, lse, out, scale, nq, nk, n_cols, kvh,
                                                                    *strides, G=g, SUM=sum_mode, **tiles)
    return out


def later_attention_mass_fused(x: ScoreInputs, config: ColumnKernelConfig | None = None) -> torch.Tensor:
    """H2O's score, fused: for every key j, the causal attention probability that the queries of ``x`` other
    than the one at j pay to it, summed over queries and averaged over the G query heads of each KV group.
    ``[B, KVH, K]`` float32, equal to ``later_attention_mass``'s torch path."""
    return _column_scores(x, x.key.shape[2], True, config)


def max_attention_fused(x: ScoreInputs, n_context: int, config: ColumnKernelConfig | None = None) -> torch.Tensor:
    """KVzip's score, fused: for every key ``j < n_context``, the largest causal attention probability any query
    of ``x`` in any head of the KV group pays to it (each query normalised over all keys it sees).
    ``[B, KVH, n_context]`` float32, equal to ``KVzip.score``'s torch path before span pooling."""
    return _column_scores(x, int(n_context), False, config)
