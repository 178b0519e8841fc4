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
step 4 is a pointer move); the window's mask is a slice of one block-causal table built once per
decode; with `DecodeConfig.compile` step 2-3 run as `d2f.decoding.step.window_step` under
`torch.compile`, the window padded to a bucket.
A row stops when an end token is decoded with nothing undecoded before it, or when all
`num_blocks` blocks exist and are complete; finished rows leave the batch (and the cache).
`cache_only` is the same loop with tau_add = 1 (one block at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from d2f.decoding.common import (
    Batch,
    Recorder,
    commit,
    drop_finished,
    end_mask,
    ended_rows,
    forward,
    predict,
    seeded_generator,
)
from d2f.decoding.config import BlockState, DecodeConfig
from d2f.decoding.kv import make_cache
from d2f.decoding.step import bucket, max_padding, step_function, window_buckets
from d2f.family import Family
from d2f.mask import block_causal_mask, block_ids, to_additive


def decoded_fraction(answer: Tensor, mask_id: int, bs: int) -> Tensor:
    """(B, G) answer -> (B, NB) fraction of decoded tokens per block."""
    B, G = answer.shape
    return (answer != mask_id).view(B, G // bs, bs).float().mean(-1)


def update_blocks(state: Tensor, frac: Tensor, ended: Tensor, cfg: DecodeConfig) -> Tensor:
    """Steps 1 of the module docstring. state (B, NB) int8, frac (B, NB), ended (B,) bool."""
    B, NB = state.shape
    # NOTE: plain ints, not the IntEnum members: an op on a tensor and an IntEnum costs about
    # twice the op with an int (eager CPU; a few dozen small ops per step)
    absent, semi, full = BlockState.ABSENT.value, BlockState.SEMI.value, BlockState.FULL.value
    n_exist = (state != absent).sum(1)  # (B,)
    last = (n_exist - 1).clamp(min=0)[:, None]
    last_frac = torch.where(n_exist > 0, frac.gather(1, last)[:, 0], 1.0)  # prompt = decoded
    add = ~ended & (n_exist < NB) & (last_frac >= cfg.tau_add)  # (B,)
    # the first absent block (none when all exist); a comparison, not one_hot (its range checks)
    slot = (torch.arange(NB, device=state.device) == n_exist[:, None]) & add[:, None]  # (B, NB)
    state = torch.where(slot, semi, state)
    pred_frac = F.pad(frac[:, :-1], (1, 0), value=1.0)  # (B, NB): block 1 follows the prompt
    activate = (state == semi) & (pred_frac >= cfg.tau_act)
    return torch.where(activate, full, state).to(torch.int8)


@torch.no_grad()
def d2f_decode(model, prompts: list[list[int]], cfg: DecodeConfig, family: Family, rec: Recorder):
    """Decode `prompts` (token id lists) with D2F; finished answers land in `rec.answers`."""
    device = next(model.parameters()).device
    mask_id, bs, NB = family.mask_token_id, cfg.block_size, cfg.num_blocks
    end_ids = torch.tensor(family.end_token_ids, device=device)
    gen = seeded_generator(cfg, device)
    batch = Batch.create(prompts, cfg.gen_length, mask_id, family.pad_token_id, device)
    P, B = batch.prompt_len, len(prompts)
    state = torch.zeros(B, NB, dtype=torch.int8, device=device)
    step_fn = None if cfg.compile == "off" else step_function(cfg.compile)
    buckets = window_buckets(NB, bs)
    L = P + cfg.gen_length
    Lc = L + (max_padding(buckets, bs) if step_fn is not None else 0)  # cache and table columns
    # The window's mask is a slice of one table, the block-causal mask with every block existing,
    # and-ed with which columns exist: `block_causal_mask` of the ids with absent blocks at -1.
    full_ids = block_ids(batch.valid, torch.full((B,), P, device=device), bs)  # (B, L)
    table = block_causal_mask(F.pad(full_ids, (0, Lc - L), value=-1))  # (B, Lc, Lc)
    eye = torch.eye(Lc, dtype=torch.bool, device=device)
    cache = make_cache(model, cfg.kv_cache, Lc)
    K_static = Lc if cfg.kv_cache == "static" else None  # a static cache shows all its columns
    dtype = next(model.parameters()).dtype
    # No separate prefill: the first step's window starts at column 0, so its one call computes
    # the prompt (block 0) and the first answer block together, as the authors' loop does. The
    # prompt's KV is exact (under the block-causal mask the prompt never sees the answer) and is
    # the only part kept; for shifted families its last column predicts the first answer token.
    carry = None  # (B, V) logits of the column before the window (shifted families)
    cached = 0  # columns whose exact KV is in the cache

    for _ in range(cfg.gen_length + 2):  # every step commits >= 1 token: this never runs out
        frac = decoded_fraction(batch.answer, mask_id, bs)  # (B, NB)
        ended = end_mask(batch.answer, end_ids).any(1)  # (B,) an end token is decoded
        state = update_blocks(state, frac, ended, cfg)
        exists = state != BlockState.ABSENT.value
        complete = exists & (frac == 1.0)
        finished = ended_rows(batch.answer, mask_id, end_ids) | complete.all(1)
        done_prefix = complete.int().cumprod(1).sum(1)  # leading complete blocks per row
        big = torch.full_like(done_prefix, NB)
        scalars = torch.stack(
            [
                torch.where(finished, big, done_prefix).min(),
                torch.where(finished, 0, exists.sum(1)).max(),
            ]
        )
        *fin, keep_blocks, n_blocks = torch.cat(
            [finished.long(), scalars]
        ).tolist()  # NOTE: the one host sync
        if any(fin):
            keep = drop_finished(rec, batch, finished, fin)
            if keep is None:
                break
            state, table, exists = state[keep], table[keep], exists[keep]
            carry = None if carry is None else carry[keep]
            cache.batch_select_indices(keep)
        start, end = cached, P + n_blocks * bs
        new_cached = P + keep_blocks * bs
        # the compiled step pads the window to a bucket; the first step (the prompt) is eager
        compiled = step_fn is not None and start > 0
        stop = start + bucket(end - start, buckets) if compiled else end
        K = end if K_static is None else K_static  # key columns the model sees
        col_exists = F.pad(
            torch.cat([torch.ones_like(batch.valid[:, :P]), exists.repeat_interleave(bs, 1)], 1),
            (0, Lc - L),
        )  # (B, Lc) bool
        mask = (
            table[:, start:stop, :K] & col_exists[:, None, :K] & col_exists[:, start:stop, None]
        ) | eye[start:stop, :K]  # (B, stop - start, K)
        a0 = max(start, P)  # the window's first answer column (the first step starts at 0)
        first_block = (a0 - P) // bs
        state_w = state[:, first_block : first_block + (end - a0) // bs]
        answer_w = batch.x[:, a0:end]
        if compiled:  # a0 == start: the window is answer columns only
            rec.called(batch.rows)
            pad = stop - end
            logits, new_w, chosen = step_fn(
                model,
                cache,
                # contiguous inputs: a slice's strides would be one more guard to recompile on
                F.pad(answer_w, (0, pad), value=mask_id).contiguous(),
                F.pad(batch.pos[:, start:end], (0, pad)).contiguous(),
                to_additive(mask, dtype),
                carry,
                F.pad(state_w, (0, pad // bs), value=BlockState.ABSENT.value).contiguous(),
                family,
                cfg,
            )
            logits, new_w, chosen = (
                logits[:, : end - start],
                new_w[:, : end - a0],
                chosen[:, : end - a0],
            )
            rec.check_logits(logits)
        else:
            logits = forward(model, rec, batch, mask, start, end, cache)
            # (B, W, V) over the window's answer columns: column i predicts token i
            preds = family.align_logits(logits, carry)[:, a0 - start :]
            x0, conf, score = predict(preds, cfg, mask_id, gen)
            chosen = commit(answer_w, state_w, x0, conf, score, mask_id, cfg)
            new_w = torch.where(chosen, x0, answer_w)
        if stop > new_cached:  # keep only the exact part: a pointer move for the static cache
            cache.crop(-(stop - new_cached))
        if family.shift_logits and new_cached > start:
            # the last newly cached column predicts the next window's first (clone: a view
            # would keep this step's whole logits tensor alive)
            carry = logits[:, new_cached - 1 - start].clone(memory_format=torch.contiguous_format)
        cached = new_cached
        batch.x[:, a0:end] = new_w
        committed = None  # (B, G) bool, built only for a streaming callback
        if rec.on_step is not None:
            committed = torch.zeros_like(batch.answer, dtype=torch.bool)
            committed[:, a0 - P : end - P] = chosen
        if start == 0:  # the call that processed the prompt (and the first step)
            rec.prefill_done()
        rec.emit(batch, committed, state)
    else:
        raise RuntimeError("d2f_decode did not finish: a step committed no token (a bug)")
    rec.close()
