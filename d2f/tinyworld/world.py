"""Building the miniature world's files: training data, tokenizer, and model configs to train from.

Everything is deterministic by (level, seed, n_train) and written in the original formats the
8B pipeline reads: question/answer JSONL for `d2f.data`, an HF tokenizer, an LLaDA `config.json`
(the teacher) and a plain Llama `config.json` (the AR baseline), each beside its tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from d2f.family import SPECS
from d2f.tiny import ar_config, llada_config
from d2f.tinyworld.task import records
from d2f.tinyworld.tokenizer import train_tokenizer


@dataclass(frozen=True)
class WorldSpec:
    """What the world is made of. Its JSON is part of every cache key."""

    level: str = "add2"  # d2f.tinyworld.task level
    seed: int = 0  # data, split and init seed
    n_train: int = 20_000  # training records (fresh wording over the train operand pairs)
    d_model: int = 64  # model width (teacher and AR alike)
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden_size: int = 192
    max_length: int = 48  # training sequence length (prompt + answer + end + padding)
    # NOTE: LLaDA's 500000 leaves a 16-dim head almost no positional resolution over 48 tokens
    # (the teacher then miscopies digits); the standard 10000 gives it.
    rope_theta: float = 10000.0

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# The worlds by name. `add2` is the first edition (one step, ~16 answer tokens: small and fast, the
# test suite's world); `chain` the second (4 dependent steps, ~42 answer tokens: D2F's regime).
WORLDS = {
    "add2": WorldSpec(),
    "chain": WorldSpec(
        level="chain",
        n_train=100_000,
        d_model=96,
        n_layers=3,
        n_heads=4,
        mlp_hidden_size=288,
        max_length=80,
    ),
}


def preset(world: str, kind: str) -> str:
    """The train preset of a world's model (`teacher`, `ar`, `student`): `d2f/configs/train/`."""
    return f"tinyworld_{kind}" if world == "add2" else f"tinyworld_{world}_{kind}"


@dataclass(frozen=True)
class World:
    data: Path  # train.jsonl (question, answer)
    teacher_init: Path  # LLaDA config.json + tokenizer, no weights (model.init=scratch)
    ar_init: Path  # Llama config.json + tokenizer, no weights


def build_world(out: str | Path, spec: WorldSpec = WorldSpec()) -> World:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = records(spec.level, "train", n=spec.n_train, seed=spec.seed)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    tok = train_tokenizer(r["question"] + " " + r["answer"] for r in train)
    sizes = {"n_layers": spec.n_layers, "n_heads": spec.n_heads}
    teacher = llada_config(
        len(tok),
        tok.mask_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
        d_model=spec.d_model,
        mlp_hidden_size=spec.mlp_hidden_size,
        max_sequence_length=128,
        rope_theta=spec.rope_theta,
        **sizes,
    )
    ar = ar_config(
        len(tok),
        tok.eos_token_id,
        tok.bos_token_id,
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        intermediate_size=spec.mlp_hidden_size,
        max_position_embeddings=128,
    )
    dirs = {}
    for name, raw in (("teacher_init", teacher), ("ar_init", ar)):
        d = out / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        SPECS["llada"].write_tokenizer(tok, d)  # LLaDA's tokenizer layout for both
        dirs[name] = d
    return World(data, dirs["teacher_init"], dirs["ar_init"])


def train_overrides(
    spec: WorldSpec,
    preset: str,
    model_path: Path,
    data: Path,
    output_dir: Path,
    threads: int,
    steps: int | None = None,
) -> list[str]:
    """Hydra overrides of `d2f/configs/tiny.yaml` that train on the world with `train=<preset>`."""
    overrides = [
        f"train={preset}",
        f"model.path={model_path}",
        f"data.sources=[{data}]",
        "data.answer_field=answer",
        f"data.max_length={spec.max_length}",
        f"train.output_dir={output_dir}",
        f"train.threads={threads}",
        f"train.seed={spec.seed}",
    ]
    return overrides + ([] if steps is None else [f"train.max_steps={steps}"])
