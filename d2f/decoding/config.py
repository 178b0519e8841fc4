"""Decoding configuration and output types, shared by every strategy."""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import numbers
import tokenize
import typing
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

import torch

Strategy = Literal[
    "d2f",
    "cache_only",
    "vanilla",
    "fast_dllm",
    "ar",
    "reference",
    "d3llm",
    "fast_dllm_v2",
    "freedave",
    "sched",
    "prophet",
    "dinfer",
    "jacobi",
]
STRATEGIES: tuple[str, ...] = (
    "d2f",
    "cache_only",
    "vanilla",
    "fast_dllm",
    "ar",
    "reference",
    "d3llm",
    "fast_dllm_v2",
    "freedave",
    "sched",
    "prophet",
    "dinfer",
    "jacobi",
)


# A strategy with settings of its own registers one small frozen dataclass here (its name ->
# the class), so that DecodeConfig does not grow one flat field per method's knob. The fields of
# DecodeConfig itself are the ones every strategy shares.
STRATEGY_OPTIONS: dict[str, type] = {}


def strategy_options(strategy: str):
    """Class decorator: register `cls` as the options dataclass of `strategy`."""

    def register(cls):
        if strategy in STRATEGY_OPTIONS:
            raise ValueError(
                f"strategy {strategy!r} already has options {STRATEGY_OPTIONS[strategy]}"
            )
        STRATEGY_OPTIONS[strategy] = cls
        return cls

    return register


def parse_options(strategy: str, items: list[str]) -> dict:
    """`["cache=dual", "threshold=0.9"]` (CLI / model-args text) -> a dict typed by the fields of
    `strategy`'s options class (int, float, bool, str or Literal), for `DecodeConfig(options=)`."""
    cls = STRATEGY_OPTIONS.get(strategy)
    if not items:
        return {}
    if cls is None:
        raise ValueError(f"strategy {strategy!r} takes no options, got {items}")
    hints = typing.get_type_hints(cls)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(
                f"{strategy} option {item!r}: expected KEY=VALUE with KEY in {sorted(hints)}"
            )
        out[key] = _parse_value(key, text, hints[key])
    return out


