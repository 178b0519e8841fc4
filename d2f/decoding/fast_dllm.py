"""Fast-dLLM v1 as released (NVlabs/Fast-dLLM, arXiv 2505.22618): strategy `fast_dllm`.

Blocks are decoded one after another (semi-autoregressive). Each block starts with one full
bidirectional forward over the whole sequence; then the block is refined, one forward per step,
until it has no mask left. Per step the parallel rule picks what to commit:

* threshold: every masked position of the block whose probability is >= threshold, plus the most
  confident one (at least one token per step);
* factor: with the block's masked confidences sorted c[0] >= c[1] >= ..., commit the top k, where
  k is the first rank m >= 1 with c[m] < 1 - factor / (m + 2) (if none fails, every mask; a
  failure at the last rank also commits every mask: the released code's off-by-one).

Caches: `none` recomputes the whole sequence every step; `prefix` keeps the KV of the columns
before the block from the block-start forward and forwards `[block | later masks]`; `dual` also
keeps the later columns' KV and forwards the block alone. Both caches are approximate (their KV
was computed while the block was still masked), as in the released code; the cache is rebuilt at
every block start. LLaDA commits from the block-start forward with the parallel rule; Dream (as
released) commits only the block's first token there, unconditionally, and its confidences are in
the model's dtype (LLaDA's in float64). `DecodeConfig.remasking="random"` (upstream LLaDA's
`remasking='random'`) replaces each confidence by a uniform draw from the seeded generator before
the rule. Every block is decoded unless `early_stop` is set.
Where this port departs from the released code, and why, is in docs/decoding.md ("Fast-dLLM v1").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    seeded_generator,
)
from d2f.decoding.config import DecodeConfig, strategy_options
from d2f.decoding.kv import StaticKV, keep_columns, make_cache
from d2f.family import Family
from d2f.mask import block_ids, full_mask

RULES = ("threshold", "factor")
CACHES = ("none", "prefix", "dual")
PRECISIONS = ("auto", "float64", "float32", "model")


@strategy_options("fast_dllm")
@dataclass(frozen=True)
class FastDLLMOptions:
    """Settings of `fast_dllm`; defaults are the authors' scripts' (threshold 0.9, factor 1.0)."""

    rule: Literal["threshold", "factor"] = "threshold"  # the parallel commit rule
    threshold: float | None = None  # threshold rule: commit prob >= this; None = cfg.tau_conf
    factor: float = 1.0  # factor rule: rank m (0-based) needs prob >= 1 - factor / (m + 2)
    cache: Literal["none", "prefix", "dual"] = "dual"  # KV reuse inside a block
    early_stop: bool = False  # drop a row at a block start once it has an end token
    precision: Literal["auto", "float64", "float32", "model"] = (
        "auto"  # auto: LLaDA fp64, Dream model
    )

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"fast_dllm option rule must be one of {RULES}, got {self.rule!r}")
        if self.cache not in CACHES:
            raise ValueError(f"fast_dllm option cache must be one of {CACHES}, got {self.cache!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"fast_dllm option precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        if not isinstance(self.early_stop, bool):
            raise TypeError(
                f"fast_dllm option early_stop must be True or False, got {self.early_stop!r}"
            )
        for name in ("threshold", "factor"):
            value = getattr(self, name)
            if value is None and name == "threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"fast_dllm option {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"fast_dllm option {name} must be finite and >= 0, got {value}")
        if self.factor == 0:
            raise ValueError("fast_dllm option factor must be > 0 (0 would commit every mask)")


def threshold_commit(conf: Tensor, masked: Tensor, threshold: float) -> Tensor:
    """The threshold rule: (b, W) confidences (-inf off the masks) -> (b, W) bool to commit.

    Every mask with conf >= threshold, plus the first most confident mask of each row that has one.
    """
    best = conf.argmax(-1, keepdim=True)  # (b, 1) first maximum, as torch.argmax upstream
    forced = torch.zeros_like(masked).scatter(1, best, True) & masked.any(-1, keepdim=True)
    return (masked & (conf >= threshold)) | forced


def factor_count(sorted_conf: Tensor, n: Tensor, factor: float) -> Tensor:
    """How many tokens the factor rule commits: (b, W) confidences sorted descending (the row's
    n masked ones first), (b,) mask counts -> (b,) long.

    Rank m (0-based) passes when c[m] >= 1 - factor / (m + 2); rank 0 always passes. With m* the
    first failing rank (n - 1 if none fails), k = m*, plus one when m* is 0 or n - 1: a failure at
    the last rank still commits all n (the released code's quirk, kept).
    """
    W = sorted_conf.shape[-1]
    ranks = torch.arange(W, device=sorted_conf.device)  # (W,)
    need = 1 - factor / (ranks.to(sorted_conf.dtype) + 2)
    need[0] = -1.0
    fail = (sorted_conf < need) & (ranks[None] < n[:, None])  # (b, W)
    first = torch.where(fail, ranks, W).min(-1).values  # (b,)
    k = torch.where(first < W, first, n - 1)
    return k + ((k == 0) | (k == n - 1)).long()


def factor_commit(conf: Tensor, masked: Tensor, factor: float) -> Tensor:
    """The factor rule: (b, W) confidences (-inf off the masks) -> (b, W) bool, the top k."""
    values, order = conf.sort(dim=-1, descending=True, stable=True)  # (b, W)
    k = factor_count(values, masked.sum(-1), factor)  # (b,)
    top = torch.arange(conf.shape[-1], device=conf.device)[None] < k[:, None]
    return torch.zeros_like(masked).scatter(1, order, top) & masked


def confidence_dtype(precision: str, family: Family, logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax behind `conf`: `auto` is upstream's, LLaDA float64 and Dream
    (a shifted family) the model's own dtype."""
    if precision == "float64" or (precision == "auto" and not family.shift_logits):
        return torch.float64  # LLaDA upstream: softmax in float64
    if precision == "float32":
        return torch.float32
    return logits_dtype  # Dream upstream: the model's dtype


def tokens_conf(logits: Tensor, cfg, opts, family, mask_id: int, gen) -> tuple[Tensor, Tensor]:
    """(b, W, V) logits -> x0 (b, W) long, conf (b, W): the raw-logit probability of x0.

    The mask id is never predicted (x0 is the arg-max over the other ids), but conf is its
    probability under the full softmax, as upstream computes it.
    """
    probs = logits.to(confidence_dtype(opts.precision, family, logits.dtype)).softmax(-1)
    if cfg.temperature > 0:
        x0 = predict(logits, cfg, mask_id, gen)[0]
    else:
        x0 = probs.index_fill(-1, torch.tensor([mask_id], device=probs.device), -1.0).argmax(-1)
    return x0, probs.gather(-1, x0[..., None])[..., 0]


def dual_cache(cache: DynamicCache, s: int, e: int, config) -> DynamicCache:
    """The block-start cache of all L columns -> [0, s) and [e, L): columns [s, e) (the block, or
    dInfer's vicinity window) are forwarded after them."""
    data = [
        (
            torch.cat([layer.keys[:, :, :s], layer.keys[:, :, e:]], 2),
            torch.cat([layer.values[:, :, :s], layer.values[:, :, e:]], 2),
        )
        for layer in cache.layers
    ]
    return DynamicCache(ddp_cache_data=data, config=config)


def dual_mask(ids: Tensor, s: int, e: int) -> Tensor:
    """(B, e - s, L) bool: the queries of columns [s, e) over keys ordered [prefix | suffix |
    [s, e)], the order of `dual_cache` plus the forwarded columns."""
    m = full_mask(ids, s, e)  # (B, e - s, L), keys in column order
    return torch.cat([m[..., :s], m[..., e:], m[..., s:e]], -1)


@dataclass
class Block:
    """One block's decoding context: the rows still masked in it and their cache."""

    s: int
    e: int
    cache: DynamicCache | None
    carry: Tensor | None  # (b, V) logits just before the block (Dream's shift), from the start
    act: Tensor  # (b,) long, batch rows whose block still has a mask
    window: tuple[int, int] | None = None  # dual: the columns a step forwards (None = [s, e))


@torch.no_grad()
def fast_dllm_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder) -> None:
    """Fast-dLLM v1 decoding of `prompts` (token id lists) into `rec` (see the module doc)."""
    opts: FastDLLMOptions = cfg.options
    device = next(model.parameters()).device
    mask_id, bs = family.mask_token_id, cfg.block_size
    end_ids = torch.tensor(family.end_token_ids, device=device)
    thr = cfg.tau_conf if opts.threshold is None else opts.threshold
    gen = seeded_generator(cfg, device)
    batch = Batch.create(prompts, cfg.gen_length, mask_id, family.pad_token_id, device)
    P, B = batch.prompt_len, len(prompts)
    ids = block_ids(batch.valid, torch.full((B,), P, device=device), bs)  # (B, L)
    rec.prefill_done()  # no prefill: every block starts with a full forward
    # a static cache is allocated once and rewritten at every block start
    static = None
    if cfg.kv_cache == "static" and opts.cache != "none":
        static = make_cache(model, "static", batch.x.shape[1])

    def choose(preds: Tensor, blk: Tensor) -> tuple[Tensor, Tensor]:
        x0, conf = tokens_conf(preds, cfg, opts, family, mask_id, gen)  # (b, bs) each
        if cfg.remasking == "random":  # upstream LLaDA's remasking="random": conf ~ U[0, 1)
            conf = torch.rand(conf.shape, generator=gen, device=device, dtype=torch.float64)
        masked = blk == mask_id
        conf = conf.masked_fill(~masked, float("-inf"))
        if opts.rule == "threshold":
            return x0, threshold_commit(conf, masked, thr)
        return x0, factor_commit(conf, masked, opts.factor)

    def apply(rows: Tensor, s: int, x0: Tensor, chosen: Tensor) -> None:
        blk = batch.x[rows, s : s + bs]  # (b, bs)
        batch.x[rows, s : s + bs] = torch.where(chosen, x0, blk)
        committed = torch.zeros_like(batch.answer, dtype=torch.bool)  # (B, G)
        committed[rows, s - P : s - P + bs] = chosen
        rec.emit(batch, committed)

    for k in range(cfg.num_blocks):
        if opts.early_stop:
            done = ended_rows(batch.answer, mask_id, end_ids)
            fin = done.tolist()
            if any(fin):
                keep = drop_finished(rec, batch, done, fin)
                if keep is None:
                    break
                ids = ids[keep]
        s = P + k * bs
        blk = start_block(
            model, rec, batch, ids, s, bs, opts.cache, family, choose, apply, static=static
        )
        while blk.act.numel():
            refine(model, rec, batch, ids, blk, opts.cache, family, choose, apply, mask_id)
    if batch.x.shape[0]:
        rec.finish(batch, torch.ones(batch.x.shape[0], dtype=torch.bool, device=device))
    rec.close()


