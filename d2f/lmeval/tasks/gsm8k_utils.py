"""Data of the local GSM8K-format task (`d2f_gsm8k_local`): read from `data/` next to this file."""

from pathlib import Path

import datasets

from d2f.lmeval.records import read_jsonl, splits

DATA = Path(__file__).parent / "data" / "gsm8k_local.jsonl"
FIELDS = ("question", "answer")


def load_dataset(**kwargs) -> datasets.DatasetDict:
    """The shipped GSM8K-format records (`question`, `answer` ending in `#### N`), by split.
    lm-eval passes the task's metadata (and the model args) as keyword arguments; none is used."""
    rows = read_jsonl(DATA, (*FIELDS, "split"))
    return splits(rows, ("train", "test"), FIELDS, where=str(DATA))
