"""Data of the miniature world's task (`d2f_tiny_add`): the held-out split of d2f.tinyworld.task.

Options through lm-eval's `--metadata '{"level": "add2", "n": 200, "world_seed": 0}'`.
NOTE: lm-eval merges the model args into every task's metadata, so this loader takes only options
that no `d2f` model arg has (a test checks it): the model's Monte-Carlo `seed` reaches it too and
must not pick another held-out split (one that overlaps the training problems).
"""

import datasets

from d2f.tinyworld.task import records

OPTIONS = ("level", "n", "world_seed")


def load_dataset(
    level: str = "add2", n: int | None = None, world_seed: int = 0, **model_args_and_metadata
) -> datasets.DatasetDict:
    """The first `n` held-out problems (all without `n`) of the world with `world_seed`."""
    test = records(level, "test", n=n, seed=world_seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(test)})
