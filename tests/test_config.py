"""Trainer configs: presets reproduce the released recipe, typos and bad values fail fast by key."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hydra.errors import ConfigCompositionException

from d2f.config import FAMILIES, load_config
from d2f.family import SPECS
from tests.train_helpers import REPO, TINY_QA


def test_released_recipe_presets():
    llada = load_config("llada")
    assert llada.model.path == "GSAI-ML/LLaDA-8B-Instruct" and llada.model.family == "llada"
    assert llada.data.sources == [
        "Lansechen/bs17k_collection_filtered_hard_maxlength600",
        "Lansechen/bs17k_collection_filtered_easy_maxlength600",
    ]
    assert (llada.data.question_field, llada.data.answer_field) == ("question", "qwen7b_answer")
    assert llada.data.max_length == 1024 and llada.data.chat_template is True
    t = llada.train
    assert (t.objective, t.max_steps, t.save_every, t.micro_batch_size) == (
        "distill",
        50_000,
        1000,
        1,
    )
    assert (t.lr, t.lr_schedule, t.warmup_steps) == (1e-5, "constant", 0)
    assert (t.beta1, t.beta2, t.adam_eps, t.weight_decay, t.clip_grad_norm) == (
        0.9,
        0.95,
        1e-8,
        0.05,
        1.0,
    )
    assert t.mixed_precision == "bf16" and llada.model.dtype == "bfloat16"
    n = t.noise
    assert (n.schedule, n.block_size, n.lo, n.hi, n.mask_padding) == ("ramp", 16, 0.2, 0.7, True)
    assert (t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules) == (32, 32, 0.1, None)
    dream = load_config("dream")
    assert dream.model.path == "Dream-org/Dream-v0-Base-7B" and dream.model.family == "dream"
    assert dream.train.lr == 5e-6 and dream.data == llada.data
    assert dream.train.noise == llada.train.noise and dream.train.lora == llada.train.lora


def test_tiny_preset_and_groups(tiny_dir):
    cfg = load_config("tiny", [f"model.path={tiny_dir('llada')}"])
    assert cfg.train.objective == "distill" and cfg.data.sources == ["tests/data/tiny_qa.jsonl"]
    mdm = load_config(
        "tiny", [f"model.path={tiny_dir('llada')}", "train=tiny_mdm", "model.init=scratch"]
    )
    assert (mdm.train.objective, mdm.train.lr_schedule, mdm.train.noise.schedule) == (
        "mdm",
        "cosine",
        "single",
    )
    assert (
        load_config("tiny", [f"model.path={tiny_dir('ar')}", "train=tiny_ar"]).train.objective
        == "ar"
    )


def test_registries_are_derived_from_their_modules():
    import d2f.config
    from d2f.objectives import OBJECTIVES

    assert FAMILIES == tuple(SPECS)
    assert d2f.config.OBJECTIVES == tuple(OBJECTIVES)


def test_unknown_key_added_with_plus_fails():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['train.foo'\]"):
        load_config("llada", ["+train.foo=1"])
    with pytest.raises(ValueError, match=r"\['train.noise.bar'\]"):
        load_config("llada", ["+train.noise.bar=2"])


def test_misspelt_key_fails():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        load_config("llada", ["train.lrr=1e-4"])
    with pytest.raises(ConfigCompositionException, match="blocksize"):
        load_config("llada", ["train.noise.blocksize=8"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.family=gpt2", "model.family"),
        ("train.noise.schedule=cosine", "train.noise.schedule"),
        ("train.objective=sft", "train.objective"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-5", "train.lr"),
        ("train.noise.lo=-0.1", "train.noise.lo"),
        ("train.noise.hi=1.5", "train.noise.hi"),
        ("train.noise.lo=0.8", r"train.noise.lo must be <= train.noise.hi"),
        ("train.noise.block_size=0", "train.noise.block_size"),
        ("train.noise.block_size=-4", "train.noise.block_size"),
        ("data.sources=[/no/such/data.jsonl]", r"data.sources\[0\]"),
        ("data.sources=[]", "data.sources"),
        ("model.path=/no/such/checkpoint", "model.path"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("data.max_length=0", "data.max_length"),
        ("train.lora.r=0", "train.lora.r"),
        ("train.lora.dropout=1.0", "train.lora.dropout"),
        ("train.resume=/no/such/checkpoint", "train.resume"),
        ("model.init=scratch", "model.init"),
        ("train.mixed_precision=fp16", "train.mixed_precision"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite"),
    ],
)
def test_bad_value_fails_fast_naming_the_key(override, key):
    load_config("llada")  # warm Hydra up: the time below is composition + validation only
    start = time.perf_counter()
    with pytest.raises(ValueError, match=key):
        load_config("llada", [override])
    # composition + validation only (no weights, no data): well under a second on an idle machine;
    # 5 s leaves room for a loaded 2-core CI box
    assert time.perf_counter() - start < 5.0


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="train.lr=fast"):
        load_config("llada", ["train.lr=fast"])


def test_train_sh_help_prints_config_and_command(tmp_path):
    """`bash scripts/train.sh --help` prints usage, the resolved config and the launch command, and
    trains nothing; its flags are read wherever they stand."""
    out_dir = tmp_path / "never_written"
    # flags after the overrides are read too
    cmd = ["bash", "scripts/train.sh", "--help", "llada", f"train.output_dir={out_dir}",
           "train.max_steps=10", "--launcher", "ddp", "--nproc", "8"]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "bash scripts/train.sh [FLAGS] [PRESET]" in out  # usage
    assert "set -euo pipefail" not in out  # only the comment block
    assert "path: GSAI-ML/LLaDA-8B-Instruct" in out and "max_steps: 10" in out
    assert "- Lansechen/bs17k_collection_filtered_easy_maxlength600" in out
    launch = out.split("# launch command")[1]
    assert "accelerate.commands.launch --config_file d2f/configs/accelerate/ddp.yaml" in launch
    assert "--num_processes 8" in launch and "-m d2f.train --config-name llada" in launch
    assert not out_dir.exists()
    bad = subprocess.run(["bash", "scripts/train.sh", "--dry-run", "nosuchpreset"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and "no preset d2f/configs/nosuchpreset.yaml" in bad.stderr


def test_tiny_data_file_is_shipped():
    assert TINY_QA.exists() and len(TINY_QA.read_text().splitlines()) == 256
