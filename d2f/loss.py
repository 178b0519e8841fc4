"""Training losses of D2F (paper Sec. 3, asymmetric distillation) and plain masked diffusion.

For a masked token ``i`` of row ``b`` with block ratio ``p_i`` (``p_mask``), teacher distribution
``p_T`` and student distribution ``p_S`` (softmax at temperature 1, always in fp32):

    H(p_T, p_S)_i = -sum_v p_T(v) log p_S(v)                (soft cross-entropy, the optimised loss)
    KL_i          =  sum_v p_T(v) (log p_T(v) - log p_S(v)) (forward KL(teacher || student))
    H(p_T)_i      = -sum_v p_T(v) log p_T(v)                (teacher entropy; H(p_T, p_S) = KL + H)

Reduction (the released run used micro-batch 1; this keeps its objective for any batch):

    loss = 1/|R| sum_{b in R} 1/|M_b| sum_{i in M_b} ell_i / p_i,   R = {b : |M_b| > 0},

with ``M_b`` the masked positions of row b. With nothing masked anywhere the loss is an exact 0
that still backpropagates (zero gradients). Only masked positions are gathered, so memory grows
with the number of masked tokens, not with ``B * L * V``.

``shift=True`` (Dream): the logits at position ``j - 1`` predict the token at ``j``, for student and
teacher alike; we use ``logits[:, :-1]`` against ``masked[:, 1:]``, ``p_mask[:, 1:]``.
NOTE: position 0 can then never be predicted, so a masked position 0 is ignored.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DistillTerms(NamedTuple):
    """Scalar float32 terms of :func:`distill_terms`, all with the same weighting and reduction.

    loss: soft cross-entropy ``H(p_T, p_S)``, what the optimiser sees.
    kl: forward ``KL(teacher || student)``; 0 when student == teacher; same gradient as ``loss``.
    teacher_entropy: ``H(p_T)`` (no grad); ``loss = kl + teacher_entropy`` up to rounding.
    """

    loss: Tensor
    kl: Tensor
    teacher_entropy: Tensor


def _masked_positions(
    masked: Tensor, p_mask: Tensor, shift: bool, maskable: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column of every masked token, and its weight ``1 / (p_i |M_b| |R|)``.

    masked: (B, L) bool; p_mask: (B, L). Returns rows (N,) long, cols (N,) long (indices into the
    logits, already shifted) and weight (N,) float32, so that ``loss = sum_i weight_i * ell_i``.
    maskable: optional (B, L) bool; when given, |M_b| is the row's number of MASKABLE positions
    and R the rows with any (the ELBO normalisation, see `mdm_loss`).
    """
    if masked.shape != p_mask.shape or masked.dim() != 2:
        raise ValueError(
            f"masked and p_mask must both be (B, L), got {tuple(masked.shape)} and "
            f"{tuple(p_mask.shape)}"
        )
    if shift:  # token j is predicted by logits row j - 1
        masked, p_mask = masked[:, 1:], p_mask[:, 1:]
        maskable = None if maskable is None else maskable[:, 1:]
    counts = (masked if maskable is None else maskable).sum(dim=1)  # (B,) |M_b|
    n_rows = (counts > 0).sum().clamp(min=1)  # |R|; clamp only matters when N == 0
    rows, cols = masked.nonzero(as_tuple=True)  # (N,), (N,), row-major order
    weight = 1.0 / (p_mask[rows, cols].float() * counts[rows] * n_rows)
    return rows, cols, weight


def _check_logits(logits: Tensor, masked: Tensor, name: str) -> None:
    if logits.dim() != 3 or logits.shape[:2] != masked.shape:
        raise ValueError(
            f"{name} must be (B, L, V) with (B, L) = {tuple(masked.shape)}, "
            f"got {tuple(logits.shape)}"
        )


def distill_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    masked: Tensor,
    p_mask: Tensor,
    shift: bool = False,
) -> DistillTerms:
    """Soft cross-entropy, forward KL and teacher entropy over the masked tokens.

    student_logits, teacher_logits: (B, L, V), any float dtype (upcast to fp32 after gathering).
    masked: (B, L) bool. p_mask: (B, L) nominal mask ratio of each token; it must be > 0 where
    masked (NOTE: not checked, to avoid a host sync; a 0 there gives an infinite loss).
    The teacher is detached. Returns :class:`DistillTerms` of float32 scalars.
    """
    _check_logits(student_logits, masked, "student_logits")
    _check_logits(teacher_logits, masked, "teacher_logits")
    rows, cols, weight = _masked_positions(masked, p_mask, shift)
    log_p_s = F.log_softmax(student_logits[rows, cols].float(), dim=-1)  # (N, V)
    log_p_t = F.log_softmax(teacher_logits.detach()[rows, cols].float(), dim=-1)  # (N, V)
    p_t = log_p_t.exp()
    # Vocabulary entries the teacher rules out (p_T = 0, e.g. -inf logits) add nothing; the
    # where() keeps 0 * (-inf) from turning into NaN.
    seen = p_t > 0
    cross = -torch.where(seen, p_t * log_p_s, 0.0).sum(dim=-1)  # (N,)
    entropy = -torch.where(seen, p_t * log_p_t, 0.0).sum(dim=-1)  # (N,)
    kl = torch.where(seen, p_t * (log_p_t - log_p_s), 0.0).sum(dim=-1)  # (N,)
    return DistillTerms(
        loss=(weight * cross).sum(),
        kl=(weight * kl).sum(),
        teacher_entropy=(weight * entropy).sum(),
    )


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    masked: Tensor,
    p_mask: Tensor,
    shift: bool = False,
) -> Tensor:
    """D2F distillation loss: the ``loss`` field of :func:`distill_terms` (float32 scalar)."""
    return distill_terms(student_logits, teacher_logits, masked, p_mask, shift).loss


def mdm_loss(
    logits: Tensor,
    clean_ids: Tensor,
    masked: Tensor,
    p_mask: Tensor,
    shift: bool = False,
    maskable: Tensor | None = None,
) -> Tensor:
    """Masked-diffusion loss against the clean tokens (training a teacher from scratch).

    ``ell_i = -log p_S(x_0[i])`` with the same ``1 / p_i`` weighting, reduction and ``shift`` as
    :func:`distill_terms`; equals ``distill_loss`` with a one-hot teacher.
    logits: (B, L, V) any float dtype; clean_ids: (B, L) long. Returns a float32 scalar.

    maskable: (B, L) bool of the positions that COULD be masked (the answer). When given, each
    row's sum is divided by its maskable count instead of its masked count: the ELBO of masked
    diffusion, ``1/L_b sum_{i in M_b} ell_i / t`` (LLaDA's normalisation). NOTE: use it with the
    `single` schedule (t ~ U(eps, 1]): dividing by the masked count (~ t L_b) as well as by t
    weights a row by ~1/t^2, so the rare nearly-clean rows (t ~ eps) dominate the gradient and a
    tiny teacher trained that way never learns (measured: 4.5% vs 98% held-out on the
    miniature world, docs/tinyworld.md).
    """
    _check_logits(logits, masked, "logits")
    if clean_ids.shape != masked.shape:
        raise ValueError(f"clean_ids must be {tuple(masked.shape)}, got {tuple(clean_ids.shape)}")
    rows, cols, weight = _masked_positions(masked, p_mask, shift, maskable)
    targets = clean_ids[:, 1:] if shift else clean_ids
    nll = F.cross_entropy(logits[rows, cols].float(), targets[rows, cols], reduction="none")  # (N,)
    return (weight * nll).sum()
