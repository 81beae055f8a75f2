"""Token scorers (one small class each) and their registry."""

from __future__ import annotations

from collections.abc import Callable

from depthkv.scorers.base import ScoreInputs, Scorer, attention_blocks
from depthkv.scorers.h2o import H2O, H2OValue
from depthkv.scorers.simple import KeyNorm, RandomScorer, StreamingLLM
from depthkv.scorers.snapkv import SnapKV

SCORERS: dict[str, Callable[..., Scorer]] = {
    "h2o": H2O,
    "h2o_v1": lambda **kw: H2OValue(p=1, **kw),
    "h2o_v2": lambda **kw: H2OValue(p=2, **kw),
    "snapkv": SnapKV,
    "streaming": StreamingLLM,
    "knorm": KeyNorm,
    "random": RandomScorer,
}


def get_scorer(name: str | Scorer, **options) -> Scorer:
    """A scorer instance by registry name (or the instance itself)."""
    if isinstance(name, Scorer):
        return name
    try:
        factory = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; choose one of: {', '.join(sorted(SCORERS))}") from None
    return factory(**options)


__all__ = [
    "SCORERS", "H2O", "H2OValue", "KeyNorm", "RandomScorer", "ScoreInputs", "Scorer", "SnapKV",
    "StreamingLLM", "attention_blocks", "get_scorer",
]
