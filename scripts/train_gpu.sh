#!/usr/bin/env bash
# Train the bundled block-diffusion retrieval model on one GPU, in one call of under 9.5 minutes.
#
#   bash scripts/train_gpu.sh OUT_DIR [MAX_CONTEXT=2048] [MINUTES=8.75] [extra training.train args...]
#
# Several recipes side by side in one call: scripts/train_variants.sh (named recipes: training/variants.py).
# Writes the checkpoint to OUT_DIR (config.json, model.safetensors, HF tokenizer files, README.md,
# training_log.json, demo_prompts.json), and next to it train_summary.json (accuracy table by task and
# context, steps, params, wall time) and train.log. MINUTES bounds the whole run from the start of
# training (8 min of training + 45 s for the final save and evaluation); imports and CUDA start-up
# add ~10-20 s before the clock. A snapshot is saved every minute, so a killed run still leaves a model.
# PYTHON overrides the interpreter (default python3). Extra arguments override the recipe's (later
# flags win), e.g. a CPU smoke run of this exact command:
#   PYTHON=.venv/bin/python bash scripts/train_gpu.sh /tmp/t/ckpt 256 0.5 --device cpu --hidden 32 --layers 2 \
#     --heads 4 --kv-heads 2 --head-dim 8 --intermediate 64 --data-workers 1 --eval-per-task 2 --final-per-task 2
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:?usage: bash scripts/train_gpu.sh OUT_DIR [MAX_CONTEXT] [MINUTES]}
max_context=${2:-2048}
minutes=${3:-8.75}
shift $(( $# < 3 ? $# : 3 ))
parent=$(dirname "$ckpt")
mkdir -p "$parent"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# Recipe (why: training/train.py docstring): 4.75M-param Qwen3 (6 layers, hidden 256, 8/4 heads of 32),
# block 4; curriculum pass key alone at 128 tokens -> all four tasks at 128 -> 256 -> ... -> MAX_CONTEXT,
# each level left when every task reaches 0.9 validation accuracy (evaluated every 15 s) or by a time
# floor reaching MAX_CONTEXT at 80% of training (one level per 16%); 16K tokens per step (128 examples at 128 tokens,
# 8 at 2048), batches made ahead by 4 worker processes.
"${PYTHON:-python3}" -m training.train \
  --out "$ckpt" --summary-json "$parent/train_summary.json" --device cuda \
  --minutes "$minutes" --final-eval-seconds 45 --save-every 60 \
  --hidden 256 --layers 6 --heads 8 --kv-heads 4 --head-dim 32 --intermediate 768 --block-size 4 \
  --max-context "$max_context" --min-context 128 --warmup-tasks passkey \
  --advance-at 0.9 --ramp-end 0.8 --replay 0.2 --min-task-weight 0.15 \
  --tokens-per-batch 16384 --max-batch 256 --noisy-copies 4 --data-workers 4 \
  --lr 2e-3 --warmup 0.02 --min-lr-ratio 0.1 --weight-decay 0.1 --clip 1.0 \
  --eval-every 15 --eval-per-task 32 --final-per-task 64 --log-every 100 \
  "$@" 2>&1 | tee "$parent/train.log"
