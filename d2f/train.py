"""`python -m d2f.train`: the D2F trainer (paper Sec. 3, asymmetric distillation).

One loop for every objective (`train.objective`: distill | mdm | ar | dparallel | d3llm |
fast_dllm_v2, see `d2f.objectives`), read top to bottom in `main`:

    setup(cfg)            config -> launch checks -> tokenizer + family -> data -> resume checks
                          (all before any weight is read) -> model (+ LoRA) -> AdamW + lr schedule
                          -> accelerate -> restore the checkpoint
    next_tokens(run)      the global batch (same on every process)
    train_step(run, ...)  noise (d2f.schedule) -> this process's micro-batches -> objective ->
                          backward -> finite check -> clip -> optimiser step
    log.step(...)         metrics.jsonl (+ wandb), progress bar
    maybe_checkpoint(run) weights checked finite and in sync -> atomic checkpoint

Runs as one process or under `accelerate launch` (DDP, DeepSpeed ZeRO-2: `d2f/configs/accelerate/`).
A global batch holds micro_batch_size * grad_accum * processes sequences; its noise is drawn for the
whole batch from one generator, so the run does not depend on how it is split over processes.

    python -m d2f.train --config-name tiny model.path=outputs/tiny/llada
    bash scripts/train.sh llada        # 8 GPUs, the released recipe
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import OmegaConf

from d2f.checkpoint import (
    TrainerState,
    check_checkpoint,
    check_resumable,
    find_resume,
    load_state,
    save_checkpoint,
    skip_weights_in_state,
    weights_dir,
)
from d2f.config import (
    NoiseConfig,
    RunConfig,
    TrainConfig,
    config_dir,
    register_configs,
    to_run_config,
)
from d2f.data import Encoded, EpochSampler, TokenBatch, collate, encode_records, load_records
from d2f.family import Family, detect_spec
from d2f.launch import check_launch, make_accelerator
from d2f.metrics import MetricsLog
from d2f.models import (
    adopt_config,
    build_model,
    load_adapter,
    load_model,
    load_tokenizer,
    read_config,
)
from d2f.objectives import OBJECTIVES, Batch, BatchContext, Objective, autocast, make_batch

# skip mode gives up after this many non-finite global batches in a row: the model itself is broken
MAX_SKIPS_IN_A_ROW = 10


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
    if objective.adapt is not None:  # e.g. an AR checkpoint -> the fast_dllm_v2 family
        raw, tokenizer = objective.adapt(raw, tokenizer, objective.noise_config(cfg.train.noise))
        spec = detect_spec(raw, where=f"model.path={cfg.model.path}: adapted config.json")
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
        if objective.adapt is not None:
            model = adopt_config(model, raw, tokenizer)
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


@dataclass
class Run:
    """Everything one training run holds between steps (built by `setup`)."""

    cfg: RunConfig
    accelerator: Accelerator
    objective: Objective
    family: Family
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainerState
    noise: NoiseConfig  # train.noise with the objective's schedule resolved
    mask_dtype: torch.dtype
    data: Encoded | None = None
    tokenizer: Any = None
    out_dir: Path = Path(".")
    config_yaml: str = ""

    @property
    def global_batch(self) -> int:
        tc = self.cfg.train
        return tc.micro_batch_size * tc.grad_accum * self.accelerator.num_processes


@dataclass
class StepResult:
    """One optimiser step: per-process loss terms (means over its micro-batches), the global
    grad norm, the lr used, and whether the step was taken (False: skipped, non-finite)."""

    terms: dict[str, torch.Tensor]
    grad_norm: float | None
    lr: float
    taken: bool
    batch: Batch = field(repr=False)  # or an objective's own batch type (masked, blocks)
    real_tokens: int = 0  # prompt + answer + end tokens of the global batch (no padding)


def setup(cfg: RunConfig) -> Run | None:
    """Build the run, checking everything that can fail before data or weights are read (launch,
    the checkpoint to resume and its config), then the data before the weights. None when that
    checkpoint has already reached train.max_steps (nothing to do)."""
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    accelerator = make_accelerator(tc)
    check_launch(accelerator, tc)
    set_seed(tc.seed, device_specific=True)  # dropout differs per process; LoRA init is broadcast
    say = accelerator.print
    objective = OBJECTIVES[tc.objective]
    out_dir = Path(tc.output_dir)
    resume, saved = resume_point(accelerator, cfg, objective, config_yaml)
    if saved is not None and saved["step"] >= tc.max_steps:
        say(f"nothing to do: {resume} is at step {saved['step']}, train.max_steps={tc.max_steps}")
        return None
    raw, tokenizer, family = read_checkpoint(cfg, objective)
    data = encode_records(load_records(cfg.data), cfg.data, tokenizer, family)
    say(
        f"data: {len(data)} sequences of {cfg.data.max_length} tokens; {data.skipped} records "
        "skipped (longer than data.max_length)"
    )
    model = build_trainable(cfg, objective, raw, tokenizer, resume)
    params = [p for p in model.parameters() if p.requires_grad]
    say(
        f"model: {family.name}, training {sum(p.numel() for p in params):,} parameters "
        f"({tc.objective}); torch threads {torch.get_num_threads()}, "
        f"{accelerator.num_processes} process(es)"
    )
    optimizer, scheduler = optimizer_and_schedule(params, tc)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainerState(EpochSampler(len(data), tc.seed), tc.seed)
    skip_weights_in_state(accelerator)
    if resume is not None:
        load_state(accelerator, resume, objective.lora)
        state.load_state_dict(saved)
        scheduler.load_state_dict(saved["lr_scheduler"])
        say(f"resumed from {resume} at step {state.step}")
    bf16 = tc.mixed_precision == "bf16"
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        objective=objective,
        family=family,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        noise=objective.noise_config(tc.noise),
        mask_dtype=torch.bfloat16 if bf16 else getattr(torch, cfg.model.dtype),
        data=data,
        tokenizer=tokenizer,
        out_dir=out_dir,
        config_yaml=config_yaml,
    )


def resume_point(
    accelerator, cfg: RunConfig, objective: Objective, config_yaml: str
) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume (None: a fresh run) and its trainer state, checked complete and
    with a config that trains the same run (reads no weights)."""
    resume = find_resume(Path(cfg.train.output_dir), cfg.train.resume)
    if resume is None:
        return None, None
    saved = check_checkpoint(
        resume,
        objective.lora,
        accelerator.num_processes,
        accelerator.distributed_type == DistributedType.DEEPSPEED,
    )
    check_resumable(resume, config_yaml)
    return resume, saved


