"""Block-wise noise schedule for D2F training (paper Sec. 3, "asymmetric distillation").

The answer of each row (everything after its prompt, end and padding tokens included) is cut into
blocks of ``block_size`` tokens that start at the row's prompt end; the last block may be partial.
Blocks are numbered as in ``d2f.mask.block_ids`` (computed by it): 0 is the prompt, answer block
``k`` (0-based below, ``k < n_b``) has block id ``k + 1``.
Row ``b`` has its own block count

    n_b = ceil((L - prompt_len_b) / block_size),

never the batch maximum. Every block ``k < n_b`` gets a mask ratio ``r_{b,k}`` and each of its
tokens is replaced by the mask id independently with probability ``r_{b,k}``:

    P(masked[b, j]) = r_{b, block_ids[b, j] - 1}   if j >= prompt_len_b   (and j maskable)
    P(masked[b, j]) = 0                            if j <  prompt_len_b.

Schedules (``kind``), with every ``u ~ U[0, 1)`` independent:

- ``"ramp"`` (the released trainer's "monotonic" schedule, the default):
  ``r_0 = p0 = lo + u_0 (hi - lo)``, ``r_k = p0 + (hi - p0) / (n - 1) * (u_1 + ... + u_k)``.
  Hence ``lo <= r_0 <= r_1 <= ... <= r_{n-1} < hi`` (``hi`` itself when lo == hi) and
  ``E[r_k] = E[p0] + (hi - E[p0]) k / (2 (n - 1))``; for lo=0.2, hi=0.7 the last block averages
  0.575 whatever n.
- ``"random"`` (the paper's ablation): ``r_k = lo + u_k (hi - lo)``, independent per block.
- ``"single"`` (plain masked diffusion): ``r_k = t`` for all k, with
  ``t = eps + (1 - eps)(1 - u) in (eps, 1]``.
"""

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from d2f.mask import block_ids

ScheduleKind = Literal["ramp", "random", "single"]
_KINDS = ("ramp", "random", "single")


class NoisyBatch(NamedTuple):
    """Output of :func:`add_noise`.

    noisy_ids: (B, L) long, ``input_ids`` with masked positions replaced by the mask id.
    masked: (B, L) bool, True where a token was replaced.
    p_mask: (B, L) float32, the nominal ratio of the token's block on answer positions;
        1.0 on prompt positions (never masked) so that dividing by ``p_mask`` is always safe.
    """

    noisy_ids: Tensor
    masked: Tensor
    p_mask: Tensor


