"""Generated samples cached on disk, so every process of a sweep does not generate them again.

Generating a long context with a real tokenizer as the length counter costs 0.05–0.4 s per sample at
8k–16k tokens (haystacks are cut to length by counting tokens): 37 s for eight tasks x 40 samples at 8k with
Qwen2.5's tokenizer on two CPU cores (``load_samples`` timed twice, 2026-11-30), paid by every process of a sweep (each resumed run, each data-parallel
worker) while the GPU waits. The samples are a
pure function of the generator's arguments, the tokenizer, the corpus and the generators' code, so
:func:`generate_cached` keys a file on all of these (a change in any gives a new key, never a stale hit)
and reads it instead of generating. A file that cannot be read back is ignored and written again.

Cached and freshly generated samples are the same objects either way: both pass through
:meth:`Sample.to_dict` / :meth:`Sample.from_dict` (so ``meta`` holds lists, never tuples).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from depthkv.io import atomic_write, cache_root
from depthkv.tasks.corpus import corpus_fingerprint
from depthkv.tasks.prompt import token_counter
from depthkv.tasks.registry import generate
from depthkv.tasks.sample import Sample

__all__ = ["generate_cached", "sample_cache_dir", "tokenizer_fingerprint"]

CACHE_FORMAT = 1


def sample_cache_dir() -> Path | None:
    """Folder of the cached sample files: ``$DEPTHKV_SAMPLE_CACHE``, else ``<cache root>/samples``; ``None``
    (no caching) when ``DEPTHKV_SAMPLE_CACHE`` is ``0`` / ``off``."""
    env = os.environ.get("DEPTHKV_SAMPLE_CACHE", "").strip()
    if env.lower() in ("0", "off", "false", "no"):
        return None
    return Path(env).expanduser() if env else cache_root() / "samples"


@functools.lru_cache(maxsize=1)
def _generators_fingerprint() -> str:
    """SHA-256 over the source of every module of ``depthkv.tasks``: editing a generator changes the key."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_FINGERPRINTS: dict[int, tuple[object, str | None]] = {}  # id -> (the tokenizer, kept alive so ids stay unique)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """SHA-256 of a fast tokenizer's full serialisation (vocabulary, merges, normaliser, pre-tokeniser);
    ``None`` for a tokenizer without one (then nothing is cached). Computed once per tokenizer object."""
    seen = _FINGERPRINTS.get(id(tokenizer))
    if seen is not None and seen[0] is tokenizer:
        return seen[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    fp = None if to_str is None else hashlib.sha256(f"{type(tokenizer).__name__}|{to_str()}".encode()).hexdigest()[:16]
    if len(_FINGERPRINTS) >= 8:
        _FINGERPRINTS.clear()
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, fp)
    return fp


def _key(task: str, n: int, seed: int, split: str, context_tokens: int, options: dict[str, Any],
         tokenizer_fp: str) -> str | None:
    try:
        opts = json.dumps(options, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # options that are not plain data: do not cache
        return None
    ident = json.dumps([CACHE_FORMAT, task, n, seed, split, context_tokens, opts, tokenizer_fp,
                        corpus_fingerprint(), _generators_fingerprint()])
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _read(path: Path, n: int) -> list[Sample] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            samples = [Sample.from_dict(json.loads(line)) for line in fh if line.strip()]
    except (OSError, ValueError, TypeError):
        return None
    return samples if len(samples) == n else None


def generate_cached(task: str, n: int, seed: int, *, context_tokens: int, tokenizer, split: str = "eval",
                    cache: bool = True, **options) -> list[Sample]:
    """``generate(task, n, seed, context_tokens=..., count_tokens=token_counter(tokenizer), split=...,
    **options)``, read from the sample cache when the same call was made before (see the module doc).

    Not cached: ``cache=False`` or ``DEPTHKV_SAMPLE_CACHE=0``, file-backed tasks (``path`` option: the file
    may change), options that are not plain JSON data, tokenizers without a serialisation to fingerprint
    (the fingerprint is taken once per tokenizer object: do not change its vocabulary after first use here).
    """
    folder = sample_cache_dir() if cache and "path" not in options else None
    fp = tokenizer_fingerprint(tokenizer) if folder is not None else None
    key = _key(task, n, seed, split, context_tokens, options, fp) if fp is not None else None
    path = folder / f"{task}-{split}-{key}.jsonl" if folder is not None and key is not None else None
    if path is not None and path.is_file():
        hit = _read(path, n)
        if hit is not None:
            return hit
    samples = generate(task, n, seed, context_tokens=context_tokens, count_tokens=token_counter(tokenizer),
                       split=split, **options)
    records = [s.to_dict() for s in samples]
    if path is not None:
        try:
            with atomic_write(path) as fh:
                for rec in records:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        except OSError:  # a read-only or full cache folder only costs the speed-up
            pass
    return [Sample.from_dict(rec) for rec in records]
