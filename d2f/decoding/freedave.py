"""FreeDave draft-and-verify decoding (Wu & Zhang, arXiv 2510.00294): strategy `freedave`.

FreeDave makes *static* decoding -- blocks in order, one token per step, the most confident masked
position of the block -- cheaper without changing a single token. With `x_t` static's state after
step t and `f(x)` the predictions of one forward on `x`, static is `x_{t+1} = x_t + top1(f(x_t))`.
FreeDave holds the current state `x` (a static state) and the predictions `p = f(x')` of the
state one step before it (the last forward it made), and per model call:

    drafts   d_k = x + (the k most confident masked positions of p, filled from p), k < K
             K = min(draft_steps, masks left in the block)        # d_0 = x itself
    one call f(d_k) for all K drafts (the cache repeated per draft; counted as one forward)
    targets  t_k = d_k + top1(f(d_k))                             # one static step from each
    accept   best = the longest chain with d_{k+1} == t_k for every k < best
    x, p     = t_best, f(d_best)

By induction every d_k on the chain is a static state, so t_best is static's state `best + 1`
steps after x: each call advances static by >= 1 token and the tokens are static's exactly
(up to ties and batched-forward numerics). `draft_steps=1` IS static decoding: one draft, one
token per call. Caches (`options.cache`):

* `none` / `prefix` / `dual` (bidirectional LLaDA / Dream): static is `fast_dllm` with a
  threshold above 1 (one token per step) over the same cache; each block starts with
  Fast-dLLM v1's full forward (`fast_dllm.start_block`: LLaDA commits its top-1, Dream its
  first token), whose predictions are FreeDave's first `p`;
* `exact` (block-causal D2F students): static is `cache_only` with `tau_conf = 1`; as there, the
  first block starts with one forward over [prompt | block] (no separate prefill), each later
  one over [previous block | block]; both append the exact KV before the block, and drafts are
  scored over the exact cache.

Rows are block-synchronous; each row has its own K, drafts, verification and acceptance, and a row
that completes its block waits without taking part in calls, so it decodes what it decodes alone.
Where this port departs from the released code is in docs/decoding.md ("FreeDave").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor
from transformers import DynamicCache

from d2f.decoding.common import (
    Batch,
    Recorder,
    drop_finished,
    ended_rows,
    forward,
    predict,
)
from d2f.decoding.config import DecodeConfig, strategy_options
from d2f.decoding.fast_dllm import FastDLLMOptions, dual_mask, start_block, tokens_conf
from d2f.family import Family
from d2f.mask import block_causal_mask, block_ids, full_mask

CACHES = ("none", "prefix", "dual", "exact")


@strategy_options("freedave")
@dataclass(frozen=True)
class FreeDaveOptions:
    """Settings of `freedave`; defaults are the authors' LLaDA scripts' (Dream's use 8 drafts)."""

    draft_steps: int = 4  # >= 1 drafts scored per model call; 1 = static decoding
    cache: Literal["none", "prefix", "dual", "exact"] = "dual"  # exact: block-causal students
    early_exit: bool = True  # stop a row once its text up to the first end token is final

    def __post_init__(self):
        if not isinstance(self.draft_steps, int) or isinstance(self.draft_steps, bool):
            raise TypeError(f"freedave option draft_steps must be an int, got {self.draft_steps!r}")
        if self.draft_steps < 1:
            raise ValueError(f"freedave option draft_steps must be >= 1, got {self.draft_steps}")
        if self.cache not in CACHES:
            raise ValueError(f"freedave option cache must be one of {CACHES}, got {self.cache!r}")
        if not isinstance(self.early_exit, bool):
            raise TypeError(
                f"freedave option early_exit must be True or False, got {self.early_exit!r}"
            )


def static_step(window: Tensor, x0: Tensor, conf: Tensor, mask_id: int) -> Tensor:
    """One static step: (b, bs) windows with their predictions -> the windows with the first
    most confident masked position filled (a window with no mask is returned unchanged)."""
    masked = window == mask_id
    best = conf.masked_fill(~masked, float("-inf")).argmax(-1, keepdim=True)  # first maximum
    chosen = torch.zeros_like(masked).scatter(1, best, True) & masked.any(-1, keepdim=True)
    return torch.where(chosen, x0, window)


def draft_windows(window: Tensor, x0: Tensor, conf: Tensor, n: int, mask_id: int) -> Tensor:
    """(b, bs) windows and (stale) predictions -> (b, n, bs) drafts: draft k fills the k most
    confident masked positions (ties: the leftmost first) from x0; draft 0 is the window."""
    masked = window == mask_id
    order = conf.masked_fill(~masked, float("-inf")).sort(dim=-1, descending=True, stable=True)[1]
    ranks = torch.arange(window.shape[1], device=window.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # (b, bs) rank of each position
    k = torch.arange(n, device=window.device)[None, :, None]  # (1, n, 1)
    fill = masked[:, None] & (rank[:, None] < k)  # (b, n, bs)
    return torch.where(fill, x0[:, None], window[:, None])


def draft_and_verify(
    window: Tensor, x0: Tensor, conf: Tensor, K: list[int], rows: Tensor, score, mask_id: int
):
    """One FreeDave model call for b rows (module docstring).

    window (b, bs) current states; x0, conf (b, bs) predictions of the state one step before;
    K: drafts per row (>= 1 each); rows (b,) long, what `score` is told about each row;
    score(drafts (n, bs), rows[row of each draft] (n,)) -> (x0, conf) (n, bs) of every draft,
    from ONE model call. Returns the new windows, their predictions x0 and conf
    (b, bs each) and the accepted draft index per row (b,) long.
    """
    b, bs = window.shape
    dev = window.device
    drafts = draft_windows(window, x0, conf, max(K), mask_id)  # (b, D, bs)
    row = torch.tensor([i for i, k in enumerate(K) for _ in range(k)], device=dev)  # (n,)
    col = torch.tensor([j for k in K for j in range(k)], device=dev)  # (n,)
    flat = drafts[row, col]  # (n, bs)
    dx0, dconf = score(flat, rows[row])
    targets = drafts.clone()
    targets[row, col] = static_step(flat, dx0, dconf, mask_id)
    x0_all = torch.zeros_like(drafts)
    x0_all[row, col] = dx0
    conf_all = torch.zeros(drafts.shape, dtype=dconf.dtype, device=dev)
    conf_all[row, col] = dconf
    valid = torch.zeros(drafts.shape[:2], dtype=torch.bool, device=dev)  # (b, D)
    valid[row, col] = True
    agree = (drafts[:, 1:] == targets[:, :-1]).all(-1) & valid[:, 1:]  # (b, D - 1)
    best = agree.long().cumprod(1).sum(1)  # (b,) longest agreeing chain
    i = torch.arange(b, device=dev)
    return targets[i, best], x0_all[i, best], conf_all[i, best], best


def _cache_rows(cache: DynamicCache, index: Tensor, config) -> DynamicCache:
    """A copy of `cache` with batch rows `index` (repeats allowed): one row per draft."""
    data = [(layer.keys[index], layer.values[index]) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=data, config=config)


def _draft_batch(batch: Batch, rows: Tensor, s: int, drafts: Tensor) -> Batch:
    """The decoding buffer of batch rows `rows` (repeats allowed) with `drafts` in [s, s + bs).

    NOTE: `rows` repeats a row once per draft; `Recorder.called` still counts one forward for it
    (`row_forwards[rows] += 1` writes each index once).
    """
    x = batch.x[rows].clone()
    x[:, s : s + drafts.shape[1]] = drafts
    return Batch(x, batch.valid[rows], batch.pos[rows], batch.rows[rows], batch.prompt_len)


def _emit(rec: Recorder, batch: Batch, rows: Tensor, s: int, old: Tensor) -> None:
    """Record one call: positions of `rows` in [s, s + bs) that `batch.x` decoded since `old`."""
    committed = torch.zeros_like(batch.answer, dtype=torch.bool)  # (B, G)
    lo = s - batch.prompt_len
    committed[rows, lo : lo + old.shape[1]] = batch.x[rows, s : s + old.shape[1]] != old
    rec.emit(batch, committed)


def _refine_block(rec, batch, rows, s, x0, conf, opts, score, mask_id, end_ids) -> None:
    """Draft-and-verify calls until every row in `rows` (batch indices) has completed the block
    starting at column s (or, with early exit in `exact`, has ended). x0, conf (b, bs): the
    predictions behind the rows' current windows. score(drafts, local rows) does the model call."""
    bs = x0.shape[1]
    local = torch.arange(rows.numel(), device=rows.device)
    stop_on_end = opts.early_exit and opts.cache == "exact"
    while local.numel():
        window = batch.x[rows[local], s : s + bs]  # (b, bs)
        left = (window == mask_id).sum(1)
        if stop_on_end:  # cache_only's rule: a row stops once its text is final
            left = left.masked_fill(ended_rows(batch.answer[rows[local]], mask_id, end_ids), 0)
        left = left.tolist()  # NOTE: the call's one host sync
        go = [i for i, m in enumerate(left) if m > 0]
        if not go:
            return
        keep = torch.tensor(go, device=rows.device)
        local, window, x0, conf = local[keep], window[keep], x0[keep], conf[keep]
        K = [min(opts.draft_steps, left[i]) for i in go]
        window, x0, conf, _ = draft_and_verify(window, x0, conf, K, local, score, mask_id)
        old = batch.x[rows[local], s : s + bs].clone()
        batch.x[rows[local], s : s + bs] = window
        _emit(rec, batch, rows[local], s, old)


@torch.no_grad()
def freedave_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder) -> None:
    """FreeDave decoding of `prompts` (token id lists) into `rec` (see the module doc)."""
    if cfg.temperature > 0:
        raise ValueError("freedave is lossless w.r.t. greedy static decoding: use temperature 0")
    opts: FreeDaveOptions = cfg.options
    device = next(model.parameters()).device
    batch = Batch.create(prompts, cfg.gen_length, family.mask_token_id, family.pad_token_id, device)
    end_ids = torch.tensor(family.end_token_ids, device=device)
    if opts.cache == "exact":
        _decode_exact(model, batch, cfg, family, rec, end_ids)
    else:
        _decode_bidirectional(model, batch, cfg, family, rec, end_ids)
    if batch.x.shape[0]:
        rec.finish(batch, torch.ones(batch.x.shape[0], dtype=torch.bool, device=device))
    rec.close()


def _decode_bidirectional(model, batch, cfg, family, rec, end_ids) -> None:
    """Caches none / prefix / dual: Fast-dLLM v1's block start, then draft-and-verify calls."""
    opts: FreeDaveOptions = cfg.options
    mask_id, bs, P = family.mask_token_id, cfg.block_size, batch.prompt_len
    static = FastDLLMOptions(cache=opts.cache)  # the block start and conf rule of `fast_dllm`
    ids = block_ids(batch.valid, torch.full_like(batch.rows, P), bs)  # (B, L)
    rec.prefill_done()  # no prefill: every block starts with a full forward
    start_preds = {}

    def choose(preds: Tensor, blk: Tensor) -> tuple[Tensor, Tensor]:
        x0, conf = tokens_conf(preds, cfg, static, family, mask_id, None)  # (B, bs) each
        start_preds["x0"], start_preds["conf"] = x0, conf
        return x0, static_step(blk, x0, conf, mask_id) != blk

    def apply(rows: Tensor, s: int, x0: Tensor, chosen: Tensor) -> None:
        old = batch.x[rows, s : s + bs].clone()
        batch.x[rows, s : s + bs] = torch.where(chosen, x0, old)
        _emit(rec, batch, rows, s, old)

    for k in range(cfg.num_blocks):
        if opts.early_exit:  # as fast_dllm's early_stop: checked at block starts
            done = ended_rows(batch.answer, mask_id, end_ids)
            fin = done.tolist()
            if any(fin):
                keep = drop_finished(rec, batch, done, fin)
                if keep is None:
                    return
                ids = ids[keep]
        s = P + k * bs
        blk = start_block(model, rec, batch, ids, s, bs, static.cache, family, choose, apply)
        score = partial(_score_bidirectional, model, rec, batch, ids, blk, cfg, static, family)
        x0, conf = start_preds["x0"][blk.act], start_preds["conf"][blk.act]
        _refine_block(rec, batch, blk.act, s, x0, conf, opts, score, mask_id, end_ids)


def _score_bidirectional(model, rec, batch, ids, blk, cfg, static, family, drafts, local):
    """ONE model call on drafts (n, bs) of block `blk`, draft i for row `blk.act[local[i]]`,
    over its Fast-dLLM cache repeated per draft -> (x0, conf) (n, bs)."""
    s, e, L = blk.s, blk.e, batch.x.shape[1]
    rows = blk.act[local]  # (n,) batch rows, one per draft
    sub = _draft_batch(batch, rows, s, drafts)
    if blk.cache is None:
        logits = forward(model, rec, sub, full_mask(ids[rows]), 0, L)  # (n, L, V)
        preds = family.align_logits(logits)[:, s:e]
    elif static.cache == "prefix":
        cache = _cache_rows(blk.cache, local, model.config)
        logits = forward(model, rec, sub, full_mask(ids[rows], s, L), s, L, cache)  # (n, L - s, V)
        preds = family.align_logits(logits, blk.carry[local])[:, : e - s]
    else:
        cache = _cache_rows(blk.cache, local, model.config)
        logits = forward(model, rec, sub, dual_mask(ids[rows], s, e), s, e, cache)  # (n, bs, V)
        preds = family.align_logits(logits, blk.carry[local])
    return tokens_conf(preds, cfg, static, family, family.mask_token_id, None)


def _decode_exact(model, batch, cfg, family, rec, end_ids) -> None:
    """Block-causal students: per block one start forward over [prompt | block] (block 1: no
    separate prefill) or [previous block | block], appending the exact KV before the block, then
    draft-and-verify calls over the cache."""
    opts: FreeDaveOptions = cfg.options
    mask_id, bs, P = family.mask_token_id, cfg.block_size, batch.prompt_len
    ids = block_ids(batch.valid, torch.full_like(batch.rows, P), bs)  # (B, L)
    cache = DynamicCache(config=model.config)
    carry = None  # (B, V): the logits that predict column s (shifted families)

    for k in range(cfg.num_blocks):
        s = P + k * bs
        e = s + bs
        if k > 0 and opts.early_exit:
            done = ended_rows(batch.answer, mask_id, end_ids)
            fin = done.tolist()
            if any(fin):
                keep = drop_finished(rec, batch, done, fin)
                if keep is None:
                    return
                ids, carry = ids[keep], carry[keep]
                cache.batch_select_indices(keep)
        start = 0 if k == 0 else s - bs  # the prompt / the previous block, final now, gets cached
        logits = forward(
            model, rec, batch, block_causal_mask(ids[:, :e], start, e), start, e, cache
        )
        cache.crop(-bs)  # keep [0, s): exact
        x0, conf = _predictions(family.align_logits(logits, carry), cfg, family)
        x0, conf = x0[:, s - start :], conf[:, s - start :]  # (B, bs)
        carry = logits[:, s - 1 - start].clone()  # column s - 1 predicts column s
        if k == 0:
            rec.prefill_done()  # the call that processed the prompt
        rows = torch.arange(batch.x.shape[0], device=batch.x.device)
        old = batch.x[:, s:e].clone()
        batch.x[:, s:e] = static_step(old, x0, conf, mask_id)
        _emit(rec, batch, rows, s, old)

        score = partial(_score_exact, model, rec, batch, ids, cache, carry, s, cfg, family)
        _refine_block(rec, batch, rows, s, x0, conf, opts, score, mask_id, end_ids)


def _score_exact(model, rec, batch, ids, cache, carry, s, cfg, family, drafts, local):
    """ONE model call on drafts (n, bs) of the block at column s, draft i for batch row
    `local[i]`, block-causal over the exact cache repeated per draft -> (x0, conf) (n, bs)."""
    e = s + drafts.shape[1]
    sub = _draft_batch(batch, local, s, drafts)
    mask = block_causal_mask(ids[local, :e], s, e)
    logits = forward(model, rec, sub, mask, s, e, _cache_rows(cache, local, model.config))
    return _predictions(family.align_logits(logits, carry[local]), cfg, family)  # (n, bs) each


def _predictions(preds: Tensor, cfg, family) -> tuple[Tensor, Tensor]:
    """d2f's rule, as `cache_only`: fp32 probability of the arg-max, the mask id never predicted."""
    x0, conf, _ = predict(preds, cfg, family.mask_token_id)
    return x0, conf
