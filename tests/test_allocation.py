"""Hand-checked cases for each allocator, the registry, the sensitivity view and the apportionment helpers."""

from __future__ import annotations

import numpy as np
import pytest

from depthkv.allocation import (
    ALLOCATORS,
    AllocatorError,
    BudgetError,
    Budgets,
    SensitivityError,
    SensitivityView,
    allocate,
    apportion,
    convex_curve,
    global_budget,
    keep_floor,
    list_allocators,
    mga_ratios,
    middle_layers,
    optimal_curves,
    pyramid_weights,
    register_allocator,
    robustness_scores,
    spread,
    uniform,
    water_fill,
)

DEG = SensitivityView((0.5, 1.0), [[5.0, 10.0], [0.01, 0.02], [0.01, 0.02], [0.01, 0.02]])


# ---------------------------------------------------------------- registry


def test_existing_exports_kept():
    assert uniform(4, 10, 0.5).tokens == (5, 5, 5, 5)
    assert spread(7, 3) == [3, 2, 2]
    assert isinstance(allocate("uniform", 4, 10, 0.5), Budgets)


def test_list_allocators_sorted_and_complete():
    names = list_allocators()
    assert names == sorted(names)
    assert {
        "uniform",
        "pyramid",
        "mlp",
        "mga",
        "mlma",
        "mlma-2",
        "mlma-4",
        "mlma-6",
        "proportional",
        "optimal",
    } <= set(names)
    assert ALLOCATORS["mga"].needs == ("metric",)
    assert ALLOCATORS["optimal"].needs == ("degradation",)
    assert ALLOCATORS["pyramid"].options == {"beta": 20.0}
    assert ALLOCATORS["mga"].options["ratio_max"] == 0.7
    assert all(spec.summary for spec in ALLOCATORS.values())


def test_unknown_allocator_lists_names():
    with pytest.raises(AllocatorError) as exc:
        allocate("pyramids", 4, 10, 0.5)
    for name in list_allocators():
        assert name in str(exc.value)


def test_unknown_option_lists_options():
    with pytest.raises(AllocatorError, match=r"no option gamma.*beta=20\.0"):
        allocate("pyramid", 4, 10, 0.5, gamma=3)
    with pytest.raises(AllocatorError, match="options: none"):
        allocate("uniform", 4, 10, 0.5, beta=3)


@pytest.mark.parametrize("name", ["mga", "mlma-4", "proportional", "optimal"])
def test_missing_sensitivity_is_a_clear_error(name):
    with pytest.raises(AllocatorError, match=f"{name}.*needs a sensitivity view"):
        allocate(name, 4, 10, 0.5)


def test_view_without_the_needed_part():
    with pytest.raises(AllocatorError, match="'mga' needs metric"):
        allocate("mga", 4, 100, 0.5, sensitivity=DEG)
    with pytest.raises(AllocatorError, match="'optimal' needs degradation"):
        allocate("optimal", 3, 100, 0.5, sensitivity=SensitivityView.from_metric([1, 2, 3]))


def test_view_for_another_model():
    with pytest.raises(AllocatorError, match="measured on 4 layers but the request is for 5"):
        allocate("optimal", 5, 100, 0.5, sensitivity=DEG)


def test_register_custom_allocator():
    @register_allocator("test-half")
    def half(request, sensitivity=None, *, scale: float = 1.0):
        """Test allocator."""
        n = len(request.free)
        return request.budgets(spread(request.rest, n), "test-half")

    try:
        assert "test-half" in list_allocators()
        assert ALLOCATORS["test-half"].options == {"scale": 1.0}
        assert allocate("test-half", 3, 10, 0.5).total == 15
        with pytest.raises(ValueError, match="already registered"):
            register_allocator("test-half")(half)
    finally:
        del ALLOCATORS["test-half"]


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(ratio=1.0), r"\[0, 1\)"),
        (dict(ratio=-0.1), r"\[0, 1\)"),
        (dict(ratio=float("nan")), r"\[0, 1\)"),
        (dict(n_layers=0), "at least one layer"),
        (dict(context_len=0), "context length"),
        (dict(min_tokens=0), "min_tokens"),
        (dict(protected=(4,)), "protected layer 4 does not exist"),
        (dict(protected=(-1,)), "protected layer -1 does not exist"),
        (dict(n_layers=2.5), "n_layers must be an integer"),
    ],
)
def test_bad_common_inputs(kwargs, msg):
    args = dict(n_layers=4, context_len=10, ratio=0.5) | kwargs
    prot = args.pop("protected", ())
    mt = args.pop("min_tokens", 1)
    with pytest.raises(BudgetError, match=msg):
        allocate("uniform", args["n_layers"], args["context_len"], args["ratio"], protected=prot, min_tokens=mt)


