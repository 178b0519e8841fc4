#!/usr/bin/env bash
# Install d2f (editable, with the dev tools) into the active Python environment.
#
# torch: an importable torch is always kept as it is (a GPU machine's own build). Otherwise:
#   - with an NVIDIA driver (nvidia-smi works): torch==$TORCH_VERSION from the configured package
#     source (PyPI's Linux build carries the CUDA libraries);
#   - without one: the CPU build from PyTorch's CPU index when that index is reachable, else
#     torch==$TORCH_VERSION from the configured package source. NOTE: on PyPI the default Linux
#     build is the CUDA one (GBs); this project's CPU machines configure pip with a local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

reachable() {  # is the index answering within 5 s?
  python - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)
PY
}

if python -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: NVIDIA driver found: torch==$TORCH_VERSION from the configured package source"
  pip install "torch==$TORCH_VERSION"
elif reachable "$CPU_INDEX"; then
  echo "install.sh: no NVIDIA driver: the CPU build of torch==$TORCH_VERSION from $CPU_INDEX"
  pip install "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
else
  echo "install.sh: no NVIDIA driver and $CPU_INDEX unreachable:" \
    "torch==$TORCH_VERSION from the configured package source (a CUDA build on plain PyPI)"
  pip install "torch==$TORCH_VERSION"
fi
pip install -e ".[dev]"
