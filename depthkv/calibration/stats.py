"""Statistics for the sensitivity study: permutation test, bootstrap CIs, rank correlation.

- ``permutation_test``: the paper's test of "all layers matter equally" (statistic = variance across
  layers of the per-layer mean; layer labels permuted within each sample; p = (b + 1) / (N_perm + 1)).
- ``bootstrap_ci`` / ``paired_diff_ci``: percentile bootstrap over samples (``scipy.stats.bootstrap``; the
  paper uses 1,000 resamples), optionally NaN-aware.
- ``stratified_bootstrap_ci``: the same bootstrap with each group (e.g. each task of a suite) resampled on
  its own, for statistics over several groups such as a suite-mean retention.
- ``spearman``: a scipy wrapper that returns (nan, nan) instead of warning on constant input.

The one home of these statistics: calibration (curves, proxy metrics) and evaluation (summaries, reports,
transfer matrices) all call them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from scipy import stats as _st

_CHUNK_ELEMENTS = 1 << 18  # values per vectorised chunk (2 MB of float64: stays in cache, measured fastest)


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of ``permutation_test``.

    ``statistic``: observed variance across layers of the per-layer mean; ``p_value`` = (b + 1) / (n_perm + 1)
    with ``n_extreme`` = b = number of permutations whose statistic >= the observed one; ``effect_size`` =
    (statistic - null_mean) / null_std (0 when the null has no spread and equals the statistic, +-inf when
    it has no spread but differs).
    """

    statistic: float
    p_value: float
    effect_size: float
    n_perm: int
    null_mean: float
    null_std: float
    n_extreme: int = 0


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; drop or impute those samples first")


def _layer_mean_variance(v: np.ndarray) -> np.ndarray:
    """Variance over the last axis of the mean over the second-to-last axis."""
    return np.var(v.mean(axis=-2), axis=-1)


