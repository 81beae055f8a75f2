"""A split-KV ("flash-decoding") Triton kernel: one query token of every head over a fixed-size K/V buffer.

Why: for a single query token the cuBLAS/SDPA routes either launch few thread blocks over a long cache (SDPA:
one per head) or write and re-read the score matrix (``split``). Here the buffer ``[B, KVH, C, D]`` is cut into
``chunk``-token splits, one program per (batch x KV head, split) reads its K/V once (all G query heads of the
group share that read: GQA), keeps an online softmax in registers and writes a partial result; a second small
kernel merges the splits. The number of valid keys of each (sequence, KV head) is read on the device from its
write position (valid slots are always the prefix ``[0, pos]``; rows and heads may differ: ragged per-head
budgets, batches of prompts of different lengths), so the launch shape never changes: CUDA-graph safe, and a
split past a row's valid prefix reads nothing.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fast path falls back to the torch attention
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, scale, chunk, n_split, n_kvh,
                 s_kb, s_kh, s_kc, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                 IEEE: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        n_valid = tl.load(pos_ptr + bh) + 1
        rows = tl.arange(0, GP)
        cols = tl.arange(0, D)
        q = tl.load(q_ptr + bh * G * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        start = sp * chunk
        end = tl.minimum(start + chunk, n_valid)
        base = (bh // n_kvh) * s_kb + (bh % n_kvh) * s_kh
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        off = start
        while off < end:  # runtime bounds (a while loop: also runs under TRITON_INTERPRET)
            n = off + tl.arange(0, BN)
            ok = n < end
            kv_off = base + n[:, None] * s_kc + cols[None, :]
            k = tl.load(k_ptr + kv_off, mask=ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - safe)
            p = tl.exp(s - safe[:, None])
            lsum = lsum * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off, mask=ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
            off += BN
        out = (bh * n_split + sp) * GP
        tl.store(acc_ptr + (out + rows[:, None]) * D + cols[None, :], acc)
        tl.store(ml_ptr + (out + rows) * 2, m)
        tl.store(ml_ptr + (out + rows) * 2 + 1, lsum)

    @triton.jit
    def _merge(acc_ptr, ml_ptr, o_ptr, n_split, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        rows = tl.arange(0, GP)
        cols = tl.arange(0, D)
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        sp = 0
        while sp < n_split:
            off = (bh * n_split + sp) * GP
            ms = tl.load(ml_ptr + (off + rows) * 2)
            ls = tl.load(ml_ptr + (off + rows) * 2 + 1)
            a = tl.load(acc_ptr + (off + rows[:, None]) * D + cols[None, :])
            m_new = tl.maximum(m, ms)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            f_old = tl.exp(m - safe)
            f_new = tl.exp(ms - safe)
            lsum = lsum * f_old + ls * f_new
            acc = acc * f_old[:, None] + a * f_new[:, None]
            m = m_new
            sp += 1
        o = acc / lsum[:, None]
        tl.store(o_ptr + bh * G * D + rows[:, None] * D + cols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=rows[:, None] < G)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float,
                     chunk: int = 512, block_n: int = 64) -> torch.Tensor:
    """Attention of ``q`` ``[B, KVH, G, D]`` over the first ``pos[b, h] + 1`` slots of ``k``/``v`` ``[B, KVH, C, D]``.

    ``pos``: ``[B, KVH]`` long tensor on the device (each row's and head's slot written at this step).
    Returns ``[B, KVH, G, D]``.
    """
    b, kvh, g, d = q.shape
    c = k.shape[2]
    if k.stride(-1) != 1 or v.stride() != k.stride() or d & (d - 1):
        raise ValueError("decode_attention needs K/V with equal strides, unit last stride, power-of-2 head_dim")
    if pos.shape != (b, kvh):
        raise ValueError(f"pos must be [batch, kv_heads] = {(b, kvh)}, got {tuple(pos.shape)}")
    pos = pos.contiguous()
    chunk = max(block_n, chunk // block_n * block_n)
    n_split = triton.cdiv(c, chunk)
    gp = max(16, triton.next_power_of_2(g))
    q = q.contiguous()
    acc = torch.empty(b * kvh, n_split, gp, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(b * kvh, n_split, gp, 2, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    ieee = q.dtype == torch.float32
    with torch.cuda.device(q.device):  # Triton launches on the current device: make it the tensors' one
        _partial[(b * kvh, n_split)](q, k, v, pos, acc, ml, scale, chunk, n_split, kvh, k.stride(0), k.stride(1),
                                     k.stride(2), G=g, GP=gp, D=d, BN=block_n, IEEE=ieee)
        _merge[(b * kvh,)](acc, ml, out, n_split, G=g, GP=gp, D=d)
    return out
