"""``depthkv calibrate``: calibration data -> single-layer ablations + statistics + proxy metrics -> Profile."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import depthkv
from depthkv.allocation.profile import KIND, SCHEMA_VERSION, Profile
from depthkv.calibration.ablation import CalibrationItem, measure_sensitivity
from depthkv.calibration.stats import bootstrap_ci, permutation_test
from depthkv.engine.press import bind_scorer
from depthkv.engine.session import Protection
from depthkv.scorers import get_scorer

DEFAULT_PROBES = (0.5, 0.8, 0.95, 1.0)


class CalibrationDataError(ValueError):
    """Calibration data that cannot make the samples asked for (contexts too short for a task's facts, no
    answers to teacher-force): one line, before any model work on them."""


@dataclass
class CalibrationConfig:
    """What to calibrate on and how; defaults documented in docs/calibration.md."""

    scorer: str = "snapkv"
    setting: str = "aware"  # aware: question inside the pruned prefill; agnostic: context pruned before it
    probe_ratios: Sequence[float] = DEFAULT_PROBES
    samples: int = 32
    context_tokens: int = 1024
    data: str = "mix"  # "mix" (default families), a task name, or a JSONL path
    seed: int = 0
    n_sink: int = 4
    n_recent: int = 16
    n_perm: int = 10_000
    n_boot: int = 1_000
    proxy: bool = True
    proxy_tau: float = 0.1
    max_answer_tokens: int = 32
    probe_batch: int = 8  # probes per batched forward (speed only; results equal up to float rounding)
    scorer_options: dict = field(default_factory=dict)
    refine_ratios: Sequence[float] = ()  # after the profile: refine the optimal budgets jointly at these ratios
    refine_rounds: int = 4
    floor_shares: Sequence[float] = ()  # after refining: adaptive's floor share tried at refine_ratios (floors.py)


def _answer_ids(tokenizer, answer: str, limit: int, device=None) -> torch.Tensor:
    ids = tokenizer(" " + answer.strip() if answer.strip() else answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = list(ids)[:limit] + ([eos] if eos is not None else [])
    return torch.tensor([ids], dtype=torch.long, device=device)


def load_items(tokenizer, cfg: CalibrationConfig, device=None) -> tuple[list[CalibrationItem], dict]:
    """Calibration items (split="calib", disjoint from every evaluation sample) and their description.

    The items' token tensors are on ``device`` (the model's); the data hash is the same on every device.

    ``cfg.setting`` decides the split of each prompt: "aware" items prefill context + question, "agnostic"
    items only the context part (``build_prompt(..., question_in_prefill=False)``), the question follows.
    """
    from depthkv.tasks import calibration_mix, generate
    from depthkv.tasks.jsonl import load_jsonl
    from depthkv.tasks.prompt import build_prompt, token_counter

    count = token_counter(tokenizer)
    try:
        if cfg.data == "mix":
            samples = calibration_mix(cfg.samples, cfg.seed, cfg.context_tokens, count)
        elif Path(cfg.data).suffix == ".jsonl":
            samples = load_jsonl(cfg.data)[: cfg.samples]
        else:
            samples = generate(cfg.data, cfg.samples, cfg.seed, context_tokens=cfg.context_tokens,
                               count_tokens=count, split="calib")
    except ValueError as exc:  # e.g. a context too short for the facts a task inserts
        raise CalibrationDataError(str(exc)) from None
    samples = [s for s in samples if s.answer.strip()]
    if not samples:
        raise CalibrationDataError(f"calibration data {cfg.data!r} gave no samples with an answer to teacher-force")
    aware = _check_setting(cfg.setting) == "aware"
    items, digest = [], hashlib.sha256()
    for s in samples:
        ctx, question = build_prompt(tokenizer, s, question_in_prefill=aware)
        answer = _answer_ids(tokenizer, s.answer, cfg.max_answer_tokens)
        if aware:
            prompt, q_ids = torch.tensor([list(ctx) + list(question)], dtype=torch.long), None
        else:
            prompt = torch.tensor([list(ctx)], dtype=torch.long)
            q_ids = torch.tensor([list(question)], dtype=torch.long)
            digest.update(b"agnostic")
        for part in (prompt, q_ids, answer):
            if part is not None:
                digest.update(part.numpy().tobytes())
        items.append(CalibrationItem(prompt.to(device), answer.to(device), s.id,
                                     None if q_ids is None else q_ids.to(device)))
    desc = {
        "description": f"{cfg.data} ({'mixed families' if cfg.data == 'mix' else 'single source'}), split calib, "
                       f"~{cfg.context_tokens} context tokens, seed {cfg.seed}",
        "sha256": digest.hexdigest(), "n_samples": len(items),
        "tasks": sorted({s.task for s in samples}), "sample_ids": [s.id for s in samples],
        "prompt_tokens": [int(i.prompt_ids.shape[1]) + (0 if i.question_ids is None else i.question_ids.shape[1])
                          for i in items],
    }
    return items, desc


def _check_setting(setting: str) -> str:
    from depthkv.allocation.profile import SETTINGS

    if setting not in SETTINGS:
        raise ValueError(f"unknown calibration setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    return setting


def _curves(values: np.ndarray, n_boot: int, seed: int) -> dict:
    _, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed, axis=0)
    return {"mean": values.mean(axis=0).tolist(), "lo": np.asarray(lo).tolist(), "hi": np.asarray(hi).tolist()}


def calibrate(lm, cfg: CalibrationConfig, *, progress: bool = True) -> Profile:
    """Run the whole calibration for a loaded model (``depthkv.models.LoadedModel``) and return its Profile."""
    from depthkv.models.identity import model_identity

    t_start = time.perf_counter()
    model, tok = lm.model, lm.tokenizer
    _check_setting(cfg.setting)
    # question-independent scorers work too; KVzip needs the tokenizer for its repeat prompt
    scorer = bind_scorer(get_scorer(cfg.scorer, **cfg.scorer_options), model, tok)
    protection = Protection(cfg.n_sink, cfg.n_recent)
    torch.manual_seed(cfg.seed)
    items, data_desc = load_items(tok, cfg, next(model.parameters()).device)
    if cfg.floor_shares and not cfg.refine_ratios:
        raise ValueError("floor shares are tuned at the refined ratios: give refine_ratios too")
    if cfg.floor_shares:  # a bad grid fails now, not after the ablation
        from depthkv.calibration.floors import check_grid

        check_grid(cfg.floor_shares)
    if cfg.refine_ratios:  # an infeasible ratio fails now, not after the ablation
        from depthkv.calibration.refine import check_ratios
        from depthkv.models.layers import decoder_layers

        check_ratios(len(decoder_layers(model)), [i.context_len for i in items],
                     cfg.refine_ratios, max(1, protection.size))
    bar = tqdm(total=1, desc="calibrate (layer x ratio probes)", unit="probe", disable=not progress, mininterval=2.0)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    res = measure_sensitivity(model, items, scorer, cfg.probe_ratios, protection, progress=tick,
                              batch=cfg.probe_batch)
    bar.close()
    perm: dict = {}
    for metric, arr in (("kl", res.kl), ("nll", res.nll_delta)):
        perm[metric] = {}
        for r_idx, ratio in enumerate(res.probe_ratios):
            pr = permutation_test(arr[:, :, r_idx], n_perm=cfg.n_perm, seed=cfg.seed)
            perm[metric][str(ratio)] = {k: v.item() if isinstance(v, np.generic) else v
                                        for k, v in asdict(pr).items()}
    proxy = spearman = best = infonce = None
    t_proxy = time.perf_counter()
    if cfg.proxy:
        from depthkv.calibration.proxy import (
            best_proxy,
            compute_proxy_metrics,
            infonce_per_layer,
            spearman_table,
        )

        texts = [i.prompt_ids[0].tolist() for i in items]
        pres = compute_proxy_metrics(model, None, texts, seed=cfg.seed, tau=cfg.proxy_tau, n_boot=cfg.n_boot)
        sens = res.kl.mean(axis=(0, 2))
        proxy = pres.to_dict()
        spearman = [dict(r) if isinstance(r, dict) else r for r in _rows(spearman_table(pres, sens))]
        best = _rows([best_proxy(pres, sens)])[0]
        infonce = np.asarray(infonce_per_layer(pres)).tolist()
    t_end = time.perf_counter()
    data = {
        "schema_version": SCHEMA_VERSION, "kind": KIND,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": depthkv.__version__, "seed": cfg.seed,
        "model": model_identity(model, lm.name),
        "scorer": {"name": scorer.name, "repr": repr(scorer), "options": cfg.scorer_options},
        "setting": cfg.setting,
        "protection": {"n_sink": cfg.n_sink, "n_recent": cfg.n_recent},
        "probe_ratios": list(res.probe_ratios),
        "curves": {"kl": _curves(res.kl, cfg.n_boot, cfg.seed), "nll": _curves(res.nll_delta, cfg.n_boot, cfg.seed)},
        "samples": {"kl": res.kl.tolist(), "nll": res.nll_delta.tolist()},
        "full_nll": res.full_nll.tolist(), "context_lens": res.context_lens,
        "permutation": perm, "proxy": proxy, "spearman": spearman, "best_proxy": best,
        "infonce_per_layer": infonce,
        "data": data_desc,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "timings": {"ablation_s": round(res.seconds, 2), "proxy_s": round(t_end - t_proxy, 2),
                    "total_s": round(t_end - t_start, 2)},
    }
    profile = Profile(data)
    if cfg.refine_ratios:
        from depthkv.calibration.refine import RefineConfig, prepare_samples, refine_profile

        samples = prepare_samples(model, items, scorer, protection)  # shared by refinement and floor tuning
        refine_profile(profile, model, items, cfg.refine_ratios,
                       RefineConfig(rounds=cfg.refine_rounds, batch=cfg.probe_batch),
                       data={"sha256": data_desc["sha256"], "sample_ids": data_desc["sample_ids"]},
                       progress=progress, samples=samples)
        if cfg.floor_shares:
            from depthkv.calibration.floors import tune_profile

            tune_profile(profile, model, samples, cfg.refine_ratios, cfg.floor_shares, "adaptive",
                         batch=cfg.probe_batch, progress=progress)
    return profile


def _rows(rows) -> list[dict]:
    """Spearman rows as plain dicts (dataclasses, namedtuples or dicts accepted)."""
    out = []
    for r in rows:
        if isinstance(r, dict):
            d = dict(r)
        elif hasattr(r, "_asdict"):
            d = r._asdict()
        elif hasattr(r, "__dataclass_fields__"):
            d = asdict(r)
        else:
            d = {"value": r}
        out.append({k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()})
    return out
