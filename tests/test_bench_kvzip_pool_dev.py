"""benchmarks/kvzip_pool_dev.py: bad input is one error line, exit code 2, nothing written; the summary's
paired differences; an end-to-end run on a tiny random Llama saved to a folder (no downloads)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from tests.conftest import one_error_line, tiny_kvzip_profile


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("kvzip_pool_dev")


@pytest.mark.parametrize("bad, words", [
    (["--normalise", "context,softmax"], "normalise must be one of"),
    (["--normalise", "chunk"], "--normalise must include context"),
    (["--normalise", "context,context"], "listed twice"),
    (["--normalise", ","], "at least one normalisation"),
    (["--kernels", "3,5"], "--kernels must include 1"),
    (["--kernels", "1,4"], "odd integer kernel"),
    (["--device", "tpu"], "--device: unknown device"),
    (["--ratios", "1.0"], "ratio must lie in [0, 1)"),
    (["--replay-chunk", "0"], "replay_chunk >= 1"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(bench, tmp_path, capsys, bad, words):
    out = tmp_path / "dev.json"
    assert bench.main([*bad, "--out", str(out)]) == 2
    assert words in one_error_line(capsys.readouterr().err, start="kvzip_pool_dev.py: error:")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_variants_and_paired_differences(bench):
    """Labels are normalisation-major; every variant is compared with ctx/k1 on the same samples."""
    cfg = bench.DevConfig(tasks=("needle", "vartrack"), ratios=(0.8,), kernels=(1, 3), normalise=("context", "chunk"),
                          n_boot=200)
    assert [bench.variant_label(m, k) for m, k in cfg.variants] == ["ctx/k1", "ctx/k3", "chunk/k1", "chunk/k3"]
    scores = {  # per sample: ctx/k1, ctx/k3, chunk/k1, chunk/k3
        ("needle", "a"): (1.0, 0.0, 1.0, 1.0), ("needle", "b"): (0.0, 0.0, 1.0, 0.0),
        ("vartrack", "c"): (0.5, 0.5, 1.0, 0.5), ("vartrack", "d"): (0.5, 0.0, 0.5, 0.5),
    }
    labels = ["ctx/k1", "ctx/k3", "chunk/k1", "chunk/k3"]
    records = [{"task": t, "sample_id": sid, "full": 1.0,
                "cells": [{"ratio": 0.8, "variant": v, "score": s} for v, s in zip(labels, row, strict=True)]}
               for (t, sid), row in scores.items()]
    rows = bench.summarise(records, cfg)
    assert [(r["task"], r["n"]) for r in rows] == [("needle", 2), ("vartrack", 2), ("all", 4)]
    everything = rows[-1]
    assert everything["mean"] == {"ctx/k1": 0.5, "ctx/k3": 0.125, "chunk/k1": 0.875, "chunk/k3": 0.5}
    assert set(everything["diff_vs_baseline"]) == {"ctx/k3", "chunk/k1", "chunk/k3"}
    d = everything["diff_vs_baseline"]["chunk/k1"]
    assert d["mean"] == pytest.approx(0.375) and d["low"] <= d["mean"] <= d["high"]
    assert rows[0]["diff_vs_baseline"]["ctx/k3"]["mean"] == pytest.approx(-0.5)
    text = bench.table(rows, cfg)
    head = text.splitlines()[0]
    assert "chunk/k3 - ctx/k1 [95% CI]" in head and "ctx/k1 - ctx/k1" not in head
    assert len({len(line) for line in text.splitlines()}) == 1  # columns line up


@pytest.mark.parametrize("replay_chunk", [2048, 64])
def test_end_to_end_on_a_tiny_model(bench, tiny_llama_dir, tmp_path, capsys, single_thread, replay_chunk):
    """One prefill + replay per normalisation: on a one-chunk context (2048) the two normalisations see the
    same keys and must agree exactly; replayed in 64-token chunks (~160-token context) they must not."""
    out = tmp_path / "dev.json"
    profile = tiny_kvzip_profile(tiny_llama_dir, tmp_path / "profile.json")
    argv = ["--model", str(tiny_llama_dir), "--profile", str(profile), "--tasks", "needle", "--samples", "2",
            "--context-tokens", "160", "--ratios", "0.8", "--kernels", "1,3", "--normalise", "context,chunk",
            "--replay-chunk", str(replay_chunk), "--dtype", "float32", "--device", "cpu", "--threads", "1",
            "--n-boot", "50", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "chunk/k1 - ctx/k1 [95% CI]" in printed.splitlines()[0]
    doc = json.loads(out.read_text())
    assert doc["kind"] == "depthkv-kvzip-pool-dev" and doc["device"] == "cpu" and doc["threads"] == 1
    assert doc["split"] == "calib" and doc["config"]["normalise"] == ["context", "chunk"]
    assert doc["method"]["variants"] == ["ctx/k1", "ctx/k3", "chunk/k1", "chunk/k3"]
    assert doc["method"]["baseline"] == "ctx/k1"
    reprs = doc["method"]["scorer_repr_by_normalise"]
    assert "normalise='chunk'" in reprs["chunk"] and "normalise='context'" in reprs["context"]
    assert all(f"replay_chunk={replay_chunk}," in r and "kernel=1," in r for r in reprs.values())
    assert len(doc["records"]) == 2
    differ = 0
    for rec in doc["records"]:
        n = rec["context_len"]
        assert 100 < n < 2048
        cells = {c["variant"]: c for c in rec["cells"]}
        assert list(cells) == doc["method"]["variants"]
        assert all(abs(sum(c["budgets"]) - 4 * n * 0.2) <= 4 for c in rec["cells"])  # the global budget
        assert set(rec["seconds"]["reconstruction_by_normalise"]) == {"context", "chunk"}
        differ += sum(cells[f"chunk/{k}"]["budgets"] != cells[f"ctx/{k}"]["budgets"] for k in ("k1", "k3"))
        if replay_chunk == 2048:
            for k in ("k1", "k3"):
                assert cells[f"chunk/{k}"]["budgets"] == cells[f"ctx/{k}"]["budgets"]
                assert cells[f"chunk/{k}"]["output"] == cells[f"ctx/{k}"]["output"]
    if replay_chunk == 2048:
        assert doc["summary"][-1]["diff_vs_baseline"]["chunk/k1"]["mean"] == 0.0
    else:
        assert differ > 0  # the chunk-local softmax moved the input-adaptive budgets
    assert torch.get_num_threads() == 1
