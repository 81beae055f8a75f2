"""Multi-document contexts and invented entities for the question-answering tasks (multihop, docqa).

A context is a run of real documents from the corpus (reference-manual topics, module documentation, the
licence), each under its title line, in the style of multi-document QA benchmarks (HotpotQA paragraphs,
Qasper sections)::

    Module json.decoder
    <text of that document, cut at a sentence end; paragraphs separated by one blank line>


    Augmented assignment statements
    ...

Documents are separated by two blank lines (paragraphs never contain a newline, so the separator is
unambiguous).  Titles are not numbered: small models otherwise tend to continue the numbered list instead of
answering.

Fact sentences are inserted into chosen documents at sentence boundaries.  Entities (people, cities,
codenames, module names) come from fixed pools minus every word or phrase that occurs anywhere in the
corpus (so an answer can only come from an inserted fact), and the pools whose items are answers are
halved by a stable hash, so calibration and evaluation samples never share an answer.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence

from depthkv.tasks._common import CountFn, haystack_budget, insert_at_depths
from depthkv.tasks.corpus import Document, documents, split_of, truncate_to

HEADER = "{title}\n"
DOC_SEP = "\n\n\n"

FIRST_NAMES = (
    "Ilse", "Oskar", "Greta", "Tobias", "Ingrid", "Matthias", "Sofie", "Anouk", "Joris", "Lieke", "Bram",
    "Maren", "Henrik", "Astrid", "Lukas", "Petra", "Zofia", "Tomasz", "Radek", "Ivana", "Dario", "Chiara",
    "Enzo", "Giulia", "Paloma", "Rafael", "Leire", "Nuno", "Beatriz", "Teodor", "Mirela", "Kaito", "Hana",
    "Ravi", "Priya", "Amara", "Kofi", "Nadia", "Yusuf", "Leila", "Tariq", "Selma", "Emre", "Aylin", "Olga",
    "Pavel", "Vera", "Linnea", "Mateo", "Esther",
)  # fmt: skip
SURNAMES = (
    "Marten", "Lindqvist", "Brouwer", "Kowalczyk", "Novak", "Horvath", "Ferreira", "Moreau", "Castellano",
    "Okafor", "Mensah", "Tanaka", "Nakamura", "Haddad", "Yilmaz", "Petrov", "Sorensen", "Halvorsen",
    "Virtanen", "Korhonen", "Dubois", "Lefebvre", "Bianchi", "Esposito", "Fischer", "Hoffmann", "Schreiber",
    "Vogel", "Zimmermann", "Visser", "Dekker", "Bakker", "Mulder", "Kaplan", "Demir", "Kimura", "Alvarez",
    "Navarro", "Romero", "Delgado", "Ortega", "Pereira", "Almeida", "Banerjee", "Iyer", "Menon", "Achebe",
    "Oyelaran", "Nieminen", "Szabo", "Kovacs", "Popescu", "Dimitrov", "Lindgren", "Eriksen", "Vasquez",
)  # fmt: skip
CITIES = (
    "Tampere", "Lisbon", "Porto", "Krakow", "Gdansk", "Tartu", "Bergen", "Uppsala", "Aarhus", "Ghent",
    "Utrecht", "Leipzig", "Dresden", "Graz", "Salzburg", "Ljubljana", "Zagreb", "Brno", "Bratislava",
    "Debrecen", "Varna", "Valencia", "Seville", "Bilbao", "Bologna", "Turin", "Genoa", "Lyon", "Nantes",
    "Bordeaux", "Geneva", "Basel", "Galway", "Glasgow", "Leeds", "Bristol", "Montreal", "Winnipeg",
    "Halifax", "Denver", "Portland", "Seattle", "Osaka", "Kyoto", "Sapporo", "Busan", "Taipei", "Hanoi",
    "Manila", "Jakarta", "Perth", "Adelaide", "Auckland", "Nairobi", "Accra", "Lagos", "Cairo", "Tunis",
    "Lima", "Quito", "Bogota", "Montevideo", "Recife", "Cusco", "Buenos Aires", "Cape Town",
    "Kuala Lumpur", "San Diego", "Tel Aviv", "Rio Branco",
)  # fmt: skip
ADJECTIVES = (
    "Amber", "Silver", "Crimson", "Northern", "Golden", "Scarlet", "Misty", "Velvet", "Copper", "Lunar",
    "Brisk", "Hidden", "Ivory", "Cobalt", "Wandering", "Emerald",
)  # fmt: skip
ANIMALS = (
    "Heron", "Falcon", "Otter", "Badger", "Walrus", "Gecko", "Ibis", "Bison", "Magpie", "Osprey", "Puffin",
    "Tapir", "Jackal", "Condor", "Marmot", "Lemur", "Pelican", "Wombat", "Narwhal", "Ocelot", "Stoat",
    "Vole", "Kestrel", "Mongoose",
)  # fmt: skip

_POOLS: dict[str, tuple[str, ...]] = {
    "first_names": FIRST_NAMES,
    "surnames": SURNAMES,
    "cities": CITIES,
    "adjectives": ADJECTIVES,
    "animals": ANIMALS,
}
# pools whose items identify an answer: split into a calibration and an evaluation half
_SPLIT_POOLS = frozenset({"surnames", "cities", "animals"})


@functools.lru_cache(maxsize=1)
def _corpus_words() -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    """Lower-case words and adjacent word pairs of every document (both halves, titles included)."""
    words: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for doc in documents(None):
        for text in (doc.title, *doc.paragraphs):
            toks = re.findall(r"[a-z]+", text.lower())
            words.update(toks)
            pairs.update(zip(toks, toks[1:]))
    return frozenset(words), frozenset(pairs)


def is_fresh(phrase: str) -> bool:
    """True if ``phrase`` (one or two words) never occurs in the corpus, ignoring case."""
    toks = re.findall(r"[a-z]+", phrase.lower())
    if not toks or len(toks) > 2:
        raise ValueError(f"entity {phrase!r} must be one or two words")
    words, pairs = _corpus_words()
    return toks[0] not in words if len(toks) == 1 else (toks[0], toks[1]) not in pairs


@functools.cache
def pool(name: str, split: str) -> tuple[str, ...]:
    """Items of pool ``name`` that never occur in the corpus; answer pools keep only ``split``'s half."""
    return tuple(
        x
        for x in _POOLS[name]
        if is_fresh(x) and (name not in _SPLIT_POOLS or split_of(f"{name}:{x}") == split)
    )


