"""Data-parallel evaluation: sharding by sample, merging in one-device order, resuming, equal rows.

The model is a tiny random Llama with a byte-level tokenizer saved to a folder, so spawned workers load the
same weights with ``--model FOLDER`` (no downloads).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from depthkv.cli import main
from depthkv.eval import EvalConfig, load_rows, run_eval
from depthkv.eval.parallel import Shard, env_shard, local_device, merge_shards, parse_devices, run_distributed
from depthkv.eval.results import CONFIG, RESULTS, EvalError, cell_key, shard_files, shard_path

FIELDS = ("method", "task", "sample_id", "setting", "scorer", "ratio", "output", "score", "budgets")
# decode_batch 4 with 2 cells per sample: decode groups of two samples (s0 + s1, s2), so the sharded runs
# below also decode the cells of several samples together
ARGS = dict(tasks=("needle",), methods=("full", "uniform"), scorers=("snapkv",), ratios=(0.5,), samples=3,
            context_tokens=160, max_new_tokens=2, settings=("aware",), decode_batch=4)

ROOT = Path(__file__).resolve().parent.parent
ARGV = ["eval", "--tasks", "needle", "--methods", "full,uniform", "--scorers", "snapkv", "--ratios", "0.5",
        "--samples", "3", "--context-tokens", "160", "--max-new-tokens", "2", "--dtype", "float32", "--no-progress",
        "--decode-batch", "4"]


def same(rows):
    return [tuple(json.dumps(r.get(f)) for f in FIELDS) for r in rows]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.test_cli import tiny_lm

    lm = tiny_lm()
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def load(model_dir):
    from depthkv.models import load_model

    return load_model(str(model_dir), dtype="float32", device="cpu")


def config(model_dir) -> EvalConfig:
    return EvalConfig(model=str(model_dir), dtype="float32", **ARGS)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """The rows of a one-device run."""
    out = tmp_path_factory.mktemp("single") / "run"
    res = run_eval(load(model_dir), config(model_dir), out, progress=False)
    assert len(res.rows) == 6 and not shard_files(out)
    return res.rows


def test_shards_partition_the_sorted_samples():
    samples = {"b": [SimpleNamespace(id=f"b{i}") for i in range(3)], "a": [SimpleNamespace(id=f"a{i}") for i in range(4)]}
    owned = [Shard(r, 3).owned(samples) for r in range(3)]
    assert set().union(*owned) == {(t, s.id) for t, g in samples.items() for s in g}
    assert sum(map(len, owned)) == 7 and [len(o) for o in owned] == [3, 2, 2]
    assert owned[0] == {("a", "a0"), ("a", "a3"), ("b", "b2")}  # round-robin over the sorted list
    with pytest.raises(EvalError, match="not in a world"):
        Shard(2, 2)


def test_shards_own_whole_decode_groups():
    """With decode groups (cells of consecutive samples batched together), each rank owns whole groups, so
    batches hold the same rows whatever the number of devices."""
    from depthkv.eval.runner import EvalConfig, batch_groups

    samples = {"b": [SimpleNamespace(id=f"b{i}") for i in range(3)], "a": [SimpleNamespace(id=f"a{i}") for i in range(5)]}
    cfg = EvalConfig(methods=("full", "uniform", "optimal"), scorers=("snapkv",), ratios=(0.6,), decode_batch=7)
    groups = batch_groups(cfg, samples)  # 3 cells per sample: groups of 7 // 3 = 2 samples
    assert groups[("a", "a0")] == groups[("a", "a1")] == ("a", 0) and groups[("a", "a4")] == ("a", 2)
    assert groups[("b", "b2")] == ("b", 1)
    owned = [Shard(r, 2).owned(samples, groups) for r in range(2)]
    assert owned[0].isdisjoint(owned[1]) and len(owned[0] | owned[1]) == 8
    for mine in owned:
        assert all({k for k in groups if groups[k] == groups[key]} <= mine for key in mine)  # whole groups
    assert owned[0] == {("a", "a0"), ("a", "a1"), ("a", "a4"), ("b", "b2")}  # groups a0, a2, b1 (sorted)
    many = EvalConfig(methods=("full", "uniform", "optimal"), scorers=("snapkv",), ratios=(0.6,), decode_batch=2)
    assert Shard(0, 3).owned(samples, batch_groups(many, samples)) == Shard(0, 3).owned(samples)  # one per group


def test_devices_and_environment():
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    with pytest.raises(EvalError, match="--devices"):
        parse_devices("tpu,cpu")
    with pytest.raises(EvalError, match="empty"):
        parse_devices(" , ")
    assert env_shard({"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4)
    assert env_shard({}) is None
    assert local_device("cuda:0", {"LOCAL_RANK": "3"}) == "cuda:3" and local_device("cpu", {"LOCAL_RANK": "3"}) == "cpu"


def test_merge_orders_like_one_device_and_drops_duplicates(tmp_path):
    cfg = EvalConfig(model="m", **ARGS)
    (tmp_path / CONFIG).write_text(json.dumps({"run": {}, "samples": {"needle": ["s2", "s0", "s1"]}}))

    def row(sid, method):
        ratio = 0.0 if method == "full" else 0.5
        return {"task": "needle", "sample_id": sid, "setting": "aware", "method": method,
                "scorer": None if method == "full" else "snapkv", "ratio": ratio}

    def write(path, rows, tail=""):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)

    write(tmp_path / RESULTS, [row("s0", "full")])
    write(shard_path(tmp_path, 0), [row("s0", "uniform"), row("s1", "full"), row("s0", "full")], tail='{"cut')
    write(shard_path(tmp_path, 1), [row("s2", "uniform"), row("s2", "full")])
    merged = merge_shards(tmp_path, cfg)
    keys = [cell_key(r["task"], r["sample_id"], r["setting"], r["method"], r["scorer"], r["ratio"]) for r in merged]
    assert [(r["sample_id"], r["method"]) for r in merged] == [
        ("s2", "full"), ("s2", "uniform"), ("s0", "full"), ("s0", "uniform"), ("s1", "full")]
    assert len(set(keys)) == 5 and load_rows(tmp_path) == merged and not shard_files(tmp_path)


def test_interrupted_sharded_run_resumes_to_the_one_device_rows(model_dir, reference, tmp_path, capsys):
    """Rank 0 is interrupted after one row; ``--devices cpu,cpu`` (two spawned workers) finishes the run."""
    out = tmp_path / "par"
    cfg = config(model_dir)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(load(model_dir), cfg, out, progress=False, shard=Shard(0, 2), on_row=stop)
    assert len(load_rows(shard_path(out, 0))) == 1 and not (out / RESULTS).exists()
    assert main([*ARGV, "--model", str(model_dir), "--out", str(out), "--devices", "cpu,cpu"]) == 0
    printed = capsys.readouterr().out
    assert "5 new rows (1 resumed, 3 prefills)" in printed
    rows = load_rows(out)
    assert same(rows) == same(reference)
    assert not shard_files(out) and (out / "summary.csv").exists()
    again = run_eval(load(model_dir), cfg, out, progress=False)  # a one-device rerun: nothing left to do
    assert (again.new_rows, again.skipped, again.prefills) == (0, 6, 0)


def test_devices_error_is_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main([*ARGV, "--model", str(model_dir), "--devices", "cpu,tpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --devices cpu,tpu") and "\n" not in err and not out.exists()


def test_ranks_without_a_process_group_wait_on_files(model_dir, reference, tmp_path, monkeypatch):
    """Two ranks (as under torchrun, but without a process group) in threads, each with its own model."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    out = tmp_path / "dist"
    models = [load(model_dir), load(model_dir)]
    results: dict[int, object] = {}

    def rank(r):
        results[r] = run_distributed(models[r], config(model_dir), out, Shard(r, 2), progress=False, poll=0.05)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == {0, 1}
    assert same(results[0].rows) == same(load_rows(out)) == same(reference)
    assert results[0].cells and not shard_files(out)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torchrun_with_a_process_group_merges_to_the_one_device_rows(model_dir, reference, tmp_path, device):
    """``torchrun --nproc-per-node 2 -m depthkv eval``: two real processes joined by a process group (gloo on
    the CPU; NCCL on two GPUs with ``DEPTHKV_TEST_DEVICE=cuda``), each evaluating its shard; rank 0 merges after
    the group's barrier. On GPUs the reference is a one-GPU run of the same command."""
    import torch.distributed as dist

    from tests.test_tp_bench import _run

    if device == "cuda" and (os.environ.get("DEPTHKV_TEST_DEVICE") != "cuda" or torch.cuda.device_count() < 2):
        pytest.skip("needs DEPTHKV_TEST_DEVICE=cuda and two CUDA devices")
    if not (dist.is_available() and (dist.is_nccl_available() if device == "cuda" else dist.is_gloo_available())):
        pytest.skip(f"torch.distributed has no {'NCCL' if device == 'cuda' else 'gloo'} backend in this build")
    argv = [*ARGV, "--model", str(model_dir)]
    if device == "cuda":
        one = tmp_path / "one"
        res = _run([sys.executable, "-m", "depthkv", *argv, "--device", "cuda:0", "--out", str(one)], 240)
        assert res.returncode == 0, res.stderr[-3000:]
        reference = load_rows(one)
    out = tmp_path / "torchrun"
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "depthkv", *argv, "--device", device, "--out", str(out)], 240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert same(load_rows(out)) == same(reference)
    assert not shard_files(out) and (out / "summary.json").exists()


