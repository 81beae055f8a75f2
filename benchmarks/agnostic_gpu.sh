#!/usr/bin/env bash
# Query-agnostic evidence on the GPU machine: Qwen2.5-Coder-1.5B, contexts compressed before the question.
#
# Runs from the repository root on a machine where the model is in the depthkv cache ($DEPTHKV_CACHE, e.g. after
# ../shared/tools/qwen-to-gpu.sh or `depthkv models add`). Every step is resumable and keeps its state in
# $RUNS (default /root/runs), so a step cut by a time limit continues where it stopped when run again;
# `collect` copies the results into $OUT (the device tool's return folder) or the folder given.
#
#   bash benchmarks/agnostic_gpu.sh calibrate   # kvzip profile, agnostic setting, 4k tokens
#   bash benchmarks/agnostic_gpu.sh eval        # depthkv: uniform / optimal / global / adaptive (+ heads), kvzip
#   bash benchmarks/agnostic_gpu.sh kvpress     # kvpress 0.5.5 presses on the same samples (wheels in .kvwhl/)
#   bash benchmarks/agnostic_gpu.sh collect [DIR]
#
# Sizes are environment variables (defaults in brackets): MODEL [qwen2.5-coder-1.5b], CTX [4096],
# SAMPLES [16] per task, TASKS [needle,multikey,vartrack,docqa], RATIOS [0.6,0.8,0.9], LIMIT [540] seconds per
# step, CALIB_SAMPLES [24].
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-qwen2.5-coder-1.5b}
CTX=${CTX:-4096}
SAMPLES=${SAMPLES:-16}
TASKS=${TASKS:-needle,multikey,vartrack,docqa}
RATIOS=${RATIOS:-0.6,0.8,0.9}
LIMIT=${LIMIT:-540}
CALIB_SAMPLES=${CALIB_SAMPLES:-24}
RUNS=${RUNS:-/root/runs}
DEVICE=${DEVICE:-cuda}
export DEPTHKV_CACHE=${DEPTHKV_CACHE:-/root/dkc} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # /tmp/site: wheels carried to the GPU machine (gguf)
mkdir -p "$RUNS"
PROFILE=$RUNS/profile_kvzip_agnostic.json
step=${1:-}
case "$step" in
calibrate)
  [ -f "$PROFILE" ] && { echo "profile exists: $PROFILE"; exit 0; }
  timeout "$LIMIT" python3 -m depthkv calibrate --model "$MODEL" --device "$DEVICE" --scorer kvzip \
    --setting agnostic --samples "$CALIB_SAMPLES" --context-tokens "$CTX" --probe-ratios 0.5,0.8,0.95,1.0 \
    --no-proxy --out "$PROFILE" 2>&1 | tail -n 40 || echo "calibrate failed or stopped at the limit"
  ;;
eval)
  timeout "$LIMIT" python3 -m depthkv eval --model "$MODEL" --device "$DEVICE" --tasks "$TASKS" --settings agnostic \
    --methods full,uniform,optimal,global,adaptive,global+heads --scorers kvzip --ratios "$RATIOS" \
    --samples "$SAMPLES" --context-tokens "$CTX" --profile "$PROFILE" --no-progress --out "$RUNS/dk" \
    2>&1 | tail -n 60 || echo "eval stopped (limit $LIMIT s or error); run again to resume"
  ;;
eval-scorers)  # the other question-independent scorer and the question-aware one, same samples
  timeout "$LIMIT" python3 -m depthkv eval --model "$MODEL" --device "$DEVICE" --tasks "$TASKS" --settings agnostic \
    --methods full,uniform,global,global+heads --scorers expected_attention,snapkv --ratios "$RATIOS" \
    --samples "$SAMPLES" --context-tokens "$CTX" --no-progress --out "$RUNS/dk_scorers" \
    2>&1 | tail -n 60 || echo "eval stopped (limit $LIMIT s or error); run again to resume"
  ;;
kvpress)
  if [ ! -d /tmp/kvsite ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/kvsite .kvwhl/*.whl
  fi
  PYTHONPATH=/tmp/kvsite:$PYTHONPATH timeout "$LIMIT" python3 benchmarks/kvpress_agnostic.py --model "$MODEL" \
    --device "$DEVICE" --tasks "$TASKS" --samples "$SAMPLES" --context-tokens "$CTX" --ratios "$RATIOS" \
    --presses kvzip,expected_attention,adakv_ea --out "$RUNS/kp" 2>&1 | tail -n 30 \
    || echo "kvpress stopped (limit $LIMIT s or error); run again to resume"
  ;;
collect)
  dest=${2:-${OUT:?give a folder or set OUT}}
  mkdir -p "$dest"
  for d in dk dk_scorers kp; do
    [ -d "$RUNS/$d" ] || continue
    mkdir -p "$dest/$d"
    cp "$RUNS/$d"/results.jsonl "$RUNS/$d"/config.json "$dest/$d/" 2>/dev/null || true
  done
  [ -f "$PROFILE" ] && cp "$PROFILE" "$dest/"
  ls -la "$dest" "$dest"/* 
  ;;
*)
  echo "usage: $0 calibrate | eval | eval-scorers | kvpress | collect [DIR]" >&2; exit 2 ;;
esac
