#!/usr/bin/env bash
# Run the released peer decoders (SCRATCH's venvs, from setup.sh) beside d2f's ports (d2f's venv) on
# the same tiny checkpoints and prompts, and print one comparison line per setting (see README.md).
#
#   bash scripts/side_by_side/run.sh SCRATCH [PART ...]
#
# PARTS (default all): fastdllm_llada d3llm fastdllm_dream fastdllm_v2 dual_bound
# SHARPENS (default "12 60 60eos") limits the checkpoints of the LLaDA and Dream parts.
# D2F (default: this checkout) and PY_D2F (default: D2F/.venv/bin/python, else python) run d2f.
# Outputs: SCRATCH/ckpt, SCRATCH/results/*.json, each script's output in SCRATCH/logs.
set -euo pipefail
SCRATCH="$(realpath "${1:?usage: run.sh SCRATCH [PART ...]}")"
shift
PARTS=" ${*:-fastdllm_llada d3llm fastdllm_dream fastdllm_v2 dual_bound} "
SHARPENS=" ${SHARPENS:-12 60 60eos} "
HERE="$(cd "$(dirname "$0")" && pwd)"
D2F="${D2F:-$(cd "$HERE/../.." && pwd)}"
PY_D2F="${PY_D2F:-$D2F/.venv/bin/python}"
[[ -x "$PY_D2F" ]] || PY_D2F=python
export SBS_SCRATCH="$SCRATCH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$SCRATCH/logs"

part() { [[ "$PARTS" == *" $1 "* ]]; }
level() { [[ "$SHARPENS" == *" $1 "* ]]; }
logged() {  # LOG CMD...: CMD's output to SCRATCH/logs/LOG.log; its tail on failure
  "${@:2}" >"$SCRATCH/logs/$1.log" 2>&1 || { tail -n 20 "$SCRATCH/logs/$1.log" >&2; exit 1; }
}
ours() { PYTHONPATH="$D2F" "$PY_D2F" "$HERE/$1" "${@:2}"; }  # d2f's venv, this d2f checkout
theirs() { "$SCRATCH/venv/bin/python" "$HERE/$1" "${@:2}"; }
theirs_v2() { "$SCRATCH/venv-v2/bin/python" "$HERE/$1" "${@:2}"; }
compare() { echo "== $1"; "$PY_D2F" "$HERE/compare.py" "$2" "$3"; }

echo "d2f: $D2F @ $(git -C "$D2F" rev-parse --short HEAD 2>/dev/null || echo '?'); scratch: $SCRATCH"
logged make_ckpt ours make_ckpt.py

if part fastdllm_llada || part d3llm; then
  for s in 12 60 60eos; do
    level "$s" || continue
    if [[ $s == 60eos ]]; then  # the end-token variant is built from their x60 Fast-dLLM answers
      [[ -f "$SCRATCH/results/theirs_fastdllm_s60.json" ]] ||
        SHARPEN=60 logged theirs_fastdllm_s60 theirs theirs_llada.py fastdllm
      logged make_eos_ckpt ours make_eos_ckpt.py
    fi
    for m in fastdllm d3llm; do
      part "$([[ $m == fastdllm ]] && echo fastdllm_llada || echo d3llm)" || continue
      SHARPEN=$s logged "theirs_${m}_s$s" theirs theirs_llada.py "$m"
      SHARPEN=$s logged "ours_${m}_s$s" ours ours.py "$m"
      compare "LLaDA x$s: $([[ $m == fastdllm ]] && echo Fast-dLLM v1 || echo d3LLM)" \
        "theirs_${m}_s$s" "ours_${m}_s$s"
    done
  done
fi

if part fastdllm_dream; then
  for s in 12 60; do
    level "$s" || continue
    SHARPEN=$s logged "theirs_fastdllm_dream_s$s" theirs theirs_dream.py
    SHARPEN=$s logged "ours_fastdllm_dream_s$s" ours ours.py fastdllm_dream
    compare "Dream x$s: Fast-dLLM v1" "theirs_fastdllm_dream_s$s" "ours_fastdllm_dream_s$s"
  done
fi

if part fastdllm_v2; then  # x60 only; venv-v2 (transformers 4.53.1) for their model class
  export SHARPEN=60
  logged theirs_v2_logits theirs_v2 theirs_v2.py logits
  ours ours_v2.py logits
  logged theirs_v2_s60 theirs_v2 theirs_v2.py
  logged ours_v2_s60 ours ours_v2.py
  logged ours_v2_aligned_s60 ours ours_v2.py aligned
  compare "Dream x60: Fast-dLLM v2" theirs_v2_s60 ours_v2_s60
  compare "Dream x60: Fast-dLLM v2, d2f prompt split into blocks from position 0" \
    theirs_v2_s60 ours_v2_aligned_s60
  unset SHARPEN
fi

if part dual_bound; then
  echo "== LLaDA x60: Fast-dLLM v1 dual-cache step bound"
  SHARPEN=60 theirs theirs_dual_bound.py
fi