def _parse_value(key: str, text: str, hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    if typing.get_origin(hint) is typing.Literal:
        if text not in [str(a) for a in args]:
            raise ValueError(f"option {key} must be one of {args}, got {text!r}")
        return next(a for a in args if str(a) == text)
    kinds = [a for a in (*args, hint) if a in (bool, int, float, str)]
    kind = kinds[0] if kinds else str
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"option {key} must be true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"option {key} must be {kind.__name__}, got {text!r}") from None


KV_CACHES = ("dynamic", "static")
# those that take kv_cache="static"
STATIC_STRATEGIES = ("d2f", "cache_only", "fast_dllm", "ar", "dinfer")
COMPILE_MODES = ("off", "eager", "default", "reduce-overhead")  # eager: dynamo tracing only
CompileMode = Literal["off", "eager", "default", "reduce-overhead"]
PAPER_MAX_NEW_TOKENS = 512  # the paper's generation cap (Table 8: D2F-LLaDA; D2F-Dream uses 256)
_INTS = ("block_size", "top_k")  # int fields
_OPTIONAL_INTS = ("max_new_tokens", "seed", "max_length", "steps_per_block")  # int or None
_REALS = ("tau_add", "tau_act", "tau_conf", "temperature", "top_p")  # finite real numbers
_BOOLS = ("truncate_prompt",)
_OPTIONAL_BOOLS = ("chat",)


@dataclass
class DecodeConfig:
    """How to decode. Defaults follow the paper (tau_conf 0.9, tau_add 0.1, tau_act 0.95).

    NOTE: every field's one-line comment is its `python -m d2f.generate --help` text.
    """

    strategy: Strategy = "d2f"  # which decoder; all return the same DecodeOutput
    block_size: int = 32  # tokens per block (> 0)
    max_new_tokens: int | None = None  # answer cap; None = most whole blocks that fit, <= 512
    tau_add: float = 0.1  # [0, 1] add a block when the last one's decoded fraction >= this
    tau_act: float = 0.95  # [0, 1] fully activate a block when its predecessor's fraction >= this
    tau_conf: float = 0.9  # [0, 1] commit a prediction whose probability is > this
    confidence: Literal["prob", "margin", "entropy"] = "prob"  # score of the fallback commit
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples
    top_p: float = 1.0  # (0, 1] nucleus sampling when temperature > 0
    top_k: int = 0  # >= 0; 0 = off
    seed: int | None = None  # seed of the sampling generator (temperature > 0)
    chat: bool | None = None  # apply the chat template to string prompts; None = family default
    max_length: int | None = None  # sequence limit (prompt + answer); None = model's context
    truncate_prompt: bool = False  # left-truncate prompts that leave no room for the answer
    steps_per_block: int | None = None  # vanilla: denoising steps per block (None = block_size)
    remasking: Literal["low_confidence", "random"] = "low_confidence"  # vanilla / fast_dllm
    options: object = None  # the strategy's own settings (dict or options class); None = defaults
    kv_cache: Literal["dynamic", "static"] = "dynamic"  # STATIC_STRATEGIES: KV cache kind
    compile: CompileMode = "off"  # d2f/cache_only: the step under torch.compile (static cache)

    def __post_init__(self):
        self._check_types()
        self.options = self._resolve_options()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < self.block_size:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be >= block_size ({self.block_size})"
            )
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {self.max_length}")
        for name in ("tau_add", "tau_act", "tau_conf"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.confidence not in ("prob", "margin", "entropy"):
            raise ValueError(f"confidence must be prob, margin or entropy, got {self.confidence!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.steps_per_block is not None and not 1 <= self.steps_per_block <= self.block_size:
            raise ValueError(
                f"steps_per_block must be in [1, block_size={self.block_size}], "
                f"got {self.steps_per_block}"
            )
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking must be low_confidence or random, got {self.remasking!r}")
        self._check_engine()

    def _check_engine(self) -> None:
        """kv_cache / compile: known values, on the strategies that implement them."""
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.kv_cache == "static" and self.strategy not in STATIC_STRATEGIES:
            raise ValueError(
                f"kv_cache='static' is implemented for {STATIC_STRATEGIES}, not {self.strategy!r}"
            )
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.compile != "off":
            if self.strategy not in ("d2f", "cache_only"):
                raise ValueError(
                    f"compile is implemented for d2f and cache_only, not {self.strategy!r}"
                )
            if self.kv_cache != "static":
                raise ValueError("compile needs kv_cache='static' (fixed shapes across steps)")
            if self.temperature > 0:
                raise ValueError("compile supports greedy decoding (temperature 0) only")

    def _resolve_options(self):
        """`options` as the strategy's options dataclass: None -> its defaults, a dict -> built
        from it (unknown keys fail, naming the strategy's fields); no options for a strategy that
        has none."""
        cls = STRATEGY_OPTIONS.get(self.strategy)
        opts = self.options
        if cls is None:
            if opts not in (None, {}):
                raise ValueError(f"strategy {self.strategy!r} takes no options, got {opts!r}")
            return None
        if opts is None:
            return cls()
        if isinstance(opts, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(opts) - known)
            if unknown:
                raise ValueError(
                    f"unknown {self.strategy} options {unknown}; known: {sorted(known)}"
                )
            return cls(**opts)
        if not isinstance(opts, cls):
            raise TypeError(
                f"options of strategy {self.strategy!r} must be a dict or {cls.__name__}, "
                f"got {type(opts).__name__}"
            )
        return opts

    def _check_types(self) -> None:
        """TypeError naming the field for a value of the wrong type (bool is not an int here)."""

        def fail(name: str, want: str) -> None:
            value = getattr(self, name)
            raise TypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")

        def is_int(value) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        for name in _INTS:
            if not is_int(getattr(self, name)):
                fail(name, "an int")
        for name in _OPTIONAL_INTS:
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                fail(name, "an int or None")
        for name in _REALS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                fail(name, "a number")
            if not math.isfinite(value):  # nan, inf: softmax and sampling would be meaningless
                raise ValueError(f"{name} must be a finite number, got {value}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        for name in _OPTIONAL_BOOLS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                fail(name, "True, False or None")

    def _resolved(self) -> int:
        if self.max_new_tokens is None:
            raise ValueError(
                "max_new_tokens is None (= fit the context): resolve it with "
                "d2f.decoding.fit_to_context first (generate does)"
            )
        return self.max_new_tokens

    @property
    def num_blocks(self) -> int:
        """Answer blocks: enough whole blocks to hold max_new_tokens."""
        return -(-self._resolved() // self.block_size)

    @property
    def gen_length(self) -> int:
        """Columns of the answer buffer (whole blocks); answers are cut to max_new_tokens."""
        return self.block_size * self.num_blocks


def field_help() -> dict[str, str]:
    """Each `DecodeConfig` field's one-line comment in this file's source (the CLI help)."""
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(DecodeConfig)).readline)
    helps, line_field = {}, None
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 4 and line_field is None:
            line_field = tok.string  # a name at class-body indentation starts a field line
        elif tok.type == tokenize.COMMENT and line_field is not None:
            helps[line_field] = tok.string.lstrip("#").strip()
        elif tok.type in (tokenize.NEWLINE, tokenize.NL):
            line_field = None
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    return {name: text for name, text in helps.items() if name in fields}


class BlockState(IntEnum):
    """The state of one answer block in the D2F pipeline (paper Sec. 3.3)."""

    ABSENT = 0  # not added yet
    SEMI = 1  # semi-activated: commits only above tau_conf
    FULL = 2  # fully activated: commits at least one token per step


@dataclass
class RowStats:
    """Counts for one prompt."""

    forwards: int  # model calls this row took part in (a prompt-only call included, if any)
    tokens: int  # generated tokens returned (cut before the first end token)
    tokens_with_end: int  # ... up to and including the first end token: the TPF numerator
    hit_end: bool  # whether an end token was generated

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens_with_end / max(self.forwards, 1)


@dataclass
class DecodeStats:
    """Counts and times of one `generate` call."""

    forwards: int  # model calls (a batched call counts once)
    prefill_s: float  # wall time up to the end of the call that processed the prompt
    decode_s: float  # wall time of everything after it
    rows: list[RowStats] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rows)

    @property
    def tokens_with_end(self) -> int:
        return sum(r.tokens_with_end for r in self.rows)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_forward(self) -> float:
        """Per sequence: generated tokens (up to and including each first end token) over the
        forwards each sequence took part in (a batched call counts once per row in it)."""
        return self.tokens_with_end / max(sum(r.forwards for r in self.rows), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.total_s, 1e-9)

    def summary(self) -> str:
        return (
            f"{len(self.rows)} rows, {self.tokens} tokens, {self.forwards} forwards, "
            f"{self.tokens_per_forward:.2f} tokens/forward, {self.tokens_per_second:.1f} tokens/s "
            f"(prefill {self.prefill_s * 1e3:.0f} ms, decode {self.decode_s * 1e3:.0f} ms)"
        )


@dataclass
class StepEvent:
    """What one decoding step did, for streaming and for the decode picture (d2f.render).

    Tensors cover the active rows (`rows` are their indices in the input batch) and the answer
    region: column j is answer token j. `block_state` holds `BlockState` codes (this module).
    """

    step: int
    rows: torch.Tensor  # (B_active,) long, indices into the prompt list
    answer: torch.Tensor  # (B_active, G) long, answer tokens after this step (mask id = undecoded)
    committed: torch.Tensor  # (B_active, G) bool, positions committed in this step
    block_state: torch.Tensor | None  # (B_active, NB) int8, block states during this step


@dataclass
class DecodeOutput:
    """Result of `generate`: tokens and texts per prompt, statistics, optional step trace."""

    tokens: list[list[int]]  # generated ids per prompt, cut before the first end token
    texts: list[str] | None  # decoded strings when a tokenizer was given
    stats: DecodeStats
    trace: list[StepEvent] | None = None  # per-step events when generate(record=True)
