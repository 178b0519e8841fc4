"""`python -m d2f.eval`: lm-eval's own command line, with the `d2f` model and our tasks available.

    python -m d2f.eval --model d2f --model_args pretrained=...,strategy=d2f,block_size=32 \\
        --tasks gsm8k --output_path out/gsm8k --log_samples
    accelerate launch --multi_gpu --num_processes 8 -m d2f.eval ...   # data parallel

Everything is lm-eval's CLI (`lm-eval run --help`). This launcher only (1) imports the `d2f`
model so that lm-eval can find it, (2) adds the package's `d2f/lmeval/tasks` to the task search path (next
to any --include_path you give), and (3) tells the model where to write its speed statistics
(`d2f_speed.json` in --output_path). It is an entry-point shim: no library module imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _set_value(argv: list[str], flag: str, value: str) -> list[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[: i + 1] + [value] + argv[i + 2 :]
        if arg.startswith(flag + "="):
            return argv[:i] + [f"{flag}={value}"] + argv[i + 1 :]
    return argv + [flag, value]


def tasks_dir() -> Path:
    """The local lm-eval tasks shipped with the package (`d2f/lmeval/tasks/`)."""
    return Path(__file__).resolve().parent / "lmeval" / "tasks"


def _include_our_tasks() -> None:
    """Make every TaskManager lm-eval builds also scan d2f/lmeval/tasks (the CLI takes one path only)."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "_d2f", False):
        return

    class TaskManager(base):
        _d2f = True

        def __init__(self, *args, include_path=None, **kwargs):
            paths = [] if include_path is None else include_path
            paths = list(paths) if isinstance(paths, list | tuple) else [paths]
            super().__init__(*args, include_path=[str(tasks_dir()), *paths], **kwargs)

    lm_eval.tasks.TaskManager = TaskManager


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    import d2f.lmeval.lm  # noqa: F401  (registers the "d2f" model with lm-eval)

    _include_our_tasks()
    output = _value(argv, "--output_path")
    model_args = _value(argv, "--model_args")
    if (
        _value(argv, "--model") == "d2f"
        and output
        and model_args
        and "stats_dir=" not in model_args
    ):
        argv = _set_value(argv, "--model_args", f"{model_args},stats_dir={output}")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
