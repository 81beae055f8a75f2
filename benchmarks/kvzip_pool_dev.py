"""Development check of KVzip variants on the CALIBRATION split, question after compression: the softmax
normalisation of the replay (``KVzip(normalise=...)``) and span pooling (``KVzip(kernel=k)``).

KVzip (Kim et al. 2025, arXiv 2505.23416) scores each context token by the largest attention it receives while
the model replays the context. Two choices are compared here, on calibration samples only (``split="calib"``:
the evaluation split is what results are reported on and is never tuned on), in the query-agnostic setting
(the context alone is prefilled and compressed, then the question is appended and answered greedily):

* normalisation: ``context`` (depthkv's default: each replay query's softmax runs over every key it sees) or
  ``chunk`` (the paper's implementation: only over the first ``sink`` keys, the replayed chunk's own keys and
  the replayed tokens). The two agree when the context fits in one replay chunk (``--replay-chunk``, KVzip's
  default 2,048 tokens).
* span pooling: a fact is a multi-token span, and a top-k that keeps part of it and drops the rest breaks the
  answer; ``KVzip(kernel=k)`` max-pools the scores over ``k`` neighbouring tokens (as SnapKV pools its votes).

A variant is a (normalisation, kernel) pair, labelled ``ctx/k1``, ``ctx/k3``, ``chunk/k1``, ...; the baseline
is ``ctx/k1`` (the default scorer), so ``--normalise`` must include ``context`` and ``--kernels`` must
include 1. Per sample, with the library's score-once/prune-many path: one prefill
(``depthkv.engine.score_prefill``) and one KVzip reconstruction per normalisation on its cache
(``ScoredPrefill.rescored``), then for every kernel the pooled scores
(``depthkv.scorers.kvzip.span_max_pool``: exactly the scores ``KVzip(kernel=k)`` records, since max-pooling
commutes with KVzip's max over reconstruction queries and chunks) and for every ratio the budgets from
``BudgetSpec`` with the input-adaptive ``adaptive`` allocator on the given profile, a per-KV-head split
(``head_budgets=True``, the eval's ``adaptive+heads``) and ``ScoredPrefill.prune``. The full cache and every
pruned cache of a sample are decoded together as one batch of the fixed-shape fast path (as ``depthkv eval``
does) and scored with the task's own metric. The table gives, per task and ratio, the mean score of the full
cache and of each variant, and the paired difference variant - ``ctx/k1`` with a 95% percentile-bootstrap CI
(``depthkv.calibration.stats.paired_diff_ci``); the ``all`` rows pool every sample of the ratio. The JSON
(``kind`` ``depthkv-kvzip-pool-dev``) records every cell, the per-row means (``mean``) and differences
(``diff_vs_baseline``) keyed by variant label, and the device the model ran on.

    python benchmarks/kvzip_pool_dev.py                         # defaults: ~25 min on 2 CPU cores
    python benchmarks/kvzip_pool_dev.py --samples 2 --tasks needle --kernels 1,5 --out /tmp/pool.json
    python benchmarks/kvzip_pool_dev.py --normalise context,chunk --kernels 1 --context-tokens 4096 \\
        --samples 12 --device cuda --out /tmp/kvzip_dev_4k.json   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from _common import ROOT, command_line

DEFAULT_PROFILE = ROOT / "docs" / "results" / "qwen_gpu_4k" / "profile_kvzip_agnostic.json"
DEFAULT_OUT = ROOT / "docs" / "results" / "kvzip_pool_dev" / "kvzip_pool_dev.json"
SETTING = "agnostic"
SPLIT = "calib"
STRATEGY = "adaptive"  # with per-KV-head budgets: the eval's "adaptive+heads"
N_SINK, N_RECENT = 4, 16  # depthkv's default protected window; it is also the per-layer floor
SHORT = {"context": "ctx"}  # normalisation -> its label in variant names (others keep their own name)
BASELINE = ("context", 1)  # (normalise, kernel) the differences are taken against: the default scorer


def variant_label(normalise: str, kernel: int) -> str:
    """``("context", 3)`` -> ``"ctx/k3"``: a variant's name in the table and the JSON."""
    return f"{SHORT.get(normalise, normalise)}/k{kernel}"


class DevError(ValueError):
    """Bad input for the development check: reported as one line, exit code 2, nothing written."""


@dataclass(frozen=True)
class DevConfig:
    """What one run measures (recorded in the JSON)."""

    model: str = "qwen2.5-coder-1.5b"
    tasks: tuple[str, ...] = ("needle", "multikey", "vartrack", "docqa")
    samples: int = 8
    context_tokens: int = 1024
    ratios: tuple[float, ...] = (0.8, 0.9)
    kernels: tuple[int, ...] = (1, 3, 7)
    normalise: tuple[str, ...] = ("context",)
    replay_chunk: int = 2048  # KVzip's default; the normalisations differ only on contexts longer than this
    profile: str = str(DEFAULT_PROFILE)
    force_profile: bool = False
    dtype: str = "bfloat16"
    device: str = "auto"
    threads: int = 2
    seed: int = 0
    n_boot: int = 1000
    decode_batch: int = 16
    out: str = str(DEFAULT_OUT)

    @property
    def variants(self) -> list[tuple[str, int]]:
        """Every (normalise, kernel) pair, normalisation-major, in the order given."""
        return [(m, k) for m in self.normalise for k in self.kernels]

    def validate(self) -> None:
        """Fail before any model work on a bad option (one :class:`DevError` line)."""
        from depthkv.allocation.budgets import BudgetError, check_ratio
        from depthkv.allocation.profile import Profile, ProfileError
        from depthkv.models.device import DeviceError, resolve_device
        from depthkv.scorers import KVzip
        from depthkv.tasks import TASKS

        for name, items in (("task", self.tasks), ("ratio", self.ratios), ("kernel", self.kernels),
                            ("normalisation", self.normalise)):
            if not items:
                raise DevError(f"give at least one {name}")
            if len(set(items)) != len(items):
                raise DevError(f"a {name} is listed twice: {', '.join(map(str, items))}")
        for t in self.tasks:
            spec = TASKS.get(t)
            if spec is None:
                raise DevError(f"unknown task {t!r}; known: {', '.join(sorted(TASKS))}")
            if not spec.synthetic or spec.needs_reference or spec.metric == "rouge":
                raise DevError(f"task {t!r} is not a generated task with its own answer key; use e.g. needle, "
                               "multikey, vartrack, docqa")
        for r in self.ratios:
            try:
                check_ratio(r)
            except BudgetError as exc:
                raise DevError(str(exc)) from None
        for k in self.kernels:
            try:
                KVzip(kernel=k)
            except ValueError as exc:
                raise DevError(str(exc)) from None
        for m in self.normalise:
            try:
                KVzip(normalise=m, replay_chunk=self.replay_chunk)
            except ValueError as exc:
                raise DevError(str(exc)) from None
        base = variant_label(*BASELINE)
        if BASELINE[0] not in self.normalise:
            raise DevError(f"--normalise must include {BASELINE[0]}: differences are taken against {base}")
        if BASELINE[1] not in self.kernels:
            raise DevError(f"--kernels must include {BASELINE[1]} (unpooled scores): differences are taken "
                           f"against {base}")
        for name, value, least in (("--samples", self.samples, 1), ("--context-tokens", self.context_tokens, 64),
                                   ("--threads", self.threads, 1), ("--n-boot", self.n_boot, 1),
                                   ("--decode-batch", self.decode_batch, 1)):
            if value < least:
                raise DevError(f"{name} must be >= {least}, got {value}")
        if self.dtype not in ("float32", "bfloat16"):
            raise DevError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        try:
            resolve_device(self.device)
        except DeviceError as exc:
            raise DevError(f"--device: {exc}") from None
        if not self.out.endswith(".json"):
            raise DevError(f"--out must name a .json file, got {self.out!r}")
        if Path(self.out).is_dir():
            raise DevError(f"--out {self.out} is a folder; name a .json file")
        if not Path(self.profile).is_file():
            raise DevError(f"profile {self.profile} does not exist")
        try:
            Profile.load(self.profile).check_use("kvzip", SETTING, force=self.force_profile)
        except ProfileError as exc:
            raise DevError(f"profile {self.profile}: {exc}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _list(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from None

    return parse


def parse_args(argv: Sequence[str] | None) -> DevConfig:
    d = DevConfig()
    ap = _Parser(prog="kvzip_pool_dev.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", default=d.model, help="alias, local folder or hub id (default: %(default)s)")
    ap.add_argument("--tasks", type=_list(str), default=d.tasks, help=f"comma-separated (default: {','.join(d.tasks)})")
    ap.add_argument("--samples", type=int, default=d.samples, help="calibration samples per task")
    ap.add_argument("--context-tokens", type=int, default=d.context_tokens)
    ap.add_argument("--ratios", type=_list(float), default=d.ratios, help="share of the context's KV pairs removed")
    ap.add_argument("--kernels", type=_list(int), default=d.kernels, help="odd pooling widths; must include 1")
    ap.add_argument("--normalise", type=_list(str), default=d.normalise,
                    help="replay softmax normalisations, context and/or chunk; must include context "
                         f"(default: {','.join(d.normalise)})")
    ap.add_argument("--replay-chunk", type=int, default=d.replay_chunk,
                    help="tokens replayed per KVzip chunk; chunk and context agree on shorter contexts "
                         "(default: %(default)s)")
    ap.add_argument("--profile", default=d.profile, help="agnostic KVzip calibration profile of the model")
    ap.add_argument("--force-profile", action="store_true",
                    help="use a profile calibrated with another scorer or setting anyway")
    ap.add_argument("--dtype", default=d.dtype, help="float32 or bfloat16 (default; ~2.5x faster on this CPU)")
    ap.add_argument("--device", default=d.device,
                    help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (on the CPU only)")
    ap.add_argument("--seed", type=int, default=d.seed, help="task generator seed")
    ap.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples of the CIs")
    ap.add_argument("--decode-batch", type=int, default=d.decode_batch, help="caches decoded together")
    ap.add_argument("--out", default=d.out, help="JSON results file (written atomically at the end)")
    a = ap.parse_args(argv)
    return DevConfig(model=a.model, tasks=tuple(a.tasks), samples=a.samples, context_tokens=a.context_tokens,
                     ratios=tuple(a.ratios), kernels=tuple(a.kernels), normalise=tuple(a.normalise),
                     replay_chunk=a.replay_chunk, profile=str(Path(a.profile).expanduser().resolve()),
                     force_profile=a.force_profile, dtype=a.dtype, device=a.device, threads=a.threads,
                     seed=a.seed, n_boot=a.n_boot, decode_batch=a.decode_batch,
                     out=str(Path(a.out).expanduser().resolve()))


def _decode(model, tokenizer, caches: list, full_ids, max_new: int, batch: int) -> list[str]:
    """Greedy answers of several caches of one prompt: one fast-path batch per ``batch`` caches (plain
    ``generate`` for a model the fast path does not support), each cut after its first end-of-sequence token."""
    from depthkv.engine import generate_from_cache
    from depthkv.engine.static import (
        FastDecodeError,
        answers_until_eos,
        check_model,
        eos_ids,
        fast_generate_caches,
    )

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        check_model(model)
    except FastDecodeError:
        outs = [generate_from_cache(model, c, full_ids, max_new_tokens=max_new, do_sample=False, pad_token_id=pad,
                                    top_p=None, top_k=None, temperature=None)[0] for c in caches]
        return [tokenizer.decode(o[full_ids.shape[1]:], skip_special_tokens=True).strip() for o in outs]
    texts = []
    for i in range(0, len(caches), batch):
        out = fast_generate_caches(model, caches[i:i + batch], full_ids, max_new, do_sample=False, pad_token_id=pad)
        texts += [tokenizer.decode(row, skip_special_tokens=True).strip()
                  for row in answers_until_eos(out, full_ids.shape[1], eos_ids(model, {}))]
    return texts


def run_sample(lm, cfg: DevConfig, specs: dict, scorers: dict, task: str, sample, count) -> dict[str, Any]:
    """One calibration sample: one prefill, a reconstruction per normalisation (``scorers``: normalise -> bound
    KVzip), then prune per (kernel, ratio), decode every cache together, score."""
    import torch

    from depthkv.engine import Protection, score_prefill
    from depthkv.eval.runner import MAX_NEW_TOKENS, prompt_ids
    from depthkv.scorers.kvzip import span_max_pool
    from depthkv.tasks.metrics import METRICS, score

    model, tok = lm.model, lm.tokenizer
    n_layers = model.config.num_hidden_layers
    prefix, full_ids = prompt_ids(tok, sample, SETTING, model.device)
    n = int(prefix.shape[1])
    cells: list[dict[str, Any]] = [{"ratio": 0.0, "normalise": None, "kernel": None, "variant": "full"}]
    caches: list = []
    t_score, t_replay = 0.0, {}
    first = None
    for m in cfg.normalise:
        scorer = scorers[m]
        t0 = time.perf_counter()
        if first is None:  # one prefill; every further normalisation replays on its cache
            sp = first = score_prefill(model, prefix, [scorer], Protection(N_SINK, N_RECENT))
            caches.append(sp.full_cache())
        else:
            sp = first.rescored(model, prefix, scorer)
        t_score += time.perf_counter() - t0
        t_replay[m] = round(sp.context_pass.seconds, 2)
        for k in cfg.kernels:
            pooled = [span_max_pool(s, k) for s in sp.scores[scorer.name]]  # == KVzip(kernel=k)'s scores
            view = dataclasses.replace(sp, scores={scorer.name: pooled})
            for r in cfg.ratios:
                budgets = specs[r].for_context(n_layers, n, pooled)
                caches.append(view.prune(scorer.name, budgets, head_budgets=True))
                cells.append({"ratio": r, "normalise": m, "kernel": k, "variant": variant_label(m, k),
                              "budgets": list(budgets.tokens)})
        del sp, view, pooled  # the pruned caches are copies: free this normalisation's scores
    t1 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    texts = _decode(model, tok, caches, full_ids, MAX_NEW_TOKENS.get(task, 64), cfg.decode_batch)
    primary = METRICS[sample.metric].primary
    for cell, text in zip(cells, texts, strict=True):
        cell["output"] = text
        cell["score"] = float(score(sample, text, None, count_tokens=count)[primary])
    return {
        "task": task, "sample_id": sample.id, "context_len": n, "prompt_len": int(full_ids.shape[1]),
        "answer": sample.answer, "metric": sample.metric, "primary": primary,
        "full": cells[0]["score"], "full_output": cells[0]["output"], "cells": cells[1:],
        "seconds": {"prefill_and_reconstruction": round(t_score, 2),
                    "reconstruction": round(sum(t_replay.values()), 2),
                    "reconstruction_by_normalise": t_replay,
                    "prune_and_decode": round(time.perf_counter() - t1, 2)},
    }


def summarise(records: list[dict], cfg: DevConfig) -> list[dict]:
    """Per (task, ratio) and per ratio over all tasks: mean scores per variant and paired variant minus
    ``ctx/k1`` CIs."""
    import numpy as np

    from depthkv.calibration.stats import paired_diff_ci

    def cell_scores(recs: list[dict], ratio: float, label: str) -> np.ndarray:
        return np.array([next(c["score"] for c in r["cells"] if c["ratio"] == ratio and c["variant"] == label)
                         for r in recs])

    labels = [variant_label(m, k) for m, k in cfg.variants]
    base_label = variant_label(*BASELINE)
    rows = []
    groups = [(t, [r for r in records if r["task"] == t]) for t in cfg.tasks] + [("all", records)]
    for ratio in cfg.ratios:
        for task, recs in groups:
            base = cell_scores(recs, ratio, base_label)
            row: dict[str, Any] = {"task": task, "ratio": ratio, "n": len(recs),
                                   "full": float(np.mean([r["full"] for r in recs])),
                                   "mean": {v: float(cell_scores(recs, ratio, v).mean()) for v in labels},
                                   "diff_vs_baseline": {}}
            for v in labels:
                if v != base_label:
                    ci = paired_diff_ci(cell_scores(recs, ratio, v), base, n_boot=cfg.n_boot, seed=cfg.seed)
                    row["diff_vs_baseline"][v] = {"mean": ci.estimate, "low": ci.low, "high": ci.high}
            rows.append(row)
    return rows


def table(rows: list[dict], cfg: DevConfig) -> str:
    """The summary as a fixed-width text table: one mean column per variant, then each variant - ctx/k1."""
    labels = [variant_label(m, k) for m, k in cfg.variants]
    base = variant_label(*BASELINE)
    others = [v for v in labels if v != base]
    width = max(6, *map(len, labels))
    titles = {v: f"{v} - {base} [95% CI]" for v in others}
    cols = {v: max(24, len(t)) for v, t in titles.items()}

    def ci(d: dict) -> str:
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    head = (f"{'task':<9} {'ratio':>5} {'n':>3} {'full':>6} " + " ".join(f"{v:>{width}}" for v in labels)
            + "".join(f"  {titles[v]:>{cols[v]}}" for v in others))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['task']:<9} {r['ratio']:>5g} {r['n']:>3} {r['full']:>6.3f} "
                     + " ".join(f"{r['mean'][v]:>{width}.3f}" for v in labels)
                     + "".join(f"  {ci(r['diff_vs_baseline'][v]):>{cols[v]}}" for v in others))
    return "\n".join(lines)


def run(cfg: DevConfig, argv: Sequence[str]) -> dict[str, Any]:
    """Load the model, run every calibration sample, return the JSON document (also written to ``cfg.out``)."""
    import torch

    import depthkv
    from depthkv.allocation import BudgetSpec
    from depthkv.allocation.budgets import BudgetError
    from depthkv.allocation.profile import Profile, ProfileError
    from depthkv.allocation.registry import AllocatorError
    from depthkv.io import write_json
    from depthkv.models import load_model
    from depthkv.models.device import model_device, resolve_device
    from depthkv.models.errors import DepthKVModelError
    from depthkv.models.hashing import sha256_file
    from depthkv.models.identity import model_identity
    from depthkv.scorers import get_scorer
    from depthkv.tasks import generate
    from depthkv.tasks.prompt import token_counter

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)  # checked by validate(): a bad one never gets here
    on_cpu = device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(cfg.threads)
    try:
        lm = load_model(cfg.model, device=device, dtype=cfg.dtype)
    except (DepthKVModelError, OSError, ValueError) as exc:
        raise DevError(f"cannot load model {cfg.model!r}: {exc}") from None
    if lm.tokenizer is None:
        raise DevError(f"model {cfg.model} has no tokenizer; the tasks need one")
    identity = model_identity(lm.model, lm.name)
    try:
        profile = Profile.load(cfg.profile, identity)
        specs = {r: BudgetSpec(r, STRATEGY, profile, (), N_SINK + N_RECENT) for r in cfg.ratios}
        for spec in specs.values():
            spec.validate(identity["n_layers"])
    except (ProfileError, AllocatorError, BudgetError) as exc:
        raise DevError(f"profile {cfg.profile}: {exc}") from None
    count = token_counter(lm.tokenizer)
    try:
        samples = {t: generate(t, cfg.samples, cfg.seed, context_tokens=cfg.context_tokens, count_tokens=count,
                               split=SPLIT) for t in cfg.tasks}
    except (TypeError, ValueError) as exc:
        raise DevError(f"cannot generate the samples: {exc}") from None
    scorers = {m: get_scorer("kvzip", normalise=m, replay_chunk=cfg.replay_chunk).bind(lm.tokenizer)
               for m in cfg.normalise}
    calib_ids = set((profile.data.get("data") or {}).get("sample_ids") or ())
    records = []
    total = sum(len(g) for g in samples.values())
    for task, group in samples.items():
        for sample in group:
            rec = run_sample(lm, cfg, specs, scorers, task, sample, count)
            records.append(rec)
            by = " ".join(f"r{c['ratio']:g}:{c['variant']}={c['score']:.2f}" for c in rec["cells"])
            secs = rec["seconds"]["prefill_and_reconstruction"] + rec["seconds"]["prune_and_decode"]
            print(f"[{len(records)}/{total}] {task} {sample.id} full={rec['full']:.2f} {by} ({secs:.0f}s)",
                  file=sys.stderr, flush=True)
    rows = summarise(records, cfg)
    profile_data = profile.data.get("data") or {}
    doc = {
        "kind": "depthkv-kvzip-pool-dev",
        "command": command_line(__file__, argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": depthkv.__version__,
        "model": identity,
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "device": str(model_device(lm.model)),
        "threads": cfg.threads if on_cpu else None,
        "split": SPLIT,
        "setting": SETTING,
        "config": dataclasses.asdict(cfg),
        "method": {"scorer": "kvzip", "scorer_repr": repr(scorers[BASELINE[0]]),
                   "scorer_repr_by_normalise": {m: repr(sc) for m, sc in scorers.items()},
                   "variants": [variant_label(m, k) for m, k in cfg.variants],
                   "baseline": variant_label(*BASELINE), "strategy": STRATEGY, "head_budgets": True,
                   "n_sink": N_SINK, "n_recent": N_RECENT, "min_tokens": N_SINK + N_RECENT,
                   "decode": "greedy, fast path, every cache of a sample in one batch"},
        "profile": {"path": cfg.profile, "sha256": sha256_file(cfg.profile),
                    "scorer": (profile.data.get("scorer") or {}).get("name"),
                    "scorer_repr": (profile.data.get("scorer") or {}).get("repr"),
                    "setting": profile.data.get("setting"), "calibration": profile_data.get("description"),
                    "force_profile": cfg.force_profile,
                    "calibration_samples_reused": sum(r["sample_id"] in calib_ids for r in records),
                    "note": "calibrated with one KVzip variant (scorer_repr) "
                            "at its own context length, used here at --context-tokens with every variant; "
                            "Profile.check_use compares the scorer name and the setting only (no length or "
                            "option check), so no force was needed unless force_profile is true"},
        "samples": {t: [s.id for s in g] for t, g in samples.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
        "summary": rows,
        "records": records,
    }
    print(table(rows, cfg))
    print(f"{total} samples in {doc['seconds'] / 60:.1f} min; written {write_json(cfg.out, doc)}", file=sys.stderr)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    try:
        cfg.validate()
        run(cfg, argv)
    except DevError as exc:
        print(f"kvzip_pool_dev.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
