"""A synthetic task in GSM8K's format: short word problems, a worked answer, a final `#### N`.

Deterministic by seed. Levels:
- `add1`: one-digit addition (a, b in 1..9; only 81 facts: close to memorisation);
- `add2`: addition of numbers in 1..99 (the default);
- `multi`: add then subtract, two steps (for bigger runs: not learnable by the tiny teacher in
  minutes, see docs/tinyworld.md, sizing).
The held-out split holds out OPERAND TUPLES, not just prompt texts: no (a, b[, c]) of the held-out
split appears in training with any wording, so held-out accuracy measures generalisation to unseen
sums of seen numbers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

LEVELS = ("add1", "add2", "multi")
NAMES = ("tom", "ann", "sam", "kim", "max", "eva")
OBJECTS = ("apples", "books", "coins", "pens", "cats", "cards")
GAIN = ("gets", "buys", "finds")
LOSS = ("gives away", "loses", "sells")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # worked answer ending in "#### N"
    result: int


def _operands(level: str) -> list[tuple[int, ...]]:
    if level == "add1":
        return [(a, b) for a in range(1, 10) for b in range(1, 10)]
    if level == "add2":
        return [(a, b) for a in range(1, 100) for b in range(1, 100)]
    if level == "multi":
        return [(a, b, c) for a in range(1, 50) for b in range(1, 50) for c in range(1, a + b + 1)]
    raise ValueError(f"unknown level {level!r}; levels: {', '.join(LEVELS)}")


def split_operands(
    level: str, seed: int = 0, held_out: float = 0.1
) -> dict[str, list[tuple[int, ...]]]:
    """Operand tuples of each split: a seeded shuffle, the first `held_out` fraction held out."""
    ops = _operands(level)
    random.Random(f"{level}-{seed}").shuffle(ops)
    n = max(1, int(len(ops) * held_out))
    return {"test": ops[:n], "train": ops[n:]}


def render(ops: tuple[int, ...], rng: random.Random) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    if len(ops) == 2:
        a, b = ops
        gain = rng.choice(GAIN)
        q = f"{name} has {a} {obj} and {gain} {b} more . how many {obj} does {name} have now ?"
        r = a + b
        ans = f"{name} has {a} + {b} = {r} {obj} . #### {r}"
    else:
        a, b, c = ops
        gain, loss = rng.choice(GAIN), rng.choice(LOSS)
        q = (
            f"{name} has {a} {obj} , {gain} {b} more and then {loss} {c} . "
            f"how many {obj} does {name} have now ?"
        )
        s, r = a + b, a + b - c
        ans = f"{name} has {a} + {b} = {s} {obj} . then {s} - {c} = {r} . #### {r}"
    return Problem(q, ans, r)


def problems(
    level: str = "add2", split: str = "train", n: int | None = None, seed: int = 0
) -> Iterator[Problem]:
    """Problems of a split. `train` cycles through its operand tuples in a seeded order with fresh
    wording (n required); `test` gives each held-out tuple once (first n, or all)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ops = split_operands(level, seed)[split]
    rng = random.Random(f"{level}-{seed}-{split}-text")
    if split == "test":
        for o in ops[: n or len(ops)]:
            yield render(o, rng)
        return
    if n is None:
        raise ValueError("the train split is endless: give n")
    order = random.Random(f"{level}-{seed}-order")
    for i in range(n):
        if i % len(ops) == 0:
            order.shuffle(ops)
        yield render(ops[i % len(ops)], rng)


def records(
    level: str = "add2", split: str = "train", n: int | None = None, seed: int = 0
) -> list[dict]:
    """`question` / `answer` dicts (the trainer's and lm-eval's record format)."""
    return [{"question": p.question, "answer": p.answer} for p in problems(level, split, n, seed)]
