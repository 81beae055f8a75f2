#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and depthkv (editable, with the eval extra and test tools). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The environment takes ~2.4 GB (torch ~0.75 GB, Triton ~0.9 GB): say so plainly when the disk cannot hold it,
# instead of pip's "No space left on device" halfway through an install.
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
if [ ! -x .venv/bin/python ] && [ "${free_mb:-0}" -lt 2400 ]; then
  echo "setup: only ${free_mb} MB free on $(df -P . | awk 'NR==2 {print $6}'); .venv needs about 2.4 GB" >&2
  df -h . /tmp >&2 || true
  exit 1
fi
# pip unpacks wheels under TMPDIR: keep that on the project's disk (a small /tmp must not fail the install),
# and keep no second copy of what it downloads
export TMPDIR="$PWD/.venv-tmp" PIP_NO_CACHE_DIR=1
mkdir -p "$TMPDIR"
trap 'rm -rf "$TMPDIR"' EXIT
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
