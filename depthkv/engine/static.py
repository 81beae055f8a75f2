"""Fixed-shape greedy decoding from a pruned cache: per-layer-sized static buffers, one CUDA graph per step.

Plain HF decoding from a depthkv cache is bound by launches, Python and ``torch.cat`` growth of every layer's
cache: pruning saves bytes but barely any milliseconds. Here, once the context is pruned, layer l's
keys/values are copied into a preallocated buffer of ``B_l + horizon`` tokens (``horizon`` = tokens that decoding
will feed), so every tensor shape stays fixed while decoding and the whole one-token step (embedding, 32 layers,
LM head, argmax, bookkeeping) can be captured once as a ``torch.cuda.CUDAGraph`` and replayed with no host
work. All step state lives on the device: the token to feed, each row's logical RoPE position (continuing at
the logical length N, as :class:`~depthkv.engine.cache.PrunedLayer` does, less a padded row's padding), the
step counter and each (layer, row, KV head)'s kept length, from which the write slot and the visible prefix
follow. Rows and KV heads may keep different numbers of tokens: per-head budgets, left-padded batches and
stacks of differently pruned caches of one prompt decode in one batch. On CPU the same step runs eagerly (no
graphs), which is what CI tests against the dynamic path.

The decode step is written against the Llama-family layer (RMSNorm, q/k/v/o projections with optional biases,
rotary embeddings, SiLU-gated MLP); :func:`check_model` refuses anything else with a clear error instead of
computing something different. Only greedy decoding is supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from depthkv.models.layers import decoder_body, decoder_layers

SUPPORTED = {"llama": "LlamaRMSNorm", "qwen2": "Qwen2RMSNorm"}  # model_type -> the RMSNorm class it must use
ATTENTIONS = ("auto", "split", "sdpa", "triton")


class FastDecodeError(ValueError):
    """The fast decode path cannot reproduce the dynamic path for this model/cache/request."""


@dataclass(frozen=True)
class FastConfig:
    """How the fixed-shape decoder runs.

    ``attention``: ``triton`` = a split-KV Triton kernel reading each layer's valid prefix once
    (``depthkv.engine.decode_kernel``, CUDA); ``split`` = QK^T with cuBLAS, fp32 softmax, P·V split into
    ``block``-token chunks (parallel over the cache even for one query token); ``sdpa`` =
    ``scaled_dot_product_attention`` with the layer's mask; ``auto`` = ``triton`` on CUDA when Triton is
    installed, else ``split``.
    ``block``: buffer storage is rounded up to a multiple of it (masked). ``cuda_graph``: capture the step on
    CUDA. ``compile``: ``torch.compile`` the shape-independent per-layer parts (norms, projections, RoPE, MLP)
    to fuse their element-wise kernels (CUDA only; compiled once per model, before the graph capture).
    ``warmup_steps``: real decode steps run eagerly before capturing (cuBLAS/compile warm-up).
    ``keep_logits``: keep the last step's logits ``[B, V]`` in ``FastDecoder.logits`` (float32; for checks).
    ``stop_check``: every this many new tokens, look whether every row has produced an end-of-sequence token
    and stop decoding if so, which is ``generate``'s stopping rule (0 = never look, always decode all
    ``max_new_tokens``). Answers often end long before ``max_new_tokens``; the steps after that are wasted.
    The check reads the tokens already written by the (captured) step, one small device-to-host copy per
    check rather than per step, so the CUDA graph is replayed unchanged. The returned tokens are the same for
    every value.
    """

    attention: str = "auto"
    block: int = 256
    cuda_graph: bool = True
    compile: bool = False
    warmup_steps: int = 2
    keep_logits: bool = False
    stop_check: int = 16

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise FastDecodeError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.block < 1 or self.warmup_steps < 1:
            raise FastDecodeError("block and warmup_steps must be >= 1")
        if self.stop_check < 0:
            raise FastDecodeError(f"stop_check must be >= 0 (0 = never stop early), got {self.stop_check}")


# ------------------------------------------------------------------------------------------------ model checks
def check_model(model: nn.Module) -> None:
    """Raise :class:`FastDecodeError` unless the model's decoder layer is the one the fast step implements."""
    cfg = model.config.get_text_config(decoder=True)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED:
        raise FastDecodeError(
            f"the fast decode path supports model families {sorted(SUPPORTED)}, not {mtype!r}; "
            "decode without fast=True/--fast")
    if getattr(cfg, "hidden_act", None) != "silu":
        raise FastDecodeError(f"fast decoding needs a SiLU-gated MLP, the model uses {cfg.hidden_act!r}")
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())) or getattr(
            cfg, "use_sliding_window", False):
        raise FastDecodeError("sliding-window attention layers are not supported by the fast decode path")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        raise FastDecodeError("dynamic/longrope RoPE changes its frequencies with the length: not fixed-shape")
    try:
        layers = decoder_layers(model)
    except ValueError:
        layers = None
    if layers is None or not hasattr(model, "lm_head"):
        raise FastDecodeError(f"{type(model).__name__}: expected a causal LM with decoder layers and .lm_head")
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        lins = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj, model.lm_head)
        if any(type(x) is not nn.Linear for x in lins):
            raise FastDecodeError("fast decoding needs plain nn.Linear projections (no quantised/adapted layers)")
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ != SUPPORTED[mtype]:
                raise FastDecodeError(f"unexpected norm {type(norm).__name__} in a {mtype} model")


