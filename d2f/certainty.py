"""dParallel's certainty-forcing and d3LLM's pseudo-trajectory distillation (`dparallel`, `d3llm`).

Rebuilt from the released training code (read, not copied; docs/training.md says where we depart):
dParallel `czg1225/dParallel@2ca4d147` (`LLaDA/llada_train.py`: `forward_process_semi_ar` and the
trainer's loss; `Dream/dream_train.py`), d3LLM `hao-ai-lab/d3LLM@e5bfcacc`
(`d3llm/d3llm_LLaDA/distill_2_training/d3llm_llada_train.py`: `forward_process_with_trajectory`;
`d3llm/d3llm_DREAM/distill_2_training/`). Both train the base model + LoRA on the teacher's (= the
base model's) own answers; no teacher network runs during training.

Views. Row b, prompt length P_b, sequence length L, block size Bk, region span R_b (dparallel:
L - P_b, padding included; d3llm: lengths_b - P_b, the real answer and its end token):

    n_b = R_b // Bk,  k_b ~ U{0..n_b},  s_b = P_b + k_b Bk,  e_b = s_b + Bk if k_b < n_b else L
    view 1: x1[j] = MASK iff j in M_b or j >= e_b;              loss positions M_b
    view 2: x2[j] = MASK iff j in [s_b, e_b) \\ M_b or j >= e_b;  loss positions [s_b, e_b) \\ M_b
    the prefix j < s_b (prompt and earlier blocks) stays clean; M_b is a subset of [s_b, e_b).

NOTE: upstream's `forward_process_semi_ar` writes the region for every row at once (correct only at
micro-batch 1, which is what it ran); here every row draws its own k_b and region.

Inner mask M_b: dparallel: each position independently with P = mask_prob (0.5005, fixed).
d3llm: from the teacher's decode rank rho (rank 0 = decoded first, d2f.trajectories), with
r ~ U[r_min + (r_max - r_min) progress, r_max] once per micro-batch and n_un = floor((1 - r)(e - s)):

    intended: M_b = the block's positions that are not among its n_un first decoded ones
    upstream: M_b = {j in [s, e) : rho_j > min((s - P) + n_un, T_b - 1)}, T_b = decoded columns
              (the teacher's state after idx + 1 steps: one token more than n_un is clean, and
              the teacher's blocks need not be the training blocks)
    no trajectory: M_b = {j : u_j < (1 - eps) r + eps}      (eps = train.noise.eps)

Loss of a micro-batch, z_v the logits of view v, y the clean ids (token means, as upstream):

    CE_v  = 1/|M_v| sum_{i in M_v} -log softmax(z_v,i)[y_i]                      (0 if M_v empty)
    C_v   = {i in M_v : argmax z_v,i = y_i}                  (a selection: no grad through it)
    ENT_v = 1/|C_v| sum_{i in C_v} H(softmax(z_v,i / T)),  T = 0.5               (0 if C_v empty)
    dparallel: CE_1 + CE_2 + lam (ENT_1 + ENT_2)          lam = 2 (LLaDA), 1 (Dream)
    d3llm:     (CE_1 + CE_2 + lam ENT_1) / 4              lam = 2 (LLaDA)
               (CE_1 + CE_2 + lam (ENT_1 + ENT_2)) / 4    lam = 1 (Dream)

"Dream" is a family with shifted logits (z[:, j - 1] scores y[:, j]). An empty set gives an exact 0
that still backpropagates (zero gradients, never NaN). There is no 1/p weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from d2f.data import NEVER_DECODED, TokenBatch
from d2f.family import Family
from d2f.mask import block_ids, full_mask, position_ids, to_additive

if TYPE_CHECKING:
    from d2f.config import NoiseConfig
    from d2f.objectives import BatchContext

_OUTSIDE = NEVER_DECODED + 1  # sort key of positions outside the active block: after all of it


@dataclass(frozen=True)
class LossSpec:
    """How `certainty_step` weighs its terms: scale * (CE_1 + CE_2 + weight * entropies)."""

    temperature: float  # T of the entropy term
    entropy_weight: float  # lambda
    both_entropies: bool  # ENT_1 + ENT_2 (else ENT_1 only)
    scale: float  # 1 (dparallel) or 1/4 (d3llm)


@dataclass
class ViewsBatch:
    """Two complementary views of a batch, all (B, L): clean ids, each view's input and loss
    positions, d2f.mask block ids (only their validity is used: bidirectional), attended
    positions and position ids; `spec` says how the step scores them."""

    input_ids: Tensor  # x_0 (long)
    noisy_ids: Tensor  # view 1 input (long)
    masked: Tensor  # view 1 loss positions M_1 (bool)
    noisy_c: Tensor  # view 2 input (long)
    masked_c: Tensor  # view 2 loss positions M_2 (bool)
    blocks: Tensor  # (long) 0 prompt, >= 1 answer, -1 not attended
    valid: Tensor  # (bool)
    positions: Tensor  # (long)
    spec: LossSpec

    def _map(self, fn) -> ViewsBatch:
        return ViewsBatch(
            **{f.name: fn(getattr(self, f.name)) for f in fields(self) if f.name != "spec"},
            spec=self.spec,
        )

    def rows(self, start: int, stop: int) -> ViewsBatch:
        return self._map(lambda t: t[start:stop])

    def to(self, device) -> ViewsBatch:
        return self._map(lambda t: t.to(device))


def active_regions(
    prompt_lens: Tensor,
    span_end: Tensor,
    seq_end: Tensor,
    block_size: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Each row's active block [s, e) (module docstring), one uniform draw per row.

    prompt_lens, span_end, seq_end: (B,) long; the span R = span_end - P is cut into whole blocks,
    the last region (k = n) runs to seq_end. Returns s, e: (B,) long.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    n = ((span_end - prompt_lens) // block_size).clamp(min=0)  # (B,)
    u = torch.rand(prompt_lens.shape[0], generator=generator)  # (B,) in [0, 1)
    k = torch.minimum((u * (n + 1).double()).long(), n)  # uniform on {0..n}
    s = prompt_lens + k * block_size
    e = torch.where(k < n, s + block_size, seq_end)
    return s, torch.maximum(e, s)


def complementary_views(
    input_ids: Tensor, inner: Tensor, s: Tensor, e: Tensor, mask_id: int, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """View 1 masks `inner` inside [s, e), view 2 the rest of [s, e); both mask every attended
    position >= e. input_ids, inner, valid: (B, L); s, e: (B,). Returns noisy_1, masked_1,
    noisy_2, masked_2, all (B, L)."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, L)
    region = (pos >= s[:, None]) & (pos < e[:, None]) & valid
    after = (pos >= e[:, None]) & valid
    m1, m2 = region & inner, region & ~inner
    noisy_1 = torch.where(m1 | after, mask_id, input_ids)
    noisy_2 = torch.where(m2 | after, mask_id, input_ids)
    return noisy_1, m1, noisy_2, m2


