"""Single-needle retrieval (passkey style): one "special magic number" hidden at a chosen depth."""

from __future__ import annotations

import random
from collections.abc import Sequence

from depthkv.tasks._common import (
    CountFn,
    haystack_budget,
    insert_at_depths,
    insertion_cost,
    make_sample,
    pick_grid,
    sample_rng,
)
from depthkv.tasks.corpus import haystack, key_words, seeded_choice
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample

NEEDLE = "The special magic number for {key} is {value}."
QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
)


def random_value(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def distinct_values(rng: random.Random, k: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        v = random_value(rng, digits)
        if v not in out:
            out.append(v)
    return out


def redraw_clashes(rng: random.Random, values: list[str], text: str, digits: int = 7) -> list[str]:
    """Redraw any value that already occurs in ``text`` (or twice in ``values``); same digit count, so
    the length budget computed with the first draw still holds."""
    values = list(values)
    for j, v in enumerate(values):
        while v in text or v in values[:j] + values[j + 1 :]:
            v = random_value(rng, digits)
        values[j] = v
    return values


def needle_haystack(
    rng: random.Random, target: int, sentences: Sequence[str], count: CountFn, split: str, task: str
) -> str:
    """Haystack sized so that haystack + inserted sentences is about ``target``."""
    room = haystack_budget(target, insertion_cost(sentences, count), task)
    return haystack(room, rng.getrandbits(63), count, split=split)


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    depths: Sequence[float] | None = None,
    lengths: Sequence[int] | None = None,
    digits: int = 7,
) -> list[Sample]:
    words = key_words(split)
    out = []
    for i in range(n):
        rng = sample_rng("needle", split, seed, i)
        length, depth = pick_grid(i, rng, context_tokens, depths, lengths)
        key = seeded_choice(words, rng)
        value = random_value(rng, digits)
        hay = needle_haystack(rng, length, [NEEDLE.format(key=key, value=value)], count, split, "needle")
        (value,) = redraw_clashes(rng, [value], hay, digits)
        needle = NEEDLE.format(key=key, value=value)
        context, (realised,) = insert_at_depths(hay, [(depth, needle)])
        out.append(
            make_sample(
                task="needle",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION.format(key=key),
                answer=value,
                metric="substring",
                count=count,
                counter_name=counter_name,
                target_tokens=length,
                meta={
                    "depth": depth,
                    "realised_depth": realised,
                    "length": length,
                    "key": key,
                    "needle": needle,
                },
            )
        )
    return out


register_task(
    TaskSpec(
        name="needle",
        make=_make,
        metric="substring",
        description="single needle: a 7-digit 'special magic number' for a random word at a chosen depth; "
        "options depths=[...], lengths=[...] cycle over the lengths x depths grid",
    )
)