def test_budgets_record_strategy_ratio_protection():
    b = allocate("mlp", 30, 1000, 0.6, protected=(0,))
    assert b.strategy == "mlp" and b.ratio == 0.6
    assert b.protected == (0, 15, 16)
    assert Budgets.from_dict(b.to_dict()) == b


# ---------------------------------------------------------------- sensitivity view


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(probe_ratios=(0.5, 0.25), degradation=np.zeros((2, 2))), "strictly increasing"),
        (dict(probe_ratios=(0.5, 0.5), degradation=np.zeros((2, 2))), "strictly increasing"),
        (dict(probe_ratios=(0.0, 0.5), degradation=np.zeros((2, 2))), r"\(0, 1\]"),
        (dict(probe_ratios=(0.5, 1.5), degradation=np.zeros((2, 2))), r"\(0, 1\]"),
        (dict(probe_ratios=(0.5,), degradation=np.zeros((2, 2))), "2 columns but there are 1 probe ratios"),
        (dict(probe_ratios=(0.5,), degradation=np.array([[np.nan], [0.0]])), "non-finite.*layer 0"),
        (dict(probe_ratios=(0.5,), degradation=np.zeros((2, 1)), metric=np.zeros(3)), "3 layers.*have 2"),
        (dict(metric=np.array([1.0, np.nan])), "non-finite"),
        (dict(metric=np.zeros((2, 2))), r"\[layers\] vector"),
        (dict(), "needs degradation curves, a metric, or both"),
        (dict(probe_ratios=(0.5,)), "needs degradation curves, a metric, or both"),
        (dict(probe_ratios=(0.5,), metric=np.ones(2)), "without degradation"),
    ],
)
def test_sensitivity_view_validation(kwargs, msg):
    with pytest.raises(SensitivityError, match=msg):
        SensitivityView(**kwargs)


def test_sensitivity_view_basics():
    v = SensitivityView([0.25, 0.5, 1.0], np.arange(6.0).reshape(2, 3) - 0.01, [1.0, 2.0])
    assert v.n_layers == 2 and v.probe_ratios == (0.25, 0.5, 1.0)
    assert v.ratio_index(None) == 2 and v.ratio_index(0.5) == 1
    with pytest.raises(SensitivityError, match="0.75 was not measured"):
        v.ratio_index(0.75)
    with pytest.raises(ValueError):
        v.degradation[0, 0] = 1.0  # read-only copy
    assert SensitivityView((0.5,), [1.0, 2.0]).degradation.shape == (2, 1)  # 1 ratio: a vector is accepted


# ---------------------------------------------------------------- uniform


def test_uniform_hand_cases():
    assert allocate("uniform", 4, 10, 0.5).tokens == (5, 5, 5, 5)
    assert allocate("uniform", 4, 10, 0.5, protected=(0,)).tokens == (10, 4, 3, 3)
    assert allocate("uniform", 3, 10, 0.0).tokens == (10, 10, 10)
    with pytest.raises(BudgetError, match="at least 4"):
        allocate("uniform", 4, 10, 0.9, min_tokens=4)


