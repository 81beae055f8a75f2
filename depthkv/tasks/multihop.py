"""Two-hop question answering across documents (HotpotQA style, over real text).

The context is several titled corpus documents (:mod:`depthkv.tasks._multidoc`).  The first hop names a
person for an invented module, the second says where that person lives; the two facts sit in different
documents, at least half the documents apart::

    (document 1)  The maintainer of the zorvex module is Ilse Marten.
    (document 4)  Ilse Marten lives in Tampere.
    Q: In which city does the maintainer of the zorvex module live?   A: Tampere

Distractor chains of the same form about other modules (``num_distractors``) make a wrong bridge give a
wrong city; decoy chains about the *same* module under another relation (``relation_decoys``: "The
reviewer of the zorvex module is ...") punish reading the module name alone.  Answering with the bridge
person (a single hop) scores 0.  Metric: SQuAD token F1 (primary) and exact match.
"""

from __future__ import annotations

from depthkv.tasks._common import CountFn, insertion_cost, make_sample, sample_rng
from depthkv.tasks._multidoc import MultiDoc, draw, far_pair, people, pseudo_words
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample

RELATIONS = ("maintainer", "author", "reviewer", "designer")
HOP1 = "The {relation} of the {module} module is {person}."
HOP2 = "{person} lives in {city}."
QUESTION = "In which city does the {relation} of the {module} module live? Answer with the city name only."


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    num_distractors: int = 1,
    relation_decoys: int = 0,
    num_docs: int = 4,
) -> list[Sample]:
    """``num_distractors`` other-module chains, ``relation_decoys`` same-module chains under other
    relations, spread over at least ``num_docs`` documents (each chain's two facts in different ones)."""
    if num_distractors < 0:
        raise ValueError(f"multihop: num_distractors must be >= 0, got {num_distractors}")
    if not 0 <= relation_decoys < len(RELATIONS):
        raise ValueError(
            f"multihop: relation_decoys must be within [0, {len(RELATIONS) - 1}], got {relation_decoys}"
        )
    if num_docs < 2:
        raise ValueError(
            f"multihop: num_docs must be >= 2 (the two hops sit in different documents), got {num_docs}"
        )
    n_chains = 1 + num_distractors + relation_decoys
    out = []
    for i in range(n):
        rng = sample_rng("multihop", split, seed, i)
        relation = rng.choice(RELATIONS)
        modules = pseudo_words(rng, 1 + num_distractors, split)
        persons = people(rng, n_chains, split, "multihop")
        cities = draw(rng, "cities", n_chains, split, "multihop")
        decoy_relations = rng.sample([r for r in RELATIONS if r != relation], relation_decoys)
        chains = [(relation, modules[c], persons[c], cities[c]) for c in range(1 + num_distractors)]
        chains += [
            (r, modules[0], persons[1 + num_distractors + j], cities[1 + num_distractors + j])
            for j, r in enumerate(decoy_relations)
        ]
        facts = [
            (HOP1.format(relation=r, module=m, person=p), HOP2.format(person=p, city=c))
            for r, m, p, c in chains
        ]
        sentences = [s for pair in facts for s in pair]
        docs = MultiDoc(
            rng,
            split=split,
            target=context_tokens,
            inserted=insertion_cost(sentences, count),
            count=count,
            min_docs=num_docs,
            task="multihop",
        )
        inserts: dict[int, list[tuple[float, str]]] = {}
        placed: list[tuple[int, int]] = []
        for c, (hop1, hop2) in enumerate(facts):
            a, b = far_pair(rng, docs.n_docs) if c == 0 else tuple(rng.sample(range(docs.n_docs), 2))
            inserts.setdefault(a, []).append((rng.random(), hop1))
            inserts.setdefault(b, []).append((rng.random(), hop2))
            placed.append((a, b))
        context, _ = docs.render(inserts)
        hop_docs = list(placed[0])
        out.append(
            make_sample(
                task="multihop",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION.format(relation=relation, module=modules[0]),
                answer=cities[0],
                metric="f1",
                count=count,
                counter_name=counter_name,
                target_tokens=context_tokens,
                meta={
                    "relation": relation,
                    "module": modules[0],
                    "bridge": persons[0],
                    "hops": list(facts[0]),
                    "hop_docs": hop_docs,  # 0-based document index of each hop
                    "hop_titles": [docs.titles[d] for d in hop_docs],
                    "distractors": [
                        {"relation": r, "module": m, "person": p, "city": c, "docs": list(d)}
                        for (r, m, p, c), d in zip(chains[1:], placed[1:])
                    ],
                    **docs.meta(),
                },
            )
        )
    return out


register_task(
    TaskSpec(
        name="multihop",
        make=_make,
        metric="f1",
        description="two-hop QA: module -> person -> city, the hops in different titled documents, among "
        "num_distractors other-module chains and relation_decoys same-module chains (token F1, EM)",
    )
)
