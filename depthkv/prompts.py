"""The built-in long prompt of ``depthkv generate`` (a passkey hidden in real text).

Every chat-template encoding lives in ``depthkv.tasks.prompt`` (``encode_prompt`` for a user's text,
``split_prompt`` / ``build_prompt`` for a context and a question).
"""

from __future__ import annotations

import torch


def builtin_sample(tokenizer, context_tokens: int = 2048, seed: int = 0):
    """The built-in long prompt: a passkey hidden in real text (Python's own documentation), as a Sample."""
    from depthkv.tasks import generate

    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    return generate("needle", 1, seed, context_tokens=context_tokens, count_tokens=count, split="eval")[0]


def builtin_prompt_ids(
    tokenizer, context_tokens: int = 2048, seed: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, str]:
    """(input ids [1, T] on ``device``, expected answer) of the built-in prompt, question inside the prefill."""
    from depthkv.tasks.prompt import build_prompt

    sample = builtin_sample(tokenizer, context_tokens, seed)
    ctx, question = build_prompt(tokenizer, sample, question_in_prefill=True)
    ids = torch.cat([torch.as_tensor(ctx).reshape(1, -1), torch.as_tensor(question).reshape(1, -1)], dim=1)
    return ids.long().to(device), sample.answer