def draw(rng: random.Random, name: str, k: int, split: str, task: str) -> list[str]:
    """``k`` distinct items of pool ``name`` (a clear error when the pool is too small)."""
    items = pool(name, split)
    if k > len(items):
        raise ValueError(f"{task}: needs {k} distinct {name}, the {split!r} pool has only {len(items)}")
    return rng.sample(items, k)


def people(rng: random.Random, k: int, split: str, task: str) -> list[str]:
    """``k`` full names; no first name or surname repeats, so a wrong name never shares a word with the
    right one (token F1 gives no credit for a wrong person)."""
    return [
        f"{a} {b}"
        for a, b in zip(draw(rng, "first_names", k, split, task), draw(rng, "surnames", k, split, task))
    ]


def codenames(rng: random.Random, k: int, split: str, task: str) -> list[str]:
    """``k`` two-word codenames (``Amber Heron``) with no word in common."""
    return [
        f"{a} {b}"
        for a, b in zip(draw(rng, "adjectives", k, split, task), draw(rng, "animals", k, split, task))
    ]


_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "xnrsk"


def pseudo_words(rng: random.Random, k: int, split: str) -> list[str]:
    """``k`` distinct pronounceable invented words (``zorvex``) that occur nowhere in the corpus, from
    ``split``'s half (by a stable hash)."""
    out: list[str] = []
    while len(out) < k:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        w += rng.choice(_CODAS)
        if w not in out and is_fresh(w) and split_of(f"word:{w}") == split:
            out.append(w)
    return out


def numbers(rng: random.Random, k: int, split: str, *, digits: int = 4) -> list[str]:
    """``k`` distinct ``digits``-digit numbers from ``split``'s half (by a stable hash)."""
    out: list[str] = []
    while len(out) < k:
        v = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if v not in out and split_of(f"number:{v}") == split:
            out.append(v)
    return out


