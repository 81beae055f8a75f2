"""benchmarks/allocation_cost.py: a tiny run writes its table and JSON, a rerun against it finds the same
budgets; bad input is one error line, exit code 2, nothing written."""

from __future__ import annotations

import importlib
import json

import pytest

from tests.conftest import one_error_line


@pytest.fixture()
def bench():
    return importlib.import_module("allocation_cost")


def test_small_run_and_baseline(bench, tmp_path, capsys):
    first, second = tmp_path / "before.json", tmp_path / "after.json"
    args = ["--shapes", "3x2,2x1", "--lengths", "64,96", "--repeats", "1", "--ratio", "0.5"]
    assert bench.main([*args, "--out", str(first)]) == 0
    rows = json.loads(first.read_text())["rows"]
    assert [(r["shape"], r["n"], r["strategy"]) for r in rows] == [
        (s, n, k) for s in ("3x2", "2x1") for n in (64, 96) for k in bench.STRATEGIES]
    assert all(r["ms"] > 0 and len(r["budgets_sha"]) == 12 for r in rows)
    assert len({r["budgets_sha"] for r in rows if r["strategy"] == "global"}) == 4  # one per input
    assert bench.main([*args, "--baseline", str(first), "--out", str(second)]) == 0
    after = json.loads(second.read_text())
    assert after["meta"]["baseline"] == str(first)
    assert all(r["same_budgets"] and r["ms_before"] > 0 for r in after["rows"])
    assert "same budgets" in capsys.readouterr().out


def test_budgets_of_a_run_are_those_of_the_allocator(bench):
    """The hashed decision is the allocator's: global's budgets sum to the exact global total."""
    import torch

    from depthkv.allocation import BudgetSpec, global_budget

    scores = bench.make_scores(4, 2, 80, "cpu", torch.float32)
    assert all(torch.isinf(s[..., :4]).all() and torch.isinf(s[..., -16:]).all() for s in scores)
    spec_of = {"global": BudgetSpec(0.6, "global", min_tokens=20)}
    tokens = bench.one_call("global", spec_of, 4, 80, scores)
    assert sum(tokens) == global_budget(4, 80, 0.6)
    heads = bench.one_call("global+heads", spec_of, 4, 80, scores)
    assert [sum(h[0]) for h in heads] == [2 * t for t in tokens]


@pytest.mark.parametrize("bad, words", [
    (["--shapes", "3y2"], "LAYERSxKV_HEADS"),
    (["--lengths", "0"], "positive"),
    (["--strategies", "global,foo"], "--strategies"),
    (["--ratio", "1.0"], "--ratio"),
    (["--repeats", "0"], "--repeats"),
    (["--baseline", "/nonexistent/base.json"], "--baseline"),
    (["--device", "nodevice"], "--device"),
])
def test_bad_input_is_one_error_line(bench, tmp_path, capsys, bad, words):
    out = tmp_path / "out.json"
    assert bench.main([*bad, "--out", str(out)]) == 2
    assert words in one_error_line(capsys.readouterr().err, start="allocation_cost: ")
    assert not out.exists()
