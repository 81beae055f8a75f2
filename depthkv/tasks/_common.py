"""Helpers shared by the generators: seeded streams, ids, token counting, needle insertion."""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from depthkv.tasks.corpus import SPLITS, corpus_id
from depthkv.tasks.sample import Sample

CountFn = Callable[[str], int]


def approx_tokens(text: str) -> int:
    """Default token count when no tokenizer is given: 4 characters per token, rounded up."""
    return math.ceil(len(text) / 4)


def resolve_counter(count_tokens: CountFn | None) -> tuple[CountFn, str]:
    """The counting function and its name for ``meta`` (``"approx4"`` or ``"custom"``)."""
    if count_tokens is None:
        return approx_tokens, "approx4"
    if not callable(count_tokens):
        raise TypeError("count_tokens must be a callable str -> int or None")
    return count_tokens, "custom"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_rng(task: str, split: str, seed: int, index: int) -> random.Random:
    """Independent stream per (task, split, seed, index): sample i does not depend on n or other samples.

    Seeded from SHA-256, so it is stable across processes, machines and Python versions.
    """
    digest = hashlib.sha256(f"depthkv|{task}|{split}|{int(seed)}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_sample(
    *,
    task: str,
    split: str,
    seed: int,
    index: int,
    context: str,
    question: str,
    answer: str,
    metric: str,
    count: CountFn,
    counter_name: str,
    target_tokens: int | None,
    meta: dict[str, Any],
) -> Sample:
    """Build a :class:`Sample` with the common meta fields and a stable id.

    The id is ``task/split/s<seed>/<index>-<hash>``, where the hash covers context, question and answer,
    so two samples with the same id are identical.
    """
    h = hashlib.sha256("\x00".join((context, question, answer)).encode()).hexdigest()[:8]
    common = {
        "seed": int(seed),
        "index": index,
        "split": split,
        "target_tokens": target_tokens,
        "n_tokens": count(context),
        "counter": counter_name,
        "corpus": corpus_id(),
    }
    return Sample(
        id=f"{task}/{split}/s{int(seed)}/{index:05d}-{h}",
        task=task,
        context=context,
        question=question,
        answer=answer,
        metric=metric,
        meta={**common, **meta},
    )


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def sentence_starts(text: str) -> list[int]:
    """Character offsets where a sentence may start (0, after sentence-final punctuation, and the end)."""
    starts = [0, *(m.end() for m in _SENTENCE_END.finditer(text)), len(text)]
    return sorted(set(starts))


def insert_at_depths(text: str, items: Sequence[tuple[float, str]]) -> tuple[str, list[float]]:
    """Insert sentences into ``text`` at sentence boundaries nearest the given depths (0 = start, 1 = end).

    Items that land on the same boundary keep their given order, and a smaller depth never lands after a
    larger one, so ordered chains stay ordered.  Returns the new text and the realised depth of each item
    (boundary offset / len(text) of the original text).
    """
    starts = sentence_starts(text)
    length = max(1, len(text))
    groups: dict[int, list[str]] = {}
    realised: list[float] = []
    for depth, sentence in items:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be within [0, 1], got {depth}")
        goal = depth * len(text)
        pos = min(starts, key=lambda s: (abs(s - goal), s))
        groups.setdefault(pos, []).append(sentence)
        realised.append(pos / length)
    out: list[str] = []
    prev = 0
    for pos in sorted(groups):
        out.append(text[prev:pos])
        block = " ".join(groups[pos])
        if pos == len(text):
            out.append(("" if not text or text[-1].isspace() else " ") + block)
        else:
            out.append(block + " ")
        prev = pos
    out.append(text[prev:])
    return "".join(out), realised


def insertion_cost(sentences: Sequence[str], count: CountFn) -> int:
    """Approximate units the sentences add to a text (each with its joining space)."""
    return sum(count(s + " ") for s in sentences)


def haystack_budget(context_tokens: int, inserted: int, task: str) -> int:
    room = context_tokens - inserted
    if room < max(16, context_tokens // 10):
        raise ValueError(
            f"{task}: context_tokens={context_tokens} leaves no room for a haystack "
            f"(the inserted facts alone take ~{inserted})"
        )
    return room


def contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def pick_grid(index: int, rng: random.Random, context_tokens: int, depths, lengths) -> tuple[int, float]:
    """(length, depth) of sample ``index``: cycles over the lengths × depths grid when given, else
    the default length and a uniform random depth."""
    lens = [int(x) for x in lengths] if lengths else [int(context_tokens)]
    if depths:
        grid = [(length, float(d)) for length in lens for d in depths]
        length, depth = grid[index % len(grid)]
        rng.random()  # keep the stream shape identical to the random-depth case
        return length, depth
    return lens[index % len(lens)], rng.random()
