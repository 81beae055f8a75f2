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
from depthkv.calibration.ablation import CalibrationItem, measure_sensitivity
from depthkv.calibration.profile import KIND, SCHEMA_VERSION, Profile
from depthkv.calibration.stats import bootstrap_ci, permutation_test
from depthkv.engine.session import Protection
from depthkv.scorers import get_scorer

DEFAULT_PROBES = (0.5, 0.8, 0.95, 1.0)


@dataclass
class CalibrationConfig:
    """What to calibrate on and how; defaults documented in docs/calibration.md."""

    scorer: str = "snapkv"
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


def _answer_ids(tokenizer, answer: str, limit: int) -> torch.Tensor:
    ids = tokenizer(" " + answer.strip() if answer.strip() else answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = list(ids)[:limit] + ([eos] if eos is not None else [])
    return torch.tensor([ids], dtype=torch.long)


def load_items(tokenizer, cfg: CalibrationConfig) -> tuple[list[CalibrationItem], dict]:
    """Calibration items (split="calib", disjoint from every evaluation sample) and their description."""
    from depthkv.tasks import calibration_mix, generate
    from depthkv.tasks.jsonl import load_jsonl
    from depthkv.tasks.prompt import build_prompt, token_counter

    count = token_counter(tokenizer)
    if cfg.data == "mix":
        samples = calibration_mix(cfg.samples, cfg.seed, cfg.context_tokens, count)
    elif Path(cfg.data).suffix == ".jsonl":
        samples = load_jsonl(cfg.data)[: cfg.samples]
    else:
        samples = generate(cfg.data, cfg.samples, cfg.seed, context_tokens=cfg.context_tokens, count_tokens=count,
                           split="calib")
    samples = [s for s in samples if s.answer.strip()]
    if not samples:
        raise ValueError(f"calibration data {cfg.data!r} gave no samples with an answer to teacher-force")
    items, digest = [], hashlib.sha256()
    for s in samples:
        ctx, question = build_prompt(tokenizer, s, question_in_prefill=True)
        prompt = torch.tensor([list(ctx) + list(question)], dtype=torch.long)
        answer = _answer_ids(tokenizer, s.answer, cfg.max_answer_tokens)
        digest.update(prompt.numpy().tobytes())
        digest.update(answer.numpy().tobytes())
        items.append(CalibrationItem(prompt, answer, s.id))
    desc = {
        "description": f"{cfg.data} ({'mixed families' if cfg.data == 'mix' else 'single source'}), split calib, "
                       f"~{cfg.context_tokens} context tokens, seed {cfg.seed}",
        "sha256": digest.hexdigest(), "n_samples": len(items),
        "tasks": sorted({s.task for s in samples}), "sample_ids": [s.id for s in samples],
        "prompt_tokens": [int(i.prompt_ids.shape[1]) for i in items],
    }
    return items, desc


def _curves(values: np.ndarray, n_boot: int, seed: int) -> dict:
    _, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed, axis=0)
    return {"mean": values.mean(axis=0).tolist(), "lo": np.asarray(lo).tolist(), "hi": np.asarray(hi).tolist()}


def calibrate(lm, cfg: CalibrationConfig, *, progress: bool = True) -> Profile:
    """Run the whole calibration for a loaded model (``depthkv.models.LoadedModel``) and return its Profile."""
    from depthkv.models.identity import model_identity

    t_start = time.perf_counter()
    model, tok = lm.model, lm.tokenizer
    scorer = get_scorer(cfg.scorer, **cfg.scorer_options)
    protection = Protection(cfg.n_sink, cfg.n_recent)
    torch.manual_seed(cfg.seed)
    items, data_desc = load_items(tok, cfg)
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
    return Profile(data)


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