def check_greedy(model: nn.Module, kwargs: dict) -> int:
    """Validate ``generate``-style kwargs for the fast path; return ``max_new_tokens``.

    Anything that would change greedy decoding (sampling, beams, penalties, forced/suppressed tokens, a minimum
    length) raises: the fast path never silently computes something other than ``model.generate`` would.
    """
    gc = model.generation_config
    allowed = {"max_new_tokens", "do_sample", "attention_mask", "pad_token_id", "eos_token_id", "num_beams",
               "temperature", "top_p", "top_k", "use_cache"}
    extra = sorted(set(kwargs) - allowed)
    if extra:
        raise FastDecodeError(f"generation options not supported by the fast decode path: {extra}")
    if kwargs.get("do_sample", gc.do_sample):
        raise FastDecodeError("the fast decode path is greedy only: sampling (do_sample=True) is not supported")
    if kwargs.get("num_beams", gc.num_beams or 1) != 1:
        raise FastDecodeError("the fast decode path does not support beam search")
    changes = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "min_new_tokens": None, "sequence_bias": None}
    for name, neutral in changes.items():
        value = getattr(gc, name, neutral)
        if value not in (neutral, None) and not (name == "no_repeat_ngram_size" and value == 0):
            raise FastDecodeError(f"generation_config.{name}={value!r} changes greedy decoding; not supported")
    if (gc.min_length or 0) > 0:
        raise FastDecodeError("generation_config.min_length is not supported by the fast decode path")
    n = kwargs.get("max_new_tokens", gc.max_new_tokens)
    if n is None or n < 1:
        raise FastDecodeError("the fast decode path needs max_new_tokens >= 1")
    return int(n)


