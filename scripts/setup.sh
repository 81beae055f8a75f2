#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and depthkv (editable, with the eval extra and test tools). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU build that lies on this kind of machine's disk; an unpinned torch pulls a CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
# Triton for the decode kernel's CPU tests (its interpreter; ~4 s from the wheel on disk). 3.8, not 3.6: the 3.6
# interpreter cannot run loops with runtime bounds under numpy 2.4. Where no wheel exists those tests skip.
.venv/bin/python -m pip install -q "triton==3.8.0" || echo "setup: triton not installed: the Triton kernel tests will skip" >&2
.venv/bin/python -m pip install -q -e ".[dev,eval]"
