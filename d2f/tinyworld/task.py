"""A synthetic task in GSM8K's format: short word problems, a worked answer, a final `#### N`.

Deterministic by seed. Levels:
- `add1`: one-digit addition (a, b in 1..9; only 81 facts: close to memorisation);
- `add2`: addition of numbers in 1..99 (the default);
- `multi`: add then subtract, two steps (for bigger runs: not learnable by the tiny teacher in
  minutes, see docs/tinyworld.md, sizing);
- `chain`: the second edition's task, a chain of `CHAIN_STEPS` dependent steps, each adding or
  subtracting a one-digit number to the previous result ("47 + 5 = 52 . 52 - 8 = 44 . ..."),
  every value kept in 10..99 so that each step is two digits in, two digits out (the answer's
  layout is fixed; its arithmetic is not). About 42 answer tokens with the end token.
The held-out split holds out OPERAND TUPLES, not just prompt texts: no (a, b[, c]) of the held-out
split appears in training with any wording, so held-out accuracy measures generalisation to unseen
sums of seen numbers. `chain` has too many sequences to enumerate: a tuple is held out when its
hash says so (`_held_out`), so no held-out operand sequence is ever a training one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

LEVELS = ("add1", "add2", "multi", "chain")
CHAIN_STEPS = 4  # dependent steps of a `chain` problem
CHAIN_RANGE = (10, 99)  # every value of a chain (start and each result)
NAMES = ("tom", "ann", "sam", "kim", "max", "eva")
OBJECTS = ("apples", "books", "coins", "pens", "cats", "cards")
GAIN = ("gets", "buys", "finds")
LOSS = ("gives away", "loses", "sells")
CHAIN_GAIN = (
    "gets",
    "buys",
    "finds",
    "wins",
)  # one token each: the chain's question layout is fixed
CHAIN_LOSS = ("loses", "sells", "eats", "drops")


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
    if level == "chain":
        raise ValueError("the chain level has no operand list (held-out by hash): use problems()")
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


def chain_values(ops: tuple[int, ...]) -> list[int]:
    """The running values of a chain: start, then each result (`ops` = start, signed steps)."""
    values = [ops[0]]
    for step in ops[1:]:
        values.append(values[-1] + step)
    return values


def _chain(rng: random.Random) -> tuple[int, ...]:
    """A random chain: a start in CHAIN_RANGE, then CHAIN_STEPS signed one-digit steps whose running
    value stays in CHAIN_RANGE (the sign is forced where the other would leave it)."""
    lo, hi = CHAIN_RANGE
    value = rng.randint(lo, hi)
    ops = [value]
    for _ in range(CHAIN_STEPS):
        c = rng.randint(1, 9)
        sign = rng.choice((1, -1))
        if not lo <= value + sign * c <= hi:
            sign = -sign
        value += sign * c
        ops.append(sign * c)
    return tuple(ops)


def _held_out(ops: tuple[int, ...], seed: int, held_out: float = 0.1) -> bool:
    digest = hashlib.sha256(f"chain-{seed}-{ops}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < held_out * 2**64


def render(ops: tuple[int, ...], rng: random.Random) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    if len(ops) == 1 + CHAIN_STEPS:
        values = chain_values(ops)
        verbs = [rng.choice(CHAIN_GAIN if c > 0 else CHAIN_LOSS) for c in ops[1:]]
        moves = [f"{v} {abs(c)}" for v, c in zip(verbs, ops[1:], strict=True)]
        q = (
            f"{name} has {ops[0]} {obj} , {' , '.join(moves[:-1])} and {moves[-1]} . "
            f"how many {obj} does {name} have now ?"
        )
        steps = [
            f"{a} {'+' if c > 0 else '-'} {abs(c)} = {b} ."
            for a, c, b in zip(values[:-1], ops[1:], values[1:], strict=True)
        ]
        r = values[-1]
        ans = f"{name} has {ops[0]} {obj} . {' '.join(steps)} #### {r}"
        return Problem(q, ans, r)
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
    if level == "chain":
        yield from _chain_problems(split, n, seed)
        return
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


def _chain_problems(split: str, n: int | None, seed: int) -> Iterator[Problem]:
    """`chain` problems: random chains, kept when their hash puts them in `split`. `test` gives the
    first n distinct held-out chains (n required: the split is too large to list)."""
    if n is None:
        raise ValueError(f"the chain level's {split} split is too large to list: give n")
    draw = random.Random(f"chain-{seed}-{split}-ops")
    rng = random.Random(f"chain-{seed}-{split}-text")
    seen: set[tuple[int, ...]] = set()
    made = 0
    while made < n:
        ops = _chain(draw)
        if _held_out(ops, seed) != (split == "test") or (split == "test" and ops in seen):
            continue
        seen.add(ops)
        made += 1
        yield render(ops, rng)


def records(
    level: str = "add2", split: str = "train", n: int | None = None, seed: int = 0
) -> list[dict]:
    """`question` / `answer` dicts (the trainer's and lm-eval's record format)."""
    return [{"question": p.question, "answer": p.answer} for p in problems(level, split, n, seed)]
