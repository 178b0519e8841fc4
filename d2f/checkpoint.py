"""Atomic, resumable training checkpoints for `d2f.train`.

    <output_dir>/checkpoint-000100/
        adapter/      distill: the LoRA adapter, PEFT format, the family's ORIGINAL module names
                      (`d2f.models.save_adapter`; loads with `load_model(base, adapter=...)`)
        model/        mdm, ar: the whole model in its original format (`d2f.models.save_model`)
        state/        `accelerate save_state`: optimizer, lr scheduler, `TrainerState` (step, data
                      order, noise generator) and every process's RNG states (python, numpy, torch)
        config.yaml   the resolved run config

A checkpoint is written into `.checkpoint-000100.tmp/`, every file fsynced, then renamed: a directory
named `checkpoint-*` is always complete, whatever killed the run. `resume=auto` continues from the
newest one with the same weights, optimizer moments, lr, data order, noise and dropout draws, so the
losses after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from d2f.data import EpochSampler
from d2f.models import save_adapter, save_model

_NAME = re.compile(r"^checkpoint-(\d+)$")


class TrainerState:
    """What a resume needs besides weights and optimizer: step, data order, noise generator."""

    def __init__(self, sampler: EpochSampler, seed: int):
        self.step = 0  # optimiser steps done
        self.sampler = sampler
        # the noise of every global batch: one CPU generator, identical on every process
        self.noise = torch.Generator().manual_seed(seed + 1_000_003)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "noise": self.noise.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise.set_state(state["noise"])


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary directories are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def find_resume(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = the newest one (None if none), `never` = None."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"train.resume={resume}: not a checkpoint directory (no state/)")
    return path


def check_resumable(checkpoint: Path, config_yaml: str) -> None:
    """Refuse to continue a checkpoint under another objective or sequence length."""
    from omegaconf import OmegaConf

    saved, now = OmegaConf.load(checkpoint / "config.yaml"), OmegaConf.create(config_yaml)
    for key in ("train.objective", "data.max_length"):
        if OmegaConf.select(saved, key) != OmegaConf.select(now, key):
            raise ValueError(
                f"{key}={OmegaConf.select(now, key)!r} but {checkpoint} was trained with "
                f"{OmegaConf.select(saved, key)!r}: use the same value or another train.output_dir"
            )


def weights_dir(checkpoint: Path, lora: bool) -> Path:
    return checkpoint / ("adapter" if lora else "model")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator,
    model,
    tokenizer,
    output_dir: Path,
    step: int,
    lora: bool,
    config_yaml: str,
    keep_last: int = 0,
) -> Path:
    """Write `<output_dir>/checkpoint-<step>` atomically. Every process must call it."""
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f".{final.name}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # optimizer, scheduler, TrainerState, RNG states (model weights are skipped by a pre-hook)
    extra = {"exclude_frozen_parameters": True} if _deepspeed(accelerator) and lora else {}
    accelerator.save_state(str(tmp / "state"), **extra)
    # FSDP holds shards: gather the full weights (a collective, so on every process)
    full = accelerator.get_state_dict(model) if _fsdp(accelerator) else None
    if main:
        unwrapped = accelerator.unwrap_model(model)
        if lora:
            save_adapter(unwrapped, weights_dir(tmp, lora), state_dict=full)
        else:
            save_model(unwrapped, weights_dir(tmp, lora), tokenizer=tokenizer, state_dict=full)
        (tmp / "config.yaml").write_text(config_yaml)
    accelerator.wait_for_everyone()
    if main:
        _fsync_tree(tmp)
        if final.exists():  # an older run's checkpoint of the same step: replace it
            trash = output_dir / f".{final.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        if keep_last > 0:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def skip_weights_in_state(accelerator) -> None:
    """Keep model weights out of `state/`: they live in adapter/ or model/ in the original format
    and are restored from there when the model is built. (DeepSpeed and FSDP save their own.)"""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def load_state(accelerator, checkpoint: Path, lora: bool) -> None:
    extra = {"load_module_strict": False} if _deepspeed(accelerator) and lora else {}
    accelerator.load_state(str(checkpoint / "state"), **extra)


def _deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP
