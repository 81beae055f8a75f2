"""depthkv.models: load the causal LMs that DepthKV profiles and prunes.

- :func:`load_model` — built-in offline alias, local folder / .gguf, or hub id.
- :func:`load_gguf_file` — convert-and-cache a user-supplied .gguf.
- :func:`fetch_alias` / :func:`cache_dir` — the download and cache helpers.
- :func:`model_identity` — fingerprint binding a profile to a model.
- :func:`tiny_model` — tiny random LMs for tests.
"""

from .aliases import ALIASES, AliasSpec, WheelPart
from .cache import cache_dir
from .errors import DepthKVModelError, ModelFileError, ModelUnavailableError
from .fetch import fetch_alias
from .identity import config_sha256, model_identity
from .loader import LoadedModel, load_gguf_file, load_model
from .tiny import tiny_config, tiny_model

__all__ = [
    "ALIASES",
    "AliasSpec",
    "DepthKVModelError",
    "LoadedModel",
    "ModelFileError",
    "ModelUnavailableError",
    "WheelPart",
    "cache_dir",
    "config_sha256",
    "fetch_alias",
    "load_gguf_file",
    "load_model",
    "model_identity",
    "tiny_config",
    "tiny_model",
]
