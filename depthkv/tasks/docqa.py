"""Long-document question answering with distractor documents (Qasper / multi-document QA style).

The context is several titled corpus documents (:mod:`depthkv.tasks._multidoc`).  One of them carries a
fact about itself ("The internal codename of this document is Amber Heron."); ``num_distractors`` other
documents carry the same sentence with other values.  The question names the document by its title::

    In the document titled "Module json.decoder", what is its internal codename? Answer with the codename only.

so the value must be read from the right document: matching the sentence alone is a guess among
``num_distractors + 1`` values.  Attributes: ``maintainer`` (a person), ``city``, ``codename`` (two
words) and ``review`` (a 4-digit number).  Metric: SQuAD token F1 (primary) and exact match.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from depthkv.tasks._common import CountFn, insertion_cost, make_sample, sample_rng
from depthkv.tasks._multidoc import MultiDoc, codenames, draw, numbers, people
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample


@dataclass(frozen=True)
class Attribute:
    """A fact a document states about itself: sentence template, question wording and value source."""

    fact: str
    ask: str
    what: str
    values: Callable[[random.Random, int, str], list[str]]


ATTRIBUTES: dict[str, Attribute] = {
    "maintainer": Attribute(
        "The maintainer listed for this document is {value}.",
        "who is its listed maintainer",
        "name",
        lambda rng, k, split: people(rng, k, split, "docqa"),
    ),
    "city": Attribute(
        "This document was last revised in {value}.",
        "in which city was it last revised",
        "city name",
        lambda rng, k, split: draw(rng, "cities", k, split, "docqa"),
    ),
    "codename": Attribute(
        "The internal codename of this document is {value}.",
        "what is its internal codename",
        "codename",
        lambda rng, k, split: codenames(rng, k, split, "docqa"),
    ),
    "review": Attribute(
        "The review number of this document is {value}.",
        "what is its review number",
        "number",
        lambda rng, k, split: numbers(rng, k, split),
    ),
}
QUESTION = "In the document titled {title}, {ask}? Answer with the {what} only."


def quoted(title: str) -> str:
    """The title in double quotes, or in single quotes when it contains double quotes itself."""
    return f"'{title}'" if '"' in title else f'"{title}"'


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    num_docs: int = 4,
    num_distractors: int = 2,
    attributes: Sequence[str] | None = None,
) -> list[Sample]:
    """At least ``max(num_docs, num_distractors + 1)`` documents; the answer document and
    ``num_distractors`` others each state the sampled attribute once, with distinct values."""
    names = tuple(attributes) if attributes else tuple(ATTRIBUTES)
    unknown = [a for a in names if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"docqa: unknown attributes {unknown}; known: {sorted(ATTRIBUTES)}")
    if num_distractors < 0:
        raise ValueError(f"docqa: num_distractors must be >= 0, got {num_distractors}")
    if num_docs < 1:
        raise ValueError(f"docqa: num_docs must be >= 1, got {num_docs}")
    out = []
    for i in range(n):
        rng = sample_rng("docqa", split, seed, i)
        name = names[rng.randrange(len(names))]
        attr = ATTRIBUTES[name]
        values = attr.values(rng, num_distractors + 1, split)
        facts = [attr.fact.format(value=v) for v in values]
        docs = MultiDoc(
            rng,
            split=split,
            target=context_tokens,
            inserted=insertion_cost(facts, count),
            count=count,
            min_docs=max(num_docs, num_distractors + 1),
            task="docqa",
        )
        fact_docs = rng.sample(range(docs.n_docs), num_distractors + 1)  # first: the answer's document
        depths = [rng.random() for _ in facts]
        if name == "review":  # a number may also occur in the documents: redraw it (same length)
            text = "\n".join(d.text for d in docs.docs)
            for j, v in enumerate(values):
                while v in text or v in values[:j] + values[j + 1 :]:
                    v = numbers(rng, 1, split)[0]
                values[j] = v
            facts = [attr.fact.format(value=v) for v in values]
        context, realised = docs.render({d: [(x, f)] for d, x, f in zip(fact_docs, depths, facts)})
        title = docs.titles[fact_docs[0]]
        out.append(
            make_sample(
                task="docqa",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION.format(title=quoted(title), ask=attr.ask, what=attr.what),
                answer=values[0],
                metric="f1",
                count=count,
                counter_name=counter_name,
                target_tokens=context_tokens,
                meta={
                    "attribute": name,
                    "fact": facts[0],
                    "doc": fact_docs[0],  # 0-based document index
                    "title": title,
                    "depth": realised[fact_docs[0]][0],
                    "distractors": [
                        {"doc": d, "title": docs.titles[d], "value": v}
                        for d, v in zip(fact_docs[1:], values[1:])
                    ],
                    **docs.meta(),
                },
            )
        )
    return out


register_task(
    TaskSpec(
        name="docqa",
        make=_make,
        metric="f1",
        description="document QA: several titled documents, one states the asked attribute, "
        "num_distractors others state it with other values; the question names the document's title "
        "(token F1, EM)",
    )
)
