"""De-quantise a GGUF once and store it as a safetensors folder in the cache.

The conversion uses transformers' own GGUF support
(``from_pretrained(folder, gguf_file=name)``).  Small models (< 500M
parameters) are stored in float32; larger ones in float16 so a 1.5B model
takes 3 GB of disk rather than 6 GB.  Everything is written into a temp
folder, the manifest last, and the folder is then renamed into place, so an
interrupted conversion never looks like a good cache entry.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import time
from pathlib import Path
from typing import Any

import torch

from depthkv.io import write_json

from . import _report, cache
from .errors import ModelFileError
from .gguf_header import read_gguf_info

FP32_MAX_PARAMS = 500_000_000


def storage_dtype(n_params: int) -> torch.dtype:
    """float32 below 500M parameters, float16 from there on."""
    return torch.float32 if n_params < FP32_MAX_PARAMS else torch.float16


def package_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("depthkv", "transformers", "torch", "gguf", "safetensors", "tokenizers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    return versions


def _force_dequantise_kwargs() -> dict[str, Any]:
    """Ask for a fully unpacked model where transformers could keep GGUF blocks packed.

    Newer transformers (with the ``kernels`` package) may leave weights in GGUF
    blocks, which cannot be saved as plain safetensors; ``GgufConfig(dequantize=True)``
    turns that off.  Older versions always de-quantise and have no such option.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    try:
        return {"quantization_config": GgufConfig(dequantize=True)}
    except TypeError:
        return {}


def _check_dense(model: Any, gguf_path: Path) -> None:
    packed = getattr(getattr(model, "hf_quantizer", None), "packed_modules", None)
    not_float = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed or not_float:
        raise ModelFileError(
            f"transformers kept weights of {gguf_path.name} packed ({len(packed or not_float)} modules, e.g. "
            f"{next(iter(packed or not_float))}); cannot store them as plain safetensors"
        )


def dequantise_gguf(gguf_path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load model and tokenizer from a GGUF file with transformers (the slow step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, local_files_only=True, **_force_dequantise_kwargs()
    )
    _check_dense(model, gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model, tokenizer


def _strip_gguf_quantisation(model: Any) -> None:
    """Make the de-quantised model save and reload as a plain float model."""
    config = model.config
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]


def convert_gguf(gguf_path: Path, key: str, *, source: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Convert ``gguf_path`` into the cache entry ``key``; return (folder, manifest).

    ``source`` is merged into the manifest (alias, wheel list, gguf sha256, ...).
    """
    gguf_path = Path(gguf_path)
    info = read_gguf_info(gguf_path)
    load_dtype = storage_dtype(info.n_params)
    work = cache.make_work_dir(key)
    start = time.perf_counter()
    try:
        _report.log(
            f"de-quantising {gguf_path.name} ({info.architecture}, {info.n_params / 1e6:.0f}M params) "
            f"to {str(load_dtype).removeprefix('torch.')} — done once, then cached"
        )
        timings: dict[str, float] = {}
        with _report.timed("de-quantise GGUF", timings, key="dequantise"):
            model, tokenizer = dequantise_gguf(gguf_path, load_dtype)
        n_params = int(sum(p.numel() for p in model.parameters()))
        dtype = storage_dtype(n_params)
        if model.dtype != dtype:
            model = model.to(dtype)
        _strip_gguf_quantisation(model)
        with _report.timed("save safetensors", timings, key="save"):
            model.save_pretrained(work)
            if tokenizer is not None:
                tokenizer.save_pretrained(work)
        del model, tokenizer
        gc.collect()
        files = cache.describe_files(work)
        if not any(name.endswith(".safetensors") for name in files):
            raise ModelFileError(f"conversion of {gguf_path} wrote no safetensors file into {work}")
        manifest = {
            "format": cache.MANIFEST_FORMAT,
            "key": key,
            **source,
            "gguf_architecture": info.architecture,
            "gguf_name": info.name,
            "n_params": n_params,
            "dtype": str(dtype).removeprefix("torch."),
            "files": files,
            "packages": package_versions(),
            "conversion_seconds": round(time.perf_counter() - start, 3),
            "timings": timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(work / cache.MANIFEST_NAME, manifest, sort_keys=True)  # last: marks the build complete
        final = cache.entry_dir(key)
        cache.install(work, final)  # also makes the folder world-readable (mkdtemp makes it 0700)
    except BaseException:
        cache.discard(work)
        raise
    _report.log(f"converted {gguf_path.name} -> {final} in {manifest['conversion_seconds']:.1f}s")
    return final, manifest
