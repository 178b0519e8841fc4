#!/usr/bin/env bash
# Prepare a scratch directory for the side-by-side run (see README.md): the two peer venvs and the
# peers' repositories at the exact commits read. Needs network (GitHub, PyPI, the PyTorch index).
#
#   bash scripts/side_by_side/setup.sh SCRATCH
#
# PEER_SRC=DIR  link SCRATCH/{fastdllm,fastdllm-fork,d3llm} to DIR/<same name> instead of cloning
#               (a checkout or an export of the same commits, e.g. on a machine without GitHub).
# An existing SCRATCH/venv or SCRATCH/venv-v2 (or a link to one) is kept as it is.
# PYTHON (default python3) makes the venvs; TORCH_INDEX is the extra index for torch's CPU wheel.
set -euo pipefail
SCRATCH="$(realpath -m "${1:?usage: setup.sh SCRATCH}")"
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
mkdir -p "$SCRATCH"

# name, repository, commit, where else the commit can be fetched from (Fast-dLLM 5332e2fc, by its
# authors, was read through the fork's history: the NVlabs snapshot at hand predates it).
PEERS=(
  "fastdllm https://github.com/NVlabs/Fast-dLLM 5332e2fc0edad553a5ac4fae6d6ec7b8cefc410a https://github.com/wangziyannb/Fast-dLLM"
  "fastdllm-fork https://github.com/wangziyannb/Fast-dLLM fd27cb3b4cb017db5058cd97ff315e67ba14e6ff -"
  "d3llm https://github.com/hao-ai-lab/d3LLM e5bfcaccb775ee75759c24ccc9a28218b8372b34 -"
  "d2f-authors https://github.com/zhijie-group/Discrete-Diffusion-Forcing 771f745f6770230dd6ea6a283519b31c5d57e6ed -"
)
for peer in "${PEERS[@]}"; do
  read -r name url commit also <<<"$peer"
  dest="$SCRATCH/$name"
  if [[ -n "${PEER_SRC:-}" ]]; then
    ln -sfn "$(realpath "$PEER_SRC/$name")" "$dest"
    echo "$name: linked to $(realpath "$PEER_SRC/$name") (not cloned; its commit is not checked)"
    continue
  fi
  [[ -d "$dest/.git" ]] || git clone "$url" "$dest"
  if ! git -C "$dest" checkout --quiet "$commit" 2>/dev/null; then
    [[ "$also" != - ]] || { echo "$name: commit $commit not found in $url" >&2; exit 1; }
    git -C "$dest" fetch "$also" "$commit" && git -C "$dest" checkout --quiet "$commit"
  fi
  echo "$name: $url @ $(git -C "$dest" rev-parse HEAD)"
done

make_venv() {  # NAME REQUIREMENTS
  local dir="$SCRATCH/$1"
  if [[ -x "$dir/bin/python" ]]; then
    echo "$1: kept ($(realpath "$dir"))"
    return
  fi
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install --extra-index-url "$TORCH_INDEX" -r "$HERE/$2"
}
make_venv venv requirements-peers.txt
make_venv venv-v2 requirements-peers-v2.txt
for v in venv venv-v2; do
  "$SCRATCH/$v/bin/python" -c "import torch, transformers; print('$v: torch', torch.__version__, 'transformers', transformers.__version__)"
done
