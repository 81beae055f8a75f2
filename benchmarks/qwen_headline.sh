#!/usr/bin/env bash
# Headline run: DepthKV (optimal over the committed Qwen profile) vs uniform vs PyramidKV on
# Qwen2.5-Coder-1.5B-Instruct, 2 CPUs. Writes docs/results/qwen_headline{,_agnostic}/ (summary, report, PNGs, rows.csv).
# Needs docs/results/profile_qwen2.5-coder-1.5b.json (benchmarks/calibrate_models.sh, Qwen part).
set -euo pipefail
cd "$(dirname "$0")/.."

# headline SETTING SAMPLES RUN_DIR OUT_DIR: one evaluation run, then its report, summary and rows into OUT_DIR
headline() {
  local setting=$1 samples=$2 run=$3 out=$4 extra=${5:-}
  depthkv eval --model qwen2.5-coder-1.5b --tasks needle,multikey --methods full,uniform,pyramid,optimal \
    --scorers snapkv --ratios 0.4,0.6,0.8,0.9 --samples "$samples" --context-tokens 1024 --settings "$setting" \
    --profile docs/results/profile_qwen2.5-coder-1.5b.json $extra --out "$run" 2> >(grep -v "cell/s\|s/cell" >&2)
  mkdir -p "$out"
  depthkv report "$run" -o "$out/report.html" --no-embed --rows-csv "$out/rows.csv"
  cp "$run/summary.csv" "$run/summary.json" "$run/config.json" "$out/"
}

headline aware 20 "${RUN_DIR:-/tmp/qeval/out}" docs/results/qwen_headline
# query-agnostic: the context is compressed before the question is seen; the profile was calibrated
# query-aware, so this run reuses it deliberately (--force-profile)
headline agnostic 10 "${RUN_DIR_AGNOSTIC:-/tmp/qag/out}" docs/results/qwen_headline_agnostic --force-profile
