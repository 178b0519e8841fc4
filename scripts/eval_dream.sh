#!/usr/bin/env bash
# D2F-Dream on the paper's benchmarks with the paper's settings (Table 8), for D2F and for the
# baseline (`vanilla`: the base model, blocks of 32, one token per step), then the results table.
#
#   bash scripts/eval_dream.sh                              # all tasks, D2F and vanilla, 1 GPU
#   TASKS="gsm8k_cot mbpp" LIMIT=50 NUM_GPUS=8 bash scripts/eval_dream.sh
#   DRY_RUN=1 bash scripts/eval_dream.sh                    # print the commands, run nothing
#
# Overrides: MODEL, ADAPTER, TASKS (from: gsm8k_cot mbpp humaneval minerva_math), STRATEGIES (d2f
# cache_only vanilla), LIMIT, OUTPUT_DIR, NUM_GPUS, BATCH_SIZE, MATH_SHOTS, ENGINE, PYTHON, DRY_RUN.
# As the authors' released script: no chat template anywhere; HumanEval with stop strings off and
# pass@1 after our sanitiser (task d2f_humaneval).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/eval_lib.sh

DEFAULT_MODEL=Dream-org/Dream-v0-Base-7B
DEFAULT_ADAPTER=SJTU-Deng-Lab/D2F_Dream_Base_7B_Lora
DEFAULT_OUTPUT_DIR=outputs/eval/dream
DEFAULT_TASKS="gsm8k_cot mbpp humaneval minerva_math"
MAX_LENGTH=2048 # sequence limit (prompt + answer); prompts are left-truncated to fit

# task -> "lm_eval_task shots max_new_tokens block tau_add tau_act tau_conf chat|plain"
declare -A SETTINGS=(
  [gsm8k_cot]="gsm8k_cot 8 256 32 0.1 0.95 0.9 plain"
  [mbpp]="mbpp 3 256 48 0.1 0.95 0.9 plain"
  [humaneval]="d2f_humaneval 0 256 32 0.9 0.95 0.95 plain"
  [minerva_math]="minerva_math ${MATH_SHOTS:-4} 256 64 0.1 0.95 0.9 plain"
)

eval_main
