"""Joint refinement of the budgets (depthkv refine) and the optimal-joint allocator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from depthkv.allocation import (
    AllocatorError,
    BudgetError,
    Budgets,
    SensitivityView,
    allocate,
    budgets_from_shares,
    global_budget,
)
from depthkv.allocation.profile import KIND, SCHEMA_VERSION, Profile
from depthkv.calibration.ablation import CalibrationItem, measure_sensitivity, shared_cache
from depthkv.calibration.refine import (
    RefineConfig,
    check_ratios,
    joint_kl,
    prepare_samples,
    propose_moves,
    refine_profile,
    refine_ratio,
)
from depthkv.cli import main
from depthkv.engine import Protection
from depthkv.engine.runner import forward_with_cache
from depthkv.engine.session import Session
from depthkv.models.identity import model_identity
from depthkv.scorers import get_scorer

PROT = Protection(n_sink=2, n_recent=4)
FLOOR = PROT.size
PROBES = (0.5, 0.8, 1.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest, and far faster than two threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _items(n: int = 3, lengths=(80, 74, 86), seed: int = 0) -> list[CalibrationItem]:
    gen = torch.Generator().manual_seed(seed)
    return [CalibrationItem(torch.randint(0, 256, (1, lengths[i % len(lengths)]), generator=gen),
                            torch.randint(0, 256, (1, 5), generator=gen), f"s{i}") for i in range(n)]


def _evicted_kl(model, item: CalibrationItem, budgets: Budgets) -> float:
    """Reference: physically prune EVERY layer to ``budgets``, run the whole model on the forced tokens."""
    from depthkv.engine.runner import score_prefill

    prefix = item.prompt_ids[:, :-1]
    forced = torch.cat([item.prompt_ids[:, -1:], item.answer_ids[:, :-1]], 1)
    sp = score_prefill(model, prefix, [get_scorer("snapkv")], PROT)
    with Session(model):
        logits = forward_with_cache(model, forced, sp.prune("snapkv", budgets), logits_to_keep=forced.shape[1])
    ref = forward_with_cache(model, forced, shared_cache(sp.cache), logits_to_keep=forced.shape[1])
    logp, ref_logp = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()


def _evicted_joint(model, items, shares, ratio) -> float:
    """Mean over items of the evicted KL at the budgets optimal-joint gives each item's context length."""
    kls = []
    for item in items:
        n = item.prompt_ids.shape[1] - 1
        kls.append(_evicted_kl(model, item, budgets_from_shares(shares, n, ratio, min_tokens=FLOOR)))
    return float(np.mean(kls))


# ----------------------------------------------------------------------------------------------- probes
@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_joint_probes_equal_physical_eviction_of_every_layer(tiny_models, family, attn):
    """Masked batched rows (every layer at its own budget) give the KL of evicting all layers for real."""
    model = tiny_models(family, attn)
    item = _items(1)[0]
    n = item.prompt_ids.shape[1] - 1
    sample = prepare_samples(model, [item], get_scorer("snapkv"), PROT)[0]
    rng = np.random.default_rng(0)
    rows = rng.integers(FLOOR, n + 1, size=(5, 4))
    rows[1] = n  # full cache: zero
    rows[2, 0] = n  # first layer whole: the forward starts higher
    rows[4] = rows[3]  # duplicate row, computed once
    got = joint_kl(model, sample, rows, batch=3)
    assert got[1] == 0.0 and got[3] == got[4]
    for r in (0, 2, 3):
        want = _evicted_kl(model, item, Budgets(tuple(int(x) for x in rows[r]), n))
        assert got[r] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert got.max() > 1e-4  # the comparison is not between zeros


# ----------------------------------------------------------------------------------------------- moves
@st.composite
def move_cases(draw):
    n_layers = draw(st.integers(1, 12))
    floor = draw(st.integers(1, 20))
    cap = floor + draw(st.integers(0, 60))
    tokens = draw(st.lists(st.integers(floor, cap), min_size=n_layers, max_size=n_layers))
    effect = st.one_of(st.floats(-1.0, 1.0, allow_nan=False), st.sampled_from([np.inf, -np.inf, np.nan, 0.0]))
    gain = draw(st.lists(effect, min_size=n_layers, max_size=n_layers))
    cost = draw(st.lists(effect, min_size=n_layers, max_size=n_layers))
    return tokens, gain, cost, draw(st.integers(1, 40)), floor, cap, draw(st.integers(1, 8))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(move_cases())
