#!/usr/bin/env bash
# Headline run of issue 4: DepthKV (optimal over the committed Qwen profile) vs uniform vs PyramidKV on
# Qwen2.5-Coder-1.5B-Instruct, 2 CPUs. Writes docs/results/qwen_headline{,_agnostic}/ (summary, report, PNGs, rows.csv).
# Needs docs/results/profile_qwen2.5-coder-1.5b.json (benchmarks/calibrate_models.sh, Qwen part).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${RUN_DIR:-/tmp/qeval/out}
out=docs/results/qwen_headline
depthkv eval --model qwen2.5-coder-1.5b --tasks needle,multikey --methods full,uniform,pyramid,optimal \
  --scorers snapkv --ratios 0.4,0.6,0.8,0.9 --samples 20 --context-tokens 1024 --settings aware \
  --profile docs/results/profile_qwen2.5-coder-1.5b.json --out "$run" 2> >(grep -v "cell/s\|s/cell" >&2)
mkdir -p "$out"
depthkv report "$run" -o "$out/report.html" --no-embed --rows-csv "$out/rows.csv"
cp "$run/summary.csv" "$run/summary.json" "$run/config.json" "$out/"


# Query-agnostic setting (context compressed before the question), 10 samples per task
run_ag=${RUN_DIR_AGNOSTIC:-/tmp/qag/out}
out_ag=docs/results/qwen_headline_agnostic
depthkv eval --model qwen2.5-coder-1.5b --tasks needle,multikey --methods full,uniform,pyramid,optimal \
  --scorers snapkv --ratios 0.4,0.6,0.8,0.9 --samples 10 --context-tokens 1024 --settings agnostic \
  --profile docs/results/profile_qwen2.5-coder-1.5b.json --out "$run_ag" 2> >(grep -v "cell/s\|s/cell" >&2)
mkdir -p "$out_ag"
depthkv report "$run_ag" -o "$out_ag/report.html" --no-embed --rows-csv "$out_ag/rows.csv"
cp "$run_ag/summary.csv" "$run_ag/summary.json" "$run_ag/config.json" "$out_ag/"
