"""Side-by-side timing of the leaderboard's rows: one process, the same prompts, strategies alternated.

On a noisy machine, rows timed minutes apart are not comparable (the first edition's D2F/AR ratio
moved from 0.91x to 2.1x between runs). `race` loads every model once, then runs `repeats` rounds.
At batch 1 the rows alternate prompt by prompt: each prompt is decoded by every row in turn (the
order rotated from prompt to prompt, so no row always runs first) before the next prompt, and a
row's time on a prompt is its best over the rounds (its least disturbed run); its batch-1 time is
the sum over prompts. At the large batch every row decodes the batch questions (in batches of
`big`) one row after another, and a row's time is its best round. So every ratio in the table
comes from runs milliseconds to seconds apart. Prompts are the held-out questions under the
model's chat template, one BOS, as the lm-eval model (`d2f.lmeval.lm`) builds them.
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
    names = [e.name for e in entries]
    b1 = {name: [float("inf")] * len(questions) for name in names}  # best wall per prompt
    b1_tokens = {name: [0] * len(questions) for name in names}
    big_s = dict.fromkeys(names, float("inf"))
    big_tokens = dict.fromkeys(names, 0)
    total = repeats * (len(questions) + 1) * len(entries)
    with tqdm(total=total, desc="side-by-side timing", dynamic_ncols=True) as bar:
        for _ in range(repeats):
            for i in range(len(questions)):
                k = i % len(entries)
                for entry in [*entries[k:], *entries[:k]]:  # rotated: no row always first
                    wall, tokens = _timed(
                        models[entry.model][0], ids[entry.model][0][i : i + 1], entry.config, 1
                    )
                    b1[entry.name][i] = min(b1[entry.name][i], wall)
                    b1_tokens[entry.name][i] = tokens
                    bar.update(1)
            for entry in entries:
                wall, tokens = _timed(
                    models[entry.model][0], ids[entry.model][1], entry.config, big
                )
                big_s[entry.name], big_tokens[entry.name] = min(big_s[entry.name], wall), tokens
                bar.update(1)
    return {
        name: {
            "tps_b1": sum(b1_tokens[name]) / sum(b1[name]),
            "latency_b1_s": sum(b1[name]) / len(questions),
            "tps_big": big_tokens[name] / big_s[name],
        }
        for name in names
    }
