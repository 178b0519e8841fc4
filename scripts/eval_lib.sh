# Shared machinery of scripts/eval_llada.sh and scripts/eval_dream.sh (sourced, not run).
#
# The caller defines SETTINGS (an associative array: short task name -> "lm_eval_task shots
# max_new_tokens block_size tau_add tau_act tau_conf chat", the paper's Table 8 row), DEFAULT_TASKS,
# DEFAULT_MODEL, DEFAULT_ADAPTER, MAX_LENGTH (the family's sequence limit), DEFAULT_OUTPUT_DIR,
# then calls `eval_main`. Environment overrides: MODEL, ADAPTER, TASKS, STRATEGIES, LIMIT,
# OUTPUT_DIR, NUM_GPUS, BATCH_SIZE, ENGINE, PYTHON, DRY_RUN. ENGINE: more `DecodeConfig` fields
# for the D2F strategies (not the baseline), e.g. ENGINE=kv_cache=static,compile=default for
# the compiled step (docs/decoding.md, "Static KV cache and compiled step").

# Baseline (`vanilla`): the base model without the adapter, LLaDA's own sampler with blocks of 32
# and one token per step (steps_per_block = block size), under the same generation cap.
VANILLA_BLOCK=32
KNOWN_STRATEGIES="d2f cache_only vanilla"

die() {
  echo "error: $*" >&2
  exit 2
}

# Fail before anything runs: unknown task or strategy, or D2F without an adapter.
check_request() {
  local task strategy
  for task in $TASKS; do
    [[ -v "SETTINGS[$task]" ]] || die "unknown task '$task' in TASKS; known: $DEFAULT_TASKS"
  done
  for strategy in $STRATEGIES; do
    [[ " $KNOWN_STRATEGIES " == *" $strategy "* ]] ||
      die "unknown strategy '$strategy' in STRATEGIES; known: $KNOWN_STRATEGIES"
    if [[ "$strategy" != vanilla && -z "$ADAPTER" ]]; then
      die "strategy '$strategy' needs the D2F adapter: set ADAPTER"
    fi
  done
  [[ -n "$TASKS" ]] || die "TASKS is empty"
  [[ -n "$STRATEGIES" ]] || die "STRATEGIES is empty"
  [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$NUM_GPUS'"
}

# The --model_args of one (strategy, task): every generation setting, named as DecodeConfig's fields.
model_args() {
  local strategy=$1 cap=$2 block=$3 tau_add=$4 tau_act=$5 tau_conf=$6
  local common="dtype=bfloat16,max_new_tokens=$cap,max_length=$MAX_LENGTH"
  case "$strategy" in
    vanilla)
      echo "pretrained=$MODEL,$common,strategy=vanilla,block_size=$VANILLA_BLOCK,steps_per_block=$VANILLA_BLOCK"
      ;;
    *)
      echo "pretrained=$MODEL,adapter=$ADAPTER,$common,strategy=$strategy,block_size=$block,tau_add=$tau_add,tau_act=$tau_act,tau_conf=$tau_conf${ENGINE:+,$ENGINE}"
      ;;
  esac
}

# An argument as the shell reads it back: plain words as they are, anything else quoted.
shell_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=,:+@%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%q' "$1"
  fi
}

# Run (or, with DRY_RUN=1, print on one line) one command.
run_cmd() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local words=() arg
    for arg in "$@"; do
      words+=("$(shell_word "$arg")")
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

eval_task() {
  local strategy=$1 name=$2
  local lm_task shots cap block tau_add tau_act tau_conf chat
  read -r lm_task shots cap block tau_add tau_act tau_conf chat <<<"${SETTINGS[$name]}"
  local launcher=("$PYTHON" -m d2f.eval)
  if ((NUM_GPUS > 1)); then
    launcher=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS" -m d2f.eval)
  fi
  local cmd=() code=0
  case "$lm_task" in
    *humaneval* | *mbpp* | *code*)
      code=1
      cmd+=(env HF_ALLOW_CODE_EVAL=1) # lm-eval's code metrics refuse to run without it
      ;;
  esac
  cmd+=("${launcher[@]}" --model d2f
    --model_args "$(model_args "$strategy" "$cap" "$block" "$tau_add" "$tau_act" "$tau_conf")"
    --tasks "$lm_task" --num_fewshot "$shots" --batch_size "$BATCH_SIZE"
    --output_path "$OUTPUT_DIR/$strategy/$name" --log_samples)
  if [[ "$chat" == chat ]]; then
    cmd+=(--apply_chat_template --fewshot_as_multiturn)
  fi
  if ((code)); then
    cmd+=(--confirm_run_unsafe_code)
  fi
  if [[ -n "$LIMIT" ]]; then
    cmd+=(--limit "$LIMIT")
  fi
  run_cmd "${cmd[@]}"
}

eval_main() {
  MODEL=${MODEL:-$DEFAULT_MODEL}
  ADAPTER=${ADAPTER-$DEFAULT_ADAPTER}
  TASKS=${TASKS:-$DEFAULT_TASKS}
  STRATEGIES=${STRATEGIES:-d2f vanilla}
  OUTPUT_DIR=${OUTPUT_DIR:-$DEFAULT_OUTPUT_DIR}
  NUM_GPUS=${NUM_GPUS:-1}
  BATCH_SIZE=${BATCH_SIZE:-1}
  LIMIT=${LIMIT:-}
  PYTHON=${PYTHON:-python}
  ENGINE=${ENGINE:-}
  [[ -z "$ENGINE" || "$ENGINE" =~ ^[a-z_]+=[A-Za-z0-9_.-]+(,[a-z_]+=[A-Za-z0-9_.-]+)*$ ]] ||
    die "ENGINE must be KEY=VALUE pairs separated by commas (DecodeConfig fields), got '$ENGINE'"
  check_request
  local strategy task
  for task in $TASKS; do
    for strategy in $STRATEGIES; do
      eval_task "$strategy" "$task"
    done
  done
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$PYTHON" -m d2f.lmeval.table "$OUTPUT_DIR" --md "$OUTPUT_DIR/table.md" --csv "$OUTPUT_DIR/table.csv"
  fi
}
