"""Task metrics and the :func:`score` dispatcher.

Every metric is registered in :data:`METRICS` as ``fn(sample, output, reference, count_tokens) -> dict``;
:func:`score` looks the sample's metric up there.  Each :class:`MetricSpec` names its headline key
(``primary``) for tables and plots.

ROUGE uses Google's ``rouge-score`` package (the ``eval`` extra: ``pip install 'depthkv[eval]'``; F1,
Porter stemming on).
Question answering uses SQuAD's exact match and token F1 (Rajpurkar et al., 2016), the metrics behind the
HotpotQA / Qasper numbers of LongBench-style evaluations.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from depthkv.tasks.sample import Sample

__all__ = [
    "MetricSpec",
    "METRICS",
    "register_metric",
    "normalise",
    "substring_match",
    "exact_match",
    "f1_score",
    "set_match",
    "number_match",
    "last_number",
    "edit_similarity",
    "levenshtein",
    "first_code_line",
    "rouge",
    "yap_score",
    "score",
]

CountFn = Callable[[str], int]
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise(text: str, *, articles: bool = True) -> str:
    """Lower-case, NFKC, thousands separators dropped (``1,234`` → ``1234``), punctuation → spaces,
    articles (a/an/the) removed unless ``articles=False``, whitespace collapsed (SQuAD-style)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = text.translate(_PUNCT)
    if articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def substring_match(output: str, answer: str) -> float:
    """1.0 if the normalised answer occurs in the normalised output as whole words, else 0.0.

    Whole words: answer ``12`` does not match output ``123``.  An answer that is only an article (a
    multiple-choice ``"A"``) is compared without removing articles.  An empty answer never matches.
    """
    keep = not normalise(answer)
    a, o = normalise(answer, articles=not keep), normalise(output, articles=not keep)
    if not a:
        return 0.0
    return float(f" {a} " in f" {o} ")


def exact_match(output: str, answer: str) -> float:
    """SQuAD exact match: 1.0 if the normalised output equals the normalised answer, else 0.0.

    Case, punctuation, articles and spacing do not matter (``"The Tampere."`` matches ``"tampere"``);
    any extra word does (``"It is Tampere"`` does not).
    """
    return float(normalise(output) == normalise(answer))


def f1_score(output: str, answer: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalised output's words against
    the normalised answer's words (multiset overlap), so a partly right or wordy answer gets partial
    credit.  If either side normalises to nothing, 1.0 only when both do."""
    pred, gold = normalise(output).split(), normalise(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def set_match(
    output: str, expected: Sequence[str], candidates: Sequence[str] | None = None
) -> dict[str, float]:
    """Share of ``expected`` items named in ``output`` (whole words, after normalisation) and exactness.

    ``set_exact`` is 1.0 when every expected item is present and, if ``candidates`` (all items that could
    be named, e.g. every variable in the context) is given, no other candidate is named.
    """
    items = [normalise(e) for e in expected if normalise(e)]
    if not items:
        raise ValueError("set_match needs at least one expected item")
    o = f" {normalise(output)} "
    found = {e for e in items if f" {e} " in o}
    share = len(found) / len(set(items))
    extra = 0
    if candidates is not None:
        others = {normalise(c) for c in candidates} - set(items)
        extra = sum(f" {c} " in o for c in others if c)
    exact = float(share == 1.0 and extra == 0)
    return {"set_match": share, "set_exact": exact}


_NUMBER = re.compile(r"(?<![\d.])\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in ``text``, or None.

    Commas inside a number are thousands separators (``1,250`` → 1250); a ``-`` right before the digits
    makes it negative unless it follows a letter or digit (so ``3-5`` ends with 5, not -5).
    """
    found = list(_NUMBER.finditer(text))
    if not found:
        return None
    m = found[-1]
    value = float(m.group().rstrip(",").replace(",", ""))
    start = m.start()
    if start >= 1 and text[start - 1] == "-" and not (start >= 2 and text[start - 2].isalnum()):
        value = -value
    return value


def number_match(output: str, answer: str | int | float) -> float:
    """1.0 if the last number in the output equals the answer (so ``12.0`` matches ``12``)."""
    got = last_number(output)
    if got is None:
        return 0.0
    want = float(str(answer).replace(",", ""))
    return float(abs(got - want) < 1e-9)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1); O(len(a)·len(b)) time."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(output: str, answer: str) -> float:
    """1 − Levenshtein(output, answer) / max(len) on stripped strings; 1.0 when both are empty."""
    a, b = output.strip(), answer.strip()
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def first_code_line(output: str) -> str:
    """The first non-empty line of a model's completion, ignoring Markdown code fences."""
    for line in output.splitlines():
        s = line.strip()
        if s and not s.startswith("```"):
            return s
    return ""


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from depthkv.extras import require

    rouge_scorer = require("rouge_score.rouge_scorer", "the ROUGE metric", package="rouge-score")
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(output: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of ``output`` against ``reference`` (rouge-score's tokenizer, Porter stemmer)."""
    scores = _rouge_scorer().score(reference, output)
    return {k: float(v.fmeasure) for k, v in scores.items()}


def yap_score(output: str | int, baseline_len: int, count_tokens: CountFn | None = None) -> int:
    """YapScore = max(0, len(output) − B): how much longer than the full-cache output (length B) it is.

    ``output`` is a string or an already measured length.  Strings are measured with ``count_tokens``
    (pass the tokenizer's length to count model tokens), else in whitespace-separated words; measure
    ``baseline_len`` the same way.
    """
    if isinstance(output, str):
        n = count_tokens(output) if count_tokens is not None else len(output.split())
    else:
        n = int(output)
    return max(0, n - int(baseline_len))


# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[[Sample, str, str | None, CountFn | None], dict[str, float]]
    primary: str
    description: str = ""


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, primary: str | None = None, description: str = ""):
    """Decorator: register ``fn(sample, output, reference, count_tokens) -> dict[str, float]``."""

    def deco(fn):
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        METRICS[name] = MetricSpec(name, fn, primary or name, description)
        return fn

    return deco


@register_metric("substring", description="normalised whole-word substring match of the answer")
def _m_substring(sample: Sample, output: str, reference: str | None, count_tokens) -> dict[str, float]:
    return {"substring": substring_match(output, sample.answer)}


def _answers(sample: Sample) -> list[str]:
    """The gold answer and any alternatives in ``meta["aliases"]`` (scores take the best, as SQuAD does)."""
    aliases = sample.meta.get("aliases") or []
    if isinstance(aliases, str) or not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"sample {sample.id}: meta['aliases'] must be a list of strings")
    return [sample.answer, *aliases]


