#!/usr/bin/env bash
# Install d2f into the active Python environment.
# CPU machines get the CPU wheel of torch 2.13.0 (any other version pulls GBs of CUDA packages);
# where torch is already installed (a GPU machine), that torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[dev]"
