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
.venv/bin/python -m pip install -q -e ".[dev,eval]"
