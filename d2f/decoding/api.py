"""`generate`: one entry point for every decoding strategy, with input checks and statistics."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch

from d2f.config import check_attention
from d2f.decoding.baselines import ar_decode, vanilla_decode
from d2f.decoding.common import Recorder
from d2f.decoding.config import (
    PAPER_MAX_NEW_TOKENS,
    DecodeConfig,
    DecodeOutput,
    DecodeStats,
    RowStats,
    StepEvent,
)
from d2f.decoding.d3llm import d3llm_decode
from d2f.decoding.dinfer import dinfer_decode
from d2f.decoding.fast_dllm import fast_dllm_decode
from d2f.decoding.fast_dllm_v2 import fast_dllm_v2_decode
from d2f.decoding.freedave import freedave_decode
from d2f.decoding.jacobi import jacobi_decode
from d2f.decoding.pipeline import d2f_decode
from d2f.decoding.reference import reference_decode
from d2f.decoding.sched import prophet_decode, sched_decode
from d2f.family import Family, family_of

DECODERS: dict[str, Callable] = {
    "d2f": d2f_decode,
    "cache_only": d2f_decode,  # with tau_add = 1: one block at a time
    "vanilla": vanilla_decode,
    "fast_dllm": fast_dllm_decode,
    "ar": ar_decode,
    "reference": reference_decode,
    "d3llm": d3llm_decode,
    "fast_dllm_v2": fast_dllm_v2_decode,
    "freedave": freedave_decode,
    "sched": sched_decode,  # vanilla + SchED early exit
    "prophet": prophet_decode,  # vanilla + Prophet early commit
    "dinfer": dinfer_decode,
    "jacobi": jacobi_decode,
}
# strategies for autoregressive (causal) models; every other strategy needs a dLLM
CAUSAL_STRATEGIES = frozenset({"ar", "jacobi"})
# the strategies that decode under the block-causal rule (d2f.mask): the only ones a family trained
# block-causal (Family.block_size set, e.g. fast_dllm_v2) can run
BLOCK_CAUSAL_STRATEGIES = frozenset({"d2f", "cache_only", "fast_dllm_v2", "reference"})


def encode_prompts(
    prompts: Sequence[str | Sequence[int]], tokenizer, family: Family, cfg: DecodeConfig
) -> list[list[int]]:
    """Token ids of every prompt (the chat template applied to strings when asked)."""
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
        out.append(ids)
    return out


def fit_to_context(
    ids: list[list[int]], cfg: DecodeConfig, context: int
) -> tuple[list[list[int]], DecodeConfig]:
    """Check that every prompt plus the answer blocks fits `context` positions.

    `max_new_tokens=None` becomes the most whole blocks that fit after the longest prompt, at most
    `PAPER_MAX_NEW_TOKENS` (with `truncate_prompt`, at least one block). Prompts too long for the
    answer are left-truncated when `cfg.truncate_prompt`, refused otherwise.
    Returns (prompt ids, the config with `max_new_tokens` set).
    """
    bs = cfg.block_size
    if cfg.max_new_tokens is None:
        room = context - max(len(p) for p in ids)
        fits = min(room, PAPER_MAX_NEW_TOKENS) // bs * bs
        if fits < bs and cfg.truncate_prompt:
            fits = bs
        if fits < bs:
            i = max(range(len(ids)), key=lambda j: len(ids[j]))
            raise ValueError(
                f"prompt {i} has {len(ids[i])} tokens: the context of {context} leaves {room}, "
                f"less than one block of block_size={bs} (shorten the prompt, lower block_size, "
                "or set truncate_prompt=True to keep its last tokens)"
            )
        cfg = dataclasses.replace(cfg, max_new_tokens=fits)
    limit = context - cfg.gen_length
    if limit <= 0:  # no prompt can fit: truncation cannot help, say what can
        most = (context - 1) // bs * bs
        fix = f"at most {most}" if most >= bs else f"a smaller block_size than {bs}"
        raise ValueError(
            f"max_new_tokens={cfg.max_new_tokens} ({cfg.gen_length} in whole blocks of {bs}) "
            f"leaves no room for a prompt in the context of {context}: use max_new_tokens "
            f"{fix}, or None for the most that fits"
        )
    out = []
    for i, p in enumerate(ids):
        if len(p) > limit:
            if not cfg.truncate_prompt:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with {cfg.gen_length} new tokens the "
                    f"context of {context} leaves {limit} (set truncate_prompt=True to keep its "
                    f"last {limit} tokens, or lower max_new_tokens)"
                )
            p = p[-limit:]
        out.append(p)
    return out, cfg


def prepare_prompts(
    prompts: Sequence[str | Sequence[int]],
    tokenizer,
    family: Family,
    cfg: DecodeConfig,
    context: int,
) -> list[list[int]]:
    """Token ids of every prompt, checked to fit `context` with the answer (`fit_to_context`)."""
    return fit_to_context(encode_prompts(prompts, tokenizer, family, cfg), cfg, context)[0]


def model_context(model, cfg: DecodeConfig) -> int:
    """Positions available to prompt + answer: `cfg.max_length`, at most the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if cfg.max_length is None:
        return limit or 2**31
    if limit is not None and cfg.max_length > limit:
        raise ValueError(
            f"max_length={cfg.max_length} is larger than the model's context "
            f"(max_position_embeddings={limit})"
        )
    return cfg.max_length


