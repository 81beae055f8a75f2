"""Multi-key needle retrieval: several key-value needles, the question asks for one of them."""

from __future__ import annotations

from collections.abc import Sequence

from depthkv.tasks._common import CountFn, insert_at_depths, make_sample, pick_grid, sample_rng
from depthkv.tasks.corpus import key_words
from depthkv.tasks.needle import NEEDLE, QUESTION, distinct_values, needle_haystack, redraw_clashes
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    num_keys: int = 4,
    depths: Sequence[float] | None = None,
    lengths: Sequence[int] | None = None,
    digits: int = 7,
) -> list[Sample]:
    """``num_keys`` needles at random depths; the queried one sits at the grid depth when ``depths`` is given."""
    if num_keys < 1:
        raise ValueError("multikey: num_keys must be >= 1")
    words = key_words(split)
    if len(words) < num_keys:
        raise ValueError(f"multikey: only {len(words)} key words available")
    out = []
    for i in range(n):
        rng = sample_rng("multikey", split, seed, i)
        length, depth = pick_grid(i, rng, context_tokens, depths, lengths)
        keys = rng.sample(words, num_keys)
        values = distinct_values(rng, num_keys, digits)
        planned = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        hay = needle_haystack(rng, length, planned, count, split, "multikey")
        values = redraw_clashes(rng, values, hay, digits)
        query = rng.randrange(num_keys)
        key_depths = [rng.random() for _ in keys]
        key_depths[query] = depth
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        context, realised = insert_at_depths(hay, list(zip(key_depths, needles)))
        out.append(
            make_sample(
                task="multikey",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION.format(key=keys[query]),
                answer=values[query],
                metric="substring",
                count=count,
                counter_name=counter_name,
                target_tokens=length,
                meta={
                    "depth": depth,
                    "realised_depth": realised[query],
                    "length": length,
                    "key": keys[query],
                    "keys": keys,
                    "values": values,
                    "key_depths": realised,
                    "distractor_keys": [k for j, k in enumerate(keys) if j != query],
                },
            )
        )
    return out


register_task(
    TaskSpec(
        name="multikey",
        make=_make,
        metric="substring",
        description="multi-key needle: num_keys key-value needles (distractors), the question asks for one",
    )
)
