"""dInfer's algorithmic decoders (inclusionAI, arXiv 2510.08666): strategy `dinfer`.

Blocks are decoded one after another, as in Fast-dLLM v1, and this module reuses its loop
(`fast_dllm.start_block`, `fast_dllm.refine`): dInfer's cache refresh at block entry is one full
forward whose logits are decoded and whose KV becomes the cache (`none` / `prefix` / `dual`); the
block is then refined with cached forwards until it has no mask. What differs is the per-forward
commit rule, `options.decoder`, applied to the block's logits (conf = fp32 softmax probability of
the arg-max over the FULL vocabulary; a position whose arg-max is the mask id is not committed):

* threshold (`ThresholdParallelDecoder`): commit every mask with conf >= thr_eff, where
  thr_eff = min(threshold, max conf - 1e-5): when nothing reaches the threshold, every position
  within 1e-5 of the most confident one commits (ties commit together);
* credit (`CreditThresholdParallelDecoder`): a per-block (b, bs, V) credit matrix M, zeroed at the
  block's first forward and multiplied by beta at every later one, gains p1 ** gamma at each
  masked position's arg-max token j1 (p1 its probability); the threshold rule then runs on
  `logits + alpha * log(M + 1)`;
* hierarchy (`HierarchyDecoder`): each run of contiguous masks is a segment; commit the
  positions equal to their segment's maximum conf if conf > low_threshold, every position with
  conf > threshold, and the block's first most confident mask (always).

Two iteration variants (`generate_uniform.py`):

* vicinity refresh (`cache="vicinity"`, `VicinityCacheIteration`): a dual cache whose cached
  forwards recompute the window [s - prefix_look, e + after_look) around the block [s, e) over
  the refresh's KV of the other columns; a row's first `warmup_steps` forwards (counted over the
  whole answer) are full forwards without a cache, and the row refreshes at its first forward
  after them;
* iteration smoothing (`smoothing=True`, `IterationSmooth` + `H2Embed`): the model gets input
  embeddings; after each forward, the positions it covered that are still masked get
  E[mask] + w_it * softmax(logits) @ E (E = `model.get_input_embeddings()`), and the commit
  threshold is annealed, with `it` the row's forwards so far:
  thr_it = max(1 - threshold_decay * it, threshold), w_it = min(cont_weight_init +
  cont_weight_growth * it, cont_weight). With a cache, a refresh that completes its block is
  followed, as released, by one cached forward of that block that commits nothing (the idle
  forward): it counts in `it` and rewrites the soft embeddings of the columns it covers.

Early stop (`BlockRunner`, on in every released entry point): a row whose decoded text holds an
end token leaves at the next block start. Rows are block-synchronous and each row decodes what it
decodes alone. System-level parts (tensor / expert parallelism, CUDA graphs, loop unrolling) are
not ported; the departures are in docs/decoding.md ("dInfer").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from d2f.decoding.common import Batch, Recorder, drop_finished, ended_rows
from d2f.decoding.config import DecodeConfig, strategy_options
from d2f.decoding.fast_dllm import Block, refine, start_block
from d2f.decoding.kv import make_cache
from d2f.family import Family
from d2f.mask import block_ids

DINFER_DECODERS = ("threshold", "credit", "hierarchy")
CACHES = ("none", "prefix", "dual", "vicinity")
TIE = 1e-5  # the released threshold rule: positions within this of the best commit with it


@strategy_options("dinfer")
@dataclass(frozen=True)
class DInferOptions:
    """Settings of `dinfer`; defaults are the authors' (benchmark / lm-eval scripts, README)."""

    decoder: Literal["threshold", "credit", "hierarchy"] = "threshold"  # the commit rule
    threshold: float = 0.9  # threshold / credit: commit conf >= this; hierarchy: conf > this
    low_threshold: float | None = 0.3  # hierarchy: a segment maximum commits if conf > this
    credit_alpha: float = 0.7  # credit: weight of log(M + 1) added to the logits (0 = threshold)
    credit_gamma: float = 0.2  # credit: M gains p1 ** gamma at the arg-max token
    credit_beta: float = 0.8  # credit: decay of M per forward after the block's first
    cache: Literal["none", "prefix", "dual", "vicinity"] = "dual"  # KV reuse inside a block
    prefix_look: int = 16  # vicinity: columns before the block every cached forward recomputes
    after_look: int = 16  # vicinity: columns after the block every cached forward recomputes
    warmup_steps: int = 4  # vicinity: a row's first forwards are full forwards without a cache
    smoothing: bool = False  # iteration smoothing: masks get soft embeddings, annealed threshold
    cont_weight: float = 0.3  # smoothing: the largest weight of the soft embedding
    cont_weight_init: float = 0.15  # smoothing: its weight at a row's first forward
    cont_weight_growth: float = 0.02  # smoothing: its growth per forward
    threshold_decay: float = 0.02  # smoothing: threshold = max(1 - this * forwards, threshold)
    early_stop: bool = True  # a row leaves at a block start once its text holds an end token

    def __post_init__(self):
        if self.decoder not in DINFER_DECODERS:
            raise ValueError(
                f"dinfer option decoder must be one of {DINFER_DECODERS}, got {self.decoder!r}"
            )
        if self.cache not in CACHES:
            raise ValueError(f"dinfer option cache must be one of {CACHES}, got {self.cache!r}")
        for name in ("early_stop", "smoothing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"dinfer option {name} must be True or False, got {getattr(self, name)!r}"
                )
        for name in ("prefix_look", "after_look", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"dinfer option {name} must be an int >= 0, got {value!r}")
        numbers = ("threshold", "low_threshold", "credit_alpha", "credit_gamma", "credit_beta")
        smooth = ("cont_weight", "cont_weight_init", "cont_weight_growth", "threshold_decay")
        for name in numbers + smooth:
            value = getattr(self, name)
            if value is None and name == "low_threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"dinfer option {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"dinfer option {name} must be finite and >= 0, got {value}")


