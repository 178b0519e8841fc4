"""Results table: score and speed of every evaluation run under a directory, like the paper's tables.

    python -m d2f.lmeval.table OUT_DIR [--csv FILE] [--md FILE] [--baseline vanilla]

A run is a directory holding `d2f_speed.json` (written by the `d2f` lm-eval model: model args,
per-task tokens, forwards, wall time, TPS, TPF, latency, generation length) and, anywhere below it,
lm-eval's `results_<timestamp>.json` files: each task's score comes from the newest file that has
the task, so tasks run one after another into the same --output_path all keep their rows.

One row per (model args, task): runs that differ in the adapter, the strategy or any other decode
setting (batch size included) are separate rows. Each row has every score of the task that is not
a stderr (gsm8k: `exact_match,strict-match` and `exact_match,flexible-extract`; code tasks:
`pass_at_1,none`; minerva_math: `exact_match,none` and `math_verify,none`), TPS, TPF, latency,
generation length and the speed-up: TPS over the TPS of the baseline strategy's row for the same
model, task and batch size (blank without one). `TPF (d3LLM)` counts as d3LLM's evaluation does
(tokens before the first end token over forwards) and `AUP` is d3LLM's Accuracy Under
Parallelism (`d2f.lmeval.aup`) of the curve the row belongs to: the rows of one model, adapter,
task, strategy and batch size (several settings = several points), each point (TPF (d3LLM),
100 x the row's first score), y_max the best such score of the task in the table; "n/a" where the
curve has a single point or the leaderboard would refuse it (docs/evaluation.md, "AUP"). The
`settings` column names the model args that tell apart rows of the same model, adapter, task and
strategy. A group such as `minerva_math` gets its aggregate score from the results and the speed
of its subtasks combined (ratios of totals, as for one task); its subtasks get rows too.

`batch_table` lays out one configuration per row with speed columns per batch size (the tiny
world's quickstart table).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from d2f.lmeval.aup import aup

SPEED_FILE = "d2f_speed.json"
SPEED_COLUMNS = ("tokens_per_second", "tokens_per_forward", "latency_s", "gen_length")
_SHOWN = ("pretrained", "adapter", "strategy")  # model args that have columns of their own


@dataclass
class Row:
    model: str  # model_args.pretrained
    task: str  # lm-eval task (or group) name
    strategy: str  # model_args.strategy
    scores: dict[str, float]  # "metric,filter" -> value, stderrs excluded
    samples: int | None = None
    speed: dict[str, float] = field(default_factory=dict)  # SPEED_COLUMNS -> value
    run: str = ""  # run directory
    speedup: float | None = None  # TPS / TPS of the baseline row
    model_args: dict = field(default_factory=dict)  # the run's model args (d2f_speed.json)
    settings: str = ""  # the model args that tell this row apart from its look-alikes
    tpf_d3llm: float | None = None  # tokens before the first end over forwards (d3LLM's TPF)
    aup: float | None = None  # AUP of the row's curve (add_aup); None = n/a

    @property
    def adapter(self) -> str:
        return str(self.model_args.get("adapter") or "")

    @property
    def batch_size(self) -> int | None:
        return self.model_args.get("batch_size")

    @property
    def key(self) -> tuple[str, str]:
        """(model args, task): what makes a row."""
        return json.dumps(self.model_args, sort_keys=True, default=str), self.task


def find_runs(out_dir: Path) -> dict[Path, list[Path]]:
    """Run directory -> its lm-eval results files, oldest first (timestamps sort by name).

    A results file belongs to the deepest run directory above it.
    """
    runs = sorted(p.parent for p in out_dir.rglob(SPEED_FILE))
    found: dict[Path, list[Path]] = {run: [] for run in runs}
    for results in sorted(out_dir.rglob("results_*.json"), key=lambda p: p.name):
        owners = [r for r in runs if r in results.parents]
        if owners:
            found[max(owners, key=lambda r: len(r.parts))].append(results)
    return found


def scores_of(entry: dict) -> dict[str, float]:
    """The numeric `metric,filter` values of one lm-eval results entry, stderrs excluded."""
    return {
        key: value
        for key, value in entry.items()
        if "," in key
        and "_stderr," not in key
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def combine_speed(parts: list[dict]) -> dict[str, float]:
    """Speed columns of several tasks together: ratios of totals, sample-weighted latency."""
    samples = sum(p["samples"] for p in parts)
    wall = sum(p["wall_s"] for p in parts)
    return {
        "tokens_per_second": sum(p["tokens"] for p in parts) / wall if wall > 0 else 0.0,
        "tokens_per_forward": sum(p["tokens_with_end"] for p in parts)
        / max(sum(p["forwards"] for p in parts), 1),
        "latency_s": sum(p["latency_s"] * p["samples"] for p in parts) / max(samples, 1),
        "gen_length": sum(p["tokens"] for p in parts) / max(samples, 1),
    }


def _results(results_files: list[Path]) -> tuple[dict[str, dict], dict[str, list], dict[str, str]]:
    """Task -> entry, group -> subtasks and task -> stamp, each from the newest file with it."""
    entries: dict[str, dict] = {}
    subtasks: dict[str, list] = {}
    stamps: dict[str, str] = {}
    for path in results_files:  # oldest first: newer files overwrite
        results = json.loads(path.read_text())
        for task, entry in results.get("results", {}).items():
            entries[task], stamps[task] = entry, path.name
        subtasks.update(results.get("group_subtasks", {}))
    return entries, subtasks, stamps


def rows_of_run(run: Path, results_files: list[Path]) -> list[tuple[str, Row]]:
    """(results stamp, row) per task (and group) of one run."""
    speed = json.loads((run / SPEED_FILE).read_text())
    model_args = dict(speed["model_args"])
    tasks: dict[str, dict] = speed.get("tasks", {})
    entries, subtasks, stamps = _results(results_files)
    rows = []
    for task in list(entries) + [t for t in tasks if t not in entries]:
        parts = [tasks[t] for t in subtasks.get(task, [task]) if t in tasks]
        row = Row(
            model=str(model_args.get("pretrained", "?")),
            task=task,
            strategy=str(model_args.get("strategy", "?")),
            scores=scores_of(entries.get(task, {})),
            samples=sum(p["samples"] for p in parts) if parts else None,
            speed=_speed_columns(parts),
            run=str(run),
            model_args=model_args,
            tpf_d3llm=sum(p["tokens"] for p in parts) / max(sum(p["forwards"] for p in parts), 1)
            if parts
            else None,
        )
        rows.append((stamps.get(task, ""), row))
    return rows


def _speed_columns(parts: list[dict]) -> dict[str, float]:
    if not parts:
        return {}
    if len(parts) == 1:
        return {k: parts[0][k] for k in SPEED_COLUMNS}
    return combine_speed(parts)


def add_speedups(rows: list[Row], baseline: str) -> None:
    """Set `speedup` = TPS / TPS of the baseline strategy's row of the same model, task and
    batch size."""
    base = {
        (r.model, r.task, r.batch_size): r.speed.get("tokens_per_second")
        for r in rows
        if r.strategy == baseline
    }
    for row in rows:
        base_tps = base.get((row.model, row.task, row.batch_size))
        tps = row.speed.get("tokens_per_second")
        row.speedup = tps / base_tps if base_tps and tps is not None else None


def add_aup(rows: list[Row]) -> None:
    """Set `aup` on every row whose curve (same model, adapter, task, strategy and batch size)
    has two or more points with a score: points (TPF (d3LLM), 100 x first score), y_max the best
    first score of the task over all rows. A curve the leaderboard refuses (a drop of more than
    5 points) stays None."""

    def point(r: Row) -> tuple[float, float] | None:
        if not r.scores or not r.tpf_d3llm:
            return None
        return r.tpf_d3llm, 100 * next(iter(r.scores.values()))

    y_max: dict[str, float] = {}
    curves: dict[tuple, list[Row]] = {}
    for r in rows:
        if point(r) is not None:
            y_max[r.task] = max(y_max.get(r.task, 0.0), point(r)[1])
            curves.setdefault((r.model, r.adapter, r.task, r.strategy, r.batch_size), []).append(r)
    for (*_, task, _s, _b), group in curves.items():
        if len(group) < 2 or y_max[task] <= 0:
            continue
        try:
            value = aup([point(r) for r in group], y_max[task])
        except ValueError:  # the leaderboard refuses curves that lose more than 5 points
            continue
        for r in group:
            r.aup = value


def add_settings(rows: list[Row]) -> None:
    """Set `settings`: the model args that differ among rows of one model, adapter, task and
    strategy, as `key=value` pairs (blank where nothing else looks like the row)."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.adapter, row.task, row.strategy), []).append(row)
    for group in groups.values():
        keys = sorted({k for r in group for k in r.model_args} - set(_SHOWN))
        differ = [k for k in keys if len({repr(r.model_args.get(k)) for r in group}) > 1]
        for row in group:
            row.settings = " ".join(f"{k}={row.model_args.get(k)}" for k in differ)


