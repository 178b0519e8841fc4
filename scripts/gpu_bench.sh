#!/usr/bin/env bash
# The GPU checks, ready for the first session with a CUDA device (about 5-10 minutes on one H100/H200):
#   1. the gpu-marked tests (bf16 decoding, the flex BlockMask in the model, the exact KV cache);
#   2. the 8B-shaped random LLaDA / Llama (width 4096, 32 layers) in bf16 at batch 1, 8 and 32:
#      AR, D2F eager (dynamic and static cache), D2F compiled (inductor, and CUDA graphs through
#      mode reduce-overhead), each call's time against the weight-bandwidth floor.
# Usage: bash scripts/gpu_bench.sh [extra bench_decode.py flags]   (output: stdout; keep it in docs/)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_bench.sh: no CUDA device visible to torch; nothing to do" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m pytest -q -m gpu tests/test_gpu.py
python scripts/bench_decode.py --hidden 4096 --layers 32 --device cuda --dtype bfloat16 \
  --strategies ar d2f --kv_cache dynamic static --compile off default reduce-overhead \
  --batch_sizes 1 8 32 --max_new_tokens 256 --block_size 32 --repeats 3 "$@"