def test_moves_keep_total_floors_and_caps(case):
    tokens, gain, cost, delta, floor, cap, max_pairs = case
    pairs, cands = propose_moves(tokens, gain, cost, delta, floor, cap, max_pairs)
    t = np.asarray(tokens)
    assert len(pairs) <= max_pairs and bool(pairs) == bool(cands)
    layers = [x for d, r, _ in pairs for x in (d, r)]
    assert len(layers) == len(set(layers))  # a layer moves in at most one pair
    for d, r, a in pairs:
        assert 1 <= a <= delta and gain[r] > cost[d]  # only moves predicted to help
    benefit = [gain[r] - cost[d] for d, r, _ in pairs]
    assert benefit == sorted(benefit, reverse=True)  # prefixes hold the best moves
    for v in cands:
        assert int(v.sum()) == int(t.sum())
        assert np.all(v >= floor) and np.all(v <= cap)
        assert np.any(v != t)
    assert len({tuple(v) for v in cands}) == len(cands)
    if cands:
        assert np.count_nonzero(cands[0] != t) == 2 * len(pairs)  # the first candidate applies every pair
        assert np.count_nonzero(cands[-1] != t) == 2  # the last only the best one
    # no obvious move missed: the best receiver and the cheapest donor are paired when that helps
    room = [i for i in range(len(t)) if t[i] < cap and np.isfinite(gain[i])]
    slack = [i for i in range(len(t)) if t[i] > floor and np.isfinite(cost[i])]
    if room and slack:
        r = max(room, key=lambda i: (gain[i], -i))
        d = min(slack, key=lambda i: (cost[i], i))
        if r != d and gain[r] > cost[d]:
            assert pairs


def test_moves_reject_bad_input():
    with pytest.raises(ValueError, match="floor, cap"):
        propose_moves([5, 50], [0.1, 0.2], [0.0, 0.0], 3, 10, 60)
    with pytest.raises(ValueError, match="one length"):
        propose_moves([10, 20], [0.1], [0.0, 0.0], 3, 1, 60)


# ----------------------------------------------------------------------------------------------- search
def _view(model, items, invert: bool = False) -> SensitivityView:
    res = measure_sensitivity(model, items, get_scorer("snapkv"), PROBES, PROT)
    d = res.kl.mean(axis=0)
    return SensitivityView(PROBES, d.max() - d + 1e-3 if invert else d)


@pytest.mark.parametrize("invert", [False, True])
def test_refinement_is_never_worse_than_the_start(tiny_models, invert):
    """Measured by physical eviction, independently of the search: refined <= optimal start on the samples.

    With inverted curves the start deliberately starves the layers that matter, so the search must find a
    strictly better vector there (the test would catch a search that never moves).
    """
    model = tiny_models("llama", "sdpa")
    items = _items(3)
    view = _view(model, items, invert)
    samples = prepare_samples(model, items, get_scorer("snapkv"), PROT)
    ratio = 0.7
    res = refine_ratio(model, samples, view, ratio, RefineConfig(rounds=3), FLOOR)
    n_ref = res.reference_context
    assert n_ref == 79
    start = np.round(np.asarray(res.start_shares) * n_ref).astype(int)
    assert start.tolist() == list(allocate("optimal", 4, n_ref, ratio, sensitivity=view, min_tokens=FLOOR).tokens)
    tokens = np.round(np.asarray(res.shares) * n_ref).astype(int)
    assert int(tokens.sum()) == global_budget(4, n_ref, ratio)
    assert tokens.min() >= FLOOR and tokens.max() <= n_ref
    assert res.joint_kl_refined <= res.joint_kl_start
    before = _evicted_joint(model, items, res.start_shares, ratio)
    after = _evicted_joint(model, items, res.shares, ratio)
    assert before == pytest.approx(res.joint_kl_start, rel=1e-3)
    assert after == pytest.approx(res.joint_kl_refined, rel=1e-3)
    assert after <= before * (1 + 1e-4)
    if invert:
        assert res.accepted >= 1 and after < 0.9 * before
    assert len(res.history) == 3 and [h["delta"] for h in res.history] == sorted(
        (h["delta"] for h in res.history), reverse=True)


