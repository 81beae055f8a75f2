"""Statistics for the sensitivity study: permutation test, bootstrap CIs, rank correlation.

- ``permutation_test``: the paper's test of "all layers matter equally" (statistic = variance across
  layers of the per-layer mean; layer labels permuted within each sample; p = (b + 1) / (N_perm + 1)).
- ``bootstrap_ci`` / ``paired_diff_ci``: percentile bootstrap over samples (the paper uses 1,000 resamples).
- ``spearman`` / ``pearson``: scipy wrappers that return (nan, nan) instead of warning on constant input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

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
    stat: Callable[..., np.ndarray] = np.mean,
    axis: int = 0,
) -> CI:
    """Percentile bootstrap CI of ``stat`` over samples along ``axis``.

    ``x`` of shape [S] gives scalars; [S, L] with ``axis=0`` gives per-layer arrays. ``stat`` must accept
    ``axis=`` (numpy reductions do). Resamples the S samples with replacement ``n_boot`` times; the
    interval is the (1 - level)/2 and (1 + level)/2 quantiles of the resampled statistic.
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
    n_boot = int(n_boot)
    _check_finite(x, "x")
    estimate = np.asarray(stat(x, axis=axis))
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x.size))
    parts = []
    done = 0
    while done < n_boot:
        m = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(m, n))
        resampled = np.take(x, idx, axis=axis)  # axis replaced by (m, n)
        parts.append(np.moveaxis(np.asarray(stat(resampled, axis=axis + 1)), axis, 0))
        done += m
    boot = np.concatenate(parts, axis=0)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha], axis=0)
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


def _paired_finite(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y need the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _degenerate(x: np.ndarray, y: np.ndarray) -> bool:
    return x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0


def spearman(x, y) -> tuple[float, float]:
    """Spearman rank correlation and two-sided p-value; pairs with NaN are dropped.

    Returns (nan, nan) without a warning when fewer than 2 pairs remain or either input is constant.
    """
    x, y = _paired_finite(x, y)
    if _degenerate(x, y):
        return math.nan, math.nan
    res = _st.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def pearson(x, y) -> tuple[float, float]:
    """Pearson correlation and two-sided p-value, NaN-safe like ``spearman`` (paper: YapScore vs ROUGE)."""
    x, y = _paired_finite(x, y)
    if _degenerate(x, y):
        return math.nan, math.nan
    if x.size < 3:  # scipy needs 2 points but the p-value is meaningless; keep the sign
        return float(np.sign((x[1] - x[0]) * (y[1] - y[0]))), math.nan
    res = _st.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)