def _qa(sample: Sample, output: str) -> dict[str, float]:
    golds = _answers(sample)
    return {"f1": max(f1_score(output, g) for g in golds), "em": max(exact_match(output, g) for g in golds)}


@register_metric(
    "f1", description="SQuAD token F1 of the output vs the answer (exact match reported as 'em')"
)
def _m_f1(sample: Sample, output: str, reference: str | None, count_tokens) -> dict[str, float]:
    return _qa(sample, output)


@register_metric(
    "em", description="SQuAD exact match of the output vs the answer (token F1 reported as 'f1')"
)
def _m_em(sample: Sample, output: str, reference: str | None, count_tokens) -> dict[str, float]:
    return _qa(sample, output)


@register_metric("set_match", description="share of expected items named (answer is comma-separated)")
def _m_set(sample: Sample, output: str, reference: str | None, count_tokens) -> dict[str, float]:
    expected = [a.strip() for a in sample.answer.split(",") if a.strip()]
    return set_match(output, expected, sample.meta.get("candidates"))


@register_metric("number_match", description="last number in the output equals the answer")
def _m_number(sample: Sample, output: str, reference: str | None, count_tokens) -> dict[str, float]:
    return {"number_match": number_match(output, sample.answer)}


@register_metric("edit_sim", description="1 - normalised Levenshtein of the first output line vs the answer")
def _m_edit(sample: Sample, output: str, reference: str | None, count_tokens) -> dict[str, float]:
    line = first_code_line(output)
    return {"edit_sim": edit_similarity(line, sample.answer), "exact": float(line == sample.answer.strip())}


@register_metric(
    "rouge", primary="rouge1", description="ROUGE-1/2/L F1 and YapScore vs the full-cache output"
)
def _m_rouge(sample: Sample, output: str, reference: str | None, count_tokens) -> dict[str, float]:
    ref = reference if reference is not None else sample.answer
    if not ref.strip():
        raise ValueError(
            f"sample {sample.id}: metric 'rouge' needs a reference (the full-cache output); pass reference="
        )
    out = rouge(output, ref)
    base = count_tokens(ref) if count_tokens is not None else len(ref.split())
    out["yap"] = float(yap_score(output, base, count_tokens))
    return out


def score(
    sample: Sample, output: str, reference: str | None = None, *, count_tokens: CountFn | None = None
) -> dict[str, float]:
    """Score a model ``output`` for ``sample`` with the sample's metric.

    ``reference`` overrides ``sample.answer`` for reference-based metrics (summarisation: the full-cache
    output); other metrics ignore it.  ``count_tokens`` sets the unit of YapScore (default: words).
    """
    try:
        spec = METRICS[sample.metric]
    except KeyError:
        raise KeyError(f"unknown metric {sample.metric!r}; known: {sorted(METRICS)}") from None
    return spec.fn(sample, output, reference, count_tokens)