def _check_prompt_lens(prompt_lens: Tensor, seq_len: int, block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be non-negative, got {seq_len}")
    if prompt_lens.dim() != 1 or prompt_lens.dtype.is_floating_point:
        raise ValueError(
            f"prompt_lens must be a 1-D integer tensor, got {prompt_lens.dtype} "
            f"of shape {tuple(prompt_lens.shape)}"
        )
    if prompt_lens.numel() and (int(prompt_lens.min()) < 0 or int(prompt_lens.max()) > seq_len):
        raise ValueError(
            f"prompt_lens must lie in [0, seq_len={seq_len}], got min {int(prompt_lens.min())} "
            f"and max {int(prompt_lens.max())}"
        )


def num_blocks(prompt_lens: Tensor, seq_len: int, block_size: int) -> Tensor:
    """Each row's own answer block count ``n_b = ceil((L - prompt_len_b) / block_size)``.

    prompt_lens: (B,) integer, index where each row's answer starts. Returns (B,) long.
    """
    _check_prompt_lens(prompt_lens, seq_len, block_size)
    return torch.div(
        seq_len - prompt_lens.long() + block_size - 1, block_size, rounding_mode="floor"
    )


def block_ratios(
    prompt_lens: Tensor,
    seq_len: int,
    block_size: int,
    *,
    kind: ScheduleKind = "ramp",
    lo: float = 0.2,
    hi: float = 0.7,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask ratio of every answer block (see the module docstring for the schedules).

    prompt_lens: (B,) integer. Returns (B, NB) float32 with ``NB = max_b n_b``; entry (b, k) is
    block k's ratio for k < n_b and 0 beyond the row's own count. ``lo``/``hi`` bound "ramp" and
    "random"; ``eps`` bounds "single". Draws one (B, NB) uniform tensor from ``generator``; row b's
    ratios use only its own first n_b draws and its own n_b (so with one generator seed, the first
    row of a batch gets the same ratios as when it is alone).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"lo and hi must satisfy 0 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    n = num_blocks(prompt_lens, seq_len, block_size)  # (B,)
    nb = int(n.max()) if n.numel() else 0
    device = prompt_lens.device
    u = torch.rand(n.shape[0], nb, generator=generator, device=device)  # (B, NB) in [0, 1)
    k = torch.arange(nb, device=device)
    valid = k.unsqueeze(0) < n.unsqueeze(1)  # (B, NB): block k exists in row b

    if kind == "ramp":
        p0 = lo + u[:, :1] * (hi - lo)  # (B, 1)
        # Cumulative u_1 + ... + u_k; u_0 is p0's draw, so it is left out of the sum.
        steps = torch.cat([torch.zeros_like(u[:, :1]), u[:, 1:]], dim=1).cumsum(dim=1)
        # NOTE: n - 1 is the row's OWN count; n == 1 rows have steps == 0 and keep only p0.
        scale = (hi - p0) / (n - 1).clamp(min=1).unsqueeze(1).to(u.dtype)
        ratios = p0 + scale * steps
    elif kind == "random":
        ratios = lo + u * (hi - lo)
    else:  # "single": one t per row, from the row's first draw
        ratios = (eps + (1.0 - eps) * (1.0 - u[:, :1])).expand(-1, nb)
    return torch.where(valid, ratios, 0.0)


def add_noise(
    input_ids: Tensor,
    prompt_lens: Tensor,
    mask_token_id: int,
    block_size: int,
    *,
    kind: ScheduleKind = "ramp",
    lo: float = 0.2,
    hi: float = 0.7,
    eps: float = 1e-3,
    pad: Tensor | None = None,
    mask_padding: bool = True,
    generator: torch.Generator | None = None,
) -> NoisyBatch:
    """Mask the answer of each row block by block (forward process ``x_0 -> x_t``).

    input_ids: (B, L) long, clean tokens ``x_0``. prompt_lens: (B,) integer, answer start per row.
    pad: optional (B, L) bool marking padding; only read when ``mask_padding`` is False, in which
    case padding positions are never masked (they keep their block's ``p_mask``). By default
    padding is maskable, as in the released trainer (it is how the model learns where to stop).

    Invariants: ``masked[b, j] => j >= prompt_len_b``; ``noisy_ids = where(masked, mask_token_id,
    input_ids)``; ``P(masked[b, j]) = p_mask[b, j]`` on maskable answer positions.
    Random draws: block ratios first, then one uniform per position, both from ``generator``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    bsz, seq_len = input_ids.shape
    if prompt_lens.shape != (bsz,):
        raise ValueError(f"prompt_lens must have shape ({bsz},), got {tuple(prompt_lens.shape)}")
    if pad is not None and pad.shape != input_ids.shape:
        raise ValueError(f"pad must have shape {tuple(input_ids.shape)}, got {tuple(pad.shape)}")
    if not mask_padding and pad is None:
        raise ValueError("mask_padding=False needs the pad tensor")

    ratios = block_ratios(
        prompt_lens, seq_len, block_size, kind=kind, lo=lo, hi=hi, eps=eps, generator=generator
    )  # (B, NB)
    every = torch.ones(bsz, seq_len, dtype=torch.bool, device=input_ids.device)
    block = block_ids(every, prompt_lens.long(), block_size)  # (B, L) 0 prompt, k >= 1 answer
    answer = block >= 1
    # column 0 of the table is the prompt's (ratio 0), so block ids index it as they are
    table = torch.cat([torch.zeros_like(ratios[:, :1]), ratios], dim=1)  # (B, 1 + NB)
    tok_ratio = table.gather(1, block)  # (B, L)
    p_mask = torch.where(answer, tok_ratio, 1.0)

    maskable = answer if mask_padding else answer & ~pad
    draw = torch.rand(bsz, seq_len, generator=generator, device=input_ids.device)
    masked = maskable & (draw < tok_ratio)  # strict '<' on U[0,1): P = ratio exactly
    noisy_ids = torch.where(masked, mask_token_id, input_ids)
    return NoisyBatch(noisy_ids=noisy_ids, masked=masked, p_mask=p_mask)
