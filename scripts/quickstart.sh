#!/usr/bin/env bash
# The main job on the embedded tiny default. Until the miniature D2F world lands (issue 9), this
# writes tiny random checkpoints in the original formats, decodes with them through the real
# loading and decoding paths, and benchmarks every strategy side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${D2F_THREADS:-1}"
out="${1:-outputs/tiny}"
python -m d2f.tiny "$out"
python -m d2f.generate --model "$out/llada" --prompt "how many apples are 12 + 30 ?" \
  --block_size 4 --max_new_tokens 16 --picture "$out/decode.png"
python scripts/bench_decode.py --batch_sizes 1 16 --repeats 1
