#!/usr/bin/env bash
# The first query-agnostic GPU run (Qwen2.5-Coder-1.5B, 4k tokens, one H200, 2026-11-29 20:31 UTC; docs/agnostic.md,
# docs/results/agnostic_qwen_4k/), as steps of benchmarks/qwen_gpu.sh with that run's grid and folder names.
#
#   bash benchmarks/agnostic_gpu.sh calibrate      # kvzip profile, agnostic setting, 4k tokens ($RUNS/profile_kvzip_agnostic.json)
#   bash benchmarks/agnostic_gpu.sh eval           # uniform / optimal / global / adaptive / global+heads, kvzip ($RUNS/dk)
#   bash benchmarks/agnostic_gpu.sh eval-scorers   # expected_attention and snapkv, no profile ($RUNS/dk_scorers)
#   bash benchmarks/agnostic_gpu.sh kvpress        # kvpress 0.5.5 presses on the same samples ($RUNS/kp)
#   bash benchmarks/agnostic_gpu.sh collect [DIR]
#
# The variables of qwen_gpu.sh apply (MODEL, CTX, TASKS, RATIOS, LIMIT, RUNS, DEVICE, ...); this run's defaults:
# SAMPLES 16 per task, CALIB_SAMPLES 24. That run decoded each cell with model.generate (--decode hf did not
# exist yet; eval now decodes a sample's cells as one fast-path batch on CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
export SETTING=agnostic SAMPLES=${SAMPLES:-16} CALIB_SAMPLES=${CALIB_SAMPLES:-24}
case "${1:-}" in
calibrate) exec bash benchmarks/qwen_gpu.sh calibrate agnostic ;;
eval) METHODS=full,uniform,optimal,global,adaptive,global+heads exec bash benchmarks/qwen_gpu.sh eval dk ;;
eval-scorers)
  METHODS=full,uniform,global,global+heads SCORERS=expected_attention,snapkv PROFILE=none \
    exec bash benchmarks/qwen_gpu.sh eval dk_scorers ;;
kvpress) exec bash benchmarks/qwen_gpu.sh kvpress kp ;;
collect) exec bash benchmarks/qwen_gpu.sh collect "${@:2}" ;;
*) echo "usage: $0 calibrate | eval | eval-scorers | kvpress | collect [DIR]" >&2; exit 2 ;;
esac
