"""Transfer matrix (depthkv.eval.transfer): profile from family A, evaluated on family B, tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from depthkv.eval import EvalError, load_rows, run_eval
from depthkv.eval.transfer import build_transfer, collect, main, parse_folders
from tests.test_eval import config, fake_profile, lm, tokenizer  # noqa: F401  (fixtures)


def _profile(lm, path, sensitive: int, task: str):  # noqa: F811
    path = fake_profile(lm, path)
    prof = json.loads(path.read_text())
    mean = [[0.01, 0.02] for _ in range(4)]
    mean[sensitive] = [0.5, 0.9]
    prof["curves"]["kl"] = {"mean": mean, "lo": mean, "hi": mean}
    prof["data"]["tasks"] = [task]
    path.write_text(json.dumps(prof))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, lm):  # noqa: F811
    """Folder 'a' has uniform + optimal (profile: layer 1 sensitive), folder 'b' optimal only (layer 3)."""
    tmp = tmp_path_factory.mktemp("transfer")
    out = {}
    for name, sensitive, methods in (("a", 1, ("uniform", "optimal")), ("b", 3, ("optimal",))):
        prof = _profile(lm, tmp / f"{name}.json", sensitive, "needle" if name == "a" else "vartrack")
        cfg = config(tmp, lm, tasks=("needle",), methods=methods, scorers=("snapkv",), ratios=(0.6,),
                     settings=("aware",), profile=str(prof), samples=3)
        run_eval(lm, cfg, tmp / name, progress=False)
        out[name] = tmp / name
    return out


def test_cells_pair_each_profile_with_the_shared_uniform(runs, tmp_path):
    res = build_transfer({"needleA": runs["a"], "varB": runs["b"]}, tmp_path / "t")
    cells = res["cells"]
    assert [c["calibration"] for c in cells] == ["needleA", "varB"]
    uni = {r["sample_id"]: r["score"] for r in load_rows(runs["a"]) if r["method"] == "uniform"}
    for c, folder in zip(cells, (runs["a"], runs["b"])):
        opt = {r["sample_id"]: r["score"] for r in load_rows(folder) if r["method"] == "optimal"}
        assert c["n"] == 3 and set(opt) == set(uni)
        assert c["diff"] == pytest.approx(np.mean([opt[s] - uni[s] for s in opt]))
        assert c["score"] == pytest.approx(np.mean(list(opt.values())))
        assert c["uniform"] == pytest.approx(np.mean(list(uni.values())))
        assert c["diff_low"] <= c["diff"] <= c["diff_high"]
    assert res["profiles"]["needleA"]["top_layers"][0] == 1 and res["profiles"]["varB"]["top_layers"][0] == 3
    optb = {r["sample_id"]: r["score"] for r in load_rows(runs["b"]) if r["method"] == "optimal"}
    opta = {r["sample_id"]: r["score"] for r in load_rows(runs["a"]) if r["method"] == "optimal"}
    (vs,) = res["versus_reference"]
    assert (vs["calibration"], vs["reference"], vs["n"]) == ("varB", "needleA", 3)
    assert vs["diff"] == pytest.approx(np.mean([optb[s] - opta[s] for s in opta]))
    assert vs["wins"] + vs["ties"] + vs["losses"] == 3
    for name in ("transfer.json", "transfer.csv", "transfer.md", "transfer_matrix.png", "profiles_sensitivity.png", "rows.csv"):
        assert (tmp_path / "t" / name).stat().st_size > 0
    again = build_transfer({"needleA": runs["a"], "varB": runs["b"]}, tmp_path / "t2")
    assert json.dumps(again, sort_keys=True) == json.dumps(res, sort_keys=True)  # deterministic


def test_labels_default_to_the_calibration_family_and_must_be_unique(runs):
    assert list(parse_folders([str(runs["a"]), str(runs["b"])])) == ["needle", "vartrack"]
    with pytest.raises(EvalError, match="twice"):
        parse_folders([f"x={runs['a']}", f"x={runs['b']}"])


def test_uniform_rows_that_disagree_or_are_missing_are_errors(runs, tmp_path):
    with pytest.raises(EvalError, match="no folder holds uniform"):
        collect({"b": runs["b"]})
    import shutil

    copy = tmp_path / "a2"
    shutil.copytree(runs["a"], copy)
    rows = load_rows(copy)
    for r in rows:
        if r["method"] == "uniform":
            r["score"] = 1.0 - r["score"]
            break
    (copy / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalError, match="differ between folders"):
        collect({"a": runs["a"], "a2": copy})


def test_command_line(runs, tmp_path, capsys):
    assert main([f"A={runs['a']}", f"B={runs['b']}", "--out", str(tmp_path / "m")]) == 0
    assert "calibrated on \\ evaluated on" in capsys.readouterr().out
    assert main([f"B={runs['b']}", "--out", str(tmp_path / "m2")]) == 2


def test_profile_summary_splits_a_mixed_calibration_by_family(lm, tmp_path):  # noqa: F811
    from depthkv.eval.transfer import profile_summary

    path = _profile(lm, tmp_path / "mix.json", 1, "needle")
    prof = json.loads(path.read_text())
    kl = np.zeros((4, 4, 2))
    kl[:2, 2] = 1.0  # the two needle samples: layer 2; the two code samples: layer 3
    kl[2:, 3] = 1.0
    prof["samples"] = {"kl": kl.tolist()}
    prof["data"]["sample_ids"] = ["needle/calib/s0/0", "needle/calib/s0/1", "code/calib/s0/0", "code/calib/s0/1"]
    path.write_text(json.dumps(prof))
    s = profile_summary(path, [0.5], 100, top=2)
    assert s["top_layers"][0] == 1 and set(s["optimal_budgets"]) == {"0.5"}
    assert sum(s["optimal_budgets"]["0.5"]) == 200
    assert s["by_family"]["needle"]["top_layers"][0] == 2 and s["by_family"]["code"]["top_layers"][0] == 3
    assert s["by_family"]["code"]["n"] == 2
