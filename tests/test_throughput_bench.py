"""benchmarks/throughput.py on CPU: the memory-fitting rule, exact buffer sizes, a smoke run, resume, bad input.

The smoke run pretends a 0.25 GiB card for a 32-layer tiny Llama (random weights, N = 256): more pruned
sequences must fit than full ones, nothing may exceed the limit, and a second run must skip every row.
"""

from __future__ import annotations

import csv
import json

import pytest
import throughput as tp
import torch

SMOKE = ["--model", "random:tiny-32l", "--contexts", "256", "--ratios", "0,0.8", "--memory-gib", "0.25",
         "--steps", "4", "--dtype", "float32", "--device", "cpu"]  # float32: bfloat16 matmuls are slow on CPU
LIMIT = int(0.25 * 2**30)


def test_fit_rule_and_reserve_model():
    # peaks at B=1 and B=5 of a run with 100 B of weights, 10 B per sequence, reserve 7 + 3 B
    probes = [(1, 100 + 10 + 7 + 3), (5, 100 + 50 + 7 + 15)]
    assert tp.reserve_model(100, 10, probes) == (7, 3)
    assert tp.reserve_model(100, 10, [(1, 120)]) == (10, 0)
    assert tp.reserve_model(100, 10, []) == (0, 0)
    assert tp.reserve_model(100, 10, [(1, 110), (4, 139)]) == (0, 0)  # slope and intercept never negative
    assert tp.largest_batch(1000, 100, 10, 7, 3, cap=512) == (68, False)  # 100 + 7 + 68 * 13 = 991 <= 1000
    assert tp.largest_batch(1000, 100, 10, 7, 3, cap=50) == (50, True)
    assert tp.largest_batch(100, 100, 10, 0, 0, cap=8) == (0, False)
    assert tp.probe_batches(1) == [1]
    assert tp.probe_batches(6) == [1, 2]
    assert tp.probe_batches(10_000) == [1, 16]


def test_static_cache_bytes_are_exact_and_random(single_thread):
    from _common import build_model

    from depthkv.engine.static import FastConfig

    model = build_model("random:tiny-32l", "cpu", torch.float32)
    shape = tp.Shape.of(model)
    lengths = [256] * 4 + [37] * 28  # first layers whole, the others pruned
    static = tp.static_random_cache(model, shape, 256, lengths, batch=3, horizon=5, block=64, seed=1)
    assert static.storage_bytes() == 3 * tp.static_bytes_per_seq(shape, lengths, 5, 64)
    k, v = static.buffers(5)
    assert k.shape == (3, shape.kv_heads, 64, shape.head_dim)
    assert k[:, :, :37].std() > 0.5 and not torch.equal(k[0, :, :37], k[1, :, :37])  # random, rows differ
    assert not torch.equal(k[:, :, :37], v[:, :, :37])
    assert k[:, :, 37:].abs().sum() == 0 and static.kept[5].eq(37).all()  # free slots empty, 37 tokens kept
    # and it decodes: the fitted per-sequence bytes are what the timed run really allocated
    t = tp.run_fast(model, shape, 256, lengths, 2, 2, FastConfig(attention="split", block=64), seed=3)
    assert t.cache_bytes == 2 * tp.static_bytes_per_seq(shape, lengths, FastConfig().warmup_steps + 3, 64)
    assert t.ms_per_step > 0 and t.peak_allocated is None  # CPU: no allocator statistics


def tiny_bench(limit: int, probe: bool):
    from _common import build_model

    from depthkv.engine.static import FastConfig

    model = build_model("random:tiny-32l", "cpu", torch.float32)
    return tp.Bench(model=model, shape=tp.Shape.of(model), dev=torch.device("cpu"), limit=limit,
                    weights_read=tp.weights_read_bytes(model), max_batch=512, steps=4, hf_steps=4, hf_warm=2,
                    bandwidth=4.8e12, fast_cfg=FastConfig(attention="split"), probe=probe)


def test_reserve_is_fitted_from_probe_peaks(monkeypatch):
    """As on CUDA: the peaks of two small runs give the reserve, and the batch leaves room for it."""
    mib = 2**20
    base, fixed, extra = 100 * mib, 7 * mib, mib // 2  # weights; workspace; activations per sequence
    bench = tiny_bench(limit=2**30, probe=True)
    spec = tp.RowSpec(256, 0.8, "uniform", "fast")
    horizon = bench.fast_cfg.warmup_steps + bench.steps + 1
    per_seq = tp.static_bytes_per_seq(bench.shape, tp.lengths_for(bench, spec), horizon, bench.fast_cfg.block)
    runs = []

    def fake_run(model, shape, n, lengths, batch, steps, cfg, seed):
        runs.append(batch)
        peak = base + fixed + batch * (per_seq + extra)
        return tp.Timing(ms_per_step=2.0, peak_allocated=peak - mib, peak_reserved=peak, cache_bytes=batch * per_seq)

    monkeypatch.setattr(tp, "held", lambda dev: base)
    monkeypatch.setattr(tp, "run_fast", fake_run)
    row = tp.measure_row(bench, spec)
    want = (2**30 - base - fixed) // (per_seq + extra)
    assert row["reserve_fixed_bytes"] == fixed and row["reserve_per_seq_bytes"] == extra
    assert runs == [1, 16, want] and row["batch"] == row["batch_fitted"] == want
    assert base + fixed + want * (per_seq + extra) <= 2**30 < base + fixed + (want + 1) * (per_seq + extra)
    assert row["peak_allocated_bytes"] == base + fixed + want * (per_seq + extra) - mib
    assert row["tokens_per_s"] == pytest.approx(want * 500)