def test_min_tokens_above_context_is_clamped():
    """A context shorter than the scorer's window is kept whole: only ratio that rounds to 0 works."""
    assert allocate("uniform", 2, 3, 0.05, min_tokens=8).tokens == (3, 3)  # round(5.7) = 6 = L * N
    with pytest.raises(BudgetError, match="maximum reachable ratio"):
        allocate("uniform", 2, 3, 0.5, min_tokens=8)


# ---------------------------------------------------------------- pyramid


def test_pyramid_weights_shape():
    w = pyramid_weights(4, 2.0)
    assert np.allclose(w, [1.5, 7 / 6, 5 / 6, 0.5]) and np.isclose(w.mean(), 1.0)
    assert np.allclose(pyramid_weights(4, 1.0), 1.0)
    assert pyramid_weights(1, 20.0).tolist() == [1.0]
    with pytest.raises(BudgetError, match="beta >= 1"):
        pyramid_weights(4, 0.5)


def test_pyramid_four_layers_by_hand():
    # avg 50, beta 2: top 25, bottom 75, arithmetic in between: 75, 58.33, 41.67, 25
    assert allocate("pyramid", 4, 100, 0.5, beta=2).tokens == (75, 58, 42, 25)
    # PyramidKV default beta 20: 97.5, 65.83, 34.17, 2.5 -> exact sum 200
    b = allocate("pyramid", 4, 100, 0.5)
    assert b.tokens == (97, 66, 34, 3) and b.total == 200


def test_pyramid_clips_and_redistributes():
    # avg 90, beta 2: 135, 105, 75, 45 -> layer 0 capped at 100, excess to the others in shape
    # proportion: 121.3, 86.7, 52 -> layer 1 capped too -> the last two share 160 as 5:3 -> 100, 60
    assert allocate("pyramid", 4, 100, 0.1, beta=2).tokens == (100, 100, 100, 60)
    # the floor at the top: min_tokens 10 lifts the top layer, the others give it back
    b = allocate("pyramid", 4, 100, 0.5, min_tokens=10)
    assert b.tokens[-1] == 10 and b.total == 200 and list(b.tokens) == sorted(b.tokens, reverse=True)


def test_pyramid_skips_protected_layers():
    b = allocate("pyramid", 5, 100, 0.5, beta=2, protected=(0,))
    assert b.tokens[0] == 100
    # total 250, layer 0 keeps 100, the 4 free layers share 150 (avg 37.5); beta 2 -> 56.25, 43.75, 31.25, 18.75
    assert b.tokens[1:] == (56, 44, 31, 19)


# ---------------------------------------------------------------- mlp


def test_middle_layers():
    assert middle_layers(30, 2) == (15, 16)
    assert middle_layers(32, 2) == (16, 17)
    assert middle_layers(32, 4) == (15, 16, 17, 18)
    assert middle_layers(32, 6) == (14, 15, 16, 17, 18, 19)
    assert middle_layers(3, 2) == (1, 2)
    assert middle_layers(2, 2) == (0, 1)
    assert middle_layers(1, 2) == (0,)
    assert middle_layers(4, 6) == (0, 1, 2, 3)


def test_mlp_protects_middle_layers_on_30():
    b = allocate("mlp", 30, 1000, 0.6, protected=(0,))
    assert b.tokens[0] == b.tokens[15] == b.tokens[16] == 1000
    others = [t for i, t in enumerate(b.tokens) if i not in (0, 15, 16)]
    assert sum(others) == 12000 - 3000 and set(others) == {333, 334}
    assert b.total == global_budget(30, 1000, 0.6)


def test_mlp_small_models():
    assert allocate("mlp", 3, 10, 0.3).tokens == (1, 10, 10)  # layers 1, 2 protected; 21 total
    assert allocate("mlp", 2, 10, 0.0).tokens == (10, 10)
    with pytest.raises(BudgetError, match="all 2 layers are protected"):
        allocate("mlp", 2, 10, 0.5)
    with pytest.raises(BudgetError, match="all 1 layers are protected"):
        allocate("mlp", 1, 10, 0.5)
    with pytest.raises(BudgetError, match="mlp keeps the middle layers"):
        allocate("mlp", 3, 10, 0.5)  # 15 tokens, 20 for layers 1, 2


