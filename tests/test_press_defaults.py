"""What a press takes for what its caller leaves open: one rule per setting (depthkv.allocation.defaults)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import depthkv
from depthkv.allocation.defaults import press_defaults, refined_at

REFINED = SimpleNamespace(data={"refined": {"0.8": {"shares": []}, "0.9": {"shares": []}}})
PLAIN = SimpleNamespace(data={})


@pytest.mark.parametrize("setting, profile, ratio, mode, heads, want", [
    (None, None, 0.8, "post", True, ("snapkv", "uniform", False)),
    ("aware", PLAIN, 0.8, "post", True, ("snapkv", "optimal", False)),
    ("aware", REFINED, 0.8, "post", True, ("snapkv", "optimal", False)),
    ("agnostic", None, 0.8, "post", True, ("kvzip", "global", True)),
    ("agnostic", PLAIN, 0.8, "post", True, ("kvzip", "adaptive", True)),
    ("agnostic", REFINED, 0.8, "post", True, ("kvzip", "adaptive", True)),  # refined floors: only when asked
    ("agnostic", REFINED, 0.9, "chunked", True, ("kvzip", "optimal-joint", False)),  # chunked: static split
    ("agnostic", PLAIN, 0.9, "chunked", True, ("kvzip", "optimal", False)),
    ("agnostic", None, 0.9, "chunked", True, ("kvzip", "uniform", False)),
    ("agnostic", REFINED, 0.8, "post", False, ("kvzip", "optimal-joint", False)),  # tensor parallel
])
def test_press_defaults_table(setting, profile, ratio, mode, heads, want):
    d = press_defaults(setting, profile, ratio, mode=mode, split_heads=heads)
    assert (d.scorer, d.strategy, d.head_budgets) == want


V_AGNOSTIC = SimpleNamespace(data={"scorer": {"name": "kvzip_v"}, "setting": "agnostic"})
H2O_AWARE = SimpleNamespace(data={"scorer": {"name": "h2o"}})  # no setting recorded: question-aware


@pytest.mark.parametrize("setting, profile, mode, want", [
    ("agnostic", V_AGNOSTIC, "post", ("kvzip_v", "adaptive", True)),  # the profile names its scorer
    ("agnostic", V_AGNOSTIC, "chunked", ("kvzip_v", "optimal", False)),  # (kvzip_v then refuses chunked mode)
    ("aware", V_AGNOSTIC, "post", ("snapkv", "optimal", False)),  # calibrated in another setting: the table's
    ("aware", H2O_AWARE, "post", ("h2o", "optimal", False)),
    (None, H2O_AWARE, "post", ("h2o", "optimal", False)),
    ("agnostic", H2O_AWARE, "post", ("kvzip", "adaptive", True)),
])
def test_a_profile_names_the_default_scorer_in_its_own_setting(setting, profile, mode, want):
    d = press_defaults(setting, profile, 0.8, mode=mode)
    assert (d.scorer, d.strategy, d.head_budgets) == want


def test_refined_at_matches_ratios_as_numbers():
    assert refined_at(REFINED, 0.8) and refined_at(REFINED, 0.9000000000001)
    assert not refined_at(REFINED, 0.85) and not refined_at(PLAIN, 0.8) and not refined_at(None, 0.8)
    assert not refined_at(REFINED, None)


def test_press_fills_what_the_caller_left_open(tiny_models):
    model = tiny_models("qwen2", "eager")
    c = depthkv.press(model, ratio=0.5, setting="agnostic").config
    assert (c.scorer, c.strategy, c.head_budgets) == ("kvzip", "global", True)
    chunked = depthkv.press(model, ratio=0.5, setting="agnostic", mode="chunked", chunk_size=16).config
    assert (chunked.scorer, chunked.strategy, chunked.head_budgets) == ("kvzip", "uniform", False)
    aware = depthkv.press(model, ratio=0.5).config
    assert (aware.scorer, aware.strategy, aware.head_budgets) == ("snapkv", "uniform", False)
    # what the caller gives is kept
    given = depthkv.press(model, "h2o", ratio=0.5, setting="agnostic", strategy="pyramid", head_budgets=False).config
    assert (given.scorer, given.strategy, given.head_budgets) == ("h2o", "pyramid", False)
