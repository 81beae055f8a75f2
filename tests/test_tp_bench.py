"""benchmarks/tp_decode.py: the tensor-parallel decode benchmark, smoke-run on CPU with 2 gloo ranks (torchrun,
with a deadline), its results checked; bad input refused before any work."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "tp_decode.py"
N, NEW, WORLD = 128, 4, 2
DEADLINE_S = 180


def _env() -> dict:
    """This environment without any torchrun variables of an enclosing launcher, one thread per process."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], deadline: float) -> subprocess.CompletedProcess:
    """Run ``args`` in its own process group; kill the whole group (torchrun and its ranks) past the deadline."""
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(args[:4])} ... did not finish within {deadline:.0f} s")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(the results JSON, the CSV's rows) of one 2-rank CPU run."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    out = tmp_path_factory.mktemp("tp_bench")
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                str(SCRIPT), "--shapes", "tiny-32l", "--contexts", str(N), "--new-tokens", str(NEW), "--device",
                "cpu", "--out", str(out)], DEADLINE_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tiny-32l" in res.stdout and "speed-up" in res.stdout  # the table
    data = json.loads((out / "tp_decode.json").read_text())
    with open(out / "tp_decode.csv", newline="") as fh:
        return data, list(csv.DictReader(fh))


def _shape(name: str) -> dict:
    from _common import SHAPES

    return SHAPES[name]


def test_rows_hold_sharded_caches_at_their_budgets(smoke):
    rows = smoke[0]["rows"]
    shape = _shape("tiny-32l")
    n_layers, kvh = shape["num_hidden_layers"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    assert [(r["shape"], r["context"], r["ratio"]) for r in rows] == [("tiny-32l", N, 0.0), ("tiny-32l", N, 0.8)]
    full, pruned = rows
    for r in rows:
        assert "error" not in r, r
        assert r["world_size"] == WORLD and r["kv_heads_per_rank"] == kvh // WORLD
        assert r["cache_ok"] and r["ranks_agree"]
        assert len(r["tokens"]) == NEW and r["decode_steps"] == NEW - 1
        assert r["decode_ms_per_step"] > 0 and r["prefill_s"] > 0
        assert r["peak_bytes_per_gpu"] is None and r["rss_peak_mb"] > 0  # CPU: resident set instead
        assert len(r["per_rank"]) == WORLD
    # no press: every layer whole, plus the decoded tokens (the last one is never fed back)
    assert full["budgets"] is None and full["layer_lengths"] == [N + NEW - 1] * n_layers
    assert full["kv_context_bytes_per_gpu"] == full["kv_full_context_bytes_per_gpu"]
    # ratio 0.8: exactly round(L * N * 0.2) tokens kept over the layers, each layer at its budget
    assert sum(pruned["budgets"]) == round(n_layers * N * 0.2)
    assert pruned["layer_lengths"] == [b + NEW - 1 for b in pruned["budgets"]]
    # per rank (fp32): 0.2x the full cache's bytes, within one token per layer and local head
    token_head = 2 * head_dim * 4
    assert abs(pruned["kv_context_bytes_per_gpu"] - 0.2 * full["kv_context_bytes_per_gpu"]) <= \
        n_layers * (kvh // WORLD) * token_head
    assert pruned["kv_bytes_per_gpu"] - pruned["kv_context_bytes_per_gpu"] == \
        n_layers * (kvh // WORLD) * token_head * (NEW - 1)
    assert full["speedup"] == 1.0 and pruned["speedup"] > 0
    assert pruned["scorer"] == "snapkv" and pruned["strategy"] == "uniform" and pruned["allgather_ms"] is None


def test_weights_are_sharded_in_memory_and_agree(smoke):
    data = smoke[0]
    shape = _shape("tiny-32l")
    h, i, v, layers = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv_width = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv_width + 3 * h * i + 2 * h  # q, o; k, v; MLP; two norms
    full_bytes = 4 * (layers * per_layer + 2 * v * h + h)  # + embeddings, lm_head, final norm (fp32)
    info = data["meta"]["shapes"]["tiny-32l"]
    assert info["weights_source"] == "memory" and info["replicated_weights_agree"]
    assert info["weights_bytes_per_rank"][0] == info["weights_bytes_per_rank"][1]
    # each rank holds half of every layer's projections (embeddings and norms replicated)
    assert full_bytes // 2 < data["rows"][0]["weights_bytes_per_gpu"] < full_bytes - 4 * layers * per_layer // 3
    assert data["meta"]["world_size"] == WORLD and data["meta"]["backend"] == "gloo"


def test_csv_matches_json(smoke):
    rows, table = smoke[0]["rows"], smoke[1]
    assert len(table) == len(rows)
    for r, c in zip(rows, table):
        assert int(c["context"]) == r["context"] and float(c["ratio"]) == r["ratio"]
        assert int(c["kv_bytes_per_gpu"]) == r["kv_bytes_per_gpu"]
        assert float(c["decode_ms_per_step"]) == r["decode_ms_per_step"]
        assert c["cache_ok"] == "True" and c["ranks_agree"] == "True"


@pytest.mark.parametrize("args,message", [
    (["--shapes", "llama-9t"], "unknown shape"),
    (["--ratios", "0,1"], "--ratios must lie in [0, 1)"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    ([], "run under torchrun"),  # valid arguments, but a single process
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = _run([sys.executable, str(SCRIPT), *args, "--device", "cpu", "--out", str(out)], 120)
    assert res.returncode == 2
    assert message in res.stderr.strip().splitlines()[-1]
    assert not out.exists()
