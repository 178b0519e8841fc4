"""Results table: score and speed of every evaluation run under a directory, like the paper's tables.

    python -m d2f.lmeval.table OUT_DIR [--csv FILE] [--md FILE] [--baseline vanilla]

A run is a directory holding `d2f_speed.json` (written by the `d2f` lm-eval model: model args,
per-task tokens, forwards, wall time, TPS, TPF, latency, generation length) and, anywhere below it,
lm-eval's `results_<timestamp>.json` (the newest one wins). One row per (model, task, strategy):
every score of the task that is not a stderr (gsm8k: `exact_match,strict-match` and
`exact_match,flexible-extract`; code tasks: `pass_at_1,none`; minerva_math: `exact_match,none` and
`math_verify,none`), TPS, TPF, latency, generation length and the speed-up: TPS over the TPS of
the baseline strategy's row for the same model and task (blank without one). A group such as
`minerva_math` gets its aggregate score from the results and the speed of its subtasks combined
(ratios of totals, as for one task); its subtasks get rows too.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

SPEED_FILE = "d2f_speed.json"
SPEED_COLUMNS = ("tokens_per_second", "tokens_per_forward", "latency_s", "gen_length")


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


def find_runs(out_dir: Path) -> dict[Path, Path | None]:
    """Run directory -> its newest lm-eval results file (None if it has none yet).

    A results file belongs to the deepest run directory above it.
    """
    runs = sorted(p.parent for p in out_dir.rglob(SPEED_FILE))
    newest: dict[Path, Path | None] = dict.fromkeys(runs)
    for results in sorted(out_dir.rglob("results_*.json"), key=lambda p: p.name):
        owners = [r for r in runs if r in results.parents]
        if owners:
            newest[max(owners, key=lambda r: len(r.parts))] = results  # sorted: last = newest
    return newest


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


def rows_of_run(run: Path, results_file: Path | None) -> list[Row]:
    """One row per task (and group) of one run."""
    speed = json.loads((run / SPEED_FILE).read_text())
    model = str(speed["model_args"].get("pretrained", "?"))
    strategy = str(speed["model_args"].get("strategy", "?"))
    tasks: dict[str, dict] = speed.get("tasks", {})
    results = json.loads(results_file.read_text()) if results_file else {}
    entries: dict[str, dict] = results.get("results", {})
    subtasks: dict[str, list[str]] = results.get("group_subtasks", {})

    rows = []
    for task in list(entries) + [t for t in tasks if t not in entries]:
        parts = [tasks[t] for t in subtasks.get(task, [task]) if t in tasks]
        rows.append(
            Row(
                model=model,
                task=task,
                strategy=strategy,
                scores=scores_of(entries.get(task, {})),
                samples=sum(p["samples"] for p in parts) if parts else None,
                speed=_speed_columns(parts),
                run=str(run),
            )
        )
    return rows


def _speed_columns(parts: list[dict]) -> dict[str, float]:
    if not parts:
        return {}
    if len(parts) == 1:
        return {k: parts[0][k] for k in SPEED_COLUMNS}
    return combine_speed(parts)


def add_speedups(rows: list[Row], baseline: str) -> None:
    """Set `speedup` = TPS / TPS of the baseline strategy's row of the same model and task."""
    base = {
        (r.model, r.task): r.speed.get("tokens_per_second") for r in rows if r.strategy == baseline
    }
    for row in rows:
        base_tps = base.get((row.model, row.task))
        tps = row.speed.get("tokens_per_second")
        row.speedup = tps / base_tps if base_tps and tps is not None else None


def collect(out_dir: str | Path, baseline: str = "vanilla") -> list[Row]:
    """Every row under `out_dir`, ordered by model, task (first seen), baseline first, strategy.

    Two runs of the same (model, task, strategy): the one with the newer results file wins.
    """
    by_key: dict[tuple[str, str, str], tuple[str, Row]] = {}
    for run, results_file in find_runs(Path(out_dir)).items():
        stamp = results_file.name if results_file else ""
        for row in rows_of_run(run, results_file):
            key = (row.model, row.task, row.strategy)
            if key not in by_key or stamp >= by_key[key][0]:
                by_key[key] = (stamp, row)
    rows = [row for _, row in by_key.values()]
    task_order = {t: i for i, t in enumerate(dict.fromkeys(r.task for r in rows))}
    rows.sort(key=lambda r: (r.model, task_order[r.task], r.strategy != baseline, r.strategy))
    add_speedups(rows, baseline)
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


def to_markdown(rows: list[Row]) -> str:
    header = ["model", "task", "strategy", "score", "n", "TPS", "TPF", "latency (s)", "gen len"]
    lines = [
        "| " + " | ".join(header + ["speed-up"]) + " |",
        "|" + "---|" * 3 + "---|" + "---:|" * 6,
    ]
    for r in rows:
        s = r.speed
        cells = [
            _short(r.model),
            r.task,
            r.strategy,
            _score_text(r.scores),
            _num(r.samples, "d"),
            _num(s.get("tokens_per_second"), ".1f"),
            _num(s.get("tokens_per_forward"), ".2f"),
            _num(s.get("latency_s"), ".2f"),
            _num(s.get("gen_length"), ".1f"),
            "" if r.speedup is None else f"{r.speedup:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """One column per score key (union over rows), full precision."""
    score_keys = list(dict.fromkeys(k for r in rows for k in r.scores))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["model", "task", "strategy", *score_keys, "samples", *SPEED_COLUMNS, "speedup", "run"]
    )
    for r in rows:
        writer.writerow(
            [r.model, r.task, r.strategy]
            + [r.scores.get(k, "") for k in score_keys]
            + ["" if r.samples is None else r.samples]
            + [r.speed.get(k, "") for k in SPEED_COLUMNS]
            + ["" if r.speedup is None else r.speedup, r.run]
        )
    return out.getvalue()


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
    markdown = to_markdown(rows)
    print(markdown, end="")
    if args.md:
        Path(args.md).write_text(markdown)
    if args.csv:
        Path(args.csv).write_text(to_csv(rows))


if __name__ == "__main__":
    main()