def test_ratios_are_checked_before_any_work():
    assert check_ratios(4, [80], [0.5, "0.8"], FLOOR) == (0.5, 0.8)
    with pytest.raises(BudgetError, match="listed twice"):
        check_ratios(4, [80], [0.5, 0.5], FLOOR)
    with pytest.raises(BudgetError, match="> 0"):
        check_ratios(4, [80], [0.0], FLOOR)
    with pytest.raises(BudgetError, match=r"\[0, 1\)"):
        check_ratios(4, [80], [1.0], FLOOR)
    with pytest.raises(BudgetError, match="30-token calibration sample"):
        check_ratios(4, [80, 30], [0.9], FLOOR)


# ----------------------------------------------------------------------------------------------- allocator
def _refined_view() -> SensitivityView:
    rng = np.random.default_rng(0)
    # per-layer kept shares, mean 1 - ratio
    shares = {0.8: [0.06, 0.48, 0.12, 0.06, 0.24, 0.24], 0.9: [0.02, 0.3, 0.05, 0.02, 0.1, 0.11]}
    return SensitivityView(PROBES, rng.random((6, 3)), refined=shares)


@pytest.mark.parametrize("n", [20, 100, 333, 1000, 4096, 131_072])
@pytest.mark.parametrize("ratio", [0.8, 0.9])
def test_optimal_joint_exact_totals_floors_and_caps(n, ratio):
    view = _refined_view()
    for protected, floor in (((), 1), ((), 20), ((1,), 8)):
        try:
            b = allocate("optimal-joint", 6, n, ratio, sensitivity=view, protected=protected, min_tokens=floor)
        except BudgetError:
            assert global_budget(6, n, ratio) - len(protected) * n < (6 - len(protected)) * min(floor, n)
            continue
        assert b.total == global_budget(6, n, ratio) and b.strategy == "optimal-joint"
        assert all(min(floor, n) <= t <= n for t in b.tokens)
        assert all(b.tokens[p] == n for p in protected)
    if n >= 1000:  # no binding floor: budgets follow the shares to within a token
        b = allocate("optimal-joint", 6, n, ratio, sensitivity=view)
        np.testing.assert_allclose(b.tokens, np.asarray(view.refined_shares(ratio, "t")) * n, atol=1.0)


def test_optimal_joint_reproduces_the_refined_vector_and_refuses_other_ratios():
    tokens = np.array([20, 41, 20, 90, 20, 49])
    n = 100
    view = SensitivityView(PROBES, np.ones((6, 3)), refined={0.6: tokens / n})
    assert global_budget(6, n, 0.6) == tokens.sum()
    assert allocate("optimal-joint", 6, n, 0.6, sensitivity=view, min_tokens=20).tokens == tuple(tokens)
    with pytest.raises(AllocatorError) as exc:
        allocate("optimal-joint", 6, n, 0.7, sensitivity=view)
    msg = str(exc.value)
    assert "ratio 0.7" in msg and "refined ratios: 0.6" in msg
    assert "depthkv refine" in msg and "--ratios 0.7" in msg
    with pytest.raises(AllocatorError, match="refined ratios: none"):
        allocate("optimal-joint", 6, n, 0.6, sensitivity=SensitivityView(PROBES, np.ones((6, 3))))
    with pytest.raises(AllocatorError, match="needs a sensitivity view"):
        allocate("optimal-joint", 6, n, 0.6)


@pytest.mark.parametrize("bad", [{0.8: [0.1, 0.2]}, {0.8: [0.0, 0.1, 0.1, 0.1, 0.1, 0.1]}, {1.0: [0.1] * 6}])
def test_malformed_refined_shares_are_refused(bad):
    from depthkv.allocation import SensitivityError

    with pytest.raises(SensitivityError, match="refined shares"):
        SensitivityView(PROBES, np.ones((6, 3)), refined=bad)


# ----------------------------------------------------------------------------------------------- profile
def _profile(model, items) -> Profile:
    res = measure_sensitivity(model, items, get_scorer("snapkv"), PROBES, PROT)
    curves = {"mean": res.kl.mean(0).tolist(), "lo": res.kl.min(0).tolist(), "hi": res.kl.max(0).tolist()}
    return Profile({"schema_version": SCHEMA_VERSION, "kind": KIND, "model": model_identity(model, "tiny"),
                    "scorer": {"name": "snapkv", "options": {}}, "protection": {"n_sink": 2, "n_recent": 4},
                    "probe_ratios": list(PROBES), "curves": {"kl": curves, "nll": curves},
                    "context_lens": res.context_lens, "timings": {"total_s": 1.0}})