def threshold_commit(conf: Tensor, candidates: Tensor, threshold: float | Tensor) -> Tensor:
    """The released threshold rule: (b, W) conf and candidate masks -> (b, W) bool to commit.

    Commit candidate i iff conf_i >= min(threshold, max_j conf_j - 1e-5) (the max over the row's
    candidates; the released clamp at -1000 only matters for a row without one: it commits none).
    threshold: a number or a (b, 1) tensor, one per row (smoothing's annealed threshold).
    """
    c = conf.float().masked_fill(~candidates, float("-inf"))
    thr = (c.max(-1, keepdim=True).values - TIE).clamp_min(-1000.0)  # (b, 1)
    thr = torch.minimum(thr, torch.as_tensor(threshold, dtype=c.dtype, device=c.device))
    return candidates & (c >= thr)


def hierarchy_commit(
    conf: Tensor, masked: Tensor, threshold: float | Tensor | None, low_threshold: float | None
) -> Tensor:
    """The released hierarchy rule: (b, W) conf and masks -> (b, W) bool to commit.

    Segments are the maximal runs of contiguous masks. Commit i iff i is masked and
    (conf_i == max of its segment and conf_i > low_threshold) or conf_i > threshold or i is
    the row's first most confident mask. threshold: a number, a (b, 1) tensor or None.
    """
    b, W = masked.shape
    floor = torch.finfo(conf.dtype).min
    c = conf.masked_fill(~masked, floor)
    prev = torch.cat([masked.new_zeros(b, 1), masked[:, :-1]], 1)
    seg = (masked & ~prev).long().cumsum(-1) - 1  # (b, W) segment index of each mask
    seg = seg.masked_fill(~masked, 0)
    seg_max = torch.full_like(c, floor).scatter_reduce(1, seg, c, "amax", include_self=True)
    chosen = c == seg_max.gather(1, seg)
    if low_threshold is not None:
        chosen &= c > low_threshold
    if threshold is not None:
        chosen |= c > torch.as_tensor(threshold, dtype=c.dtype, device=c.device)
    chosen |= torch.nn.functional.one_hot(c.argmax(-1), W).bool()
    return chosen & masked


def credit_fuse(
    logits: Tensor, masked: Tensor, credit: Tensor, alpha: float, gamma: float, beta: float
) -> Tensor:
    """Credit fusion: (b, W, V) logits, (b, W) masks, the block's (b, W, V) fp32 credit matrix M
    (updated in place) -> (b, W, V) fp32 fused logits `logits + alpha * log(M + 1)`.

    M *= beta (the released code skips it at the block's first forward, where M is zero), then
    M[i, j1_i] += p1_i ** gamma at each masked i, (p1, j1) the top probability and its token.
    """
    credit.mul_(beta)
    p1, j1 = logits.float().softmax(-1).max(-1)  # (b, W) each
    credit.scatter_add_(2, j1[..., None], (p1.pow(gamma) * masked)[..., None])
    return logits.float() + alpha * torch.log(credit + 1)


