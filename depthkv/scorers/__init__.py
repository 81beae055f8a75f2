"""Token scorers (one small class per file) and their registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from depthkv.scorers.base import ScoreInputs, Scorer, attention_blocks
from depthkv.scorers.expected_attention import ExpectedAttention
from depthkv.scorers.h2o import H2O
from depthkv.scorers.h2o_value import H2OValue
from depthkv.scorers.key_norm import KeyNorm
from depthkv.scorers.keydiff import KeyDiff
from depthkv.scorers.kvzip import KVzip
from depthkv.scorers.kvzip_copy import KVzipValueCopy
from depthkv.scorers.kvzip_value import KVzipValue
from depthkv.scorers.random_scorer import RandomScorer
from depthkv.scorers.snapkv import SnapKV
from depthkv.scorers.streaming_llm import StreamingLLM

SCORERS: dict[str, Callable[..., Scorer]] = {
    "h2o": H2O,
    "h2o_v1": lambda **kw: H2OValue(p=1, **kw),
    "h2o_v2": lambda **kw: H2OValue(p=2, **kw),
    "snapkv": SnapKV,
    "streaming": StreamingLLM,
    "knorm": KeyNorm,
    "keydiff": KeyDiff,
    "random": RandomScorer,
    "kvzip": KVzip,
    "kvzip_v": KVzipValue,
    "kvzip_vc": KVzipValueCopy,
    "expected_attention": ExpectedAttention,
}

#: scorers that never look at the question: usable for contexts compressed before it is known
QUERY_AGNOSTIC = ("kvzip", "kvzip_v", "kvzip_vc", "expected_attention", "knorm", "keydiff", "streaming", "random")


def get_scorer(name: str | Scorer, **options) -> Scorer:
    """A scorer instance by registry name (or the instance itself)."""
    if isinstance(name, Scorer):
        return name
    try:
        factory = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; choose one of: {', '.join(sorted(SCORERS))}") from None
    return factory(**options)


def check_scorer_options(options: dict, scorers: Sequence[str]) -> None:
    """Refuse (``ValueError``) options for a scorer not among ``scorers``, options that are not an object, and
    options the scorer itself refuses (by building it)."""
    unknown = sorted(set(options) - set(scorers))
    if unknown:
        raise ValueError(f"options for scorer(s) not used here: {', '.join(unknown)} (used: {', '.join(scorers)})")
    for name, opts in options.items():
        if not isinstance(opts, dict):
            raise ValueError(f"the options of {name} must be an object, got {opts!r}")
        try:
            get_scorer(name, **opts)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options of {name}: {exc}") from None


__all__ = [
    "QUERY_AGNOSTIC", "SCORERS", "ExpectedAttention", "H2O", "H2OValue", "KVzip", "KVzipValue", "KVzipValueCopy", "KeyNorm", "RandomScorer",
    "ScoreInputs", "Scorer", "SnapKV", "StreamingLLM", "attention_blocks", "check_scorer_options", "get_scorer",
]
