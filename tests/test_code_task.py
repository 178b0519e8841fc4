"""The local code tasks load through lm-eval and score by running the record's tests locally."""

import signal
import time
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).resolve().parents[1] / "d2f" / "lmeval" / "tasks"


@pytest.fixture(scope="module")
def task():
    import lm_eval.tasks

    # include_defaults=False: indexing lm-eval's ~10k built-in task files takes seconds.
    manager = lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return manager.load(["d2f_code_local"])["tasks"]["d2f_code_local"]


@pytest.fixture(scope="module")
def docs(task):
    return list(task.test_docs())


def test_docs_load_in_humaneval_format(task, docs):
    assert task.config.unsafe_code is True
    assert (
        task.config.generation_kwargs["until"] == []
    )  # stop strings off, as the paper's HumanEval
    assert len(docs) == 8
    for doc in docs:
        assert set(doc) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
        assert f"def {doc['entry_point']}(" in doc["prompt"]
        assert "def check(candidate):" in doc["test"]
    assert task.doc_to_text(docs[0]) == docs[0]["prompt"]


def test_every_canonical_solution_passes_as_a_body(task, docs):
    assert [task.process_results(doc, [doc["canonical_solution"]]) for doc in docs] == [
        {"pass_at_1": 1.0}
    ] * len(docs)


def test_canonical_solution_in_a_fence_with_prose_passes(task, docs):
    doc = docs[2]  # max_of_list: needs the prompt's `from typing import List`
    signature = next(line for line in doc["prompt"].split("\n") if line.startswith("def "))
    completion = (
        "Sure, here is a solution.\n\n```python\n"
        f"{signature}\n{doc['canonical_solution']}\n"
        f"print({doc['entry_point']}([3, 9, 2]))\n```\nIt loops over the list once."
    )
    assert task.process_results(doc, [completion]) == {"pass_at_1": 1.0}


def test_wrong_and_empty_answers_fail(task, docs):
    doc = docs[0]  # add
    assert task.process_results(doc, ["    return a - b\n"]) == {"pass_at_1": 0.0}
    assert task.process_results(doc, ["I do not know."]) == {"pass_at_1": 0.0}


def test_infinite_loop_times_out(task, docs):
    process_results = task.config.process_results
    code_utils = process_results.__globals__  # the module lm-eval loaded from code_utils.py
    saved, code_utils["TIMEOUT_S"] = code_utils["TIMEOUT_S"], 1.0
    try:
        start = time.monotonic()
        result = process_results(docs[0], ["    while True:\n        pass\n"])
        assert result == {"pass_at_1": 0.0}
        assert time.monotonic() - start < 5
    finally:
        code_utils["TIMEOUT_S"] = saved


@pytest.fixture
def sandbox(task):
    """`program_status` of the code_utils module lm-eval loaded for the task."""
    return task.config.process_results.__globals__["program_status"]


def test_generated_code_does_not_see_secrets(sandbox, monkeypatch):
    monkeypatch.setenv("D2F_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    program = (
        "import os, sys\n"
        "seen = [k for k in ('D2F_TEST_SECRET', 'HF_TOKEN') if k in os.environ]\n"
        "sys.exit(3 if seen else 0)\n"
    )
    assert sandbox(program) == 0


def test_generated_code_writes_land_in_a_temporary_directory(sandbox, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = (
        "import os, sys, tempfile\n"
        "open('written.txt', 'w').write('x')\n"
        "here = os.getcwd()\n"
        "ok = os.path.basename(here).startswith('d2f_code_') and os.path.expanduser('~') == here\n"
        "sys.exit(0 if ok and os.path.exists(os.path.join(here, 'written.txt')) else 3)\n"
    )
    assert sandbox(program) == 0
    assert not (tmp_path / "written.txt").exists()


def test_infinite_loop_is_killed_by_the_cpu_limit(sandbox):
    start = time.monotonic()
    status = sandbox("while True:\n    pass\n", timeout_s=60, cpu_s=1)
    assert status in (-signal.SIGXCPU, -signal.SIGKILL)  # not the wall-clock timeout (None)
    assert time.monotonic() - start < 30


def test_big_allocation_fails_under_the_memory_limit(sandbox):
    program = (
        "import sys\ntry:\n    block = bytearray(1 << 30)\nexcept MemoryError:\n    sys.exit(3)\n"
    )
    assert sandbox(program, memory_bytes=256 << 20) == 3
    assert sandbox("block = bytearray(1 << 20)\n", memory_bytes=256 << 20) == 0


def test_empty_or_broken_data_file_names_the_file_and_line(tmp_path):
    from d2f.lmeval.records import read_jsonl

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        read_jsonl(empty, ("prompt",))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        read_jsonl(broken, ("prompt",))
    with pytest.raises(ValueError, match=r"broken.jsonl:1: record has no \['test'\]"):
        read_jsonl(broken, ("prompt", "test"))


def test_humaneval_variant_is_the_same_scoring_on_the_hub_data(task):
    """d2f_humaneval = d2f_code_local's prompt and scoring over `openai/openai_humaneval`.

    The hub data cannot load offline: build the task from its merged YAML with the local data.
    """
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml  # how TaskManager reads a task file

    cfg = load_yaml(TASKS_DIR / "d2f_humaneval.yaml")
    assert cfg["task"] == "d2f_humaneval"
    assert cfg["dataset_path"] == "openai/openai_humaneval"
    assert cfg["custom_dataset"] is None
    assert cfg["process_results"] is task.config.process_results
    assert cfg["generation_kwargs"]["until"] == []
    local = ConfigurableTask(config={**cfg, "custom_dataset": task.config.custom_dataset})
    doc = next(iter(local.test_docs()))
    assert local.process_results(doc, [doc["canonical_solution"]]) == {"pass_at_1": 1.0}
