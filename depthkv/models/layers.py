"""Where a transformers causal LM keeps its decoder layers: the one lookup every package uses.

A causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) wraps a decoder body (``LlamaModel``) that holds
the embedding, the ``layers`` ModuleList and the final norm; a multimodal model keeps its text decoder as
``language_model``. transformers' ``PreTrainedModel.get_decoder()`` resolves both, so DepthKV asks it instead
of guessing attribute paths, and checks that the body really holds a non-empty ``layers`` list.
"""

from __future__ import annotations

from torch import nn

__all__ = ["decoder_body", "decoder_layers"]


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers and runs them without the LM head (e.g. ``LlamaModel``).

    ``model.get_decoder()`` for a transformers model (the body itself for a body); a plain module counts
    as its own body. Raises ValueError when the body has no non-empty ``layers`` ModuleList.
    """
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else model
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found (expected a transformers causal LM whose "
            "get_decoder() holds a non-empty .layers list)"
        )
    return body


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model``, in order (``decoder_body(model).layers``)."""
    return decoder_body(model).layers
