"""Helpers of the trainer tests: a tiny teacher worth distilling, configs, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from d2f.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_QA = REPO / "tests" / "data" / "tiny_qa.jsonl"


def write_sharp_teacher(out: Path, family: str = "llada") -> Path:
    """A tiny random checkpoint whose predictions depend strongly on the context.

    A plain random init (std 0.02) predicts a near-uniform distribution whatever it attends to, so
    the block-causal student already matches the bidirectional teacher (KL ~2e-4): nothing to
    distil. Scaling q/k by 5 (sharper attention) and the head by 50 (sharper outputs) gives a KL of
    ~0.5 nats per masked token at the start, in the original format like any other checkpoint.
    """
    from d2f.models import load_model, save_model
    from d2f.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(out, family, seed=0)
    model, _ = load_model(out)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(5.0)
            if "lm_head" in name:
                param.mul_(50.0)
    save_model(model, out)  # weights and config.json; the tokenizer files stay as written
    return out


def tiny_config(model_path: Path, output_dir: Path, *overrides: str) -> RunConfig:
    """The `tiny` preset on `model_path`, writing to `output_dir`, data from tests/data."""
    return load_config(
        "tiny",
        [
            f"model.path={model_path}",
            f"train.output_dir={output_dir}",
            f"data.sources=[{TINY_QA}]",
            f"data.cache_dir={output_dir.parent / 'hf_datasets_cache'}",
            *overrides,
        ],
    )


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)
