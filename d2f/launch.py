"""The trainer's launch: the `Accelerator` it runs under, and checks that the launch (processes,
distributed backend, DeepSpeed settings) is what the run's config says, before any weight is read.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from d2f.config import TrainConfig


def check_launch(accelerator, tc: TrainConfig) -> None:
    """Refuse a launch whose processes or engine settings are not what the run says.

    * WORLD_SIZE processes were started but accelerate sees another count (FSDP or DeepSpeed on a
      CPU without gloo: every process trains alone, into the same directory).
    * Several processes under no distributed backend (nothing would synchronise them).
    * DeepSpeed: its micro-batch, accumulation and gradient clipping come from the trainer; a
      launch file that sets them otherwise is refused (accelerate's `clip_grad_norm_` ignores
      `max_norm` under DeepSpeed, so the launch file's `gradient_clipping` would win silently).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"{world} processes were launched (WORLD_SIZE) but accelerate sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): they would train "
            "unsynchronised copies into one directory; on a CPU use `train.sh --launcher cpu` "
            "(DDP) or zero2"
        )
    if world > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{world} processes but accelerate set up no distributed backend (distributed_type NO;"
            " accelerate 1.15 runs FSDP only on GPU-like devices): nothing would keep them in sync"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, tc)
    if accelerator.gradient_accumulation_steps != tc.grad_accum:
        raise ValueError(
            f"train.grad_accum={tc.grad_accum} but the accelerate config accumulates "
            f"{accelerator.gradient_accumulation_steps}: remove gradient_accumulation_steps there"
        )


def configure_deepspeed(ds_config: dict, tc: TrainConfig) -> None:
    """Fill DeepSpeed's micro-batch and clipping from the trainer (where "auto" or unset); refuse
    a launch file value that disagrees. `ds_config` is the plugin's `deepspeed_config` dict."""
    wanted = {
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", tc.micro_batch_size),
        "gradient_clipping": ("train.clip_grad_norm", max(tc.clip_grad_norm, 0.0)),
    }
    for ds_key, (key, value) in wanted.items():
        have = ds_config.get(ds_key, "auto")
        if have == "auto":
            ds_config[ds_key] = value
        elif float(have) != float(value):
            raise ValueError(
                f"{key}={value} but the DeepSpeed launch file sets {ds_key}={have}: remove it "
                "there (the trainer sets it) or use the same value"
            )
    if tc.on_nonfinite == "skip":
        raise ValueError(
            "train.on_nonfinite=skip is not supported under DeepSpeed: its engine steps the "
            "optimizer inside backward, before the loss can be checked; use stop"
        )


def make_accelerator(tc: TrainConfig) -> Accelerator:
    """The run's `Accelerator`: accumulation from the trainer, gloo for CPU processes."""
    # NOTE: on a CPU, accelerate 1.15 leaves the process-group backend unset for DeepSpeed, so
    # every process believes it is alone: name gloo explicitly when there is no GPU.
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(gradient_accumulation_steps=tc.grad_accum, kwargs_handlers=handlers)
