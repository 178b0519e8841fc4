"""`python -m d2f.train`: the D2F trainer (paper Sec. 3, asymmetric distillation; PAPER_FACTS).

One loop for every objective (`train.objective`: distill | mdm | ar, see `d2f.objectives`):

    setup       config -> tokenizer + family -> data (fails before any weight is read) -> model
                (+ LoRA) -> AdamW + lr schedule -> accelerate -> resume from the newest checkpoint
    loop        global batch (same on every process) -> noise (d2f.schedule) -> this process's
                micro-batches -> objective -> backward -> clip -> optimiser step -> log -> checkpoint
    cleanup     final checkpoint, close the logs

Runs as one process or under `accelerate launch` (DDP, DeepSpeed ZeRO-2, FSDP: `d2f/configs/accelerate/`).
A global batch holds micro_batch_size * grad_accum * processes sequences; its noise is drawn for the
whole batch from one generator, so the run does not depend on how it is split over processes.

    python -m d2f.train --config-name tiny model.path=outputs/tiny/llada
    bash scripts/train.sh llada        # 8 GPUs, the released recipe
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from d2f.checkpoint import (
    TrainerState,
    check_resumable,
    find_resume,
    load_state,
    save_checkpoint,
    skip_weights_in_state,
    weights_dir,
)
from d2f.config import RunConfig, config_dir, register_configs
from d2f.data import EpochSampler, collate, encode_records, load_records
from d2f.family import detect_spec
from d2f.models import build_model, load_adapter, load_model, load_tokenizer, read_config
from d2f.objectives import OBJECTIVES, NoiseSpec, Objective, autocast, make_batch


def lr_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based, LambdaLR convention).

    Linear warm-up (step + 1) / warmup while step < warmup, then 1 (constant) or a cosine from 1 at
    the end of warm-up down to `min_ratio` at step `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def read_checkpoint(cfg: RunConfig, objective: Objective):
    """config.json, tokenizer and family facts of `model.path`, checked against the run (no weights)."""
    raw = read_config(cfg.model.path)
    spec = detect_spec(raw, where=f"model.path={cfg.model.path}: config.json")
    if cfg.model.family is not None and cfg.model.family != spec.name:
        raise ValueError(f"model.family={cfg.model.family!r} but {cfg.model.path} is {spec.name!r}")
    tokenizer = load_tokenizer(cfg.model.path, spec)
    family = spec.facts(raw, tokenizer)
    dllm = family.mask_token_id is not None
    if objective.needs_mask_token != dllm:
        want = "a dLLM family (llada, dream)" if objective.needs_mask_token else "the 'ar' family"
        raise ValueError(
            f"train.objective={cfg.train.objective!r} needs {want}; model.path is {family.name!r}"
        )
    return raw, tokenizer, family


def build_trainable(cfg: RunConfig, objective: Objective, raw, tokenizer, resume: Path | None):
    """The model to train, in train mode: a LoRA student on a frozen base, or a whole model.

    Weights come from the checkpoint being resumed (adapter/ or model/), else from `model.path`
    (or a random init from its config.json when model.init=scratch).
    """
    mc, dtype = cfg.model, getattr(torch, cfg.model.dtype)
    if resume is not None and not objective.lora:
        model, _ = load_model(
            weights_dir(resume, False), dtype=dtype, attn_implementation=mc.attn_implementation
        )
    elif mc.init == "scratch":
        model = build_model(raw, tokenizer, seed=mc.init_seed, dtype=dtype)
        model.set_attn_implementation(mc.attn_implementation)
    else:
        model, _ = load_model(mc.path, dtype=dtype, attn_implementation=mc.attn_implementation)
    if mc.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    if not objective.lora:
        return model
    from peft import LoraConfig, get_peft_model

    if resume is not None:
        model = load_adapter(model, weights_dir(resume, True))  # strict key check
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        model.peft_config["default"].inference_mode = False
    else:
        lc = cfg.train.lora
        targets = lc.target_modules or list(model.d2f_family.lora_target_modules)
        model = get_peft_model(
            model,
            LoraConfig(
                r=lc.r,
                lora_alpha=lc.alpha,
                lora_dropout=lc.dropout,
                target_modules=list(targets),
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    return model


class MetricsLog:
    """metrics.jsonl (main process; on resume, records after the checkpoint are dropped) + wandb."""

    def __init__(self, cfg: RunConfig, out_dir: Path, start_step: int, active: bool):
        self.active, self.path, self.wandb = active, out_dir / "metrics.jsonl", None
        if not active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step > 0 and self.path.exists():
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if json.loads(ln)["step"] <= start_step
            ]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        if cfg.train.wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("train.wandb=true needs `pip install wandb`") from None
            self.wandb = wandb.init(
                project=cfg.train.wandb_project,
                mode=cfg.train.wandb_mode,
                dir=str(out_dir),
                config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            )

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _ranks_in_sync(accelerator, params) -> bool:
    """Every process holds the same trained weights (checked at each checkpoint)."""
    if accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.FSDP:
        return True
    total = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    sums = accelerator.gather(total.to(accelerator.device))
    return bool((sums - sums[0]).abs().max() <= 1e-9 * sums[0].abs().clamp(min=1.0))


def main(cfg: RunConfig) -> Path:
    """Train as configured; returns the output directory (metrics.jsonl, checkpoint-*)."""
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if cfg.dry_run:
        print(config_yaml, end="")
        return Path(cfg.train.output_dir)
    # ---------------------------------------------------------------- setup
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    accelerator = Accelerator(gradient_accumulation_steps=tc.grad_accum)
    if accelerator.gradient_accumulation_steps != tc.grad_accum:
        raise ValueError(
            f"train.grad_accum={tc.grad_accum} but the accelerate config accumulates "
            f"{accelerator.gradient_accumulation_steps}: remove gradient_accumulation_steps there"
        )
    set_seed(tc.seed, device_specific=True)  # dropout differs per process; LoRA init is broadcast
    say = accelerator.print
    objective = OBJECTIVES[tc.objective]
    raw, tokenizer, family = read_checkpoint(cfg, objective)
    records = load_records(cfg.data)
    data = encode_records(records, cfg.data, tokenizer, family)
    say(
        f"data: {len(data)} sequences of {cfg.data.max_length} tokens; {data.skipped} records "
        "skipped (longer than data.max_length)"
    )
    out_dir = Path(tc.output_dir)
    resume = find_resume(out_dir, tc.resume)
    if resume is not None:
        check_resumable(resume, config_yaml)
    model = build_trainable(cfg, objective, raw, tokenizer, resume)
    params = [p for p in model.parameters() if p.requires_grad]
    say(
        f"model: {family.name}, training {sum(p.numel() for p in params):,} parameters "
        f"({tc.objective}); torch threads {torch.get_num_threads()}, {accelerator.num_processes} process(es)"
    )
    optimizer = torch.optim.AdamW(
        params, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps, weight_decay=tc.weight_decay
    )
    factor = partial(
        lr_factor,
        warmup=tc.warmup_steps,
        total=tc.max_steps,
        kind=tc.lr_schedule,
        min_ratio=tc.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainerState(EpochSampler(len(data), tc.seed), tc.seed)
    accelerator.register_for_checkpointing(state, scheduler)  # stepped once per optimiser step
    skip_weights_in_state(accelerator)
    if resume is not None:
        load_state(accelerator, resume, objective.lora)
        say(f"resumed from {resume} at step {state.step}")
    noise = NoiseSpec(
        schedule=None if objective.schedule is None else (tc.noise.schedule or objective.schedule),
        block_size=tc.noise.block_size,
        lo=tc.noise.lo,
        hi=tc.noise.hi,
        eps=tc.noise.eps,
        mask_padding=tc.noise.mask_padding,
    )
    bf16 = tc.mixed_precision == "bf16"
    mask_dtype = torch.bfloat16 if bf16 else getattr(torch, cfg.model.dtype)
    world, rank, micro = accelerator.num_processes, accelerator.process_index, tc.micro_batch_size
    global_batch = micro * tc.grad_accum * world
    log = MetricsLog(cfg, out_dir, state.step, accelerator.is_main_process)
    say(f"objective {tc.objective}: {objective.legend}")
    say(
        f"global batch {global_batch} = {micro} x {tc.grad_accum} accum x {world} procs; "
        f"noise {noise.schedule}, blocks of {noise.block_size}"
    )
    progress = tqdm(
        total=tc.max_steps,
        initial=state.step,
        disable=not accelerator.is_main_process,
        desc=f"d2f {tc.objective}",
        dynamic_ncols=True,
    )
    note = progress.write if accelerator.is_main_process else (lambda msg: None)
    t_last, step_last = time.perf_counter(), state.step
    first_steps = state.step + 3  # ms/step of the first steps is printed: slow threads show early
    # ---------------------------------------------------------------- loop
    while state.step < tc.max_steps:
        tokens = collate(data, state.sampler.take(global_batch))  # (G, L), same on every process
        batch = make_batch(tokens, family, noise, state.noise)  # noise for all G rows, CPU
        sums: dict[str, torch.Tensor] = {}
        for a in range(tc.grad_accum):
            start = (a * world + rank) * micro
            mb = batch.rows(start, start + micro).to(accelerator.device)
            with accelerator.accumulate(model):  # DDP syncs gradients on the last micro-batch only
                with autocast(accelerator.device, bf16):
                    loss, extra = objective.step(model, mb, family, mask_dtype)
                accelerator.backward(loss)  # divided by grad_accum inside
            for k, v in {"loss": loss.detach(), **extra}.items():
                sums[k] = sums.get(k, 0.0) + v.float() / tc.grad_accum
        grad_norm = accelerator.clip_grad_norm_(
            params, tc.clip_grad_norm if tc.clip_grad_norm > 0 else math.inf
        )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        progress.update(1)

        if (
            state.step % tc.log_every == 0
            or state.step == tc.max_steps
            or state.step <= first_steps
        ):
            record = {k: accelerator.reduce(v.reshape(1), "mean").item() for k, v in sums.items()}
            now = time.perf_counter()
            ms = 1000.0 * (now - t_last) / (state.step - step_last)
            t_last, step_last = now, state.step
            record = {
                "step": state.step,
                **record,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "masked_frac": batch.masked.float().mean().item(),
                "ms_per_step": ms,
                "tokens_per_s": global_batch * cfg.data.max_length / (ms / 1000.0),
            }
            progress.set_postfix(loss=f"{record['loss']:.4f}", ms=f"{ms:.0f}")
            if state.step <= first_steps:
                note(f"step {state.step}: {ms:.0f} ms/step, loss {record['loss']:.4f}")
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                log.write(record)

        if state.step % tc.save_every == 0 or state.step == tc.max_steps:
            if not _ranks_in_sync(accelerator, params):
                raise RuntimeError(f"step {state.step}: processes hold different weights")
            path = save_checkpoint(
                accelerator,
                model,
                tokenizer,
                out_dir,
                state.step,
                objective.lora,
                config_yaml,
                tc.keep_last,
            )
            synced = f" ({world} processes in sync)" if world > 1 else ""
            note(f"saved {path}{synced}")
    # ---------------------------------------------------------------- cleanup
    progress.close()
    log.close()
    accelerator.end_training()
    return out_dir


def _hydra_main(cfg) -> None:
    main(OmegaConf.to_object(cfg))


def cli() -> None:
    """Entry point: Hydra composes `d2f/configs/<--config-name>.yaml` (default `tiny`) + overrides."""
    import hydra

    register_configs()
    hydra.main(config_path=str(config_dir()), config_name="tiny")(_hydra_main)()


if __name__ == "__main__":
    cli()
