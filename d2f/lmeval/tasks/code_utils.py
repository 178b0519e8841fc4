"""Scoring of the code tasks (`d2f_code_local`, `d2f_humaneval`): sanitise, then run the tests.

lm-eval's humaneval / mbpp score with the hub metric `code_eval`, which cannot load offline; this
runs the record's own tests locally instead. pass@1 of one greedy sample is 1.0 when
`<sanitised program> + <record's test> + check(<entry_point>)` exits with status 0 within
`TIMEOUT_S` seconds, else 0.0. The program runs in a fresh `python -I` process (isolated: no
user site, no current directory on the path) in a temporary directory, in its own process group,
which is killed on timeout.

NOTE: this executes model-written code on the machine running the evaluation, as lm-eval's own
code tasks do; the task is `unsafe_code: true`, so lm-eval asks for `--confirm_run_unsafe_code`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets

from d2f.lmeval.sanitize import sanitize

DATA = Path(__file__).parent / "data" / "code_local.jsonl"
TIMEOUT_S = 5.0  # wall-clock limit of one program, seconds
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def load_dataset(**kwargs) -> datasets.DatasetDict:
    """The shipped HumanEval-format problems as a `test` split. lm-eval passes the task's
    metadata and dataset_kwargs as keyword arguments; none is needed."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([{k: r[k] for k in FIELDS} for r in rows])}
    )


def program_for(doc: dict, completion: str) -> str:
    """The sanitised completion followed by the record's tests and the call that runs them."""
    code = sanitize(completion, doc["entry_point"], doc["prompt"])
    return f"{code}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def run_program(program: str, timeout_s: float | None = None) -> bool:
    """Whether `program` exits with status 0 within `timeout_s` seconds (None: `TIMEOUT_S`)."""
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix="d2f_code_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # own process group: a timeout kills its children too
        )
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's per-document hook: `results` holds the one generated completion."""
    return {"pass_at_1": float(run_program(program_for(doc, results[0])))}