# ---------------------------------------------------------------- mga


def test_robustness_scores_transforms():
    m = np.array([3.0, 1.0, 2.0])
    assert np.allclose(robustness_scores(m), [1.1, 0.1, 0.6])  # lowest InfoNCE -> smallest score
    assert np.allclose(robustness_scores(m, "rank"), [3, 1, 2])
    assert np.allclose(robustness_scores(m, "raw"), m)
    assert np.allclose(robustness_scores(np.ones(3)), 1.0)  # equal metrics -> uniform
    with pytest.raises(BudgetError, match="positive"):
        robustness_scores(np.array([0.0, 1.0]), "raw")
    with pytest.raises(BudgetError, match="unknown transform"):
        robustness_scores(m, "log")


def test_water_fill_by_hand():
    # shares 1:2:3 of 1.5, cap 0.7: 0.25, 0.5, 0.75 -> third capped, 0.8 left over 1:2
    assert np.allclose(water_fill([1, 2, 3], 1.5, 0.7), [0.8 / 3, 1.6 / 3, 0.7])
    assert np.allclose(water_fill([1, 1], 1.0, 0.7), [0.5, 0.5])
    with pytest.raises(BudgetError, match="exceeds"):
        water_fill([1, 1], 1.5, 0.7)


def test_mga_three_layers_by_hand():
    # InfoNCE 0, 1, 2 -> s = 0.1, 0.6, 1.1 (shift, eps 0.1). ratio 0.5: sum of ratios 1.5.
    # proportional: 0.083, 0.5, 0.917 -> layer 2 capped at 0.7; 0.8 left over s = 0.1, 0.6:
    # 0.8/7 = 0.1143, 4.8/7 = 0.6857. N = 700: removed 80, 480, 490 -> kept 620, 220, 210.
    view = SensitivityView.from_metric([0.0, 1.0, 2.0])
    assert np.allclose(mga_ratios(view.metric, 0.5), [0.8 / 7, 4.8 / 7, 0.7])
    b = allocate("mga", 3, 700, 0.5, sensitivity=view)
    assert b.tokens == (620, 220, 210)
    assert b.strategy == "mga" and b.total == 1050


def test_mga_protected_and_cap():
    view = SensitivityView.from_metric([5.0, 0.0, 1.0, 2.0])
    b = allocate("mga", 4, 700, 0.375, sensitivity=view, protected=(0,))  # 1050 removed over layers 1..3
    assert b.tokens == (700, 620, 220, 210)
    assert np.allclose(mga_ratios(view.metric, 0.375, protected=(0,)), [0, 0.8 / 7, 4.8 / 7, 0.7])
    assert min(allocate("mga", 4, 1000, 0.5, sensitivity=view).tokens) >= keep_floor(1000, 0.7) == 300


def test_mga_cap_infeasible_reports_maximum():
    view = SensitivityView.from_metric([1.0, 2.0, 3.0])
    assert allocate("mga", 3, 100, 0.7, sensitivity=view).tokens == (30, 30, 30)
    with pytest.raises(BudgetError, match=r"maximum reachable ratio here is 0\.7000"):
        allocate("mga", 3, 100, 0.71, sensitivity=view)
    with pytest.raises(BudgetError, match=r"maximum reachable ratio here is 0\.4667"):
        allocate("mga", 3, 100, 0.5, sensitivity=view, protected=(0,))
    assert allocate("mga", 3, 100, 0.8, sensitivity=view, ratio_max=0.9).total == 60
    with pytest.raises(BudgetError, match="ratio_max"):
        allocate("mga", 3, 100, 0.5, sensitivity=view, ratio_max=0.0)


def test_mga_keep_floor_float_safe():
    assert keep_floor(10, 0.7) == 3  # 10 * (1 - 0.7) = 3.0000000000000004 must not round up to 4
    assert keep_floor(1000, 0.7) == 300 and keep_floor(7, 0.7) == 3 and keep_floor(1, 0.7) == 1
    assert keep_floor(10, 0.7, floor=5) == 5