# ------------------------------------------------------------------------------------------------ the cache
def _layer_rows(layer, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(keys, values, valid) of one cache layer: ``valid`` [B, KVH, K] marks the physical slots that attention
    may see (None: all of them). Invalid are a ragged layer's filler slots and, with ``attention_mask`` [B, T]
    of a left-padded batch, the padding of unpruned layers and tails."""
    from depthkv.engine.cache import PrunedLayer

    keys, values = layer.keys, layer.values
    b, kvh, k = keys.shape[:3]
    valid = getattr(layer, "valid", None)
    if attention_mask is None and valid is None:
        return keys, values, None
    pruned = isinstance(layer, PrunedLayer)
    n_prefix = layer.n_prefix if pruned else 0
    start = layer.prefix_end if pruned else 0  # logical position of the first unpruned physical slot
    prefix = valid if valid is not None else torch.ones(b, kvh, n_prefix, dtype=torch.bool, device=keys.device)
    if attention_mask is None:
        rest = torch.ones(b, kvh, k - n_prefix, dtype=torch.bool, device=keys.device)
    else:  # kept prefixes never hold padding; unpruned slots are padding where the mask says so
        rest = attention_mask[:, start:start + k - n_prefix].to(device=keys.device, dtype=torch.bool)
        rest = rest[:, None, :].expand(b, kvh, -1)
    return keys, values, torch.cat([prefix.to(keys.device), rest], dim=-1)


class StaticPrunedCache:
    """Per-layer K/V buffers ``[B, KVH, cap_l, D]`` filled from (pruned) dynamic caches, each row and KV head
    with its own length.

    Every (sequence, KV head) of layer l keeps ``kept[l, b, h]`` tokens, stored as the prefix of its buffer row
    (the order of kept keys does not matter to attention: their RoPE rotation is already applied); decode
    step ``s`` writes slot ``kept[l, b, h] + s`` and attention reads slots ``[0, kept + s]``. So one fixed-shape
    buffer serves equal budgets, per-KV-head budgets (ragged layers), the rows of a left-padded batch (whose
    padding is dropped here) and a stack of independently pruned caches of one prompt (``from_caches``). The
    buffer of layer l holds ``max(kept[l]) + horizon`` slots, its storage rounded up to a multiple of ``block``.
    """

    def __init__(self, cache, horizon: int, block: int = 256, consume: bool = True,
                 attention_mask: torch.Tensor | None = None):
        self._build([cache], horizon, block, consume, attention_mask)

    @classmethod
    def from_caches(cls, caches, horizon: int, block: int = 256, consume: bool = True) -> StaticPrunedCache:
        """One batch row per cache, each pruned its own way (e.g. every method of an evaluation), decoded
        together; the caches may hold different prompts (each row continues at its own logical length)."""
        obj = cls.__new__(cls)
        obj._build(list(caches), horizon, block, consume, None)
        return obj

    def _build(self, caches: list, horizon: int, block: int, consume: bool,
               attention_mask: torch.Tensor | None) -> None:
        if horizon < 0:
            raise FastDecodeError(f"horizon must be >= 0, got {horizon}")
        if not caches:
            raise FastDecodeError("no cache to decode from")
        n_layers = {len(c.layers) for c in caches}
        if len(n_layers) != 1:
            raise FastDecodeError(f"the caches have different numbers of layers: {sorted(n_layers)}")
        for c in caches:
            if not c.layers or not all(getattr(x, "is_initialized", False) for x in c.layers):
                raise FastDecodeError("the cache holds no context: prefill first")
        lengths = []  # each cache's logical length: the tokens of its prompt it covers
        for c in caches:
            logical = {x.get_seq_length() for x in c.layers}
            if len(logical) != 1:
                raise FastDecodeError(f"layers disagree on the logical length: {sorted(logical)}")
            lengths.append(logical.pop())
        self.logical_len = max(lengths)
        self.horizon, self.block = int(horizon), int(block)
        ref = caches[0].layers[0].keys
        self.dtype, self.device = ref.dtype, ref.device
        rows = [c.layers[0].keys.shape[0] for c in caches]
        batch, kvh, d = sum(rows), ref.shape[1], ref.shape[-1]
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            n_pad = (attention_mask[:, :self.logical_len] == 0).sum(-1)
        else:
            n_pad = torch.zeros(batch, dtype=torch.long, device=self.device)
        per_row = torch.tensor([n for n, r in zip(lengths, rows) for _ in range(r)], device=self.device)
        self.start_positions = per_row - n_pad  # RoPE position of each row's next token
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._kstore: list[torch.Tensor] = []
        self._vstore: list[torch.Tensor] = []
        kept = []
        for i in range(next(iter(n_layers))):
            parts = [_layer_rows(c.layers[i], attention_mask) for c in caches]
            counts = torch.cat([torch.full((r, kvh), x[0].shape[2], dtype=torch.long, device=self.device)
                                if x[2] is None else x[2].sum(-1) for x, r in zip(parts, rows)])
            longest = int(counts.max())
            cap = longest + self.horizon
            padded = max(self.block, math.ceil(cap / self.block) * self.block)
            ks = torch.zeros(batch, kvh, padded, d, dtype=self.dtype, device=self.device)
            vs = torch.zeros_like(ks)
            row = 0
            for c, (k, v, valid), r in zip(caches, parts, rows):
                if valid is None:
                    ks[row:row + r, :, :k.shape[2]].copy_(k)
                    vs[row:row + r, :, :k.shape[2]].copy_(v)
                else:  # valid slots first (stable: sequence order kept), the rest zeroed and never read
                    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices
                    n = min(int(valid.sum(-1).max()), k.shape[2])
                    order = order[..., :n, None].expand(-1, -1, -1, d)
                    keep = valid.gather(-1, order[..., 0])[..., None]
                    ks[row:row + r, :, :n].copy_(k.gather(2, order).masked_fill(~keep, 0))
                    vs[row:row + r, :, :n].copy_(v.gather(2, order).masked_fill(~keep, 0))
                if consume:  # free the dynamic layer now: the peak stays near one copy of the cache
                    c.layers[i].keys = c.layers[i].values = torch.empty(0, dtype=self.dtype, device=self.device)
                row += r
            self._kstore.append(ks)
            self._vstore.append(vs)
            self.keys.append(ks[:, :, :cap])
            self.values.append(vs[:, :, :cap])
            kept.append(counts)
        self.kept = torch.stack(kept)  # [L, B, KVH]: tokens each row and KV head of each layer holds
        self.lengths = [int(x.max()) for x in kept]  # the longest row/head per layer (B_l for equal budgets)
        self.step = torch.zeros(1, dtype=torch.long, device=self.device)  # tokens written so far (on device)
        self._slots = torch.arange(max(x.shape[2] for x in self._kstore), device=self.device)

    @property
    def n_layers(self) -> int:
        return len(self.lengths)

    @property
    def batch(self) -> int:
        return self._kstore[0].shape[0]

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kstore + self._vstore)

    def kept_bytes(self) -> int:
        """Bytes of the K/V pairs attention reads now: every row's and head's kept tokens plus those decoded."""
        per = self._kstore[0].shape[-1] * self._kstore[0].element_size() * 2
        return int((self.kept + self.step).sum()) * per

    def buffers(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``idx``'s whole key and value buffers ``[B, KVH, padded, D]``, what the attention kernels read
        (slots past each row's and head's write position are never read or are masked)."""
        return self._kstore[idx], self._vstore[idx]

    def open_slots(self) -> torch.Tensor:
        """This step's write position ``[L, B, KVH]`` of every layer, row and KV head (in-graph safe); attention
        of layer l reads the slots ``[0, pos[l]]``."""
        return self.kept + self.step

    def visible(self, idx: int) -> torch.Tensor:
        """Slots attention of layer ``idx`` sees before this step's token is written, ``[B, KVH]``."""
        return self.kept[idx] + self.step

    def mask(self, idx: int, pos: torch.Tensor) -> torch.Tensor:
        """Additive mask ``[B, KVH, 1, padded]`` of layer ``idx``: 0 on slots ``[0, pos]``, -inf elsewhere."""
        slots = self._slots[: self._kstore[idx].shape[2]]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(slots <= pos[..., None], zero, float("-inf"))[:, :, None, :]

    def write(self, idx: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new token's key/value ``[B, KVH, 1, D]`` of layer ``idx`` at each row's and head's slot
        ``pos`` ``[B, KVH]``."""
        where = pos[..., None, None].expand(-1, -1, 1, k.shape[-1])
        self._kstore[idx].scatter_(2, where, k)
        self._vstore[idx].scatter_(2, where, v)


def logical_context(cache) -> int:
    return cache.layers[0].get_seq_length()


# ------------------------------------------------------------------------------------------------ step math
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama/Qwen2 RMSNorm: normalise in fp32, cast back, scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def qkv_rope(h, ln_w, eps, wq, bq, wk, bk, wv, bv, cos, sin, n_kv: int, head_dim: int):
    """Pre-attention half of a layer for one token: norm, projections, RoPE.

    Returns the query grouped by KV head ``[B, KVH, G, D]`` (query head = kv_head * G + g, as HF's repeat_kv)
    and the new key/value ``[B, KVH, 1, D]``.
    """
    b = h.shape[0]
    x = rms_norm(h, ln_w, eps)
    q = F.linear(x, wq, bq).view(b, -1, head_dim)  # [B, H, D]
    k = F.linear(x, wk, bk).view(b, n_kv, head_dim)
    v = F.linear(x, wv, bv).view(b, n_kv, 1, head_dim)
    q = q * cos + rotate_half(q) * sin  # cos/sin [B, 1, D]
    k = k * cos + rotate_half(k) * sin
    return q.view(b, n_kv, -1, head_dim), k.unsqueeze(2), v


def out_mlp(h, attn, wo, bo, ln_w, eps, wg, bg, wu, bu, wd, bd):
    """Post-attention half of a layer: output projection, residual, norm, SiLU-gated MLP, residual."""
    h = h + F.linear(attn.reshape(h.shape[0], h.shape[1], -1), wo, bo)
    x = rms_norm(h, ln_w, eps)
    return h + F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def attend_split(q, k, v, mask, pos, scale: float, block: int) -> torch.Tensor:
    """One query token (grouped ``[B, KVH, G, D]``) over a whole buffer ``[B, KVH, C, D]`` with additive ``mask``
    ``[B, KVH, 1, C]``.

    Scores by one batched matmul, softmax in fp32 (as HF's eager attention), then P·V as ``C / block``
    independent chunk products summed in fp32, so that the reduction over the cache is spread over many blocks.
    """
    b, kvh, g, d = q.shape
    c = k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale + mask.float()
    p = torch.softmax(s, dim=-1).to(v.dtype)
    chunks = c // block
    o = torch.matmul(p.view(b, kvh, g, chunks, block).transpose(2, 3), v.view(b, kvh, chunks, block, d))
    return o.sum(2, dtype=torch.float32).to(q.dtype)


def attend_sdpa(q, k, v, mask, pos, scale: float, block: int) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attend_triton(q, k, v, mask, pos, scale: float, block: int) -> torch.Tensor:
    """Split-KV Triton kernel over each row's and head's valid prefix ``[0, pos]`` (no mask needed), with the
    kernel's default :class:`~depthkv.engine.decode_kernel.KernelConfig` (tiling and number of splits)."""
    from depthkv.engine.decode_kernel import decode_attention

    return decode_attention(q, k, v, pos, scale)


def resolve_attention(name: str, device: torch.device) -> str:
    from depthkv.engine import decode_kernel

    if name == "auto":
        return "triton" if device.type == "cuda" and decode_kernel.available() else "split"
    if name == "triton" and (device.type != "cuda" or not decode_kernel.available()):
        raise FastDecodeError("attention='triton' needs CUDA and the triton package")
    return name


# ------------------------------------------------------------------------------------------------ the decoder
def _w(lin: nn.Linear):
    return lin.weight, lin.bias


class FastDecoder:
    """Greedy decoding over a :class:`StaticPrunedCache` with a fixed-shape step (a CUDA graph on CUDA)."""

    def __init__(self, model: nn.Module, cache: StaticPrunedCache, config: FastConfig | None = None):
        check_model(model)
        self.config = config or FastConfig()
        self.model, self.cache = model, cache
        cfg = model.config.get_text_config(decoder=True)
        inner = decoder_body(model)
        self.embed, self.norm, self.rotary, self.lm_head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        a0 = inner.layers[0].self_attn
        self.head_dim = a0.head_dim
        self.n_kv = cfg.num_key_value_heads
        self.scale = float(a0.scaling)
        if len(inner.layers) != cache.n_layers:
            raise FastDecodeError(f"cache has {cache.n_layers} layers, the model {len(inner.layers)}")
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                 *_w(a.q_proj), *_w(a.k_proj), *_w(a.v_proj)),
                (*_w(a.o_proj), layer.post_attention_layernorm.weight,
                 layer.post_attention_layernorm.variance_epsilon, *_w(m.gate_proj), *_w(m.up_proj), *_w(m.down_proj)),
            ))
        dev = cache.device
        self.cuda = dev.type == "cuda"
        b = cache.keys[0].shape[0]
        self.token = torch.zeros(b, 1, dtype=torch.long, device=dev)  # the token fed at the next step
        self.position = cache.start_positions[:, None].clone()  # each row's RoPE position (padding excluded)
        self.out = torch.zeros(b, max(1, cache.horizon), dtype=torch.long, device=dev)  # argmax after each step
        self.logits = (torch.zeros(b, model.config.get_text_config(decoder=True).vocab_size, device=dev)
                       if self.config.keep_logits else None)
        self._pre, self._post = qkv_rope, out_mlp
        if self.config.compile:
            if not self.cuda:
                raise FastDecodeError("compile=True is for CUDA (CPU runs the plain eager step)")
            self._pre = torch.compile(qkv_rope, fullgraph=True, dynamic=False)
            self._post = torch.compile(out_mlp, fullgraph=True, dynamic=False)
        self.attention = resolve_attention(self.config.attention, dev)
        # the attention kernel of one layer: attend(q, k_buffer, v_buffer, mask, pos, scale, block) -> output
        self.attend = {"split": attend_split, "sdpa": attend_sdpa, "triton": attend_triton}[self.attention]
        self.masked = self.attention != "triton"  # the Triton kernel reads the valid lengths, not a mask
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps_done = 0

    @torch.no_grad()
    def step(self) -> None:
        """One greedy step on device state: feed ``token`` at ``position``, write the argmax to ``out``/``token``."""
        c = self.cache
        h = self.embed(self.token)  # [B, 1, H]
        cos, sin = self.rotary(h, self.position)
        pos = c.open_slots()
        for i, (pre, post) in enumerate(self.layers):
            q, k, v = self._pre(h, *pre, cos, sin, self.n_kv, self.head_dim)
            p = pos[i]
            c.write(i, p, k, v)
            o = self.attend(q, *c.buffers(i), c.mask(i, p) if self.masked else None, p, self.scale, c.block)
            h = self._post(h, o, *post)
        logits = self.lm_head(self.norm(h))  # [B, 1, V]
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        if self.logits is not None:
            self.logits.copy_(logits[:, -1])
        self.out.index_copy_(1, c.step, nxt)
        self.token.copy_(nxt)
        self.position.add_(1)
        c.step.add_(1)

    def capture(self) -> None:
        """Record one step as a CUDA graph (after warm-up steps); later steps replay it."""
        self.graph = torch.cuda.CUDAGraph()
        # a capture stream of the cache's device: torch's shared default one belongs to whichever device was
        # current when the first graph of the process was captured (capturing on it records nothing)
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device=self.cache.device)):
            self.step()

    @torch.no_grad()
    def run(self, feed: torch.Tensor, n_new: int, eos: Sequence[int] = (),
            ended: torch.Tensor | None = None, feed_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``feed`` ([B, k] tokens not yet in the cache) then decode greedily; return the new tokens.

        The first new token is the argmax after the last fed token. Needs ``horizon >= k + n_new - 1``.
        ``feed_lengths`` ([B], 1..k): row b feeds only ``feed[b, :feed_lengths[b]]`` (right padding ignored) and
        starts generating after it, so rows of different prompts (a question each) decode together; every row
        still gets its own ``n_new`` tokens, aligned from column 0 of the result.
        Without ``eos`` (or with ``config.stop_check == 0``) all ``n_new`` tokens are decoded. With ``eos``
        (end-of-sequence ids) decoding stops, as ``generate`` does, once every row has produced one of them:
        every ``config.stop_check`` new tokens the written tokens are checked, so the result may hold fewer
        than ``n_new`` columns, each row's first EOS among them (rows that ended earlier keep decoding until
        the check; their tokens after the EOS are the caller's to discard). ``ended`` ([B] bool) marks rows
        that already ended before these tokens (e.g. on a first token taken from prefill logits): those
        count as finished, and if all have, no step is run. ``steps_done`` counts the steps actually run.
        """
        b, k = feed.shape
        total = k + n_new - 1
        if total > self.cache.horizon - self.steps_done:
            raise FastDecodeError(f"{total} decode steps requested, buffers hold {self.cache.horizon - self.steps_done}")
        dev = self.out.device
        feed = feed.to(self.token.device)
        start = self.steps_done
        if feed_lengths is None:
            lens = None
            firsts = torch.full((b,), start + k - 1, dtype=torch.long, device=dev)
        else:
            lens = feed_lengths.to(device=dev, dtype=torch.long).reshape(-1)
            if lens.shape[0] != b or bool((lens < 1).any()) or bool((lens > k).any()):
                raise FastDecodeError(f"feed_lengths must hold {b} lengths in [1, {k}]")
            firsts = start + lens - 1  # the slot of ``out`` holding each row's first new token
        lo = int(firsts.min())
        every = self.config.stop_check if len(eos) else 0
        if every:
            stop_ids = torch.tensor(list(eos), dtype=torch.long, device=dev)
            done = torch.zeros(b, dtype=torch.bool, device=dev)
            if ended is not None:
                done |= ended.to(device=dev, dtype=torch.bool).reshape(-1)
            checked = lo  # tokens of ``out`` before this slot have been folded into ``done``
        for i in range(total):
            produced = i - k + 1  # new tokens written so far by the row with the longest feed
            if every and produced >= 0 and produced % every == 0 and (produced or ended is not None):
                slots = torch.arange(checked, start + i, device=dev)
                fresh = torch.isin(self.out[:, checked:start + i], stop_ids) & (slots[None, :] >= firsts[:, None])
                done |= fresh.any(1)
                checked = start + i
                if bool(done.all()):  # the one device-to-host sync of a check
                    return self._aligned(firsts, start + i - lo, start + i)
            if i < k:
                if lens is None:
                    self.token.copy_(feed[:, i:i + 1])
                else:  # a row past its own feed keeps the token it generated
                    self.token.copy_(torch.where((lens > i)[:, None], feed[:, i:i + 1], self.token))
            self._one()
        return self._aligned(firsts, n_new, start + total)

    def _aligned(self, firsts: torch.Tensor, width: int, end: int) -> torch.Tensor:
        """Each row's tokens from its first new one, ``width`` columns, [B, width]; slots at or past ``end`` (not
        written yet, only ever after a row's EOS) repeat the last written one."""
        cols = (firsts[:, None] + torch.arange(width, device=firsts.device)).clamp(max=max(end - 1, 0))
        return self.out.gather(1, cols)

    def _one(self) -> None:
        if self.cuda:  # kernels, streams and the graph belong to the cache's device, not the current one
            with torch.cuda.device(self.cache.device):
                self._step_once()
        else:
            self._step_once()

    def _step_once(self) -> None:
        use_graph = self.cuda and self.config.cuda_graph
        if use_graph and self.graph is None and self.steps_done >= self.config.warmup_steps:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
        elif use_graph:  # warm-up steps run eagerly on a side stream, as graph capture requires
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self.step()
            torch.cuda.current_stream().wait_stream(s)
        else:
            self.step()
        self.steps_done += 1


# ------------------------------------------------------------------------------------------------ generate
def _finish(new: torch.Tensor, eos: list[int], pad: int | None) -> torch.Tensor:
    """Cut greedy output as ``generate`` does: rows stop after their EOS (then pad); stop when all have."""
    if not eos:
        return new
    is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
    done_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after a row's first EOS
    if pad is None:
        pad = eos[0]
    new = new.masked_fill(done_before, pad)
    finished = is_eos.any(1)
    if bool(finished.all()):
        last = int(is_eos.long().argmax(1).max())  # every row's first EOS index; keep up to the latest
        new = new[:, : last + 1]
    return new


def eos_ids(model: nn.Module, kwargs: dict) -> list[int]:
    """The end-of-sequence ids greedy decoding stops at: ``kwargs["eos_token_id"]`` or the model's own."""
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def answers_until_eos(out: torch.Tensor, prompt_len: int, eos: list[int]) -> list[list[int]]:
    """Each row's new tokens (after ``prompt_len``) up to and including its first end-of-sequence token, where
    ``generate`` stops that row; the padding after it is dropped."""
    stop = set(eos)
    answers = []
    for row in out[:, prompt_len:].tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        answers.append(row[:n])
    return answers


def _decode(model: nn.Module, build, done: int, input_ids: torch.Tensor, n_new: int, logits, config, kwargs,
            feed_lengths: torch.Tensor | None = None):
    """Feed ``input_ids[:, done:]`` (row b only its first ``feed_lengths[b]`` tokens, when given) then decode
    ``n_new`` greedy tokens over the buffers ``build(horizon)``, stopping once every row has ended (see
    ``FastConfig.stop_check``); cut as ``generate`` would."""
    feed = input_ids[:, done:]
    if feed.shape[1] == 0:
        if logits is None:
            raise FastDecodeError("the cache covers all of input_ids: pass the last position's logits")
        first = logits[:, -1].argmax(-1, keepdim=True).to(input_ids.device).expand(input_ids.shape[0], 1)
        new_first = first
        feed_dec, n_dec = first, n_new - 1
    else:
        new_first = None
        feed_dec, n_dec = feed, n_new
    horizon = feed_dec.shape[1] + n_dec - 1 if n_dec > 0 else 0
    static = build(horizon)
    parts = [] if new_first is None else [new_first]
    eos = eos_ids(model, kwargs)
    if n_dec > 0:
        dec = FastDecoder(model, static, config)
        ended = None if new_first is None or not eos else torch.isin(new_first[:, 0], torch.tensor(
            eos, device=new_first.device))
        parts.append(dec.run(feed_dec, n_dec, eos=eos, ended=ended, feed_lengths=feed_lengths).to(input_ids.device))
    new = torch.cat(parts, dim=1)
    pad = kwargs.get("pad_token_id", model.generation_config.pad_token_id)
    new = _finish(new, eos, pad)
    return torch.cat([input_ids, new], dim=1)


@torch.no_grad()
def fast_generate(model: nn.Module, cache, input_ids: torch.Tensor, max_new_tokens: int | None = None, *,
                  logits: torch.Tensor | None = None, config: FastConfig | None = None, **generate_kwargs):
    """Greedy ``generate`` from a (pruned) cache with fixed-shape buffers; same tokens as the dynamic path.

    Like :func:`depthkv.engine.runner.generate_from_cache`: ``input_ids`` is the whole sequence, the cache
    holds its first ``cache.get_seq_length()`` tokens, the rest are fed one by one. If the cache already covers
    all of ``input_ids``, pass the last position's ``logits`` (e.g. ``Compressed.logits``). The cache is
    consumed (its tensors are released after the copy). Returns ``input_ids`` followed by the new tokens.
    A left-padded batch passes its ``attention_mask``: padding is dropped from the buffers, each row continues
    at its own RoPE position, and rows stop at their own EOS as ``generate``'s do.
    """
    check_model(model)
    if max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = max_new_tokens
    n_new = check_greedy(model, generate_kwargs)
    if input_ids.ndim != 2:
        raise FastDecodeError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
    done = logical_context(cache)
    mask = generate_kwargs.get("attention_mask")
    if mask is not None:
        if mask.shape != input_ids.shape:
            raise FastDecodeError(f"attention_mask {tuple(mask.shape)} does not match input_ids "
                                  f"{tuple(input_ids.shape)}")
        if not bool(mask[:, done:].all()):
            raise FastDecodeError("the fast decode path needs left padding inside the cached prompt (the tokens "
                                  "still to feed must all be real)")
        if bool(mask.all()):
            mask = None
    block = (config or FastConfig()).block
    return _decode(model, lambda horizon: StaticPrunedCache(cache, horizon, block=block, attention_mask=mask),
                   done, input_ids, n_new, logits, config, generate_kwargs)


@torch.no_grad()
def fast_generate_caches(model: nn.Module, caches, input_ids: torch.Tensor, max_new_tokens: int | None = None, *,
                         logits: torch.Tensor | None = None, config: FastConfig | None = None, **generate_kwargs):
    """:func:`fast_generate` for several caches of ONE prompt (``input_ids`` ``[1, T]``), each pruned its own way
    (different budgets, scorers, ratios), decoded together as one batch: returns ``[len(caches), T + new]``.

    Each row's tokens are those of decoding its cache alone, up to floating-point reduction order (batched
    matrix products may sum in another order). The caches are consumed.
    """
    check_model(model)
    caches = list(caches)
    if max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = max_new_tokens
    n_new = check_greedy(model, generate_kwargs)
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise FastDecodeError(f"input_ids must be one prompt [1, tokens], got {tuple(input_ids.shape)}")
    if not caches:
        raise FastDecodeError("no cache to decode from")
    if logits is not None and logits.shape[0] == 1:
        logits = logits.expand(len(caches), *logits.shape[1:])
    block = (config or FastConfig()).block
    lengths = {logical_context(c) for c in caches}
    if len(lengths) != 1:
        raise FastDecodeError(f"the caches cover different logical lengths {sorted(lengths)}: these are caches of "
                              "ONE prompt (several prompts: fast_generate_rows)")
    done = lengths.pop()
    ids = input_ids.expand(len(caches), -1)
    return _decode(model, lambda horizon: StaticPrunedCache.from_caches(caches, horizon, block=block),
                   done, ids, n_new, logits, config, generate_kwargs)


@torch.no_grad()
def fast_generate_rows(model: nn.Module, caches, feeds: Sequence[torch.Tensor], max_new_tokens: int | None = None, *,
                       config: FastConfig | None = None, **generate_kwargs) -> torch.Tensor:
    """Greedy answers of several prompts decoded as one batch: cache ``i`` holds the start of prompt ``i`` and
    ``feeds[i]`` (``[1, k_i]``, ``k_i >= 1``) the rest of it (its last token, or a question asked after the
    context was compressed). Returns the new tokens ``[B, n]``, each row cut after its first end-of-sequence
    token (then padding) as ``generate`` does; the caches are consumed.

    Each row's tokens are those of :func:`fast_generate` on its own cache and prompt, up to floating-point
    reduction order (batched matrix products may sum in another order). ``depthkv eval`` decodes the cells of
    consecutive samples together this way, so few cells per sample still fill a batch.
    """
    check_model(model)
    caches = list(caches)
    if max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = max_new_tokens
    n_new = check_greedy(model, generate_kwargs)
    if not caches:
        raise FastDecodeError("no cache to decode from")
    rows = [c.layers[0].keys.shape[0] for c in caches]
    if len(feeds) != len(caches) or any(f.ndim != 2 or f.shape[0] != r or f.shape[1] < 1
                                        for f, r in zip(feeds, rows)):
        raise FastDecodeError(f"feeds must be one [rows, k >= 1] tensor per cache ({len(caches)} caches), got "
                              f"{[tuple(f.shape) for f in feeds]}")
    k = max(int(f.shape[1]) for f in feeds)
    feed = torch.cat([torch.nn.functional.pad(f, (0, k - f.shape[1])) for f in feeds])
    lengths = torch.tensor([int(f.shape[1]) for f, r in zip(feeds, rows) for _ in range(r)])
    block = (config or FastConfig()).block
    out = _decode(model, lambda horizon: StaticPrunedCache.from_caches(caches, horizon, block=block), 0, feed,
                  n_new, None, config, generate_kwargs, None if bool((lengths == k).all()) else lengths)
    return out[:, k:]


__all__ = ["FastConfig", "FastDecodeError", "FastDecoder", "StaticPrunedCache", "answers_until_eos", "check_greedy",
           "check_model", "eos_ids", "fast_generate", "fast_generate_caches", "fast_generate_rows"]
