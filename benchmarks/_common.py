"""Helpers shared by the benchmark scripts: models to measure, memory and CPU-time probes, labels, output.

Imported as ``from _common import ...``: running ``python benchmarks/X.py`` puts this folder first on
``sys.path``. depthkv and torch are imported inside the functions, so that the scripts which run in the
kvpress environment (``scripts/kvpress_env.sh``) import this module at no cost.
"""

from __future__ import annotations

import platform
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = ROOT / "docs" / "results" / "profile_smollm2-135m.json"
MIN_TOKENS = 20  # per-layer floor: depthkv's protected window (4 sinks + 16 recent)

SHAPES = {  # architecture fields of public configs (no weights): random-initialised stand-ins
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama-3.1-70B's real widths (and its GQA of 64 query / 8 KV heads, the 8B's llama3 RoPE), but only 4 of
    # its 80 layers: per-layer weights, KV bytes and tensor-parallel shards are the 70B's, while the model fits
    # (and initialises) quickly; per-step times are for 4 layers, not 80
    "llama-3.1-70b-4l": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=4,
                             num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                             max_position_embeddings=131072, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6),
    # smoke tests of the scripts (the 8B shape's layer and head counts, tiny widths)
    "tiny-32l": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=32,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192),
}


def parse_list(text: str, kind: type, what: str, error: type[Exception], positive: bool = False) -> list:
    """A comma-separated command-line list of ``kind`` values, duplicates dropped in order; bad input raises
    ``error`` (the script's one-line usage error) naming the option ``what``."""
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise error(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise error(f"{what}: empty list")
    if positive and any(v <= 0 for v in vals):
        raise error(f"{what}: expected positive {'integers' if kind is int else 'numbers'}, got {text!r}")
    return list(dict.fromkeys(vals))


def parse_pairs(text: str, what: str, form: str, error: type[Exception]) -> list[tuple[int, int]]:
    """``AxB,...`` items of two positive integers (``form`` names them, e.g. ``BATCHxTOKENS``), duplicates
    dropped in order; bad input raises ``error`` naming the option ``what``."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            a, b = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise error(f"{what}: expected {form} items, got {part!r}") from None
        if a < 1 or b < 1:
            raise error(f"{what}: {form} values must be positive, got {part!r}")
        pairs.append((a, b))
    if not pairs:
        raise error(f"{what}: empty list")
    return list(dict.fromkeys(pairs))


def build_model(name: str, device: str, dtype):
    """``random:SHAPE`` (a random-initialised Llama of a :data:`SHAPES` entry, seed 0, SDPA attention) or a
    depthkv model name (alias, folder, hub id), in eval mode on ``device``."""
    import torch
    import transformers

    if name.startswith("random:"):
        cfg = transformers.LlamaConfig(**SHAPES[name.split(":", 1)[1]], attn_implementation="sdpa")
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        return model.eval()
    from depthkv.models import load_model

    return load_model(name, dtype=dtype).model.to(device)


def random_ids(model, n: int, device: str):
    """The measured input: ``n`` + 1 random token ids seeded by ``n`` (the prefill takes the first ``n``)."""
    import torch

    return torch.randint(0, model.config.vocab_size, (1, n + 1),
                         generator=torch.Generator().manual_seed(n)).to(device)


def random_cache(model, n: int, lengths: list[int], seed: int):
    """A depthkv cache of logical length ``n`` whose layer l physically holds ``lengths[l]`` random tokens
    (seeded K/V, kept positions spread evenly; an unpruned layer is a plain HF layer)."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from depthkv.engine.cache import PrunedLayer

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kvh = cfg.num_key_value_heads
    dev, dt = model.device, model.dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    cache = DynamicCache()
    cache.layers = []
    for b in lengths:
        k = torch.randn(1, kvh, b, d, generator=gen, device=dev, dtype=dt)
        v = torch.randn(1, kvh, b, d, generator=gen, device=dev, dtype=dt)
        if b == n:  # an unpruned layer: plain HF layer
            layer = DynamicLayer()
            layer.update(k, v)
        else:
            pos = (torch.arange(b, device=dev) * n // b).to(torch.int32).expand(1, kvh, b).contiguous()
            layer = PrunedLayer(k, v, pos, prefix_end=n)
        cache.layers.append(layer)
    return cache


def copy_bandwidth(device: str, gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy, counting read + write (the decode bound's rate)."""
    import torch

    n = int(gib * 1024**3) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize()
    rate = 2 * a.numel() * a.element_size() * repeats / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return rate


def depthkv_view(profile_path: str | Path, n_layers: int):
    """(SensitivityView for ``n_layers`` layers, how it was made) from a calibration profile.

    A profile of another layer count is linearly interpolated over relative depth, probe ratio by probe
    ratio: a stand-in for an uneven DepthKV allocation, not a calibration of that model.
    """
    import numpy as np

    from depthkv.allocation import SensitivityView
    from depthkv.allocation.profile import Profile

    prof = Profile.load(profile_path)
    view = prof.view()
    name = prof.data["model"].get("name")
    if prof.n_layers == n_layers:
        return view, f"profile {Path(profile_path).name} ({name}, {n_layers} layers) as measured"
    d = view.require("degradation", "depthkv")
    src = np.linspace(0.0, 1.0, prof.n_layers)
    dst = np.linspace(0.0, 1.0, n_layers)
    d2 = np.stack([np.interp(dst, src, d[:, j]) for j in range(d.shape[1])], axis=1)
    note = (f"profile {Path(profile_path).name} ({name}, {prof.n_layers} layers): each probe ratio's per-layer "
            f"degradation linearly interpolated over relative depth to {n_layers} layers (stand-in)")
    return SensitivityView(view.probe_ratios, d2), note


# ------------------------------------------------------------------------------------------ CPU and memory


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in MiB; None where it is absent."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def rss_mark() -> tuple[bool, float | None]:
    """Start of a measured block on CPU: reset the peak-RSS mark, read the resident set (MiB) just before."""
    return reset_peak_rss(), status_mb("VmRSS")


def rss_fields(mark: tuple[bool, float | None]) -> dict:
    """End of the block begun by ``rss_mark``: its peak resident set (VmHWM), the growth over the resident set
    just before it, and the resident set now (with whatever the block left alive)."""
    rss_reset, rss0 = mark
    rss_peak, rss_after = status_mb("VmHWM"), status_mb("VmRSS")
    return dict(rss_before_mb=round(rss0, 1), rss_peak_mb=round(rss_peak, 1),
                rss_growth_mb=round(rss_peak - rss0, 1) if rss_reset else None,
                rss_after_mb=round(rss_after, 1), rss_peak_reset=rss_reset,
                rss_lifetime_peak_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


# ------------------------------------------------------------------------------------------ labels, output


def config_label(row: dict) -> str:
    """Table label of a memory/speed row: ``full``, or the method (``DepthKV`` for depthkv) and its mode."""
    if row["method"] == "full":
        return "full"
    name = "DepthKV" if row["method"] == "depthkv" else row["method"]
    return f"{name} {row['mode']}"


def versions() -> dict[str, Any]:
    """The interpreter and the versions of the packages a comparison depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": sys.executable, "python_version": platform.python_version()}
    for name in ("torch", "transformers", "kvpress", "depthkv"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def command_line(script: str, argv: Sequence[str] | None = None, *, launcher: str = "python") -> str:
    """The command that made a result, as it is typed again from the repository root (arguments shell-quoted):
    ``launcher benchmarks/<script's name> ARGS``; ``argv`` None: this process's own arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([*launcher.split(), f"benchmarks/{Path(script).name}", *args])


def write_results(path: str | Path, meta: dict, rows: list) -> None:
    """``{"meta": ..., "rows": [...]}`` to ``path``, atomically (a run stopped mid-write keeps the last file)."""
    from depthkv.io import write_json

    write_json(path, {"meta": meta, "rows": rows}, indent=1)


def check_splits(text: str, profile: str | None, error: type[Exception]) -> list[str]:
    """``--splits`` (comma-separated allocators, ``+heads`` for per-KV-head budgets) checked before any model work:
    known allocators, a ``--profile`` file for every split but uniform."""
    from depthkv.allocation.registry import ALLOCATORS

    splits = [s for s in text.split(",") if s]
    if not splits:
        raise error("--splits: give at least one split, e.g. adaptive+heads")
    for split in splits:
        strategy = split.removesuffix("+heads")
        if strategy not in ALLOCATORS:
            raise error(f"--splits: unknown allocator {strategy!r}")
        if strategy != "uniform" and profile is None:
            raise error(f"--splits: {split} needs --profile")
    if profile is not None and not Path(profile).is_file():
        raise error(f"--profile: no such file: {profile}")
    return splits
