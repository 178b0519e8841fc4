"""The block-causal attention rule of D2F (paper Sec. 3.1), the single source of every mask in d2f.

A sequence is cut into blocks. The prompt is block 0, one bidirectional block; answer block k >= 1
covers `block_size` positions starting at the end of the prompt (the last one may be partial).
Padding (and, in the decoder, positions of blocks that do not exist yet) has block id -1.

With `b(i)` the block id of position i of a row, query i may attend key j iff

    b(j) >= 0  and  ( b(i) >= 0 and b(j) <= b(i)  or  i == j )

i.e. every block sees the prompt, all earlier blocks and itself (bidirectional inside the block) and
nothing later; no real query ever attends a padding key; a padding query attends only itself (its
output is discarded, the diagonal only keeps softmax finite). Rows of a batch may have prompts of
different lengths and any mix of left and right padding.

The student in training and the decoder use the same rule; the teacher and the reference decoder's
bidirectional passes use `full_mask` (b(j) >= 0 only); Fast-dLLM v2's training reads a doubled
input `[x_t || x_0]` under `bd3_mask`, built from the same block ids. Forms: boolean (True = may
attend), additive float (0 / dtype min, right for eager and sdpa alike) and flex-attention
`BlockMask`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_ids(valid: Tensor, prompt_end: Tensor, block_size: int) -> Tensor:
    """Block id of every position.

    valid: (B, L) bool, False on padding. prompt_end: (B,) long, index of each row's first answer
    position (== L for a prompt-only row). Returns (B, L) long: 0 on the prompt, 1 + (i -
    prompt_end) // block_size on the answer, -1 where `valid` is False.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    L = valid.shape[1]
    pos = torch.arange(L, device=valid.device)  # (L,)
    offset = pos[None, :] - prompt_end[:, None]  # (B, L)
    ids = torch.where(offset < 0, 0, 1 + offset.clamp(min=0) // block_size)
    return torch.where(valid, ids, -1)


def block_causal_mask(ids: Tensor, q_start: int = 0, q_end: int | None = None) -> Tensor:
    """Boolean block-causal mask for queries `q_start:q_end` over keys `0:K`.

    ids: (B, K) long block ids of `[cached prefix | new window]`. Returns (B, Q, K) bool, True =
    may attend. With q_start=0 this is the full (B, K, K) mask; with q_start = cache length it is
    exactly the rows of the window, i.e. `block_causal_mask(ids)[:, q_start:q_end]`.
    """
    K = ids.shape[1]
    q_end = K if q_end is None else q_end
    q_ids = ids[:, q_start:q_end, None]  # (B, Q, 1)
    k_ids = ids[:, None, :]  # (B, 1, K)
    allowed = (k_ids >= 0) & (q_ids >= 0) & (k_ids <= q_ids)
    diag = torch.arange(q_start, q_end, device=ids.device)[:, None] == torch.arange(
        K, device=ids.device
    )  # (Q, K)
    return allowed | diag[None]


def full_mask(ids: Tensor, q_start: int = 0, q_end: int | None = None) -> Tensor:
    """Boolean bidirectional mask (teacher / vanilla dLLM): every real key, no padding key.

    Same shapes and padding rule as `block_causal_mask`: query i attends j iff b(j) >= 0 and
    b(i) >= 0, or i == j.
    """
    K = ids.shape[1]
    q_end = K if q_end is None else q_end
    q_real = ids[:, q_start:q_end, None] >= 0  # (B, Q, 1)
    k_real = ids[:, None, :] >= 0  # (B, 1, K)
    diag = torch.arange(q_start, q_end, device=ids.device)[:, None] == torch.arange(
        K, device=ids.device
    )
    return (q_real & k_real) | diag[None]


def bd3_mask(ids: Tensor) -> Tensor:
    """Boolean mask of the doubled input `[x_t || x_0]` (Fast-dLLM v2 / BD3-LM training).

    ids: (B, L) long block ids of one row (as `block_ids`; -1 = padding). Returns (B, 2L, 2L)
    bool, True = may attend; columns and rows 0..L-1 are the noisy half x_t, L..2L-1 the clean
    half x_0, and position i of either half is token i of the row. With b(i) = ids[:, i]:

        x_t query i, x_t key j :  b(j) == b(i)     (bidirectional inside the noisy block)
        x_t query i, x_0 key j :  b(j) <  b(i)     (the clean earlier blocks)
        x_0 query i, x_0 key j :  b(j) <= b(i)     (the clean stream, block-causal)
        x_0 query i, x_t key j :  never

    with b(i) >= 0 and b(j) >= 0 in every case; a padding query attends only its own key (its
    output is discarded; the diagonal keeps softmax finite), as in `block_causal_mask`.
    """
    L = ids.shape[1]
    q = ids[:, :, None]  # (B, L, 1)
    k = ids[:, None, :]  # (B, 1, L)
    real = (q >= 0) & (k >= 0)  # (B, L, L)
    diag = torch.eye(L, dtype=torch.bool, device=ids.device)[None]  # (1, L, L)
    tt = (real & (k == q)) | diag
    t0 = real & (k < q)
    oo = (real & (k <= q)) | diag
    top = torch.cat([tt, t0], -1)  # (B, L, 2L) x_t queries
    bottom = torch.cat([torch.zeros_like(oo), oo], -1)  # (B, L, 2L) x_0 queries
    return torch.cat([top, bottom], 1)


def causal_mask(valid: Tensor, q_start: int = 0, q_end: int | None = None) -> Tensor:
    """Boolean causal mask with padding (the autoregressive baseline): j <= i, both real."""
    K = valid.shape[1]
    q_end = K if q_end is None else q_end
    pos_q = torch.arange(q_start, q_end, device=valid.device)[:, None]
    pos_k = torch.arange(K, device=valid.device)[None, :]
    allowed = (pos_k <= pos_q)[None] & valid[:, None, :] & valid[:, q_start:q_end, None]
    return allowed | (pos_k == pos_q)[None]


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, Q, K) bool -> (B, 1, Q, K) additive float mask: 0 where allowed, dtype min elsewhere.

    NOTE: eager attention ADDS the mask, so a bool mask there is silently wrong (True = +1).
    The additive form is right under eager and sdpa.
    """
    # one kernel for fp32 (python scalars give torch's default float dtype; `to` is then a no-op)
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def flex_block_mask(ids: Tensor, q_start: int = 0, q_end: int | None = None, causal: bool = True):
    """Flex-attention `BlockMask` of `block_causal_mask` (or `full_mask` when causal=False).

    The same rule, evaluated inside the kernel from `ids` (B, K); for the flex_attention backend
    (GPU; works on CPU too, slowly).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, K = ids.shape
    q_end = K if q_end is None else q_end

    def mask_mod(b, h, q_idx, kv_idx):
        qi = q_idx + q_start
        qb = ids[b, qi]
        kb = ids[b, kv_idx]
        seen = (kb <= qb) if causal else (kb >= 0)
        return ((kb >= 0) & (qb >= 0) & seen) | (qi == kv_idx)

    return create_block_mask(
        mask_mod, B=B, H=None, Q_LEN=q_end - q_start, KV_LEN=K, device=ids.device
    )


def position_ids(valid: Tensor) -> Tensor:
    """(B, L) positions that skip padding: the n-th real token of a row gets position n - 1."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)
