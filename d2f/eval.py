"""`python -m d2f.eval`: lm-eval's own command line, with the `d2f` model and our tasks available.

    python -m d2f.eval --model d2f --model_args pretrained=...,strategy=d2f,block_size=32 \\
        --tasks gsm8k --output_path out/gsm8k --log_samples
    accelerate launch --multi_gpu --num_processes 8 -m d2f.eval ...   # data parallel

Everything is lm-eval's CLI (`lm-eval run --help`), parsed and run by lm-eval's `HarnessCLI`. This
launcher only (1) imports the `d2f` model so that lm-eval can find it, (2) puts the package's
`d2f/lmeval/tasks` on the task search path (before any --include_path you give), and (3) tells the
model where to write its speed statistics (`d2f_speed.json` in --output_path). It is an
entry-point shim: no library module imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path


def tasks_dir() -> Path:
    """The local lm-eval tasks shipped with the package (`d2f/lmeval/tasks/`)."""
    return Path(__file__).resolve().parent / "lmeval" / "tasks"


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line) with lm-eval's CLI and run it."""
    from lm_eval._cli import HarnessCLI

    import d2f.lmeval.lm  # noqa: F401  (registers the "d2f" model with lm-eval)

    argv = list(sys.argv[1:] if argv is None else argv)
    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # HarnessCLI parses sys.argv
    try:
        cli = HarnessCLI()
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if hasattr(args, "include_path"):  # run, ls and validate all search our tasks too
        given = [args.include_path] if args.include_path else []
        args.include_path = [str(tasks_dir()), *given]
    if getattr(args, "model", None) == "d2f" and getattr(args, "output_path", None):
        args.model_args = {"stats_dir": args.output_path, **(args.model_args or {})}
    try:
        cli.execute(args)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the data-parallel process group down before the interpreter does.

    Left to interpreter exit, a gloo group's threads can be destroyed while still joinable
    (`terminate called without an active exception`, exit -6 on one rank after all results were
    written); torch asks for an explicit `destroy_process_group()`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
