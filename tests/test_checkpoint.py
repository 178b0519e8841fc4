"""Training reliability: non-finite losses, resume into the wrong place or under another config,
damaged checkpoints and metrics, no pickled d2f state, launch checks (d2f.train, d2f.checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from d2f.checkpoint import CheckpointError, list_checkpoints
from d2f.data import EpochSampler, encode_records, load_records
from d2f.family import detect_spec
from d2f.launch import check_launch
from d2f.models import load_tokenizer, read_config
from d2f.objectives import OBJECTIVES
from d2f.train import main
from tests.train_helpers import read_metrics, tiny_config

RUN = ("train.max_steps=4", "train.save_every=2")


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished 4-step tiny run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    main(tiny_config(tiny_dir("llada"), run, *RUN))
    return run


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished run."""
    return shutil.copytree(finished, tmp_path / "run")


def _finite_adapter(checkpoint) -> bool:
    tensors = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    return all(torch.isfinite(t).all() for t in tensors.values())


def _nan_at_call(monkeypatch, n: int) -> None:
    """The distill objective returns a NaN loss on its n-th call (a bad batch), else as usual."""
    distill, calls = OBJECTIVES["distill"], {"n": 0}

    def step(*args):
        calls["n"] += 1
        loss, extra = distill.step(*args)
        return (loss * float("nan") if calls["n"] == n else loss), extra

    monkeypatch.setitem(OBJECTIVES, "distill", dataclasses.replace(distill, step=step))


def test_diverging_run_stops_naming_the_step_and_keeps_finite_checkpoints(tiny_dir, tmp_path):
    """lr 1e3 diverges within a few steps: the run stops with an error naming the step, before the
    optimiser step; keep_last=2 still holds finite checkpoints and metrics.jsonl no NaN."""
    run = tmp_path / "run"
    cfg = tiny_config(tiny_dir("llada"), run, "train.lr=1e3", "train.max_steps=40",
                      "train.save_every=2", "train.keep_last=2")  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"step (\d+): non-finite loss") as err:
        main(cfg)
    bad = int(err.value.args[0].split()[1].rstrip(":"))
    kept = list_checkpoints(run)
    assert kept and all(_finite_adapter(c) for c in kept)
    assert int(kept[-1].name.split("-")[1]) < bad
    recs = read_metrics(run)
    assert recs and all(math.isfinite(r["loss"]) for r in recs) and recs[-1]["step"] < bad


