"""Scoring of the code tasks (`d2f_code_local`, `d2f_humaneval`): sanitise, then run the tests.

lm-eval's humaneval / mbpp score with the hub metric `code_eval`, which cannot load offline; this
runs the record's own tests locally instead. pass@1 of one greedy sample is 1.0 when
`<sanitised program> + <record's test> + check(<entry_point>)` exits with status 0 within
`TIMEOUT_S` seconds, else 0.0. The program runs in a fresh `python -I` process (isolated: no
user site, no current directory on the path) with:
- a scrubbed environment: only HOME and TMPDIR (the temporary directory) and a default PATH, so no
  token or secret of the evaluating process is inherited;
- a temporary working directory (also HOME), removed afterwards: relative writes land there;
- limits set in the child before it starts (`resource.setrlimit`): `CPU_S` seconds of CPU time
  and `MEMORY_BYTES` of address space;
- its own process group, killed after `TIMEOUT_S` wall-clock seconds.
It can still read and write any path the evaluating user can by absolute name: this limits
accidents, it is not a security sandbox.

NOTE: this executes model-written code on the machine running the evaluation, as lm-eval's own
code tasks do; the task is `unsafe_code: true`, so lm-eval asks for `--confirm_run_unsafe_code`.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets

from d2f.lmeval.records import read_jsonl
from d2f.lmeval.sanitize import sanitize

DATA = Path(__file__).parent / "data" / "code_local.jsonl"
TIMEOUT_S = 5.0  # wall-clock limit of one program, seconds
CPU_S = 5  # CPU-time limit of one program, seconds (RLIMIT_CPU)
MEMORY_BYTES = 1 << 30  # address-space limit of one program (RLIMIT_AS), bytes
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def load_dataset(**kwargs) -> datasets.DatasetDict:
    """The shipped HumanEval-format problems as a `test` split. lm-eval passes the task's
    metadata (and the model args) and dataset_kwargs as keyword arguments; none is used."""
    rows = read_jsonl(DATA, FIELDS)
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([{k: r[k] for k in FIELDS} for r in rows])}
    )


def program_for(doc: dict, completion: str) -> str:
    """The sanitised completion followed by the record's tests and the call that runs them."""
    code = sanitize(completion, doc["entry_point"], doc["prompt"])
    return f"{code}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def _limits(cpu_s: int, memory_bytes: int):
    """The child's `preexec_fn`: CPU-time and address-space limits, set before `exec`."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return apply


def program_status(
    program: str,
    timeout_s: float | None = None,
    cpu_s: int | None = None,
    memory_bytes: int | None = None,
) -> int | None:
    """Exit status of `program` run in the sandbox (negative: killed by that signal), or None
    when it ran past `timeout_s` wall-clock seconds. Defaults: the module's limits."""
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    cpu_s = CPU_S if cpu_s is None else cpu_s
    memory_bytes = MEMORY_BYTES if memory_bytes is None else memory_bytes
    with tempfile.TemporaryDirectory(prefix="d2f_code_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=tmp,
            env={"HOME": tmp, "TMPDIR": tmp, "PATH": os.defpath},  # no inherited secrets
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # own process group: a timeout kills its children too
            preexec_fn=_limits(cpu_s, memory_bytes),
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def run_program(program: str, timeout_s: float | None = None) -> bool:
    """Whether `program` exits with status 0 in the sandbox within `timeout_s` seconds."""
    return program_status(program, timeout_s) == 0


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's per-document hook: `results` holds the one generated completion."""
    return {"pass_at_1": float(run_program(program_for(doc, results[0])))}
