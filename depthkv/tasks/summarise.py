"""Summarisation of long real documentation, scored against the full-cache output.

The context is a run of consecutive corpus documents (reference-manual topics, a module's documentation,
the licence), each under its title, starting at a seeded random document of the split and cut at a word
boundary to the length target.  The reference answer is ``""``: the evaluator fills it with the full-cache
model's output and scores compressed outputs with ROUGE-1/2/L and YapScore against it.
"""

from __future__ import annotations

from depthkv.tasks._common import CountFn, make_sample, sample_rng
from depthkv.tasks.corpus import documents, truncate_to
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample

QUESTION = "Summarise the text above in at most {max_words} words."


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    max_words: int = 120,
) -> list[Sample]:
    docs = documents(split)
    if not docs:
        raise RuntimeError(f"summarise: no documents in split {split!r}")
    out = []
    for i in range(n):
        rng = sample_rng("summarise", split, seed, i)
        start = rng.randrange(len(docs))
        parts: list[str] = []
        sources: list[str] = []
        have = 0
        for k in range(len(docs)):
            doc = docs[(start + k) % len(docs)]
            block = f"{doc.title}\n\n{doc.text}"
            parts.append(block)
            sources.append(doc.source)
            have += count(block) + 1
            if have >= context_tokens:
                break
        else:
            raise ValueError(f"summarise: the {split!r} corpus has fewer than {context_tokens} tokens")
        context = truncate_to("\n\n\n".join(parts), context_tokens, count)
        out.append(
            make_sample(
                task="summarise",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION.format(max_words=max_words),
                answer="",
                metric="rouge",
                count=count,
                counter_name=counter_name,
                target_tokens=context_tokens,
                meta={"sources": sources, "max_words": max_words},
            )
        )
    return out


register_task(
    TaskSpec(
        name="summarise",
        make=_make,
        metric="rouge",
        description="summarise long documentation; reference = full-cache output (ROUGE-1/2/L, YapScore)",
        needs_reference=True,
    )
)
