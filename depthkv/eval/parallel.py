"""Data-parallel evaluation: the samples of one sweep split over several devices (or processes).

Every cell of a sample depends only on that sample (one prefill per (sample, setting), greedy decoding,
per-cell seeds), so a sweep shards by sample without changing any row: the sorted decode groups of (task
label, sample id) (``depthkv.eval.runner.batch_groups``: consecutive samples whose cells share fast-path
batches) are dealt round-robin, rank ``i`` taking every ``world``-th group with all its samples' settings and
cells; batches never span groups, so each row's batch companions are those of a one-device run. Each rank writes its own resumable ``DIR/results.rank<i>.jsonl`` (the row format of
``results.jsonl``); when every shard is complete the shards are merged into ``DIR/results.jsonl`` in the
order a one-device run writes, and the summary is written from the merged rows.

Two ways to run it:

* :func:`run_parallel` (``depthkv eval --devices 0,1``): one spawned worker process per device, each
  loading the model on its device; the parent prepares the folder, merges and summarises;
* :func:`run_distributed` (``torchrun --nproc-per-node N -m depthkv eval ...``): every rank is a process
  of its own (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``); rank 0 prepares the folder and merges after a
  barrier of the ``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA), or, without one,
  after polling the shard files until every cell is in them.

A rerun of the same command (with any number of devices, or with one) skips every cell already in the
merged file or in any shard.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthkv.eval.results import (
    CONFIG,
    RESULTS,
    EvalError,
    cell_key,
    load_rows,
    prepare_folder,
    read_config,
    row_key,
    shard_files,
    shard_path,
)
from depthkv.io import atomic_write

# errors that are bad input (one line to the user), not bugs: a worker reports their message
_INPUT_ERRORS = ("EvalError", "BudgetError", "AllocatorError", "ProfileError", "DeviceError", "ModelFileError",
                 "FileNotFoundError", "MissingExtraError", "SensitivityError")
BARRIER_TIMEOUT = datetime.timedelta(days=7)  # the end barrier waits for the slowest shard


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` processes evaluating one sweep."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise EvalError(f"rank {self.rank} is not in a world of {self.world} processes")

    def owned(self, samples: dict[str, list], groups: dict[tuple[str, str], Any] | None = None
              ) -> set[tuple[str, str]]:
        """The (task label, sample id) this rank evaluates: round-robin over the sorted sample list, or, with
        ``groups`` ((task label, sample id) -> its group), over the sorted groups, so a rank owns whole groups."""
        keys = sorted((label, s.id) for label, group in samples.items() for s in group)
        if groups is None:
            return set(keys[self.rank :: self.world])
        mine = set(sorted(set(groups.values()))[self.rank :: self.world])
        return {k for k in keys if groups[k] in mine}

    def path(self, folder: str | os.PathLike) -> Path:
        return shard_path(folder, self.rank)


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model on its device (picklable, unlike a loaded model)."""

    name: str
    dtype: str = "auto"
    attn: str = "sdpa"

    def load(self, device: str):
        from depthkv.models import load_model

        return load_model(self.name, dtype=self.dtype, attn_implementation=self.attn, device=device)


def parse_devices(text: str) -> list[str]:
    """``"0,1"`` -> ``["cuda:0", "cuda:1"]``; ``"cpu,cpu"`` -> two CPU workers; each device is checked."""
    from depthkv.models.device import DeviceError, resolve_device

    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise EvalError("--devices is empty; give e.g. 0,1 (CUDA indices) or cpu,cpu")
    out = []
    for item in items:
        name = f"cuda:{item}" if item.isdigit() else item
        try:
            out.append(str(resolve_device(name)))
        except DeviceError as exc:
            raise EvalError(f"--devices {text}: {exc}") from None
    return out


def other_rows(folder: str | os.PathLike, shard: Shard | None = None) -> list[dict]:
    """Rows of the merged file and of every shard file except ``shard``'s own (done by earlier runs)."""
    folder = Path(folder)
    own = shard.path(folder) if shard is not None else None
    rows = load_rows(folder / RESULTS)
    for path in shard_files(folder):
        if path != own:
            rows += load_rows(path)
    return rows