def optimizer_and_schedule(params: list[torch.nn.Parameter], tc: TrainConfig):
    """AdamW over the trained parameters and its LambdaLR (`lr_factor`), stepped once per step."""
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
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def next_tokens(run: Run) -> TokenBatch:
    """The next global batch (G, L), the same on every process."""
    return collate(run.data, run.state.sampler.take(run.global_batch))


def build_batch(run: Run, tokens: TokenBatch):
    """The objective's noisy batch of a global batch: `make_batch`, or the objective's own builder
    (given the training progress before this step: d3llm's curricula)."""
    gen = run.state.noise_generator
    if run.objective.make_batch is None:
        return make_batch(tokens, run.family, run.noise, gen)
    tc = run.cfg.train
    ctx = BatchContext(
        step=run.state.step,
        max_steps=tc.max_steps,
        epoch=run.state.step * run.global_batch / len(run.data),
        micro_batch_size=tc.micro_batch_size,
        certainty=tc.certainty,
    )
    return run.objective.make_batch(tokens, run.family, run.noise, gen, ctx)


def train_step(run: Run, tokens: TokenBatch) -> StepResult:
    """One optimiser step on a global batch: noise, this process's micro-batches, backward, the
    non-finite check, clipping, the optimiser and lr steps.

    A NaN/inf loss or grad norm on any process raises (train.on_nonfinite=stop, the default)
    before the optimiser step, or skips the batch (skip: no update, the step is not counted).
    """
    tc, acc = run.cfg.train, run.accelerator
    batch = build_batch(run, tokens)  # (G, L), CPU
    micro, world, rank = tc.micro_batch_size, acc.num_processes, acc.process_index
    terms: dict[str, torch.Tensor] = {}
    for a in range(tc.grad_accum):
        start = (a * world + rank) * micro
        mb = batch.rows(start, start + micro).to(acc.device)
        with acc.accumulate(run.model):  # DDP syncs gradients on the last micro-batch only
            with autocast(acc.device, tc.mixed_precision == "bf16"):
                loss, extra = run.objective.step(run.model, mb, run.family, run.mask_dtype)
            acc.backward(loss)  # divided by grad_accum inside
        for k, v in {"loss": loss.detach(), **extra}.items():
            terms[k] = terms.get(k, 0.0) + v.float() / tc.grad_accum
    max_norm = tc.clip_grad_norm if tc.clip_grad_norm > 0 else math.inf
    grad_norm = acc.clip_grad_norm_(run.params, max_norm)
    lr = run.scheduler.get_last_lr()[0]
    finite = _finite_everywhere(acc, terms["loss"], grad_norm)
    if finite:
        run.optimizer.step()
        run.scheduler.step()
        run.state.step += 1
    run.optimizer.zero_grad(set_to_none=True)
    if not finite:
        run.state.skipped += 1
        _nonfinite(run, terms["loss"], grad_norm)
    return StepResult(
        terms,
        None if grad_norm is None else float(grad_norm),
        lr,
        finite,
        batch,
        int(tokens.lengths.sum()),
    )


