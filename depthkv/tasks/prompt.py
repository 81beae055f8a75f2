"""Prompt construction, in one place: a context and a question as token ids split into a compressible
context part and a question part (:func:`split_prompt`, :func:`build_prompt` for a :class:`Sample`), and a
plain user text as one chat turn (:func:`encode_prompt`, the prompt of ``depthkv generate``).

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
question, which is appended afterwards (``split_prompt``'s default).  ``question_in_prefill=True``
(query-aware, ``build_prompt``'s default): the split moves to just after the question, so the prefill that
is compressed has seen the question and ``question_ids`` holds only the end of turn and the generation
prompt.

How the split is made exact.  The full prompt string is tokenised once (``full``).  The prefix string
(everything before the split character offset) is tokenised separately (``pre``); the split is the
longest common prefix of ``pre`` and ``full``.  So ``context_ids + question_ids == full`` always holds, and
``context_ids`` never contains a token that spans the split (a merge across the boundary, e.g. of
``"\\n\\n"`` with the next word, goes to ``question_ids``).  ``full`` is what
``apply_chat_template(..., tokenize=True)`` would give: the rendered string tokenised without extra
special tokens.

The same function serves the evaluation's query-agnostic setting and ``depthkv compress`` / ``depthkv ask``:
``compress`` stores :func:`context_prompt_ids` (the context part, computed before any question exists) and
``ask`` checks that :func:`split_prompt` with the real question gives the same context part, so the tokens
prefilled plus the question's tokens are exactly the tokenised full prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthkv.tasks.sample import Sample

__all__ = [
    "PromptText", "build_prompt", "context_prompt_ids", "encode_prompt", "prompt_text", "render_prompt",
    "split_prompt", "token_counter",
]

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


def _user_turn(tokenizer, content: str) -> str:
    """``content`` as one user message through the chat template, with the generation prompt (as a string)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):
        raise TypeError("apply_chat_template(tokenize=False) did not return a string")
    return text


def render_prompt(tokenizer, context: str, question: str) -> PromptText:
    """Render the prompt string for ``context`` and ``question`` and find where the question starts and ends."""
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    if _has_chat_template(tokenizer):
        text = _user_turn(tokenizer, f"{context}\n\n{question}")
        # the question closes the user message; templates may trim the content, so search from the end
        start = text.rfind(question)
        if start < 0 or text.find(context.strip()[:200]) < 0:
            raise ValueError("the chat template does not reproduce the message content verbatim")
        return PromptText(text, start, start + len(question), True)
    text = PLAIN_TEMPLATE.format(context=context, question=question)
    start = text.rfind("Question: " + question) + len("Question: ")
    return PromptText(text, start - len("Question: "), start + len(question), False)


def prompt_text(tokenizer, sample: Sample) -> PromptText:
    """:func:`render_prompt` for a sample."""
    return render_prompt(tokenizer, sample.context, sample.question)


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


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as one user turn: through the chat template (generation prompt added) when the
    tokenizer has one, else the text itself after the tokenizer's leading special tokens (e.g. BOS)."""
    if _has_chat_template(tokenizer):
        return _encode(tokenizer, _user_turn(tokenizer, text))
    return _special_prefix(tokenizer) + _encode(tokenizer, text)


def split_prompt(
    tokenizer, context: str, question: str, *, question_in_prefill: bool = False
) -> tuple[list[int], list[int]]:
    """``(context_ids, question_ids)`` of the prompt for ``context`` and ``question``; their concatenation is
    the tokenised full prompt. Default: query-agnostic split (the question goes to ``question_ids``).

    See the module docstring for the layout and how the split stays exact.
    """
    pt = render_prompt(tokenizer, context, question)
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


def build_prompt(
    tokenizer, sample: Sample, *, question_in_prefill: bool = True
) -> tuple[list[int], list[int]]:
    """:func:`split_prompt` for a sample (query-aware split by default: the question inside the prefill)."""
    return split_prompt(tokenizer, sample.context, sample.question, question_in_prefill=question_in_prefill)


PLACEHOLDER_QUESTION = "What is it?"


def context_prompt_ids(tokenizer, context: str) -> list[int]:
    """The query-agnostic context part for ``context``, before any question is known.

    It is ``split_prompt(tokenizer, context, q)[0]`` for every question ``q`` whose first token does not merge
    with the blank line before it, which holds for tokenizers that split words from whitespace before BPE
    (GPT-2-, Llama-3- and Qwen-style); ``depthkv ask`` checks it for each question.
    """
    return split_prompt(tokenizer, context, PLACEHOLDER_QUESTION)[0]


def token_counter(tokenizer):
    """``str -> int`` counting a tokenizer's tokens (no special tokens): the ``count_tokens`` of generate."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
