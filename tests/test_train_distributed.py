"""Two CPU processes (gloo, through accelerate) train the same adapter as one process does with the
same global batch."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from d2f.train import main
from tests.train_helpers import REPO, TINY_QA, read_metrics, tiny_config, write_sharp_teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    return write_sharp_teacher(tmp_path_factory.mktemp("sharp_ddp") / "llada")


def test_two_processes_equal_one_with_the_same_global_batch(sharp, tmp_path):
    """`train.sh --launcher cpu --nproc 2` with micro-batch 4 (global batch 8) vs one process with
    micro-batch 8: same losses at every step and the same adapter, to fp32 reduction-order error.
    The ranks stay in sync: the trainer compares their weights at every checkpoint (it raises
    otherwise) and says so."""
    steps = ("train.max_steps=6", "train.save_every=3")
    two = tmp_path / "two"
    cmd = ["bash", "scripts/train.sh", "--launcher", "cpu", "--nproc", "2",
           "--port", str(_free_port()), "tiny", f"model.path={sharp}", f"train.output_dir={two}",
           f"data.sources=[{TINY_QA}]", f"data.cache_dir={tmp_path / 'cache'}",
           "train.micro_batch_size=4", *steps]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "2 process(es)" in out and "global batch 8 = 4 x 1 accum x 2 procs" in out
    assert out.count("2 processes in sync") == 2  # checkpoints at steps 3 and 6

    one = tmp_path / "one"
    main(tiny_config(sharp, one, "train.micro_batch_size=8", *steps))
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a, b)
    name = "checkpoint-000006/adapter/adapter_model.safetensors"
    a, b = load_file(one / name), load_file(two / name)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # it did train


def _zero2(sharp, run, tmp_path, *overrides):
    """`train.sh --launcher zero2 --nproc 2` (DeepSpeed ZeRO-2, gloo on a CPU), micro-batch 4."""
    cmd = ["bash", "scripts/train.sh", "--launcher", "zero2", "--nproc", "2",
           "--port", str(_free_port()), "tiny", f"model.path={sharp}", f"train.output_dir={run}",
           f"data.sources=[{TINY_QA}]", f"data.cache_dir={tmp_path / 'cache'}",
           "train.micro_batch_size=4", "train.save_every=3", *overrides]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")
def test_zero2_two_processes_equal_one_and_resume_exactly(sharp, tmp_path):
    """ZeRO-2 with 2 processes x micro-batch 4 vs one process with micro-batch 8, 6 steps: losses
    within 1e-5 relative, adapters within 1e-6 (fp32 reduction order); then resumed to 9 steps it
    equals a straight 9-step ZeRO-2 run bit for bit. (The first run JIT-builds DeepSpeed's CPU
    communication op, about 2 minutes.)"""
    run = tmp_path / "zero2"
    out = _zero2(sharp, run, tmp_path, "train.max_steps=6")
    assert "2 process(es)" in out and "global batch 8 = 4 x 1 accum x 2 procs" in out
    assert out.count("2 processes in sync") == 2
    assert list((run / "checkpoint-000006" / "state" / "pytorch_model").glob("zero_pp_rank_1_*"))
    one = tmp_path / "one"
    main(tiny_config(sharp, one, "train.micro_batch_size=8", "train.max_steps=6",
                     "train.save_every=3"))  # fmt: skip
    for a, b in zip(read_metrics(one), read_metrics(run), strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    name = "checkpoint-000006/adapter/adapter_model.safetensors"
    a, b = load_file(one / name), load_file(run / name)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert "resumed from" in _zero2(sharp, run, tmp_path, "train.max_steps=9")
    straight = tmp_path / "straight"
    _zero2(sharp, straight, tmp_path, "train.max_steps=9")
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(straight)]
    name = "checkpoint-000009/adapter/adapter_model.safetensors"
    a, b = load_file(run / name), load_file(straight / name)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