def test_profile_round_trip_with_refined_vectors(tiny_models, tmp_path):
    model = tiny_models("llama", "sdpa")
    items = _items(2)
    prof = _profile(model, items)
    results = refine_profile(prof, model, items, [0.6, 0.8], RefineConfig(rounds=2), data={"sha256": "x"},
                             progress=False)
    assert set(results) == {0.6, 0.8}
    path = tmp_path / "p.json"
    prof.save(path)
    again = Profile.load(path, model_identity(model, "tiny"))
    assert again.data == json.loads(path.read_text())
    entry = again.data["refined"]["0.8"]
    assert entry["start"] == "optimal" and entry["samples"] == 2 and entry["rounds"] == 2
    assert entry["joint_kl_refined"] <= entry["joint_kl_start"] and entry["data"] == {"sha256": "x"}
    assert entry["config"]["rounds"] == 2 and again.data["timings"]["refine_s"] > 0
    assert entry["shares"] == list(results[0.8].shares)  # floats survive JSON exactly
    view = again.view()
    assert sorted(view.refined) == [0.6, 0.8]
    n = entry["reference_context"]
    b = allocate("optimal-joint", 4, n, 0.8, sensitivity=view, min_tokens=FLOOR)
    assert b.tokens == tuple(round(s * n) for s in entry["shares"])
    for other in (50, 500, 5000):
        assert allocate("optimal-joint", 4, other, 0.6, sensitivity=view, min_tokens=FLOOR).total == \
            global_budget(4, other, 0.6)
    # refining one ratio again replaces it and keeps the others
    refine_profile(again, model, items, [0.8], RefineConfig(rounds=1), progress=False)
    assert sorted(again.data["refined"]) == ["0.6", "0.8"] and again.data["refined"]["0.8"]["rounds"] == 1


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a test failure: these errors must come before any work."""
    import depthkv.cli as cli

    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))


def _write_profile(tmp_path, **extra) -> tuple:
    data = {"schema_version": SCHEMA_VERSION, "kind": KIND, "model": {"name": "smollm2-135m", "n_layers": 30},
            "probe_ratios": [0.5, 1.0], "curves": {"kl": {"mean": [[0.1, 0.2]] * 30}},
            "context_lens": [560, 300], "protection": {"n_sink": 4, "n_recent": 16}, **extra}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path, path.read_text()


@pytest.mark.parametrize("ratios,match", [
    ("0.8,abc", "--ratios"), ("1.2", r"\[0, 1\)"), ("0.8,0.8", "listed twice"),
    ("0.99", "300-token calibration"),
])
def test_refine_cli_rejects_bad_ratios_before_loading_the_model(tmp_path, capsys, no_model, ratios, match):
    path, before = _write_profile(tmp_path)
    rc = main(["refine", "--profile", str(path), "--ratios", ratios])
    assert rc == 2 and path.read_text() == before
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert re.search(match, err)


def test_refine_cli_needs_a_profile_with_its_calibration_config(tmp_path, capsys, no_model):
    rc = main(["refine", "--profile", str(tmp_path / "none.json"), "--ratios", "0.8"])
    assert rc == 2 and "none.json" in capsys.readouterr().err
    path, before = _write_profile(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["refine", "--profile", str(path), "--ratios", "0.8", "--samples", "0"])
    assert exc.value.code == 2 and "--samples" in capsys.readouterr().err
    rc = main(["refine", "--profile", str(path), "--ratios", "0.8"])
    assert rc == 2 and "does not record its calibration" in capsys.readouterr().err
    assert path.read_text() == before


def test_calibrate_refine_allocate_workflow(tmp_path, monkeypatch, capsys):
    """calibrate --refine-ratios, then refine another ratio on the re-created samples, then optimal-joint."""
    import depthkv.cli as cli
    from tests.test_cli import tiny_lm

    lm = tiny_lm()
    monkeypatch.setattr(cli, "load", lambda args: lm)
    prof = tmp_path / "p.json"
    calib = ["calibrate", "--samples", "2", "--data", "needle", "--context-tokens", "300", "--probe-ratios",
             "0.5,1", "--no-proxy", "--permutations", "50", "--n-sink", "2", "--n-recent", "4", "--out", str(prof)]
    assert main([*calib, "--refine-ratios", "0.6"]) == 0
    data = json.loads(prof.read_text())
    assert list(data["refined"]) == ["0.6"] and data["refined"]["0.6"]["samples"] == 2
    assert data["refined"]["0.6"]["data"]["sha256"] == data["data"]["sha256"]  # the same samples
    assert data["config"]["refine_ratios"] == [0.6] and data["timings"]["refine_s"] > 0
    capsys.readouterr()
    assert main(["refine", "--profile", str(prof), "--ratios", "0.7", "--rounds", "2"]) == 0
    assert "joint KL" in capsys.readouterr().out
    data = json.loads(prof.read_text())
    assert sorted(data["refined"]) == ["0.6", "0.7"] and data["refined"]["0.7"]["rounds"] == 2
    assert data["refined"]["0.7"]["data"]["sha256"] == data["data"]["sha256"]
    out = tmp_path / "b.json"
    args = ["allocate", "--profile", str(prof), "--strategy", "optimal-joint", "--context-tokens", "500",
            "--min-tokens", "6", "--out", str(out)]
    assert main([*args, "--ratio", "0.7"]) == 0
    b = json.loads(out.read_text())
    assert sum(b["tokens"]) == global_budget(4, 500, 0.7) and b["strategy"] == "optimal-joint"
    out.unlink()
    assert main([*args, "--ratio", "0.5"]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "refined ratios: 0.6, 0.7" in err and "depthkv refine" in err
    # another tokenizer (or data source) cannot re-create the recorded samples: refused, profile untouched
    before = prof.read_text()
    monkeypatch.setattr(lm.tokenizer, "chat_template", lm.tokenizer.chat_template.replace("assistant", "bot"))
    assert main(["refine", "--profile", str(prof), "--ratios", "0.8"]) == 2
    assert "differ from those it was calibrated on" in capsys.readouterr().err and prof.read_text() == before


def test_refinement_in_the_agnostic_setting_with_kvzip(tiny_models):
    """Query-agnostic items (context pruned, then question + answer forced through the pruned cache) with a
    context-pass scorer (KVzip): the joint KL the search measures equals physically evicting every layer and
    forcing question + answer, and the refined vector is never worse than the start."""
    from depthkv.engine.runner import score_prefill as depthkv_score_prefill
    from tests.conftest import SCORER_OPTIONS

    model = tiny_models("qwen2", "sdpa")
    gen = torch.Generator().manual_seed(3)
    items = [CalibrationItem(torch.randint(0, 256, (1, n), generator=gen), torch.randint(0, 256, (1, 4), generator=gen),
                             f"a{i}", question_ids=torch.randint(0, 256, (1, 6), generator=gen))
             for i, n in enumerate((70, 64, 76))]
    scorer = get_scorer("kvzip", **SCORER_OPTIONS["kvzip"])
    view = SensitivityView(PROBES, measure_sensitivity(model, items, scorer, PROBES, PROT).kl.mean(axis=0))
    samples = prepare_samples(model, items, scorer, PROT)
    ratio = 0.7
    res = refine_ratio(model, samples, view, ratio, RefineConfig(rounds=2), FLOOR)
    assert res.joint_kl_refined <= res.joint_kl_start

    def evicted(shares) -> float:
        kls = []
        for item in items:
            prefix, forced = item.split()
            budgets = budgets_from_shares(shares, prefix.shape[1], ratio, min_tokens=FLOOR)
            assert budgets.total == global_budget(4, prefix.shape[1], ratio)
            sp = depthkv_score_prefill(model, prefix, [scorer], PROT)
            with Session(model):
                logits = forward_with_cache(model, forced, sp.prune("kvzip", budgets), logits_to_keep=4)
            ref = forward_with_cache(model, forced, shared_cache(sp.cache), logits_to_keep=4)
            logp, ref_logp = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
            kls.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item())
        return float(np.mean(kls))

    before, after = evicted(res.start_shares), evicted(res.shares)
    assert before == pytest.approx(res.joint_kl_start, rel=1e-3)
    assert after == pytest.approx(res.joint_kl_refined, rel=1e-3)
    assert after <= before * (1 + 1e-4)