def sweep_keys(folder: str | os.PathLike, cfg) -> list[str]:
    """Every cell key of the sweep in the order a one-device run writes them (from ``config.json``)."""
    from depthkv.eval.runner import cells_for

    config = read_config(folder)
    if config is None or "samples" not in config:
        raise EvalError(f"{folder} has no {CONFIG} listing the samples; cannot merge the shards")

    cells = cells_for(cfg)
    return [cell_key(label, sid, setting, c.method, c.scorer, c.ratio)
            for label, ids in config["samples"].items() for sid in ids
            for setting in cfg.settings for c in cells]


def merge_shards(folder: str | os.PathLike, cfg) -> list[dict]:
    """Merge ``results.jsonl`` and every shard file into ``results.jsonl`` in one-device order; the shards
    are removed once the merged file is in place. Returns the merged rows."""
    folder = Path(folder)
    shards = shard_files(folder)
    rows: dict[str, dict] = {}
    for path in (folder / RESULTS, *shards):
        for r in load_rows(path):
            rows.setdefault(row_key(r), r)
    order = {k: i for i, k in enumerate(sweep_keys(folder, cfg))}
    merged = sorted(rows.values(), key=lambda r: (order.get(row_key(r), len(order)), row_key(r)))
    with atomic_write(folder / RESULTS) as fh:
        for r in merged:
            fh.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    for path in shards:
        path.unlink(missing_ok=True)
    return merged


def _finish(folder: Path, cfg, model_name: str, stats: Iterable[tuple[int, int, int]], t0: float):
    """Merge the shards, write the summary and return the run's :class:`EvalRun`."""
    from depthkv.eval.runner import EvalRun
    from depthkv.eval.summary import summarise, write_summary

    rows = merge_shards(folder, cfg)
    cells = summarise(rows)
    write_summary(folder, cells, {"model": model_name, "folder": str(folder)})
    new = skipped = prefills = 0
    for n, s, p in stats:
        new, skipped, prefills = new + n, skipped + s, prefills + p
    return EvalRun(folder, rows, new, skipped, prefills, time.perf_counter() - t0, cells)


def _concrete_dtype(cfg, devices: Sequence[str]) -> str:
    """The one dtype every device runs (``auto`` resolved per device); devices that disagree are an error."""
    from depthkv.models.device import dtype_name, resolve_dtype

    names = {dtype_name(resolve_dtype(cfg.dtype, d)) for d in devices}
    if len(names) > 1:
        raise EvalError(f"--dtype {cfg.dtype} means {' and '.join(sorted(names))} on these devices; rows of one "
                        "run must share a dtype: pass --dtype explicitly")
    return names.pop()


def run_parallel(
    spec: ModelSpec,
    cfg,
    out: str | Path,
    devices: Sequence[str],
    *,
    force: bool = False,
    progress: bool = True,
    threads: int | None = None,
):
    """Run (or resume) the sweep ``cfg`` into ``out`` with one spawned worker process per device.

    Each worker loads ``spec`` on its device and evaluates its shard of the samples (:class:`Shard`); the
    parent merges the shards into ``results.jsonl`` and writes the summary. ``threads``: torch threads per
    CPU worker (default: the CPU count shared among the CPU workers). Returns the merged
    :class:`~depthkv.eval.runner.EvalRun`.
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException  # torch.multiprocessing does not re-export it

    t0 = time.perf_counter()
    devices = list(devices)
    if len(devices) < 2:
        raise EvalError("data-parallel evaluation needs at least two devices")
    cfg.validate()
    cfg.dtype = _concrete_dtype(cfg, devices)
    spec = ModelSpec(spec.name, cfg.dtype, spec.attn)
    folder = prepare_folder(out, cfg.run_record(), force=force)  # workers resume; --force acted here once
    n_cpu = sum(d == "cpu" for d in devices)
    if threads is None and n_cpu:
        threads = max(1, (os.cpu_count() or 1) // n_cpu)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(devices, spec, cfg, str(folder), progress, threads, queue), nprocs=len(devices),
                 join=True)
    except ProcessException as exc:
        reports = _drain(queue)
        for kind, rank, *rest in reports:
            if kind == "input-error":
                raise EvalError(f"worker {rank} ({devices[rank]}): {rest[0]}") from None
        raise RuntimeError(f"a worker failed: {exc}") from None
    stats = [tuple(rest) for kind, _rank, *rest in _drain(queue) if kind == "done"]
    config = read_config(folder) or {}
    return _finish(folder, cfg, (config.get("model") or {}).get("name", spec.name), stats, t0)


def _drain(queue) -> list[tuple]:
    out = []
    while not queue.empty():
        out.append(queue.get())
    return out


def _worker(rank: int, devices: list[str], spec: ModelSpec, cfg, folder: str, progress: bool,
            threads: int | None, queue) -> None:
    """One spawned worker: load the model on ``devices[rank]`` and evaluate shard ``rank``."""
    import torch

    from depthkv.eval.runner import run_eval

    device = devices[rank]
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        lm = spec.load(device)
        res = run_eval(lm, cfg, folder, shard=Shard(rank, len(devices)), progress=progress)
    except Exception as exc:
        if type(exc).__name__ in _INPUT_ERRORS or isinstance(exc, EvalError):
            queue.put(("input-error", rank, str(exc)))
            raise SystemExit(2) from None
        raise
    queue.put(("done", rank, res.new_rows, res.skipped, res.prefills))


# ------------------------------------------------------------------------------------------------ torchrun


def env_shard(env: dict[str, str] | None = None) -> Shard | None:
    """The :class:`Shard` of this process under ``torchrun`` (``RANK`` / ``WORLD_SIZE``); None when alone."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        raise EvalError("RANK and WORLD_SIZE must be integers") from None
    return Shard(rank, world) if world > 1 else None


