"""Variable tracking (RULER style): chains of assignments hidden in the haystack.

``VAR QXKMD = 40213.`` starts a chain, ``VAR PLWTE = VAR QXKMD.`` continues it, and so on; the statements
of a chain appear in order.  The question gives the chain's value and asks for every variable that holds
it.  Extra chains (with other values) are distractors.
"""

from __future__ import annotations

import string

from depthkv.tasks._common import (
    CountFn,
    contains_word,
    haystack_budget,
    insert_at_depths,
    insertion_cost,
    make_sample,
    sample_rng,
)
from depthkv.tasks.corpus import haystack
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample

QUESTION = (
    "Find all variables that are assigned the value {value} in the text above, directly or through other "
    "variables. Answer with the variable names only, separated by commas."
)


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    num_chains: int = 2,
    num_hops: int = 4,
    name_len: int = 5,
) -> list[Sample]:
    if num_chains < 1 or num_hops < 1:
        raise ValueError("vartrack: num_chains and num_hops must be >= 1")
    out = []
    for i in range(n):
        rng = sample_rng("vartrack", split, seed, i)
        n_vars = num_chains * (num_hops + 1)
        names = _distinct(
            n_vars, lambda r=rng: "".join(r.choice(string.ascii_uppercase) for _ in range(name_len))
        )
        values = _distinct(num_chains, lambda r=rng: str(r.randrange(10000, 100000)))
        chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
        room = haystack_budget(context_tokens, insertion_cost(_statements(chains, values), count), "vartrack")
        hay = haystack(room, rng.getrandbits(63), count, split=split)
        # a name or value that happens to occur in the haystack is redrawn (same size, so same budget)
        for j, name in enumerate(names):
            while contains_word(hay, name) or name in names[:j] + names[j + 1 :]:
                name = "".join(rng.choice(string.ascii_uppercase) for _ in range(name_len))
            names[j] = name
        for j, v in enumerate(values):
            while v in hay or v in values[:j] + values[j + 1 :]:
                v = str(rng.randrange(10000, 100000))
            values[j] = v
        chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
        items: list[tuple[float, str]] = []
        for chain, value in zip(chains, values):
            depths = sorted(rng.random() for _ in chain)
            items.extend(zip(depths, _statements([chain], [value])))
        items.sort(key=lambda t: t[0])  # stable: a chain's statements stay in order
        context, _ = insert_at_depths(hay, items)
        out.append(
            make_sample(
                task="vartrack",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION.format(value=values[0]),
                answer=", ".join(chains[0]),
                metric="set_match",
                count=count,
                counter_name=counter_name,
                target_tokens=context_tokens,
                meta={
                    "value": values[0],
                    "chains": [{"value": v, "vars": c} for c, v in zip(chains, values)],
                    "candidates": names,
                    "num_hops": num_hops,
                    "num_chains": num_chains,
                },
            )
        )
    return out


def _distinct(k: int, draw) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _statements(chains: list[list[str]], values: list[str]) -> list[str]:
    out = []
    for chain, value in zip(chains, values):
        out.append(f"VAR {chain[0]} = {value}.")
        out.extend(f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:]))
    return out


register_task(
    TaskSpec(
        name="vartrack",
        make=_make,
        metric="set_match",
        description="variable tracking: num_chains chains of num_hops assignments; list the variables that "
        "hold the first chain's value",
    )
)
