"""Pieces every decoding strategy shares: batch layout, predictions, model calls, bookkeeping.

Batch layout (all strategies): prompts are LEFT-padded to the longest one, so answer block k of
every row occupies the same columns `[P + k * bs, P + (k + 1) * bs)`; positions skip the padding
(`d2f.mask.position_ids`), so a row's numbers do not depend on the other rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from d2f.decoding.config import BlockState, DecodeConfig, StepEvent
from d2f.decoding.kv import key_mask
from d2f.mask import position_ids, to_additive


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """(B, P) ids and (B, P) bool validity of left-padded prompts."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[b, P - len(p) :] = True
    return ids.to(device), valid.to(device)


@dataclass
class Batch:
    """The decoding buffer of the active rows: `x = [left-padded prompt | answer]`."""

    x: Tensor  # (B, P + G) long; answer positions hold the mask id until decoded
    valid: Tensor  # (B, P + G) bool; False on left padding
    pos: Tensor  # (B, P + G) long position ids (padding skipped)
    rows: Tensor  # (B,) long, each row's index in the caller's prompt list
    prompt_len: int  # P, columns of the (padded) prompt
    # (B, P + G, d) input embeddings the model gets instead of `x` (dInfer's iteration smoothing)
    emb: Tensor | None = None

    @classmethod
    def create(cls, prompts: list[list[int]], gen_length: int, fill_id: int, pad_id: int, device):
        prompt_ids, prompt_valid = left_pad(prompts, pad_id, device)
        B, P = prompt_ids.shape
        x = torch.cat([prompt_ids, torch.full((B, gen_length), fill_id, device=device)], 1)
        valid = torch.cat(
            [prompt_valid, torch.ones(B, gen_length, dtype=torch.bool, device=device)], 1
        )
        rows = torch.arange(B, device=device)
        return cls(x, valid, position_ids(valid), rows, P)

    @property
    def answer(self) -> Tensor:
        return self.x[:, self.prompt_len :]  # (B, G) view

    def select(self, keep: Tensor) -> None:
        self.x, self.valid, self.pos, self.rows = (
            t[keep] for t in (self.x, self.valid, self.pos, self.rows)
        )
        if self.emb is not None:
            self.emb = self.emb[keep]

    def subset(self, rows: Tensor) -> Batch:
        """A copy of rows `rows` (b,) long, for a model call over part of the batch."""
        emb = None if self.emb is None else self.emb[rows]
        return Batch(
            self.x[rows], self.valid[rows], self.pos[rows], self.rows[rows], self.prompt_len, emb
        )


class Recorder:
    """Counts model calls per row, times prefill/decode, keeps finished rows, emits step events."""

    def __init__(self, n_rows: int, gen_length: int, device, on_step=None):
        self.forwards = 0
        self.row_forwards = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.answers = torch.empty(n_rows, gen_length, dtype=torch.long, device=device)
        # forwards whose logits were checked, and those all finite (counted on the device: read
        # once after decoding)
        self.checked = 0
        self.finite_forwards = torch.zeros((), dtype=torch.long, device=device)
        self.on_step = on_step
        self.step = 0
        self._t0 = time.perf_counter()
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self._device = torch.device(device)

    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def called(self, rows: Tensor) -> None:
        self.forwards += 1
        self.row_forwards[rows] += 1

    def check_logits(self, logits: Tensor) -> None:
        """Count a forward's logits (B, W, V) and whether all are finite; no host sync."""
        self.count_finite(torch.isfinite(logits).all())

    def count_finite(self, finite: Tensor) -> None:
        """Count a forward whose logits' finiteness is `finite` (() bool); no host sync."""
        self.checked += 1
        self.finite_forwards += finite

    @property
    def nonfinite_forwards(self) -> Tensor:
        """() long: checked forwards with a NaN or infinite logit (reading it syncs)."""
        return self.checked - self.finite_forwards

    def prefill_done(self) -> None:
        self.prefill_s = self._now() - self._t0
        self._t0 = self._now()

    def finish(self, batch: Batch, done: Tensor) -> None:
        """Store the answers of rows `done` (B,) bool; the caller then drops them."""
        self.answers[batch.rows[done]] = batch.answer[done]

    def emit(
        self, batch: Batch, committed: Tensor | None, block_state: Tensor | None = None
    ) -> None:
        """End of a step: count it and, when streaming, hand the callback a StepEvent
        (`committed` (B, G) bool may be None when there is no callback)."""
        self.step += 1
        if self.on_step is not None:
            self.on_step(
                StepEvent(
                    self.step,
                    batch.rows.clone(),
                    batch.answer.clone(),
                    committed.clone(),
                    None if block_state is None else block_state.clone(),
                )
            )

    def close(self) -> None:
        self.decode_s = self._now() - self._t0


def drop_finished(rec: Recorder, batch: Batch, finished: Tensor, fin: list) -> Tensor | None:
    """Store the answers of finished rows and drop them from the batch.

    finished: (B,) bool on device; fin: the same flags already on the host (no extra sync).
    Returns the kept row indices (to select other per-row tensors and the cache), None if none.
    """
    rec.finish(batch, finished)
    kept = [i for i, f in enumerate(fin) if not f]
    if not kept:
        return None
    keep = torch.tensor(kept, device=batch.x.device)
    batch.select(keep)
    return keep


