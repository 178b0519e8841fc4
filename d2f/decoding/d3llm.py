"""d3LLM multi-block decoding (arXiv 2601.07568), the released rule, batched (docs/decoding.md).

D2F's block-state machine run on a bidirectional, full-length forward. Per step, for every
active row (vectorised over rows and blocks):
  1. early stop (`early_stop`): once an end token is decoded anywhere in the answer, every column
     after the first one is overwritten with that end token (decoded tokens included), and no
     block is added any more; masks before it are still decoded.
  2. `update_blocks` (shared with D2F): add a block when the last one's decoded fraction is
     >= tau_add (d3LLM's `block_add_threshold`); fully activate a block whose predecessor's
     fraction is >= tau_act (`decoded_token_threshold`).
  3. one bidirectional forward over the WHOLE sequence (prompt + every answer column, the blocks
     not added yet as masks); no cache (or the KV-cache variant below).
  4. commit, among the masked positions of the existing blocks, by entropy H (fp64, as released):
     `llada` rule: the lowest-H position plus every position with H <= threshold;
     `dream` rule: every position with H < threshold (shifted logits).
     Then, if the first fully activated block that still has masks got nothing, its lowest-H
     masked position is committed too. Later fully activated blocks may commit nothing.
A row finishes when its answer has no mask left (the early-stop fill counts as decoded) and
leaves the batch.

KV-cache variant (released `generate_multi_block_kv_cache`; the authors' default delay 10000 is
never reached, so by default nothing is cached): the prompt (block 0, complete at forward 0) and every
block that completes are cached `cache_delay_iter` forwards after they were first seen complete,
leading blocks only; each forward is then one of (`plan_cache`, per row):
  APPEND  blocks became ready: forward [cache end, L) over the cache, keep the ready blocks' KV;
  CACHED  forward [cache end, L) over the cache, keep nothing;
  REFRESH a block is waiting ("stabilising") or the forward index is a multiple of
          `refresh_interval`: full forward, its KV replaces the cached prefix;
  FULL    nothing cached yet: full forward, no cache.
The cached KV was computed by a forward that also saw masks: approximate, as released. Dream's
first column after the cache is predicted by the last cached column's logits (kept, the carry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import torch
from torch import Tensor
from torch.nn.functional import one_hot
from transformers import DynamicCache

from d2f.decoding.common import (
    Batch,
    Recorder,
    drop_finished,
    end_mask,
    forward,
    predict,
    seeded_generator,
)
from d2f.decoding.config import BlockState, DecodeConfig, strategy_options
from d2f.decoding.fast_dllm import keep_columns
from d2f.decoding.step import decoded_fraction, update_blocks
from d2f.family import Family
from d2f.mask import block_ids, full_mask


@strategy_options("d3llm")
@dataclass(frozen=True)
class D3LLMOptions:
    """d3LLM's own settings; the defaults are the authors' LLaDA eval settings (block_add 0.1 and
    decoded_token 0.95 are DecodeConfig's tau_add / tau_act, whose defaults are the same)."""

    threshold: float = 0.5  # entropy threshold (nats): commit positions at most this uncertain
    early_stop: bool = True  # fill everything after the first decoded end token with it
    rule: Literal["family", "llada", "dream"] = "family"  # which released variant; family = own
    # forwards a completed block waits before its KV is cached (authors' code default 10000:
    # never; their scripts: LLaDA 2, Dream 1 (GSM8K) or 2 (HumanEval))
    cache_delay_iter: int = 10_000
    # forward index multiple at which the cached prefix is recomputed by a full forward (authors'
    # code default 10000; their scripts: LLaDA 3, Dream 10000)
    refresh_interval: int = 10_000

    def __post_init__(self):
        for name, low in (("cache_delay_iter", 0), ("refresh_interval", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"d3llm option {name} must be an integer >= {low}, got {v!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"d3llm option threshold must be a finite number >= 0, got {t!r}")
        if not isinstance(self.early_stop, bool):
            raise TypeError(
                f"d3llm option early_stop must be True or False, got {self.early_stop!r}"
            )
        if self.rule not in ("family", "llada", "dream"):
            raise ValueError(f"d3llm option rule must be family, llada or dream, got {self.rule!r}")


def entropy(logits: Tensor) -> Tensor:
    """(B, W, V) logits -> (B, W) entropy in fp64 with d3LLM's `+1e-12` inside the log."""
    p = logits.double().softmax(-1)
    return -(p * (p + 1e-12).log()).sum(-1)


def fill_after_end(answer: Tensor, end_ids: Tensor) -> Tensor:
    """Early stop, in place: every column after a row's first end token takes that token.

    answer: (B, G) long. Returns (B,) long, the first end token's column (G if none).
    """
    B, G = answer.shape
    cols = torch.arange(G, device=answer.device)
    first = torch.where(end_mask(answer, end_ids), cols, G).min(1).values  # (B,)
    token = answer.gather(1, first.clamp(max=G - 1)[:, None])  # (B, 1)
    answer[:] = torch.where(cols[None] > first[:, None], token, answer)
    return first


def select(
    H: Tensor, eligible: Tensor, state: Tensor, rule: str, threshold: float, bs: int
) -> Tensor:
    """Step 4 of the module docstring. H, eligible: (B, G); state: (B, NB). Returns (B, G) bool."""
    B, G = H.shape
    Hs = H.masked_fill(~eligible, math.inf)  # (B, G)
    if rule == "llada":
        chosen = eligible & (H <= threshold)
        forced = one_hot(Hs.argmin(1), G).bool() & eligible.any(1, keepdim=True)
        chosen |= forced
    else:
        chosen = eligible & (H < threshold)
    blocks = eligible.view(B, -1, bs)  # (B, NB, bs)
    full = (state == BlockState.FULL) & blocks.any(-1)  # (B, NB)
    first = one_hot(full.int().argmax(1), full.shape[1]).bool() & full.any(1, keepdim=True)
    need = first & ~chosen.view(B, -1, bs).any(-1)  # (B, NB)
    best = one_hot(Hs.view(B, -1, bs).argmin(-1), bs).bool() & need[..., None]  # (B, NB, bs)
    return chosen | best.view(B, G)


class Pass(IntEnum):
    """What one row's forward does with the cache (module docstring)."""

    FULL = 0
    REFRESH = 1
    CACHED = 2
    APPEND = 3


def plan_cache(
    done: Tensor,
    done_at: Tensor,
    n_cached: Tensor,
    skip: Tensor,
    t: int,
    delay: int,
    interval: int,
    rule: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The released cache schedule of forward `t` (1-based), vectorised over rows.

    Blocks k = 0..K-1 are the prompt (k = 0) and the answer blocks. done: (B, K) bool, complete
    (no mask); done_at: (B, K) long, the forward at which the scan first saw block k complete
    (-1: not yet; the prompt: 0); n_cached: (B,) long, leading blocks in the cache; skip: (B, K)
    bool, blocks the released code marks cached without caching them (after the end token).
    The scan walks the blocks after the cache in order and stops at the first incomplete one;
    a complete block is cached once t - done_at >= delay. LLaDA's scan also stops at a complete
    block still waiting (so the next block's clock starts only when this one is cached); Dream's
    walks on. Returns the new done_at, the new n_cached and the row's `Pass` (B,) long.
    """
    B, K = done.shape
    k = torch.arange(K, device=done.device)
    past = k[None] >= n_cached[:, None]  # (B, K) not in the cache
    waited = t - torch.where(done_at >= 0, done_at, t)  # (B, K) the delay if reached now
    ready = done & (waited >= delay)
    go = ready if rule == "llada" else done  # the scan walks past block k
    gate = (go | ~past).long().cumprod(1)
    reached = past & torch.cat([torch.ones_like(gate[:, :1]), gate[:, :-1]], 1).bool()
    done_at = torch.where(reached & done & (done_at < 0), t, done_at)
    to_cache = reached & ready & ~skip
    n_new = torch.maximum(n_cached, torch.where(to_cache, k + 1, 0).max(1).values)  # (B,)
    cached = (k[None] < n_new[:, None]) | skip
    waiting = (done & (done_at >= 0) & ~cached).any(1)  # a "stabilising" block
    has = n_cached > 0
    branch = torch.full_like(n_cached, Pass.FULL)
    branch = torch.where(has, Pass.REFRESH, branch)
    branch = torch.where(has & ~waiting & (t % interval != 0), Pass.CACHED, branch)
    branch = torch.where(n_new > n_cached, Pass.APPEND, branch)
    return done_at, n_new, branch


def skipped_blocks(state: Tensor, first: Tensor | None, bs: int, rule: str) -> Tensor:
    """(B, NB + 1) bool: blocks (the prompt first) the released code marks cached without caching
    them. state: (B, NB) block states; first: (B,) answer column of the first end token (G: none;
    None: no early stop). Both variants: the blocks the early stop creates (those never added);
    Dream also every block that starts after the end token."""
    skip = state == BlockState.ABSENT
    if rule == "dream" and first is not None:
        starts = torch.arange(state.shape[1], device=state.device) * bs  # (NB,)
        skip |= starts[None] > first[:, None]
    return torch.cat([torch.zeros_like(skip[:, :1]), skip], 1)


def _gather_columns(cache: DynamicCache, idx: Tensor, config) -> DynamicCache:
    """A cache whose row b holds columns idx[b] (B, C) of `cache`'s row b, in every layer."""
    data = []
    for layer in cache.layers:
        B, H, _, D = layer.keys.shape
        at = idx[:, None, :, None].expand(B, H, idx.shape[1], D)
        data.append((layer.keys.gather(2, at), layer.values.gather(2, at)))
    return DynamicCache(ddp_cache_data=data, config=config)


@dataclass
class DelayedCache:
    """Per-row delayed prefix cache: row b's first `cols(n_cached[b])` cached columns are its own.

    One DynamicCache of `length` columns serves every row; a row with a shorter prefix has its
    extra columns masked out, so each row computes what it would alone.
    """

    P: int  # prompt columns (block 0)
    bs: int
    done_at: Tensor  # (B, K) long, -1 = not seen complete; the prompt: 0
    n_cached: Tensor  # (B,) long, leading blocks cached (0 = none)
    carry: Tensor | None = None  # (B, V) logits of each row's last cached column (Dream's shift)
    cache: DynamicCache | None = None
    length: int = 0  # columns held by `cache`

    @classmethod
    def create(cls, B: int, P: int, bs: int, NB: int, device) -> DelayedCache:
        done_at = torch.full((B, NB + 1), -1, dtype=torch.long, device=device)
        done_at[:, 0] = 0  # the prompt is complete before the first forward
        return cls(P, bs, done_at, torch.zeros(B, dtype=torch.long, device=device))

    def cols(self, n: Tensor) -> Tensor:
        """(B,) blocks -> (B,) columns they cover (the prompt, then whole answer blocks)."""
        return torch.where(n > 0, self.P + (n - 1) * self.bs, 0)

    def select(self, keep: Tensor) -> None:
        self.done_at, self.n_cached = self.done_at[keep], self.n_cached[keep]
        if self.carry is not None:
            self.carry = self.carry[keep]
        if self.cache is not None:
            self.cache.batch_select_indices(keep)


def _cached_forward(model, rec, batch, attn, kv: DelayedCache, plan, s: int, C_new: int, shift):
    """One model call serving every row's `Pass`: columns [s, L) over the stored cache, then the
    cache update. plan = (branch, start, n_new): (B,) each, the row's `Pass`, first fresh column
    and cached blocks after the step; on the host: s = min(start), C_new = the most columns any
    row caches after the step (-1: no row stores). Returns (B, L - s, V) logits."""
    branch, start, n_new = plan
    L = batch.x.shape[1]
    cols = torch.arange(L, device=batch.x.device)
    old_len, new_len = kv.cols(kv.n_cached), kv.cols(n_new)  # (B,) columns
    uses = (branch == Pass.CACHED) | (branch == Pass.APPEND)
    cache = kv.cache if kv.cache is not None else DynamicCache(config=model.config)
    C = kv.length
    # a row's fresh keys start at its own start; fresh columns before it see only themselves
    # (their outputs are unused), so no query of the row reads them
    fresh = attn[:, s:, s:] & (cols[None, s:] >= start[:, None])[:, None, :]  # (B, L-s, L-s)
    fresh |= torch.eye(L - s, dtype=torch.bool, device=cols.device)[None]
    held = torch.where(uses, old_len, 0)  # (B,) cached columns the row reads
    old = attn[:, s:, :C] & (cols[None, :C] < held[:, None])[:, None, :]  # (B, L-s, C)
    logits = forward(model, rec, batch, torch.cat([old, fresh], -1), s, L, cache)
    if C_new < 0:
        keep_columns(cache, C)  # no row stores: drop the window's KV
    else:  # row b keeps [0, new_len[b]): old columns, or this forward's (index C + j - s)
        j = torch.arange(C_new, device=cols.device)[None]  # (1, C_new)
        fresh_src = ((branch == Pass.APPEND)[:, None] & (j >= old_len[:, None])) | (
            branch == Pass.REFRESH
        )[:, None]
        idx = torch.where(fresh_src, C + j - s, j)
        idx = torch.where(j < new_len[:, None], idx, 0)  # (B, C_new); beyond new_len: unused
        cache = _gather_columns(cache, idx, model.config)
        C = C_new
    if shift and C_new >= 0:  # Dream: keep the logits of each row's new last cached column
        at = (new_len - 1 - s).clamp(min=0)[:, None, None].expand(-1, 1, logits.shape[-1])
        last = logits.gather(1, at)[:, 0]  # (B, V)
        moved = ((branch == Pass.APPEND) | (branch == Pass.REFRESH))[:, None]
        kv.carry = last if kv.carry is None else torch.where(moved, last, kv.carry)
    kv.cache, kv.length, kv.n_cached = cache, C, n_new
    return logits


@torch.no_grad()
def d3llm_decode(model, prompts: list[list[int]], cfg: DecodeConfig, family: Family, rec: Recorder):
    """Decode `prompts` with d3LLM multi-block entropy decoding; answers land in `rec.answers`."""
    opts: D3LLMOptions = cfg.options
    rule = family.name if opts.rule == "family" else opts.rule
    if rule not in ("llada", "dream"):
        raise ValueError(f"d3llm rule 'family' needs a llada or dream model, got {family.name}")
    device = next(model.parameters()).device
    mask_id, bs, NB, G = family.mask_token_id, cfg.block_size, cfg.num_blocks, cfg.gen_length
    end_ids = torch.tensor(family.end_token_ids, device=device)
    gen = seeded_generator(cfg, device)
    batch = Batch.create(prompts, G, mask_id, family.pad_token_id, device)
    P, B, L = batch.prompt_len, len(prompts), batch.x.shape[1]
    attn = full_mask(block_ids(batch.valid, torch.full((B,), P, device=device), bs))  # (B, L, L)
    state = torch.zeros(B, NB, dtype=torch.int8, device=device)
    kv = DelayedCache.create(B, P, bs, NB, device)
    rec.prefill_done()  # no prefill: every step recomputes the whole sequence (or a suffix)

    for t in range(1, G + 2):  # every step commits >= 1 token: this never runs out
        first = fill_after_end(batch.answer, end_ids) if opts.early_stop else None
        ended = first < G if first is not None else torch.zeros_like(kv.n_cached, dtype=bool)
        state = update_blocks(state, decoded_fraction(batch.answer, mask_id, bs), ended, cfg)
        masked = batch.answer == mask_id  # (B, G)
        finished = ~masked.any(1)
        # the cache schedule (blocks: the prompt, then the answer blocks)
        done = torch.cat([torch.ones_like(finished[:, None]), ~masked.view(-1, NB, bs).any(-1)], 1)
        skip = skipped_blocks(state, first, bs, rule)
        done_at, n_new, branch = plan_cache(
            done, kv.done_at, kv.n_cached, skip, t, opts.cache_delay_iter, opts.refresh_interval,
            rule,
        )  # fmt: skip
        kv.done_at = done_at
        start = torch.where(branch >= Pass.CACHED, kv.cols(kv.n_cached), 0)  # (B,)
        stores = (branch == Pass.APPEND) | (branch == Pass.REFRESH)
        host = torch.stack([finished.long(), start, kv.cols(n_new), stores.long()]).tolist()
        fin = host[0]  # NOTE: the one host sync per step
        if any(fin):
            keep = drop_finished(rec, batch, finished, fin)
            if keep is None:
                break
            state, attn, masked = state[keep], attn[keep], masked[keep]
            branch, start, n_new = branch[keep], start[keep], n_new[keep]
            kv.select(keep)
        start_h, new_h, store_h = (
            [v for v, f in zip(h, fin, strict=True) if not f] for h in host[1:]
        )
        s = min(start_h)
        C_new = max(new_h) if any(store_h) else -1  # columns the cache holds after the step
        if max(start_h) == 0 and C_new < 0:  # every row FULL: the plain no-cache forward
            logits = forward(model, rec, batch, attn, 0, L)
        else:
            plan = (branch, start, n_new)
            logits = _cached_forward(
                model, rec, batch, attn, kv, plan, s, C_new, family.shift_logits
            )
        preds = family.align_logits(logits, kv.carry if s > 0 else None)  # (B, L - s, V)
        if family.shift_logits and kv.carry is not None:
            # a row whose cache ends after s: its first fresh column is predicted by the carry
            fix = one_hot((start - s).clamp(min=0), L - s).bool() & (start > s)[:, None]
            preds = torch.where(fix[..., None], kv.carry[:, None].to(preds.dtype), preds)
        skipped = max(s - P, 0)  # answer columns before the window: decoded, never eligible
        preds = preds[:, max(P - s, 0) :]  # (B, G - skipped, V)
        x0 = predict(preds, cfg, mask_id, gen)[0]
        H = entropy(preds)
        if skipped:
            H = torch.cat([H.new_full((H.shape[0], skipped), math.inf), H], 1)  # (B, G)
            x0 = torch.cat([x0.new_full((x0.shape[0], skipped), mask_id), x0], 1)
        eligible = masked & (state != BlockState.ABSENT).repeat_interleave(bs, 1)
        chosen = select(H, eligible, state, rule, opts.threshold, bs)
        batch.answer[:] = torch.where(chosen, x0, batch.answer)
        rec.emit(batch, chosen, state)
    else:
        raise RuntimeError("d3llm_decode did not finish: a step committed no token (a bug)")
    rec.close()
