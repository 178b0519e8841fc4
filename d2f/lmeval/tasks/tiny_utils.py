"""Data of the miniature world's task (`d2f_tiny_add`): the held-out split of d2f.tinyworld.task.

Options through lm-eval's `--metadata '{"level": "add2", "n": 200, "seed": 0}'`.
"""

import datasets

from d2f.tinyworld.task import records


def load_dataset(
    level: str = "add2", n: int | None = None, seed: int = 0, **kwargs
) -> datasets.DatasetDict:
    test = records(level, "test", n=n, seed=seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(test)})
