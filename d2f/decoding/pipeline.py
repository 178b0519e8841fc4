"""D2F pipelined parallel decoding with dual-state blocks and an exact KV cache (paper Sec. 3.3).

Per step, for every active row (all vectorised over rows and blocks):
  1. `update_blocks`: append a semi-activated all-mask block when no end token is decoded, fewer
     than `num_blocks` exist and the last block's decoded fraction is >= tau_add (the prompt counts
     as decoded); fully activate (sticky) every block whose predecessor's fraction is >= tau_act.
  2. one forward over the window `[cache end, last existing block end)` with the block-causal mask
     and the cached prefix (`d2f.mask`); blocks that do not exist yet are invisible (block id -1).
     There is no separate prefill: the cache starts empty, so the first step's one call is the
     prompt plus the first answer block (the authors' first call); the prompt's KV is exact.
  3. `commit`: in each unfinished block, commit predictions whose probability is > tau_conf;
     a fully activated block that commits none commits its single best position (by
     `cfg.confidence`); a semi-activated block may commit none.
  4. the cache keeps exactly the leading blocks that were complete at the step's start in every
     row: their KV came from this forward with final tokens, so it is exact and never recomputed.
The cache is `DecodeConfig.kv_cache`'s (`d2f.decoding.kv`: dynamic, or a static buffer where
step 4 is a pointer move); the window's mask is a row gather of one block-causal table built once
per decode. Steps 2-3 and the next step's 1 are one function of tensors,
`d2f.decoding.step.d2f_step`, run eagerly or (`DecodeConfig.compile`) under `torch.compile` with
the window padded to a bucket; between two calls the loop reads one small tensor (which rows
finished, how far the cache may keep, where the window ends): the step's one host sync.
A row stops when an end token is decoded with nothing undecoded before it, or when all
`num_blocks` blocks exist and are complete; finished rows leave the batch (and the cache).
`cache_only` is the same loop with tau_add = 1 (one block at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2f.decoding.common import Batch, Recorder, drop_finished, seeded_generator
from d2f.decoding.config import DecodeConfig
from d2f.decoding.kv import make_cache
from d2f.decoding.step import (
    bucket,
    max_padding,
    plan,
    step_function,
    window_buckets,
)
from d2f.family import Family
from d2f.mask import block_causal_mask, block_ids


@torch.no_grad()
def d2f_decode(model, prompts: list[list[int]], cfg: DecodeConfig, family: Family, rec: Recorder):
    """Decode `prompts` (token id lists) with D2F; finished answers land in `rec.answers`."""
    device = next(model.parameters()).device
    mask_id, bs, NB, G = family.mask_token_id, cfg.block_size, cfg.num_blocks, cfg.gen_length
    end_ids = torch.tensor(family.end_token_ids, device=device)
    gen = seeded_generator(cfg, device)
    batch = Batch.create(prompts, G, mask_id, family.pad_token_id, device)
    P, B = batch.prompt_len, len(prompts)
    step_fn = step_function(cfg.compile)  # `d2f_step` itself when compile is "off"
    padded = cfg.compile != "off"  # a compiled step's window is padded to a bucket
    buckets = window_buckets(NB, bs)
    L = P + G
    Lc = L + (max_padding(buckets, bs) if padded else 0)  # cache and table columns
    # The window's mask is a row gather of one table, the block-causal mask with every block
    # existing: the blocks not added yet all follow the window, so it hides them too.
    full_ids = block_ids(batch.valid, torch.full((B,), P, device=device), bs)  # (B, L)
    table = block_causal_mask(F.pad(full_ids, (0, Lc - L), value=-1))  # (B, Lc, Lc)
    c = torch.arange(Lc, device=device)
    key_block = torch.where(c < P, -1, torch.where(c < L, (c - P) // bs, NB))  # (Lc,)
    cache = make_cache(model, cfg.kv_cache, Lc, batch=B)
    static = cfg.kv_cache == "static"  # a static cache shows all its columns as keys
    # No separate prefill: the first step's window starts at column 0, so its one call computes
    # the prompt (block 0) and the first answer block together, as the authors' loop does. The
    # prompt's KV is exact (under the block-causal mask the prompt never sees the answer) and is
    # the only part kept; for shifted families its last column predicts the first answer token.
    carry = None  # (B, V) logits of the column before the window (shifted families)
    cached = 0  # columns whose exact KV is in the cache
    state = torch.zeros(B, NB, dtype=torch.int8, device=device)
    state, sync = plan(batch.answer, state, end_ids, mask_id, cfg)

    for _ in range(G + 2):  # every step commits >= 1 token: this never runs out
        *fin, keep_blocks, n_blocks = sync.tolist()  # NOTE: the one host sync
        if any(fin):
            keep = drop_finished(rec, batch, sync[:-2] > 0, fin)
            if keep is None:
                break
            state, table = state[keep], table[keep]
            carry = None if carry is None else carry[keep]
            cache.batch_select_indices(keep)
        start, end = cached, P + n_blocks * bs
        new_cached = P + keep_blocks * bs
        a_off = max(start, P) - start  # the window's first answer column (the first step: P)
        stop = start + a_off + bucket(end - start - a_off, buckets) if padded else end
        rec.called(batch.rows)
        logits, x, chosen, next_state, sync, finite = step_fn(
            model,
            cache,
            batch.x,
            batch.pos,
            table,
            key_block,
            state,
            carry,
            torch.arange(start, stop, device=device),
            None if static else end,
            a_off,
            end_ids,
            family,
            cfg,
            None if padded else gen,  # compiled: greedy only (`DecodeConfig` checks it)
        )
        rec.count_finite(finite)
        if stop > new_cached:  # keep only the exact part: a pointer move for the static cache
            cache.crop(-(stop - new_cached))
        if family.shift_logits and new_cached > start:
            # the last newly cached column predicts the next window's first (clone: a view
            # would keep this step's whole logits tensor alive)
            carry = logits[:, new_cached - 1 - start].clone(memory_format=torch.contiguous_format)
        cached = new_cached
        batch.x = x
        committed = None  # (B, G) bool, built only for a streaming callback
        if rec.on_step is not None:
            a0 = start + a_off
            committed = torch.zeros_like(batch.answer, dtype=torch.bool)
            committed[:, a0 - P : end - P] = chosen[:, : end - a0]
        if start == 0:  # the call that processed the prompt (and the first step)
            rec.prefill_done()
        rec.emit(batch, committed, state)
        state = next_state
    else:
        raise RuntimeError("d2f_decode did not finish: a step committed no token (a bug)")
    rec.close()
