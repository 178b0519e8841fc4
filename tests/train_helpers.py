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


def kill_and_resume(objective: str, config, tmp_path: Path, monkeypatch, lora: bool = True) -> None:
    """Assert that a run of `objective` killed inside step 7 (checkpoints at 3 and 6) and resumed
    with resume=auto logs the same numbers at every step and ends with the same adapter as one
    uninterrupted run. `config(output_dir, *overrides)` builds the RunConfig. LoRA dropout is on,
    so the RNG states are restored too; a half-written checkpoint directory is ignored. `lora`:
    compare the adapters (else every weight of the fully fine-tuned model)."""
    import dataclasses

    from safetensors.torch import load_file

    from d2f.checkpoint import list_checkpoints
    from d2f.objectives import OBJECTIVES
    from d2f.train import main

    opts = ("train.max_steps=9", "train.save_every=3", "train.lora.dropout=0.1")
    main(config(tmp_path / "straight", *opts))
    calls = {"n": 0}
    original = OBJECTIVES[objective]

    def dies_in_step_7(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return original.step(*args)

    monkeypatch.setitem(OBJECTIVES, objective, dataclasses.replace(original, step=dies_in_step_7))
    run = tmp_path / "resumed"
    try:
        main(config(run, *opts))
        raise AssertionError("the run was not killed")
    except KeyboardInterrupt:
        pass
    monkeypatch.setitem(OBJECTIVES, objective, original)
    (run / ".checkpoint-000009.tmp" / "state").mkdir(parents=True)  # a save cut short
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000003", "checkpoint-000006"]
    main(config(run, *opts))
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 10))
    timing = {"ms_per_step", "tokens_per_s"}
    for a, b in zip(straight, resumed, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }, (a, b)
    name = "checkpoint-000009/" + (
        "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    )
    want, got = load_file(tmp_path / "straight" / name), load_file(run / name)
    assert want.keys() == got.keys()
    assert all(bool((want[k] == got[k]).all()) for k in want)
