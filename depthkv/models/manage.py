"""``depthkv models add`` / ``depthkv models list``: put a local GGUF into the model cache, and show the cache.

``add_model(ALIAS, file)`` for a built-in alias checks the file against the alias's size and sha256 and
converts it into the cache entry the alias's own fetch would have built (same key, same manifest source),
so ``load_model(ALIAS)`` then works offline.  ``add_model(NAME, file)`` for any other plain name converts
the file into ``<cache>/<NAME>/`` and records the file's sha256; ``load_model(NAME)`` loads it afterwards.

Every check (name, size, sha256, GGUF header, tensor data present) runs before anything is written, and
the conversion itself builds in a temp folder that is renamed into place only when complete
(:func:`depthkv.models.convert.convert_gguf`), so a failed ``add`` leaves no cache entry behind.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _report, cache, convert
from .aliases import AliasSpec, get_alias
from .errors import DepthKVModelError, ModelFileError
from .gguf_header import check_gguf_complete
from .hashing import sha256_file, verify_sha256

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED_PREFIXES = ("gguf-",)  # user .gguf files loaded by path are cached as gguf-<sha256>
NAME_RULE = "a plain name of letters, digits, '.', '_' and '-' (starting with a letter or digit), e.g. my-model"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be registered as a model name (None when it can)."""
    if not name or not name.strip():
        return "the model name is empty"
    if name.startswith(("/", ".", "~")) or "\\" in name or name.lower().endswith(".gguf") or name.count("/") > 1:
        return f"{name!r} looks like a file path; give {NAME_RULE}"
    if "/" in name:
        return f"{name!r} looks like a Hugging Face hub id (owner/name); give {NAME_RULE}"
    if not NAME_RE.fullmatch(name):
        return f"{name!r} is not a valid model name; give {NAME_RULE}"
    if name.lower().startswith(RESERVED_PREFIXES):
        return f"{name!r} starts with {', '.join(RESERVED_PREFIXES)}, which the cache reserves; pick another name"
    return None


def registered_folder(name: str) -> Path | None:
    """The cache folder of a name registered with ``models add`` (None if there is none; nothing created)."""
    if get_alias(name) is not None or name_problem(name) is not None:
        return None
    folder = cache.cache_dir(create=False) / name
    return folder if folder.is_dir() else None


def registered_source(name: str, gguf: Path, sha256: str) -> dict[str, Any]:
    """Manifest fields of a registered name: where its GGUF came from and what it hashed to."""
    return {"name": name, "registered": True, "gguf_file": str(gguf.resolve()), "gguf_sha256": sha256,
            "gguf_size": gguf.stat().st_size}


@dataclass
class AddResult:
    """Outcome of :func:`add_model`."""

    name: str
    kind: str  # "alias" | "registered"
    folder: Path
    sha256: str
    converted: bool  # False when an identical entry was already cached
    seconds: float
    dtype: str | None = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def _check_alias_file(spec: AliasSpec, gguf: Path) -> str:
    size = gguf.stat().st_size
    if size != spec.size:
        raise ModelFileError(
            f"{gguf} has {size:,} bytes but alias {spec.name!r} is {spec.gguf_filename} of {spec.size:,} bytes "
            f"({'truncated' if size < spec.size else 'a different file'}); nothing was added"
        )
    actual = sha256_file(gguf, desc=f"hash {gguf.name}")
    try:
        verify_sha256(gguf, spec.sha256, actual=actual)
    except ModelFileError as exc:
        raise ModelFileError(f"{exc} (alias {spec.name!r}); nothing was added") from None
    check_gguf_complete(gguf)
    return actual


