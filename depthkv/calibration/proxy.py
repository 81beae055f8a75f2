"""Proxy metrics of the DepthKV paper: six representation metrics x four stages x L layers.

For every sample: one forward on the original input (mean-pooled vectors + a token matrix per layer and
stage) and one on a word-dropout perturbation (mean-pooled vectors only). Then, per layer and stage:

====================  ===================================================  ====================
metric                per sample                                           input
====================  ===================================================  ====================
``spectral_entropy``  H of the centred token matrix (nats)                 original tokens
``effective_rank``    exp(H)                                               original tokens
``curvature``         1 - mean kNN-5 cosine of tokens                      original tokens
``dime``              1 - cos(pooled original, pooled perturbed)           both forwards
``lidar``             ||pooled original - pooled perturbed||_2             both forwards
``infonce``           InfoNCE of (original, perturbed) vs other originals  both forwards, batch
====================  ===================================================  ====================

then the mean over samples with a percentile bootstrap CI (default 1,000 resamples, 95 %;
:func:`depthkv.calibration.stats.bootstrap_ci`, NaN-aware). The same bootstrap resamples are used for every
metric, stage and layer (paired).

Choices the paper leaves open, and what this module does:

* Perturbation: each whitespace-separated word is dropped with probability ``dropout`` (0.1); the kept
  words keep their original trailing whitespace. For token-id inputs each token is dropped instead, except
  a leading BOS token (``model.config.bos_token_id``). At least one word/token is always kept. The
  perturbation of sample i depends only on (seed, i).
* InfoNCE: standard reading (positive pair in the denominator plus the other samples' ORIGINAL vectors of
  the same layer and stage as negatives, see :func:`depthkv.calibration.metrics.infonce`), tau = 0.1, the
  batch = all samples given (``infonce_batch=None``); ``infonce_batch=b`` splits the samples, in the order
  given, into ``ceil(N / b)`` near-equal consecutive groups (a group of one has loss 0).
* Token subsampling for entropy and curvature: at most ``max_tokens`` (512) tokens per sample, a seeded
  choice shared by all layers and stages. Entropy/curvature use the original forward only.
* Forwards: ``torch.no_grad()``, eval mode, float32 (a half-precision model is up-cast for the call and
  cast back afterwards -- bf16/fp16 -> fp32 -> bf16/fp16 is lossless), right-padded batches with an
  attention mask, through the decoder body only (no LM head, no KV cache).
* Allocation signal: :func:`infonce_per_layer` defaults to the attention-output stage (b)
  (``DEFAULT_INFONCE_STAGE = "attn_out"``): it is the part of layer l's computation that reads layer l's
  KV cache, so it is the representation that pruning that cache changes first; the residual-stream stages
  are dominated by what earlier layers accumulated. Use :func:`best_proxy` against measured sensitivity to
  pick a stage from data instead.
* Cost: the pooled metrics (DiME, LiDAR, InfoNCE) add little to the two forwards. Spectral entropy needs
  the full spectrum of each (sample, layer, stage) token matrix: one float64 eigendecomposition of an
  m x m Gram matrix, m = min(T, max_tokens, d) -- 4 * L * N of them. Measured with a SmolLM2-135M-shaped
  model (30 layers, d = 576), 32 samples of 512 tokens: ~18 s beyond the forwards on an H200 (~4.5 ms
  per matrix; float32 is slower there and loses the spectrum's tail), ~15-25 ms per matrix on CPU (about
  1-2 min). ``max_tokens=256`` cuts this ~6x; ``token_metrics=False`` skips it (InfoNCE only needs the
  pooled vectors).
* Spearman: rho of each metric's per-layer mean against the per-layer sensitivity (higher = more
  critical). Layers where either is non-finite are left out (e.g. NaN for an unpruned first layer); fewer
  than 3 layers or a constant input give rho = p = NaN. The paper found lower InfoNCE = more critical,
  i.e. a negative rho with degradation.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from depthkv.calibration.metrics import DEFAULT_KNN, DEFAULT_TAU, _infonce_t, token_metrics_batch
from depthkv.calibration.stages import STAGES, capture_stages
from depthkv.calibration.stats import bootstrap_ci, spearman
from depthkv.models.layers import decoder_body

__all__ = [
    "DEFAULT_INFONCE_STAGE",
    "METRICS",
    "ProxyResult",
    "SpearmanRow",
    "best_proxy",
    "compute_proxy_metrics",
    "infonce_per_layer",
    "spearman_table",
    "token_dropout",
    "word_dropout",
]

METRICS: tuple[str, ...] = ("spectral_entropy", "effective_rank", "curvature", "dime", "lidar", "infonce")
DEFAULT_INFONCE_STAGE = "attn_out"
SCHEMA = "depthkv.proxy/1"


# ---------------------------------------------------------------------------------------------------------
# result container
# ---------------------------------------------------------------------------------------------------------

Table = dict[str, dict[str, np.ndarray]]


def _enc(a: np.ndarray) -> Any:
    """ndarray -> nested lists of floats, NaN/inf as None (strict JSON)."""
    a = np.asarray(a, dtype=np.float64)
    obj = a.astype(object)
    obj[~np.isfinite(a)] = None
    return obj.tolist()


def _enc_table(t: Table) -> dict:
    return {m: {s: _enc(v) for s, v in d.items()} for m, d in t.items()}


def _dec_table(t: dict) -> Table:
    out: Table = {}
    for m, d in t.items():
        out[m] = {}
        for s, v in d.items():
            arr = np.array(v, dtype=object)
            arr[arr == None] = np.nan  # noqa: E711 -- elementwise on an object array
            out[m][s] = arr.astype(np.float64)
    return out


@dataclass
class ProxyResult:
    """Per-layer proxy metrics: ``mean[metric][stage]``, ``lo``, ``hi`` are arrays [L] (bootstrap CI);
    ``per_sample[metric][stage]`` is [N, L]. ``config`` records every setting and the token counts."""

    metrics: list[str]
    stages: list[str]
    n_layers: int
    n_samples: int
    mean: Table
    lo: Table
    hi: Table
    per_sample: Table = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def get(self, metric: str, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, lo, hi) arrays [L] of one metric at one stage."""
        return self.mean[metric][stage], self.lo[metric][stage], self.hi[metric][stage]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (non-finite numbers become null)."""
        return {
            "schema": SCHEMA,
            "metrics": list(self.metrics),
            "stages": list(self.stages),
            "n_layers": int(self.n_layers),
            "n_samples": int(self.n_samples),
            "mean": _enc_table(self.mean),
            "lo": _enc_table(self.lo),
            "hi": _enc_table(self.hi),
            "per_sample": _enc_table(self.per_sample),
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProxyResult:
        schema = d.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise ValueError(f"unsupported proxy-result schema {schema!r} (expected {SCHEMA!r})")
        return cls(
            metrics=list(d["metrics"]),
            stages=list(d["stages"]),
            n_layers=int(d["n_layers"]),
            n_samples=int(d["n_samples"]),
            mean=_dec_table(d["mean"]),
            lo=_dec_table(d["lo"]),
            hi=_dec_table(d["hi"]),
            per_sample=_dec_table(d.get("per_sample", {})),
            config=dict(d.get("config", {})),
        )


# ---------------------------------------------------------------------------------------------------------
# perturbations
# ---------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+\s*")


def word_dropout(text: str, p: float, rng: np.random.Generator) -> str:
    """Drop each whitespace-separated word with probability p (keeping at least one word).

    Leading whitespace is kept; a kept word keeps its own trailing whitespace.
    """
    lead = text[: len(text) - len(text.lstrip())]
    words = _WORD.findall(text)
    if not words:
        return text
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return lead + "".join(w for w, k in zip(words, keep, strict=True) if k)


def token_dropout(
    ids: Sequence[int], p: float, rng: np.random.Generator, *, protect_first: bool = False
) -> list[int]:
    """Drop each token with probability p (keeping at least one; the first if ``protect_first``)."""
    ids = list(ids)
    if not ids:
        return ids
    keep = rng.random(len(ids)) >= p
    if protect_first:
        keep[0] = True
    if not keep.any():
        keep[rng.integers(len(ids))] = True
    return [t for t, k in zip(ids, keep, strict=True) if k]


# ---------------------------------------------------------------------------------------------------------
# forwards
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def _eval_float(model: nn.Module, dtype: torch.dtype | None):
    """eval() + no_grad + (optionally) floating tensors cast to ``dtype``; everything restored after."""
    was_training = model.training
    saved: list[tuple[Any, str, torch.dtype, bool]] = []
    if dtype is not None:
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    saved.append((mod, name, p.dtype, True))
                    p.data = p.data.to(dtype)
            for name, b in mod._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != dtype:
                    saved.append((mod, name, b.dtype, False))
                    mod._buffers[name] = b.to(dtype)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for mod, name, dt, is_param in saved:
            if is_param:
                p = mod._parameters[name]
                p.data = p.data.to(dt)
            else:
                mod._buffers[name] = mod._buffers[name].to(dt)
        model.train(was_training)


def _run_batches(body: nn.Module, seqs: list[list[int]], cap, batch_size: int, device, pad_id: int) -> None:
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        t = max(len(seqs[i]) for i in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, : len(seqs[i])] = torch.as_tensor(seqs[i], dtype=torch.long)
            mask[r, : len(seqs[i])] = 1
        cap.set_batch(mask, chunk)
        body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)


def _encode(
    model: nn.Module, tokenizer: Any, texts: Sequence[Any], dropout: float, seed: int, max_length: int | None
) -> tuple[list[list[int]], list[list[int]]]:
    if len(texts) == 0:
        raise ValueError("no samples given")
    is_text = [isinstance(t, str) for t in texts]
    if any(is_text) and not all(is_text):
        raise ValueError("mix of strings and token-id sequences; give one kind")
    orig: list[list[int]] = []
    pert: list[list[int]] = []
    if all(is_text):
        if tokenizer is None:
            raise ValueError("text inputs need a tokenizer (or give token-id lists)")
        for i, text in enumerate(texts):
            rng = np.random.default_rng([seed, i, 2])
            for src, dst in ((text, orig), (word_dropout(text, dropout, rng), pert)):
                ids = list(tokenizer(src)["input_ids"])
                dst.append(ids[:max_length] if max_length else ids)
    else:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
        for i, seq in enumerate(texts):
            ids = [int(t) for t in (seq.tolist() if hasattr(seq, "tolist") else seq)]
            ids = ids[:max_length] if max_length else ids
            rng = np.random.default_rng([seed, i, 2])
            protect = bos is not None and len(ids) > 0 and ids[0] == bos
            orig.append(ids)
            pert.append(token_dropout(ids, dropout, rng, protect_first=protect))
    for i, (o, a) in enumerate(zip(orig, pert, strict=True)):
        if not o or not a:
            raise ValueError(f"sample {i} is empty after tokenisation")
    return orig, pert


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------


def compute_proxy_metrics(
    model: nn.Module,
    tokenizer_or_none: Any,
    texts: Sequence[str] | Sequence[Sequence[int]],
    *,
    dropout: float = 0.1,
    seed: int = 0,
    tau: float = DEFAULT_TAU,
    n_boot: int = 1000,
    max_tokens: int | None = 512,
    ci: float = 0.95,
    knn: int = DEFAULT_KNN,
    infonce_batch: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    token_metrics: bool = True,
) -> ProxyResult:
    """Six metrics x four stages x L layers over ``texts`` (strings, or token-id lists with no tokenizer).

    See the module docstring for every choice. ``max_length`` truncates inputs (tokens); ``batch_size`` is
    the forward batch (results do not depend on it beyond float rounding); ``dtype=None`` runs the model in
    its own dtype. ``token_metrics=False`` skips spectral entropy, effective rank and curvature (left NaN):
    the pooled metrics, InfoNCE included, then cost little beyond the two forwards (see "Cost" above).
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if infonce_batch is not None and infonce_batch < 1:
        raise ValueError(f"infonce_batch must be >= 1 or None, got {infonce_batch}")

    orig, pert = _encode(model, tokenizer_or_none, texts, dropout, seed, max_length)
    n = len(orig)
    body = decoder_body(model)
    n_layers = len(body.layers)
    device = next(model.parameters()).device
    pad_id = 0

    def tok_fn(zs: list[torch.Tensor]) -> torch.Tensor:
        return token_metrics_batch(zs, knn)

    with _eval_float(model, dtype):
        with capture_stages(
            model,
            keep_tokens=False,
            token_fn=tok_fn if token_metrics else None,
            max_tokens=max_tokens,
            seed=seed,
        ) as cap:
            _run_batches(body, orig, cap, batch_size, device, pad_id)
            pooled_o = {s: cap.pooled_array(s, range(n)) for s in STAGES}  # [N, L, d]
            if token_metrics:
                tm = {
                    s: torch.stack(
                        [torch.stack([cap.tokens[s][li][i] for li in range(n_layers)]) for i in range(n)]
                    ).cpu()
                    for s in STAGES
                }  # [N, L, 2]
            else:
                tm = {s: torch.full((n, n_layers, 2), float("nan"), dtype=torch.float64) for s in STAGES}
        with capture_stages(model, keep_tokens=False, max_tokens=max_tokens, seed=seed) as cap:
            _run_batches(body, pert, cap, batch_size, device, pad_id)
            pooled_a = {s: cap.pooled_array(s, range(n)) for s in STAGES}

    if infonce_batch is None:
        groups = [np.arange(n)]
    else:
        groups = np.array_split(np.arange(n), math.ceil(n / infonce_batch))

    per_sample: Table = {m: {} for m in METRICS}
    for s in STAGES:
        o, a = pooled_o[s], pooled_a[s]
        h = tm[s][..., 0]
        per_sample["spectral_entropy"][s] = h.numpy()
        per_sample["effective_rank"][s] = h.exp().numpy()
        per_sample["curvature"][s] = tm[s][..., 1].numpy()
        on = o / o.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        per_sample["dime"][s] = (1.0 - (on * an).sum(-1).clamp(-1.0, 1.0)).numpy()
        per_sample["lidar"][s] = (o - a).norm(dim=-1).numpy()
        nce = np.empty((n, n_layers))
        for g in groups:
            gi = torch.as_tensor(g)
            og, ag = o[gi].transpose(0, 1), a[gi].transpose(0, 1)  # [L, n_g, d]
            nce[g] = _infonce_t(og, ag, float(tau)).T.numpy()
        per_sample["infonce"][s] = nce

    stacked = np.stack([np.stack([per_sample[m][s] for s in STAGES], 1) for m in METRICS], 1)  # [N, M, S, L]
    if n_boot > 0:
        mean, lo, hi = bootstrap_ci(stacked, n_boot=n_boot, level=ci, seed=seed, nan_policy="omit")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            mean = np.nanmean(stacked, axis=0)
        lo = hi = np.full_like(mean, np.nan)

    def tab(arr: np.ndarray) -> Table:
        return {m: {s: arr[mi, si].copy() for si, s in enumerate(STAGES)} for mi, m in enumerate(METRICS)}

    config = {
        "dropout": dropout,
        "seed": seed,
        "tau": tau,
        "n_boot": n_boot,
        "ci": ci,
        "max_tokens": max_tokens,
        "knn": knn,
        "infonce_batch": infonce_batch,
        "batch_size": batch_size,
        "max_length": max_length,
        "token_metrics": token_metrics,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "input_kind": "text" if isinstance(texts[0], str) else "token_ids",
        "n_tokens_original": [len(x) for x in orig],
        "n_tokens_perturbed": [len(x) for x in pert],
    }
    return ProxyResult(
        metrics=list(METRICS),
        stages=list(STAGES),
        n_layers=n_layers,
        n_samples=n,
        mean=tab(mean),
        lo=tab(lo),
        hi=tab(hi),
        per_sample=per_sample,
        config=config,
    )


