"""Progress bars and concise timing messages on stderr.

Set ``DEPTHKV_QUIET=1`` to silence both (messages about rebuilding a corrupt
cache are still printed, since they explain a slow load).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("DEPTHKV_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def log(message: str, *, force: bool = False) -> None:
    """Print one line to stderr, prefixed so it is easy to grep."""
    if force or not quiet():
        print(f"[depthkv.models] {message}", file=sys.stderr, flush=True)


def bar(total: int | None, desc: str, *, unit: str = "B", show: bool = True) -> tqdm:
    """A tqdm bar on stderr (hidden when quiet or ``show`` is False); byte bars scale to MB/GB."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=quiet() or not show,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


@contextmanager
def timed(label: str, timings: dict[str, float] | None = None, key: str | None = None) -> Iterator[None]:
    """Time a step, log ``label: N.Ns`` and optionally record it in ``timings[key or label]``."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[key or label] = round(seconds, 3)
    log(f"{label}: {seconds:.1f}s")
