"""Side-by-side timing of the leaderboard's rows: one process, the same prompts, strategies alternated.

On a noisy machine, rows timed minutes apart are not comparable (the first edition's D2F/AR ratio
moved from 0.91x to 2.1x between runs). `race` loads every model once, then runs `repeats` rounds;
in each round every row decodes the same prompts, one row after another, at batch 1 (each prompt
alone) and at the large batch (all prompts in batches of `big`). A row's time is its best round
(the least disturbed one), so every ratio in the table comes from rounds that ran within seconds
of each other. Prompts are the held-out questions under the model's chat template, one BOS, as the
lm-eval model (`d2f.lmeval.lm`) builds them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Entry:
    """One row to time: its name, the model it runs on (a key of `models`) and its DecodeConfig."""

    name: str
    model: str
    config: object  # d2f.decoding.DecodeConfig


def prompt_ids(tokenizer, question: str) -> list[int]:
    """A question under the chat template, with exactly one BOS (as d2f.lmeval.lm encodes it)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and ids[:1] == [bos]:
        ids = ids[1:]
    return ids if bos is None else [bos, *ids]


def _timed(model, prompts: list[list[int]], config, batch: int) -> tuple[float, int]:
    from d2f.decoding import generate

    wall, tokens = 0.0, 0
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        out = generate(model, prompts[i : i + batch], config)
        wall += time.perf_counter() - t0
        tokens += out.stats.tokens
    return wall, tokens


def race(
    entries: Sequence[Entry],
    models: dict,  # name -> (model, tokenizer)
    questions: Sequence[str],
    batch_questions: Sequence[str],
    big: int,
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """{row name: {tps_b1, latency_b1_s, tps_big}}: best of `repeats` alternated rounds.

    `questions` are decoded one at a time (batch 1), `batch_questions` in batches of `big`.
    """
    ids = {
        name: (
            [prompt_ids(tok, q) for q in questions],
            [prompt_ids(tok, q) for q in batch_questions],
        )
        for name, (_, tok) in models.items()
    }
    best: dict[str, dict[str, float]] = {}
    total = repeats * len(entries) * 2
    with tqdm(total=total, desc="side-by-side timing", dynamic_ncols=True) as bar:
        for _ in range(repeats):
            for entry in entries:
                model = models[entry.model][0]
                small, large = ids[entry.model]
                wall1, tok1 = _timed(model, small, entry.config, 1)
                bar.update(1)
                wall_b, tok_b = _timed(model, large, entry.config, big)
                bar.update(1)
                cur = best.setdefault(entry.name, {"b1_s": wall1, "big_s": wall_b})
                cur["b1_s"], cur["big_s"] = min(cur["b1_s"], wall1), min(cur["big_s"], wall_b)
                cur["b1_tokens"], cur["big_tokens"] = tok1, tok_b
    return {
        name: {
            "tps_b1": t["b1_tokens"] / t["b1_s"],
            "latency_b1_s": t["b1_s"] / len(questions),
            "tps_big": t["big_tokens"] / t["big_s"],
        }
        for name, t in best.items()
    }
