"""D2F's per-step function (window forward over the static cache + the commit rule), compilable.

`window_step` is the body of one steady-state D2F step (`d2f.decoding.pipeline`): the model call
over the window with its 4D mask, the predictions and `common.commit`. `DecodeConfig.compile`
runs it under `torch.compile(fullgraph=True)` (gpt-fast's `decode_one_token` pattern): `fullgraph`
makes a host sync inside the step (`.item()`, `.tolist()`, a tensor in an `if`) an error instead
of a silent graph break, and the fixed shapes let a GPU capture it as a CUDA graph
(`compile="reduce-overhead"`). Shapes are fixed by padding the window on the right to a bucket
(`window_buckets`): a whole number of blocks, a power of two of them (or all of them), so a decode
sees at most log2(num_blocks) + 1 window shapes. The padding columns are invisible to every real
query (their keys are masked) and are written to cache columns that are overwritten before they
are ever seen, so the tokens are those of the unpadded eager step.

The first step (prompt + first block, the prompt's one call) runs eagerly: its shape depends on
the prompt length, it happens once per decode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from d2f.decoding.common import commit, predict
from d2f.decoding.config import DecodeConfig
from d2f.family import Family

RECOMPILE_LIMIT = 64
_COMPILED: dict[str, object] = {}  # compile mode -> the compiled `window_step` (one per process)


def window_buckets(num_blocks: int, block_size: int) -> list[int]:
    """Window widths (columns) a padded step may have: 1, 2, 4, ... blocks, and all of them."""
    n, out = 1, []
    while n < num_blocks:
        out.append(n * block_size)
        n *= 2
    return [*out, num_blocks * block_size]


def bucket(width: int, buckets: list[int]) -> int:
    """The smallest bucket >= width."""
    return next(b for b in buckets if b >= width)


def max_padding(buckets: list[int], block_size: int) -> int:
    """The most columns `bucket` adds to a whole-block window (the static cache's extra room)."""
    return max(bucket(w, buckets) - w for w in range(block_size, buckets[-1] + 1, block_size))


def window_step(
    model,
    cache,
    ids: Tensor,
    pos: Tensor,
    attn: Tensor,
    carry: Tensor | None,
    state_w: Tensor,
    family: Family,
    cfg: DecodeConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step over window columns that are all answer columns.

    ids, pos: (B, W) window tokens (mask id where undecoded) and positions; attn: (B, 1, W, K)
    additive mask over the cache's K columns; carry: (B, V) logits predicting the window's first
    token (shifted families) or None; state_w: (B, W // bs) `BlockState` codes (ABSENT on padding).
    Returns the raw logits (B, W, V), the window's tokens after the commit (B, W) and the
    committed positions (B, W) bool. No host sync.
    """
    logits = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True
    ).logits
    mask_id = family.mask_token_id
    x0, conf, score = predict(family.align_logits(logits, carry), cfg, mask_id)
    chosen = commit(ids, state_w, x0, conf, score, mask_id, cfg)
    return logits, torch.where(chosen, x0, ids), chosen


def step_function(mode: str):
    """`window_step` as `DecodeConfig.compile` asks: itself ("off"), dynamo only ("eager"), or
    inductor with `mode` ("default", "reduce-overhead"); always fullgraph."""
    if mode == "off":
        return window_step
    if mode not in _COMPILED:
        # NOTE: the limit counts every graph of `window_step` in the process (each model, config,
        # bucket and batch size); under fullgraph, going past it is an error, not a fallback
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(
            config.accumulated_recompile_limit, RECOMPILE_LIMIT
        )
        if mode == "eager":
            _COMPILED[mode] = torch.compile(window_step, backend="eager", fullgraph=True)
        else:
            _COMPILED[mode] = torch.compile(window_step, mode=mode, fullgraph=True)
    return _COMPILED[mode]