def test_out_of_memory_steps_the_batch_down(monkeypatch):
    bench = tiny_bench(limit=2**28, probe=False)
    tried = []

    def fake_run(model, shape, n, lengths, batch, steps, cfg, seed):
        tried.append(batch)
        if batch > 20:
            raise torch.OutOfMemoryError("fake")
        return tp.Timing(ms_per_step=1.0, peak_allocated=None, peak_reserved=None, cache_bytes=0)

    monkeypatch.setattr(tp, "run_fast", fake_run)
    row = tp.measure_row(bench, tp.RowSpec(256, 0.8, "uniform", "fast"))
    assert tried[0] == row["batch_fitted"] > 20 and row["batch"] == tried[-1] <= 20
    assert all(b2 <= 0.9 * b1 for b1, b2 in zip(tried, tried[1:])) and row["oom_retries"] == len(tried) - 1
    monkeypatch.setattr(tp, "run_fast", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("fake")))
    row = tp.measure_row(bench, tp.RowSpec(256, 0.8, "uniform", "fast"))
    assert row["batch"] == 0 and row["error"].startswith("out of memory down to B=1")
    tiny = tiny_bench(limit=2**20, probe=False)  # 1 MiB: not even the weights
    row = tp.measure_row(tiny, tp.RowSpec(256, 0.8, "uniform", "fast"))
    assert row["batch"] == 0 and row["batch_fitted"] == 0 and row["error"].startswith("does not fit")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("throughput")
    assert tp.main([*SMOKE, "--out", str(out)]) == 0
    return out


def test_smoke_run_fits_more_pruned_sequences(smoke):
    data = json.loads((smoke / tp.RESULTS_JSON).read_text())
    rows = {(r["path"], r["ratio"]): r for r in data["rows"]}
    assert set(rows) == {("hf", 0.0), ("fast", 0.0), ("fast", 0.8)}
    full, pruned, hf = rows["fast", 0.0], rows["fast", 0.8], rows["hf", 0.0]
    assert pruned["batch"] > full["batch"] >= 1 and hf["batch"] >= 1
    for r in data["rows"]:
        assert r["kv_bytes"] <= LIMIT and r["cache_bytes"] <= LIMIT
        assert r["base_bytes"] + r["batch"] * r["per_seq_bytes"] <= LIMIT  # the fitting rule held
        assert r["base_bytes"] + (r["batch"] + 1) * r["per_seq_bytes"] > LIMIT  # and it was the largest batch
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_bound"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_step"], rel=1e-3)
        assert r["oom_retries"] == 0 and not r["capped"]
    assert pruned["layer_tokens_max"] < 256 and full["layer_tokens_min"] == 256
    assert hf["speedup_vs_hf"] == 1.0
    assert pruned["speedup_vs_hf"] == pytest.approx(pruned["tokens_per_s"] / hf["tokens_per_s"], abs=0.01)
    meta = data["meta"]
    assert meta["settings"]["memory_limit_bytes"] == LIMIT and meta["bandwidth_gbs"] == 4800.0
    assert meta["torch"] and meta["transformers"] and "--memory-gib 0.25" in meta["command"]
    with open(smoke / tp.RESULTS_CSV, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["path"] for r in table] == ["hf", "fast", "fast"]
    assert {c for c in tp.CSV_COLUMNS} == set(table[0])
    assert float(table[2]["kv_gib"]) == pytest.approx(pruned["kv_bytes"] / 2**30, abs=1e-3)


def test_second_run_skips_every_row(smoke, monkeypatch, capsys):
    before = (smoke / tp.RESULTS_JSON).read_text()

    def no_model(*a, **k):
        raise AssertionError("a resumed run with nothing left must not build the model")

    monkeypatch.setattr(tp, "build_model", no_model)
    assert tp.main([*SMOKE, "--out", str(smoke)]) == 0
    err = capsys.readouterr().err
    assert err.count("skip (in results)") == 3 and "nothing to run" in err
    assert (smoke / tp.RESULTS_JSON).read_text() == before


@pytest.mark.parametrize("flags, message", [
    (["--ratios", "0,1.2"], "--ratios must lie in [0, 1)"),
    (["--contexts", "8k"], "--contexts: expected comma-separated numbers"),
    (["--budgets", "pyramid"], "--budgets: unknown"),
    (["--model", "random:nope"], "unknown shape"),
    (["--memory-gib", "0"], "--memory-gib must be > 0"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        tp.main([*SMOKE, *flags, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written


def test_cpu_needs_memory_and_foreign_results_are_refused(tmp_path, capsys):
    argv = [a for a in SMOKE if a not in ("--memory-gib", "0.25")]
    with pytest.raises(SystemExit) as exc:
        tp.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--memory-gib is required on CPU" in capsys.readouterr().err
    (tmp_path / tp.RESULTS_JSON).write_text(json.dumps({"meta": {"settings": {"model": "random:llama-3.1-8b"}},
                                                         "rows": []}))
    with pytest.raises(SystemExit) as exc:
        tp.main([*SMOKE, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "made with other settings" in err and "model:" in err
    (tmp_path / tp.RESULTS_JSON).write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        tp.main([*SMOKE, "--out", str(tmp_path)])
    assert exc.value.code == 2 and "not a results file" in capsys.readouterr().err
