#!/usr/bin/env bash
# Train several recipes (training/variants.py) side by side on one machine, then compare them.
#
#   bash scripts/train_variants.sh WORK_DIR MINUTES [VARIANT ...] [-- extra training.train args]
#
# Each variant runs scripts/train_gpu.sh WORK_DIR/<variant>/ckpt MAX_CONTEXT MINUTES <its args> at
# the same time as the others (the model is small: concurrent processes share one GPU; with several
# GPUs, variant i gets GPU i mod count). Each writes a complete checkpoint folder, train.log and
# train_summary.json, exactly as a single run does. Then `python -m training.variants summarize`
# writes WORK_DIR/variants_summary.{json,md}: every variant's accuracy table by task and context,
# and the best by mean accuracy at the trained length.
#   VARIANT:     names from `python -m training.variants list` (default: its `default` set)
#   MAX_CONTEXT: env, default 2048.  PYTHON: env, the interpreter (default python3).
#   PACK_TO:     env, a folder that also gets <variant>.tar per variant (its ckpt/, train.log,
#                train_summary.json; cut into 15 MiB .tar.part-NNN files when larger) and the summary files:
#                few files of a bounded size for a size-limited transfer (`python -m training.variants unpack`
#                joins and extracts them). The long-context stages, one device call each, e.g.
#                DEADLINE_S=570 PACK_TO=$OUT bash scripts/train_variants.sh /tmp/v 8.5 ruler-4k -- --attention mask
#                ... 8.5 ruler-16k-continue -- --init-from <unpacked>/ruler-4k/ckpt
#   DEADLINE_S:  env, seconds from this script's start after which a variant still running is stopped
#                (its last snapshot stays; the summary says it has no final evaluation), so the summary
#                and packing always happen inside a caller's time limit. Default: MINUTES x 60 + 60.
# Data workers: the cores (nproc) split among the variants, two each kept for its trainer, 1-4 each (16 cores,
# 3 variants: 3 each; the shipped run's 4 workers waited 6 s in all, mostly at start-up).
# MINUTES bounds each run from its start of training; start-up adds ~20-30 s before that clock.
# A CPU smoke run of the default variants as tiny models (~1 min on 2 cores; later flags win, so the
# extra arguments replace the recipe's device, size, batch and workers; the full curriculum to 2048 runs,
# since the recipes' --level-shares name its 6 levels):
#   PYTHON=.venv/bin/python bash scripts/train_variants.sh /tmp/v 0.75 -- --device cpu --hidden 32 --layers 2 \
#     --heads 4 --kv-heads 2 --head-dim 8 --intermediate 64 --tokens-per-batch 1024 --data-workers 0 \
#     --eval-per-task 2 --final-per-task 2 --final-contexts 128 256 --final-eval-seconds 10
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/train_variants.sh WORK_DIR MINUTES [VARIANT ...] [-- extra training.train args]"
work=${1:?$usage}
minutes=${2:?$usage}
shift 2
variants=()
while [[ $# -gt 0 && $1 != "--" ]]; do variants+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
extra=("$@")
py=${PYTHON:-python3}
max_context=${MAX_CONTEXT:-2048}
started=$SECONDS
deadline=${DEADLINE_S:-$("$py" -c "import sys; print(int(float(sys.argv[1]) * 60 + 60))" "$minutes")}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [[ ${#variants[@]} -eq 0 ]]; then read -r -a variants <<< "$("$py" -m training.variants default)"; fi
declare -A variant_args
for v in "${variants[@]}"; do  # every name checked before anything starts
  variant_args[$v]=$("$py" -m training.variants args "$v")
done
n=${#variants[@]}
cores=$(nproc)
workers=$(( (cores - 2 * n) / n ))
(( workers > 4 )) && workers=4
(( workers < 1 )) && workers=1
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
mkdir -p "$work"
echo "training ${variants[*]} in $work: $minutes min each, max context $max_context, $workers data workers each" \
     "($cores cores), $([[ $gpus -gt 1 ]] && echo "$gpus GPUs, one per variant in turn" || echo "one device shared");" \
     "deadline ${deadline} s"
launcher=()
if command -v setsid > /dev/null; then
  launcher=(setsid)
else
  echo "no setsid here: a variant past the deadline can only be stopped at its shell, not its trainer"
fi
pids=()
stopped=()
for i in "${!variants[@]}"; do
  v=${variants[$i]}
  mkdir -p "$work/$v"
  rm -f "$work/$v/train.log" "$work/$v/train_summary.json"  # never read an older run's results
  read -r -a vargs <<< "${variant_args[$v]}"
  gpu_env=()
  if (( gpus > 1 )); then gpu_env=("CUDA_VISIBLE_DEVICES=$(( i % gpus ))"); fi
  # Each trainer's torch keeps to a few threads: the cores belong to the data workers. setsid: each
  # variant (bash, python, tee, data workers) is one process group, so the deadline can stop it whole.
  ${launcher[@]+"${launcher[@]}"} env ${gpu_env[@]+"${gpu_env[@]}"} OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHON="$py" \
    bash scripts/train_gpu.sh "$work/$v/ckpt" "$max_context" "$minutes" ${vargs[@]+"${vargs[@]}"} \
    --data-workers "$workers" ${extra[@]+"${extra[@]}"} > /dev/null 2> "$work/$v/stderr.txt" &
  pids+=($!)
  echo "  $v (pid ${pids[-1]}): ${variant_args[$v]:-(the shipped recipe)}"
done

# Progress: each variant's latest step / evaluation line every minute until all have ended.
running=$n
while (( running > 0 )); do
  for _ in $(seq 60); do
    running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=$(( running + 1 )); done
    (( running == 0 )) && break
    if (( SECONDS - started >= deadline )); then
      for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
          echo "${variants[$i]}: still running at the ${deadline} s deadline; stopping it (its last snapshot stays)"
          stopped[$i]=1
          kill -TERM -- "-${pids[$i]}" 2>/dev/null || kill -TERM "${pids[$i]}" 2>/dev/null || true
        fi
      done
      sleep 3
      running=0
      break
    fi
    sleep 1
  done
  (( running == 0 )) && break
  for v in "${variants[@]}"; do
    last=$(grep -E '^(step|\[eval|\[level)' "$work/$v/train.log" 2>/dev/null | tail -n 1 | cut -c1-150 || true)
    echo "  [$v] ${last:-starting}"
  done
done
status=0
for i in "${!variants[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if (( rc == 0 )); then
    echo "${variants[$i]}: finished"
  elif [[ -n ${stopped[$i]:-} ]]; then
    status=1
    echo "${variants[$i]}: stopped at the deadline"
  else
    status=1
    echo "${variants[$i]}: FAILED (exit $rc); last lines of $work/${variants[$i]}/train.log and stderr.txt:"
    tail -n 5 "$work/${variants[$i]}/train.log" 2>/dev/null || true
    tail -n 5 "$work/${variants[$i]}/stderr.txt" 2>/dev/null || true
  fi
done
"$py" -m training.variants summarize "$work" --variants "${variants[@]}" ${PACK_TO:+--pack-to "$PACK_TO"}
exit $status
