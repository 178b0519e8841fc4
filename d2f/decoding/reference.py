"""The slow, obviously-correct D2F decoder: one row at a time, full recompute, no cache.

It follows the rules of the paper word by word with plain Python lists and loops, and recomputes
the whole sequence under the block-causal mask every step. Tests check that the fast pipelined
decoder (`d2f.decoding.pipeline`) gives exactly its tokens and its number of steps at temperature 0.
"""

from __future__ import annotations

import torch

from d2f.decoding.common import Recorder, predict, seeded_generator
from d2f.decoding.config import DecodeConfig
from d2f.family import Family
from d2f.mask import block_causal_mask, to_additive


@torch.no_grad()
def reference_decode_row(
    model,
    prompt: list[int],
    cfg: DecodeConfig,
    family: Family,
    generator: torch.Generator | None = None,
    rec: Recorder | None = None,
) -> tuple[list[int], int]:
    """Decode one prompt. Returns (answer ids of length gen_length, mask id = never decoded,
    number of forwards). `generator` draws the samples when cfg.temperature > 0; `rec`, when
    given, checks every forward's logits for NaN/inf."""
    device = next(model.parameters()).device
    mask, bs = family.mask_token_id, cfg.block_size
    x = list(prompt)
    P = len(prompt)
    starts: list[int] = []  # start column of each existing block
    full: list[bool] = []  # fully activated?
    forwards = 0

    def fraction(k: int) -> float:
        if k < 0:
            return 1.0  # the prompt counts as decoded
        return sum(t != mask for t in x[starts[k] : starts[k] + bs]) / bs

    def answer() -> list[int]:
        return x[P:] + [mask] * (cfg.gen_length - (len(x) - P))

    while True:
        ended = any(t in family.end_token_ids for t in x[P:])
        # 1. add a block
        if not ended and len(starts) < cfg.num_blocks and fraction(len(starts) - 1) >= cfg.tau_add:
            starts.append(len(x))
            full.append(False)
            x += [mask] * bs
        # 2. activate
        for k in range(len(starts)):
            if fraction(k - 1) >= cfg.tau_act:
                full[k] = True
        # stop?
        gen = x[P:]
        first_end = next((i for i, t in enumerate(gen) if t in family.end_token_ids), None)
        if first_end is not None and mask not in gen[:first_end]:
            return answer(), forwards
        if len(starts) == cfg.num_blocks and mask not in gen:
            return answer(), forwards
        # 3. full forward, block-causal
        block = [0] * P + [1 + i // bs for i in range(len(x) - P)]
        ids = torch.tensor([block], device=device)
        attn = to_additive(block_causal_mask(ids), next(model.parameters()).dtype)
        logits = model(
            input_ids=torch.tensor([x], device=device),
            attention_mask=attn,
            position_ids=torch.arange(len(x), device=device)[None],
        ).logits
        forwards += 1
        if rec is not None:
            rec.check_logits(logits)
        logits = family.align_logits(logits)  # Dream: position i is predicted by row i - 1
        x0, conf, score = (t[0].tolist() for t in predict(logits, cfg, mask, generator))
        # 4. commit, block by block
        new_x = list(x)
        for k, start in enumerate(starts):
            masked = [i for i in range(start, start + bs) if x[i] == mask]
            if not masked:
                continue
            chosen = [i for i in masked if conf[i] > cfg.tau_conf]
            if not chosen and full[k]:
                chosen = [max(masked, key=lambda i: score[i])]
            for i in chosen:
                new_x[i] = x0[i]
        x = new_x


def reference_decode(model, prompts, cfg: DecodeConfig, family: Family, rec: Recorder):
    """All rows, one after the other, through `reference_decode_row`."""
    rec.prefill_done()  # there is no prefill: every step recomputes everything
    gen = seeded_generator(cfg, next(model.parameters()).device)
    for b, prompt in enumerate(prompts):
        answer, forwards = reference_decode_row(model, prompt, cfg, family, gen, rec)
        rec.answers[b] = torch.tensor(answer, device=rec.answers.device)
        rec.forwards += forwards
        rec.row_forwards[b] += forwards
    rec.close()
