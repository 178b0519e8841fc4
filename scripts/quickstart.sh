#!/usr/bin/env bash
# The main job on the embedded tiny default (grows into the miniature D2F world, issue 9).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${D2F_THREADS:-1}"
python -m d2f.tiny "${1:-outputs/tiny}"
