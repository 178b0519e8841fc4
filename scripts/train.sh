#!/usr/bin/env bash
# Train with d2f (python -m d2f.train) through accelerate.
#
#   bash scripts/train.sh [FLAGS] [PRESET] [key=value ...]     (flags may also come after overrides)
#
#   PRESET        llada | dream | tiny | dparallel_llada | dparallel_dream | d3llm_llada |
#                 d3llm_dream | fast_dllm_v2 | tinyworld_fdv2 (d2f/configs/PRESET.yaml; default llada)
#   key=value     Hydra overrides, e.g. model.path=... train.max_steps=100 (docs/training.md)
#   --launcher L  auto (default: ddp with more than one GPU, else one process) | none | ddp | zero2 |
#                 fsdp (d2f/configs/accelerate/L.yaml) | cpu (gloo processes on the CPU)
#   --nproc N     processes (default: the number of GPUs, or 1)
#   --port P      rendezvous port of the processes (default 29500)
#   --dry-run     print the resolved config and the launch command, train nothing
#   --help        this text, then as --dry-run
#   --            everything after it is passed to the trainer as is
#
# Paths in overrides are relative to the repository root. Environment: PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

# the comment block at the top of this file, without its '#' (stops at the first code line)
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

need_value() { [[ $# -ge 2 && "$2" != -* ]] || { echo "train.sh: $1 needs a value" >&2; exit 2; }; }

launcher=auto nproc="" port=29500 dry=0 preset="" overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; echo; dry=1; shift ;;
    --dry-run) dry=1; shift ;;
    --launcher) need_value "$@"; launcher="$2"; shift 2 ;;
    --nproc) need_value "$@"; nproc="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --) shift; overrides+=("$@"); break ;;
    -*) echo "train.sh: unknown flag $1" >&2; usage >&2; exit 2 ;;
    *)
      if [[ -z "$preset" && ${#overrides[@]} -eq 0 && "$1" != *=* ]]; then preset="$1"
      else overrides+=("$1"); fi
      shift ;;
  esac
done
set -- ${overrides[@]+"${overrides[@]}"}
preset="${preset:-llada}"
if [[ ! -f "d2f/configs/$preset.yaml" ]]; then
  echo "train.sh: no preset d2f/configs/$preset.yaml (have: $(cd d2f/configs && ls *.yaml | sed 's/.yaml//' | xargs))" >&2
  exit 2
fi

gpus=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | wc -l) || echo 0)
nproc="${nproc:-$((gpus > 0 ? gpus : 1))}"
if [[ "$launcher" == auto ]]; then
  launcher=$([[ "$gpus" -gt 1 ]] && echo ddp || echo none)
fi

train=(-m d2f.train --config-name "$preset" "$@")
case "$launcher" in
  none) cmd=("$PYTHON" "${train[@]}") ;;
  ddp | zero2 | fsdp)
    cmd=("$PYTHON" -m accelerate.commands.launch --config_file "d2f/configs/accelerate/$launcher.yaml"
      --num_processes "$nproc" --main_process_port "$port" "${train[@]}") ;;
  cpu)  # NOTE: `accelerate launch --cpu --num_processes 2` starts ONE process (upstream issue)
    cmd=(env ACCELERATE_USE_CPU=1 "$PYTHON" -m accelerate.commands.launch --multi_gpu
      --num_processes "$nproc" --num_machines 1 --mixed_precision no --dynamo_backend no
      --main_process_port "$port"
      "${train[@]}") ;;
  *) echo "train.sh: unknown launcher $launcher (none, ddp, zero2, fsdp, cpu)" >&2; exit 2 ;;
esac

if [[ "$dry" == 1 ]]; then
  echo "# resolved config (d2f/configs/$preset.yaml + overrides)"
  "$PYTHON" -m d2f.train --config-name "$preset" "$@" dry_run=true
  echo "# launch command"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
