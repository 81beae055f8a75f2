"""depthkv.models: load the causal LMs that DepthKV profiles and prunes.

- :func:`load_model` — built-in offline alias, registered name, local folder / .gguf, or hub id,
  on ``device="auto"|"cpu"|"cuda"|"cuda:N"`` (bfloat16 on CUDA, float32 on CPU by default).
- :func:`load_gguf_file` — convert-and-cache a user-supplied .gguf.
- :func:`add_model` / :func:`list_models` — ``depthkv models add`` / ``list``: a local GGUF into the cache.
- :func:`resolve_device` / :func:`resolve_dtype` — the device and dtype rules, checked before any work.
- :func:`fetch_alias` / :func:`cache_dir` — the download and cache helpers.
- :func:`model_identity` — fingerprint binding a profile to a model.
- :func:`tiny_model` — tiny random LMs for tests.
"""

from .aliases import ALIASES, AliasSpec, WheelPart
from .cache import cache_dir
from .device import DeviceError, model_device, resolve_device, resolve_dtype
from .errors import DepthKVModelError, ModelFileError, ModelUnavailableError
from .fetch import fetch_alias
from .identity import config_sha256, model_identity
from .loader import LoadedModel, load_gguf_file, load_model
from .manage import add_model, list_models
from .tiny import tiny_config, tiny_model

__all__ = [
    "ALIASES",
    "AliasSpec",
    "DepthKVModelError",
    "DeviceError",
    "LoadedModel",
    "ModelFileError",
    "ModelUnavailableError",
    "WheelPart",
    "add_model",
    "cache_dir",
    "config_sha256",
    "fetch_alias",
    "load_gguf_file",
    "list_models",
    "load_model",
    "model_device",
    "model_identity",
    "resolve_device",
    "resolve_dtype",
    "tiny_config",
    "tiny_model",
]
