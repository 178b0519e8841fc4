"""Data of the shipped local lm-eval tasks: JSON-lines records, checked before anything runs.

lm-eval calls a task's `custom_dataset` while it builds the tasks, before the first request, so a
missing, empty or malformed data file fails here with its name (and line), not later as an
`IndexError` deep inside lm-eval.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from d2f.data import iter_jsonl


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """The records of a JSON-lines file, each with every one of `fields` (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    rows = []
    for line_no, row in iter_jsonl(path):
        absent = [k for k in fields if k not in row]
        if absent:
            raise ValueError(f"{path}:{line_no}: record has no {absent}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records (the task would have no documents)")
    return rows


def splits(
    rows: list[dict], names: tuple[str, ...], fields: tuple[str, ...], where: str
) -> datasets.DatasetDict:
    """A DatasetDict of the records by their `split` field; every split must have records."""
    out = {}
    for name in names:
        chosen = [{k: r[k] for k in fields} for r in rows if r.get("split") == name]
        if not chosen:
            raise ValueError(f"{where}: no records with split {name!r}")
        out[name] = datasets.Dataset.from_list(chosen)
    return datasets.DatasetDict(out)