def select(
    logits: Tensor, blk: Tensor, opts: DInferOptions, mask_id: int, threshold=None
) -> tuple[Tensor, Tensor]:
    """One forward's commit: (b, W, V) logits (credit already fused) over the (b, W) block ->
    x0 (b, W) long and the (b, W) bool positions to commit by `opts.decoder`'s rule, with
    `threshold` (a number or (b, 1) per row; None = opts.threshold).

    x0 is the arg-max over the full vocabulary and a position predicting the mask id is not
    committed (the released `rm_mask`); a row whose block has no mask commits nothing (the idle
    forward, as released). NOTE: if that leaves a row with masks committing none
    (every mask predicts the mask id) the released loop never ends; here the row commits its most
    confident mask with the best other token instead (d2f's rule), so decoding always ends.
    """
    masked = blk == mask_id
    thr = opts.threshold if threshold is None else threshold
    probs = logits.float().softmax(-1)  # (b, W, V) fp32
    if opts.decoder == "hierarchy":  # released: the softmax in the logits' own dtype
        x0 = logits.argmax(-1)
        conf = logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0].exp()
        chosen = hierarchy_commit(conf, masked, thr, opts.low_threshold)
    else:
        x0 = probs.argmax(-1)
        conf = probs.gather(-1, x0[..., None])[..., 0]
        chosen = threshold_commit(conf, masked & (x0 != mask_id), thr)
    chosen &= x0 != mask_id
    stuck = masked.any(-1, keepdim=True) & ~chosen.any(-1, keepdim=True)  # (b, 1)
    p_mask = probs[..., mask_id]  # (b, W)
    alt_p, alt = probs.index_fill(-1, torch.tensor([mask_id], device=probs.device), -1.0).max(-1)
    alt_p = alt_p / (1 - p_mask).clamp_min(1e-30)  # its probability with the mask id excluded
    best = alt_p.masked_fill(~masked, -1.0).argmax(-1)  # (b,)
    forced = torch.nn.functional.one_hot(best, blk.shape[1]).bool() & stuck
    return torch.where(forced, alt, x0), chosen | forced


def annealed(opts: DInferOptions, it: Tensor) -> tuple[Tensor, Tensor]:
    """Smoothing's schedule at (b,) long forward counts `it` (forwards a row made before this
    one) -> the (b, 1) fp64 threshold max(1 - threshold_decay * it, threshold) and the (b, 1)
    soft-embedding weight min(cont_weight_init + cont_weight_growth * it, cont_weight)."""
    it = it.double()[:, None]
    thr = (1 - it * opts.threshold_decay).clamp_min(opts.threshold)
    weight = (opts.cont_weight_init + opts.cont_weight_growth * it).clamp_max(opts.cont_weight)
    return thr, weight


def smoothed_embeddings(embed, x: Tensor, logits: Tensor, weight: Tensor, mask_id: int) -> Tensor:
    """dInfer's `H2Embed`: (b, n) ids, the (b, n, V) logits of the forward that saw them, (b, 1)
    weights -> (b, n, d) input embeddings: E[x], plus weight * softmax(logits) @ E where x is
    still the mask id. embed: the model's input embedding layer (`get_input_embeddings()`)."""
    E = embed.weight  # (V_emb, d)
    plain = embed(x)  # (b, n, d)
    soft = logits.to(E.dtype).softmax(-1) @ E  # (b, n, d), temperature 1
    mixed = weight[..., None].to(E.dtype) * soft + plain
    return torch.where((x == mask_id)[..., None], mixed, plain)


