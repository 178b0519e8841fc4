#!/usr/bin/env bash
# The main job: D2F's whole story in the miniature world, on a CPU, in minutes (docs/tinyworld.md).
# From the shipped pretrained tiny teacher: distil a D2F student with scripts/train.sh, evaluate
# vanilla / Fast-dLLM / D2F without distillation / cache-only / D2F / AR through lm-eval, and write
# the table and a decode picture to outputs/tinyworld/results/.
#
#   bash scripts/quickstart.sh [--fresh] [--threads N] [--out DIR] [--n N]   (--help for all)
#
# --fresh also retrains the teacher and the AR baseline (python -m d2f.tinyworld.pretrain).
# D2F_THREADS sets the torch thread count (default 1: safest on a busy 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${D2F_THREADS:-1}" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the miniature world needs nothing from the hub
exec "${PYTHON:-python}" -m d2f.tinyworld.quickstart "$@"