def start_block(
    model,
    rec,
    batch,
    ids,
    s,
    bs,
    cache,
    family,
    choose,
    apply,
    rows=None,
    window=None,
    after=None,
    static: StaticKV | None = None,
    idle: bool = False,
) -> Block:
    """The block-start full forward, its commit, and the cache the refinement steps reuse.

    cache: "none" / "prefix" / "dual". rows: (b,) long batch rows to start (None = all).
    window: dual only, the columns (lo, hi) around [s, e) that each refinement step forwards
    (dInfer's vicinity window; None = the block). after(rows, start, logits): called after the
    commit with the call's raw (b, n, V) logits over columns [start, start + n). static: a
    preallocated cache to rewrite instead of a new `DynamicCache`; its columns stay in place, so
    the dual cache is the block-start buffer itself, each step rewriting its window's columns.
    idle: keep every row for at least one refinement step, also a row whose block this forward
    completed (dInfer's idle forward, under smoothing; `choose` commits nothing on a block
    without masks); needs a cache.
    """
    if idle and cache == "none":
        raise ValueError("start_block: an idle forward is a cached forward; cache is 'none'")
    e, L = s + bs, batch.x.shape[1]
    if rows is None:
        rows = torch.arange(batch.x.shape[0], device=batch.x.device)
        sub = batch
    else:
        sub = batch.subset(rows)
    if cache == "none":
        kv = None
    elif static is not None:
        kv = static
        kv.seek(0)
    else:
        kv = DynamicCache(config=model.config)
    logits = forward(model, rec, sub, full_mask(ids[rows]), 0, L, kv)  # (b, L, V)
    preds = family.align_logits(logits)[:, s:e]  # (b, bs, V)
    x0, chosen = choose(preds, sub.x[:, s:e])
    if family.shift_logits:  # Dream as released: only the block's first token, unconditionally
        chosen = torch.zeros_like(chosen)
        chosen[:, 0] = True
    apply(rows, s, x0, chosen)
    if after is not None:
        after(rows, 0, logits)
    lo, hi = (s, e) if window is None else window
    if cache == "prefix":
        keep_columns(kv, s)
    elif cache == "dual" and (lo, hi) == (0, L):
        kv = None  # NOTE: a window over every column caches none (and transformers leaves an
        # empty cache's batch unselected, so no empty cache is kept)
    elif cache == "dual" and static is None:
        kv = dual_cache(kv, lo, hi, model.config)
    left = (batch.x[rows, s:e] == family.mask_token_id).any(-1)  # (b,)
    if idle:
        left = torch.ones_like(left)
    act = rows[left]
    if act.numel() < rows.numel() and kv is not None:
        kv.batch_select_indices(left.nonzero()[:, 0])
    return Block(s, e, kv, logits[left, s - 1], act, None if window is None else (lo, hi))


