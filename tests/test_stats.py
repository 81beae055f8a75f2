"""Permutation test, bootstrap CIs and correlation wrappers of depthkv.calibration.stats."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from depthkv.calibration.stats import (
    CI,
    PermutationResult,
    bootstrap_ci,
    paired_diff_ci,
    permutation_test,
    spearman,
    stratified_bootstrap_ci,
)

# ---------------------------------------------------------------- permutation test


def test_exchangeable_data_gives_large_p():
    rng = np.random.default_rng(1)  # under the null p is uniform: any one seed is a draw (seed 0 gives 0.008)
    res = permutation_test(rng.normal(size=(32, 30)))
    assert isinstance(res, PermutationResult)
    assert res.p_value > 0.2
    assert abs(res.effect_size) < 2


def test_null_calibration():
    """Over many exchangeable datasets p is about uniform: ~5 % below 0.05, mean ~0.5."""
    ps = np.array(
        [
            permutation_test(np.random.default_rng(s).normal(size=(16, 10)), n_perm=200, seed=s).p_value
            for s in range(200)
        ]
    )
    assert np.mean(ps < 0.05) < 0.1
    assert 0.4 < ps.mean() < 0.6


def test_equal_layer_means_gives_p_one():
    """A Latin square: every layer sees every value once, so the layer means are equal (variance 0)."""
    base = np.arange(8.0)
    v = np.stack([np.roll(base, s) for s in range(8)])
    res = permutation_test(v, n_perm=2000)
    assert res.statistic == pytest.approx(0.0, abs=1e-12)
    assert res.n_extreme == 2000 and res.p_value == 1.0


def test_planted_layer_effect_gives_small_p():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(32, 30)) + np.linspace(0.0, 1.0, 30)
    res = permutation_test(v)
    assert res.p_value < 0.01
    assert res.p_value == pytest.approx(1 / 10_001)  # no permutation reaches it: the smallest p possible
    assert res.effect_size > 5


def test_p_formula_on_a_tiny_case():
    """Rows [0, 1], [0, 1]: a permutation keeps the variance (0.25) iff both rows flip alike (prob 1/2)."""
    v = np.array([[0.0, 1.0], [0.0, 1.0]])
    res = permutation_test(v, n_perm=999, seed=3)
    assert res.statistic == 0.25
    assert res.p_value == (res.n_extreme + 1) / (999 + 1)
    assert 0.4 < res.n_extreme / 999 < 0.6
    assert res.null_mean == pytest.approx(0.125, abs=0.02)
    # one sample: every permutation has the same statistic, so b = n_perm and p = 1
    one = permutation_test(np.array([[0.0, 1.0, 5.0]]), n_perm=50)
    assert one.n_extreme == 50 and one.p_value == 1.0 and one.effect_size == 0.0


def test_permutation_reproducible_and_seeded():
    v = np.random.default_rng(2).normal(size=(10, 6))
    assert permutation_test(v, 500, seed=7) == permutation_test(v, 500, seed=7)
    assert permutation_test(v, 500, seed=7).null_mean != permutation_test(v, 500, seed=8).null_mean


def test_permutation_is_fast():
    v = np.random.default_rng(0).normal(size=(32, 30))
    t = time.perf_counter()
    permutation_test(v, n_perm=10_000)
    assert time.perf_counter() - t < 2.0


def test_permutation_input_errors():
    with pytest.raises(ValueError, match=r"\[samples, layers\]"):
        permutation_test(np.zeros(5))
    with pytest.raises(ValueError, match="2 layers"):
        permutation_test(np.zeros((5, 1)))
    with pytest.raises(ValueError, match="NaN"):
        permutation_test(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="n_perm"):
        permutation_test(np.zeros((2, 2)), n_perm=0)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 1.0, size=2000)
    small = bootstrap_ci(x[:50])
    large = bootstrap_ci(x)
    assert isinstance(large, CI)
    for ci, data in ((small, x[:50]), (large, x)):
        assert ci.low < ci.estimate < ci.high
        assert ci.estimate == pytest.approx(data.mean())
        assert ci.low < 5.0 < ci.high
    assert (large.high - large.low) < (small.high - small.low) / 3  # ~ sqrt(40) = 6.3x narrower
    # a 95 % interval of the mean is about +- 1.96 / sqrt(n)
    assert large.high - large.low == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)


def test_bootstrap_level_and_stat():
    x = np.random.default_rng(1).normal(size=300)
    wide, narrow = bootstrap_ci(x, level=0.99), bootstrap_ci(x, level=0.5)
    assert wide.low < narrow.low < narrow.high < wide.high
    med = bootstrap_ci(x, stat=np.median)
    assert med.estimate == pytest.approx(np.median(x)) and med.low < med.estimate < med.high
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, level=1.0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(np.array([1.0, np.nan]))


def test_bootstrap_per_layer():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(40, 6)) + np.arange(6.0)
    ci = bootstrap_ci(v, axis=0)
    assert ci.estimate.shape == ci.low.shape == ci.high.shape == (6,)
    assert np.all(ci.low < ci.estimate) and np.all(ci.estimate < ci.high)
    assert np.allclose(ci.estimate, v.mean(axis=0))
    # the same along axis 1 of the transposed array
    t = bootstrap_ci(v.T, axis=1)
    assert np.allclose(t.low, ci.low) and np.allclose(t.high, ci.high)
    # each layer's CI is that layer's own bootstrap (same resampled sample indices)
    one = bootstrap_ci(v[:, 3])
    assert one.low == pytest.approx(ci.low[3]) and one.high == pytest.approx(ci.high[3])


def test_bootstrap_degenerate():
    ci = bootstrap_ci(np.full(10, 2.5))
    assert ci == (2.5, 2.5, 2.5)
    single = bootstrap_ci(np.array([4.0]))
    assert single.low == single.high == 4.0


def test_bootstrap_nan_omit():
    """NaN-aware mode (proxy metrics): a NaN sample leaves only the means it would enter; paired columns."""
    v = np.random.default_rng(9).normal(loc=2.0, size=(200, 3))
    ci = bootstrap_ci(v, seed=0, nan_policy="omit")
    np.testing.assert_allclose(ci.estimate, v.mean(0))
    assert np.all(ci.low < ci.estimate) and np.all(ci.estimate < ci.high) and np.all(ci.high - ci.low < 0.5)
    np.testing.assert_array_equal(bootstrap_ci(v, seed=0, nan_policy="omit").low, ci.low)  # seeded
    np.testing.assert_allclose(ci.low, bootstrap_ci(v, seed=0).low)  # no NaN: the same as the strict mode
    v[0, 0] = np.nan
    v[:, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ci = bootstrap_ci(v, n_boot=200, nan_policy="omit")
    assert ci.estimate[0] == pytest.approx(np.nanmean(v[:, 0])) and np.isfinite(ci.low[:2]).all()
    assert np.isnan([ci.estimate[2], ci.low[2], ci.high[2]]).all()  # an all-NaN column stays NaN
    with pytest.raises(ValueError, match="nan_policy"):
        bootstrap_ci(v, nan_policy="propagate")


# ---------------------------------------------------------------- paired difference


def test_paired_diff_constant_difference():
    b = np.random.default_rng(3).normal(size=50)
    ci = paired_diff_ci(b + 0.3, b)
    assert ci.estimate == pytest.approx(0.3)
    assert ci.low == pytest.approx(0.3, abs=1e-12) and ci.high == pytest.approx(0.3, abs=1e-12)


def test_paired_diff_keeps_pairing():
    """Large shared noise cancels in a paired comparison: the CI is tight around the true shift."""
    rng = np.random.default_rng(4)
    base = rng.normal(0.0, 10.0, size=200)
    a = base + 1.0 + rng.normal(0.0, 0.1, size=200)
    ci = paired_diff_ci(a, base)
    assert ci.low < 1.0 < ci.high and ci.high - ci.low < 0.1
    with pytest.raises(ValueError, match="equal shapes"):
        paired_diff_ci(a, base[:10])


def test_paired_diff_per_layer():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(30, 4))
    ci = paired_diff_ci(a + np.array([0.0, 1.0, 2.0, 3.0]), a)
    assert np.allclose(ci.estimate, [0, 1, 2, 3]) and np.allclose(ci.low, [0, 1, 2, 3])


# ---------------------------------------------------------------- correlation


def test_spearman_basics():
    rho, p = spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 100])
    assert rho == pytest.approx(1.0) and p < 0.05
    rho, _ = spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0)


def test_spearman_constant_and_nan_are_safe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho, p = spearman([1, 1, 1, 1], [1, 2, 3, 4])
        assert np.isnan(rho) and np.isnan(p)
        rho, p = spearman([1, 2, np.nan, 4, 5], [1, 2, 100, 4, 5])
        assert rho == pytest.approx(1.0)
        rho, p = spearman([np.nan, 1.0], [1.0, 2.0])
        assert np.isnan(rho) and np.isnan(p)
        assert spearman([1, 2], [3, 5])[0] == pytest.approx(1.0)
        assert np.isnan(spearman([1, 2, np.inf], [3, 5, 6], min_pairs=3)).all()  # inf dropped: 2 pairs < 3
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1, 2, 3])


# ---------------------------------------------------------------- stratified bootstrap


def _mean_of_means(*groups, axis=-1):
    return sum(g.mean(axis=axis) for g in groups) / len(groups)


def test_stratified_one_group_is_the_plain_bootstrap():
    x = np.random.default_rng(3).normal(size=30)
    a = stratified_bootstrap_ci([x], _mean_of_means, n_boot=500, seed=1)
    b = bootstrap_ci(x, n_boot=500, seed=1)
    assert a.estimate == pytest.approx(b.estimate)
    assert (a.low, a.high) == pytest.approx((b.low, b.high))


def test_stratified_keeps_each_group_size_and_pairing():
    # 3 zeros and 5 ones: the pooled mean moves when samples are drawn across groups, never within them
    pooled = stratified_bootstrap_ci([np.zeros(3), np.ones(5)],
                                     lambda a, b, axis=-1: (a.sum(axis) + b.sum(axis)) / 8.0, n_boot=200)
    assert pooled.estimate == pooled.low == pooled.high == pytest.approx(5 / 8)
    # rows of a [2, n] group travel together: a ratio of equal rows is always 1
    x = np.random.default_rng(0).uniform(0.5, 1.0, size=20)
    ratio = stratified_bootstrap_ci([np.stack([x, x])], lambda g, axis=-1: g[0].mean(axis) / g[1].mean(axis))
    assert ratio.low == pytest.approx(1.0) and ratio.high == pytest.approx(1.0)


def test_stratified_fixed_group_and_nonfinite_resamples():
    x = np.random.default_rng(5).normal(size=25)
    with_fixed = stratified_bootstrap_ci([np.array([4.0]), x], lambda c, g, axis=-1: c.mean(axis) + g.mean(axis))
    alone = stratified_bootstrap_ci([x], _mean_of_means)
    assert with_fixed.estimate == pytest.approx(4.0 + x.mean())
    assert (with_fixed.low, with_fixed.high) == pytest.approx((4.0 + alone.low, 4.0 + alone.high))
    assert stratified_bootstrap_ci([np.array([2.0]), np.array([3.0])], _mean_of_means) == (2.5, 2.5, 2.5)
    # a denominator that is 0 in most samples: resamples with no non-zero one are left out
    g = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    ci = stratified_bootstrap_ci([g], lambda g, axis=-1: g[0].mean(axis) / g[1].mean(axis), n_boot=300)
    assert ci.estimate == pytest.approx(2.0)
    assert np.isfinite([ci.low, ci.high]).all() and 0.5 <= ci.low <= ci.high <= 2.0


def test_stratified_input_errors():
    with pytest.raises(ValueError, match="at least one group"):
        stratified_bootstrap_ci([], _mean_of_means)
    with pytest.raises(ValueError, match="no samples"):
        stratified_bootstrap_ci([np.ones(3), np.ones(0)], _mean_of_means)
    with pytest.raises(ValueError, match="NaN or inf"):
        stratified_bootstrap_ci([np.array([1.0, np.nan])], _mean_of_means)
    with pytest.raises(ValueError, match="level"):
        stratified_bootstrap_ci([np.ones(3)], _mean_of_means, level=1.0)