def _convert(gguf: Path, key: str, source: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    try:
        return convert.convert_gguf(gguf, key, source=source)
    except DepthKVModelError:
        raise
    except Exception as exc:  # transformers' GGUF reader fails in many ways on a damaged file
        raise ModelFileError(f"could not convert {gguf} ({_one_line(exc)}); nothing was added") from exc


def add_model(name: str, gguf: str | Path, *, force: bool = False) -> AddResult:
    """Convert a local GGUF into the cache under a built-in alias (sha256-checked) or a new plain name.

    An entry already converted from the same bytes is kept as is unless ``force``.  A registered name that
    holds another file is only replaced with ``force``.  Raises :class:`ModelFileError` (nothing written)
    on a bad name, a missing/truncated/corrupt file or a checksum mismatch.
    """
    start = time.perf_counter()
    spec = get_alias(name)
    if spec is None:
        problem = name_problem(name)
        if problem:
            raise ModelFileError(f"cannot register {problem}")
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    if spec is not None:
        digest = _check_alias_file(spec, path)
        source = {**spec.manifest_source(), "added_from": str(path.resolve())}
        kind = "alias"
    else:
        check_gguf_complete(path)  # not a GGUF, unreadable header or cut-off data: fail before hashing
        digest = sha256_file(path, desc=f"hash {path.name}")
        source = registered_source(name, path, digest)
        kind = "registered"
    folder = cache.entry_dir(name)
    with cache.entry_lock(name):
        check = cache.validate(folder)
        old_sha = (check.manifest or {}).get("gguf_sha256") if check.ok else None
        if old_sha == digest and not force:
            _report.log(f"{name} is already in the cache ({folder}); nothing to do (--force converts again)")
            return AddResult(name, kind, folder, digest, False, time.perf_counter() - start,
                             (check.manifest or {}).get("dtype"))
        if kind == "registered" and folder.exists() and not force:
            held = f"sha256 {old_sha}" if old_sha else f"an unusable entry ({check.reason})"
            raise ModelFileError(
                f"{name!r} is already registered in {folder} ({held}); pass --force to replace it with {path}"
            )
        cache.remove_stale_work_dirs(name)
        final, manifest = _convert(path, name, source)
    check = cache.validate(final)
    if not check.ok:  # pragma: no cover - convert_gguf validates what it wrote
        raise ModelFileError(f"freshly converted cache {final} failed validation: {check.reason}")
    return AddResult(name, kind, final, digest, True, time.perf_counter() - start, manifest.get("dtype"))


# ---------------------------------------------------------------------------------------------- listing
@dataclass
class CacheEntry:
    """One folder of the model cache, as ``depthkv models list`` shows it."""

    name: str
    kind: str  # alias | registered | gguf-file | unknown
    path: str
    size: int  # bytes on disk (sum of file sizes)
    dtype: str | None
    sha256: str | None  # sha256 of the source GGUF
    source: str | None  # the GGUF it was converted from
    ok: bool
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models() -> list[CacheEntry]:
    """Every converted model in the cache (nothing is created or changed)."""
    root = cache.cache_dir(create=False)
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        manifest = cache.read_manifest(folder) or {}
        check = cache.validate(folder)
        if manifest.get("alias"):
            kind, source = "alias", manifest.get("added_from") or "PyPI wheels: " + ", ".join(manifest.get("wheels", []))
        elif manifest.get("registered"):
            kind, source = "registered", manifest.get("gguf_file")
        elif folder.name.startswith("gguf-"):
            kind, source = "gguf-file", manifest.get("gguf_file")
        else:
            kind, source = "unknown", None
        out.append(CacheEntry(folder.name, kind, str(folder), _folder_size(folder), manifest.get("dtype"),
                              manifest.get("gguf_sha256"), source, check.ok, "" if check.ok else check.reason))
    return out


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def format_listing(entries: list[CacheEntry]) -> str:
    """A table of the cache (one line per model) followed by the cache root."""
    root = cache.cache_dir(create=False)
    if not entries:
        return f"no models in the depthkv cache ({root})"
    rows = [("NAME", "KIND", "SIZE", "DTYPE", "STATUS", "SOURCE SHA256", "PATH")]
    for e in entries:
        status = "ok" if e.ok else f"broken: {e.problem}"
        rows.append((e.name, e.kind, human_size(e.size), e.dtype or "-", status, e.sha256 or "-", e.path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    total = sum(e.size for e in entries)
    lines.append(f"{len(entries)} model{'s' * (len(entries) != 1)}, {human_size(total)} in {root}")
    return "\n".join(lines)
