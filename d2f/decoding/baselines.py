"""Baselines in the same framework as D2F: same inputs, same output, same statistics.

* `vanilla_decode`: the base dLLMs' own sampler as LLaDA ships it: semi-autoregressive blocks, a
  fixed number of steps per block, each step one full bidirectional forward over the whole sequence
  (no cache), committing the `n` most confident masked positions of the current block
  (low-confidence remasking; `remasking="random"` picks them at random). Like the original, it
  always decodes the full length. An `exit_rule` (SchED, Prophet: `d2f.decoding.sched`) may stop
  a row after any forward: its remaining masks all take that forward's predictions.
* `ar_decode`: greedy (or sampled) next-token decoding of a causal model with a KV cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from d2f.decoding.common import (
    Batch,
    Recorder,
    drop_finished,
    forward,
    predict,
    seeded_generator,
)
from d2f.decoding.config import DecodeConfig
from d2f.decoding.kv import make_cache
from d2f.family import Family
from d2f.mask import block_ids, causal_mask, full_mask


def transfer_schedule(n_masked: Tensor, steps: int) -> Tensor:
    """LLaDA's tokens-per-step split: (B,) masked counts -> (B, steps), as even as possible,
    the remainder going to the first steps."""
    base = n_masked // steps
    rem = n_masked % steps
    return base[:, None] + (torch.arange(steps, device=n_masked.device)[None] < rem[:, None]).long()


# (aligned raw logits (B, G, V) of this forward, step t = 1..T, T) -> (B,) bool: rows that stop
ExitRule = Callable[[Tensor, int, int], Tensor]


@torch.no_grad()
def vanilla_decode(
    model,
    prompts,
    cfg: DecodeConfig,
    family: Family,
    rec: Recorder,
    exit_rule: ExitRule | None = None,
):
    device = next(model.parameters()).device
    mask_id, bs = family.mask_token_id, cfg.block_size
    steps = cfg.steps_per_block or bs
    gen = seeded_generator(cfg, device)
    batch = Batch.create(prompts, cfg.gen_length, mask_id, family.pad_token_id, device)
    P, B, L = batch.prompt_len, len(prompts), batch.x.shape[1]
    attn = full_mask(block_ids(batch.valid, torch.full((B,), P, device=device), bs))
    rec.prefill_done()  # no prefill: every step recomputes the whole sequence
    cols = torch.arange(cfg.gen_length, device=device)
    t, T = 0, cfg.num_blocks * steps  # global step and step budget (the exit rules' progress)
    for k in range(cfg.num_blocks):
        in_block = (cols >= k * bs) & (cols < (k + 1) * bs)  # (G,)
        per_step = transfer_schedule((batch.answer[:, in_block] == mask_id).sum(1), steps)
        for s in range(steps):
            t += 1
            logits = family.align_logits(forward(model, rec, batch, attn, 0, L))[:, P:]  # (B, G, V)
            x0, conf, _ = predict(logits, cfg, mask_id, gen)
            if cfg.remasking == "random":
                conf = torch.rand(conf.shape, generator=gen, device=device)
            masked = (batch.answer == mask_id) & in_block
            conf = conf.masked_fill(~masked, float("-inf"))
            order = conf.sort(dim=-1, descending=True, stable=True).indices  # (B, G)
            rank_ok = cols[None] < per_step[:, s : s + 1]  # top-n per row, n = per_step[b, s]
            chosen = torch.zeros_like(masked).scatter(1, order, rank_ok) & masked
            if exit_rule is not None:  # a stopping row fills every mask left, in any block
                stop = exit_rule(logits, t, T)  # (B,)
                chosen = torch.where(stop[:, None], batch.answer == mask_id, chosen)
            batch.answer[:] = torch.where(chosen, x0, batch.answer)
            rec.emit(batch, chosen)
            if exit_rule is not None:
                fin = stop.tolist()  # one sync per step, only with an exit rule
                if any(fin):
                    keep = drop_finished(rec, batch, stop, fin)
                    if keep is None:
                        rec.close()
                        return
                    attn, per_step = attn[keep], per_step[keep]
    rec.finish(batch, torch.ones(batch.x.shape[0], dtype=torch.bool, device=device))
    rec.close()


@torch.no_grad()
def ar_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder):
    device = next(model.parameters()).device
    end_ids = torch.tensor(family.end_token_ids, device=device)
    gen = seeded_generator(cfg, device)
    batch = Batch.create(
        prompts, cfg.gen_length, family.end_token_ids[0], family.pad_token_id, device
    )
    P = batch.prompt_len
    cache = make_cache(model, cfg.kv_cache, P + cfg.max_new_tokens)
    logits = forward(model, rec, batch, causal_mask(batch.valid[:, :P]), 0, P, cache)[:, -1:]
    rec.prefill_done()
    n_new = cfg.max_new_tokens  # one token per step: no need to fill the last block
    for t in range(n_new):
        token = predict(logits, cfg, None, gen)[0][:, 0]  # (B,)
        batch.x[:, P + t] = token
        committed = torch.zeros_like(batch.answer, dtype=torch.bool)
        committed[:, t] = True
        rec.emit(batch, committed)
        if t == n_new - 1:
            break
        done = torch.isin(token, end_ids)
        fin = done.tolist()  # one sync per step
        if any(fin):
            keep = drop_finished(rec, batch, done, fin)
            if keep is None:
                break
            cache.batch_select_indices(keep)
        q = P + t
        logits = forward(
            model, rec, batch, causal_mask(batch.valid[:, : q + 1], q, q + 1), q, q + 1, cache
        )
    if batch.x.shape[0]:
        rec.finish(batch, torch.ones(batch.x.shape[0], dtype=torch.bool, device=device))
    rec.close()
