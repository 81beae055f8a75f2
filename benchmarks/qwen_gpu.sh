#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B evidence on the GPU machine: profiles and evaluation grids, both settings.
#
# Runs from the repository root on a machine where the model is in the depthkv cache ($DEPTHKV_CACHE, e.g. after
# ../shared/tools/qwen-to-gpu.sh or `depthkv models add`). Every step is resumable and keeps its state in
# $RUNS (default /root/runs): a step cut by its time limit continues where it stopped when run again.
#
#   bash benchmarks/qwen_gpu.sh calibrate aware      # SnapKV profile, question in the prefill, refined at $REFINE
#   bash benchmarks/qwen_gpu.sh calibrate agnostic   # KVzip profile, context compressed before the question, refined
#   SETTING=aware bash benchmarks/qwen_gpu.sh eval NAME   # one grid into $RUNS/NAME (see the variables below)
#   bash benchmarks/qwen_gpu.sh kvpress NAME         # kvpress 0.5.5 presses on the agnostic samples (.kvwhl/);
#                                                    # with DEVICES: the tasks split over the GPUs, NAME_d<i>
#   bash benchmarks/qwen_gpu.sh dpcheck              # data-parallel eval on 2 GPUs (--devices and torchrun/NCCL)
#                                                    # against one GPU: the rows must be identical
#   WORKERS=1,2,3 bash benchmarks/qwen_gpu.sh workers  # the eval grid with 1, 2, 3 worker processes on $DEVICE's
#                                                    # GPU (--devices 0,0,...): wall time of each, loads included
#   bash benchmarks/qwen_gpu.sh collect [DIR]        # results, configs, profiles: DIR/runs.tgz (default $OUT)
#   bash benchmarks/qwen_gpu.sh restore [SRC]        # put back folders of earlier runs (default .gpu_runs/, carried
#                                                    # to the machine): SRC/runs -> $RUNS, other SRC/X -> /root/X;
#                                                    # an eval then skips the cells already there
#
# Variables [defaults]: MODEL [qwen2.5-coder-1.5b], CTX [4096] eval context, SAMPLES [40] per task,
# TASKS [needle,multikey,vartrack,docqa], SETTING [agnostic], METHODS (aware: full,uniform,pyramid,optimal,
# optimal-joint; agnostic: full,uniform,optimal,adaptive,global+heads,adaptive+heads,optimal-joint,
# adaptive-joint+heads; the *-joint ones once the profile is refined), SCORERS (aware: snapkv;
# agnostic: kvzip), SCORER (calibrate: the profile's scorer; eval: the default SCORERS and profile), RATIOS [0.6,0.8,0.9], PROFILE [the step's own profile; "none" for none], CALIB_CTX [4096],
# CALIB_SAMPLES [64], REFINE [0.8,0.9] ratios refined (REFINE_SAMPLES [16] of the calibration samples), FLOORS
# [0,0.25,0.5,0.75,1] adaptive's floor shares tried there (depthkv refine --floor-shares), LIMIT [540] seconds per step,
# DEADLINE (epoch seconds: each step's limit is also cut to end by then, and a step that would get under 10 s
# does not start; for several steps side by side in one device call, e.g. `export DEADLINE=$(($(date +%s)+550));
# DEVICE=cuda:0 bash ... eval A & DEVICE=cuda:1 bash ... eval B & wait`), DEVICE [cuda], DEVICES (e.g. 0,1:
# data-parallel over those GPUs, one worker process each), TORCHRUN (e.g. 2: the same under torchrun, ranks joined
# by an NCCL group), DECODE_BATCH [48] cells decoded together (one fast-path batch, which also takes the cells of
# consecutive samples), NO_PROXY [unset]
# (set: the profile skips the paper's proxy metrics, which the mga and mlma allocators read), TASK_OPTIONS (eval:
# the generators' options as JSON, e.g. '{"gsm_inf": {"num_distractors": 4}}'; METHODS=full PROFILE=none for a
# full-cache difficulty probe), SCORER_OPTIONS (calibrate and eval: scorer options as JSON per scorer, e.g.
# '{"kvzip": {"self_window": 1}}'), PTAG (with SCORER_OPTIONS: the profile is profile_SCORER_PTAG_SETTING.json).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-qwen2.5-coder-1.5b}
CTX=${CTX:-4096}
SAMPLES=${SAMPLES:-40}
TASKS=${TASKS:-needle,multikey,vartrack,docqa}
SETTING=${SETTING:-agnostic}
RATIOS=${RATIOS:-0.6,0.8,0.9}
CALIB_CTX=${CALIB_CTX:-4096}
CALIB_SAMPLES=${CALIB_SAMPLES:-64}
REFINE=${REFINE-0.8,0.9}  # REFINE= (empty): no refinement
REFINE_SAMPLES=${REFINE_SAMPLES:-16}
FLOORS=${FLOORS-0,0.25,0.5,0.75,1}  # floor shares of adaptive tried at the refined ratios; FLOORS= : not tuned
LIMIT=${LIMIT:-540}
# seconds the next step may run: LIMIT, cut to DEADLINE when one is set (prints 0 when under 10 s are left)
limit() {
  local l=$LIMIT
  if [ -n "${DEADLINE:-}" ]; then l=$(( DEADLINE - $(date +%s) )); [ "$l" -gt "$LIMIT" ] && l=$LIMIT; fi
  [ "$l" -lt 10 ] && l=0
  echo "$l"
}
RUNS=${RUNS:-/root/runs}
DEVICE=${DEVICE:-cuda}
DECODE_BATCH=${DECODE_BATCH:-48}
WORKERS=${WORKERS:-1,2,3}
export DEPTHKV_CACHE=${DEPTHKV_CACHE:-/root/dkc} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # /tmp/site: wheels carried to the GPU machine
mkdir -p "$RUNS"
# the step's scorer: $SCORER, else SnapKV (aware) / KVzip (agnostic); profiles are named after scorer and setting
scorer_for() { if [ -n "${SCORER:-}" ]; then echo "$SCORER"; elif [ "$1" = aware ]; then echo snapkv; else echo kvzip; fi; }
# PTAG names a profile calibrated with SCORER_OPTIONS apart from the scorer's plain one
profile_for() { echo "$RUNS/profile_$(scorer_for "$1")${PTAG:+_$PTAG}_$1.json"; }
has_key() { python3 -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get(sys.argv[2]) else 1)" "$1" "$2"; }
has_refined() { has_key "$1" refined; }
if [ -n "${DEVICES:-}" ]; then devices=(--devices "$DEVICES"); else devices=(--device "$DEVICE"); fi
depthkv=(python3 -m depthkv)
[ -n "${TORCHRUN:-}" ] && depthkv=(python3 -m torch.distributed.run --standalone --nproc-per-node "$TORCHRUN" -m depthkv)
proxy=()
[ -n "${NO_PROXY:-}" ] && proxy=(--no-proxy)
sopts=()  # SCORER_OPTIONS: JSON per scorer, e.g. {"kvzip_v": {"self_window": 1}} (calibrate and eval)
[ -n "${SCORER_OPTIONS:-}" ] && sopts=(--scorer-options "$SCORER_OPTIONS")
step=${1:-}
case "$step" in
calibrate)
  setting=${2:?calibrate aware|agnostic}
  out=$(profile_for "$setting")
  if [ -f "$out" ]; then
    echo "profile exists: $out"
  else
    L=$(limit); [ "$L" -gt 0 ] && timeout "$L" python3 -m depthkv calibrate --model "$MODEL" --device "$DEVICE" --scorer "$(scorer_for "$setting")" \
      "${sopts[@]}" --setting "$setting" --samples "$CALIB_SAMPLES" --context-tokens "$CALIB_CTX" --probe-ratios 0.5,0.8,0.95,1.0 \
      "${proxy[@]}" --out "$out" 2>&1 | tail -n 30 || echo "calibrate failed or stopped at the limit"
  fi
  # refine the optimal budgets on the joint damage of all layers pruned (strategy optimal-joint) and choose
  # adaptive's floor share there (read by adaptive / adaptive+heads): one refine call, the samples prefilled once
  if [ -n "$REFINE" ] && [ -f "$out" ]; then
    refine=; has_refined "$out" || refine=1
    floors=()
    if [ -n "$FLOORS" ] && ! has_key "$out" floor_shares; then
      floors=(--floor-shares "$FLOORS"); [ -z "$refine" ] && floors+=(--floor-only)
    fi
    if [ -n "$refine" ] || [ ${#floors[@]} -gt 0 ]; then
      L=$(limit); [ "$L" -gt 0 ] && timeout "$L" python3 -m depthkv refine --model "$MODEL" --device "$DEVICE" \
        --profile "$out" --ratios "$REFINE" --samples "$REFINE_SAMPLES" "${floors[@]}" 2>&1 | tail -n 12 \
        || echo "refine failed or stopped at the limit"
    fi
  fi
  ;;
eval)
  name=${2:?eval NAME}
  joint=  # the *-joint splits only once refine has run
  if has_refined "$(profile_for "$SETTING")" 2>/dev/null; then
    joint=$([ "$SETTING" = aware ] && echo ,optimal-joint || echo ,optimal-joint,adaptive-joint+heads)
  fi
  if [ "$SETTING" = aware ]; then
    methods=${METHODS:-full,uniform,pyramid,optimal$joint}
  else
    methods=${METHODS:-full,uniform,optimal,adaptive,global+heads,adaptive+heads$joint}
  fi
  scorers=${SCORERS:-$(scorer_for "$SETTING")}
  profile=${PROFILE:-$(profile_for "$SETTING")}
  extra=()
  [ "$profile" != none ] && extra=(--profile "$profile")
  [ -n "${TASK_OPTIONS:-}" ] && extra+=(--task-options "$TASK_OPTIONS")
  extra+=("${sopts[@]}")
  # a profile serves the scorers it was not calibrated with only on purpose: say so in the run's record
  [ "$profile" != none ] && [ "$scorers" != "$(scorer_for "$SETTING")" ] && extra+=(--force-profile)
  L=$(limit); [ "$L" -gt 0 ] && timeout "$L" "${depthkv[@]}" eval --model "$MODEL" "${devices[@]}" --tasks "$TASKS" --settings "$SETTING" \
    --methods "$methods" --scorers "$scorers" --ratios "$RATIOS" --samples "$SAMPLES" --context-tokens "$CTX" \
    --decode-batch "$DECODE_BATCH" "${extra[@]}" --no-progress --out "$RUNS/$name" 2>&1 | tail -n 40 \
    || echo "eval stopped (limit ${L} s, error, or no time left before DEADLINE); run again to resume"
  ;;
kvpress)
  name=${2:-kp}
  if [ ! -d /tmp/kvsite ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/kvsite .kvwhl/*.whl
    # kvpress imports datasets and fire at import time for presses not used here (DuoAttention, its CLI); the
    # GPU machine has neither: stand-ins that fail only if those presses are used
    for m in datasets fire; do mkdir -p /tmp/kvsite/$m; done
    echo 'def load_dataset(*a, **k): raise ImportError("datasets is not installed")' > /tmp/kvsite/datasets/__init__.py
    echo 'def Fire(*a, **k): raise ImportError("fire is not installed")' > /tmp/kvsite/fire/__init__.py
  fi
  kvpress_run() {  # DEVICE TASKS OUT
    L=$(limit); [ "$L" -gt 0 ] && PYTHONPATH=/tmp/kvsite:$PYTHONPATH timeout "$L" python3 benchmarks/kvpress_agnostic.py --model "$MODEL" \
      --device "$1" --tasks "$2" --samples "$SAMPLES" --context-tokens "$CTX" --ratios "$RATIOS" \
      --presses "${PRESSES:-kvzip,expected_attention,adakv_ea}" --out "$3" 2>&1 | tail -n 30 \
      || echo "kvpress stopped (limit ${L} s, error, or no time left before DEADLINE); run again to resume"
  }
  if [ -n "${DEVICES:-}" ]; then
    # one process per GPU, the tasks dealt round-robin; folders NAME_d0, NAME_d1, ... (headline_table merges them)
    IFS=, read -r -a devs <<< "$DEVICES"; IFS=, read -r -a tl <<< "$TASKS"
    for i in "${!devs[@]}"; do
      mine=$(for j in "${!tl[@]}"; do if [ $((j % ${#devs[@]})) -eq "$i" ]; then printf '%s,' "${tl[$j]}"; fi; done)
      [ -n "$mine" ] && kvpress_run "cuda:${devs[$i]}" "${mine%,}" "$RUNS/${name}_d$i" > "/tmp/kvpress_${name}_d$i.log" &
    done
    wait
    cat /tmp/kvpress_"${name}"_d*.log
  else
    kvpress_run "$DEVICE" "$TASKS" "$RUNS/$name"
  fi
  ;;
workers)
  # the eval step's grid (same variables) into fresh folders workers_<k>, with k worker processes sharing one
  # device; a small model leaves a GPU idle between its short steps, more workers fill it
  unit=${DEVICE#cuda}; unit=${unit#:}; unit=${unit:-0}  # DEVICE cuda / cuda:N: that GPU; cpu: CPU workers
  [ "$DEVICE" = cpu ] && unit=cpu
  for k in ${WORKERS//,/ }; do
    devs=$(for _ in $(seq "$k"); do printf '%s,' "$unit"; done)
    rm -rf "$RUNS/workers_$k"
    t0=$(date +%s%N)
    if [ "$k" -gt 1 ]; then DEVICES=${devs%,} bash "$0" eval "workers_$k"; else env -u DEVICES bash "$0" eval "workers_$k"; fi \
      > "$RUNS/workers_$k.log" 2>&1
    echo "workers $k: $(( ($(date +%s%N) - t0) / 1000000 )) ms wall, $(cat "$RUNS/workers_$k/results.jsonl" 2>/dev/null \
      | wc -l) rows (log: $RUNS/workers_$k.log)"
  done
  ;;
dpcheck)
  # the same small sweep three ways: one GPU, two worker processes (--devices 0,1), two torchrun ranks (NCCL)
  base=$RUNS/dpcheck
  grid=(--model "$MODEL" --tasks needle,docqa --settings aware --methods full,uniform,optimal --scorers snapkv
        --ratios 0.8 --samples 3 --context-tokens "$CTX" --profile "$(profile_for aware)" --no-progress)
  python3 -m depthkv eval "${grid[@]}" --device cuda:0 --out "$base/one" | tail -n 3
  python3 -m depthkv eval "${grid[@]}" --devices 0,1 --out "$base/devices" | tail -n 3
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m depthkv eval "${grid[@]}" --device cuda \
    --out "$base/torchrun" | tail -n 3
  python3 benchmarks/same_rows.py "$base/one" "$base/devices" "$base/torchrun"
  ;;
collect)
  dest=${2:-${OUT:?give a folder or set OUT}}
  mkdir -p "$dest"
  # one archive: the device tool returns few files (results, configs and profiles of every run)
  (cd "$RUNS" && find . -maxdepth 3 \( -name 'results*.jsonl' -o -name config.json -o -name 'profile_*.json' \) \
    -print0 | tar --null -czf "$dest/runs.tgz" -T -)
  ls -la "$dest"
  ;;
restore)
  src=${2:-.gpu_runs}
  [ -d "$src" ] || { echo "restore: no folder $src" >&2; exit 2; }
  for d in "$src"/*/; do
    d=${d%/}; name=$(basename "$d")
    dest=$([ "$name" = runs ] && echo "$RUNS" || echo "/root/$name")
    mkdir -p "$dest" && cp -r "$d"/. "$dest"/ && echo "restored $d -> $dest"
  done
  ;;
*)
  echo "usage: $0 calibrate aware|agnostic | eval NAME | kvpress [NAME] | workers | dpcheck | collect [DIR] | restore [SRC]" >&2
  exit 2 ;;
esac
