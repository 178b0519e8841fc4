"""The trainer (d2f.train, d2f.objectives, d2f.checkpoint): teacher and student passes, learning,
checkpoints and resume, on tiny original-format checkpoints, one CPU thread."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from d2f.checkpoint import list_checkpoints
from d2f.config import NoiseConfig
from d2f.data import TokenBatch, collate, encode_records, load_records
from d2f.family import family_of
from d2f.loss import distill_terms
from d2f.mask import full_mask
from d2f.models import load_model
from d2f.objectives import (
    forward,
    make_batch,
    student_logits,
    teacher_logits,
)
from d2f.train import lr_factor, main
from tests.train_helpers import (
    REPO,
    TINY_QA,
    kill_and_resume,
    mean,
    read_metrics,
    tiny_config,
    write_sharp_teacher,
)

F32 = torch.float32


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    return write_sharp_teacher(tmp_path_factory.mktemp("sharp") / "llada")


def _adapter(run_dir, step):
    return load_file(run_dir / f"checkpoint-{step:06d}" / "adapter" / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_lr_factor():
    assert [lr_factor(s, 3, 10, "constant", 0.1) for s in range(5)] == [1 / 3, 2 / 3, 1, 1, 1]
    cos = [lr_factor(s, 2, 12, "cosine", 0.1) for s in range(13)]
    assert cos[:3] == [0.5, 1.0, 1.0] and math.isclose(cos[7], 0.55) and math.isclose(cos[12], 0.1)
    assert all(a >= b for a, b in zip(cos[1:], cos[2:], strict=False))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_teacher_is_base_bidirectional_student_block_causal(tiny_dir, family):
    """Teacher = the base model exactly (adapter disabled) and bidirectional; student block-causal.

    Prompt 6 tokens, blocks of 4: answer blocks cover 6-9, 10-13 and 14-17 (row 1 ends in 2 pads).
    Changing token 15 (last block) must leave the student's logits at 0-13 bit-identical, and must
    change the teacher's there.
    """
    path = tiny_dir(family)
    base, _ = load_model(path)
    fam = family_of(base)
    student, _ = load_model(path)
    lora = LoraConfig(r=4, target_modules=list(fam.lora_target_modules), init_lora_weights=False)
    student = get_peft_model(student, lora)  # a non-zero adapter: the student is not the base
    torch.manual_seed(0)
    tokens = TokenBatch(
        torch.randint(10, 100, (2, 18)), torch.tensor([6, 6]), torch.tensor([18, 16])
    )
    batch = make_batch(tokens, fam, NoiseConfig("ramp", 4), torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = teacher_logits(student, batch, F32)
        base_full = forward(base, batch, full_mask(batch.blocks), F32)
        assert torch.equal(teacher, base_full)  # exactly the base model
        changed = dataclasses.replace(batch, noisy_ids=batch.noisy_ids.clone())
        changed.noisy_ids[:, 15] = 7 if changed.noisy_ids[0, 15] != 7 else 8
        s0, s1 = student_logits(student, batch, F32), student_logits(student, changed, F32)
        t1 = teacher_logits(student, changed, F32)
        assert torch.equal(s0[:, :14], s1[:, :14])  # earlier blocks never see a later block
        assert (s0[:, 14:] - s1[:, 14:]).abs().max() > 1e-4  # its own block does
        assert (teacher[:, :14] - t1[:, :14]).abs().max() > 1e-4  # the teacher sees everything
        assert (s0 - teacher).abs().max() > 1e-3


def _fixed_batch_terms(path, adapter, block_size=4, rows=64):
    """distill_terms of the student (base + adapter; None = zero adapter, i.e. step 0) on a fixed
    batch: the first `rows` tiny records with noise from seed 1234."""
    model, tok = load_model(path, adapter=adapter)
    fam = family_of(model)
    if adapter is None:
        model = get_peft_model(model, LoraConfig(r=8, target_modules=list(fam.lora_target_modules)))
    cfg = tiny_config(path, path.parent / "eval").data
    data = encode_records(load_records(cfg), cfg, tok, fam)
    batch = make_batch(
        collate(data, list(range(rows))),
        fam,
        NoiseConfig("ramp", block_size),
        torch.Generator().manual_seed(1234),
    )
    with torch.no_grad():
        s, t = student_logits(model, batch, F32), teacher_logits(model, batch, F32)
        return distill_terms(s, t, batch.masked, batch.p_mask, shift=fam.shift_logits)


def test_distill_200_steps_reduce_the_loss(sharp, tmp_path):
    """200 CPU steps of the tiny preset (LoRA r8, lr 2e-3, batch 8, blocks of 4) on the sharp teacher.

    Measured (2-core CPU, 1 thread, ~4 s of training at ~19 ms/step): on a fixed batch of 64
    sequences the loss went 4.786 -> 3.545 nats and its KL part 1.381 -> 0.141 (-90%), the teacher
    entropy staying 3.404; training-loss means over the first and last 20 steps 3.909 -> 3.434
    (KL 0.551 -> 0.118). Asserted: fixed-batch KL below 0.3x, loss down by > 0.8 nats, training KL
    mean below 0.5x.
    """
    run = tmp_path / "run"
    main(tiny_config(sharp, run, "train.max_steps=200", "train.save_every=200"))
    before = _fixed_batch_terms(sharp, None)
    after = _fixed_batch_terms(sharp, run / "checkpoint-000200" / "adapter")
    # the teacher is the same frozen base before and after: only the KL part can move
    assert math.isclose(before.teacher_entropy, after.teacher_entropy, rel_tol=1e-5)
    assert after.kl < 0.3 * before.kl, (before, after)
    assert after.loss < before.loss - 0.8, (before, after)
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 201))
    assert mean(recs[-20:], "kl") < 0.5 * mean(recs[:20], "kl")
    for r in recs:  # the logged loss is the soft cross-entropy = KL + teacher entropy
        assert math.isclose(r["loss"], r["kl"] + r["teacher_entropy"], rel_tol=1e-4, abs_tol=1e-4)


def test_mdm_teacher_from_scratch_and_ar_baseline_learn(tiny_dir, tmp_path):
    """`mdm` from a config with no weights (model.init=scratch) and the `ar` baseline both learn;
    their checkpoints are whole models in the original format."""
    no_weights = tmp_path / "config_only"
    shutil.copytree(tiny_dir("llada"), no_weights)
    (no_weights / "model.safetensors").unlink()  # config.json and tokenizer files only
    mdm = tmp_path / "mdm"
    main(
        tiny_config(
            no_weights,
            mdm,
            "train=tiny_mdm",
            "model.init=scratch",
            "train.max_steps=60",
            "train.micro_batch_size=16",
            "train.save_every=60",
        )
    )
    recs = read_metrics(mdm)
    assert mean(recs[-10:], "loss") < 0.7 * mean(recs[:10], "loss")
    assert "kl" not in recs[0]
    model, _ = load_model(mdm / "checkpoint-000060" / "model")
    assert family_of(model).name == "llada"
    assert (mdm / "checkpoint-000060" / "model" / "tokenizer_config.json").exists()
    ar = tmp_path / "ar"
    main(
        tiny_config(
            tiny_dir("ar"),
            ar,
            "train=tiny_ar",
            "train.max_steps=40",
            "train.micro_batch_size=16",
            "train.save_every=40",
        )
    )
    recs = read_metrics(ar)
    assert mean(recs[-10:], "loss") < 0.7 * mean(recs[:10], "loss")
    assert family_of(load_model(ar / "checkpoint-000040" / "model")[0]).causal


def test_checkpoint_is_a_loadable_adapter_in_original_naming(sharp, tmp_path):
    run = tmp_path / "run"
    main(tiny_config(sharp, run, "train.max_steps=4", "train.save_every=2", "train.keep_last=1"))
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000004"]  # keep_last=1
    ckpt = run / "checkpoint-000004"
    assert {p.name for p in ckpt.iterdir()} == {"adapter", "state", "config.yaml"}
    cfg = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["attn_out", "k_proj", "q_proj", "v_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == (8, 16, "CAUSAL_LM")
    keys = _adapter(run, 4).keys()
    assert any(".attn_out.lora_B" in k for k in keys) and not any("o_proj" in k for k in keys)
    student, _ = load_model(sharp, adapter=ckpt / "adapter")  # strict key check inside
    base, _ = load_model(sharp)
    ids = torch.randint(10, 100, (1, 12))
    assert (student(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4
    with pytest.raises(
        ValueError, match="differs from .*config.yaml.*\n  data.max_length: 48 -> 40"
    ):
        main(tiny_config(sharp, run, "train.max_steps=6", "data.max_length=40"))


def test_kill_and_resume_gives_the_uninterrupted_run(sharp, tmp_path, monkeypatch):
    """distill killed inside step 7 and resumed: the same numbers at every step (loss, kl, lr, ...)
    and the same adapter as one uninterrupted run (tests/train_helpers.py::kill_and_resume)."""
    kill_and_resume("distill", lambda out, *o: tiny_config(sharp, out, *o), tmp_path, monkeypatch)


def test_accumulation_equals_one_bigger_micro_batch(sharp, tmp_path):
    """micro 2 x accum 2 optimises what micro 4 x accum 1 does (same global batch, same noise)."""
    common = ("train.max_steps=5", "train.save_every=5")
    main(tiny_config(sharp, tmp_path / "a", *common, "train.micro_batch_size=4"))
    main(
        tiny_config(
            sharp, tmp_path / "b", *common, "train.micro_batch_size=2", "train.grad_accum=2"
        )
    )
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for ra, rb in zip(a, b, strict=True):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5)
    assert _max_diff(_adapter(tmp_path / "a", 5), _adapter(tmp_path / "b", 5)) < 1e-6


def test_options_bf16_checkpointing_no_pad_masking_random_cosine(tiny_dir, tmp_path):
    """bf16 autocast, gradient checkpointing, padding kept out, random schedule, warm-up + cosine,
    on Dream (shifted logits): finite losses and the configured lr at every step."""
    run = tmp_path / "run"
    main(tiny_config(
        tiny_dir("dream"), run, "train.max_steps=4", "train.save_every=4",
        "train.mixed_precision=bf16", "model.gradient_checkpointing=true",
        "train.noise.mask_padding=false", "train.noise.schedule=random", "train.lr_schedule=cosine",
        "train.warmup_steps=2", "train.grad_accum=2", "train.micro_batch_size=2",
    ))  # fmt: skip
    recs = read_metrics(run)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
    want = [2e-3 * lr_factor(s, 2, 4, "cosine", 0.1) for s in range(4)]
    assert [r["lr"] for r in recs] == pytest.approx(want)


@pytest.mark.parametrize(
    ("family", "overrides", "match"),
    [
        ("llada", ["train.objective=ar"], "train.objective='ar' needs the 'ar' family"),
        ("ar", [], r"train.objective='distill' needs a dLLM family"),
        ("llada", ["model.family=dream"], "model.family='dream' but"),
    ],
)
def test_objective_and_family_must_fit(tiny_dir, tmp_path, family, overrides, match):
    with pytest.raises(ValueError, match=match):
        main(tiny_config(tiny_dir(family), tmp_path / "run", *overrides))


def test_gradient_checkpointing_changes_nothing(sharp, tmp_path):
    common = ("train.max_steps=3", "train.save_every=3")
    main(tiny_config(sharp, tmp_path / "a", *common))
    main(tiny_config(sharp, tmp_path / "b", *common, "model.gradient_checkpointing=true"))
    for ra, rb in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b"), strict=True):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-6)
    assert _max_diff(_adapter(tmp_path / "a", 3), _adapter(tmp_path / "b", 3)) < 1e-7


@pytest.mark.slow
def test_sigkill_and_resume(sharp, tmp_path):
    """A real `kill -9` of `python -m d2f.train` once its first checkpoint is on disk; `resume=auto`
    then finishes with the losses and adapter of an uninterrupted run."""
    opts = ["train.max_steps=300", "train.save_every=10", "train.lora.dropout=0.1"]
    main(tiny_config(sharp, tmp_path / "straight", *opts))
    run = tmp_path / "killed"
    cfg_args = [f"model.path={sharp}", f"train.output_dir={run}", f"data.sources=[{TINY_QA}]",
                f"data.cache_dir={tmp_path / 'cache'}", *opts]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "d2f.train", "--config-name", "tiny", *cfg_args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (run / "checkpoint-000010").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = list_checkpoints(run)
    assert done and done[-1].name != "checkpoint-000300", "killed too late"
    main(tiny_config(sharp, run, *opts))
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 301))
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert _max_diff(_adapter(tmp_path / "straight", 300), _adapter(run, 300)) == 0.0