def local_device(device: str, env: dict[str, str] | None = None) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` when ``device`` is a CUDA device, else ``device``."""
    env = os.environ if env is None else env
    return f"cuda:{int(env.get('LOCAL_RANK', '0'))}" if str(device).startswith("cuda") else str(device)


class _Group:
    """Barriers of the ``torch.distributed`` process group: the caller's, one initialised here (gloo on the
    CPU, NCCL on CUDA; destroyed by :meth:`close`), or none (``wait`` then polls files)."""

    def __init__(self, device: Any) -> None:
        import torch
        import torch.distributed as dist

        self.dist, self.owned = dist, False
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active and dist.is_available() and "MASTER_ADDR" in os.environ:
            cuda = str(device).startswith("cuda")
            if cuda:  # NCCL collectives (the barrier too) run on the current device: make it this rank's
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT,
                                    device_id=torch.device(device) if cuda else None)
            self.active = self.owned = True

    def wait(self, ready: Callable[[], bool], poll: float) -> None:
        """Block until every rank arrives (with a group) or until ``ready()`` holds (without one)."""
        if self.active:
            self.dist.barrier()
            return
        while not ready():
            time.sleep(poll)

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def run_distributed(lm, cfg, out: str | Path, shard: Shard, *, force: bool = False, progress: bool = True,
                    poll: float = 1.0):
    """Evaluate this rank's shard of ``cfg`` into ``out`` (one process per rank, e.g. under ``torchrun``).

    Rank 0 prepares the folder (``force`` acts there only), every rank evaluates its shard, and rank 0
    merges the shards and writes the summary once all are complete. Returns the merged
    :class:`~depthkv.eval.runner.EvalRun` on rank 0 and the rank's own on the others.
    """
    from depthkv.eval.runner import run_eval

    t0 = time.perf_counter()
    cfg.validate()
    if cfg.dtype == "auto":
        cfg.dtype = str(lm.model.dtype).removeprefix("torch.")
    record = cfg.run_record()
    folder = Path(out)
    group = _Group(lm.model.device)
    try:
        if shard.rank == 0:
            prepare_folder(folder, record, force=force)
        if group.active or shard.rank != 0:  # the others start once rank 0 has prepared the folder
            group.wait(lambda: (read_config(folder) or {}).get("run") == record, poll)
        res = run_eval(lm, cfg, folder, shard=shard, progress=progress)
        expected: set[str] = set()

        def complete() -> bool:  # every cell of the sweep is in the merged file or a shard
            if not expected:
                expected.update(sweep_keys(folder, cfg))
            return expected <= {row_key(r) for r in other_rows(folder)}

        if group.active or shard.rank == 0:
            group.wait(complete, poll)
        stats = [(res.new_rows, res.skipped, res.prefills)]
        if group.active:
            gathered: list[Any] = [None] * shard.world
            group.dist.all_gather_object(gathered, stats[0])
            stats = gathered
    finally:
        group.close()
    if shard.rank != 0:
        return res
    config = read_config(folder) or {}
    return _finish(folder, cfg, (config.get("model") or {}).get("name", lm.name), stats, t0)
