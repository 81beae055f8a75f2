"""Where a model runs and in which dtype: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.

``auto`` picks the first CUDA device when torch sees one, else the CPU.  The default dtype follows the
device: bfloat16 on CUDA, float32 on the CPU (``dtype="auto"`` or ``None``); an explicit dtype always wins.
Both resolvers only inspect torch's CUDA state (no allocation, no model work), so a bad ``--device`` fails
at once, before anything is fetched or loaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .errors import DepthKVModelError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip
_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(DepthKVModelError):
    """A device or dtype that cannot be used here (unknown string, CUDA missing, no such GPU)."""


def _cuda_missing(text: str) -> DeviceError:
    if torch.version.cuda is None:
        why = f"this torch build ({torch.__version__}) has no CUDA support"
    else:
        why = "torch sees no CUDA device (driver missing, or CUDA_VISIBLE_DEVICES hides every GPU)"
    return DeviceError(f"device {text!r} needs CUDA, but {why}; use --device cpu or auto")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The concrete device for ``device`` (``cuda`` becomes ``cuda:<current>``), or :class:`DeviceError`."""
    if isinstance(device, torch.device):
        text = str(device)
    else:
        text = "auto" if device is None else str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", _current_cuda()) if torch.cuda.is_available() else torch.device("cpu")
    if re.fullmatch(r"cpu(?::\d+)?", text):
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise DeviceError(f"unknown device {text!r}; use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise _cuda_missing(text)
    count = torch.cuda.device_count()
    index = _current_cuda() if match.group(1) is None else int(match.group(1))
    if index >= count:
        raise DeviceError(
            f"device {text!r} does not exist: torch sees {count} CUDA device{'s' * (count != 1)} "
            f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})"
        )
    return torch.device("cuda", index)


def _current_cuda() -> int:
    """The current CUDA device index, without initialising CUDA just to ask (0 until someone did)."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def resolve_dtype(dtype: Any = "auto", device: str | torch.device | None = "cpu") -> torch.dtype:
    """``dtype`` as a torch dtype; ``auto``/None: bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    text = "auto" if dtype is None else str(dtype).strip().lower().removeprefix("torch.")
    if text == "auto":
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        return _DTYPES[text]
    except KeyError:
        raise DeviceError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def model_device(model: Any) -> torch.device:
    """The device a model's (first) parameters live on; the CPU for a parameter-less module."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
