"""A stable fingerprint of a model's architecture, to bind profiles to models."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Keys that change with how a model was loaded or saved, not with what it is.
VOLATILE_KEYS = frozenset(
    {
        "torch_dtype", "dtype", "transformers_version", "attn_implementation", "use_cache",
        "output_attentions", "output_hidden_states", "return_dict", "quantization_config",
        "architectures", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
        "torchscript", "use_return_dict", "tie_encoder_decoder", "pruned_heads",
    }
)  # fmt: skip


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def architecture_fields(config: Any) -> dict[str, Any]:
    """The config as a dict without volatile and private (``_``-prefixed) keys."""
    data = config.to_dict()

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                str(k): clean(v)
                for k, v in value.items()
                if not str(k).startswith("_") and k not in VOLATILE_KEYS
            }
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(data)


def config_sha256(config: Any) -> str:
    """sha256 of the sorted JSON of :func:`architecture_fields`."""
    text = json.dumps(architecture_fields(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_identity(model: Any, name: str) -> dict[str, Any]:
    """Name, shape facts and config hash of a causal LM (works on the model or its config)."""
    config = getattr(model, "config", model)
    text = _text_config(config)
    n_heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return {
        "name": name,
        "model_type": getattr(text, "model_type", None) or getattr(config, "model_type", None),
        "n_layers": int(text.num_hidden_layers),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(text, "num_key_value_heads", None) or n_heads),
        "head_dim": int(head_dim),
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
        "config_sha256": config_sha256(config),
    }
