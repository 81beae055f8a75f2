"""The floor share of adaptive / adaptive-joint, chosen per ratio on the calibration samples (refine --floor-shares)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from depthkv.allocation import AllocatorError, BudgetSpec, SensitivityError, SensitivityView, allocate
from depthkv.allocation.profile import KIND, SCHEMA_VERSION, Profile
from depthkv.calibration.ablation import CalibrationItem, measure_sensitivity
from depthkv.calibration.floors import (
    FloorError,
    check_grid,
    choose_share,
    parse_grid,
    store_floor_shares,
    tune_floor_shares,
)
from depthkv.calibration.refine import prepare_samples
from depthkv.cli import main
from depthkv.engine import Protection
from depthkv.engine.cache import clone_cache
from depthkv.engine.press import press
from depthkv.engine.runner import forward_with_cache, new_cache
from depthkv.engine.session import Session
from depthkv.models.identity import model_identity
from depthkv.scorers import get_scorer
from tests.conftest import SCORER_OPTIONS, one_error_line

PROT = Protection(n_sink=2, n_recent=4)
PROBES = (0.5, 0.8, 1.0)
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread(single_thread):
    """Tiny tensors: one thread (see conftest.single_thread)."""


def _items(n: int = 2, seed: int = 3) -> list[CalibrationItem]:
    """Query-agnostic items: the context is pruned, question + answer are forced through the pruned cache."""
    gen = torch.Generator().manual_seed(seed)
    return [CalibrationItem(torch.randint(0, 256, (1, length), generator=gen),
                            torch.randint(0, 256, (1, 4), generator=gen), f"f{i}",
                            question_ids=torch.randint(0, 256, (1, 6), generator=gen))
            for i, length in enumerate((70, 64, 76)[:n])]


def _scorer(name: str):
    return get_scorer(name, **SCORER_OPTIONS.get(name, {}))


def _profile(model, items, scorer) -> Profile:
    """A profile of ``model`` whose curves are measured on ``items`` (agnostic setting)."""
    res = measure_sensitivity(model, items, scorer, PROBES, PROT)
    curves = {"mean": res.kl.mean(0).tolist(), "lo": res.kl.min(0).tolist(), "hi": res.kl.max(0).tolist()}
    return Profile({"schema_version": SCHEMA_VERSION, "kind": KIND, "model": model_identity(model, "tiny"),
                    "scorer": {"name": scorer.name, "options": {}}, "setting": "agnostic",
                    "protection": {"n_sink": PROT.n_sink, "n_recent": PROT.n_recent}, "probe_ratios": list(PROBES),
                    "curves": {"kl": curves, "nll": curves}, "context_lens": res.context_lens})


def _pressed_kl(model, items, scorer_name: str, heads: bool, **how) -> tuple[float, list]:
    """Mean KL(full || pruned) of the answers over ``items`` when a press compresses each context for real
    (``how``: policy=, or ratio= + strategy= + profile=), and the budgets it used."""
    kls, budgets = [], []
    for item in items:
        context, forced = item.split()
        n_answer = item.answer_ids.shape[1]
        with press(model, scorer_name, head_budgets=heads, n_sink=PROT.n_sink, n_recent=PROT.n_recent,
                   **SCORER_OPTIONS.get(scorer_name, {}), **how) as p:
            compressed = p.compress(context)
        budgets.append(compressed.budgets)
        full = new_cache(model)
        with Session(model):
            logits = forward_with_cache(model, forced, clone_cache(compressed.cache), logits_to_keep=n_answer)
            forward_with_cache(model, context, full)
            ref = forward_with_cache(model, forced, full, logits_to_keep=n_answer)
        logp, ref_logp = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
        kls.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item())
    return float(np.mean(kls)), budgets


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family,attn,scorer_name,heads", [
    ("llama", "sdpa", "kvzip", True),
    ("qwen2", "eager", "kvzip", True),
    ("llama", "sdpa", "snapkv", False),
])
def test_masked_kl_equals_pruning_with_a_press(tiny_models, family, attn, scorer_name, heads):
    """For every share, the tuner's masked joint KL equals compressing with a press that uses the same strategy,
    floor share and head budgets, and the press's stored-share default reproduces the chosen share's KL (fp32;
    KLs here are ~3e-3, so the tolerance is relative: 1e-3 of the value, far inside 1e-4 absolute)."""
    model = tiny_models(family, attn)
    items = _items(2)
    scorer = _scorer(scorer_name)
    prof = _profile(model, items, scorer)
    samples = prepare_samples(model, items, scorer, PROT)
    ratio = 0.8
    res = tune_floor_shares(model, samples, prof, [ratio], GRID, heads=heads)[ratio]
    view = prof.view()
    for share in GRID:
        spec = BudgetSpec(ratio, "adaptive", view, (), PROT.size, {"floor_share": share})
        got, used = _pressed_kl(model, items, scorer_name, heads, policy=spec.policy(4))
        for sample, b in zip(samples, used):  # the press split the budget as the tuner's builder did
            assert b == spec.for_context(4, sample.context_len, scores=sample.sp.scores[scorer.name])
        assert res.kl[share] == pytest.approx(got, rel=1e-3, abs=1e-6)
    assert max(res.kl.values()) > 1e-3 and len({round(v, 5) for v in res.kl.values()}) > 1  # not all alike
    store_floor_shares(prof, "adaptive", {ratio: res})
    got, _ = _pressed_kl(model, items, scorer_name, heads, ratio=ratio, strategy="adaptive", profile=prof,
                         setting="agnostic")
    assert res.kl[res.share] == pytest.approx(got, rel=1e-3, abs=1e-6)


# ----------------------------------------------------------------------------------------------- choice
def test_chosen_share_is_the_argmin_and_is_stored_and_read_back(tiny_models, tmp_path):
    model = tiny_models("llama", "sdpa")
    items = _items(2)
    scorer = _scorer("snapkv")
    prof = _profile(model, items, scorer)
    samples = prepare_samples(model, items, scorer, PROT)
    results = tune_floor_shares(model, samples, prof, [0.6, 0.8], grid=(1, 0.5, 0.25, 0.0), heads=True)
    assert sorted(results) == [0.6, 0.8]
    for res in results.values():
        assert list(res.kl) == [0.0, 0.25, 0.5, 1.0] and res.samples == 2 and res.heads
        assert res.kl[res.share] == min(res.kl.values())
        assert res.share == choose_share(res.kl)
    store_floor_shares(prof, "adaptive", results)
    path = tmp_path / "p.json"
    prof.save(path)
    again = Profile.load(path, model_identity(model, "tiny"))
    entry = again.data["floor_shares"]["adaptive"]["0.8"]
    assert entry == {"share": results[0.8].share, "kl": {str(s): v for s, v in results[0.8].kl.items()},
                     "heads": True, "samples": 2}
    assert set(entry["kl"]) == {"0.0", "0.25", "0.5", "1.0"}
    view = again.view()
    for r in (0.6, 0.8):
        assert view.floor_share("adaptive", r) == results[r].share
        assert view.floor_share("adaptive", r + 1e-12) == results[r].share  # refined_entry's matching rule
    assert view.floor_share("adaptive", 0.7) is None and view.floor_share("adaptive-joint", 0.8) is None
    # tuning again replaces that ratio's entry and keeps the others
    store_floor_shares(again, "adaptive", tune_floor_shares(model, samples, again, [0.8], grid=(0.5,)))
    assert again.data["floor_shares"]["adaptive"]["0.8"]["share"] == 0.5
    assert again.data["floor_shares"]["adaptive"]["0.6"] == json.loads(path.read_text())["floor_shares"][
        "adaptive"]["0.6"]


def test_ties_go_to_the_share_closest_to_the_default():
    assert choose_share({0.0: 0.2, 0.25: 0.1, 1.0: 0.3}) == 0.25
    assert choose_share({0.0: 0.1, 0.5: 0.1, 1.0: 0.1}) == 0.5
    assert choose_share({0.25: 0.1, 0.75: 0.1, 1.0: 0.2}) == 0.25
    assert choose_share({1.0: 0.1, 0.0: 0.1}) == 0.0


@pytest.mark.parametrize("grid,match", [((1.5,), r"\[0, 1\]"), (("a",), "numbers"), ((0.5, 0.5), "twice"),
                                        ((), "at least one"), ((float("nan"),), r"\[0, 1\]")])
def test_bad_grids_are_refused(grid, match):
    with pytest.raises(FloorError, match=match):
        check_grid(grid)
    assert parse_grid(" 1, 0,0.5 ") == (0.0, 0.5, 1.0)


def test_tuning_refuses_what_it_cannot_measure(tiny_models):
    model = tiny_models("llama", "sdpa")
    items = _items(1)
    samples = prepare_samples(model, items, _scorer("snapkv"), PROT)
    view = SensitivityView(PROBES, np.ones((4, 3)))
    with pytest.raises(FloorError, match="adaptive"):
        tune_floor_shares(model, samples, view, [0.7], strategy="optimal")
    with pytest.raises(FloorError, match="protected window"):
        tune_floor_shares(model, samples, view, [0.7], protection=Protection(4, 16))
    with pytest.raises(AllocatorError, match="refined"):
        tune_floor_shares(model, samples, view, [0.7], strategy="adaptive-joint")


# ----------------------------------------------------------------------------------------------- allocator
def _scores(seed: int, n_layers: int = 6, n: int = 400) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.gamma(0.5, size=(1, 2, n)) ** (1 + i % 3) for i in range(n_layers)]


@pytest.mark.parametrize("strategy", ["adaptive", "adaptive-joint"])
def test_allocators_use_the_stored_share_and_an_explicit_one_wins(strategy):
    rng = np.random.default_rng(0)
    curves = np.sort(rng.uniform(0, 1, size=(6, 3)), axis=1)
    refined = {0.8: [0.06, 0.48, 0.12, 0.06, 0.24, 0.24]}
    plain = SensitivityView(PROBES, curves, refined=refined)
    tuned = SensitivityView(PROBES, curves, refined=refined, floor_shares={strategy: {"0.8": {"share": 1.0}}})
    scores = _scores(1)
    kw = dict(scores=scores, min_tokens=6)
    stored = allocate(strategy, 6, 400, 0.8, sensitivity=tuned, **kw)
    assert stored == allocate(strategy, 6, 400, 0.8, sensitivity=plain, floor_share=1.0, **kw)
    assert stored != allocate(strategy, 6, 400, 0.8, sensitivity=plain, **kw)  # the default (0.5) differs
    assert allocate(strategy, 6, 400, 0.8, sensitivity=plain, **kw) == \
        allocate(strategy, 6, 400, 0.8, sensitivity=plain, floor_share=0.5, **kw)
    for explicit in (0.0, 0.5):
        assert allocate(strategy, 6, 400, 0.8, sensitivity=tuned, floor_share=explicit, **kw) == \
            allocate(strategy, 6, 400, 0.8, sensitivity=plain, floor_share=explicit, **kw)
    # through the one budget builder, options included
    spec = BudgetSpec(0.8, strategy, tuned, min_tokens=6)
    assert spec.for_context(6, 400, scores) == stored
    assert BudgetSpec(0.8, strategy, tuned, min_tokens=6, options={"floor_share": 0.0}).for_context(6, 400, scores) \
        == allocate(strategy, 6, 400, 0.8, sensitivity=plain, floor_share=0.0, **kw)
    if strategy == "adaptive":  # another ratio, or the other allocator's share: the default
        other = SensitivityView(PROBES, curves, floor_shares={"adaptive-joint": {0.8: 1.0}, "adaptive": {0.7: 1.0}})
        assert allocate("adaptive", 6, 400, 0.8, sensitivity=other, **kw) == \
            allocate("adaptive", 6, 400, 0.8, sensitivity=plain, **kw)


@pytest.mark.parametrize("bad,match", [
    ({"adaptive": {"0.8": 1.5}}, r"\[0, 1\]"), ({"adaptive": {"1.0": 0.5}}, "outside"),
    ({"adaptive": {"0.8": {"kl": {}}}}, "number"), ({"adaptive": 0.5}, "map"),
])
def test_malformed_floor_shares_are_refused(bad, match):
    with pytest.raises(SensitivityError, match=match):
        SensitivityView(PROBES, np.ones((6, 3)), floor_shares=bad)


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def calibrated(tmp_path, monkeypatch):
    """A profile calibrated on the tiny model (2 samples), and the model every command then loads."""
    import depthkv.cli as cli
    from tests.test_cli import tiny_lm

    lm = tiny_lm()
    monkeypatch.setattr(cli, "load", lambda args: lm)
    prof = tmp_path / "p.json"
    assert main(["calibrate", "--samples", "2", "--data", "needle", "--context-tokens", "300", "--probe-ratios",
                 "0.5,1", "--no-proxy", "--permutations", "50", "--n-sink", "2", "--n-recent", "4",
                 "--out", str(prof)]) == 0
    return prof


def test_refine_cli_tunes_and_stores_the_floor_share(calibrated, capsys):
    prof = calibrated
    capsys.readouterr()
    assert main(["refine", "--profile", str(prof), "--ratios", "0.7", "--rounds", "1",
                 "--floor-shares", "0,0.5,1"]) == 0
    out = capsys.readouterr().out
    assert "joint KL" in out and "chosen" in out and "floor shares of adaptive" in out
    data = json.loads(prof.read_text())
    entry = data["floor_shares"]["adaptive"]["0.7"]
    assert set(entry["kl"]) == {"0.0", "0.5", "1.0"} and entry["heads"] is True and entry["samples"] == 2
    assert entry["kl"][str(float(entry["share"]))] == min(entry["kl"].values())
    assert list(data["refined"]) == ["0.7"]
    refined = data["refined"]
    # tuning alone, for the refined floors, leaves the refined budgets as they are
    assert main(["refine", "--profile", str(prof), "--ratios", "0.7", "--floor-only",
                 "--floor-strategy", "adaptive-joint", "--floor-shares", "0.5,1"]) == 0
    data = json.loads(prof.read_text())
    assert data["refined"] == refined and data["floor_shares"]["adaptive"]["0.7"] == entry
    assert set(data["floor_shares"]["adaptive-joint"]["0.7"]["kl"]) == {"0.5", "1.0"}
    assert Profile.load(prof).view().floor_share("adaptive-joint", 0.7) in (0.5, 1.0)


@pytest.mark.parametrize("argv,match", [
    (["--floor-shares", "1.5"], r"--floor-shares: .*\[0, 1\]"),
    (["--floor-shares", "a"], "--floor-shares: .*numbers"),
    (["--floor-shares", "0.5,0.5"], "twice"),
    (["--floor-only"], "give --floor-shares"),
    (["--floor-only", "--floor-strategy", "adaptive-joint", "--floor-shares", "0.5"], "no refined budgets"),
])
def test_refine_cli_refuses_bad_floor_settings_before_any_work(tmp_path, capsys, monkeypatch, argv, match):
    import re

    import depthkv.cli as cli

    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))
    data = {"schema_version": SCHEMA_VERSION, "kind": KIND, "model": {"name": "smollm2-135m", "n_layers": 30},
            "probe_ratios": [0.5, 1.0], "curves": {"kl": {"mean": [[0.1, 0.2]] * 30}},
            "context_lens": [560, 300], "protection": {"n_sink": 4, "n_recent": 16}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    before = path.read_text()
    out = tmp_path / "out.json"
    rc = main(["refine", "--profile", str(path), "--ratios", "0.8", "--out", str(out), *argv])
    assert rc == 2 and path.read_text() == before and not out.exists()
    assert re.search(match, one_error_line(capsys.readouterr().err))


def test_the_agnostic_default_press_takes_the_profiles_share(tiny_models):
    """press(..., setting="agnostic", profile=P) with no strategy (the default: adaptive + per-head budgets) splits
    the budget with the floor share P stores for the ratio, not the fixed 0.5."""
    model = tiny_models("llama", "sdpa")
    items = _items(2)
    scorer = _scorer("kvzip")
    prof = _profile(model, items, scorer)
    prof.data["floor_shares"] = {"adaptive": {"0.8": {"share": 1.0}}}
    context, _ = items[0].split()
    opts = dict(n_sink=PROT.n_sink, n_recent=PROT.n_recent, **SCORER_OPTIONS.get("kvzip", {}))

    def budgets(**how):
        with press(model, "kvzip", **opts, **how) as p:
            comp = p.compress(context)
        return comp.budgets, [layer.keys.shape for layer in comp.cache.layers]

    default = budgets(ratio=0.8, profile=prof, setting="agnostic")
    view = prof.view()
    for share, same in ((1.0, True), (0.5, False)):
        spec = BudgetSpec(0.8, "adaptive", view, (), PROT.size, {"floor_share": share})
        assert (budgets(policy=spec.policy(4), head_budgets=True) == default) is same


def test_calibrate_tunes_the_floor_share_after_refining(tmp_path, monkeypatch, capsys):
    """calibrate --refine-ratios R --floor-shares G: one command gives the profile, the refined budgets and the
    floor share at R, all measured on the same calibration samples; --floor-shares alone is refused at once."""
    import depthkv.cli as cli
    from tests.test_cli import tiny_lm

    lm = tiny_lm()
    monkeypatch.setattr(cli, "load", lambda args: lm)
    prof = tmp_path / "p.json"
    calib = ["calibrate", "--samples", "2", "--data", "needle", "--context-tokens", "300", "--probe-ratios", "0.5,1",
             "--no-proxy", "--permutations", "50", "--n-sink", "2", "--n-recent", "4", "--out", str(prof)]
    assert main([*calib, "--refine-ratios", "0.7", "--floor-shares", "0.5,1"]) == 0
    data = json.loads(prof.read_text())
    entry = data["floor_shares"]["adaptive"]["0.7"]
    assert set(entry["kl"]) == {"0.5", "1.0"} and entry["samples"] == 2
    assert entry["kl"][str(float(entry["share"]))] == min(entry["kl"].values())
    assert list(data["refined"]) == ["0.7"] and data["config"]["floor_shares"] == [0.5, 1.0]
    assert data["timings"]["floor_shares_s"] > 0
    prof.unlink()
    capsys.readouterr()
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))
    assert main([*calib, "--floor-shares", "0.5,1"]) == 2 and not prof.exists()
    assert "give --refine-ratios too" in one_error_line(capsys.readouterr().err)
    assert main([*calib, "--refine-ratios", "0.7", "--floor-shares", "2"]) == 2 and not prof.exists()
    assert "--floor-shares" in one_error_line(capsys.readouterr().err)