def far_pair(rng: random.Random, n_docs: int) -> tuple[int, int]:
    """Two different document indices at least ``n_docs // 2`` apart, in random order."""
    if n_docs < 2:
        raise ValueError("two facts in different documents need at least 2 documents")
    gap = max(1, n_docs // 2)
    pairs = [(a, b) for a in range(n_docs) for b in range(n_docs) if abs(a - b) >= gap]
    return pairs[rng.randrange(len(pairs))]


class MultiDoc:
    """The documents of one sample, sized so that headers + bodies + inserted facts ≈ ``target``.

    Documents are taken in a seeded random order, each cut at a sentence end to an equal share of what
    is left for the remaining ones; a document shorter than its share is skipped for the next one long
    enough, and when none is left, taken whole with more documents after it.  So a sample has
    ``min_docs`` documents unless the context is long for the corpus (then more), and :meth:`render`
    resizes the last body until the whole context is within 2 % of ``target``.
    """

    _MIN_EXTRA = 24  # an extra document is added only for at least this many missing units

    def __init__(
        self,
        rng: random.Random,
        *,
        split: str,
        target: int,
        inserted: int,
        count: CountFn,
        min_docs: int,
        task: str,
    ) -> None:
        self.count, self.target, self.task = count, target, task
        self.tol = max(2, int(0.02 * target))
        room = haystack_budget(target, inserted, task)
        seen: set[str] = set()  # a title names one document only (the docqa question relies on it)
        docs = [d for d in documents(split) if not (d.title in seen or seen.add(d.title))]
        probe = DOC_SEP.join(d.text for d in docs[:20])[:20000]
        chars_per_unit = len(probe) / max(1, count(probe))
        remaining = rng.sample(docs, len(docs))
        self.docs: list[Document] = []
        self.bodies: list[str] = []
        used = 0
        while True:
            i = len(self.docs)
            missing = room - used
            if i >= min_docs and (missing <= self.tol or missing < self._MIN_EXTRA):
                break
            if not remaining:
                raise ValueError(
                    f"{task}: the {split!r} half of the corpus is too small for context_tokens={target}"
                )
            slots = max(1, min_docs - i)
            sep = count(DOC_SEP) if i else 0
            # the header's cost, estimated with a typical title before the document is chosen
            goal = int(missing / slots) - sep - count(HEADER.format(title="Module xml.sax"))
            if goal <= 0:
                raise ValueError(f"{task}: context_tokens={target} is too small for {min_docs} documents")
            need = chars_per_unit * goal
            j = next((j for j, d in enumerate(remaining) if len(d.text) >= need), None)
            if j is None:  # no document is long enough for the share: the longest, whole
                j = max(range(len(remaining)), key=lambda x: len(remaining[x].text))
            doc = remaining.pop(j)
            self.docs.append(doc)
            head = count(self._header(i)) + sep
            body = self._cut(doc.text, int(missing / slots) - head, last=slots == 1)
            self.bodies.append(body)
            used += head + count(body)

    @property
    def n_docs(self) -> int:
        return len(self.docs)

    @property
    def titles(self) -> list[str]:
        return [d.title for d in self.docs]

    @property
    def sources(self) -> list[str]:
        return [d.source for d in self.docs]

    def meta(self) -> dict[str, object]:
        """What every multi-document sample records of its documents: count, titles, source files."""
        return {"n_docs": self.n_docs, "titles": self.titles, "sources": self.sources}

    def _header(self, i: int) -> str:
        return HEADER.format(title=self.docs[i].title)

    def _cut(self, text: str, goal: int, *, last: bool) -> str:
        if goal <= 0:
            return ""
        body = truncate_to(text, goal, self.count, at="sentence")
        if not body or (last and goal - self.count(body) > self.tol):
            body = truncate_to(text, goal, self.count, at="word")
        return body

    def _render(
        self, inserts: Mapping[int, Sequence[tuple[float, str]]]
    ) -> tuple[str, dict[int, list[float]]]:
        parts: list[str] = []
        realised: dict[int, list[float]] = {}
        for i, body in enumerate(self.bodies):
            items = list(inserts.get(i, ()))
            if items:
                body, realised[i] = insert_at_depths(body, items)
            parts.append(self._header(i) + body)
        return DOC_SEP.join(parts), realised

    def render(
        self, inserts: Mapping[int, Sequence[tuple[float, str]]]
    ) -> tuple[str, dict[int, list[float]]]:
        """The context with ``inserts[doc] = [(depth in the document, sentence), ...]`` in place, and the
        realised depth of each inserted sentence (same layout as ``inserts``)."""
        bad = [i for i in inserts if not 0 <= i < self.n_docs]
        if bad:
            raise ValueError(f"no document {bad[0]} (there are {self.n_docs})")
        for _ in range(3):
            context, realised = self._render(inserts)
            diff = self.target - self.count(context)
            if abs(diff) <= self.tol:
                break
            goal = self.count(self.bodies[-1]) + diff
            body = self._cut(self.docs[-1].text, goal, last=True)
            if body == self.bodies[-1]:
                break  # the last document cannot grow any further
            self.bodies[-1] = body
        else:
            context, realised = self._render(inserts)
        return context, realised


def split_documents(context: str) -> list[tuple[str, str]]:
    """``(title, text)`` of each document of a multi-document context, in order."""
    return [tuple(part.split("\n", 1)) for part in context.split(DOC_SEP)]
