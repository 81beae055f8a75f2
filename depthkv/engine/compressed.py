"""A compressed context: a context prefilled and pruned once, kept in memory or saved to a file.

``Press.compress(context_ids)`` returns a :class:`CompressedContext`; ``Press.answer(comp, question_ids)``
appends a question to a copy of its cache and generates (the query-agnostic setting of KV-cache
compression: one compressed context serves many questions). ``comp.save(path)`` writes it to one
safetensors file and ``CompressedContext.load(path, model)`` reads it back for the same model, in this or
another process, so that the prefill and pruning are paid once.

File layout (``schema_version`` 1), no pickle anywhere:

* tensors: ``layers.<l>.keys`` / ``layers.<l>.values`` ``[batch, kv_heads, B_l, head_dim]`` and, for a
  pruned layer, ``layers.<l>.kept_pos`` ``[batch, kv_heads, P_l]`` (logical positions of the kept tokens);
  ``context_ids`` ``[batch, N]``; ``logits`` (the last context token's logits);
* metadata ``depthkv``: a JSON header with ``kind`` ("depthkv-compressed-context"), ``schema_version``,
  ``depthkv_version``, ``created``, ``model`` (``depthkv.models.identity.model_identity``: name, layer count,
  config sha256, ...), ``compression`` (scorer, ratio, strategy, profile sha256, protection, protected
  layers, mode, chunk size, the scorer with its options), ``budgets``, ``dtype``, ``context`` (token count,
  the context text when known), ``layers`` (each layer's scalar facts, from ``depthkv.engine.cache.layer_state``) and
  ``tensors_sha256`` (sha256 over every tensor's bytes, so that a corrupt file is refused, not decoded).

Loading checks the file against the model (layer count and config hash must match: a cache made by
another model is meaningless to this one) and puts the tensors on the model's device. dtype policy: a file
whose cache dtype differs from the model's is converted to the model's dtype and the context records a
note (``comp.note``, also issued as a :class:`CompressedContextWarning`); up-casting is exact, down-casting
rounds the cached keys/values exactly as a prefill in the lower precision would round its outputs, and in
both cases the cache was computed by the other-precision model, so answers may differ slightly from the
compressing process's. Writes are atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from depthkv.allocation.budgets import BudgetError, Budgets
from depthkv.engine.cache import kv_bytes, kv_bytes_ragged, layer_from_state, layer_state
from depthkv.engine.tensor_parallel import kv_shards
from depthkv.io import atomic_path
from depthkv.models.identity import model_identity

KIND = "depthkv-compressed-context"
SCHEMA_VERSION = 1
HEADER_KEY = "depthkv"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CompressedContextError(ValueError):
    """A compressed-context file that is missing, truncated, corrupt, not depthkv's, or for another model."""


class CompressedContextWarning(UserWarning):
    """A compressed context was loaded with a conversion (e.g. float32 cache into a bfloat16 model)."""


@dataclass(frozen=True)
class CompressionSettings:
    """How a context was compressed: recorded in the file so that a result can be traced and reproduced."""

    scorer: str
    ratio: float | None = None
    strategy: str | None = None
    profile_sha256: str | None = None
    n_sink: int = 4
    n_recent: int = 16
    protected_layers: tuple[int, ...] = ()
    mode: str = "post"
    chunk_size: int | None = None
    head_budgets: bool = False
    scorer_config: str | None = None  # the scorer with every option it was built with (its repr)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "protected_layers": list(self.protected_layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionSettings:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["protected_layers"] = tuple(int(p) for p in known.get("protected_layers", ()))
        return cls(**known)


def profile_sha256(profile: Any) -> str | None:
    """sha256 of a calibration profile's canonical JSON (sorted keys), or None without a profile."""
    if profile is None:
        return None
    data = getattr(profile, "data", profile)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}\n".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def _model_name(model: Any) -> str:
    return getattr(model, "name_or_path", None) or type(model).__name__


