#!/usr/bin/env bash
# Create .venv-kvpress: NVIDIA kvpress 0.5.5 next to depthkv, for benchmarks/kvpress_compare.py. Idempotent.
#
# kvpress 0.5.x pins transformers < 5.3 while depthkv's main environment runs a newer transformers, so the two
# cannot share one environment. This one holds torch (the pinned CPU build), kvpress==0.5.5, the newest
# transformers kvpress accepts (5.2.x) and depthkv itself (editable, installed --no-deps so that its own
# transformers floor cannot pull transformers past kvpress's cap; the rest of depthkv's dependencies are
# installed afterwards under a constraints file that holds torch and transformers where they are).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVPRESS_VENV:-.venv-kvpress}
KVPRESS_VERSION=0.5.5
TRANSFORMERS_SPEC="transformers>=5.0,<5.3"   # depthkv needs >= 5.0, kvpress 0.5.5 needs < 5.3
# The CPU build of torch 2.13.0. NEVER install an unpinned torch here: it pulls a multi-GB CUDA build.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0"}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "$TORCH_SPEC"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
  echo "kvpress_env.sh: the torch in $VENV is a CUDA build; expected the CPU build (TORCH_SPEC=$TORCH_SPEC)" >&2
  exit 1
fi

# Hold torch at what is installed for every later step (pip would otherwise be free to swap it).
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$CONSTRAINTS"

"${PIP[@]}" install -q -c "$CONSTRAINTS" "kvpress==$KVPRESS_VERSION" "$TRANSFORMERS_SPEC"
"$VENV/bin/python" -c "import transformers; print('transformers==' + transformers.__version__)" >>"$CONSTRAINTS"

# depthkv: editable, without its declared dependencies, then those that do not conflict (and test tools)
"${PIP[@]}" install -q --no-deps -e .
"${PIP[@]}" install -q -c "$CONSTRAINTS" \
  "safetensors>=0.4" "gguf>=0.10" "numpy>=1.24" "scipy>=1.15" "tqdm>=4.60" "rich>=13" "matplotlib>=3.7" \
  "rouge-score>=0.1.2" "accelerate>=0.30" "pytest>=8" "hypothesis>=6.100"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import kvpress  # noqa: F401  (fails here, not in the benchmark, if the install is broken)
for name in ("torch", "transformers", "kvpress", "depthkv"):
    print(f"{name}=={md.version(name)}")
EOF
