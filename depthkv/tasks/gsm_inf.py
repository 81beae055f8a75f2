"""Long-context arithmetic with distractors (GSM-infinite style).

A small word problem (2–3 arithmetic steps) is broken into fact sentences scattered through the haystack,
among distractor facts of the same shape about other people or other objects.  The question needs only
the relevant facts; ``meta["problem"]`` holds the numbers and :func:`solve` recomputes the answer.

Distractors never touch the (person, object) pairs the problem is about: each one either names an
object the problem does not use, or names only people outside the problem.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from depthkv.tasks._common import (
    CountFn,
    haystack_budget,
    insert_at_depths,
    insertion_cost,
    make_sample,
    sample_rng,
)
from depthkv.tasks.corpus import haystack
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample

NAMES = (
    "Abigail", "Bartholomew", "Cecilia", "Dmitri", "Eleanor", "Fernando", "Gwendolyn", "Horatio",
    "Isadora", "Jasper", "Katarina", "Leopold", "Magdalena", "Nikolai", "Octavia", "Percival",
    "Rosalind", "Sebastian", "Theodora", "Ulysses", "Valentina", "Wilhelmina", "Xavier", "Yolanda",
    "Zachariah", "Anastasia", "Benedict", "Clementine", "Desmond", "Evangeline", "Florian", "Genevieve",
)  # fmt: skip
OBJECTS = (
    "marbles", "stickers", "pencils", "seashells", "postcards", "buttons", "candles", "feathers",
    "pebbles", "ribbons", "tickets", "beads", "acorns", "stamps", "lanterns", "thimbles",
)  # fmt: skip

QUESTION = "Using only the facts stated in the text above, {ask} Answer with a single integer."


def _more_times(rng: random.Random, names: list[str], obj: str):
    a, b, c = names
    x, y, z = rng.randint(2, 30), rng.randint(1, 20), rng.randint(2, 5)
    facts = [
        f"{a} has {x} {obj}.",
        f"{b} has {y} more {obj} than {a}.",
        f"{c} has {z} times as many {obj} as {b}.",
    ]
    return {"x": x, "y": y, "z": z}, facts, f"how many {obj} does {c} have?"


def _boxes_give(rng: random.Random, names: list[str], obj: str):
    a, b = names[:2]
    p, q = rng.randint(2, 9), rng.randint(3, 12)
    r = rng.randint(1, p * q - 1)
    facts = [
        f"{a} buys {p} boxes of {obj}.",
        f"Each box of {obj} that {a} buys holds {q} {obj}.",
        f"{a} gives {r} of those {obj} to {b}.",
    ]
    return {"p": p, "q": q, "r": r}, facts, f"how many {obj} does {a} have left?"


def _together(rng: random.Random, names: list[str], obj: str):
    a, b = names[:2]
    x = rng.randint(10, 60)
    y = rng.randint(1, x - 1)
    facts = [f"{a} has {x} {obj}.", f"{b} has {y} fewer {obj} than {a}."]
    return {"x": x, "y": y}, facts, f"how many {obj} do {a} and {b} have together?"


def _share(rng: random.Random, names: list[str], obj: str):
    a = names[0]
    y, k = rng.randint(2, 9), rng.randint(2, 6)
    x = y * k + rng.randint(1, 40)
    facts = [f"{a} has {x} {obj}.", f"{a} gives {y} {obj} to each of {k} friends."]
    return {"x": x, "y": y, "k": k}, facts, f"how many {obj} does {a} have left?"


def _more_times_give(rng: random.Random, names: list[str], obj: str):
    values, facts, _ = _more_times(rng, names, obj)
    a, _b, c = names
    values["r"] = rng.randint(1, (values["x"] + values["y"]) * values["z"] - 1)
    facts.append(f"{c} gives {values['r']} {obj} to {a}.")
    return values, facts, f"how many {obj} does {c} have left?"


# kind -> (number of people, builder, solver, arithmetic steps); solvers are the ground truth
PROBLEMS: dict[str, tuple[int, Callable, Callable[[dict], int], int]] = {
    "more_times": (3, _more_times, lambda v: (v["x"] + v["y"]) * v["z"], 2),
    "more_times_give": (3, _more_times_give, lambda v: (v["x"] + v["y"]) * v["z"] - v["r"], 3),
    "boxes_give": (2, _boxes_give, lambda v: v["p"] * v["q"] - v["r"], 2),
    "together": (2, _together, lambda v: v["x"] + (v["x"] - v["y"]), 2),
    "share": (1, _share, lambda v: v["x"] - v["y"] * v["k"], 2),
}


def solve(problem: dict) -> int:
    """Answer of ``meta["problem"]`` (``{"kind": ..., "values": {...}}``)."""
    return PROBLEMS[problem["kind"]][2](problem["values"])


def _distractor(rng: random.Random, used_names: list[str], obj: str) -> str:
    """A fact of the same shape that cannot change the answer."""
    if rng.random() < 0.5:  # a problem person, another object
        other_obj = rng.choice([o for o in OBJECTS if o != obj])
        who = rng.choice(NAMES)
        whom = rng.choice([n for n in NAMES if n != who])
        target = other_obj
    else:  # the problem object, people outside the problem
        outsiders = [n for n in NAMES if n not in used_names]
        who, whom = rng.sample(outsiders, 2)
        target = obj
    shape = rng.randrange(5)
    n1, n2 = rng.randint(2, 40), rng.randint(2, 5)
    if shape == 0:
        return f"{who} has {n1} {target}."
    if shape == 1:
        return f"{who} has {n1} more {target} than {whom}."
    if shape == 2:
        return f"{who} has {n2} times as many {target} as {whom}."
    if shape == 3:
        return f"{who} gives {n1} {target} to {whom}."
    return f"Each box of {target} that {who} buys holds {n1} {target}."


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    num_distractors: int = 8,
    kinds: tuple[str, ...] | None = None,
) -> list[Sample]:
    kinds = tuple(kinds) if kinds else tuple(PROBLEMS)
    unknown = [k for k in kinds if k not in PROBLEMS]
    if unknown:
        raise ValueError(f"gsm_inf: unknown problem kinds {unknown}; known: {sorted(PROBLEMS)}")
    out = []
    for i in range(n):
        rng = sample_rng("gsm_inf", split, seed, i)
        kind = kinds[rng.randrange(len(kinds))]
        n_people, build, solver, steps = PROBLEMS[kind]
        names = rng.sample(NAMES, n_people)
        obj = rng.choice(OBJECTS)
        values, facts, ask = build(rng, names, obj)
        distractors: list[str] = []
        while len(distractors) < num_distractors:
            d = _distractor(rng, names, obj)
            if d not in distractors and d not in facts:
                distractors.append(d)
        sentences = facts + distractors
        room = haystack_budget(context_tokens, insertion_cost(sentences, count), "gsm_inf")
        hay = haystack(room, rng.getrandbits(63), count, split=split)
        order = list(range(len(sentences)))
        rng.shuffle(order)
        depths = sorted(rng.random() for _ in sentences)
        context, realised = insert_at_depths(hay, [(depths[k], sentences[j]) for k, j in enumerate(order)])
        problem = {"kind": kind, "values": values, "names": names, "object": obj}
        answer = solver(values)
        out.append(
            make_sample(
                task="gsm_inf",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION.format(ask=ask),
                answer=str(answer),
                metric="number_match",
                count=count,
                counter_name=counter_name,
                target_tokens=context_tokens,
                meta={"problem": problem, "facts": facts, "distractors": distractors, "steps": steps},
            )
        )
    return out


register_task(
    TaskSpec(
        name="gsm_inf",
        make=_make,
        metric="number_match",
        description="long-context arithmetic: 2-3 step word problem split into facts scattered among "
        "num_distractors distractor facts",
    )
)
