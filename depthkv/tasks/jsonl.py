"""User data: one JSON object per line with ``context``, ``question`` and ``answer``.

Optional keys: ``id`` (string; default ``<file stem>:<line>``), ``metric`` (a registered metric, default
``substring``; for ``set_match`` the answer may be a list of strings), ``meta`` (object) and ``split``
(``"calib"``/``"eval"``: rows with a split are used only for that split, rows without one for both).
Blank lines are skipped.  Errors name the file and the line.  ``seed`` and ``context_tokens`` are not
used: rows are returned in file order, the first ``n`` of them (``n=None``: all).
"""

from __future__ import annotations

import json
import os

from depthkv.tasks._common import CountFn
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample

_REQUIRED = ("context", "question", "answer")
_OPTIONAL = ("id", "metric", "meta", "split")


class TaskDataError(ValueError):
    """A row of a user JSONL file is invalid (the message names file and line)."""


def load_jsonl(path: str | os.PathLike, *, split: str | None = None, task: str = "jsonl") -> list[Sample]:
    """Read and validate every row of ``path`` (optionally only those usable for ``split``)."""
    from depthkv.tasks.metrics import METRICS  # late: metrics registry

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"jsonl task: no such file {path!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    out: list[Sample] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue

            def bad(msg: str, lineno: int = lineno) -> TaskDataError:
                return TaskDataError(f"{path}:{lineno}: {msg}")

            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad(f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise bad(f"expected a JSON object, got {type(row).__name__}")
            missing = [k for k in _REQUIRED if k not in row]
            if missing:
                raise bad(f"missing required key(s) {missing}")
            unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))
            if unknown:
                raise bad(f"unknown key(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}")
            metric = row.get("metric", "substring")
            if metric not in METRICS:
                raise bad(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
            answer = row["answer"]
            if isinstance(answer, list) and metric == "set_match":
                if not answer or not all(isinstance(a, str) and a.strip() for a in answer):
                    raise bad("'answer' list must hold non-empty strings")
                answer = ", ".join(a.strip() for a in answer)
            for key, value in (
                ("context", row["context"]),
                ("question", row["question"]),
                ("answer", answer),
            ):
                if not isinstance(value, str):
                    raise bad(f"{key!r} must be a string, got {type(value).__name__}")
            if not row["context"].strip():
                raise bad("'context' is empty")
            if not answer.strip() and metric != "rouge":
                raise bad("'answer' is empty")
            meta = row.get("meta", {})
            if not isinstance(meta, dict):
                raise bad("'meta' must be an object")
            row_split = row.get("split")
            if row_split is not None and row_split not in ("calib", "eval"):
                raise bad(f"'split' must be 'calib' or 'eval', got {row_split!r}")
            sid = row.get("id", f"{stem}:{lineno}")
            if not isinstance(sid, str) or not sid:
                raise bad("'id' must be a non-empty string")
            if sid in seen:
                raise bad(f"duplicate id {sid!r} (first on line {seen[sid]})")
            seen[sid] = lineno
            if split is not None and row_split not in (None, split):
                continue
            out.append(
                Sample(
                    id=sid,
                    task=task,
                    context=row["context"],
                    question=row["question"],
                    answer=answer,
                    metric=metric,
                    meta={**meta, "source_file": path, "line": lineno},
                )
            )
    return out


def _make(
    n: int | None,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    path: str | os.PathLike | None = None,
) -> list[Sample]:
    if path is None:
        raise TypeError("jsonl task needs path=<file.jsonl>")
    rows = load_jsonl(path, split=split)
    for s in rows:
        s.meta.setdefault("n_tokens", count(s.context))
        s.meta.setdefault("counter", counter_name)
    return rows if n is None else rows[:n]


register_task(
    TaskSpec(
        name="jsonl",
        make=_make,
        metric=None,
        description="user rows {context, question, answer[, id, metric, meta, split]} from path=<file.jsonl>",
        synthetic=False,
    )
)
