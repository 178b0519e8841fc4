"""Early exit for the vanilla sampler: SchED and Prophet's early-commit rule.

Both wrap `vanilla_decode` (LLaDA's semi-autoregressive sampler, one full forward per step) with a
stopping rule checked after every forward, before that step's transfer. With `t = 1..T` the global
step (T = num_blocks * steps_per_block) and `p = t / T` the decode's progress, a row stops when

    gbar_t = mean_{i in A} (L_i[top1] - L_i[top2])  >=  tau(p)

over the RAW logits `L` of this forward (aligned to answer columns, not temperature-scaled, the
whole vocabulary); it then fills every mask it has left with this forward's prediction and is done
(its forwards = t). Each row stops on its own.

* `sched` (SchED, arXiv 2512.02892 Sec. 3; no code released): `A` = the whole answer span (all G
  columns, decoded or not), `tau` a smooth non-increasing schedule from `tau_high` to `tau_low`.
* `prophet` (Prophet, pixeli99/Prophet@460afe41 `generate_earlyexit.py`): `A` = a 5-column
  "answer region", `tau` a step function of `p` (7.5 / 5.0 / 2.5 at p < 0.33 / < 0.67 / else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from d2f.decoding.baselines import vanilla_decode
from d2f.decoding.common import Recorder
from d2f.decoding.config import DecodeConfig, strategy_options
from d2f.family import Family

Schedule = Literal["linear", "cosine", "exponential"]


@strategy_options("sched")
@dataclass(frozen=True)
class SchEDOptions:
    """SchED's settings (defaults: the paper's best quality-penalised speed on Dream-Instruct)."""

    schedule: Schedule = "exponential"  # tau(p)'s shape from tau_high (p = 0) toward tau_low
    tau_high: float = 7.5  # threshold on the mean logit margin at the start (raw logit units)
    tau_low: float = 2.5  # ... at the end (0 = the paper's aggressive setting); <= tau_high
    k: float = 16.0  # > 0, the exponential schedule's rate (the paper tries 2, 4, 8, 16)

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine", "exponential"):
            raise ValueError(
                f"schedule must be linear, cosine or exponential, got {self.schedule!r}"
            )
        if math.isnan(self.tau_high) or math.isnan(self.tau_low):
            raise ValueError(
                f"tau_high and tau_low must not be nan, got {self.tau_high}, {self.tau_low}"
            )
        if self.tau_low > self.tau_high:
            raise ValueError(
                f"tau_low ({self.tau_low}) must be <= tau_high ({self.tau_high}): the schedule "
                "does not increase"
            )
        if not self.k > 0:
            raise ValueError(f"k must be > 0, got {self.k}")


@strategy_options("prophet")
@dataclass(frozen=True)
class ProphetOptions:
    """Prophet's settings as released (`should_early_exit`'s thresholds, `answer_length` 5)."""

    early: float = 7.5  # threshold while progress p < 0.33
    mid: float = 5.0  # ... while p < 0.67
    late: float = 2.5  # ... after
    answer_start: int = 0  # >= 0, first monitored answer column (theirs: after "The answer is")
    answer_length: int = 5  # >= 1, monitored columns (cut at the answer's end)

    def __post_init__(self):
        if self.answer_start < 0:
            raise ValueError(f"answer_start must be >= 0, got {self.answer_start}")
        if self.answer_length < 1:
            raise ValueError(f"answer_length must be >= 1, got {self.answer_length}")


def sched_threshold(
    schedule: Schedule, tau_high: float, tau_low: float, p: float, k: float
) -> float:
    """SchED's tau(p) for progress p in [0, 1]: tau_low + (tau_high - tau_low) * w(p) with
    w = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine) or exp(-k p) (exponential): w(0) = 1, w
    non-increasing, so tau(0) = tau_high and tau is non-increasing in p."""
    if tau_high == tau_low:  # NOTE: also the +-inf constants, where the formula gives nan
        return tau_high
    if schedule == "linear":
        w = 1.0 - p
    elif schedule == "cosine":
        w = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        w = math.exp(-k * p)
    return tau_low + (tau_high - tau_low) * w


def prophet_threshold(p: float, early: float, mid: float, late: float) -> float:
    """Prophet's step schedule (`should_early_exit`): early / mid / late at p < 0.33 / < 0.67 / else."""
    if p < 0.33:
        return early
    if p < 0.67:
        return mid
    return late


def logit_margins(logits: Tensor) -> Tensor:
    """(B, W, V) raw logits -> (B, W) fp32 top-1 minus top-2 logit, over the whole vocabulary."""
    top2 = logits.float().topk(2, dim=-1).values  # (B, W, 2)
    return top2[..., 0] - top2[..., 1]


def sched_stop(logits: Tensor, p: float, o: SchEDOptions) -> Tensor:
    """(B, G, V) raw answer logits at progress p -> (B,) bool: the full-span mean margin reaches
    tau(p)."""
    tau = sched_threshold(o.schedule, o.tau_high, o.tau_low, p, o.k)
    return logit_margins(logits).mean(1) >= tau


def prophet_stop(logits: Tensor, p: float, o: ProphetOptions) -> Tensor:
    """(B, G, V) raw answer logits at progress p -> (B,) bool: the answer region's mean margin
    reaches Prophet's threshold. A region past the answer's end never stops (as released)."""
    gaps = logit_margins(logits[:, o.answer_start : o.answer_start + o.answer_length])
    if gaps.shape[1] == 0:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    return gaps.mean(1) >= prophet_threshold(p, o.early, o.mid, o.late)


@torch.no_grad()
def sched_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder):
    def rule(logits: Tensor, t: int, T: int) -> Tensor:
        return sched_stop(logits, t / T, cfg.options)

    vanilla_decode(model, prompts, cfg, family, rec, exit_rule=rule)


@torch.no_grad()
def prophet_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder):
    def rule(logits: Tensor, t: int, T: int) -> Tensor:
        return prophet_stop(logits, t / T, cfg.options)

    vanilla_decode(model, prompts, cfg, family, rec, exit_rule=rule)