def collect(out_dir: str | Path, baseline: str = "vanilla") -> list[Row]:
    """Every row under `out_dir`, ordered by model, task (first seen), baseline first, strategy,
    adapter and settings.

    Two runs with the same model args and task: the one with the newer results file wins.
    """
    by_key: dict[tuple[str, str], tuple[str, Row]] = {}
    for run, results_files in find_runs(Path(out_dir)).items():
        for stamp, row in rows_of_run(run, results_files):
            if row.key not in by_key or stamp >= by_key[row.key][0]:
                by_key[row.key] = (stamp, row)
    rows = [row for _, row in by_key.values()]
    add_settings(rows)
    task_order = {t: i for i, t in enumerate(dict.fromkeys(r.task for r in rows))}
    rows.sort(
        key=lambda r: (
            r.model,
            task_order[r.task],
            r.strategy != baseline,
            r.strategy,
            r.adapter,
            r.settings,
        )
    )
    add_speedups(rows, baseline)
    add_aup(rows)
    return rows


def _score_text(scores: dict[str, float]) -> str:
    """`exact_match,strict-match` -> `strict-match 0.773`; a `none` filter shows the metric."""
    parts = []
    for key, value in scores.items():
        metric, _, filt = key.partition(",")
        parts.append(f"{metric if filt == 'none' else filt} {value:.3f}")
    return " / ".join(parts)


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _short(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


def markdown(header: list[str], cells: list[list[str]], left: int) -> str:
    """A markdown table; the first `left` columns left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * left + "---:|" * (len(header) - left),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[Row]) -> str:
    header = ["model", "adapter", "task", "strategy", "settings", "score", "n", "TPS", "TPF"]
    header += ["latency (s)", "gen len", "speed-up", "TPF (d3LLM)", "AUP"]
    cells = []
    for r in rows:
        s = r.speed
        cells.append(
            [
                _short(r.model),
                _short(r.adapter) if r.adapter else "",
                r.task,
                r.strategy,
                r.settings,
                _score_text(r.scores),
                _num(r.samples, "d"),
                _num(s.get("tokens_per_second"), ".1f"),
                _num(s.get("tokens_per_forward"), ".2f"),
                _num(s.get("latency_s"), ".2f"),
                _num(s.get("gen_length"), ".1f"),
                "" if r.speedup is None else f"{r.speedup:.2f}x",
                _num(r.tpf_d3llm, ".2f"),
                "n/a" if r.aup is None else f"{r.aup:.2f}",
            ]
        )
    return markdown(header, cells, left=5)


def to_csv(rows: list[Row]) -> str:
    """One column per score key (union over rows), full precision."""
    score_keys = list(dict.fromkeys(k for r in rows for k in r.scores))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["model", "adapter", "task", "strategy", "settings", "batch_size", *score_keys]
        + ["samples", *SPEED_COLUMNS, "speedup", "run", "tpf_d3llm", "aup"]
    )
    for r in rows:
        writer.writerow(
            [r.model, r.adapter, r.task, r.strategy, r.settings, r.batch_size]
            + [r.scores.get(k, "") for k in score_keys]
            + ["" if r.samples is None else r.samples]
            + [r.speed.get(k, "") for k in SPEED_COLUMNS]
            + ["" if r.speedup is None else r.speedup, r.run]
            + ["" if r.tpf_d3llm is None else r.tpf_d3llm, "" if r.aup is None else r.aup]
        )
    return out.getvalue()


@dataclass
class BatchRow:
    """One configuration measured at several batch sizes: a line of `batch_table`."""

    labels: dict[str, str]  # leading columns, e.g. {"method": "D2F pipelined", "model": "student"}
    runs: dict[int, Row]  # batch size -> that run's row of the task
    baseline: bool = False  # the row the speed-ups divide by


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"  # n/a: the baseline made no tokens


def batch_table(
    rows: list[BatchRow], small: int, big: int, score: str
) -> tuple[list[str], list[list[str]]]:
    """Header and cells: labels, `score` (percent, at batch `big`), TPF and gen len (batch
    `small`), TPS / latency / speed-up at `small`, TPS / speed-up at `big`; speed-ups over the
    baseline row's TPS at the same batch size."""
    (base,) = [r for r in rows if r.baseline]
    header = [*rows[0].labels, "score", "TPF", "gen len", f"TPS b{small}", f"latency b{small} (s)"]
    header += [f"speed-up b{small}", f"TPS b{big}", f"speed-up b{big}"]
    cells = []
    for r in rows:
        s, b = r.runs[small].speed, r.runs[big].speed
        cells.append(
            [
                *r.labels.values(),
                f"{100 * r.runs[big].scores[score]:.1f}%",
                f"{s['tokens_per_forward']:.2f}",
                f"{s['gen_length']:.1f}",
                f"{s['tokens_per_second']:.0f}",
                f"{s['latency_s']:.3f}",
                _ratio(s["tokens_per_second"], base.runs[small].speed["tokens_per_second"]),
                f"{b['tokens_per_second']:.0f}",
                _ratio(b["tokens_per_second"], base.runs[big].speed["tokens_per_second"]),
            ]
        )
    return header, cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m d2f.lmeval.table", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", help="directory holding the runs (searched recursively)")
    parser.add_argument("--csv", help="also write the table as CSV to this file")
    parser.add_argument("--md", help="also write the markdown table to this file")
    parser.add_argument("--baseline", default="vanilla", help="strategy of the speed-up baseline")
    args = parser.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        parser.error(f"{args.out_dir} is not a directory")
    rows = collect(args.out_dir, args.baseline)
    if not rows:
        parser.error(f"no runs ({SPEED_FILE}) under {args.out_dir}")
    text = to_markdown(rows)
    print(text, end="")
    if args.md:
        Path(args.md).write_text(text)
    if args.csv:
        Path(args.csv).write_text(to_csv(rows))


if __name__ == "__main__":
    main()
