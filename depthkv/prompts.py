"""Prompts for ``depthkv generate``: a user's text through the chat template, or the built-in long prompt."""

from __future__ import annotations

import torch


def encode_chat(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, T] of ``text`` as one user turn (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=False, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        return torch.tensor([list(ids)], dtype=torch.long)
    return tokenizer(text, return_tensors="pt").input_ids


def builtin_sample(tokenizer, context_tokens: int = 2048, seed: int = 0):
    """The built-in long prompt: a passkey hidden in real text (Python's own documentation), as a Sample."""
    from depthkv.tasks import generate

    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    return generate("needle", 1, seed, context_tokens=context_tokens, count_tokens=count, split="eval")[0]


def builtin_prompt_ids(tokenizer, context_tokens: int = 2048, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(input ids [1, T], expected answer) of the built-in prompt, question inside the prefill."""
    from depthkv.tasks.prompt import build_prompt

    sample = builtin_sample(tokenizer, context_tokens, seed)
    ctx, question = build_prompt(tokenizer, sample, question_in_prefill=True)
    ids = torch.cat([torch.as_tensor(ctx).reshape(1, -1), torch.as_tensor(question).reshape(1, -1)], dim=1)
    return ids.long(), sample.answer
