"""The unit every task produces: one (context, question, answer, metric) record."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample", "write_samples", "read_samples"]

_FIELDS = ("id", "task", "context", "question", "answer", "metric", "meta")


@dataclass
class Sample:
    """One evaluation or calibration item.

    ``answer`` is always a string (teacher forcing in calibration needs the text); a list answer (variable
    tracking) is written comma-separated.  For summarisation it is ``""`` until the evaluator fills it
    with the full-cache output.  ``metric`` names an entry of :data:`depthkv.tasks.metrics.METRICS`;
    ``meta`` holds JSON-serialisable details (depth, target length, seed, sources, ...).
    """

    id: str
    task: str
    context: str
    question: str
    answer: str
    metric: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (meta is deep-copied through JSON, so tuples become lists)."""
        return {
            "id": self.id,
            "task": self.task,
            "context": self.context,
            "question": self.question,
            "answer": self.answer,
            "metric": self.metric,
            "meta": json.loads(json.dumps(self.meta)),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        if not isinstance(d, dict):
            raise TypeError(f"Sample.from_dict needs a dict, got {type(d).__name__}")
        missing = [k for k in _FIELDS if k not in d and k != "meta"]
        if missing:
            raise ValueError(f"sample dict is missing {missing}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise ValueError(f"sample dict has unknown keys {unknown}")
        for k in _FIELDS[:-1]:
            if not isinstance(d[k], str):
                raise TypeError(f"sample field {k!r} must be a string, got {type(d[k]).__name__}")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise TypeError("sample field 'meta' must be a dict")
        return cls(**{k: d[k] for k in _FIELDS[:-1]}, meta=dict(meta))


def write_samples(path: str | os.PathLike, samples: Iterable[Sample]) -> None:
    """Write samples as JSONL (one :meth:`Sample.to_dict` per line)."""
    with open(path, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")


def read_samples(path: str | os.PathLike) -> list[Sample]:
    """Read samples written by :func:`write_samples` (errors name the line)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(Sample.from_dict(json.loads(line)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{i}: {e}") from e
    return out
