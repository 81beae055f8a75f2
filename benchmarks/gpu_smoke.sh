#!/usr/bin/env bash
# GPU smoke test of the CLI on a real model: generate, calibrate (4 samples, 1 probe ratio) and eval (2 samples,
# 2 ratios), every step with --device cuda. Any error stops it with a non-zero exit and the failing step named.
#
#   bash benchmarks/gpu_smoke.sh [--model M] [--out DIR] [--device cuda|cuda:N] [--dtype auto|bfloat16|float16|float32]
#                                [--fast]
#
# --model: default the built-in alias qwen2.5-coder-1.5b, which must already be converted in the depthkv cache
#   ($DEPTHKV_CACHE, default ~/.cache/depthkv; the GPU machine has no network). Put it there from a local GGUF:
#     python3 -m depthkv.cli models add qwen2.5-coder-1.5b --gguf /path/to/qwen2.5-coder-1.5b-instruct.gguf
#   Any other --model (a name from `depthkv models add`, a local folder) is loaded as given.
# --out: default a new folder under ${TMPDIR:-/tmp}; it keeps every step's output.
# --fast: also run `generate --fast` (fixed-size cache buffers, one CUDA graph per decoding step).
# Runs `$PYTHON -m depthkv.cli` from this checkout (PYTHON default python3; depthkv need not be installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
MODEL=qwen2.5-coder-1.5b
DEVICE=cuda
DTYPE=auto
OUT=
FAST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=${2:?--model needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --dtype) DTYPE=${2:?--dtype needs a value}; shift 2 ;;
    --fast) FAST=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/depthkv-gpu-smoke.XXXXXX")}
mkdir -p "$OUT"
STEP=setup
trap 'rc=$?; echo "gpu_smoke: FAILED (exit $rc) at step: $STEP; outputs in $OUT" >&2; exit $rc' ERR
dk() { "$PYTHON" -m depthkv.cli "$@"; }
step() { STEP=$1; echo; echo "=== gpu_smoke: $STEP"; T0=$(date +%s); }
done_step() { echo "=== gpu_smoke: $STEP ok ($(( $(date +%s) - T0 )) s)"; }

step "environment"
"$PYTHON" - "$DEVICE" <<'PY'
import sys

import torch
import transformers

print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
if sys.argv[1].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_smoke: torch sees no CUDA device; this script is for the GPU machine")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), f"({torch.cuda.device_count()} visible)")
PY
echo "depthkv cache: ${DEPTHKV_CACHE:-~/.cache/depthkv}/models; model: $MODEL; device: $DEVICE; dtype: $DTYPE; out: $OUT"
dk models list
"$PYTHON" - "$MODEL" <<'PY'
import sys

from depthkv.models import list_models
from depthkv.models.aliases import get_alias

name = sys.argv[1]
entry = {e.name: e for e in list_models()}.get(name)
if entry is not None and not entry.ok:
    sys.exit(f"gpu_smoke: cached model {name} is broken ({entry.problem}); re-add it with depthkv models add")
if entry is None and get_alias(name) is not None:
    sys.exit(f"gpu_smoke: alias {name} is not in the depthkv cache and this machine cannot download it; first run\n"
             f"  python3 -m depthkv.cli models add {name} --gguf /path/to/{get_alias(name).gguf_filename}")
PY
done_step

step "generate (built-in 1024-token passkey prompt, ratio 0.5)"
dk generate --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --builtin --context-tokens 1024 \
  --ratio 0.5 --max-new-tokens 16 --json "$OUT/generate.json"
"$PYTHON" - "$OUT/generate.json" <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
assert r["kv_bytes_kept"] is not None and 0 < r["kv_bytes_kept"] < r["kv_bytes_full"], r
found = r["expected"] is not None and r["expected"] in r["answer"]
print(f"answer {r['answer']!r}, expected {r['expected']!r} ({'found' if found else 'NOT found: a warning, not an error'}); "
      f"KV kept {r['kv_bytes_kept'] / r['kv_bytes_full']:.2f}")
PY
done_step

if [ "$FAST" = 1 ]; then
  step "generate --fast (CUDA graph decoding)"
  dk generate --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --builtin --context-tokens 1024 \
    --ratio 0.5 --max-new-tokens 16 --fast --json "$OUT/generate_fast.json"
  "$PYTHON" - "$OUT/generate.json" "$OUT/generate_fast.json" <<'PY'
import json
import sys

slow, fast = (json.load(open(p)) for p in sys.argv[1:])
print("plain:", repr(slow["answer"]), "| fast:", repr(fast["answer"]))
PY
  done_step
fi

step "calibrate (4 samples, probe ratio 0.8)"
dk calibrate --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --samples 4 --probe-ratios 0.8 \
  --context-tokens 512 --permutations 200 --out "$OUT/profile.json"
"$PYTHON" - "$OUT/profile.json" <<'PY'
import json
import math
import sys

p = json.load(open(sys.argv[1]))
kl = p["samples"]["kl"]
assert len(kl) == 4 and p["probe_ratios"] == [0.8], (len(kl), p["probe_ratios"])
assert all(math.isfinite(v) for s in kl for layer in s for v in layer), "non-finite KL"
print(f"profile: {p['model']['n_layers']} layers, timings {p.get('timings')}")
PY
done_step

step "eval (needle, 2 samples, full/uniform/optimal x ratios 0.5,0.8)"
dk eval --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --tasks needle --methods full,uniform,optimal \
  --ratios 0.5,0.8 --samples 2 --context-tokens 1024 --max-new-tokens 16 --profile "$OUT/profile.json" \
  --out "$OUT/eval" --force --no-progress
"$PYTHON" - "$OUT/eval" "$DEVICE" <<'PY'
import json
import sys
from pathlib import Path

folder, device = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
assert len(rows) == 2 * (1 + 2 * 2), f"{len(rows)} rows, expected 10"
bad = [r for r in rows if r["status"] != "ok"]
assert not bad, f"{len(bad)} rows not ok, e.g. {bad[0].get('error')}"
devices = {r.get("device") for r in rows}
assert all(str(d).startswith(device.split(":")[0]) for d in devices), f"rows ran on {devices}, not {device}"
cfg = json.loads((folder / "config.json").read_text())
print(f"{len(rows)} rows ok on {sorted(devices)}, dtype {cfg['run']['dtype']}; "
      f"mean score full {sum(r['score'] for r in rows if r['method'] == 'full') / 2:.2f}")
PY
done_step

trap - ERR
echo
echo "gpu_smoke: all steps passed ($MODEL on $DEVICE); outputs in $OUT"