def trajectory_mask(
    rank: Tensor, prompt_lens: Tensor, s: Tensor, e: Tensor, n_clean: Tensor, mode: str
) -> Tensor:
    """d3LLM's inner mask from the teacher's decode ranks (B, L) long (-1 prompt, NEVER_DECODED
    where nothing was generated). n_clean: (B,) long tokens of [s, e) to leave clean.
    Returns (B, L) bool, meaningful inside [s, e) only (module docstring: intended / upstream)."""
    if mode == "upstream":
        decoded = ((rank >= 0) & (rank < NEVER_DECODED)).sum(dim=1)  # (B,) T_b
        idx = torch.minimum(s - prompt_lens + n_clean, decoded - 1)  # (B,)
        return rank > idx[:, None]
    if mode != "intended":
        raise ValueError(f"trajectory mode must be intended or upstream, got {mode!r}")
    pos = torch.arange(rank.shape[1], device=rank.device)[None]
    region = (pos >= s[:, None]) & (pos < e[:, None])
    key = torch.where(region, rank, _OUTSIDE)
    order = key.argsort(dim=1, stable=True)  # block positions first, by rank, ties by position
    place = torch.empty_like(order).scatter_(1, order, pos.expand_as(order))  # (B, L)
    return place >= n_clean[:, None]


