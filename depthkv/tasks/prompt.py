"""Turn a :class:`Sample` into token ids split into a compressible context part and a question part.

Layout.  With a chat template: one user message (no system message is passed; a template may still add
its default one) whose content is ``context + "\\n\\n" + question``, rendered with
``add_generation_prompt=True``.  Without a chat template::

    Context:
    <context>

    Question: <question>
    Answer:

(with the tokenizer's own leading special tokens such as BOS, and no trailing ones such as EOS).

Split.  ``question_in_prefill=False`` (query-agnostic): ``context_ids`` covers the prompt up to and
including the context (and the blank line after it), ``question_ids`` the question and everything after
it (end of turn, generation prompt): the context can be prefilled and compressed without knowing the
question, which is appended afterwards.  ``question_in_prefill=True`` (query-aware, the default): the split
moves to just after the question, so the prefill that is compressed has seen the question and
``question_ids`` holds only the end of turn and the generation prompt.

How the split is made exact.  The full prompt string is tokenised once (``full``).  The prefix string
(everything before the split character offset) is tokenised separately (``pre``); the split is the
longest common prefix of ``pre`` and ``full``.  So ``context_ids + question_ids == full`` always holds, and
``context_ids`` never contains a token that spans the split (a merge across the boundary, e.g. of
``"\\n\\n"`` with the next word, goes to ``question_ids``).  ``full`` is what
``apply_chat_template(..., tokenize=True)`` would give: the rendered string tokenised without extra
special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthkv.tasks.sample import Sample

__all__ = ["build_prompt", "prompt_text", "PromptText", "token_counter"]

PLAIN_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class PromptText:
    """The rendered prompt and the character offsets of the two possible split points."""

    text: str
    context_end: int  # query-agnostic split: question starts here
    question_end: int  # query-aware split: end of the question text
    chat: bool


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer, sample: Sample) -> PromptText:
    """Render the prompt string and find where the question starts and ends in it."""
    question = sample.question.strip()
    if _has_chat_template(tokenizer):
        content = f"{sample.context}\n\n{question}"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise TypeError("apply_chat_template(tokenize=False) did not return a string")
        # the question closes the user message; templates may trim the content, so search from the end
        start = text.rfind(question)
        if start < 0 or text.find(sample.context.strip()[:200]) < 0:
            raise ValueError("the chat template does not reproduce the message content verbatim")
        return PromptText(text, start, start + len(question), True)
    text = PLAIN_TEMPLATE.format(context=sample.context, question=question)
    start = text.rfind("Question: " + question) + len("Question: ")
    return PromptText(text, start - len("Question: "), start + len(question), False)


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def _special_prefix(tokenizer) -> list[int]:
    """Leading special tokens the tokenizer adds by itself (e.g. BOS), found by encoding a probe."""
    probe = "Context"
    plain = _encode(tokenizer, probe)
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def build_prompt(
    tokenizer, sample: Sample, *, question_in_prefill: bool = True
) -> tuple[list[int], list[int]]:
    """``(context_ids, question_ids)`` for ``sample``; their concatenation is the full prompt's tokens.

    See the module docstring for the layout and how the split stays exact.
    """
    pt = prompt_text(tokenizer, sample)
    split_at = pt.question_end if question_in_prefill else pt.context_end
    lead = [] if pt.chat else _special_prefix(tokenizer)
    full = lead + _encode(tokenizer, pt.text)
    pre = lead + _encode(tokenizer, pt.text[:split_at])
    k = 0
    limit = min(len(pre), len(full))
    while k < limit and pre[k] == full[k]:
        k += 1
    if k == len(full):  # never leave nothing to append: the last token goes to the question part
        k -= 1
    return full[:k], full[k:]


def token_counter(tokenizer):
    """``str -> int`` counting a tokenizer's tokens (no special tokens): the ``count_tokens`` of generate."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
