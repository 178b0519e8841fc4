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
     not added yet as masks); no cache.
  4. commit, among the masked positions of the existing blocks, by entropy H (fp64, as released):
     `llada` rule: the lowest-H position plus every position with H <= threshold;
     `dream` rule: every position with H < threshold (shifted logits).
     Then, if the first fully activated block that still has masks got nothing, its lowest-H
     masked position is committed too. Later fully activated blocks may commit nothing.
A row finishes when its answer has no mask left (the early-stop fill counts as decoded) and
leaves the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.functional import one_hot

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
from d2f.decoding.pipeline import decoded_fraction, update_blocks
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

    def __post_init__(self):
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

    answer: (B, G) long. Returns (B,) bool, whether the row has an end token.
    """
    B, G = answer.shape
    cols = torch.arange(G, device=answer.device)
    first = torch.where(end_mask(answer, end_ids), cols, G).min(1).values  # (B,)
    has_end = first < G
    token = answer.gather(1, first.clamp(max=G - 1)[:, None])  # (B, 1)
    answer[:] = torch.where(cols[None] > first[:, None], token, answer)
    return has_end


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


@torch.no_grad()
def d3llm_decode(model, prompts: list[list[int]], cfg: DecodeConfig, family: Family, rec: Recorder):
    """Decode `prompts` with d3LLM multi-block entropy decoding; answers land in `rec.answers`."""
    opts: D3LLMOptions = cfg.options
    rule = family.name if opts.rule == "family" else opts.rule
    if rule not in ("llada", "dream"):
        raise ValueError(f"d3llm rule 'family' needs a llada or dream model, got {family.name}")
    device = next(model.parameters()).device
    mask_id, bs, NB = family.mask_token_id, cfg.block_size, cfg.num_blocks
    end_ids = torch.tensor(family.end_token_ids, device=device)
    gen = seeded_generator(cfg, device)
    batch = Batch.create(prompts, cfg.gen_length, mask_id, family.pad_token_id, device)
    P, B, L = batch.prompt_len, len(prompts), batch.x.shape[1]
    attn = full_mask(block_ids(batch.valid, torch.full((B,), P, device=device), bs))  # (B, L, L)
    state = torch.zeros(B, NB, dtype=torch.int8, device=device)
    rec.prefill_done()  # no prefill: every step recomputes the whole sequence

    for _ in range(cfg.gen_length + 2):  # every step commits >= 1 token: this never runs out
        if opts.early_stop:
            ended = fill_after_end(batch.answer, end_ids)
        else:
            ended = torch.zeros(batch.x.shape[0], dtype=torch.bool, device=device)
        state = update_blocks(state, decoded_fraction(batch.answer, mask_id, bs), ended, cfg)
        masked = batch.answer == mask_id  # (B, G)
        finished = ~masked.any(1)
        fin = finished.tolist()  # NOTE: the one host sync per step
        if any(fin):
            keep = drop_finished(rec, batch, finished, fin)
            if keep is None:
                break
            state, attn, masked = state[keep], attn[keep], masked[keep]
        logits = family.align_logits(forward(model, rec, batch, attn, 0, L))[:, P:]  # (B, G, V)
        x0 = predict(logits, cfg, mask_id, gen)[0]  # (B, G)
        eligible = masked & (state != BlockState.ABSENT).repeat_interleave(bs, 1)
        chosen = select(entropy(logits), eligible, state, rule, opts.threshold, bs)
        batch.answer[:] = torch.where(chosen, x0, batch.answer)
        rec.emit(batch, chosen, state)
    else:
        raise RuntimeError("d3llm_decode did not finish: a step committed no token (a bug)")
    rec.close()