@dataclass(eq=False)
class CompressedContext:
    """A context prefilled and pruned once; ``Press.answer`` appends questions to copies of its cache.

    ``cache`` holds the pruned per-layer keys/values, ``context_ids`` the context's tokens ``[batch, N]``,
    ``logits`` the last context token's logits, ``budgets`` the tokens kept per layer. ``model`` is the
    identity of the model that compressed it, ``settings`` how it was compressed, ``context_text`` the
    context string when the caller knows it (the CLI stores it so that ``depthkv ask`` can tokenise a
    question exactly as the full prompt would be tokenised), ``note`` what loading had to convert.
    """

    cache: DynamicCache
    context_ids: torch.Tensor
    logits: torch.Tensor
    budgets: Budgets | None
    model: dict[str, Any] = field(default_factory=dict)
    settings: CompressionSettings | None = None
    context_text: str | None = None
    note: str | None = None

    # ------------------------------------------------------------------ measurements
    @property
    def n_tokens(self) -> int:
        """Context length N (tokens prefilled)."""
        return int(self.context_ids.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None:
                return layer.keys.dtype
        return self.logits.dtype

    def kv_bytes(self) -> int:
        """Bytes the kept keys and values take, measured on the cache tensors."""
        return kv_bytes(self.cache)

    def kv_bytes_ragged(self) -> int:
        """Bytes of the KV pairs really kept: with per-head budgets, :meth:`kv_bytes` without the padding that
        stores a layer's heads at one length."""
        return kv_bytes_ragged(self.cache)

    def full_kv_bytes(self) -> int:
        """Bytes a full cache of the same context would take: each layer's per-token bytes (read off its real
        tensors) times the logical length."""
        total = 0
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.shape[-2] == 0:
                continue
            n = layer.get_seq_length()
            for t in (layer.keys, layer.values):
                total += t.numel() // t.shape[-2] * t.element_size() * n
        return total

    # ------------------------------------------------------------------ header
    def header(self) -> dict[str, Any]:
        """The JSON header written into the file (without the tensor checksum)."""
        from depthkv import __version__

        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "depthkv_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": dict(self.model),
            "compression": self.settings.to_dict() if self.settings is not None else None,
            "budgets": self.budgets.to_dict() if self.budgets is not None else None,
            "dtype": dtype_name(self.dtype),
            "context": {"n_tokens": self.n_tokens, "batch": int(self.context_ids.shape[0]),
                        "text": self.context_text},
            "layers": [layer_state(layer)[1] for layer in self.cache.layers],
        }

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the context to one safetensors file, atomically; returns the path written."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {
            "context_ids": self.context_ids.detach().to("cpu", torch.long).contiguous(),
            "logits": self.logits.detach().to("cpu").contiguous(),
        }
        for i, layer in enumerate(self.cache.layers):
            for name, t in layer_state(layer)[0].items():
                tensors[f"layers.{i}.{name}"] = t.detach().to("cpu").contiguous()
        header = self.header()
        header["tensors_sha256"] = _tensors_sha256(tensors)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt", HEADER_KEY: json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module) -> CompressedContext:
        """Read a file written by :meth:`save` for ``model``; onto the model's device and dtype (see the module
        docstring). Raises :class:`CompressedContextError` for a foreign, truncated or corrupt file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        header = read_header(path)
        check_model(header, model, path)
        try:
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CompressedContextError(f"{path} is truncated or corrupt ({exc})") from None
        if _tensors_sha256(tensors) != header.get("tensors_sha256"):
            raise CompressedContextError(f"{path} is corrupt: its tensors do not match the checksum in its header")
        try:
            comp = cls._from_parts(header, tensors)
        except (AttributeError, KeyError, TypeError, ValueError, BudgetError) as exc:
            raise CompressedContextError(f"{path} is not a valid compressed context ({exc})") from None
        comp._check_shapes(model, path)
        return comp._to_model(model)

    @classmethod
    def _from_parts(cls, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CompressedContext:
        cache = DynamicCache()
        cache.layers = []
        for i, meta in enumerate(header["layers"]):
            prefix = f"layers.{i}."
            own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            try:
                cache.layers.append(layer_from_state(own, meta))
            except ValueError as exc:
                raise ValueError(f"layer {i}: {exc}") from None
        budgets = Budgets.from_dict(header["budgets"]) if header.get("budgets") else None
        settings = CompressionSettings.from_dict(header["compression"]) if header.get("compression") else None
        return cls(cache, tensors["context_ids"], tensors["logits"], budgets, dict(header["model"]), settings,
                   header["context"].get("text"))

    def _check_shapes(self, model: torch.nn.Module, path: Path) -> None:
        ident = model_identity(model, _model_name(model))
        n_heads = ident["n_kv_heads"] // kv_shards(model)  # a tensor-parallel rank holds its shard of the heads
        batch, n = self.context_ids.shape if self.context_ids.ndim == 2 else (-1, -1)
        if self.context_ids.ndim != 2 or self.context_ids.is_floating_point():
            raise CompressedContextError(f"{path} is not a valid compressed context (context ids are not [batch, N])")
        for i, layer in enumerate(self.cache.layers):
            if getattr(layer, "keys", None) is None:
                continue
            b, h, _, d = layer.keys.shape
            if (b, h, d) != (batch, n_heads, ident["head_dim"]) or layer.get_seq_length() != n:
                raise CompressedContextError(
                    f"{path} is not a valid compressed context (layer {i} holds {b} x {h} heads x {d} dims for "
                    f"{layer.get_seq_length()} tokens; expected {batch} x {n_heads} x "
                    f"{ident['head_dim']} for {n})")
        if self.budgets is not None and self.budgets.n_layers != ident["n_layers"]:
            raise CompressedContextError(f"{path} is not a valid compressed context (budgets for "
                                         f"{self.budgets.n_layers} layers, the model has {ident['n_layers']})")

    def _to_model(self, model: torch.nn.Module) -> CompressedContext:
        """This context moved onto ``model``'s device and converted to its dtype (with a note if converted)."""
        device, dtype = _model_device(model), _model_dtype(model)
        if self.dtype != dtype:
            self.note = (f"the cache was saved in {dtype_name(self.dtype)} and converted to the model's "
                         f"{dtype_name(dtype)}; answers may differ slightly from the compressing run's")
            warnings.warn(self.note, CompressedContextWarning, stacklevel=3)
        for i, layer in enumerate(self.cache.layers):  # through layer_state: every layer field moves along
            tensors, meta = layer_state(layer)
            moved = {k: t.to(device, dtype) if t.is_floating_point() else t.to(device) for k, t in tensors.items()}
            self.cache.layers[i] = layer_from_state(moved, meta)
        self.context_ids = self.context_ids.to(device)
        self.logits = self.logits.to(device, dtype)
        return self


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a compressed-context file (no tensors read); CompressedContextError if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CompressedContextError(f"{path} does not exist or is not a file")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CompressedContextError(f"{path} is not a compressed context: not a readable safetensors file "
                                     f"(truncated or corrupt? {exc})") from None
    text = meta.get(HEADER_KEY)
    if text is None:
        raise CompressedContextError(f"{path} is a safetensors file but not a depthkv compressed context")
    try:
        header = json.loads(text)
    except json.JSONDecodeError:
        raise CompressedContextError(f"{path} has a corrupt depthkv header (invalid JSON)") from None
    if not isinstance(header, dict) or header.get("kind") != KIND:
        raise CompressedContextError(f"{path} is a safetensors file but not a depthkv compressed context")
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CompressedContextError(
            f"{path} has compressed-context schema {version}; this depthkv reads schema {SCHEMA_VERSION}")
    missing = [k for k in ("model", "layers", "context", "dtype", "tensors_sha256") if k not in header]
    if missing or not isinstance(header["model"], dict) or not isinstance(header["layers"], list):
        raise CompressedContextError(f"{path} has a corrupt depthkv header (lacks {missing[0] if missing else 'model'!r})")
    return header


def check_model(header: dict[str, Any], model: torch.nn.Module, path: str | Path = "the file") -> None:
    """Raise CompressedContextError unless ``header`` was written for ``model`` (layer count and config hash)."""
    mine = header["model"]
    ident = model_identity(model, _model_name(model))
    if any(mine.get(k) != ident[k] for k in ("n_layers", "config_sha256")) or len(header["layers"]) != ident["n_layers"]:
        raise CompressedContextError(
            f"{path} was compressed by {mine.get('name')!r} ({mine.get('n_layers')} layers, config "
            f"{str(mine.get('config_sha256'))[:12]}), not by this model ({ident['n_layers']} layers, config "
            f"{ident['config_sha256'][:12]}); compress the context with this model")


def header_dtype(header: dict[str, Any]) -> torch.dtype | None:
    """The cache dtype recorded in a header (None if unknown)."""
    return _DTYPES.get(header.get("dtype", ""))


__all__ = [
    "CompressedContext", "CompressedContextError", "CompressedContextWarning", "CompressionSettings",
    "check_model", "header_dtype", "profile_sha256", "read_header",
]
