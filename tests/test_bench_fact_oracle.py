"""benchmarks/fact_oracle.py: bad input is one error line, exit code 2, nothing written; the oracle ranks the
facts first and keeps the rest in order; an end-to-end run on a tiny random Llama (no downloads)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from tests.conftest import one_error_line, tiny_kvzip_profile


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("fact_oracle")


@pytest.mark.parametrize("bad, words", [
    (["--task", "docqa"], "--task must be one of needle, multikey, vartrack"),
    (["--ratio", "1.0"], "ratio must lie in [0, 1)"),
    (["--ratio", "0"], "--ratio 0 prunes nothing"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--splits", ","], "give at least one split"),
    (["--splits", "uniform,nosuch+heads"], "unknown allocator 'nosuch'"),
    (["--splits", "adaptive+heads"], "adaptive+heads needs --profile"),
    (["--probe-question", " "], "--probe-question must not be empty"),
    (["--splits", "optimal", "--profile", "/nonexistent/profile.json"], "--profile: no such file"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(bench, tmp_path, capsys, bad, words):
    out = tmp_path / "oracle.json"
    assert bench.main([*bad, "--out", str(out)]) == 2
    assert words in one_error_line(capsys.readouterr().err, start="fact_oracle.py: error:")
    assert list(tmp_path.iterdir()) == []


def test_oracle_scores_rank_facts_first_and_keep_the_rest_in_order(bench):
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(1, 2, 30, generator=gen) * 5 - 2 for _ in range(3)]
    fact = torch.zeros(30, dtype=torch.bool)
    fact[[3, 4, 17, 29]] = True
    for before, after in zip(scores, bench.oracle_scores(scores, fact), strict=True):
        assert after.shape == before.shape
        for h in range(2):
            top = set(after[0, h].topk(int(fact.sum())).indices.tolist())
            assert top == set(fact.nonzero()[:, 0].tolist())  # every fact outranks every other token
            rest = ~fact
            assert torch.equal(after[0, h][rest].argsort(), before[0, h][rest].argsort())
            assert torch.equal(after[0, h][fact].argsort(), before[0, h][fact].argsort())


def test_end_to_end_on_a_tiny_model(bench, tiny_llama_dir, tmp_path, capsys, single_thread):
    out = tmp_path / "out" / "oracle.json"
    out.parent.mkdir()
    profile = tiny_kvzip_profile(tiny_llama_dir, tmp_path / "profile.json")
    argv = ["--model", str(tiny_llama_dir), "--task", "vartrack", "--samples", "2", "--context-tokens", "400",
            "--splits", "uniform,adaptive+heads", "--profile", str(profile), "--ratio", "0.6", "--n-boot", "50",
            "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| adaptive+heads | 2 |" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["kind"] == "depthkv-fact-oracle" and data["meta"]["command"].endswith(str(out))
    assert [r["split"] for r in data["rows"]] == ["uniform", "adaptive+heads"]
    for sample in data["meta"]["samples"]:
        assert sample["id"].startswith("vartrack/calib/") and 0 < sample["fact_tokens"] < sample["tokens"]
        for split in ("uniform", "adaptive+heads"):
            assert sample[split]["scorer"] >= -1e-6 and sample[split]["oracle"] >= -1e-6
    for r in data["rows"]:
        d = r["oracle_minus_scorer"]
        assert r["n"] == 2 and d["low"] <= d["mean"] <= d["high"]
        assert d["mean"] == pytest.approx(r["kl_oracle"] - r["kl_scorer"])


def test_probe_question_ranks_by_its_own_prefill(bench, tiny_llama_dir, tmp_path, capsys, single_thread):
    """A probe question gives a third ranking, measured under the same budgets and reported against the scorer."""
    out = tmp_path / "probe.json"
    argv = ["--model", str(tiny_llama_dir), "--task", "needle", "--samples", "2", "--context-tokens", "300",
            "--splits", "uniform+heads", "--ratio", "0.7", "--n-boot", "50",
            "--probe-question", "Which names and numbers does the text above state?", "--out", str(out)]
    assert bench.main(argv) == 0
    assert "| uniform+heads, probe question | 2 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    per_sample = [s["uniform+heads"] for s in data["meta"]["samples"]]
    assert all(set(p) == {"scorer", "oracle", "probe"} for p in per_sample)
    assert row["kl_probe"] == pytest.approx(sum(p["probe"] for p in per_sample) / 2)
    d = row["probe_minus_scorer"]
    assert d["mean"] == pytest.approx(row["kl_probe"] - row["kl_scorer"]) and d["low"] <= d["mean"] <= d["high"]


def test_probe_scores_cover_the_context_only(bench, tiny_llama_dir, single_thread):
    from depthkv.engine import Protection
    from depthkv.eval.runner import prompt_ids
    from depthkv.models import load_model
    from depthkv.tasks.prompt import token_counter
    from depthkv.tasks.registry import generate

    lm = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    (sample,) = generate("needle", 1, 0, context_tokens=200, count_tokens=token_counter(lm.tokenizer), split="calib")
    ctx = prompt_ids(lm.tokenizer, sample, "agnostic")[0]
    n = ctx.shape[1]
    scores = bench.probe_scores(lm.model, lm.tokenizer, sample, "What does it say?", ctx, Protection())
    assert len(scores) == lm.model.config.num_hidden_layers
    assert all(s.shape[-1] == n and torch.isfinite(s).all() for s in scores)
