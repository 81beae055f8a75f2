"""What a press takes for what its caller leaves open: one rule per setting (depthkv.allocation.defaults)."""

from __future__ import annotations

import json
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


def _options_profile(tiny_llama_dir, tmp_path, options):
    from tests.conftest import tiny_kvzip_profile

    path = tiny_kvzip_profile(tiny_llama_dir, tmp_path / "profile.json")
    data = json.loads(path.read_text())
    data["scorer"]["options"] = options
    path.write_text(json.dumps(data))
    return path


def test_profile_options_for_adopts_refuses_a_clash_and_yields_to_force(tiny_llama_dir, tmp_path):
    from depthkv.allocation.profile import Profile, ProfileError

    profile = Profile.load(_options_profile(tiny_llama_dir, tmp_path, {"self_window": 1, "self_weight": 0.3}))
    assert profile.scorer_options == {"self_window": 1, "self_weight": 0.3}
    assert profile.options_for("kvzip", {}) == {"self_window": 1, "self_weight": 0.3}
    assert profile.options_for("kvzip", {"replay_chunk": 40}) == {"self_window": 1, "self_weight": 0.3,
                                                                 "replay_chunk": 40}
    assert profile.options_for("kvzip", {"self_window": 1}) == {"self_window": 1, "self_weight": 0.3}
    with pytest.raises(ProfileError, match="self_window=2 \\(profile: 1\\)"):
        profile.options_for("kvzip", {"self_window": 2})
    assert profile.options_for("kvzip", {"self_window": 2}, force=True) == {"self_window": 2}
    assert profile.options_for("snapkv", {}) == {}  # another scorer: nothing of this profile applies


def test_press_and_eval_build_the_profiles_scorer_with_its_options(tiny_llama_dir, tmp_path):
    """A profile calibrated with scorer options serves that scorer with them: a press or an eval that names the
    scorer without options gets the profile's; other options are refused unless forced."""
    from depthkv.allocation.profile import ProfileError
    from depthkv.eval import EvalConfig
    from depthkv.eval.results import EvalError
    from depthkv.models import load_model

    path = _options_profile(tiny_llama_dir, tmp_path, {"self_window": 1, "self_weight": 0.3})
    model = load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model
    kw = dict(ratio=0.5, profile=str(path), setting="agnostic", strategy="optimal", prompt_ids=(7, 8, 9))
    p = depthkv.press(model, "kvzip", **kw)
    assert (p.scorer.self_window, p.scorer.self_weight, p.scorer.prompt_ids) == (1, 0.3, (7, 8, 9))
    with pytest.raises(ProfileError, match="other options"):
        depthkv.press(model, "kvzip", self_window=2, **kw)
    assert depthkv.press(model, "kvzip", self_window=2, force_profile=True, **kw).scorer.self_window == 2
    cfg = EvalConfig(model="tiny", tasks=("needle",), methods=("full", "optimal"), scorers=("kvzip",),
                     ratios=(0.5,), settings=("agnostic",), profile=str(path))
    cfg.validate()
    assert cfg.scorer_options == {"kvzip": {"self_window": 1, "self_weight": 0.3}}
    assert cfg.scorer("kvzip").self_window == 1
    bad = EvalConfig(model="tiny", tasks=("needle",), methods=("full", "optimal"), scorers=("kvzip",),
                     ratios=(0.5,), settings=("agnostic",), profile=str(path),
                     scorer_options={"kvzip": {"self_weight": 0.5}})
    with pytest.raises(EvalError, match="self_weight=0.5 \\(profile: 0.3\\)"):
        bad.validate()