# ---------------------------------------------------------------- mlma


def test_mlma_4_at_06_on_30_layers_raises():
    """Paper's caveat: with layer 0 and 4 middle layers whole, 25 layers at <= 0.7 reach 0.5833 < 0.6."""
    view = SensitivityView.from_metric(np.linspace(1.0, 3.0, 30))
    with pytest.raises(BudgetError, match=r"mlma-4.*maximum reachable ratio here is 0\.5833"):
        allocate("mlma-4", 30, 1000, 0.6, sensitivity=view, protected=(0,))
    # without protecting layer 0, 26 layers x 0.7 = 18.2 of 30 layers: 0.6 is reachable
    b = allocate("mlma-4", 30, 1000, 0.6, sensitivity=view)
    assert b.total == 12000 and all(b.tokens[i] == 1000 for i in (14, 15, 16, 17))
    assert min(b.tokens) >= 300


@pytest.mark.parametrize("k, n_layers, ok", [(2, 32, True), (2, 28, True), (4, 32, False), (6, 28, False)])
def test_mlma_paper_configs(k, n_layers, ok):
    view = SensitivityView.from_metric(np.linspace(1.0, 3.0, n_layers))
    if ok:
        b = allocate(f"mlma-{k}", n_layers, 1000, 0.6, sensitivity=view, protected=(0,))
        assert set(b.protected) == {0, *middle_layers(n_layers, k)}
        assert b.total == global_budget(n_layers, 1000, 0.6)
    else:
        with pytest.raises(BudgetError, match="maximum reachable ratio"):
            allocate(f"mlma-{k}", n_layers, 1000, 0.6, sensitivity=view, protected=(0,))


def test_mlma_generic_k_and_equivalence_with_mga():
    view = SensitivityView.from_metric(np.linspace(1.0, 3.0, 12))
    generic = allocate("mlma", 12, 500, 0.4, sensitivity=view, k=4)
    assert generic == allocate("mlma-4", 12, 500, 0.4, sensitivity=view)
    # MLMA-k = MGA with the middle layers protected
    mid = middle_layers(12, 2)
    assert (
        allocate("mlma-2", 12, 500, 0.4, sensitivity=view).tokens
        == allocate("mga", 12, 500, 0.4, sensitivity=view, protected=mid).tokens
    )
    with pytest.raises(BudgetError, match="positive integer"):
        allocate("mlma", 12, 500, 0.4, sensitivity=view, k=0)


# ---------------------------------------------------------------- proportional


def test_proportional_by_hand():
    view = SensitivityView((0.5,), [[1.0], [3.0], [0.0], [0.0]])
    # floor 0: layers 2, 3 keep the minimum 1; 198 as 1:3 -> 49.5, 148.5 -> layer 1 capped at 100
    assert allocate("proportional", 4, 100, 0.5, sensitivity=view, floor=0).tokens == (98, 100, 1, 1)
    b = allocate("proportional", 4, 100, 0.5, sensitivity=view)
    assert b.tokens[1] == 100 and b.tokens[0] > b.tokens[2] == b.tokens[3] > 1
    flat = SensitivityView((0.5,), np.zeros((4, 1)) - 0.01)  # no signal (noise) -> uniform
    assert allocate("proportional", 4, 100, 0.5, sensitivity=flat).tokens == (50, 50, 50, 50)


def test_proportional_probe_ratio():
    view = SensitivityView((0.25, 0.75), [[3.0, 1.0], [1.0, 3.0]])
    a = allocate("proportional", 2, 100, 0.5, sensitivity=view, floor=0)
    b = allocate("proportional", 2, 100, 0.5, sensitivity=view, floor=0, probe_ratio=0.25)
    assert a.tokens == (25, 75) and b.tokens == (75, 25)
    with pytest.raises(AllocatorError, match="not measured"):
        allocate("proportional", 2, 100, 0.5, sensitivity=view, probe_ratio=0.5)


