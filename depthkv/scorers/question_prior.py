"""Where questions look: the mean query of calibration questions, per layer and query head, as a key prior.

A context compressed before its question is known still meets questions of a kind: a chat over a document, a
retrieval prompt, a task template. Each query head has a direction it tends to look in when such questions are
asked (ahead of the context, at a position just after it). This module keeps that direction — the mean
*pre-RoPE* query of the question and answer tokens of calibration samples, one vector per layer and query head —
and scores a context key by the logit the direction, rotated to just after the context, gives it
(:func:`question_logits`). ``KVzip(question_weight=w)`` blends the rank of that logit into each head's order
(``depthkv.scorers.reorder``), so the budgets stay and only which tokens fill them changes.

The file is safetensors (one float32 tensor ``queries`` [L, H, d], no pickle) with a JSON header naming the model
(its config hash, layer and head counts) and the data the mean was taken over; a file made for another model is
refused with a clear error. ``depthkv question-queries`` writes one (``depthkv.calibration.queries``).

RoPE is HF's rotate-half form (``depthkv.scorers.expected_attention.rotate``), as in Llama, Qwen and Mistral. A
constant factor on the logits (the softmax scale, a RoPE attention factor) does not change their order, so only
the rotation matters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from depthkv.scorers.expected_attention import rotate

KIND = "depthkv-question-queries"
SCHEMA_VERSION = 1
#: the direction is rotated to this many positions after the context's last token: a question's first tokens
QUESTION_LEAD = 16


class QuestionQueriesError(ValueError):
    """A question-queries file that is missing, corrupt, or made for another model."""


@dataclass
class QuestionQueries:
    """Mean pre-RoPE query per layer and query head (``table`` [L, H, d], float32) and what it was taken over."""

    table: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.table.dim() != 3 or self.table.shape[-1] % 2:
            raise QuestionQueriesError(f"question queries must be [layers, heads, even head_dim], got "
                                       f"{tuple(self.table.shape)}")
        if not bool(torch.isfinite(self.table).all()):
            raise QuestionQueriesError("question queries hold non-finite values")

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (safetensors; ``meta`` as JSON in the header)."""
        from safetensors.torch import save_file

        from depthkv.io import atomic_path

        header = {"kind": KIND, "schema_version": str(SCHEMA_VERSION), "meta": json.dumps(self.meta)}
        with atomic_path(path) as tmp:
            save_file({"queries": self.table.detach().float().cpu().contiguous()}, str(tmp), metadata=header)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuestionQueries:
        """Read a file written by :meth:`save`; anything else raises ``QuestionQueriesError`` (one line)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise QuestionQueriesError(f"{path}: no such question-queries file (write one with depthkv "
                                       "question-queries)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                if header.get("kind") != KIND:
                    raise QuestionQueriesError(f"{path} is not a depthkv question-queries file")
                if header.get("schema_version") != str(SCHEMA_VERSION):
                    raise QuestionQueriesError(f"{path} has schema {header.get('schema_version')}; this depthkv "
                                               f"reads {SCHEMA_VERSION}")
                table = fh.get_tensor("queries").float()
            meta = json.loads(header.get("meta") or "{}")
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, QuestionQueriesError):
                raise
            raise QuestionQueriesError(f"{path} is not a readable question-queries file "
                                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        return cls(table, meta)

    def check_model(self, identity: dict[str, Any], source: str = "the question queries") -> None:
        """Raise unless these queries were taken on the model ``identity`` describes (config hash and shape)."""
        mine = self.meta.get("model") or {}
        shape = (identity.get("n_layers"), identity.get("n_heads"), identity.get("head_dim"))
        if tuple(self.table.shape) != shape or mine.get("config_sha256") != identity.get("config_sha256"):
            raise QuestionQueriesError(
                f"{source} were taken on {mine.get('name')!r} ({tuple(self.table.shape)} layers x heads x dim, "
                f"config {str(mine.get('config_sha256'))[:12]}), not on {identity.get('name')!r} ({shape}, config "
                f"{str(identity.get('config_sha256'))[:12]}): record them for this model (depthkv question-queries)")


_LOADED: dict[tuple[str, int, int], QuestionQueries] = {}


def load_cached(path: str | os.PathLike) -> QuestionQueries:
    """:meth:`QuestionQueries.load`, read once per file version (path, size, mtime)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return QuestionQueries.load(p)  # raises the clear error
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()  # one file in use at a time is the common case; keep memory flat
        _LOADED[key] = QuestionQueries.load(p)
    return _LOADED[key]


def unrotate(query: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries [..., Q, d] at logical ``positions`` [..., Q] back to their pre-RoPE form."""
    angles = -positions.to(torch.float64)[..., None] * inv_freq.to(query.device, torch.float64)
    return rotate(query.to(torch.float64), angles).to(torch.float32)


def question_logits(directions: torch.Tensor, keys: torch.Tensor, inv_freq: torch.Tensor,
                    position: int) -> torch.Tensor:
    """[B, KVH, N] logit each post-RoPE key [B, KVH, N, d] gets from one layer's pre-RoPE directions [H, d]
    rotated to ``position``, averaged over each KV head's query group (GQA); the softmax scale is left out."""
    b, kvh, n, d = keys.shape
    h = directions.shape[0]
    if directions.shape[-1] != d or h % kvh:
        raise QuestionQueriesError(f"question queries of {h} heads x {directions.shape[-1]} do not fit keys of "
                                   f"{kvh} KV heads x {d}")
    angles = float(position) * inv_freq.to(keys.device, torch.float64)
    q = rotate(directions.to(keys.device, torch.float64), angles).to(torch.float32)  # [H, d]
    q = q.reshape(kvh, h // kvh, d).mean(dim=1)  # the group's mean logit = the mean query's logit
    return torch.einsum("hd,bhnd->bhn", q, keys.float())
