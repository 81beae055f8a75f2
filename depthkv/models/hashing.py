"""Streaming sha256 of files, with an optional progress bar."""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import _report
from .errors import ModelFileError

CHUNK = 8 * 1024 * 1024
BAR_MIN_BYTES = 64 * 1024 * 1024  # no progress bar for small files


def sha256_file(path: str | Path, *, desc: str | None = None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (constant memory)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as fh,
        _report.bar(size, desc or f"hash {path.name}", show=size >= BAR_MIN_BYTES) as pbar,
    ):
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            pbar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, *, actual: str | None = None) -> str:
    """Check a file's sha256 against ``expected``; return it or raise :class:`ModelFileError`.

    Pass ``actual`` when the hash was already computed while writing the file.
    """
    actual = actual or sha256_file(path)
    if actual.lower() != expected.lower():
        raise ModelFileError(
            f"checksum mismatch for {path}: expected sha256 {expected.lower()}, got {actual.lower()}"
        )
    return actual
