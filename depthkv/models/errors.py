"""Exceptions raised by :mod:`depthkv.models`.

One base class so callers can catch every model-loading problem at once, and
two specific ones for the two ways a load fails: a file is wrong, or a model
cannot be obtained at all.
"""

from __future__ import annotations


class DepthKVModelError(RuntimeError):
    """Base class for every error raised while fetching, converting or loading a model."""


class ModelFileError(DepthKVModelError):
    """A model file is missing, truncated or has the wrong checksum."""


class ModelUnavailableError(DepthKVModelError):
    """The model cannot be obtained: unknown name, hub unreachable, offline mode, download failed."""
