"""Atomic, resumable training checkpoints for `d2f.train`.

    <output_dir>/checkpoint-000100/
        adapter/      distill: the LoRA adapter, PEFT format, the family's ORIGINAL module names
                      (`d2f.adapters.save_adapter`; loads with `load_model(base, adapter=...)`)
        model/        mdm, ar: the whole model in its original format (`d2f.models.save_model`)
        state/        trainer_state.json   step, data order, noise generator, lr scheduler,
                                           process count (JSON, written and read by d2f)
                      rng_state_<rank>.json  every process's python / numpy / torch RNG states
                      optimizer.bin        `accelerate save_state` (DeepSpeed: its own files)
        config.yaml   the resolved run config

A checkpoint is written into `.checkpoint-000100.tmp/`, every file fsynced, then renamed: a directory
named `checkpoint-*` is always complete, whatever killed the run. `resume=auto` continues from the
newest one with the same weights, optimizer moments, lr, data order, noise and dropout draws, so the
losses after a resume equal those of an uninterrupted run.

NOTE: d2f's own state is JSON, so a resume unpickles nothing of d2f's. `optimizer.bin` is read by
accelerate with `torch.load(weights_only=True)`; DeepSpeed reads its own (pickled) files. Resume only
from checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType

from d2f.adapters import save_adapter
from d2f.data import EpochSampler
from d2f.models import save_model

_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"

# Keys that may differ between a checkpoint's config and the resuming run: they do not change what
# is trained (how long, how often it is saved or logged, where, with how many threads).
RUN_NEUTRAL = (
    "train.max_steps",
    "train.save_every",
    "train.log_every",
    "train.keep_last",
    "train.output_dir",
    "train.resume",
    "train.threads",
    "train.wandb",
    "train.wandb_project",
    "train.wandb_mode",
    "data.cache_dir",
    "dry_run",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (named in the message, with what to do)."""


class TrainerState:
    """What a resume needs besides weights and optimizer: step, data order, noise generator."""

    def __init__(self, sampler: EpochSampler, seed: int):
        self.step = 0  # optimiser steps done
        self.skipped = 0  # global batches skipped for a non-finite loss (train.on_nonfinite=skip)
        self.skips_in_a_row = 0  # not saved: a checkpoint is only written after a taken step
        self.sampler = sampler
        # the noise of every global batch: one CPU generator, identical on every process
        self.noise_generator = torch.Generator().manual_seed(seed + 1_000_003)

    def state_dict(self) -> dict:
        """Plain JSON values (no pickle)."""
        return {
            "step": self.step,
            "skipped": self.skipped,
            "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_generator.get_state().tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(torch.tensor(state["noise_generator"], dtype=torch.uint8))


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU, CUDA) RNG states as plain JSON values."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": [version, list(words), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"]:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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
    """The checkpoint to resume from: `auto` = the newest one (None if none), `never` = None.

    Refuses (FileExistsError) whatever would overwrite another run: `never`, or a checkpoint from
    elsewhere, into an output_dir that already holds checkpoints or metrics; a checkpoint of
    output_dir that is not its newest (the newer ones would be overwritten).
    """
    root = Path(output_dir)
    found = list_checkpoints(root)
    if resume == "auto":
        return found[-1] if found else None
    held = [p.name for p in found] + (
        ["metrics.jsonl"] if (root / "metrics.jsonl").exists() else []
    )
    if resume == "never":
        if held:
            raise FileExistsError(
                f"train.resume=never but train.output_dir={root} already holds {', '.join(held)}: "
                "choose a new train.output_dir (or resume=auto to continue that run)"
            )
        return None
    path = Path(resume)
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"train.resume={resume}: not a checkpoint directory (no state/)")
    if path.resolve().parent == root.resolve():
        if found and path.resolve() != found[-1].resolve():
            raise FileExistsError(
                f"train.resume={resume} is not the newest checkpoint of {root} ({found[-1].name}):"
                " resuming it would overwrite the newer ones; move them aside first"
            )
    elif held:
        raise FileExistsError(
            f"train.resume={resume} is another directory's checkpoint, but train.output_dir="
            f"{root} already holds {', '.join(held)}: resume into a new train.output_dir"
        )
    return path


