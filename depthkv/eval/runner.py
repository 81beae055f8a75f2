"""The evaluation sweep: tasks x settings x (methods x scorers x ratios), one prefill per (sample, setting).

For every sample and setting the runner prefills the prompt ONCE with the full cache while every requested
scorer records its per-layer token scores (``depthkv.engine.score_prefill``). Each cell then costs only a
top-k + gather (``ScoredPrefill.prune``) with the cell's budget vector and a greedy generation from the
pruned cache. ``full`` (no pruning) is generated once per (sample, setting) from a copy of the full cache.

Settings (design brief, "Engine contract"):

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
from typing import Any

from depthkv.eval.results import (
    CONFIG,
    RESULTS,
    EvalError,
    ResultsWriter,
    cell_key,
    prepare_folder,
    read_config,
    sha256_file,
    write_json,
)

SETTINGS = ("aware", "agnostic")
FULL = "full"
# greedy tokens generated per task unless --max-new-tokens says otherwise (answers are short; summaries not)
MAX_NEW_TOKENS = {
    "needle": 32, "multikey": 32, "vartrack": 40, "gsm_inf": 48, "code_next_line": 32, "summarise": 128,
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
    dtype: str = "float32"
    attn: str = "sdpa"

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
        unknown = [m for m in self.methods if m != FULL and m not in ALLOCATORS]
        if unknown:
            raise EvalError(f"unknown method(s) {', '.join(unknown)}; available: full, {', '.join(sorted(ALLOCATORS))}")
        if self.pruned_methods:
            need(self.scorers, "scorer")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise EvalError(f"unknown scorer(s) {', '.join(bad)}; available: {', '.join(sorted(SCORERS))}")
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
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.n_sink < 0 or self.n_recent < 0 or self.floor < 1:
            raise EvalError("protected window sizes must be >= 0 and the per-layer floor >= 1")
        needy = [m for m in self.pruned_methods if ALLOCATORS[m].needs]
        if needy and self.profile is None:
            raise EvalError(
                f"method(s) {', '.join(needy)} split the budget by measured sensitivity and need --profile "
                "(make one with: depthkv calibrate --model M --out profile.json)"
            )
        if self.profile is not None and not Path(self.profile).is_file():
            raise EvalError(f"profile {self.profile} does not exist")
        if FULL not in self.methods and any(t.partition(":")[0] == "summarise" for t in self.tasks):
            raise EvalError("summarise is scored against the full-cache output: include 'full' in --methods")
        unknown_opts = sorted(set(self.task_options) - set(self.tasks))
        if unknown_opts:
            raise EvalError(f"task options for task(s) not in --tasks: {', '.join(unknown_opts)}")

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
        if self.protect_first_layer:
            parts.append("--protect-first-layer")
        if (self.n_sink, self.n_recent) != (4, 16):
            parts += ["--n-sink", str(self.n_sink), "--n-recent", str(self.n_recent)]
        if self.min_tokens is not None:
            parts += ["--min-tokens", str(self.min_tokens)]
        if self.task_options:
            parts += ["--task-options", json.dumps(self.task_options, separators=(",", ":"))]
        if self.dtype != "float32":
            parts += ["--dtype", self.dtype]
        if self.attn != "sdpa":
            parts += ["--attn", self.attn]
        if out is not None:
            parts += ["--out", str(out)]
        return shlex.join(parts)

    def run_record(self) -> dict[str, Any]:
        """What must match for a restart into the same folder to resume (arguments + profile content)."""
        d = self.to_dict()
        d["profile_sha256"] = sha256_file(self.profile) if self.profile else None
        return d


def task_label(task: str) -> str:
    """Row label of a task spec: ``jsonl:/data/qa.jsonl`` -> ``jsonl:qa``."""
    base, _, arg = task.partition(":")
    return f"{base}:{Path(arg).stem}" if arg else base


def load_samples(cfg: EvalConfig, tokenizer) -> dict[str, list]:
    """Evaluation samples (split="eval") of every task, keyed by task label."""
    from depthkv.tasks import generate
    from depthkv.tasks.prompt import token_counter

    count = token_counter(tokenizer)
    out = {}
    for t in cfg.tasks:
        base, _, arg = t.partition(":")
        opts = dict(cfg.task_options.get(t, {}))
        if arg:
            opts["path"] = arg
        try:
            samples = generate(base, cfg.samples, cfg.seed, context_tokens=cfg.context_tokens, count_tokens=count,
                               split="eval", **opts)
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
    """Outcome of :func:`run_eval`."""

    folder: Path
    rows: list[dict]
    new_rows: int
    skipped: int
    prefills: int
    seconds: float


def _prompt(tokenizer, sample, setting: str):
    import torch

    from depthkv.tasks.prompt import build_prompt

    ctx, q = build_prompt(tokenizer, sample, question_in_prefill=(setting == "aware"))
    full = list(ctx) + list(q)
    prefix = full[:-1] if setting == "aware" else list(ctx)
    return torch.tensor([prefix], dtype=torch.long), torch.tensor([full], dtype=torch.long)


def run_eval(
    lm,
    cfg: EvalConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> EvalRun:
    """Run (or resume) the sweep ``cfg`` with the loaded model ``lm`` into folder ``out``.

    ``lm`` is a ``depthkv.models.LoadedModel`` (model, tokenizer, name). ``on_row`` is called after each
    row is written (tests use it to interrupt a run). Returns every row of the folder, old and new.
    """
    import torch
    from tqdm.auto import tqdm

    import depthkv
    from depthkv.allocation import ALLOCATORS, SensitivityError, allocate
    from depthkv.allocation.budgets import BudgetError
    from depthkv.calibration.profile import Profile
    from depthkv.engine import Protection, generate_from_cache, kv_bytes, score_prefill
    from depthkv.models.identity import model_identity
    from depthkv.scorers import get_scorer
    from depthkv.tasks.metrics import METRICS
    from depthkv.tasks.prompt import token_counter

    t_start = time.perf_counter()
    cfg.validate()
    model, tok = lm.model, lm.tokenizer
    if tok is None:
        raise EvalError(f"model {lm.name} has no tokenizer; evaluation needs one")
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
    profile = view = None
    profile_info = None
    if cfg.profile:
        profile = Profile.load(cfg.profile, identity)
        view = profile.view()
        for m in cfg.pruned_methods:  # e.g. mga/mlma need the InfoNCE of a calibration with proxy metrics
            for need in ALLOCATORS[m].needs:
                try:
                    view.require(need, m)
                except SensitivityError as exc:
                    raise EvalError(f"profile {cfg.profile}: {exc}") from None
        profile_info = {"path": cfg.profile, "sha256": record["profile_sha256"],
                        "calibration": (profile.data.get("data") or {}).get("description"),
                        "calibration_tasks": (profile.data.get("data") or {}).get("tasks")}
    if cfg.protect_first_layer and n_layers < 2:
        raise EvalError("--protect-first-layer needs a model with at least 2 layers")
    samples = load_samples(cfg, tok)
    if profile is not None:
        check_disjoint(profile, samples)
    if old is None:
        write_json(folder / CONFIG, {
            "kind": "depthkv-eval", "run": record, "model": identity, "profile": profile_info,
            "package_version": depthkv.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": cfg.command_line(folder),
            "samples": {label: [s.id for s in group] for label, group in samples.items()},
        })

    scorers = [get_scorer(s) for s in cfg.scorers] if cfg.pruned_methods else [get_scorer("knorm")]
    protection = Protection(cfg.n_sink, cfg.n_recent)
    count = token_counter(tok)
    cells = cells_for(cfg)
    common = {
        "schema": 1,
        "model": {"name": identity["name"], "config_sha256": identity["config_sha256"], "n_layers": n_layers},
        "profile": profile_info and {"path": profile_info["path"], "sha256": profile_info["sha256"]},
        "version": depthkv.__version__, "seed": cfg.seed, "context_tokens": cfg.context_tokens,
        "protection": {"n_sink": cfg.n_sink, "n_recent": cfg.n_recent},
        "min_tokens": cfg.floor, "protected_layers": list(cfg.protected_layers), "dtype": cfg.dtype,
    }
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stats = {"new": 0, "skipped": 0, "prefills": 0}
    budget_cache: dict[tuple, Any] = {}

    def budgets_for(method: str, ratio: float, n: int):
        key = (method, ratio, n)
        if key not in budget_cache:
            try:
                budget_cache[key] = allocate(method, n_layers, n, ratio, sensitivity=view,
                                             protected=cfg.protected_layers, min_tokens=min(cfg.floor, n))
            except BudgetError as exc:
                budget_cache[key] = exc
        return budget_cache[key]

    with ResultsWriter(folder / RESULTS) as writer:
        pending = [(label, s, setting, c) for label, group in samples.items() for s in group
                   for setting in cfg.settings for c in cells
                   if cell_key(label, s.id, setting, c.method, c.scorer, c.ratio) not in writer.done]
        n_total = sum(len(g) for g in samples.values()) * len(cfg.settings) * len(cells)
        stats["skipped"] = n_total - len(pending)
        if stats["skipped"]:
            print(f"resuming in {folder}: {stats['skipped']} cells already done, {len(pending)} to go",
                  file=sys.stderr)
        bar = tqdm(total=len(pending), desc="eval", unit="cell", disable=not progress, dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
        full_out: dict[tuple[str, str], str] = {
            (r["sample_id"], r["setting"]): r["output"] for r in writer.rows
            if r["method"] == FULL and r.get("status") == "ok"
        }
        groups: dict[tuple, list] = {}
        for label, s, setting, c in pending:
            groups.setdefault((label, s.id, setting), []).append((s, c))
        try:
            for (label, sid, setting), todo in groups.items():
                sample = todo[0][0]
                bar.set_postfix_str(f"{label} {setting}", refresh=False)
                prefix, full_ids = _prompt(tok, sample, setting)
                n_ctx = prefix.shape[1]
                torch.manual_seed(_seed_for(cfg.seed, sid, setting))
                t0 = time.perf_counter()
                sp = score_prefill(model, prefix, scorers, protection)
                prefill_s = time.perf_counter() - t0
                stats["prefills"] += 1
                full_bytes = kv_bytes(sp.cache)
                max_new = cfg.max_tokens_for(label)
                spec = METRICS[sample.metric]
                needs_ref = spec.name == "rouge"
                for _, c in todo:
                    t0 = time.perf_counter()
                    row = {
                        **common, "task": label, "sample_id": sid, "sample_meta": _scalar_meta(sample.meta),
                        "setting": setting, "method": c.method, "scorer": c.scorer, "ratio": c.ratio,
                        "context_len": n_ctx, "prompt_len": int(full_ids.shape[1]), "max_new_tokens": max_new,
                        "metric": sample.metric, "primary": spec.primary, "answer": sample.answer,
                    }
                    if c.method == FULL:
                        cache, budgets = sp.full_cache(), None
                    else:
                        budgets = budgets_for(c.method, c.ratio, n_ctx)
                        if isinstance(budgets, BudgetError):
                            row.update(status="infeasible", error=str(budgets), budgets=None, kv_bytes_kept=None,
                                       kv_bytes_full=full_bytes, kv_share=None, output=None, metrics=None,
                                       score=None, new_tokens=0, seconds=0.0, prefill_seconds=prefill_s)
                            writer.append(row)
                            stats["new"] += 1
                            bar.update(1)
                            if on_row:
                                on_row(row)
                            continue
                        cache = sp.prune(c.scorer, budgets)
                    kept = kv_bytes(cache)
                    torch.manual_seed(_seed_for(cfg.seed, sid, setting, c.method, c.scorer, c.ratio))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out_ids = generate_from_cache(model, cache, full_ids, max_new_tokens=max_new, do_sample=False,
                                                      pad_token_id=pad, top_p=None, top_k=None, temperature=None)
                    new = out_ids[0, full_ids.shape[1]:]
                    text = tok.decode(new, skip_special_tokens=True).strip()
                    ref = None
                    if needs_ref:
                        ref = text if c.method == FULL else full_out.get((sid, setting))
                        if ref is None:
                            raise EvalError(f"{sid}: the summarisation metric needs the full-cache output; "
                                            "include 'full' in --methods")
                    metrics = _score(sample, text, ref, count)
                    row.update(
                        status="ok", error=None, budgets=list(budgets.tokens) if budgets else [n_ctx] * n_layers,
                        kv_bytes_kept=kept, kv_bytes_full=full_bytes, kv_share=kept / full_bytes,
                        output=text, metrics=metrics, score=metrics[spec.primary], new_tokens=int(new.shape[0]),
                        seconds=time.perf_counter() - t0, prefill_seconds=prefill_s,
                    )
                    if needs_ref:
                        row["reference"] = ref
                    if c.method == FULL:
                        full_out[(sid, setting)] = text
                    writer.append(row)
                    stats["new"] += 1
                    bar.update(1)
                    if on_row:
                        on_row(row)
                del sp
        finally:
            bar.close()
        rows = list(writer.rows)
    return EvalRun(folder, rows, stats["new"], stats["skipped"], stats["prefills"], time.perf_counter() - t_start)


def _score(sample, text: str, reference: str | None, count) -> dict[str, float]:
    """The sample's metric; a reference-based metric with an empty full-cache output (the model said
    nothing) scores 1 for an empty output and 0 otherwise instead of failing."""
    from depthkv.tasks.metrics import score, yap_score

    if reference is not None and not reference.strip():
        same = float(not text.strip())
        return {"rouge1": same, "rouge2": same, "rougeL": same, "yap": float(yap_score(text, 0, count))}
    return {k: float(v) for k, v in score(sample, text, reference, count_tokens=count).items()}


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise EvalError(f"--{what} is empty")
    return items


def parse_ratios(text: str) -> list[float]:
    out = []
    for x in parse_list(text, "ratios"):
        try:
            out.append(float(x))
        except ValueError:
            raise EvalError(f"--ratios must be numbers, got {x!r}") from None
    return out


def parse_task_options(text: str | None) -> dict[str, dict[str, Any]]:
    """``--task-options '{"needle": {"lengths": [512, 1024]}}'`` (JSON object of objects)."""
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvalError(f"--task-options must be a JSON object like '{{\"needle\": {{\"lengths\": [512]}}}}': {exc}") from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise EvalError("--task-options must map task names to objects of options")
    return d