def refine(
    model, rec, batch, ids, blk: Block, cache, family, choose, apply, mask_id, after=None
) -> None:
    """One refinement step over the rows still masked in the block; rows that complete it leave
    the step's sub-batch (and the cache), so they cost no more forwards in this block.
    cache and after as in `start_block`."""
    s, e, L, act = blk.s, blk.e, batch.x.shape[1], blk.act
    sub = batch.subset(act)
    if cache == "none":
        start, logits = 0, forward(model, rec, sub, full_mask(ids[act]), 0, L)  # (b, L, V)
        preds = family.align_logits(logits)[:, s:e]
    elif cache == "prefix":
        start = s
        logits = forward(model, rec, sub, full_mask(ids[act], s, L), s, L, blk.cache)  # (b, L-s, V)
        keep_columns(blk.cache, s)
        preds = family.align_logits(logits, blk.carry)[:, : e - s]
    else:
        start, hi = (s, e) if blk.window is None else blk.window
        if isinstance(blk.cache, StaticKV):  # keys in column order: rewrite [start, hi) in place
            blk.cache.seek(start)
            mask = full_mask(ids[act], start, hi)
        else:
            mask = dual_mask(ids[act], start, hi)
        logits = forward(model, rec, sub, mask, start, hi, blk.cache)  # (b, hi - start, V)
        if blk.cache is not None and not isinstance(blk.cache, StaticKV):
            keep_columns(blk.cache, L - (hi - start))
        # a window opening before the block holds the logits that predict column s itself
        carry = blk.carry if start == s else None
        preds = family.align_logits(logits, carry)[:, s - start : e - start]
    x0, chosen = choose(preds, sub.x[:, s:e])
    apply(act, s, x0, chosen)
    if after is not None:
        after(act, start, logits)
    left = (batch.x[act, s:e] == mask_id).any(-1)  # (b,)
    if not bool(left.all()):  # one sync per step
        keep = left.nonzero()[:, 0]
        if blk.cache is not None:
            blk.cache.batch_select_indices(keep)
        blk.act = act[keep]
        if blk.carry is not None:
            blk.carry = blk.carry[keep]