# ---------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------


class SpearmanRow(NamedTuple):
    metric: str
    stage: str
    rho: float
    p: float


def spearman_table(
    result: ProxyResult,
    sensitivity: np.ndarray,
    *,
    metrics: Sequence[str] | None = None,
    stages: Sequence[str] | None = None,
) -> list[SpearmanRow]:
    """Spearman rho (and two-sided p) of each metric's per-layer mean against ``sensitivity`` [L].

    Non-finite layers are left out pairwise; rho = p = NaN for a constant input or < 3 layers.
    """
    sens = np.asarray(sensitivity, dtype=np.float64).ravel()
    if sens.shape[0] != result.n_layers:
        raise ValueError(f"sensitivity has {sens.shape[0]} entries for {result.n_layers} layers")
    rows = []
    for m in metrics or result.metrics:
        for s in stages or result.stages:
            rho, p = spearman(result.mean[m][s], sens, min_pairs=3)
            rows.append(SpearmanRow(m, s, rho, p))
    return rows


def best_proxy(
    result_or_rows: ProxyResult | Sequence[SpearmanRow], sensitivity: np.ndarray | None = None
) -> SpearmanRow:
    """The (metric, stage) whose per-layer mean has the largest |rho| with ``sensitivity``.

    Give a :class:`ProxyResult` and the sensitivity, or a precomputed :func:`spearman_table`. Ties go to
    the first row in table order. Raises ValueError if no rho is finite.
    """
    if isinstance(result_or_rows, ProxyResult):
        if sensitivity is None:
            raise ValueError("sensitivity is required with a ProxyResult")
        rows = spearman_table(result_or_rows, sensitivity)
    else:
        rows = list(result_or_rows)
    finite = [r for r in rows if math.isfinite(r.rho)]
    if not finite:
        raise ValueError("no finite Spearman rho (constant sensitivity or metrics?)")
    return max(finite, key=lambda r: abs(r.rho))


def infonce_per_layer(result: ProxyResult, stage: str = DEFAULT_INFONCE_STAGE) -> np.ndarray:
    """Mean InfoNCE per layer [L] at ``stage`` -- the signal of the paper's MGA allocator.

    Lower = more critical layer (paper); see the module docstring for the default stage.
    """
    if stage not in result.mean.get("infonce", {}):
        raise ValueError(f"no InfoNCE for stage {stage!r}; stages: {list(result.mean.get('infonce', {}))}")
    return np.array(result.mean["infonce"][stage], dtype=np.float64)
