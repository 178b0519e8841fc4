"""Speed statistics of an evaluation run: the paper's TPS / TPF / latency / length columns.

Per task and per rank, accumulated over `generate` calls:
- tokens: generated ids kept after the stop-string / end-token cut (prompt excluded);
- tokens_with_end: tokens, plus the end token where the decoder stopped on one (the TPF numerator);
- forwards: model calls each sample took part in (a batched call counts once per sample);
- wall_s: wall time of the generate calls (tokenisation, prefill and every step; no model loading).
Derived: tokens_per_second = tokens / wall_s (a ratio of totals, as in the paper),
tokens_per_forward = tokens_with_end / forwards, latency_s = mean wall time of the call a sample was
in, gen_length = mean tokens per sample.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class TaskSpeed:
    samples: int = 0
    tokens: int = 0
    tokens_with_end: int = 0
    forwards: int = 0
    wall_s: float = 0.0  # sum over generate calls of their wall time
    latency_sum_s: float = 0.0  # sum over samples of their call's wall time

    def add_call(self, wall_s: float, rows: list[tuple[int, int, int]]) -> None:
        """One generate call: wall time and (tokens, tokens_with_end, forwards) per sample."""
        self.wall_s += wall_s
        for tokens, with_end, forwards in rows:
            self.samples += 1
            self.tokens += tokens
            self.tokens_with_end += with_end
            self.forwards += forwards
            self.latency_sum_s += wall_s

    def merge(self, other: TaskSpeed) -> None:
        for name in ("samples", "tokens", "tokens_with_end", "forwards", "wall_s", "latency_sum_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self, parallel_ranks: int = 1) -> dict:
        """Totals and derived columns. Ranks run in parallel: their wall times overlap, so the
        merged TPS uses the wall time per rank (sum / ranks)."""
        wall = self.wall_s / max(parallel_ranks, 1)
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "tokens_with_end": self.tokens_with_end,
            "forwards": self.forwards,
            "wall_s": wall,
            "tokens_per_second": self.tokens / wall if wall > 0 else 0.0,
            "tokens_per_forward": self.tokens_with_end / max(self.forwards, 1),
            "latency_s": self.latency_sum_s / max(self.samples, 1),
            "gen_length": self.tokens / max(self.samples, 1),
        }


class SpeedLog:
    """Per-task speed of one rank; rank 0 writes all ranks merged into `d2f_speed.json`.

    A run directory holds one configuration (model args): a later task run into the same
    directory adds its tasks to the file (a task run again replaces its own entry), and a run
    with other model args is refused before the model loads (`check_same_run`).
    """

    def __init__(self) -> None:
        self.tasks: dict[str, TaskSpeed] = defaultdict(TaskSpeed)

    def state(self) -> dict:
        return {task: asdict(speed) for task, speed in self.tasks.items()}

    @staticmethod
    def merged(rank_states: list[dict], model_args: dict) -> dict:
        total: dict[str, TaskSpeed] = defaultdict(TaskSpeed)
        for state in rank_states:
            for task, fields in state.items():
                total[task].merge(TaskSpeed(**fields))
        ranks = len(rank_states)
        return {
            "model_args": model_args,
            "world_size": ranks,
            "tasks": {t: s.summary(parallel_ranks=ranks) for t, s in sorted(total.items())},
            "ranks": [
                {"rank": r, "tasks": {t: TaskSpeed(**f).summary() for t, f in sorted(st.items())}}
                for r, st in enumerate(rank_states)
            ],
        }

    @staticmethod
    def check_same_run(path: str | os.PathLike, model_args: dict) -> None:
        """Raise when `path` holds the speed of a run with other model args."""
        path = Path(path)
        if not path.exists():
            return
        old = _read(path).get("model_args", {})
        differ = sorted(k for k in {*old, *model_args} if old.get(k) != model_args.get(k))
        if differ:
            raise ValueError(
                f"{path} belongs to a run with other model args (differing: "
                + ", ".join(f"{k}={old.get(k)!r} there, {model_args.get(k)!r} here" for k in differ)
                + "); give this run its own --output_path"
            )

    @staticmethod
    def write(path: str | os.PathLike, payload: dict) -> Path:
        """Atomic JSON write (temp file + rename), keeping the tasks an earlier file there has
        and this payload has not (per rank too)."""
        path = Path(path)
        if path.exists():
            payload = _keep_earlier_tasks(_read(path), payload)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); move it away to start afresh") from None


def _keep_earlier_tasks(old: dict, new: dict) -> dict:
    """`new` plus the tasks of `old` it does not have, overall and in each rank's entry."""
    merged = {**new, "tasks": {**old.get("tasks", {}), **new["tasks"]}}
    old_ranks = {r["rank"]: r["tasks"] for r in old.get("ranks", [])}
    new_ranks = {r["rank"]: r["tasks"] for r in new.get("ranks", [])}
    merged["ranks"] = [
        {"rank": r, "tasks": {**old_ranks.get(r, {}), **new_ranks.get(r, {})}}
        for r in sorted({*old_ranks, *new_ranks})
    ]
    return merged
