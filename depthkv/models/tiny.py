"""Tiny random-initialised causal LMs for fast, deterministic tests.

hidden 64, 4 query heads, 2 KV heads (GQA), head_dim 16, vocab 512, 4096
positions; ``qwen2`` has biases on q/k/v like the real Qwen2 (filled with small random
values, since transformers initialises them to zero).  Built from a
config (no download), with a private RNG so the global torch seed is untouched.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .layers import decoder_layers

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_config(arch: Literal["llama", "qwen2"] = "llama", *, n_layers: int = 4, **overrides: Any) -> Any:
    """The config :func:`tiny_model` builds from; ``overrides`` replace any field."""
    from transformers import LlamaConfig, Qwen2Config

    fields = {**TINY_DEFAULTS, "num_hidden_layers": n_layers, **overrides}
    if arch == "llama":
        return LlamaConfig(**fields)
    if arch == "qwen2":
        return Qwen2Config(**fields)  # Qwen2 attention always has q/k/v bias
    raise ValueError(f"tiny_model arch must be 'llama' or 'qwen2', not {arch!r}")


def tiny_model(
    arch: Literal["llama", "qwen2"] = "llama",
    *,
    n_layers: int = 4,
    seed: int = 0,
    attn_implementation: Literal["eager", "sdpa"] = "eager",
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Any:
    """A random-initialised tiny causal LM in eval mode, identical for identical arguments."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, n_layers=n_layers, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        with torch.no_grad():
            for layer in decoder_layers(model):
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    if proj.bias is not None:
                        proj.bias.normal_(0.0, config.initializer_range)
    return model.eval()
