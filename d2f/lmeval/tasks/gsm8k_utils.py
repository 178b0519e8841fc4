"""Data of the local GSM8K-format task (`d2f_gsm8k_local`): read from `data/` next to this file."""

import json
from pathlib import Path

import datasets


def load_dataset(**kwargs) -> datasets.DatasetDict:
    """The shipped GSM8K-format records (`question`, `answer` ending in `#### N`), by split."""
    rows = [
        json.loads(line) for line in (Path(__file__).parent / "data" / "gsm8k_local.jsonl").open()
    ]
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(
                [
                    {"question": r["question"], "answer": r["answer"]}
                    for r in rows
                    if r["split"] == split
                ]
            )
            for split in ("train", "test")
        }
    )
