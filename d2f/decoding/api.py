"""`generate`: one entry point for every decoding strategy, with input checks and statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from d2f.decoding.baselines import ar_decode, fast_dllm_decode, vanilla_decode
from d2f.decoding.common import Recorder
from d2f.decoding.config import DecodeConfig, DecodeOutput, DecodeStats, RowStats, StepEvent
from d2f.decoding.pipeline import d2f_decode
from d2f.decoding.reference import reference_decode
from d2f.family import Family, family_of

DECODERS: dict[str, Callable] = {
    "d2f": d2f_decode,
    "cache_only": d2f_decode,  # with tau_add = 1: one block at a time
    "vanilla": vanilla_decode,
    "fast_dllm": fast_dllm_decode,
    "ar": ar_decode,
    "reference": reference_decode,
}


def prepare_prompts(
    prompts: Sequence[str | Sequence[int]],
    tokenizer,
    family: Family,
    cfg: DecodeConfig,
    context: int,
) -> list[list[int]]:
    """Token ids of every prompt (chat template applied to strings when asked), checked to fit."""
    if isinstance(prompts, str | bytes) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token id lists")
    chat = family.use_chat_template if cfg.chat is None else cfg.chat
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is a string: pass tokenizer= (or give token ids)")
            if chat:
                if not tokenizer.chat_template:
                    raise ValueError("chat=True but the tokenizer has no chat template")
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(p)["input_ids"]
        else:
            ids = [int(t) for t in p]
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty")
        limit = context - cfg.gen_length
        if len(ids) > limit:
            if not cfg.truncate_prompt:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with {cfg.gen_length} new tokens the "
                    f"context of {context} leaves {limit} (set truncate_prompt=True to cut it)"
                )
            if limit <= 0:
                raise ValueError(f"max_new_tokens {cfg.gen_length} leaves no room in {context}")
            ids = ids[-limit:]
        out.append(ids)
    return out


def _check_model(family: Family, cfg: DecodeConfig, vocab: int, prompts: list[list[int]]):
    if cfg.strategy == "ar":
        if not family.causal:
            raise ValueError(
                f"strategy 'ar' needs an autoregressive model, got a {family.name} dLLM"
            )
    else:
        if family.causal:
            raise ValueError(
                f"strategy {cfg.strategy!r} needs a dLLM; this model is autoregressive"
            )
        if family.mask_token_id is None:
            raise ValueError("the model has no mask token id (mask_token_id in config.json)")
    top = max(max(p) for p in prompts)
    if top >= vocab or min(min(p) for p in prompts) < 0:
        raise ValueError(f"prompt token id {top} is outside the vocabulary of {vocab}")


def generate(
    model,
    prompts: Sequence[str | Sequence[int]],
    config: DecodeConfig | None = None,
    tokenizer=None,
    on_step: Callable[[StepEvent], None] | None = None,
    record: bool = False,
    **overrides,
) -> DecodeOutput:
    """Generate answers for `prompts` (strings, with `tokenizer`, or token id lists).

    `config` (default `DecodeConfig()`) picks the strategy and its settings; keyword `overrides`
    replace its fields. `on_step` receives a `StepEvent` after every step (streaming);
    `record=True` keeps them in `out.trace` (for `d2f.render`).
    """
    cfg = dataclasses.replace(config or DecodeConfig(), **overrides)
    family = family_of(model)
    context = cfg.max_length or getattr(model.config, "max_position_embeddings", None) or 2**31
    ids = prepare_prompts(prompts, tokenizer, family, cfg, context)
    _check_model(family, cfg, model.config.vocab_size, ids)
    if cfg.strategy == "cache_only":
        cfg = dataclasses.replace(cfg, tau_add=1.0)

    trace: list[StepEvent] | None = [] if record else None
    callback = on_step
    if record:

        def callback(event: StepEvent) -> None:
            trace.append(event)
            if on_step is not None:
                on_step(event)

    device = next(model.parameters()).device
    rec = Recorder(len(ids), cfg.gen_length, device, callback)
    was_training = model.training
    if was_training:  # NOTE: toggling walks every module: only when needed (ms per call otherwise)
        model.eval()
    try:
        DECODERS[cfg.strategy](model, ids, cfg, family, rec)
    finally:
        if was_training:
            model.train()
    return _output(rec, family, tokenizer, trace)


def _output(rec: Recorder, family: Family, tokenizer, trace) -> DecodeOutput:
    answers = rec.answers.tolist()
    row_forwards = rec.row_forwards.tolist()
    tokens, rows = [], []
    ends = set(family.end_token_ids)
    for answer, forwards in zip(answers, row_forwards, strict=True):
        cut = next((i for i, t in enumerate(answer) if t in ends), None)
        kept = answer if cut is None else answer[:cut]
        tokens.append(kept)
        rows.append(RowStats(forwards, len(kept), len(kept) + (cut is not None), cut is not None))
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    stats = DecodeStats(rec.forwards, rec.prefill_s, rec.decode_s, rows)
    return DecodeOutput(tokens, texts, stats, trace)
