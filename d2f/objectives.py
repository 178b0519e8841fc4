"""The training objectives of d2f, behind one signature (paper Sec. 3; peers in d2f.certainty).

* `distill` (D2F asymmetric distillation, the default): the student is the base model + LoRA under the
  block-causal mask; the teacher is the SAME weights with the adapter disabled, under full
  bidirectional attention over the same noisy sequence, without grad. Loss: `d2f.loss.distill_terms`
  (soft cross-entropy H(p_T, p_S), 1/ratio weighted); its KL part and the teacher entropy are logged.
* `mdm` (plain masked diffusion, a teacher from scratch): bidirectional attention, `d2f.loss.mdm_loss`
  against the clean tokens, normalised by the answer length (the ELBO; see mdm_loss's NOTE).
* `ar` (the autoregressive baseline): causal attention, next-token cross-entropy on the answer and its
  end token: `mdm_loss` with shift=True, weight 1 and the answer as "masked" targets.
* `dparallel`, `d3llm` (peer recipes, `d2f.certainty`): the base + LoRA on the teacher's own
  answers, two complementary bidirectional views of one semi-AR block; their own batch builders.
* `fast_dllm_v2` (Fast-dLLM v2's AR -> block-diffusion adaptation, `d2f.recipes.fast_dllm_v2`): an
  AR checkpoint fully fine-tuned on the doubled input [x_t || x_0] with two complementary views.

Every pass gets an explicit 4D additive float mask (`d2f.mask`) and explicit `position_ids`; no
`labels=` ever reaches the model. `make_batch` turns token rows into the noisy (G, L) tensors of a
global batch on the CPU, from one generator, so noise does not depend on how rows are split over
processes and micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from d2f.certainty import certainty_step, d3llm_batch, dparallel_batch
from d2f.config import CertaintyConfig, NoiseConfig
from d2f.data import TokenBatch
from d2f.family import Family
from d2f.loss import distill_terms, mdm_loss
from d2f.mask import block_causal_mask, block_ids, causal_mask, full_mask, position_ids, to_additive
from d2f.recipes.fast_dllm_v2 import adapt_checkpoint, fast_dllm_v2_step
from d2f.schedule import add_noise


@dataclass
class Batch:
    """Model inputs and loss targets of a batch (all (B, L) unless noted).

    input_ids: clean tokens x_0 (long). noisy_ids: x_t, what the model reads (long).
    masked: positions in the loss (bool). p_mask: their nominal ratio (float; 1 where not noised).
    blocks: d2f.mask block ids (long; 0 prompt, k >= 1 answer block, -1 = not attended).
    valid: attended positions (bool). positions: position ids (long).
    """

    input_ids: Tensor
    noisy_ids: Tensor
    masked: Tensor
    p_mask: Tensor
    blocks: Tensor
    valid: Tensor
    positions: Tensor

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def to(self, device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def make_batch(
    tokens: TokenBatch, family: Family, noise: NoiseConfig, generator: torch.Generator
) -> Batch:
    """Noise a (G, L) global batch (CPU) and lay out its blocks and positions.

    `noise` is `train.noise` with its schedule resolved (`Objective.noise_config`): None = no noise.
    Padding = positions >= lengths. With `noise.mask_padding` (the released recipe) padding is an
    ordinary maskable, attended answer token; without it padding is neither masked nor attended.
    AR (schedule None): nothing is noised; the targets are the answer and its end token.
    """
    ids = tokens.input_ids  # (G, L)
    pos = torch.arange(ids.shape[1])[None]  # (1, L)
    pad = pos >= tokens.lengths[:, None]  # (G, L)
    valid = torch.ones_like(pad) if noise.mask_padding else ~pad
    blocks = block_ids(valid, tokens.prompt_lens, noise.block_size)  # (G, L)
    if noise.schedule is None:
        masked = (pos >= tokens.prompt_lens[:, None]) & ~pad
        noisy = ids
        p_mask = torch.ones(ids.shape)
    else:
        if family.mask_token_id is None:
            raise ValueError(f"family {family.name!r} has no mask token: it cannot be noised")
        noisy, masked, p_mask = add_noise(
            ids,
            tokens.prompt_lens,
            family.mask_token_id,
            noise.block_size,
            kind=noise.schedule,
            lo=noise.lo,
            hi=noise.hi,
            eps=noise.eps,
            pad=pad,
            mask_padding=noise.mask_padding,
            generator=generator,
        )
    return Batch(ids, noisy, masked, p_mask, blocks, valid, position_ids(valid))


def forward(model, batch: Batch, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Logits (B, L, V) of `batch.noisy_ids` under the bool mask (B, L, L), explicit positions."""
    out = model(
        input_ids=batch.noisy_ids,
        attention_mask=to_additive(mask, dtype),  # (B, 1, L, L) 0 / dtype-min
        position_ids=batch.positions,
        use_cache=False,
    )
    return out.logits


def student_logits(model, batch: Batch, dtype: torch.dtype) -> Tensor:
    """The D2F student: the model as it is (adapter on), block-causal attention."""
    return forward(model, batch, block_causal_mask(batch.blocks), dtype)


def teacher_logits(model, batch: Batch, dtype: torch.dtype) -> Tensor:
    """The teacher: the same weights with the LoRA adapter disabled, bidirectional, no grad.

    NOTE: `disable_adapter` is called on the unwrapped peft model (DDP / DeepSpeed wrappers do not
    forward it); the forward itself goes through the wrapper, as sharded backends need.
    """
    peft_model = extract_model_from_parallel(model)
    with torch.no_grad(), peft_model.disable_adapter():
        return forward(model, batch, full_mask(batch.blocks), dtype)


