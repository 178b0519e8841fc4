#!/usr/bin/env bash
# CI check that d2f works as an installed package, not only as a checkout: build the wheel, install
# it NON-editable into a clean virtual environment, and from a directory outside the repository run a
# short `python -m d2f.train` on the tiny preset, a short quickstart and `python -m d2f.eval` on a
# tiny checkpoint. The wheel must hold no top-level package but `d2f`.
#
#   bash scripts/check_installed.sh [WORK_DIR]     (default: build/installed-check)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="$(realpath -m "${1:-build/installed-check}")"
rm -rf "$WORK" && mkdir -p "$WORK/wheel" "$WORK/run"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

echo "== build the wheel"
python -m pip wheel --no-deps --quiet -w "$WORK/wheel" .
WHEEL="$(ls "$WORK"/wheel/d2f-*.whl)"
python - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))})
assert top == ["d2f"], f"wheel top-level entries: {top} (only d2f expected)"
for need in ("d2f/configs/tiny.yaml", "d2f/configs/accelerate/ddp.yaml",
             "d2f/lmeval/tasks/d2f_tiny_add.yaml", "d2f/lmeval/tasks/data/gsm8k_local.jsonl",
             "d2f/tinyworld/assets/teacher/model.safetensors",
             "d2f/tinyworld/assets/chain/teacher/model.safetensors",
             "d2f/tinyworld/assets/chain/ar/tokenizer.json",
             "d2f/tinyworld/assets/chain/manifest.json"):
    assert need in names, f"wheel lacks {need}"
print(f"wheel ok: {len(names)} files, top level {top}")
PY

echo "== install it non-editable into a clean venv"
python -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
"$VPY" -m pip install --quiet "$WHEEL"

cd "$WORK/run"  # outside the repository: nothing may be read from the checkout
"$VPY" - "$REPO" "$WORK/venv" <<'PY'
import sys, d2f
repo, venv = sys.argv[1:]
assert d2f.__file__.startswith(venv) and not d2f.__file__.startswith(f"{repo}/d2f/"), d2f.__file__
print("d2f imported from", d2f.__file__)
PY
echo "== python -m d2f.train (tiny preset)"
"$VPY" -m d2f.tiny tiny
"$VPY" - <<'PY'
import json
with open("qa.jsonl", "w") as f:
    for a in range(8):
        f.write(json.dumps({"question": f"what is {a} plus 1 ?", "qwen7b_answer": f"{a + 1}"}) + "\n")
PY
"$VPY" -m d2f.train --config-name tiny model.path=tiny/llada "data.sources=[qa.jsonl]" \
  train.max_steps=3 train.save_every=3 train.output_dir=train_run
test -d train_run/checkpoint-000003/adapter
echo "== python -m d2f.tinyworld.quickstart (shrunk)"
"$VPY" -m d2f.tinyworld.quickstart --out quickstart --n 4 --big_batch 2 --student_steps 4 \
  --time_n 2 --repeats 1
test -f quickstart/results/table.md
echo "== python -m d2f.eval"
"$VPY" -m d2f.eval --model d2f \
  --model_args pretrained=tiny/llada,strategy=d2f,block_size=4,max_new_tokens=8 \
  --tasks d2f_gsm8k_local --limit 2 --output_path eval_run
test -f eval_run/d2f_speed.json
echo "installed-package check passed"
