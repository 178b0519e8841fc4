"""Fast-dLLM v2 hierarchical decoding (Wu et al., arXiv 2509.26328) on block-causal students.

The authors' `v2/generation_functions.py::batch_sample` (NVlabs/Fast-dLLM) decodes a block-causal
model block by block over an exact KV cache, and each block sub-block by sub-block:

  prefill: the prompt, block-causal, cached exactly.
  per answer block k (block-level autoregression):
      shifted family (Dream): the block's first token is the argmax of the logits just before it
          (the last prompt column, or the last column of block k - 1): one token with no forward;
      per sub-block j of `sub_block_size` tokens, in order, while it has masks:
          one forward of the whole block over the exact cache (nothing cached for the block);
          in sub-block j, commit every masked position whose probability is > threshold, and at
          least the best one (the shared `commit` rule with one fully activated sub-block);
      block complete: one more forward of the block appends its exact KV to the cache (its last
          column's logits predict the next block's first token).

`use_block_cache=True` adds the authors' stale block cache: the block's KV from its last
full-block forward is kept; while a sub-block's first token is decoded, only the sub-block is fed,
over [prefix | that KV, its own slot replaced by fresh KV]; each row refreshes on its own.

Rows are block-synchronous: a row whose sub-block is complete waits (its tokens do not change)
while the others finish theirs. A row stops when an end token is decoded with nothing undecoded
before it and leaves the batch and the cache. The block layout is d2f's (blocks start at each
prompt's end, as the D2F student is trained), so every row decodes what it decodes alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from d2f.decoding.common import (
    Batch,
    Recorder,
    commit,
    drop_finished,
    ended_rows,
    forward,
    predict,
    seeded_generator,
)
from d2f.decoding.config import BlockState, DecodeConfig, strategy_options
from d2f.family import Family
from d2f.mask import block_causal_mask, block_ids


@strategy_options("fast_dllm_v2")
@dataclass(frozen=True)
class FastDLLMv2Options:
    """Settings of `fast_dllm_v2`; defaults are the authors' (`v2/eval.py`)."""

    sub_block_size: int = 8  # tokens per sub-block; must divide block_size (authors: 8 of 32)
    threshold: float = 0.9  # [0, 1] commit a prediction whose probability is > this (strict)
    use_block_cache: bool = False  # the released stale block cache (authors: off)

    def __post_init__(self):
        if not isinstance(self.sub_block_size, int) or isinstance(self.sub_block_size, bool):
            raise TypeError(
                f"fast_dllm_v2 option sub_block_size must be an int, got {self.sub_block_size!r}"
            )
        if self.sub_block_size <= 0:
            raise ValueError(
                f"fast_dllm_v2 option sub_block_size must be > 0, got {self.sub_block_size}"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise TypeError(
                f"fast_dllm_v2 option threshold must be a number, got {self.threshold!r}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"fast_dllm_v2 option threshold must be in [0, 1], got {self.threshold}"
            )
        if not isinstance(self.use_block_cache, bool):
            raise TypeError(
                "fast_dllm_v2 option use_block_cache must be True or False, got "
                f"{self.use_block_cache!r}"
            )


def check_options(opts: FastDLLMv2Options, cfg: DecodeConfig) -> None:
    """The checks that need `cfg` as well (before any forward)."""
    if cfg.block_size % opts.sub_block_size:
        raise ValueError(
            f"fast_dllm_v2 option sub_block_size={opts.sub_block_size} must divide "
            f"block_size={cfg.block_size}"
        )


def _block_forward(model, rec, batch, ids, start, end, cache) -> tuple[Tensor, list]:
    """Logits (B, end - start, V) of block `[start, end)` over the exact cache of `[0, start)`,
    and the block's KV (per layer (keys, values), (B, H, end - start, D)), dropped from the
    cache again: nothing of an incomplete block stays in the exact cache."""
    mask_bool = block_causal_mask(ids[:, :end], start, end)
    logits = forward(model, rec, batch, mask_bool, start, end, cache)
    kv = [(layer.keys[..., start:, :], layer.values[..., start:, :]) for layer in cache.layers]
    cache.crop(-(end - start))  # NOTE: transformers 5 crops by a negative count
    return logits, kv


def _stale_forward(model, rec, batch, ids, start, s0, s1, refresh, cache, block_kv):
    """The released block cache's step: queries over `[prefix | block KV | new columns]`.

    Rows not in `refresh` (B,) feed sub-block `[s0, s1)` over the block KV of an earlier forward
    (stale outside the sub-block, whose own slot is left out for its fresh KV); when a row must
    refresh, every row feeds the whole block and refreshing rows see only the fresh block.
    Returns the logits (B, n, V) of the columns fed, the first of them, and the block KV with
    the fresh columns in.
    """
    bs = block_kv[0][0].shape[-2]
    B, device = batch.x.shape[0], batch.x.device
    refresh_any = bool(refresh.any())
    lo, hi = (start, start + bs) if refresh_any else (s0, s1)  # columns fed
    n = hi - lo
    for i, (k, v) in enumerate(block_kv):
        cache.update(k, v, i)  # the cache is now [prefix | block KV]
    slot = torch.zeros(bs, dtype=torch.bool, device=device)
    slot[s0 - start : s1 - start] = True  # (bs,) the sub-block inside the block
    fed = torch.zeros(bs, dtype=torch.bool, device=device)
    fed[lo - start : hi - start] = True
    r = refresh[:, None, None]  # (B, 1, 1)
    pre = (ids[:, :start] >= 0)[:, None, :].expand(B, n, start)  # (B, n, start) the prefix
    old = ~r & ~slot[None, None, :]  # (B, 1, bs) stale KV outside the sub-block
    new = r | slot[fed][None, None, :]  # (B, 1, n) fresh KV: all (refresh) or the sub-block
    mask_bool = torch.cat([pre, old.expand(B, n, bs), new.expand(B, n, n)], -1)
    logits = forward(model, rec, batch, mask_bool, lo, hi, cache)
    fresh = [
        (layer.keys[..., start + bs :, :], layer.values[..., start + bs :, :])
        for layer in cache.layers
    ]
    cache.crop(-(bs + n))
    take = r[..., None] | slot[None, None, :, None]  # (B, 1, bs, 1) columns to replace
    new_kv = []
    for (k, v), (fk, fv) in zip(block_kv, fresh, strict=True):
        fk_full, fv_full = k.clone(), v.clone()
        fk_full[..., lo - start : hi - start, :] = fk
        fv_full[..., lo - start : hi - start, :] = fv
        new_kv.append((torch.where(take, fk_full, k), torch.where(take, fv_full, v)))
    return logits, lo, new_kv


def _drop_ended(rec, batch, cache, mask_id, end_ids) -> tuple[bool, Tensor | None]:
    """Drop rows whose answer is final (an end token with nothing undecoded before it).
    Returns (any row left, the kept row indices or None when no row was dropped)."""
    done = ended_rows(batch.answer, mask_id, end_ids)
    fin = done.tolist()
    if not any(fin):
        return True, None
    keep = drop_finished(rec, batch, done, fin)
    if keep is None:
        return False, None
    cache.batch_select_indices(keep)
    return True, keep


@torch.no_grad()
def fast_dllm_v2_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder):
    """Decode `prompts` (token id lists) with Fast-dLLM v2; answers land in `rec.answers`."""
    opts: FastDLLMv2Options = cfg.options
    check_options(opts, cfg)
    device = next(model.parameters()).device
    mask_id, bs, sbs = family.mask_token_id, cfg.block_size, opts.sub_block_size
    end_ids = torch.tensor(family.end_token_ids, device=device)
    gen = seeded_generator(cfg, device)
    sub_cfg = dataclasses.replace(cfg, block_size=sbs, tau_conf=opts.threshold)  # for `commit`
    batch = Batch.create(prompts, cfg.gen_length, mask_id, family.pad_token_id, device)
    P, B = batch.prompt_len, len(prompts)
    ids = block_ids(batch.valid, torch.full((B,), P, device=device), bs)  # (B, P + G)

    cache = DynamicCache(config=model.config)
    logits = forward(model, rec, batch, block_causal_mask(ids[:, :P]), 0, P, cache)
    carry = logits[:, -1].clone()  # (B, V): predicts the first answer token (shifted families)
    del logits
    rec.prefill_done()
    full = torch.full((B, 1), BlockState.FULL, device=device)
    alive = True
    for k in range(cfg.num_blocks):
        start, end = P + k * bs, P + (k + 1) * bs
        if k > 0:  # block k - 1 is complete: append its exact KV (the authors' caching forward)
            alive, keep = _drop_ended(rec, batch, cache, mask_id, end_ids)
            if not alive:
                break
            if keep is not None:
                ids, carry = ids[keep], carry[keep]
            mask_bool = block_causal_mask(ids[:, :start], start - bs, start)
            carry = forward(model, rec, batch, mask_bool, start - bs, start, cache)[:, -1].clone()
        if family.shift_logits:  # the AR step: the block's first token, with no forward
            first = predict(carry[:, None], cfg, mask_id, gen)[0][:, 0]  # (B,)
            batch.x[:, start] = first
            committed = torch.zeros_like(batch.answer, dtype=torch.bool)
            committed[:, start - P] = True
            rec.emit(batch, committed)
        block_kv = None  # use_block_cache: the block's KV from its last full-block forward
        for j in range(bs // sbs):
            s0, s1 = start + j * sbs, start + (j + 1) * sbs
            while True:
                alive, keep = _drop_ended(rec, batch, cache, mask_id, end_ids)
                if not alive:
                    break
                if keep is not None:
                    ids, carry = ids[keep], carry[keep]
                    if block_kv is not None:
                        block_kv = [(kk[keep], vv[keep]) for kk, vv in block_kv]
                if not bool((batch.x[:, s0:s1] == mask_id).any()):  # every row's sub-block done
                    break
                if block_kv is None or not opts.use_block_cache:
                    logits, kv = _block_forward(model, rec, batch, ids, start, end, cache)
                    block_kv = kv if opts.use_block_cache else None
                    # (B, sbs, V): column i predicts token i
                    preds = family.align_logits(logits, carry)[:, s0 - start : s1 - start]
                else:
                    # a row refreshes when its sub-block's first token is undecoded: only then is
                    # that token's prediction (the column before it, shifted families) needed
                    refresh = batch.x[:, s0] == mask_id  # (B,)
                    logits, lo, block_kv = _stale_forward(
                        model, rec, batch, ids, start, s0, s1, refresh, cache, block_kv
                    )
                    # a stale-only call starts at s0, whose token is decoded in every row: the
                    # placeholder prediction of its column 0 is never used
                    aligned = family.align_logits(logits, carry if lo == start else None)
                    preds = aligned[:, s0 - lo : s1 - lo]  # (B, sbs, V)
                x0, conf, score = predict(preds, cfg, mask_id, gen)
                sub = batch.x[:, s0:s1]  # (B, sbs)
                chosen = commit(sub, full[: sub.shape[0]], x0, conf, score, mask_id, sub_cfg)
                batch.x[:, s0:s1] = torch.where(chosen, x0, sub)
                committed = torch.zeros_like(batch.answer, dtype=torch.bool)
                committed[:, s0 - P : s1 - P] = chosen
                rec.emit(batch, committed)
            if not alive:
                break
        if not alive:
            break
    else:
        rec.finish(batch, torch.ones(batch.x.shape[0], dtype=torch.bool, device=device))
    rec.close()
