"""A split-KV ("flash-decoding") Triton kernel: one query token of every head over a fixed-size K/V buffer.

Why: for a single query token the cuBLAS/SDPA routes either launch few thread blocks over a long cache (SDPA:
one per head) or write and re-read the score matrix (``split``). Here the buffer ``[B, KVH, C, D]`` is cut into
``chunk``-token splits, one program per (batch x KV head, split) reads its K/V once (all G query heads of the
group share that read: GQA), keeps an online softmax in registers and writes a partial result; a second small
kernel merges the splits (Dao et al., "Flash-Decoding for long-context inference", 2023). The number of valid
keys of each (sequence, KV head) is read on the device from its write position (valid slots are always the
prefix ``[0, pos]``; rows and heads may differ: ragged per-head budgets, batches of prompts of different
lengths), so the launch shape never changes: CUDA-graph safe, and a split past a row's valid prefix reads
nothing.

How the work is cut and scheduled is a :class:`KernelConfig`: the tile of keys per loop step (``block_n``), the
warps per program, the software-pipelining depth of the key loop (``num_stages``: loads of the next tiles are
issued while the current one is computed) and the rule that picks the number of splits. The best values
depend on the GPU and on the batch and buffer shapes; ``benchmarks/decode_kernel_sweep.py`` measures them, and
:func:`set_default_config` / :func:`default_config` make a chosen one the default of every call that passes
none (the fast decode path does not pass one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fast path falls back to the torch attention
    triton = None

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e)), exp2 is the GPU's native op


def available() -> bool:
    return triton is not None


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tiling, launch and split settings of :func:`decode_attention`.

    ``block_n``: keys per loop step (a power of two >= 16, the smallest ``tl.dot`` tile).
    ``num_warps``: warps per program. ``num_stages``: software-pipelining depth of the key loop (1 = none).
    ``target_programs``, ``max_split``, ``min_chunk``: the split rule, see :meth:`split`.
    The defaults are the fastest config over five decode shapes of a Llama-3.1-8B-shaped cache on an H200
    (``benchmarks/decode_kernel_sweep.py``, 2026-11-30): 128-key tiles, 4 warps, a two-stage pipelined key loop,
    ~1024 programs; 0.95-0.96 of the memory bandwidth at batch 38-151, 1.27 x the untuned kernel (64-key tiles,
    no pipelining, ~2048 programs: ``KernelConfig(block_n=64, num_stages=1, target_programs=2048)``).
    """

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 1024
    max_split: int = 48
    min_chunk: int = 128

    def __post_init__(self) -> None:
        if not (_pow2(self.block_n) and self.block_n >= 16):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if not (_pow2(self.num_warps) and self.num_warps <= 32):
            raise ValueError(f"num_warps must be a power of two <= 32, got {self.num_warps}")
        for name in ("num_stages", "target_programs", "max_split", "min_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, fields: dict) -> KernelConfig:
        """A config from a mapping of some of its fields (the rest default), e.g. parsed from JSON;
        ValueError names an unknown field or a value that is not an integer."""
        if not isinstance(fields, dict):
            raise ValueError(f"a kernel config is a JSON object of fields, got {type(fields).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"unknown kernel config field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        bad = [k for k, v in fields.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"kernel config field(s) {', '.join(bad)} must be integers")
        return cls(**fields)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def split(self, b: int, kvh: int, c: int) -> tuple[int, int]:
        """(number of splits, keys per split) for a ``[b, kvh, c, D]`` buffer.

        About ``target_programs`` programs in all, enough to fill every SM of the GPU several times
        (at most ``max_split`` splits per (row, KV head): each split costs a partial result and a merge step);
        a split holds at least ``min_chunk`` keys and a whole number of ``block_n`` tiles, and the splits
        cover the buffer: ``n_split * chunk >= c > (n_split - 1) * chunk``.
        """
        if b < 1 or kvh < 1 or c < 1:
            raise ValueError(f"split needs a positive batch, KV head count and buffer length, got {(b, kvh, c)}")
        want = max(1, min(self.max_split, math.ceil(self.target_programs / (b * kvh))))
        chunk = math.ceil(max(self.min_chunk, math.ceil(c / want)) / self.block_n) * self.block_n
        return math.ceil(c / chunk), chunk


DEFAULT_CONFIG = KernelConfig()
_default = DEFAULT_CONFIG


def get_default_config() -> KernelConfig:
    """The config :func:`decode_attention` uses when it is given none."""
    return _default


def set_default_config(config: KernelConfig | None) -> KernelConfig:
    """Make ``config`` the default of every later call that passes none (None: back to
    :data:`DEFAULT_CONFIG`); returns the previous default. A CUDA graph keeps the config it was captured with."""
    global _default
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"expected a KernelConfig, got {type(config).__name__}")
    prev, _default = _default, config or DEFAULT_CONFIG
    return prev


@contextlib.contextmanager
def default_config(config: KernelConfig | None) -> Iterator[KernelConfig]:
    """``with default_config(cfg):`` the default config is ``cfg`` inside the block, the previous one after."""
    prev = set_default_config(config)
    try:
        yield get_default_config()
    finally:
        set_default_config(prev)


if triton is not None:

    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, qk_scale, chunk, n_split, n_kvh,
                 s_kb, s_kh, s_kc, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                 NUM_STAGES: tl.constexpr, IEEE: tl.constexpr):
        """Program (row x KV head, split): online softmax of the G query heads over keys
        ``[split * chunk, min((split + 1) * chunk, pos + 1))``; writes the unnormalised output and (max, sum)."""
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        n_valid = tl.load(pos_ptr + bh) + 1
        rows = tl.arange(0, GP)
        cols = tl.arange(0, D)
        q = tl.load(q_ptr + bh * G * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        start = sp * chunk
        end = tl.minimum(start + chunk, n_valid)
        # 64-bit head offset (a large batch's buffer passes 2**31 elements); offsets inside one head fit 32 bits
        base = (bh // n_kvh).to(tl.int64) * s_kb + (bh % n_kvh).to(tl.int64) * s_kh
        k_head = k_ptr + base
        v_head = v_ptr + base
        m = tl.full([GP], float("-inf"), tl.float32)  # running max, base-2 units
        lsum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for off in tl.range(start, end, BN, num_stages=NUM_STAGES):  # empty when the split lies past pos
            n = off + tl.arange(0, BN)
            ok = n < end
            kv_off = n[:, None] * s_kc + cols[None, :]
            k = tl.load(k_head + kv_off, mask=ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - safe)
            p = tl.exp2(s - safe[:, None])
            lsum = lsum * alpha + tl.sum(p, 1)
            v = tl.load(v_head + kv_off, mask=ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = (bh * n_split + sp) * G  # only the G real query rows are written (the padding rows are zero)
        real = rows < G
        tl.store(acc_ptr + (out + rows[:, None]) * D + cols[None, :], acc, mask=real[:, None])
        tl.store(ml_ptr + (out + rows) * 2, m, mask=real)
        tl.store(ml_ptr + (out + rows) * 2 + 1, lsum, mask=real)

    @triton.jit
    def _merge(acc_ptr, ml_ptr, o_ptr, n_split, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
        """Program (row x KV head): rescale the splits' partial results to one max and normalise. An empty
        split (max -inf, sum 0) contributes nothing."""
        bh = tl.program_id(0)
        rows = tl.arange(0, GP)
        cols = tl.arange(0, D)
        real = rows < G
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for sp in tl.range(0, n_split):
            off = (bh * n_split + sp) * G
            ms = tl.load(ml_ptr + (off + rows) * 2, mask=real, other=float("-inf"))
            ls = tl.load(ml_ptr + (off + rows) * 2 + 1, mask=real, other=0.0)
            a = tl.load(acc_ptr + (off + rows[:, None]) * D + cols[None, :], mask=real[:, None], other=0.0)
            m_new = tl.maximum(m, ms)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            f_old = tl.exp2(m - safe)
            f_new = tl.exp2(ms - safe)
            lsum = lsum * f_old + ls * f_new
            acc = acc * f_old[:, None] + a * f_new[:, None]
            m = m_new
        o = acc / tl.where(real, lsum, 1.0)[:, None]
        tl.store(o_ptr + bh * G * D + rows[:, None] * D + cols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=real[:, None])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float,
                     config: KernelConfig | None = None) -> torch.Tensor:
    """Attention of ``q`` ``[B, KVH, G, D]`` over the first ``pos[b, h] + 1`` slots of ``k``/``v`` ``[B, KVH, C, D]``.

    ``pos``: ``[B, KVH]`` integer tensor on the device (each row's and head's slot written at this step,
    ``0 <= pos < C``). ``config``: tiling and split settings (default: :func:`get_default_config`).
    Returns ``[B, KVH, G, D]`` in ``q``'s dtype.
    """
    cfg = config or _default
    b, kvh, g, d = q.shape
    c = k.shape[2]
    if k.shape != (b, kvh, c, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be [batch, kv_heads, slots, head_dim] = {(b, kvh, '*', d)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.stride(-1) != 1 or v.stride() != k.stride() or not _pow2(d) or d < 16:
        raise ValueError("decode_attention needs K/V with equal strides, unit last stride, power-of-2 head_dim >= 16")
    if pos.shape != (b, kvh):
        raise ValueError(f"pos must be [batch, kv_heads] = {(b, kvh)}, got {tuple(pos.shape)}")
    if triton is None:
        raise RuntimeError("decode_attention needs the triton package")
    pos = pos.contiguous()
    n_split, chunk = cfg.split(b, kvh, c)
    gp = max(16, 1 << (g - 1).bit_length())  # query rows padded to a power of two >= 16 (tl.dot's smallest M)
    q = q.contiguous()
    acc = torch.empty(b * kvh, n_split, g, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(b * kvh, n_split, g, 2, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    ieee = q.dtype == torch.float32
    # Triton launches on the current device: make it the tensors' one (CPU tensors: the interpreter)
    guard = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _partial[(b * kvh, n_split)](q, k, v, pos, acc, ml, scale * LOG2E, chunk, n_split, kvh, k.stride(0),
                                     k.stride(1), k.stride(2), G=g, GP=gp, D=d, BN=cfg.block_n,
                                     NUM_STAGES=cfg.num_stages, IEEE=ieee, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)
        _merge[(b * kvh,)](acc, ml, out, n_split, G=g, GP=gp, D=d)
    return out