def progressive_block_size(epoch: float, sizes: list[int]) -> int:
    """d3LLM's window curriculum: S[e] + (epoch - e)(S[e+1] - S[e]) truncated, e = floor(epoch);
    the last size from the last epoch on."""
    if epoch < 0 or not sizes:
        raise ValueError(f"need epoch >= 0 and sizes, got {epoch}, {sizes}")
    e = math.floor(epoch)
    if e >= len(sizes) - 1:
        return sizes[-1]
    return int(sizes[e] + (epoch - e) * (sizes[e + 1] - sizes[e]))


def micro_batch_ratios(
    rows: int, micro: int, lo: float, hi: float, progress: float, generator
) -> Tensor:
    """d3LLM's progressive noise: one r ~ U[lo + (hi - lo) progress, hi] per micro-batch of
    `micro` consecutive rows. Returns (rows,) float32."""
    low = lo + (hi - lo) * progress
    groups = -(-rows // micro)
    r = low + torch.rand(groups, generator=generator) * (hi - low)  # (groups,)
    return r.repeat_interleave(micro)[:rows]


def _layout(tokens: TokenBatch, family: Family, noise: NoiseConfig):
    if family.mask_token_id is None:
        raise ValueError(f"family {family.name!r} has no mask token: it cannot be noised")
    ids = tokens.input_ids  # (B, L)
    B, L = ids.shape
    pad = torch.arange(L)[None] >= tokens.lengths[:, None]  # (B, L)
    valid = torch.ones_like(pad) if noise.mask_padding else ~pad
    seq_end = torch.full((B,), L) if noise.mask_padding else tokens.lengths
    return ids, valid, seq_end


def _spec(cfg, family: Family, both: bool, scale: float) -> LossSpec:
    lam = cfg.entropy_weight
    if lam is None:  # the authors': 2 for LLaDA, 1 for Dream
        lam = 1.0 if family.shift_logits else 2.0
    return LossSpec(cfg.temperature, float(lam), both, scale)


def _views_batch(ids, inner, s, e, valid, prompt_lens, block_size, family, spec) -> ViewsBatch:
    views = complementary_views(ids, inner, s, e, family.mask_token_id, valid)
    blocks = block_ids(valid, prompt_lens, block_size)
    return ViewsBatch(ids, *views, blocks, valid, position_ids(valid), spec)


def dparallel_batch(
    tokens: TokenBatch, family: Family, noise: NoiseConfig, generator, ctx: BatchContext
) -> ViewsBatch:
    """dParallel's views (CPU): blocks of train.noise.block_size over the padded answer, fixed
    mask_prob. Draws: one region uniform per row, then one uniform per position."""
    cfg = ctx.certainty
    ids, valid, seq_end = _layout(tokens, family, noise)
    P = tokens.prompt_lens
    s, e = active_regions(P, seq_end, seq_end, noise.block_size, generator)
    inner = torch.rand(ids.shape, generator=generator) < cfg.mask_prob  # (B, L)
    spec = _spec(cfg, family, both=True, scale=1.0)
    return _views_batch(ids, inner, s, e, valid, P, noise.block_size, family, spec)


def d3llm_batch(
    tokens: TokenBatch, family: Family, noise: NoiseConfig, generator, ctx: BatchContext
) -> ViewsBatch:
    """d3LLM's views (CPU): block size from the epoch, r from the progress, the mask set from
    the decode ranks (Bernoulli when the data has none). Draws: one region uniform per row, one
    ratio per micro-batch, then (no trajectory only) one uniform per position."""
    cfg = ctx.certainty
    ids, valid, seq_end = _layout(tokens, family, noise)
    P = tokens.prompt_lens
    bk = progressive_block_size(ctx.epoch, cfg.block_sizes) if cfg.block_sizes else noise.block_size
    s, e = active_regions(P, tokens.lengths, seq_end, bk, generator)
    r = micro_batch_ratios(
        ids.shape[0], ctx.micro_batch_size, cfg.ratio_min, cfg.ratio_max, ctx.progress, generator
    )  # (B,)
    if tokens.decode_rank is None:
        p = (1 - noise.eps) * r + noise.eps
        inner = torch.rand(ids.shape, generator=generator) < p[:, None]
    else:
        n_clean = ((1 - r) * (e - s).float()).long()  # int() of a non-negative number
        inner = trajectory_mask(tokens.decode_rank, P, s, e, n_clean, cfg.trajectory)
    spec = _spec(cfg, family, both=family.shift_logits, scale=0.25)
    return _views_batch(ids, inner, s, e, valid, P, bk, family, spec)


def certainty_terms(
    logits: Tensor, clean_ids: Tensor, masked: Tensor, temperature: float, shift: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CE_v, ENT_v (float32 scalars with grad), |M_v| and |C_v| (no grad) of one view.

    logits: (B, L, V) any float dtype (upcast to fp32 after gathering); clean_ids (B, L) long;
    masked (B, L) bool. shift: logits[:, j - 1] scores token j (position 0 is never scored).
    """
    if logits.dim() != 3 or logits.shape[:2] != masked.shape or clean_ids.shape != masked.shape:
        raise ValueError(
            f"logits (B, L, V), clean_ids and masked (B, L) must agree, got "
            f"{tuple(logits.shape)}, {tuple(clean_ids.shape)}, {tuple(masked.shape)}"
        )
    if shift:
        logits, clean_ids, masked = logits[:, :-1], clean_ids[:, 1:], masked[:, 1:]
    rows, cols = masked.nonzero(as_tuple=True)  # (N,)
    z = logits[rows, cols].float()  # (N, V); N = 0 keeps the graph: its sums are exact zeros
    y = clean_ids[rows, cols]
    nll = F.cross_entropy(z, y, reduction="none")  # (N,)
    n = torch.tensor(rows.numel(), device=z.device)
    correct = (z.detach().argmax(dim=-1) == y).float()  # (N,) selection, no grad
    log_q = F.log_softmax(z / temperature, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(dim=-1)  # (N,) H(softmax(z / T))
    n_correct = correct.sum()
    ce = nll.sum() / n.clamp(min=1)
    ent = (entropy * correct).sum() / n_correct.clamp(min=1)
    return ce, ent, n, n_correct


def _logits(model, ids: Tensor, batch: ViewsBatch, dtype: torch.dtype) -> Tensor:
    out = model(
        input_ids=ids,
        attention_mask=to_additive(full_mask(batch.blocks), dtype),  # bidirectional
        position_ids=batch.positions,
        use_cache=False,
    )
    return out.logits  # (B, L, V)


def certainty_step(
    model, batch: ViewsBatch, family: Family, dtype: torch.dtype
) -> tuple[Tensor, dict[str, Tensor]]:
    """Both views through the model (adapter on, with grad), the loss of the module docstring.

    Logs ce_1, ce_2, ent_1, ent_2, masked (|M_1| + |M_2| of the micro-batch) and acc_1
    (|C_1| / |M_1|)."""
    spec, shift = batch.spec, family.shift_logits
    z1 = _logits(model, batch.noisy_ids, batch, dtype)
    z2 = _logits(model, batch.noisy_c, batch, dtype)
    ce1, ent1, n1, c1 = certainty_terms(z1, batch.input_ids, batch.masked, spec.temperature, shift)
    ce2, ent2, n2, _ = certainty_terms(z2, batch.input_ids, batch.masked_c, spec.temperature, shift)
    ent = ent1 + ent2 if spec.both_entropies else ent1
    loss = spec.scale * (ce1 + ce2 + spec.entropy_weight * ent)
    metrics = {
        "ce_1": ce1.detach(),
        "ce_2": ce2.detach(),
        "ent_1": ent1.detach(),
        "ent_2": ent2.detach(),
        "masked": (n1 + n2).float(),
        "acc_1": c1 / n1.clamp(min=1),
    }
    return loss, metrics