def forward(
    model, rec: Recorder, batch: Batch, mask_bool: Tensor, start: int, end: int, cache=None
):
    """One model call over columns `start:end` of the batch; returns (B, end - start, V) logits.

    mask_bool: (B, end - start, K) bool with K = (cached columns) + (end - start); a static cache
    takes it over its whole buffer (`d2f.decoding.kv.key_mask`: keys past K hidden). The model gets
    `batch.emb[:, start:end]` as `inputs_embeds` when the batch carries embeddings, else the ids.
    """
    rec.called(batch.rows)
    dtype = next(model.parameters()).dtype
    # NOTE: transformers 5.24 renamed the forward's cache argument `past_key_values` -> `cache`
    # (the old name warns and goes in 5.40); without a cache the argument is left out entirely.
    with_cache = {} if cache is None else {"cache": cache}
    if batch.emb is None:
        inputs = {"input_ids": batch.x[:, start:end]}
    else:
        inputs = {"inputs_embeds": batch.emb[:, start:end]}
    out = model(
        **inputs,
        attention_mask=to_additive(key_mask(mask_bool, cache), dtype),
        position_ids=batch.pos[:, start:end],
        use_cache=cache is not None,
        **with_cache,
    )
    rec.check_logits(out.logits)  # before predict: it writes -inf into the mask id's column
    return out.logits


def seeded_generator(cfg: DecodeConfig, device) -> torch.Generator | None:
    """The sampling generator of one `generate` call: seeded by `cfg.seed`, None = global RNG."""
    return torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None


def predict(logits: Tensor, cfg: DecodeConfig, mask_id: int | None, generator=None):
    """Token predictions and confidences at every position.

    logits: (B, W, V), any dtype; computed in fp32. The mask id is never predicted.
    Returns x0 (B, W) long; conf (B, W) float, the probability of x0 under the (temperature /
    top-k / top-p adjusted) distribution, used for the tau_conf threshold; and score (B, W), the
    fallback score (`cfg.confidence`: prob, top1 - top2 margin, or negative entropy).
    """
    logits = logits.float()
    if mask_id is not None:  # out of place: the caller's logits stay as they are
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
        if cfg.top_k > 0:
            kth = logits.topk(min(cfg.top_k, logits.shape[-1]), -1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the first past top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)  # (B, W, V) fp32
    if cfg.temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        x0 = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    else:
        x0 = probs.argmax(-1)
    conf = probs.gather(-1, x0[..., None])[..., 0]
    if cfg.confidence == "prob":
        score = conf
    elif cfg.confidence == "margin":
        top2 = probs.topk(2, -1).values
        score = top2[..., 0] - top2[..., 1]
    else:
        logp = probs.clamp_min(1e-30).log()
        score = (probs * logp).sum(-1)  # negative entropy
    return x0, conf, score


def commit(
    answer_w: Tensor,
    state_w: Tensor,
    x0: Tensor,
    conf: Tensor,
    score: Tensor,
    mask_id: int,
    cfg: DecodeConfig,
) -> Tensor:
    """The commit rule (paper Sec. 3.3), the one copy D2F and Fast-dLLM share.

    In every live block, commit the masked positions whose probability `conf` is > tau_conf; a
    fully activated block that commits none commits its single best masked position by `score`;
    a semi-activated block may commit none. answer_w, x0, conf, score: (B, W) over the window's
    answer columns (W a multiple of block_size); state_w: (B, W // bs) `BlockState` codes.
    Returns (B, W) bool: positions to commit.
    """
    B, W = answer_w.shape
    bs = cfg.block_size
    masked = (answer_w == mask_id).view(B, -1, bs)  # (B, nbw, bs)
    # NOTE: `.value`: torch.compile cannot trace a tensor compared with an IntEnum member
    live = (state_w != BlockState.ABSENT.value)[..., None]
    chosen = masked & live & (conf.view(B, -1, bs) > cfg.tau_conf)
    need = (state_w == BlockState.FULL.value) & ~chosen.any(-1) & masked.any(-1)  # (B, nbw)
    best = score.view(B, -1, bs).masked_fill(~masked, float("-inf")).argmax(-1)  # (B, nbw)
    fallback = (best[..., None] == torch.arange(bs, device=best.device)) & need[..., None]
    return (chosen | fallback).view(B, W)


def end_mask(tokens: Tensor, end_ids: Tensor) -> Tensor:
    """(B, G) bool: which tokens are end tokens."""
    return torch.isin(tokens, end_ids)


def ended_rows(answer: Tensor, mask_id: int, end_ids: Tensor) -> Tensor:
    """(B,) bool: an end token is decoded and every answer position before it is decoded too."""
    G = answer.shape[1]
    cols = torch.arange(G, device=answer.device)
    first_end = torch.where(end_mask(answer, end_ids), cols, G).min(1).values
    first_mask = torch.where(answer == mask_id, cols, G).min(1).values
    return (first_end < G) & (first_mask > first_end)