@torch.no_grad()
def dinfer_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder) -> None:
    """dInfer decoding of `prompts` (token id lists) into `rec` (see the module doc)."""
    if cfg.temperature > 0:
        raise ValueError("dinfer ports the authors' greedy decoders: use temperature 0")
    if family.shift_logits:
        raise ValueError(
            "dinfer ports the released LLaDA path (unshifted logits); "
            f"a {family.name} model predicts shifted"
        )
    opts: DInferOptions = cfg.options
    embed = model.get_input_embeddings() if opts.smoothing else None
    if embed is not None and embed.weight.shape[0] != model.config.vocab_size:
        raise ValueError(
            f"dinfer smoothing mixes embeddings by the output distribution: the embedding has "
            f"{embed.weight.shape[0]} rows, the vocabulary {model.config.vocab_size}"
        )
    device = next(model.parameters()).device
    mask_id, bs = family.mask_token_id, cfg.block_size
    end_ids = torch.tensor(family.end_token_ids, device=device)
    batch = Batch.create(prompts, cfg.gen_length, mask_id, family.pad_token_id, device)
    P, B, L = batch.prompt_len, len(prompts), batch.x.shape[1]
    if embed is not None:  # every position starts as its token's embedding (E[mask] on masks)
        batch.emb = embed(batch.x)  # (B, L, d)
    ids = block_ids(batch.valid, torch.full((B,), P, device=device), bs)  # (B, L)
    rec.prefill_done()  # no prefill: every block starts with a full forward (the refresh)
    # the batch rows the next `choose` call sees, and the block's per-row credit matrices
    state: dict = {"rows": None, "credit": None}

    def forwards_before(rows: Tensor) -> Tensor:
        """(b,) forwards each row made before the current one (the released `iter_no`)."""
        return rec.row_forwards[batch.rows[rows]] - 1

    def choose(preds: Tensor, blk: Tensor) -> tuple[Tensor, Tensor]:
        rows = state["rows"]
        if opts.decoder == "credit":
            if state["credit"] is None:  # the block's first forward: zeroed, for every row
                state["credit"] = torch.zeros(
                    batch.x.shape[0], *preds.shape[1:], dtype=torch.float32, device=device
                )
            credit = state["credit"][rows]  # (b, bs, V) copy of the rows' matrices
            o = opts
            preds = credit_fuse(
                preds, blk == mask_id, credit, o.credit_alpha, o.credit_gamma, o.credit_beta
            )
            state["credit"][rows] = credit
        thr = annealed(opts, forwards_before(rows))[0] if opts.smoothing else None
        return select(preds, blk, opts, mask_id, thr)

    def apply(rows: Tensor, s: int, x0: Tensor, chosen: Tensor) -> None:
        blk = batch.x[rows, s : s + bs]  # (b, bs)
        batch.x[rows, s : s + bs] = torch.where(chosen, x0, blk)
        committed = torch.zeros_like(batch.answer, dtype=torch.bool)  # (B, G)
        committed[rows, s - P : s - P + bs] = chosen
        rec.emit(batch, committed)

    def smooth(rows: Tensor, start: int, logits: Tensor) -> None:
        """After a forward over columns [start, start + n): their new input embeddings."""
        end = start + logits.shape[1]
        weight = annealed(opts, forwards_before(rows))[1]
        x = batch.x[rows, start:end]
        batch.emb[rows, start:end] = smoothed_embeddings(embed, x, logits, weight, mask_id)

    after = smooth if opts.smoothing else None
    vicinity = opts.cache == "vicinity"
    kind = "dual" if vicinity else opts.cache  # the vicinity cache is a dual cache, wider
    warmup = opts.warmup_steps if vicinity else 0
    # NOTE: theirs follows every refresh with a cached forward in the same iteration, even when
    # the refresh completed the block (an idle forward: it commits nothing). Without smoothing
    # it changes nothing but the count and is skipped; with smoothing it advances the anneal and
    # rewrites the soft embeddings of the columns it covers, so it is made (and counted)
    idle = opts.smoothing and kind != "none"
    # kv_cache="static": each refresh writes a buffer of all L columns and the cached forwards
    # rewrite their columns in place, keys in column order (the released layout; the dynamic dual
    # cache orders them [prefix | suffix | window], which rounds differently in fp32). A buffer
    # per refresh: the vicinity warmup can refresh a block's rows in several groups
    static = cfg.kv_cache == "static" and kind != "none"

    def start(rows: Tensor, s: int) -> Block:
        """The rows' refresh forward: decodes, and its KV becomes their cache for the block."""
        window = (max(0, s - opts.prefix_look), min(L, s + bs + opts.after_look))
        state["rows"] = rows
        return start_block(
            model, rec, batch, ids, s, bs, kind, family, choose, apply, rows,
            window if vicinity else None, after, idle=idle,
            static=make_cache(model, "static", L) if static else None,
        )  # fmt: skip

    def step(blk: Block, cache: str) -> None:
        state["rows"] = blk.act
        refine(model, rec, batch, ids, blk, cache, family, choose, apply, mask_id, after)

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
        state["credit"] = None
        rows = torch.arange(batch.x.shape[0], device=device)
        warm = rec.row_forwards[batch.rows] < warmup  # (B,) rows still in the vicinity warmup
        # warm rows take full forwards without a cache; a row refreshes (`start`) at its first
        # forward after the warmup; rows refreshed at different forwards keep separate caches
        warming = Block(s, s + bs, None, None, rows[warm])
        groups = [start(rows[~warm], s)] if not bool(warm.all()) else []
        while warming.act.numel() or any(g.act.numel() for g in groups):
            if warming.act.numel():
                step(warming, "none")
                ready = rec.row_forwards[batch.rows[warming.act]] >= warmup
                if bool(ready.any()):
                    groups.append(start(warming.act[ready], s))
                    warming.act = warming.act[~ready]
            for g in groups:
                if g.act.numel():
                    step(g, kind)
    if batch.x.shape[0]:
        rec.finish(batch, torch.ones(batch.x.shape[0], dtype=torch.bool, device=device))
    rec.close()
