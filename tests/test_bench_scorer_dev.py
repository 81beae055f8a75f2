"""benchmarks/scorer_dev.py: bad input is one error line, exit code 2, nothing written; variants parse into a
scorer and its options; an end-to-end run on a tiny random Llama (no downloads)."""

from __future__ import annotations

import importlib
import json

import pytest

from tests.conftest import one_error_line, tiny_kvzip_profile


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("scorer_dev")


def test_variants_parse_into_a_scorer_and_its_options(bench):
    assert bench.parse_variant("kvzip") == ("kvzip", {})
    assert bench.parse_variant("kvzip_v:self_window=1,self_weight=0.3,normalise=chunk") == (
        "kvzip_v", {"self_window": 1, "self_weight": 0.3, "normalise": "chunk"})


@pytest.mark.parametrize("bad, words", [
    (["--variant", "nosuch"], "unknown scorer 'nosuch'"),
    (["--variant", "kvzip:self_window"], "options are KEY=VALUE"),
    (["--variant", "kvzip:self_window=-1"], "self_window"),
    (["--variant", "kvzip:nope=1"], "nope"),
    (["--variant", "snapkv"], "question-independent (context-pass) scorers only"),
    (["--variant", "kvzip", "--variant", "kvzip"], "listed twice"),
    (["--tasks", "nosuch"], "'nosuch' is not a generated task"),
    (["--ratios", "1.0"], "ratio must lie in [0, 1)"),
    (["--ratios", "0"], "0 prunes nothing"),
    (["--splits", "nosuch+heads"], "unknown allocator 'nosuch'"),
    (["--splits", "adaptive+heads"], "adaptive+heads needs --profile"),
    (["--splits", "optimal", "--profile", "/nonexistent/profile.json"], "--profile: no such file"),
    (["--samples", "0", "--splits", "uniform"], "give at least one sample"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(bench, tmp_path, capsys, bad, words):
    out = tmp_path / "dev.json"
    assert bench.main([*bad, "--out", str(out)]) == 2
    assert words in one_error_line(capsys.readouterr().err, start="scorer_dev.py: error:")
    assert list(tmp_path.iterdir()) == []


def test_end_to_end_on_a_tiny_model(bench, tiny_llama_dir, tmp_path, capsys, single_thread):
    out = tmp_path / "dev.json"
    profile = tiny_kvzip_profile(tiny_llama_dir, tmp_path / "profile.json")
    argv = ["--model", str(tiny_llama_dir), "--tasks", "needle,vartrack", "--samples", "2", "--context-tokens",
            "300", "--splits", "uniform+heads,adaptive+heads", "--profile", str(profile), "--ratios", "0.6",
            "--variant", "kvzip", "--variant", "kvzip:self_window=1", "--variant", "kvzip_vc", "--n-boot", "50",
            "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| needle | adaptive+heads | 0.6 | 2 |" in printed and "| sum | uniform+heads | 0.6 |" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["kind"] == "depthkv-scorer-dev" and data["meta"]["command"].endswith(str(out))
    assert len(data["rows"]) == 4 and len(data["meta"]["samples"]) == 4
    labels = ["kvzip", "kvzip:self_window=1", "kvzip_vc"]
    for r in data["rows"]:
        assert list(r["mean"]) == labels and list(r["diff_vs_first"]) == labels[1:]
        per = [s[f"{r['split']}@0.6"] for s in data["meta"]["samples"] if s["task"] == r["task"]]
        for lb in labels:
            assert r["mean"][lb] == pytest.approx(sum(p[lb] for p in per) / 2) and r["mean"][lb] >= -1e-6
        d = r["diff_vs_first"]["kvzip_vc"]
        assert d["mean"] == pytest.approx(r["mean"]["kvzip_vc"] - r["mean"]["kvzip"]) and d["low"] <= d["mean"] <= d["high"]


def test_a_run_stopped_mid_task_keeps_the_samples_it_finished(bench, tiny_llama_dir, tmp_path, monkeypatch,
                                                             single_thread):
    """The results file is written after every sample: a run cut short (a device time limit) keeps them."""
    import depthkv.calibration.refine as refine

    out = tmp_path / "dev.json"
    real, calls = refine.masked_kl, []

    def stop_on_the_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(refine, "masked_kl", stop_on_the_third)
    argv = ["--model", str(tiny_llama_dir), "--tasks", "needle", "--samples", "3", "--context-tokens", "300",
            "--splits", "uniform", "--ratios", "0.6", "--variant", "kvzip", "--variant", "kvzip_v",
            "--n-boot", "20", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    data = json.loads(out.read_text())
    assert len(data["meta"]["samples"]) == 2 and [r["n"] for r in data["rows"]] == [2]