def test_same_rows_script_compares_what_a_run_decides(tmp_path, capsys):
    """benchmarks/same_rows.py: timings may differ, outputs, scores, budgets and the set of cells may not."""
    import same_rows

    row = dict(task="needle", sample_id="s0", setting="aware", method="uniform", scorer="snapkv", ratio=0.5,
               output="42", score=1.0, budgets=[3, 3], seconds=1.0)

    def folder(name, *rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    a = folder("a", row, {**row, "method": "full", "ratio": 0.0})
    b = folder("b", {**row, "seconds": 9.0}, {**row, "method": "full", "ratio": 0.0})
    c = folder("c", {**row, "output": "41", "score": 0.0}, {**row, "method": "full", "ratio": 0.0})
    d = folder("d", row)
    assert same_rows.main([a, b]) == 0
    assert same_rows.main([a, c]) == 1 and "different 1" in capsys.readouterr().out
    assert same_rows.main([a, b, d]) == 1 and "missing 1" in capsys.readouterr().out


def test_a_worker_input_error_is_one_line(model_dir, tmp_path, capsys):
    """Bad input that only a worker can see (a profile made for another model: the identity check needs the
    loaded model) stops the run with the worker's own message, one line, exit code 2."""
    out = tmp_path / "foreign"
    argv = [*ARGV, "--methods", "full,optimal", "--profile", str(ROOT / "docs/results/profile_smollm2-135m.json"),
            "--model", str(model_dir), "--devices", "cpu,cpu", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: worker ") and "profile" in err


def test_eval_takes_each_settings_default_scorer(model_dir, tmp_path, capsys):
    """Without --scorers: SnapKV with the question in the prefill, KVzip for a context compressed before it."""
    base = ["eval", "--model", str(model_dir), "--tasks", "needle", "--methods", "full,uniform", "--ratios", "0.5",
            "--samples", "1", "--context-tokens", "160", "--max-new-tokens", "2", "--dtype", "float32",
            "--no-progress"]
    for settings, want in (("agnostic", ["kvzip"]), ("aware", ["snapkv"])):
        out = tmp_path / settings
        assert main([*base, "--settings", settings, "--out", str(out)]) == 0, capsys.readouterr().err
        rows = load_rows(out)
        assert sorted({r["scorer"] for r in rows if r["method"] != "full"}) == want