Metrics = dict[str, Tensor]


def distill_step(model, batch: Batch, family: Family, dtype: torch.dtype) -> tuple[Tensor, Metrics]:
    """Asymmetric distillation: loss = H(p_T, p_S) over masked tokens; logs KL and H(p_T)."""
    t_logits = teacher_logits(model, batch, dtype)  # (B, L, V)
    s_logits = student_logits(model, batch, dtype)  # (B, L, V)
    terms = distill_terms(s_logits, t_logits, batch.masked, batch.p_mask, shift=family.shift_logits)
    return terms.loss, {"kl": terms.kl.detach(), "teacher_entropy": terms.teacher_entropy}


def mdm_step(model, batch: Batch, family: Family, dtype: torch.dtype) -> tuple[Tensor, Metrics]:
    """Masked diffusion from the clean tokens, bidirectional attention."""
    logits = forward(model, batch, full_mask(batch.blocks), dtype)  # (B, L, V)
    maskable = batch.blocks >= 1  # the answer (and attended padding): ELBO normalisation
    loss = mdm_loss(
        logits,
        batch.input_ids,
        batch.masked,
        batch.p_mask,
        shift=family.shift_logits,
        maskable=maskable,
    )
    return loss, {}


def ar_step(model, batch: Batch, family: Family, dtype: torch.dtype) -> tuple[Tensor, Metrics]:
    """Next-token cross-entropy on the answer (+ end token) under the causal mask."""
    logits = forward(model, batch, causal_mask(batch.valid), dtype)  # (B, L, V)
    # logits[j - 1] predicts token j (shift=True); weight 1; the per-row mean of mdm_loss
    loss = mdm_loss(logits, batch.input_ids, batch.masked, batch.p_mask, shift=True)
    return loss, {}


@dataclass(frozen=True)
class BatchContext:
    """What an objective's own batch builder may read besides the tokens: training progress (for
    curricula) and the micro-batch layout. Built by the trainer before each step."""

    step: int  # optimiser steps done before this one
    max_steps: int  # train.max_steps
    epoch: float  # fractional epochs of data consumed before this step (step * G / records)
    micro_batch_size: int  # rows per micro-batch (the global batch is cut in these, in order)
    certainty: CertaintyConfig  # train.certainty (the dparallel / d3llm settings)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / self.max_steps


@dataclass(frozen=True)
class Objective:
    """A training objective: its step function and what it needs from the trainer."""

    step: Callable[..., tuple[Tensor, Metrics]]
    schedule: str | None  # default noise schedule; None: the objective reads clean tokens
    lora: bool  # trains a LoRA adapter on a frozen base (else every weight)
    needs_mask_token: bool  # a dLLM family (mask token, bidirectional); else a causal AR family
    legend: str  # what the logged numbers are
    # (tokens, family, noise, generator, BatchContext) -> a batch with .rows/.to, .masked, .blocks;
    # None: `make_batch`
    make_batch: Callable | None = None
    # (config.json dict, tokenizer, resolved noise) -> the pair of the family this objective
    # trains, e.g. AR -> fast_dllm_v2 (d2f.recipes); None: the checkpoint's family as it is
    adapt: Callable[..., tuple[dict, Any]] | None = None

    def noise_config(self, noise: NoiseConfig) -> NoiseConfig:
        """`train.noise` with its schedule resolved: the configured one, else this objective's
        default; None (no noise) for an objective that reads clean tokens."""
        if self.schedule is None:
            return replace(noise, schedule=None)
        return replace(noise, schedule=noise.schedule or self.schedule)


OBJECTIVES: dict[str, Objective] = {
    "distill": Objective(
        distill_step,
        "ramp",
        lora=True,
        needs_mask_token=True,
        legend="loss = H(p_T, p_S), the optimised soft cross-entropy = kl + teacher_entropy; "
        "kl = KL(p_T || p_S), student vs teacher; both 1/ratio weighted, per-sequence means",
    ),
    "mdm": Objective(
        mdm_step,
        "single",
        lora=False,
        needs_mask_token=True,
        legend="loss = masked-diffusion ELBO: cross-entropy vs the clean tokens, 1/t weighted, "
        "per answer token",
    ),
    "ar": Objective(
        ar_step,
        None,
        lora=False,
        needs_mask_token=False,
        legend="loss = next-token cross-entropy on the answer and its end token",
    ),
    # dParallel / d3LLM (d2f.certainty): LoRA on the teacher, two complementary bidirectional views
    "dparallel": Objective(
        certainty_step,
        None,
        lora=True,
        needs_mask_token=True,
        legend="loss = ce_1 + ce_2 + lambda (ent_1 + ent_2): token-mean cross-entropy of the two "
        "complementary views of one semi-AR block, + entropy (T 0.5) of correctly predicted masked "
        "tokens; no 1/p weight (dParallel)",
        make_batch=dparallel_batch,
    ),
    "d3llm": Objective(
        certainty_step,
        None,
        lora=True,
        needs_mask_token=True,
        legend="loss = (ce_1 + ce_2 + lambda ent_1 [+ lambda ent_2 on Dream]) / 4: dparallel's "
        "terms, the mask set from the teacher's decode order (d3LLM)",
        make_batch=d3llm_batch,
    ),
    "fast_dllm_v2": Objective(
        fast_dllm_v2_step,
        "random",
        lora=False,
        needs_mask_token=True,
        legend="loss = Fast-dLLM v2: shifted cross-entropy of the noisy half of [x_t || x_0] over "
        "two complementary views, per answer token; view_masked + view_complement = loss",
        adapt=adapt_checkpoint,
    ),
}


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast of the forward passes (the losses upcast to fp32 themselves)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
