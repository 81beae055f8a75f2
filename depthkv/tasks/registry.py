"""Task registry and the single entry point :func:`generate`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from depthkv.tasks._common import CountFn, check_split, resolve_counter
from depthkv.tasks.sample import Sample

__all__ = ["TaskSpec", "TASKS", "register_task", "generate", "calibration_mix", "CALIBRATION_FAMILIES"]


@dataclass(frozen=True)
class TaskSpec:
    """A task family.

    ``make(n, seed, *, context_tokens, count, counter_name, split, **options) -> list[Sample]`` builds the
    samples; ``metric`` is the metric every sample of the family uses (``None`` when it comes from the
    data, as for ``jsonl``); ``needs_reference`` means the answer is filled from the full-cache output.
    """

    name: str
    make: Callable[..., list[Sample]]
    metric: str | None
    description: str
    needs_reference: bool = False
    synthetic: bool = True


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


def generate(
    task: str,
    n: int | None,
    seed: int,
    *,
    context_tokens: int = 2048,
    count_tokens: CountFn | None = None,
    split: str = "eval",
    **options,
) -> list[Sample]:
    """Generate ``n`` samples of ``task``.

    Same ``(task, n, seed, split, context_tokens, options)`` and counter → identical samples; sample ``i``
    is the same whatever ``n`` is.  ``split="calib"`` and ``"eval"`` draw from different seed streams and
    from disjoint halves of the corpus (files, passages and needle keys).  ``count_tokens`` is a tokenizer's
    length function; ``None`` approximates 4 characters per token.  Context lengths are within ~5 % of
    ``context_tokens`` (the ``lengths`` option of the needle tasks overrides it per sample).
    Unknown options raise ``TypeError``.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    check_split(split)
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(context_tokens, int) or context_tokens <= 0:
        raise ValueError(f"context_tokens must be a positive int, got {context_tokens!r}")
    count, counter_name = resolve_counter(count_tokens)
    spec = TASKS[task]
    if n is None and spec.synthetic:
        raise ValueError(f"{task}: n=None (all rows) only makes sense for file-backed tasks")
    return spec.make(
        n,
        int(seed),
        context_tokens=context_tokens,
        count=count,
        counter_name=counter_name,
        split=split,
        **options,
    )


CALIBRATION_FAMILIES = ("needle", "multikey", "vartrack", "gsm_inf", "code_next_line")


def calibration_mix(
    n: int,
    seed: int,
    context_tokens: int = 2048,
    count_tokens: CountFn | None = None,
    *,
    families: tuple[str, ...] = CALIBRATION_FAMILIES,
) -> list[Sample]:
    """The default calibration set: ``n`` samples spread evenly over ``families`` (split="calib").

    Family ``k`` gets ``n // len(families)`` samples, the first ``n % len(families)`` one more; the result
    interleaves the families round-robin so any prefix stays mixed.
    """
    if not families:
        raise ValueError("calibration_mix needs at least one family")
    k = len(families)
    per = [n // k + (i < n % k) for i in range(k)]
    groups = [
        generate(fam, m, seed, context_tokens=context_tokens, count_tokens=count_tokens, split="calib")
        for fam, m in zip(families, per)
    ]
    out: list[Sample] = []
    for j in range(max(per, default=0)):
        out.extend(g[j] for g in groups if j < len(g))
    return out