def _check_model(family: Family, cfg: DecodeConfig, vocab: int, prompts: list[list[int]]):
    if cfg.strategy in CAUSAL_STRATEGIES:
        if not family.causal:
            raise ValueError(
                f"strategy {cfg.strategy!r} needs an autoregressive model, got a {family.name} dLLM"
            )
    else:
        if family.causal:
            raise ValueError(
                f"strategy {cfg.strategy!r} needs a dLLM; this model is autoregressive"
            )
        if family.mask_token_id is None:
            raise ValueError("the model has no mask token id (mask_token_id in config.json)")
        if family.block_size is not None:
            if cfg.strategy not in BLOCK_CAUSAL_STRATEGIES:
                raise ValueError(
                    f"strategy {cfg.strategy!r} attends bidirectionally; a {family.name} model "
                    f"was trained block-causal: use one of {sorted(BLOCK_CAUSAL_STRATEGIES)}"
                )
            if cfg.block_size != family.block_size:
                warnings.warn(
                    f"block_size={cfg.block_size} but the {family.name} model was trained with "
                    f"blocks of {family.block_size} (bd_size in config.json)",
                    UserWarning,
                    stacklevel=3,
                )
    for i, p in enumerate(prompts):
        bad = next(((j, t) for j, t in enumerate(p) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(
                f"prompt {i}: token id {bad[1]} (position {bad[0]}) is outside the "
                f"vocabulary [0, {vocab})"
            )
        mask = family.mask_token_id
        if mask is not None and mask in p:
            where = [j for j, t in enumerate(p) if t == mask]
            warnings.warn(
                f"prompt {i} contains the mask token id {mask} at positions {where[:8]}: the "
                "model treats them as undecoded positions and fills them in",
                UserWarning,
                stacklevel=3,
            )


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
    `record=True` keeps them in `out.trace` (for `d2f.render`). Warns (RuntimeWarning) when the
    model produced NaN or infinite logits: such answers are meaningless.
    """
    cfg = dataclasses.replace(config or DecodeConfig(), **overrides)
    family = family_of(model)
    check_attention(getattr(model.config, "_attn_implementation", None), "the model's attention")
    context = model_context(model, cfg)
    ids = encode_prompts(prompts, tokenizer, family, cfg)
    _check_model(family, cfg, model.config.vocab_size, ids)
    ids, cfg = fit_to_context(ids, cfg, context)
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
        # NOTE: inference mode, not just no_grad: no version counters or view tracking on any
        # tensor made inside (about 10% of a model call of the miniature world's student on CPU)
        with torch.inference_mode():
            DECODERS[cfg.strategy](model, ids, cfg, family, rec)
    finally:
        if was_training:
            model.train()
    _warn_nonfinite(rec)
    return _output(rec, family, tokenizer, trace, cfg.max_new_tokens)


def _warn_nonfinite(rec: Recorder) -> None:
    bad = int(rec.nonfinite_forwards)  # NOTE: the call's one extra host sync, after decoding
    if bad:
        warnings.warn(
            f"the model produced NaN or infinite logits in {bad} of {rec.forwards} forwards: "
            "the answers are meaningless (a NaN argmax is token 0). Check the weights (a "
            "diverged or corrupted checkpoint or adapter) and the dtype (float16 overflow)",
            RuntimeWarning,
            stacklevel=3,
        )


def _output(rec: Recorder, family: Family, tokenizer, trace, cap: int) -> DecodeOutput:
    """Answers cut to `cap` tokens (the buffer holds whole blocks) and before the first end."""
    answers = [a[:cap] for a in rec.answers.tolist()]
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