def _finite_everywhere(acc, loss: torch.Tensor, grad_norm) -> bool:
    """Loss and grad norm finite on every process (one small all-reduce)."""
    ok = bool(torch.isfinite(loss)) and (grad_norm is None or math.isfinite(float(grad_norm)))
    bad = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return acc.reduce(bad, "sum").item() == 0


def _nonfinite(run: Run, loss: torch.Tensor, grad_norm) -> None:
    """Stop (the default) or let the caller skip the batch, with a bounded number in a row."""
    tc = run.cfg.train
    norm = "none" if grad_norm is None else f"{float(grad_norm):.4g}"
    where = (
        f"step {run.state.step + 1}: non-finite loss ({float(loss):.4g} on this process) or "
        f"grad norm ({norm})"
    )
    if tc.on_nonfinite == "stop":
        raise FloatingPointError(
            f"{where}; stopped before the optimiser step, no checkpoint written for it (lower "
            "train.lr, check the data, or train.on_nonfinite=skip to skip such batches)"
        )
    run.state.skips_in_a_row += 1
    if run.state.skips_in_a_row > MAX_SKIPS_IN_A_ROW:
        raise FloatingPointError(f"{where}; {MAX_SKIPS_IN_A_ROW} batches in a row: stopped")
    run.accelerator.print(f"{where}; batch skipped (train.on_nonfinite=skip)")


def _check_weights(run: Run) -> None:
    """Every process holds the same, finite trained weights (checked before each checkpoint)."""
    acc, step = run.accelerator, run.state.step
    total = torch.stack([p.detach().double().sum() for p in run.params]).sum().reshape(1)
    if not torch.isfinite(total):
        raise FloatingPointError(f"step {step}: the trained weights are not finite; not saved")
    if acc.num_processes == 1 or acc.distributed_type == DistributedType.FSDP:
        return
    sums = acc.gather(total.to(acc.device))
    if not bool((sums - sums[0]).abs().max() <= 1e-9 * sums[0].abs().clamp(min=1.0)):
        raise RuntimeError(f"step {step}: processes hold different weights")


def maybe_checkpoint(run: Run, note) -> None:
    """Every train.save_every steps and at the end: check the weights, save atomically."""
    tc, step = run.cfg.train, run.state.step
    if step % tc.save_every != 0 and step != tc.max_steps:
        return
    _check_weights(run)
    trainer_state = {
        **run.state.state_dict(),
        "lr_scheduler": run.scheduler.state_dict(),
        "processes": run.accelerator.num_processes,
    }
    path = save_checkpoint(
        run.accelerator,
        run.model,
        run.tokenizer,
        run.out_dir,
        step,
        run.objective.lora,
        run.config_yaml,
        trainer_state,
        tc.keep_last,
    )
    world = run.accelerator.num_processes
    note(f"saved {path}" + (f" ({world} processes in sync)" if world > 1 else ""))


def main(cfg: RunConfig) -> Path:
    """Train as configured; returns the output directory (metrics.jsonl, checkpoint-*)."""
    if cfg.dry_run:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return Path(cfg.train.output_dir)
    run = setup(cfg)
    if run is None:
        return Path(cfg.train.output_dir)
    tc, say = cfg.train, run.accelerator.print
    say(f"objective {tc.objective}: {run.objective.legend}")
    say(
        f"global batch {run.global_batch} = {tc.micro_batch_size} x {tc.grad_accum} accum x "
        f"{run.accelerator.num_processes} procs; noise {run.noise.schedule}, blocks of "
        f"{run.noise.block_size}"
    )
    log = MetricsLog(run)
    try:
        while run.state.step < tc.max_steps:
            result = train_step(run, next_tokens(run))
            log.step(result)
            if result.taken:
                run.state.skips_in_a_row = 0
                maybe_checkpoint(run, log.note)
    finally:  # also on an error: the progress bar and wandb are closed
        log.close()
    run.accelerator.end_training()
    return run.out_dir


def _hydra_main(cfg) -> None:
    main(to_run_config(cfg))


def cli() -> None:
    """Entry point: Hydra composes `d2f/configs/<--config-name>.yaml` (default `tiny`) + overrides."""
    import hydra

    register_configs()
    hydra.main(config_path=str(config_dir()), config_name="tiny")(_hydra_main)()


if __name__ == "__main__":
    cli()