# ---------------------------------------------------------------- optimal


def test_convex_curve_hull_and_cleaning():
    # kept x = 50 (r 0.5), 25 (r 0.75), 0 -> floor 1 (r 1.0); concave point at x = 50 is dropped
    x, y = convex_curve((0.5, 0.75, 1.0), (4.0, 5.0, 10.0), 100, 1)
    assert x.tolist() == [1, 25, 100] and y[-1] == 0.0
    assert np.all(np.diff(y) <= 0)
    g = -np.diff(y) / np.diff(x)
    assert np.all(np.diff(g) <= 1e-12)  # convex: gains fall with kept tokens
    # noise: a negative value becomes 0 and a dip is lifted to the running max
    x, y = convex_curve((0.25, 0.5), (-0.1, -0.2), 100, 1)
    assert np.allclose(y, 0.0)
    # extension below the most aggressive probe, linear with the last segment
    x, y = convex_curve((0.5,), (1.0,), 100, 10)
    assert x.tolist() == [10, 50, 100] and np.isclose(y[0], 1.8)


def test_optimal_puts_tokens_where_the_curve_is_steep():
    b = allocate("optimal", 4, 100, 0.5, sensitivity=DEG)
    assert b.tokens == (100, 34, 33, 33)  # layer 0 is steep; ties among the flat ones spread evenly
    curves = optimal_curves(DEG, range(4), 100)
    u = allocate("uniform", 4, 100, 0.5)
    assert curves.value(b.tokens) < curves.value(u.tokens)


def test_optimal_planted_middle_layer():
    rng = np.random.default_rng(0)
    deg = rng.uniform(0.0, 0.1, (8, 3)).cumsum(axis=1)
    deg[5] = [2.0, 4.0, 8.0]  # the planted sensitive layer
    view = SensitivityView((0.25, 0.5, 0.75), deg)
    b = allocate("optimal", 8, 1000, 0.5, sensitivity=view, protected=(0,))
    assert b.tokens[0] == 1000 and b.tokens[5] == 1000
    assert b.total == 4000


def test_optimal_respects_min_tokens_and_protected():
    b = allocate("optimal", 4, 100, 0.5, sensitivity=DEG, min_tokens=20, protected=(3,))
    assert b.tokens == (60, 20, 20, 100)  # the steep layer takes all but the floors of the others
    with pytest.raises(BudgetError, match=r"at least 20.*maximum reachable ratio here is 0\.6000"):
        allocate("optimal", 4, 100, 0.7, sensitivity=DEG, min_tokens=20, protected=(3,))


# ---------------------------------------------------------------- apportionment


def test_apportion_avoids_the_alabama_paradox():
    """Largest remainder gives the 3rd party fewer seats at 11 than at 10; the divisor rule does not."""
    w = [6, 6, 2]
    assert spread(10, 3, w) == [4, 4, 2] and spread(11, 3, w) == [5, 5, 1]  # the paradox
    prev = np.zeros(3, int)
    for total in range(0, 40):
        cur = apportion(total, w, np.zeros(3), np.full(3, 100))
        assert cur.sum() == total and np.all(cur >= prev)
        prev = cur


def test_apportion_bounds_errors():
    with pytest.raises(BudgetError, match="cannot place"):
        apportion(10, [1, 1], [0, 0], [4, 4])
    with pytest.raises(BudgetError, match="weights"):
        apportion(4, [1, -1], [0, 0], [4, 4])


def test_large_context_is_fast_and_exact():
    import time

    rng = np.random.default_rng(0)
    view = SensitivityView((0.25, 0.5, 0.75, 1.0), rng.random((80, 4)).cumsum(axis=1), rng.random(80))
    for name in ("pyramid", "mga", "proportional", "optimal"):
        t = time.perf_counter()
        b = allocate(name, 80, 131072, 0.6, sensitivity=view, protected=(0,))
        assert time.perf_counter() - t < 0.5
        assert b.total == global_budget(80, 131072, 0.6)