def test_a_nan_batch_stops_or_is_skipped(tiny_dir, tmp_path, monkeypatch):
    """stop (default): a NaN at the 3rd batch raises at step 3, checkpoint-2 is the last one.
    skip: that batch is skipped (not counted), the run ends at max_steps with `skipped` 1."""
    _nan_at_call(monkeypatch, 3)
    stop = tmp_path / "stop"
    with pytest.raises(FloatingPointError, match="step 3: non-finite"):
        main(tiny_config(tiny_dir("llada"), stop, *RUN))
    assert [p.name for p in list_checkpoints(stop)] == ["checkpoint-000002"]
    _nan_at_call(monkeypatch, 3)
    skip = tmp_path / "skip"
    main(tiny_config(tiny_dir("llada"), skip, *RUN, "train.on_nonfinite=skip"))
    recs = read_metrics(skip)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["skipped"] for r in recs] == [0, 0, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert _finite_adapter(skip / "checkpoint-000004")


def test_resume_never_into_a_used_directory_refuses_and_keeps_everything(copy, tiny_dir):
    before = (copy / "metrics.jsonl").read_bytes()
    adapter = (copy / "checkpoint-000002" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="resume=never .* already holds checkpoint-000002"):
        main(tiny_config(tiny_dir("llada"), copy, *RUN, "train.resume=never"))
    # a checkpoint of another directory: into a new directory it is a fork, into a used one refused
    other = f"train.resume={copy / 'checkpoint-000002'}"
    fork = copy.parent / "fork"
    main(tiny_config(tiny_dir("llada"), fork, *RUN, other))
    assert [r["step"] for r in read_metrics(fork)] == [3, 4]
    with pytest.raises(FileExistsError, match="another directory's checkpoint"):
        main(tiny_config(tiny_dir("llada"), fork, *RUN, other))
    with pytest.raises(FileExistsError, match="not the newest checkpoint"):
        main(tiny_config(tiny_dir("llada"), copy, *RUN, other))
    assert (copy / "metrics.jsonl").read_bytes() == before
    assert (copy / "checkpoint-000002" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        adapter
    )
    assert [p.name for p in list_checkpoints(copy)] == ["checkpoint-000002", "checkpoint-000004"]


def test_resume_under_another_config_lists_every_difference(copy, tiny_dir, tmp_path):
    other_base = shutil.copytree(tiny_dir("llada"), tmp_path / "other_base")
    cfg = tiny_config(other_base, copy, "train.max_steps=6", "train.lr=1e-4",
                      "train.lora.r=2", "train.seed=5")  # fmt: skip
    with pytest.raises(ValueError, match="differs from") as err:
        main(cfg)
    msg = str(err.value)
    for line in ("model.path: ", "train.lr: 0.002 -> 0.0001", "train.lora.r: 8 -> 2",
                 "train.seed: 0 -> 5"):  # fmt: skip
        assert line in msg, msg
    assert "max_steps" not in msg  # how long to train does not change what is trained
    assert len(read_metrics(copy)) == 4


def test_finished_run_again_is_nothing_to_do(copy, tiny_dir, capsys):
    before = sorted(p.name for p in copy.iterdir())
    main(tiny_config(tiny_dir("llada"), copy, *RUN, "train.save_every=1"))
    assert "nothing to do: " in capsys.readouterr().out
    assert sorted(p.name for p in copy.iterdir()) == before and len(read_metrics(copy)) == 4


def test_torn_last_metrics_line_is_dropped_with_a_warning(copy, tiny_dir):
    with (copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 9.8')  # a write cut short
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5: torn last record dropped"):
        main(tiny_config(tiny_dir("llada"), copy, "train.max_steps=6", "train.save_every=2"))
    assert [r["step"] for r in read_metrics(copy)] == [1, 2, 3, 4, 5, 6]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapter": ("adapter/adapter_model.safetensors", _truncate, "adapter_model"),
    "no rng state": ("state/rng_state_0.json", lambda p: p.unlink(), "rng_state_0.json is miss"),
    "no optimizer": ("state/optimizer.bin", lambda p: p.unlink(), "optimizer.bin is missing"),
    "truncated optimizer": ("state/optimizer.bin", _truncate, "optimizer.bin is unreadable"),
    "no trainer state": ("state/trainer_state.json", lambda p: p.unlink(), "trainer_state.json"),
    "empty config": ("config.yaml", lambda p: p.write_text(""), "config.yaml is missing or empty"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_names_the_file_and_the_previous_one(copy, tiny_dir, damage):
    rel, hurt, match = DAMAGE[damage]
    hurt(copy / "checkpoint-000004" / rel)
    with pytest.raises(CheckpointError, match=match) as err:
        main(tiny_config(tiny_dir("llada"), copy, "train.max_steps=6", "train.save_every=2"))
    assert "checkpoint-000004" in str(err.value)
    assert "previous checkpoint is " in str(err.value) and "checkpoint-000002" in str(err.value)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))  # creates the marker file when unpickled


def test_resume_unpickles_no_planted_state(copy, tiny_dir, tmp_path):
    """d2f's state is JSON; a planted accelerate custom-state pickle is refused, never loaded."""
    state = copy / "checkpoint-000004" / "state"
    assert not list(state.glob("custom_checkpoint_*")) and (state / "trainer_state.json").exists()
    marker = tmp_path / "PWNED"
    (state / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl: d2f writes no such"):
        main(tiny_config(tiny_dir("llada"), copy, "train.max_steps=6", "train.save_every=2"))
    assert not marker.exists()


def test_metrics_count_real_tokens_and_answer_positions(tiny_dir, tmp_path):
    """tokens_per_s counts prompt + answer + end tokens (no padding); masked_frac is over answer
    positions: with every block ratio 1 the whole answer is masked, so it is exactly 1."""
    run = tmp_path / "run"
    cfg = tiny_config(tiny_dir("llada"), run, "train.max_steps=1", "train.noise.lo=1.0",
                      "train.noise.hi=1.0")  # fmt: skip
    main(cfg)
    (rec,) = read_metrics(run)
    assert rec["masked_frac"] == 1.0
    path = tiny_dir("llada")
    raw = read_config(path)
    spec = detect_spec(raw)
    tok = load_tokenizer(path, spec)
    data = encode_records(load_records(cfg.data), cfg.data, tok, spec.facts(raw, tok))
    rows = EpochSampler(len(data), cfg.train.seed).take(8)  # the first global batch
    real = sum(len(data.ids[k]) for k in rows)
    assert real < 8 * cfg.data.max_length  # there is padding to leave out
    assert rec["tokens_per_s"] * rec["ms_per_step"] / 1000 == pytest.approx(real)


def _fake_accelerator(ds_config: dict, processes: int = 1, kind=DistributedType.DEEPSPEED):
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(
        num_processes=processes,
        distributed_type=kind,
        gradient_accumulation_steps=1,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


def test_deepspeed_launch_file_must_agree_with_the_trainer(tiny_dir, tmp_path, monkeypatch):
    """Under DeepSpeed, accelerate ignores clip_grad_norm_'s max_norm: a launch file clipping at
    another value is refused; "auto" values are filled from the trainer (micro-batch, clipping)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tc = tiny_config(tiny_dir("llada"), tmp_path / "run").train
    with pytest.raises(ValueError, match="train.clip_grad_norm=1.0 but .* gradient_clipping=0.5"):
        check_launch(_fake_accelerator({"gradient_clipping": 0.5}), tc)
    with pytest.raises(ValueError, match="train.micro_batch_size=8 but .*per_gpu=4"):
        check_launch(_fake_accelerator({"train_micro_batch_size_per_gpu": 4}), tc)
    filled = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    check_launch(_fake_accelerator(filled), tc)
    assert filled == {"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 8}
    skip = dataclasses.replace(tc, on_nonfinite="skip")
    with pytest.raises(ValueError, match="on_nonfinite=skip is not supported under DeepSpeed"):
        check_launch(_fake_accelerator({}), skip)


def test_processes_accelerate_does_not_see_are_refused(tiny_dir, tmp_path, monkeypatch):
    """FSDP/DeepSpeed on a CPU without gloo: each of WORLD_SIZE processes believes it is alone;
    FSDP under accelerate 1.15 on a CPU: 2 processes with no distributed backend at all."""
    tc = tiny_config(tiny_dir("llada"), tmp_path / "run").train
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"2 processes were launched .* accelerate sees 1"):
        check_launch(_fake_accelerator({}, 1, DistributedType.NO), tc)
    with pytest.raises(RuntimeError, match="no distributed backend"):
        check_launch(_fake_accelerator({}, 2, DistributedType.NO), tc)


def test_trainer_state_is_json(finished):
    state = json.loads(
        (finished / "checkpoint-000004" / "state" / "trainer_state.json").read_text()
    )
    assert (
        state["step"] == 4 and state["processes"] == 1 and state["lr_scheduler"]["last_epoch"] == 4
    )