def permutation_test(values: np.ndarray, n_perm: int = 10_000, seed: int | None = 0) -> PermutationResult:
    """Permutation test of "every layer has the same mean effect" on ``values[sample, layer]``.

    Statistic: variance across layers of the per-layer mean over samples. Null: within each sample the
    layer labels are exchangeable, so each row is permuted independently; ``n_perm`` such datasets give
    the null distribution. ``b`` counts null statistics >= the observed one (with a 1e-12 relative
    tolerance so that float noise in exact ties does not count against the null), p = (b + 1) / (n_perm + 1).
    Vectorised with numpy (rows shuffled by ``Generator.permuted`` in chunks).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be a [samples, layers] array, got shape {v.shape}")
    n_samples, n_layers = v.shape
    if n_samples < 1 or n_layers < 2:
        raise ValueError(f"need at least 1 sample and 2 layers, got shape {v.shape}")
    if int(n_perm) < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    n_perm = int(n_perm)
    _check_finite(v, "values")
    observed = float(_layer_mean_variance(v))
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // v.size)
    null = np.empty(n_perm)
    done = 0
    while done < n_perm:
        m = min(chunk, n_perm - done)
        tiled = np.broadcast_to(v, (m, n_samples, n_layers))
        null[done : done + m] = _layer_mean_variance(rng.permuted(tiled, axis=2))
        done += m
    tol = 1e-12 * max(abs(observed), np.finfo(float).tiny)
    b = int(np.count_nonzero(null >= observed - tol))
    null_mean = float(null.mean())
    null_std = float(null.std(ddof=1)) if n_perm > 1 else 0.0
    if null_std > 0:
        effect = (observed - null_mean) / null_std
    elif math.isclose(observed, null_mean, rel_tol=1e-12, abs_tol=1e-300):
        effect = 0.0
    else:
        effect = math.copysign(math.inf, observed - null_mean)
    return PermutationResult(observed, (b + 1) / (n_perm + 1), float(effect), n_perm, null_mean, null_std, b)


class CI(NamedTuple):
    """A point estimate with a percentile-bootstrap interval (arrays for per-layer CIs)."""

    estimate: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray


def _scalar_or_array(a: np.ndarray) -> float | np.ndarray:
    a = np.asarray(a)
    return float(a) if a.ndim == 0 else a


def bootstrap_ci(
    x: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | None = 0,
    stat: Callable[..., np.ndarray] | None = None,
    axis: int = 0,
    *,
    nan_policy: Literal["raise", "omit"] = "raise",
) -> CI:
    """Percentile bootstrap CI of ``stat`` (default: the mean) over the samples along ``axis``.

    ``x`` of shape [S] gives scalars; [S, L] with ``axis=0`` gives per-layer arrays. The S samples are
    resampled with replacement ``n_boot`` times by ``scipy.stats.bootstrap`` (``method="percentile"``);
    every trailing entry sees the same resamples, so per-layer CIs are paired and each equals that
    layer's own bootstrap. ``stat`` must accept ``axis=`` (numpy reductions do). One sample gives the
    point itself as its interval (every resample is that sample).

    ``nan_policy="omit"``: a non-finite value is left out of the statistic it would enter (``stat``
    defaults to ``np.nanmean``), resamples whose statistic is NaN are left out of the quantiles, and an
    all-NaN entry gives NaN. ``"raise"`` (default): non-finite input is an error.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("bootstrap_ci needs an array of samples, got a scalar")
    axis = axis % x.ndim
    n = x.shape[axis]
    if n < 1:
        raise ValueError("bootstrap_ci needs at least one sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if nan_policy == "raise":
        _check_finite(x, "x")
        stat = np.mean if stat is None else stat
    elif nan_policy == "omit":
        x = np.where(np.isfinite(x), x, np.nan)
        stat = np.nanmean if stat is None else stat
    else:
        raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # omit: all-NaN entries (mean of an empty slice)
        estimate = np.asarray(stat(x, axis=axis))
        if n == 1:
            return CI(_scalar_or_array(estimate), _scalar_or_array(estimate), _scalar_or_array(estimate))
        res = _st.bootstrap(
            (x,), stat, n_resamples=int(n_boot), batch=max(1, _CHUNK_ELEMENTS // x.size), vectorized=True,
            axis=axis, confidence_level=level, method="percentile", rng=np.random.default_rng(seed),
        )
        if nan_policy == "omit":
            alpha = (1.0 - level) / 2.0
            low, high = np.nanquantile(res.bootstrap_distribution, [alpha, 1.0 - alpha], axis=-1)
        else:
            low, high = res.confidence_interval
    return CI(_scalar_or_array(estimate), _scalar_or_array(low), _scalar_or_array(high))


def paired_diff_ci(
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | None = 0,
    axis: int = 0,
) -> CI:
    """Mean of ``a - b`` over paired samples with a percentile-bootstrap CI (e.g. DepthKV minus uniform).

    Samples are resampled as pairs (the same indices for ``a`` and ``b``), which keeps the pairing.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, n_boot=n_boot, level=level, seed=seed, stat=np.mean, axis=axis)


def stratified_bootstrap_ci(
    groups: Sequence[np.ndarray],
    stat: Callable[..., np.ndarray],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | None = 0,
) -> CI:
    """Percentile bootstrap CI of ``stat(*groups, axis=-1)``, each group resampled independently (stratified).

    A group's samples lie along its last axis; leading axes travel with their sample, so a group of shape
    [2, n] (a method's and the full cache's score on n sample ids) stays paired. Every resample draws each
    group's n samples with replacement from that group alone (``scipy.stats.bootstrap``, ``paired=False``),
    so each group keeps its size: a suite mean over tasks resamples the samples within each task. ``stat``
    must reduce over ``axis=-1`` and accept extra batch axes before it. A group of one sample is the same in
    every resample. Resamples whose statistic is not finite (a ratio whose denominator resampled to 0) are
    left out of the quantiles; the bounds are NaN when every one is.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays:
        raise ValueError("stratified_bootstrap_ci needs at least one group")
    for i, a in enumerate(arrays):
        if a.ndim == 0 or a.shape[-1] < 1:
            raise ValueError(f"group {i} has no samples along its last axis (shape {a.shape})")
        _check_finite(a, f"group {i}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    varying = [i for i, a in enumerate(arrays) if a.shape[-1] > 1]
    fixed = [np.expand_dims(a, -2) for a in arrays]  # a batch axis of 1 for groups that never change

    def resampled_stat(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        parts = list(fixed)
        for i, s in zip(varying, samples):
            parts[i] = s
        return stat(*parts, axis=axis)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 resamples, scipy's degenerate-data warning
        estimate = np.asarray(stat(*arrays, axis=-1))
        if not varying:
            return CI(_scalar_or_array(estimate), _scalar_or_array(estimate), _scalar_or_array(estimate))
        size = sum(arrays[i].size for i in varying)
        res = _st.bootstrap(
            tuple(arrays[i] for i in varying), resampled_stat, n_resamples=int(n_boot), vectorized=True,
            paired=False, axis=-1, batch=max(1, _CHUNK_ELEMENTS // size), confidence_level=level,
            method="percentile", rng=np.random.default_rng(seed),
        )
        dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
        dist = np.where(np.isfinite(dist), dist, np.nan)
        alpha = (1.0 - level) / 2.0
        low, high = np.nanquantile(dist, [alpha, 1.0 - alpha], axis=-1)
    return CI(_scalar_or_array(estimate), _scalar_or_array(low), _scalar_or_array(high))


def _paired_finite(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y need the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _degenerate(x: np.ndarray, y: np.ndarray, min_pairs: int = 2) -> bool:
    return x.size < max(2, min_pairs) or np.ptp(x) == 0 or np.ptp(y) == 0


def spearman(x, y, *, min_pairs: int = 2) -> tuple[float, float]:
    """Spearman rank correlation and two-sided p-value; pairs with NaN or inf are dropped.

    Returns (nan, nan) without a warning when fewer than ``min_pairs`` (at least 2) pairs remain or
    either input is constant.
    """
    x, y = _paired_finite(x, y)
    if _degenerate(x, y, min_pairs):
        return math.nan, math.nan
    res = _st.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)
