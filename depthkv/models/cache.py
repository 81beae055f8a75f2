"""The on-disk cache of converted (safetensors) models and its manifest.

Layout (root = ``$DEPTHKV_CACHE`` or ``~/.cache/depthkv/models``)::

    <root>/<alias>/                 converted model folder (config, safetensors, tokenizer)
    <root>/<alias>/depthkv_manifest.json   written last; its presence marks a finished build
    <root>/gguf-<sha256>/           conversions of user-supplied .gguf files
    <root>/<name>/                  a .gguf registered under a name (``depthkv models add NAME --gguf F``)
    <root>/_downloads/<alias>/      wheels and assembled GGUF while fetching
    <root>/.tmp-*                   work folders, renamed into place when complete
    <root>/.<key>.lock              per-entry lock so two processes do not build at once

A folder is trusted only if its manifest parses and every listed file exists
with the recorded size and a readable safetensors header.  A full sha256
check of every file runs only when asked (``verify=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthkv.io import cache_root, write_json

from .hashing import sha256_file

MANIFEST_NAME = "depthkv_manifest.json"
MANIFEST_FORMAT = 1
_MAX_HEADER = 100 * 1024 * 1024


def cache_dir(*, create: bool = True) -> Path:
    """Root folder of the model cache (created if missing, unless ``create=False``)."""
    root = cache_root() / "models"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def entry_dir(key: str) -> Path:
    """Final folder of one cache entry (an alias name or ``gguf-<sha256>``)."""
    return cache_dir() / key


def downloads_dir(key: str) -> Path:
    path = cache_dir() / "_downloads" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_work_dir(key: str) -> Path:
    """A fresh temp folder on the cache's filesystem, so it can be renamed into place."""
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir()))


def remove_stale_work_dirs(key: str) -> None:
    """Delete work folders left by interrupted builds of ``key`` (call while holding its lock)."""
    for path in cache_dir().glob(f".tmp-{key}-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(key: str) -> Iterator[None]:
    """Exclusive inter-process lock for building one entry (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(cache_dir() / f".{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every regular file in ``folder`` (the manifest excluded)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            files[path.relative_to(folder).as_posix()] = {
                "size": path.stat().st_size,
                "sha256": sha256_file(path, desc=f"hash {path.name}"),
            }
    return files


def install(work: Path, final: Path) -> None:
    """Move a finished work folder into place, replacing any stale folder there."""
    os.chmod(work, 0o755)
    for path in work.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)


def discard(path: Path) -> None:
    """Remove a cache entry (folder or file) if present."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / MANIFEST_NAME, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_safetensors_header(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None if its header and length agree.

    Reads only the header: a truncated file is caught because the largest
    tensor end offset must land exactly on the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return "file shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                return f"header length {n} does not fit in a {size}-byte file"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable header ({exc.__class__.__name__}: {exc})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            return f"bad entry for tensor {name!r}"
    if 8 + n + end != size:
        return f"data ends at byte {8 + n + end} but the file has {size} bytes"
    return None


@dataclass
class CacheCheck:
    """Result of validating a cache folder."""

    ok: bool
    reason: str = ""
    manifest: dict[str, Any] | None = None


def validate(folder: Path, *, verify: bool = False) -> CacheCheck:
    """Check a converted-model folder against its manifest (sizes + headers; hashes if ``verify``)."""
    if not folder.is_dir():
        return CacheCheck(False, "missing")
    manifest = read_manifest(folder)
    if manifest is None:
        return CacheCheck(False, "no readable manifest (conversion never finished?)")
    if manifest.get("format") != MANIFEST_FORMAT:
        return CacheCheck(False, f"manifest format {manifest.get('format')!r} != {MANIFEST_FORMAT}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not any(name.endswith(".safetensors") for name in files):
        return CacheCheck(False, "manifest lists no safetensors files")
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            return CacheCheck(False, f"{name} is missing")
        size = path.stat().st_size
        if size != info.get("size"):
            return CacheCheck(False, f"{name} has {size} bytes, manifest says {info.get('size')}")
        if name.endswith(".safetensors"):
            problem = check_safetensors_header(path)
            if problem:
                return CacheCheck(False, f"{name}: {problem}")
    if verify:
        for name, info in files.items():
            actual = sha256_file(folder / name, desc=f"verify {name}")
            if actual != info.get("sha256"):
                return CacheCheck(False, f"{name} sha256 {actual} != manifest {info.get('sha256')}")
    return CacheCheck(True, manifest=manifest)


def remembered_sha256(path: Path) -> str:
    """sha256 of a user file, memoised in ``<root>/_gguf_index.json`` by (path, size, mtime).

    Saves re-hashing a multi-GB .gguf on every :func:`load_gguf_file` call.
    """
    path = path.resolve()
    stat = path.stat()
    index_path = cache_dir() / "_gguf_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
    ):
        return str(entry["sha256"])
    digest = sha256_file(path, desc=f"hash {path.name}")
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):
        write_json(index_path, index, sort_keys=True)
    return digest
