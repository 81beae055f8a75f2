#!/usr/bin/env bash
# Calibrate both offline models as documented in docs/calibration.md (2 CPUs; ~25 min in all).
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results
mkdir -p "$out"
/usr/bin/time -f "smollm2 calibrate wall %e s, max RSS %M KB" \
  depthkv calibrate --model smollm2-135m --samples 32 --context-tokens 1024 --scorer snapkv \
    --probe-ratios 0.5,0.8,0.95,1 --out "$out/profile_smollm2-135m.json" --plots "$out" \
    > "$out/calibrate_smollm2-135m.txt" 2> >(grep -v "probe/s" >&2)
/usr/bin/time -f "qwen calibrate wall %e s, max RSS %M KB" \
  depthkv calibrate --model qwen2.5-coder-1.5b --samples 16 --context-tokens 1024 --scorer snapkv \
    --probe-ratios 0.5,0.8,0.95,1 --out "$out/profile_qwen2.5-coder-1.5b.json" --plots "$out" \
    > "$out/calibrate_qwen2.5-coder-1.5b.txt" 2> >(grep -v "probe/s" >&2)
