"""Atomic file writes (a reader, or a crash half-way, never sees a half-written file) and the cache root.

Every JSON and CSV file depthkv writes (profiles, budget vectors, evaluation configs and summaries, transfer
tables, the model cache's manifests) goes through :func:`atomic_write`: the text is written to a temporary
file in the destination folder, flushed and fsynced, then renamed over the destination with ``os.replace``
(atomic on POSIX and Windows when both names lie on one file system, which the shared folder guarantees).
This module imports nothing from depthkv, so every package may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "cache_root", "write_json"]


def cache_root() -> Path:
    """Base folder of depthkv's on-disk caches (models, parsed corpus, generated samples):
    ``$DEPTHKV_CACHE`` or ``~/.cache/depthkv``. Not created here."""
    env = os.environ.get("DEPTHKV_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "depthkv"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file name beside ``path`` for writers that take a name (safetensors, an image library).

    When the ``with`` block ends without an exception the file is synced to disk, given the permission bits
    ``mode`` (``mkstemp`` creates 0600; results are meant to be shared) and renamed over ``path``; on an
    exception it is removed and ``path`` keeps its old content (or stays absent). The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, newline: str | None = None, mode: int = 0o644,
                 binary: bool = False) -> Iterator[IO]:
    """A UTF-8 text file (``binary``: a bytes file) that replaces ``path`` when the ``with`` block ends without an
    exception (see :func:`atomic_path`). ``newline`` is passed to ``open`` (``""`` for the csv module)."""
    with atomic_path(path, mode=mode) as tmp:
        if binary:
            with open(tmp, "wb") as fh:
                yield fh
        else:
            with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
                yield fh


def write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically; return the path."""
    with atomic_write(path, binary=True) as fh:
        fh.write(payload)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON (UTF-8, one trailing newline) to ``path`` atomically; return the path."""
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
        fh.write("\n")
    return Path(path)
