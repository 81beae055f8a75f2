#!/usr/bin/env bash
# Transfer experiment on SmolLM2-135M-Instruct, as documented in docs/transfer.md:
# profiles calibrated on single task families (needle, multikey) and the mixed default profile
# (docs/results/profile_smollm2-135m.json, from benchmarks/calibrate_models.sh), each used to allocate
# `optimal` budgets, evaluated on needle and multikey (split eval, disjoint from split calib) against uniform.
# Measured 2026-11-28/29 on 2 CPUs shared with other jobs (load 5-8): ~47 min wall in all
# (calibrations 36 min each, run side by side with the mixed-profile eval, 24 min; then the two
# single-family evals side by side, 10 min each).
# Usage: bash benchmarks/transfer_smollm2.sh [RUNS_DIR]   (eval folders with the big results.jsonl go there)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-/tmp/depthkv-transfer}
out=docs/results/transfer_smollm2
mkdir -p "$runs" "$out"
export OMP_NUM_THREADS=1
eval_args=(--model smollm2-135m --tasks needle,multikey --scorers snapkv --ratios 0.5,0.8
           --samples 12 --context-tokens 1024 --settings aware --no-progress)

# 1. single-family profiles (settings of benchmarks/calibrate_models.sh, 16 samples, no proxy metrics) and,
#    beside them, the mixed profile's evaluation: it also runs full and uniform (uniform does not depend on
#    the profile, so the single-family runs evaluate optimal only and are paired with these uniform rows)
for fam in needle multikey; do
  depthkv calibrate --model smollm2-135m --data "$fam" --samples 16 --context-tokens 1024 --scorer snapkv \
    --probe-ratios 0.5,0.8,0.95,1 --no-proxy --out "$out/profile_$fam.json" \
    > "$out/calibrate_$fam.txt" 2> "$runs/calibrate_$fam.err" &
done
depthkv eval "${eval_args[@]}" --methods full,uniform,optimal --profile docs/results/profile_smollm2-135m.json \
  --out "$runs/eval_mix" > "$runs/eval_mix.txt" 2>&1 &
wait
# 2. the single-family profiles' evaluations
for fam in needle multikey; do
  depthkv eval "${eval_args[@]}" --methods optimal --profile "$out/profile_$fam.json" \
    --out "$runs/eval_$fam" > "$runs/eval_$fam.txt" 2>&1 &
done
wait
# 3. the matrix (transfer.{json,csv,md}, transfer_matrix.png, profiles_sensitivity.png, rows.csv) and the
#    check that calibration and evaluation samples share no id, key, answer (and how many haystack sentences)
python -m depthkv.eval.transfer "mix=$runs/eval_mix" "needle=$runs/eval_needle" "multikey=$runs/eval_multikey" \
  --out "$out" --note "bash benchmarks/transfer_smollm2.sh; 12 eval samples/task (split eval), ~1k tokens; $(date -u +%F)"
python benchmarks/transfer_disjoint.py --out "$out/disjointness.json"