def _broken(checkpoint: Path, problem: str) -> CheckpointError:
    """The error for an unusable checkpoint: what is wrong, and the previous checkpoint to use."""
    older = [p for p in list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
    if older:
        hint = (
            f"the previous checkpoint is {older[-1]}: move {checkpoint.name} aside (e.g. `mv "
            f"{checkpoint} {checkpoint.parent}/broken-{checkpoint.name}`) and run again to "
            "resume from it"
        )
    else:
        hint = "there is no earlier checkpoint in that directory"
    return CheckpointError(f"{checkpoint}: {problem}; {hint}")


def _read_json(checkpoint: Path, path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise _broken(checkpoint, f"{path.relative_to(checkpoint)} is missing") from None
    except (OSError, ValueError) as err:
        raise _broken(checkpoint, f"{path.relative_to(checkpoint)} is unreadable ({err})") from None
    if not isinstance(value, dict):
        raise _broken(checkpoint, f"{path.relative_to(checkpoint)} is not a JSON object")
    return value


def _check_safetensors(checkpoint: Path, path: Path) -> None:
    """Header readable and the file as long as the header says (a truncated copy fails here)."""
    from safetensors import safe_open

    rel = path.relative_to(checkpoint)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types
        raise _broken(checkpoint, f"{rel} is unreadable ({err})") from None
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise _broken(checkpoint, f"{rel} is truncated ({path.stat().st_size} bytes)")


def check_checkpoint(checkpoint: Path, lora: bool, processes: int, deepspeed: bool) -> dict:
    """Everything a resume reads is there and readable (before any weights load); returns the
    trainer state. Raises CheckpointError naming the file and the previous checkpoint."""
    from omegaconf import OmegaConf

    config = checkpoint / "config.yaml"
    if not config.is_file() or not config.read_text().strip():
        raise _broken(checkpoint, "config.yaml is missing or empty")
    if not isinstance(OmegaConf.to_container(OmegaConf.load(config)), dict):
        raise _broken(checkpoint, "config.yaml is not a mapping")
    weights = weights_dir(checkpoint, lora)
    tensors = sorted(weights.glob("*.safetensors")) if weights.is_dir() else []
    if not tensors:
        raise _broken(checkpoint, f"{weights.name}/ holds no .safetensors weights")
    for path in tensors:
        _check_safetensors(checkpoint, path)
    state_dir = checkpoint / "state"
    pickled = sorted(p.name for p in state_dir.glob("custom_checkpoint_*.pkl"))
    if pickled:  # accelerate would unpickle these with weights_only=False, i.e. run their code
        raise _broken(checkpoint, f"state/{pickled[0]}: d2f writes no such pickle; refused")
    state = _read_json(checkpoint, state_dir / TRAINER_STATE)
    if state.get("processes") != processes:
        raise CheckpointError(
            f"{checkpoint} was trained by {state.get('processes')} process(es), this run has "
            f"{processes}: resume with the same number of processes (the global batch and the "
            "RNG states depend on it)"
        )
    for rank in range(processes):
        _read_json(checkpoint, state_dir / f"rng_state_{rank}.json")
    if not deepspeed:
        optimizer = state_dir / "optimizer.bin"
        if not optimizer.is_file():
            raise _broken(checkpoint, "state/optimizer.bin is missing")
        try:
            with zipfile.ZipFile(optimizer) as z:  # torch.save writes a zip: truncation shows here
                z.namelist()
        except (OSError, zipfile.BadZipFile) as err:
            raise _broken(checkpoint, f"state/optimizer.bin is unreadable ({err})") from None
    return state


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved_yaml: str, now_yaml: str) -> list[str]:
    """Every setting that changes the run and differs between a checkpoint and now, as
    `key: saved -> now` (RUN_NEUTRAL keys may differ; max_steps too, unless a cosine lr
    schedule depends on it)."""
    from omegaconf import OmegaConf

    saved = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    now = _flatten(OmegaConf.to_container(OmegaConf.create(now_yaml)))
    neutral = set(RUN_NEUTRAL)
    if "cosine" in (saved.get("train.lr_schedule"), now.get("train.lr_schedule")):
        neutral.discard("train.max_steps")  # the cosine decays to its end at max_steps
    keys = sorted((saved.keys() | now.keys()) - neutral)
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def check_resumable(checkpoint: Path, config_yaml: str) -> None:
    """Refuse to continue a checkpoint under a config that would change the run, listing what."""
    diffs = config_differences((checkpoint / "config.yaml").read_text(), config_yaml)
    if diffs:
        raise ValueError(
            f"the run differs from {checkpoint}/config.yaml in what it trains:\n  "
            + "\n  ".join(diffs)
            + "\nuse the checkpoint's values, or another train.output_dir for a new run"
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
    trainer_state: dict,
    keep_last: int = 0,
) -> Path:
    """Write `<output_dir>/checkpoint-<step>` atomically. Every process must call it.

    trainer_state: JSON values (TrainerState, lr scheduler, process count) for trainer_state.json.
    """
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f".{final.name}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # optimizer (+ DeepSpeed's engine state); model weights are skipped by a pre-hook
    extra = {"exclude_frozen_parameters": True} if _deepspeed(accelerator) and lora else {}
    accelerator.save_state(str(tmp / "state"), **extra)
    rng = tmp / "state" / f"rng_state_{accelerator.process_index}.json"
    rng.write_text(json.dumps(rng_state()))
    # FSDP holds shards: gather the full weights (a collective, so on every process)
    full = accelerator.get_state_dict(model) if _fsdp(accelerator) else None
    if main:
        (tmp / "state" / TRAINER_STATE).write_text(json.dumps(trainer_state))
        unwrapped = accelerator.unwrap_model(model)
        if lora:
            save_adapter(unwrapped, weights_dir(tmp, lora), state_dict=full)
        else:
            save_model(unwrapped, weights_dir(tmp, lora), tokenizer=tokenizer, state_dict=full)
        (tmp / "config.yaml").write_text(config_yaml)
    accelerator.wait_for_everyone()
    if main:
        _fsync_tree(tmp)
        if final.exists():  # this run's own broken checkpoint, moved aside by nobody: replace it
            trash = output_dir / f".{final.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        if keep_last > 0:  # only finite checkpoints are ever written, so pruning keeps good ones
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
    """Optimizer (and DeepSpeed engine) state through accelerate, then this process's RNG states
    from d2f's JSON (they override any accelerate restored)."""
    extra = {"load_module_strict": False} if _deepspeed(accelerator) and lora else {}
    try:
        accelerator.load_state(str(checkpoint / "state"), **extra)
    except Exception as err:  # torch / DeepSpeed raise many types for a damaged file
        raise _broken(
            checkpoint, f"state/ could not be loaded ({type(err).__name__}: {err})"
        ) from err
    rank = accelerator.process_index
    set_rng_state(_read_json(checkpoint, checkpoint / "state" / f"rng_state_{rank}.json"))


def _deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP
