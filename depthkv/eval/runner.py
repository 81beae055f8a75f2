"""The evaluation sweep: tasks x settings x (methods x scorers x ratios), one prefill per (sample, setting).

For every sample and setting the runner prefills the prompt ONCE with the full cache while every requested
scorer records its per-layer token scores (``depthkv.engine.score_prefill``). Each cell then costs only a
top-k + gather (``ScoredPrefill.prune``) with the cell's budget vector and a greedy generation from the
pruned cache. ``full`` (no pruning) is generated once per (sample, setting) from a copy of the full cache.

Settings:

* ``aware``: the question is inside the compressed prefill (prefix = context + question minus its last
  token, which is fed at generation time);
* ``agnostic``: only the context is prefilled and compressed; the question is appended afterwards.

The budget vector of a cell is allocated for that sample's own prefix length N with the cell's method
(an allocator of ``depthkv.allocation``) at the cell's ratio, so the kept total is exactly
``round(L * N * (1 - ratio))``. A request an allocator cannot meet (``BudgetError``, e.g. mlma-k at a high
ratio) becomes a row with ``status: "infeasible"`` instead of stopping the sweep.

Rows are appended to ``DIR/results.jsonl`` as soon as a cell is done (see :mod:`depthkv.eval.results`);
rerunning the same command skips the cells already there. Decoding is greedy and every prefill depends
only on its sample, so a resumed run gives the same rows as an uninterrupted one.

:func:`run_eval` reads top to bottom: :func:`_set_up` (folder, config, profile, samples), then for each
(sample, setting) still to do :func:`_prefill` (prefill and score once) and, per cell, :func:`_cell_row`
(prune, decode, score) whose row is written at once; :func:`_summarise` ends the run (``summary.csv/json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depthkv.eval.results import (
    CONFIG,
    RESULTS,
    ROW_SCHEMA,
    EvalError,
    ResultsWriter,
    cell_key,
    prepare_folder,
    read_config,
    row_key,
    shard_files,
)
from depthkv.io import write_json

if TYPE_CHECKING:
    from depthkv.eval.parallel import Shard

SETTINGS = ("aware", "agnostic")
DECODERS = ("auto", "hf", "fast")
FULL = "full"
# greedy tokens generated per task unless --max-new-tokens says otherwise (answers are short; summaries not;
# reasoning models work the sum out before the answer: at 48 tokens Qwen2.5-Coder-1.5B's GSM-inf answers were
# cut off mid-derivation, full cache 0/8, at 256 3/8)
MAX_NEW_TOKENS = {
    "needle": 32, "multikey": 32, "vartrack": 40, "gsm_inf": 256, "code_next_line": 32, "summarise": 128,
    "multihop": 24, "docqa": 24,
    "jsonl": 64,
}  # fmt: skip


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (what ``DIR/config.json`` records and compares)."""

    model: str = "smollm2-135m"
    tasks: Sequence[str] = ("needle",)
    methods: Sequence[str] = ("full", "uniform", "pyramid", "optimal")
    scorers: Sequence[str] = ("snapkv",)
    ratios: Sequence[float] = (0.5, 0.8)
    samples: int = 8
    context_tokens: int = 1024
    settings: Sequence[str] = ("aware",)
    profile: str | None = None
    seed: int = 0
    max_new_tokens: int | None = None  # None: per-task default (MAX_NEW_TOKENS)
    protect_first_layer: bool = False
    n_sink: int = 4
    n_recent: int = 16
    min_tokens: int | None = None  # per-layer floor; None: the protected window (n_sink + n_recent)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # constructor options per scorer name, e.g. {"kvzip_v": {"value_weight": 1.0}}; part of the run's identity
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dtype: str = "auto"  # the model's dtype; "auto" is filled in from the loaded model by run_eval
    attn: str = "sdpa"
    force_profile: bool = False  # use a profile calibrated with another scorer or setting anyway
    # how answers are decoded (neither changes what a cell measures, so neither is part of the run's identity):
    # "hf": model.generate per cell; "fast": cells decoded together, ``decode_batch`` at a time, as one batch of
    # the fixed-shape fast path (depthkv.engine.static: each row keeps its own per-layer and per-head lengths),
    # the cells of consecutive samples of one decode group too (batch_groups); "auto": fast for the model
    # families it supports (Llama, Qwen2), else hf
    decode: str = "auto"
    decode_batch: int = 32

    def __post_init__(self) -> None:
        for name in ("tasks", "methods", "scorers", "settings"):
            setattr(self, name, tuple(str(x) for x in getattr(self, name)))
        self.ratios = tuple(float(r) for r in self.ratios)
        if self.profile is not None:
            self.profile = str(Path(self.profile).expanduser().resolve())

    @property
    def floor(self) -> int:
        return self.min_tokens if self.min_tokens is not None else self.n_sink + self.n_recent

    @property
    def protected_layers(self) -> tuple[int, ...]:
        return (0,) if self.protect_first_layer else ()

    @property
    def pruned_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m != FULL)

    def max_tokens_for(self, task: str) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return MAX_NEW_TOKENS.get(task.split(":", 1)[0], 64)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return cls(**d)

    def validate(self) -> None:
        """Fail before any model work: unknown names, empty lists, methods that need a missing profile."""
        from depthkv.allocation import ALLOCATORS
        from depthkv.allocation.budgets import BudgetError, check_ratio
        from depthkv.extras import require
        from depthkv.scorers import SCORERS
        from depthkv.tasks import TASKS

        def need(items, what):
            if not items:
                raise EvalError(f"give at least one {what}")
            dup = sorted({x for x in items if list(items).count(x) > 1})
            if dup:
                raise EvalError(f"{what}s listed twice: {', '.join(map(str, dup))}")

        need(self.tasks, "task")
        need(self.methods, "method")
        need(self.settings, "setting")
        need(self.ratios, "ratio")
        for t in self.tasks:
            base, _, arg = t.partition(":")
            if base not in TASKS:
                raise EvalError(f"unknown task {t!r}; known: {', '.join(sorted(TASKS))} (user data: jsonl:PATH)")
            if base == "jsonl" and not arg and "path" not in self.task_options.get(t, {}):
                raise EvalError("the jsonl task needs a file: --tasks jsonl:PATH")
        unknown = [m for m in self.methods if m != FULL and split_method(m)[0] not in ALLOCATORS]
        if unknown:
            raise EvalError(f"unknown method(s) {', '.join(unknown)}; available: full, {', '.join(sorted(ALLOCATORS))}")
        if self.pruned_methods:
            need(self.scorers, "scorer")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise EvalError(f"unknown scorer(s) {', '.join(bad)}; available: {', '.join(sorted(SCORERS))}")
        self._check_scorer_options()
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad:
            raise EvalError(f"unknown setting(s) {', '.join(bad)}; available: aware, agnostic")
        for r in self.ratios:
            try:
                check_ratio(r)
            except BudgetError as exc:
                raise EvalError(str(exc)) from None
        if self.samples < 1:
            raise EvalError(f"--samples must be >= 1, got {self.samples}")
        if self.context_tokens < 1:
            raise EvalError(f"--context-tokens must be >= 1, got {self.context_tokens}")
        if self.decode not in DECODERS:
            raise EvalError(f"--decode must be one of {', '.join(DECODERS)}, got {self.decode!r}")
        if self.decode_batch < 1:
            raise EvalError(f"--decode-batch must be >= 1, got {self.decode_batch}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.n_sink < 0 or self.n_recent < 0 or self.floor < 1:
            raise EvalError("protected window sizes must be >= 0 and the per-layer floor >= 1")
        needy = [m for m in self.pruned_methods if ALLOCATORS[split_method(m)[0]].sensitivity_needs]
        if needy and self.profile is None:
            raise EvalError(
                f"method(s) {', '.join(needy)} split the budget by measured sensitivity and need --profile "
                "(make one with: depthkv calibrate --model M --out profile.json)"
            )
        if self.profile is not None and not Path(self.profile).is_file():
            raise EvalError(f"profile {self.profile} does not exist")
        if needy and self.profile is not None:
            self._check_profile_use()
        if FULL not in self.methods and any(t.partition(":")[0] == "summarise" for t in self.tasks):
            raise EvalError("summarise is scored against the full-cache output: include 'full' in --methods")
        rouge = [t for t in self.tasks if TASKS[t.partition(":")[0]].metric == "rouge"]
        if rouge:  # before any model work: a missing eval extra is one line naming it
            require("rouge_score", f"the ROUGE metric of {', '.join(rouge)}", package="rouge-score")
        unknown_opts = sorted(set(self.task_options) - set(self.tasks))
        if unknown_opts:
            raise EvalError(f"task options for task(s) not in --tasks: {', '.join(unknown_opts)}")

    def _check_scorer_options(self) -> None:
        """Options only for listed scorers, and each scorer built with them (its own checks)."""
        from depthkv.scorers import check_scorer_options

        try:
            check_scorer_options(self.scorer_options, self.scorers)
        except ValueError as exc:
            raise EvalError(f"--scorer-options: {exc}") from None

    def scorer(self, name: str):
        """The scorer ``name`` with this run's options for it (not yet bound to a tokenizer)."""
        from depthkv.scorers import get_scorer

        return get_scorer(name, **self.scorer_options.get(name, {}))

    def _check_profile_use(self) -> None:
        """Every (setting, scorer) of the grid must be how the profile was calibrated (unless forced), and every
        ratio of a method that reads refined splits (optimal-joint, adaptive-joint) must be refined in it."""
        from depthkv.allocation import ALLOCATORS, SensitivityError
        from depthkv.allocation.profile import Profile, ProfileError

        try:
            profile = Profile.load(self.profile)
            for setting in self.settings:
                for scorer in self.scorers:
                    profile.check_use(scorer, setting, force=self.force_profile)
            for scorer in self.scorers:  # a scorer the profile was calibrated with gets its options too
                options = profile.options_for(scorer, self.scorer_options.get(scorer, {}), force=self.force_profile)
                if options:
                    self.scorer_options = {**self.scorer_options, scorer: options}
            view = profile.view()
            for m in self.pruned_methods:  # refined splits exist per ratio: every ratio of the grid needs one
                if "refined" in ALLOCATORS[split_method(m)[0]].needs:
                    for r in self.ratios:
                        view.refined_shares(r, m)
        except (ProfileError, SensitivityError) as exc:
            raise EvalError(f"profile {self.profile}: {exc}") from None

    def command_line(self, out: str | Path | None = None) -> str:
        """The ``depthkv eval`` command that runs this configuration."""
        import shlex

        parts = ["depthkv", "eval", "--model", self.model, "--tasks", ",".join(self.tasks),
                 "--methods", ",".join(self.methods), "--scorers", ",".join(self.scorers),
                 "--ratios", ",".join(f"{r:g}" for r in self.ratios), "--samples", str(self.samples),
                 "--context-tokens", str(self.context_tokens), "--settings", ",".join(self.settings),
                 "--seed", str(self.seed)]
        if self.profile:
            parts += ["--profile", self.profile]
        if self.max_new_tokens is not None:
            parts += ["--max-new-tokens", str(self.max_new_tokens)]
        if self.force_profile:
            parts.append("--force-profile")
        if self.protect_first_layer:
            parts.append("--protect-first-layer")
        if (self.n_sink, self.n_recent) != (4, 16):
            parts += ["--n-sink", str(self.n_sink), "--n-recent", str(self.n_recent)]
        if self.min_tokens is not None:
            parts += ["--min-tokens", str(self.min_tokens)]
        if self.task_options:
            parts += ["--task-options", json.dumps(self.task_options, separators=(",", ":"))]
        if self.scorer_options:
            parts += ["--scorer-options", json.dumps(self.scorer_options, separators=(",", ":"))]
        if self.dtype != "auto":  # explicit: --dtype auto differs by device, the recorded run must not
            parts += ["--dtype", self.dtype]
        if self.attn != "sdpa":
            parts += ["--attn", self.attn]
        if self.decode != "auto":
            parts += ["--decode", self.decode]
        if self.decode_batch != 32:
            parts += ["--decode-batch", str(self.decode_batch)]
        if out is not None:
            parts += ["--out", str(out)]
        return shlex.join(parts)

    def run_record(self) -> dict[str, Any]:
        """What must match for a restart into the same folder to resume (arguments + profile content)."""
        from depthkv.models.hashing import sha256_file

        d = self.to_dict()
        for key in ("force_profile", "decode", "decode_batch"):  # change no result: rows record them
            d.pop(key)
        if not d["scorer_options"]:  # runs without options keep the record they had before options existed
            d.pop("scorer_options")
        d["profile_sha256"] = sha256_file(self.profile) if self.profile else None
        return d


HEADS = "+heads"


def split_method(method: str) -> tuple[str, bool]:
    """``"adaptive+heads"`` -> ("adaptive", True): an allocator, and whether each layer's budget is also split
    across its KV heads by their scores."""
    return (method[: -len(HEADS)], True) if method.endswith(HEADS) else (method, False)


def task_label(task: str) -> str:
    """Row label of a task spec: ``jsonl:/data/qa.jsonl`` -> ``jsonl:qa``."""
    base, _, arg = task.partition(":")
    return f"{base}:{Path(arg).stem}" if arg else base


def load_samples(cfg: EvalConfig, tokenizer) -> dict[str, list]:
    """Evaluation samples (split="eval") of every task, keyed by task label (from the sample cache when this
    machine generated them before: :mod:`depthkv.tasks.sample_cache`)."""
    from depthkv.tasks.sample_cache import generate_cached

    out = {}
    for t in cfg.tasks:
        base, _, arg = t.partition(":")
        opts = dict(cfg.task_options.get(t, {}))
        if arg:
            opts["path"] = arg
        try:
            samples = generate_cached(base, cfg.samples, cfg.seed, context_tokens=cfg.context_tokens,
                                      tokenizer=tokenizer, split="eval", **opts)
        except (TypeError, ValueError) as exc:  # unknown option, context too short for the task, ...
            raise EvalError(f"task {t}: {exc}") from None
        if not samples:
            raise EvalError(f"task {t} gave no evaluation samples")
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise EvalError(f"task {t}: sample ids are not unique")
        out[task_label(t)] = samples
    return out


def check_disjoint(profile, samples: dict[str, list]) -> None:
    """Calibration and evaluation samples must never overlap (ids recorded by the profile)."""
    calib = set(((profile.data.get("data") or {}).get("sample_ids")) or ())
    if not calib:
        return
    clash = sorted(s.id for group in samples.values() for s in group if s.id in calib)
    if clash:
        raise EvalError(
            f"{len(clash)} evaluation sample(s) were used to calibrate the profile (e.g. {clash[0]}); "
            "evaluate on other data (built-in tasks use split='eval', calibration split='calib')"
        )


def _scalar_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The sample meta fields worth carrying in every row (scalars: depth, length, key, ...)."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)):
            if not isinstance(v, str) or len(v) <= 200:
                out[k] = v
    return out


def _seed_for(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass
class Cell:
    method: str
    scorer: str | None
    ratio: float


def cells_for(cfg: EvalConfig) -> list[Cell]:
    """The cells of one (sample, setting), ``full`` first (summarisation scores against its output)."""
    cells = [Cell(FULL, None, 0.0)] if FULL in cfg.methods else []
    cells += [Cell(m, s, r) for m in cfg.pruned_methods for s in cfg.scorers for r in cfg.ratios]
    return cells


@dataclass
class EvalRun:
    """Outcome of :func:`run_eval`: every row of the folder (old and new) and the summary cells of them."""

    folder: Path
    rows: list[dict]
    new_rows: int
    skipped: int
    prefills: int
    seconds: float
    cells: list[dict] = field(default_factory=list)


def prompt_ids(tokenizer, sample, setting: str, device=None):
    """(prefix [1, N], full prompt [1, T]) token ids of ``sample`` in ``setting``, on ``device`` (the model's).

    ``aware``: the prefix is the whole prompt (context + question) minus its last token, which generation
    feeds; ``agnostic``: the prefix is the context alone and the question follows at generation time.
    """
    import torch

    from depthkv.tasks.prompt import build_prompt

    ctx, q = build_prompt(tokenizer, sample, question_in_prefill=(setting == "aware"))
    full = list(ctx) + list(q)
    prefix = full[:-1] if setting == "aware" else list(ctx)
    return (torch.tensor([prefix], dtype=torch.long, device=device),
            torch.tensor([full], dtype=torch.long, device=device))


@dataclass
class _Sweep:
    """What every cell of one run shares, built once by :func:`_set_up`."""

    cfg: EvalConfig
    name: str
    model: Any
    tokenizer: Any
    folder: Path
    n_layers: int
    view: Any  # the profile's SensitivityView, or None without --profile
    samples: dict[str, list]
    scorers: list
    protection: Any
    count: Callable[[str], int]
    common: dict[str, Any]  # the fields every row carries
    pad: int
    decoder: str  # "hf" or "fast": EvalConfig.decode resolved for this model and device
    _budgets: dict[tuple, Any] = field(default_factory=dict)

    def budgets(self, method: str, ratio: float, n: int, scores=None):
        """The cell's budgets (or the BudgetError saying why none exist); cached per length unless they
        depend on the input's scores (input-adaptive allocators)."""
        from depthkv.allocation import BudgetSpec
        from depthkv.allocation.budgets import BudgetError

        spec = BudgetSpec(ratio, split_method(method)[0], self.view, self.cfg.protected_layers, self.cfg.floor)
        key = (method, ratio, n)
        if spec.needs_scores or key not in self._budgets:
            try:
                budgets = spec.for_context(self.n_layers, n, scores)
            except BudgetError as exc:
                budgets = exc
            if spec.needs_scores:
                return budgets
            self._budgets[key] = budgets
        return self._budgets[key]


@dataclass
class _Prefill:
    """One (sample, setting) prefilled and scored once; each of its cells prunes a copy of this cache."""

    label: str
    sample: Any
    setting: str
    n_ctx: int  # prefix tokens in the cache
    full_ids: Any  # [1, T]: the prompt generation starts from
    scored: Any  # depthkv.engine.ScoredPrefill; None once every cell is pruned (frees the full cache)
    seconds: float
    full_bytes: int
    context_pass_seconds: float = 0.0  # KVzip's context replay, part of ``seconds``


def run_eval(
    lm,
    cfg: EvalConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    shard: Shard | None = None,
) -> EvalRun:
    """Run (or resume) the sweep ``cfg`` with the loaded model ``lm`` into folder ``out``.

    ``lm`` is a ``depthkv.models.LoadedModel`` (model, tokenizer, name). ``on_row`` is called after each
    row is written (tests use it to interrupt a run). Returns every row of the folder, old and new, and
    their summary, also written to ``summary.csv`` / ``summary.json``.

    ``shard`` (data-parallel runs, :mod:`depthkv.eval.parallel`): evaluate only that rank's samples into its
    own ``results.rank<i>.jsonl``, skipping cells in any results file of the folder; only rank 0 writes
    ``config.json``, nothing is summarised and the rows returned are the shard's.
    """
    from tqdm.auto import tqdm

    from depthkv.eval.parallel import merge_shards, other_rows

    t_start = time.perf_counter()
    sweep = _set_up(lm, cfg, out, force=force, write_config=shard is None or shard.rank == 0)
    if shard is None and shard_files(sweep.folder):  # a data-parallel run continued on one device
        merge_shards(sweep.folder, cfg)
    new_rows = prefills = 0
    groups = batch_groups(cfg, sweep.samples)
    owned = shard.owned(sweep.samples, groups) if shard is not None else None
    if owned is not None and not owned:  # more ranks than decode groups: nothing here (and no shard file)
        return EvalRun(sweep.folder, [], 0, 0, 0, time.perf_counter() - t_start)
    with ResultsWriter(sweep.folder / RESULTS if shard is None else shard.path(sweep.folder)) as writer:
        earlier = other_rows(sweep.folder, shard) if shard is not None else []
        todo, skipped = _pending(sweep, writer.done | {row_key(r) for r in earlier}, owned)
        n_left = sum(len(left) for *_, left in todo)
        if skipped:
            print(f"resuming in {sweep.folder}: {skipped} cells already done, {n_left} to go", file=sys.stderr)
        full_out = _full_outputs([*earlier, *writer.rows])
        bar = tqdm(total=n_left, desc="eval" if shard is None else f"eval[{shard.rank}]", unit="cell",
                   disable=not progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                   position=shard.rank if shard is not None else None)
        def started(label: str, setting: str) -> None:
            nonlocal prefills
            prefills += 1
            bar.set_postfix_str(f"{label} {setting}", refresh=False)

        try:
            for row in _sweep_rows(sweep, todo, groups, full_out, started):
                writer.append(row)
                new_rows += 1
                bar.update(1)
                if on_row:
                    on_row(row)
        finally:
            bar.close()
        rows = list(writer.rows)
    if shard is not None:  # the merging process summarises every shard's rows
        return EvalRun(sweep.folder, rows, new_rows, skipped, prefills, time.perf_counter() - t_start)
    cells = _summarise(sweep, rows)
    return EvalRun(sweep.folder, rows, new_rows, skipped, prefills, time.perf_counter() - t_start, cells)


def _set_up(lm, cfg: EvalConfig, out: str | Path, *, force: bool, write_config: bool = True) -> _Sweep:
    """Validate ``cfg``, prepare the folder (resume a run of the same arguments, or start one), load and check
    the profile and the samples, and write ``config.json`` into a new folder."""
    import depthkv
    from depthkv.engine import Protection
    from depthkv.engine.press import bind_scorer
    from depthkv.models.identity import model_identity
    from depthkv.scorers import get_scorer
    from depthkv.tasks.prompt import token_counter

    cfg.validate()
    model, tok = lm.model, lm.tokenizer
    if tok is None:
        raise EvalError(f"model {lm.name} has no tokenizer; evaluation needs one")
    if cfg.dtype == "auto":  # record what the model really runs in (part of the run); the device is not
        cfg.dtype = str(model.dtype).removeprefix("torch.")
    identity = model_identity(model, lm.name)
    n_layers = identity["n_layers"]
    record = cfg.run_record()
    folder = prepare_folder(out, record, force=force)
    old = read_config(folder)
    if old is not None and old.get("model", {}).get("config_sha256") != identity["config_sha256"]:
        raise EvalError(
            f"{folder} holds results for another model configuration ({old['model'].get('name')}, config "
            f"{str(old['model'].get('config_sha256'))[:12]}); use another --out or --force"
        )
    profile, view, profile_info = _load_profile(cfg, identity, record["profile_sha256"])
    if cfg.protect_first_layer and n_layers < 2:
        raise EvalError("--protect-first-layer needs a model with at least 2 layers")
    samples = load_samples(cfg, tok)
    if profile is not None:
        check_disjoint(profile, samples)
    if old is None and write_config:
        write_json(folder / CONFIG, {
            "kind": "depthkv-eval", "run": record, "model": identity, "profile": profile_info,
            "device": str(model.device),  # where the run started; not compared on resume
            "force_profile": cfg.force_profile,
            "package_version": depthkv.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": cfg.command_line(folder),
            "samples": {label: [s.id for s in group] for label, group in samples.items()},
        })
    common = {
        "schema": ROW_SCHEMA,
        "model": {"name": identity["name"], "config_sha256": identity["config_sha256"], "n_layers": n_layers},
        "profile": profile_info and {"path": profile_info["path"], "sha256": profile_info["sha256"]},
        "version": depthkv.__version__, "seed": cfg.seed, "context_tokens": cfg.context_tokens,
        "protection": {"n_sink": cfg.n_sink, "n_recent": cfg.n_recent},
        "min_tokens": cfg.floor, "protected_layers": list(cfg.protected_layers), "dtype": cfg.dtype,
        "device": str(model.device),
    }
    if cfg.scorer_options:
        common["scorer_options"] = cfg.scorer_options
    # bound to the tokenizer (KVzip's repeat prompt) after checking data a scorer carries is this model's
    scorers = [bind_scorer(cfg.scorer(s), model, tok) for s in cfg.scorers] if cfg.pruned_methods \
        else [get_scorer("knorm")]
    return _Sweep(
        cfg, lm.name, model, tok, folder, n_layers, view, samples, scorers, Protection(cfg.n_sink, cfg.n_recent),
        token_counter(tok), common, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        _decoder(cfg.decode, model),
    )


def _decoder(choice: str, model) -> str:
    """``auto`` -> ``fast`` for the model families the fast path supports, else ``hf``; an explicit ``fast`` for
    a model it does not support is refused before any work."""
    from depthkv.engine.static import FastDecodeError, check_model

    if choice == "hf":
        return "hf"
    try:
        check_model(model)
    except FastDecodeError as exc:
        if choice == "fast":
            raise EvalError(f"--decode fast: {exc}") from None
        return "hf"
    return "fast"


def _load_profile(cfg: EvalConfig, identity: dict[str, Any], sha256: str | None):
    """(profile, its sensitivity view, what config.json records of it); three Nones without a profile.

    The profile must belong to the model, and hold what every method needs (e.g. mga/mlma need the InfoNCE
    of a calibration with proxy metrics).
    """
    from depthkv.allocation import ALLOCATORS, SensitivityError
    from depthkv.allocation.profile import Profile

    if not cfg.profile:
        return None, None, None
    profile = Profile.load(cfg.profile, identity)
    view = profile.view()
    for m in cfg.pruned_methods:
        for need in ALLOCATORS[split_method(m)[0]].sensitivity_needs:
            try:
                view.require(need, m)
            except SensitivityError as exc:
                raise EvalError(f"profile {cfg.profile}: {exc}") from None
    data = profile.data.get("data") or {}
    info = {"path": cfg.profile, "sha256": sha256, "calibration": data.get("description"),
            "calibration_tasks": data.get("tasks")}
    return profile, view, info


GROUP_TOKENS = 1 << 17  # context tokens of the samples whose caches may wait together for one batch (memory)


def batch_groups(cfg: EvalConfig, samples: dict[str, list]) -> dict[tuple[str, str], tuple[str, int]]:
    """(task label, sample id) -> its decode group: runs of consecutive samples of one task, as many as fill
    one fast-path batch with every cell of the grid (``decode_batch // cells``, at least one sample; at most
    ``GROUP_TOKENS // context_tokens``, which bounds the caches held while a batch fills).

    The cells of one group may share a batch, those of two groups never, and data-parallel shards own whole
    groups (:meth:`Shard.owned`): which rows share a batch (and so the floating-point order of their
    batched products) does not depend on how many devices run the sweep.
    """
    per = max(1, min(cfg.decode_batch // max(1, len(cells_for(cfg))), GROUP_TOKENS // max(1, cfg.context_tokens)))
    return {(label, s.id): (label, i // per) for label, group in samples.items() for i, s in enumerate(group)}


def _pending(sweep: _Sweep, done: set[str], owned: set[tuple[str, str]] | None = None,
             ) -> tuple[list[tuple[str, Any, str, list[Cell]]], int]:
    """The (task label, sample, setting, cells not yet in the folder) still to run, in sweep order, and how
    many cells are done already; ``owned``: only these (task label, sample id), a data-parallel shard."""
    cells = cells_for(sweep.cfg)
    todo, n_done = [], 0
    for label, group in sweep.samples.items():
        for sample in group:
            if owned is not None and (label, sample.id) not in owned:
                continue
            for setting in sweep.cfg.settings:
                left = [c for c in cells if cell_key(label, sample.id, setting, c.method, c.scorer, c.ratio) not in done]
                n_done += len(cells) - len(left)
                if left:
                    todo.append((label, sample, setting, left))
    return todo, n_done


def _full_outputs(rows: Sequence[dict]) -> dict[tuple[str, str], str]:
    """(sample id, setting) -> the full-cache output of the rows already written (summarisation's reference)."""
    return {(r["sample_id"], r["setting"]): r["output"] for r in rows if r["method"] == FULL and r.get("status") == "ok"}


def _prefill(sweep: _Sweep, label: str, sample, setting: str) -> _Prefill:
    """Prefill ``sample``'s prompt once with the full cache while every scorer records its per-layer scores."""
    import torch

    from depthkv.engine import kv_bytes, score_prefill

    prefix, full_ids = prompt_ids(sweep.tokenizer, sample, setting, sweep.model.device)
    torch.manual_seed(_seed_for(sweep.cfg.seed, sample.id, setting))
    t0 = time.perf_counter()
    sp = score_prefill(sweep.model, prefix, sweep.scorers, sweep.protection)
    seconds = time.perf_counter() - t0  # KVzip's context replay included
    replay = sp.context_pass.seconds if sp.context_pass else 0.0
    return _Prefill(label, sample, setting, int(prefix.shape[1]), full_ids, sp, seconds, kv_bytes(sp.cache), replay)


@dataclass
class _Pending:
    """A cell pruned and waiting for its answer: its row so far, its cache (None: infeasible) and budgets."""

    cell: Cell
    row: dict[str, Any]
    cache: Any = None
    budgets: Any = None
    seconds: float = 0.0  # pruning time (the decode's share is added when the answer is in)


def _sweep_rows(sweep: _Sweep, todo, groups: dict[tuple[str, str], tuple[str, int]],
                full_out: dict[tuple[str, str], str], started: Callable[[str, str], None]):
    """The rows of every pending (sample, setting) of ``todo``, in order (each sample's ``full`` cell first);
    ``groups``: :func:`batch_groups` of the sweep; ``started(label, setting)`` is called before each prefill.

    ``hf``: each cell pruned, decoded with ``model.generate`` and scored before the next. ``fast``: cells are
    pruned and decoded together, up to ``decode_batch`` caches per batch of the fast path; the cells of
    consecutive samples of one :func:`batch_groups` group and setting share a batch (each cache feeds the rest
    of its own prompt: its last token, or its question in the query-agnostic setting), so a sweep with few
    cells per sample still fills its batches.
    Each row's ``seconds`` is its pruning plus an equal share of its batch's decode.
    """
    if sweep.decoder == "hf":
        for label, sample, setting, left in todo:
            started(label, setting)
            pf = _prefill(sweep, label, sample, setting)
            for cell in left:
                job = _prepare(sweep, pf, cell)
                if job.cache is not None:
                    t0 = time.perf_counter()
                    seed = _seed_for(sweep.cfg.seed, pf.sample.id, pf.setting, cell.method, cell.scorer, cell.ratio)
                    text, n_new = _decode(sweep, job.cache, pf.full_ids, job.row["max_new_tokens"], seed)
                    job.seconds += time.perf_counter() - t0
                    job.cache = None
                    _finish_row(sweep, pf, job, text, n_new, full_out)
                yield job.row
            del pf  # free the full cache before the next prefill
        return
    batch: list[tuple[_Prefill, _Pending]] = []  # cells pruned, waiting for their batch's decode (in order)
    joins: tuple | None = None  # (decode group, setting) of the open batch

    def flush() -> list[dict]:
        live = [(pf, job) for pf, job in batch if job.cache is not None]
        if live:
            t0 = time.perf_counter()
            answers = _decode_batch(sweep, live)
            share = (time.perf_counter() - t0) / len(live)
            for (pf, job), (text, n_new) in zip(live, answers):
                job.seconds += share
                job.cache = None
                _finish_row(sweep, pf, job, text, n_new, full_out)
        rows = [job.row for _, job in batch]
        batch.clear()  # the prefills (full caches) of finished samples are freed with their jobs
        return rows

    for label, sample, setting, left in todo:
        key = (groups[(label, sample.id)], setting)
        if batch and key != joins:
            yield from flush()  # before the next prefill: its full cache and this batch are not held together
        started(label, setting)
        pf = _prefill(sweep, label, sample, setting)
        for cell in left:
            batch.append((pf, _prepare(sweep, pf, cell)))
            if sum(job.cache is not None for _, job in batch) >= sweep.cfg.decode_batch:
                yield from flush()
        pf.scored = None  # every cell is pruned: the full cache and the scores are not needed while it waits
        joins = key
        del pf
    yield from flush()


def _prepare(sweep: _Sweep, pf: _Prefill, cell: Cell) -> _Pending:
    """The cell's row so far and its pruned cache; a budget the allocator cannot meet gives a finished
    ``infeasible`` row and no cache."""
    from depthkv.allocation.budgets import BudgetError
    from depthkv.engine.cache import kv_bytes_ragged
    from depthkv.tasks.metrics import METRICS

    t0 = time.perf_counter()
    sample = pf.sample
    spec = METRICS[sample.metric]
    row = {
        **sweep.common, "task": pf.label, "sample_id": sample.id, "sample_meta": _scalar_meta(sample.meta),
        "setting": pf.setting, "method": cell.method, "scorer": cell.scorer, "ratio": cell.ratio,
        "context_len": pf.n_ctx, "prompt_len": int(pf.full_ids.shape[1]),
        "max_new_tokens": sweep.cfg.max_tokens_for(pf.label), "metric": sample.metric, "primary": spec.primary,
        "answer": sample.answer, "decode": sweep.decoder,
    }
    if cell.method == FULL:
        cache, budgets = pf.scored.full_cache(), None
    else:
        budgets = sweep.budgets(cell.method, cell.ratio, pf.n_ctx, pf.scored.scores.get(cell.scorer))
        if isinstance(budgets, BudgetError):
            row.update(status="infeasible", error=str(budgets), budgets=None, kv_bytes_kept=None,
                       kv_bytes_full=pf.full_bytes, kv_share=None, output=None, metrics=None, score=None,
                       new_tokens=0, seconds=0.0, prefill_seconds=pf.seconds)
            return _Pending(cell, row)
        cache = pf.scored.prune(cell.scorer, budgets, head_budgets=split_method(cell.method)[1])
    row["kv_bytes_kept"] = kv_bytes_ragged(cache)  # per-head budgets: the kept pairs, not the padding
    return _Pending(cell, row, cache, budgets, time.perf_counter() - t0)


def _finish_row(sweep: _Sweep, pf: _Prefill, job: _Pending, text: str, n_new: int,
                full_out: dict[tuple[str, str], str]) -> None:
    """Score the cell's answer into its row. ``full_out`` holds the full-cache output of each (sample,
    setting), the reference of reference-based metrics; the ``full`` cell adds to it."""
    from depthkv.tasks.metrics import METRICS

    row, cell, sid = job.row, job.cell, pf.sample.id
    ref = None
    if METRICS[pf.sample.metric].name == "rouge":
        ref = text if cell.method == FULL else full_out.get((sid, pf.setting))
        if ref is None:
            raise EvalError(f"{sid}: the summarisation metric needs the full-cache output; include 'full' in --methods")
    metrics = _score(pf.sample, text, ref, sweep.count)
    kept = row["kv_bytes_kept"]
    row.update(
        status="ok", error=None,
        budgets=list(job.budgets.tokens) if job.budgets else [pf.n_ctx] * sweep.n_layers,
        kv_bytes_kept=kept, kv_bytes_full=pf.full_bytes, kv_share=kept / pf.full_bytes, output=text,
        metrics=metrics, score=metrics[row["primary"]], new_tokens=n_new, seconds=job.seconds,
        prefill_seconds=pf.seconds,
        context_pass_seconds=pf.context_pass_seconds,
    )
    if ref is not None:
        row["reference"] = ref
    if cell.method == FULL:
        full_out[(sid, pf.setting)] = text


def _decode(sweep: _Sweep, cache, full_ids, max_new: int, seed: int) -> tuple[str, int]:
    """Greedy generation from ``cache`` after the prompt ``full_ids``: (stripped text, new tokens)."""
    import torch

    from depthkv.engine import generate_from_cache

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_ids = generate_from_cache(sweep.model, cache, full_ids, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=sweep.pad, top_p=None, top_k=None, temperature=None)
    new = out_ids[0, full_ids.shape[1]:]
    return sweep.tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.shape[0])


def _decode_batch(sweep: _Sweep, live: list[tuple[_Prefill, _Pending]]) -> list[tuple[str, int]]:
    """Greedy answers of pruned caches decoded as one fast-path batch: (text, new tokens) per cache, each cut
    after its first end-of-sequence token as ``generate`` stops there. Every cache feeds what follows it in its
    prompt (the last token, or the question in the query-agnostic setting)."""

    from depthkv.engine.static import answers_until_eos, eos_ids, fast_generate_rows

    caches = [job.cache for _, job in live]
    feeds = [pf.full_ids[:, pf.n_ctx:] for pf, _ in live]  # each cache's rest of its prompt
    out = fast_generate_rows(sweep.model, caches, feeds, live[0][1].row["max_new_tokens"], do_sample=False,
                             pad_token_id=sweep.pad)
    rows = answers_until_eos(out, 0, eos_ids(sweep.model, {}))
    return [(sweep.tokenizer.decode(row, skip_special_tokens=True).strip(), len(row)) for row in rows]


def _summarise(sweep: _Sweep, rows: list[dict]) -> list[dict]:
    """Summary cells of every row of the folder, written to ``summary.csv`` / ``summary.json`` beside them."""
    from depthkv.eval.summary import summarise, write_summary

    cells = summarise(rows)
    write_summary(sweep.folder, cells, {"model": sweep.name, "folder": str(sweep.folder)})
    return cells


def _score(sample, text: str, reference: str | None, count) -> dict[str, float]:
    """The sample's metric; a reference-based metric with an empty full-cache output (the model said
    nothing) scores 1 for an empty output and 0 otherwise instead of failing."""
    from depthkv.tasks.metrics import score, yap_score

    if reference is not None and not reference.strip():
        same = float(not text.strip())
        return {"rouge1": same, "rouge2": same, "rougeL": same, "yap": float(yap_score(text, 0, count))}
    return {k: float(v) for k, v in score(sample, text, reference, count_tokens=count).items()}

