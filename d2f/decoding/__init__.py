"""Decoding: D2F pipelined parallel decoding, the slow reference, and the baselines.

`generate(model, prompts, DecodeConfig(...), tokenizer=...)` runs any strategy and returns a
`DecodeOutput` (tokens, texts, stats, optional step trace).
"""

from d2f.decoding.api import DECODERS, encode_prompts, fit_to_context, generate, prepare_prompts
from d2f.decoding.config import (
    STRATEGIES,
    BlockState,
    DecodeConfig,
    DecodeOutput,
    DecodeStats,
    RowStats,
    StepEvent,
)
from d2f.decoding.d3llm import D3LLMOptions
from d2f.decoding.dinfer import DInferOptions
from d2f.decoding.fast_dllm import FastDLLMOptions
from d2f.decoding.fast_dllm_v2 import FastDLLMv2Options
from d2f.decoding.freedave import FreeDaveOptions
from d2f.decoding.jacobi import JacobiOptions
from d2f.decoding.sched import ProphetOptions, SchEDOptions

__all__ = [
    "D3LLMOptions",
    "DECODERS",
    "DInferOptions",
    "STRATEGIES",
    "BlockState",
    "DecodeConfig",
    "DecodeOutput",
    "DecodeStats",
    "FastDLLMOptions",
    "FastDLLMv2Options",
    "FreeDaveOptions",
    "JacobiOptions",
    "ProphetOptions",
    "RowStats",
    "SchEDOptions",
    "StepEvent",
    "encode_prompts",
    "fit_to_context",
    "generate",
    "prepare_prompts",
]
