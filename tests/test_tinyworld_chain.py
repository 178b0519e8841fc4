"""The second-edition miniature world: the `chain` task, and the quickstart's pieces (rows, AUP of
a sweep, blocks in flight, the side-by-side race), checked without training anything."""

from __future__ import annotations

import json
import re
import statistics

import pytest
import torch

from d2f.decoding.config import BlockState, StepEvent
from d2f.tinyworld import quickstart, results, stages
from d2f.tinyworld.task import CHAIN_RANGE, CHAIN_STEPS, records

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+) \.")


def _ops(question: str) -> tuple[int, ...]:
    """The operand sequence a question states (start, then signed steps), parsed from its words."""
    from d2f.tinyworld.task import CHAIN_GAIN, CHAIN_LOSS

    words = question.replace(",", " ").split()
    start = int(words[2])
    steps = []
    for verb, num in zip(words, words[1:], strict=False):
        if verb in CHAIN_GAIN and num.isdigit():
            steps.append(int(num))
        elif verb in CHAIN_LOSS and num.isdigit():
            steps.append(-int(num))
    return (start, *steps)


def test_chain_answers_are_dependent_steps_that_add_up():
    for r in records("chain", "train", 300) + records("chain", "test", 100):
        ops = _ops(r["question"])
        assert len(ops) == 1 + CHAIN_STEPS, r
        steps = STEP.findall(r["answer"])
        assert len(steps) == CHAIN_STEPS >= 3
        value = ops[0]
        for (a, sign, c, b), step in zip(steps, ops[1:], strict=True):
            a, c, b = int(a), int(c), int(b)
            assert a == value  # each step starts from the previous result
            assert (c if sign == "+" else -c) == step  # ... and applies the question's move
            assert b == a + step and CHAIN_RANGE[0] <= b <= CHAIN_RANGE[1]
            value = b
        assert r["answer"].endswith(f"#### {value}")


def test_chain_held_out_sequences_never_appear_in_training():
    test = {_ops(r["question"]) for r in records("chain", "test", 300)}
    assert len(test) == 300  # distinct
    train = {_ops(r["question"]) for r in records("chain", "train", 20_000)}
    assert not test & train
    assert len(train) > 15_000  # the training split is not a handful of sequences


def test_chain_is_deterministic_and_seeded():
    assert records("chain", "test", 20) == records("chain", "test", 20)
    assert records("chain", "test", 20, seed=1) != records("chain", "test", 20)
    with pytest.raises(ValueError, match="give n"):
        records("chain", "test")


def test_chain_answers_are_at_least_40_tokens_with_the_end_token():
    from d2f.tinyworld.tokenizer import train_tokenizer

    recs = records("chain", "train", 500)
    tok = train_tokenizer(r["question"] + " " + r["answer"] for r in recs)
    lengths = [len(tok(r["answer"])["input_ids"]) + 1 for r in recs]
    assert statistics.median(lengths) >= 40
    assert tok.unk_token_id not in {i for r in recs for i in tok(r["answer"])["input_ids"]}


@pytest.mark.parametrize("world", sorted(quickstart.SIZES))
def test_leaderboard_rows_cover_the_issue_and_name_one_strategy_each(world):
    from d2f.decoding import DECODERS, DecodeConfig

    rows = quickstart.rows(world)
    names = [r.name for r in rows]
    assert len(set(names)) == len(names)
    for needed in (
        "vanilla dLLM",
        "D2F, no distillation",
        "D2F, random-schedule student",
        "D2F cache-only",
        "D2F pipelined",
        "autoregressive",
    ):
        assert needed in names
    assert any(r.decode["strategy"] == "fast_dllm" for r in rows)
    for r in rows:
        assert r.decode["strategy"] in DECODERS
        DecodeConfig(**r.decode)  # every row's settings are valid
        assert r.model in ("teacher", "student", "student_random", "ar")


def test_sweep_aup_keeps_only_points_within_five_of_the_first():
    from d2f.lmeval.aup import aup

    pts = [(1.0, 90.0), (2.0, 88.0), (3.0, 80.0)]  # the last drops 10 points: the leaderboard
    with pytest.raises(ValueError):  # refuses the whole curve ...
        aup(pts, 90.0)
    # ... the table reports the curve of the points it would keep
    assert results.curve_aup_of(pts, 90.0) == pytest.approx(aup(pts[:2], 90.0))
    assert results.curve_aup_of([(2.0, 50.0)], 90.0) == pytest.approx(100.0)  # one point: rho * y


def _event(step, answer_len, block_states, committed_cols):
    committed = torch.zeros(1, answer_len, dtype=torch.bool)
    committed[0, committed_cols] = True
    return StepEvent(
        step=step,
        rows=torch.tensor([0]),
        answer=torch.zeros(1, answer_len, dtype=torch.long),
        committed=committed,
        block_state=torch.tensor([block_states], dtype=torch.int8),
    )


def test_blocks_in_flight_counts_blocks_decoding_in_the_same_step():
    A, S, F = int(BlockState.ABSENT), int(BlockState.SEMI), int(BlockState.FULL)
    # 3 blocks of 2: block 0 decodes alone, then block 1 (full) and block 2 (semi) together
    trace = [
        _event(1, 6, [F, A, A], [0]),
        _event(2, 6, [F, S, A], [1]),
        _event(3, 6, [F, F, S], [2]),
        _event(4, 6, [F, F, F], [3, 4, 5]),
    ]
    most, both = results.blocks_in_flight(trace, 0, 2)
    assert most == 2 and both  # steps 2 and 3: two live blocks, one semi- and one fully activated
    alone = [_event(1, 4, [F, A], [0, 1]), _event(2, 4, [F, F], [2, 3])]
    assert results.blocks_in_flight(alone, 0, 2) == (1, False)


def test_race_alternates_rows_prompt_by_prompt_and_keeps_each_prompts_best(monkeypatch):
    from d2f.tinyworld import race

    calls = []
    # (config, batch, first prompt id) -> wall per round; tokens are the prompt's first id
    walls = {
        ("cfg-a", 1, 10): [5.0, 3.0],
        ("cfg-b", 1, 10): [1.0, 4.0],
        ("cfg-a", 1, 20): [2.0, 6.0],
        ("cfg-b", 1, 20): [7.0, 0.5],
        ("cfg-a", 4, 10): [9.0, 8.0],
        ("cfg-b", 4, 10): [2.0, 1.0],
    }
    seen: dict = {}

    def timed(model, prompts, config, batch):
        key = (config, batch, prompts[0][0])
        calls.append(key)
        n = seen[key] = seen.get(key, -1) + 1
        return walls[key][n], sum(p[0] for p in prompts)

    monkeypatch.setattr(race, "_timed", timed)
    monkeypatch.setattr(race, "prompt_ids", lambda tok, q: [int(q)])
    entries = [race.Entry("a", "m", "cfg-a"), race.Entry("b", "m", "cfg-b")]
    out = race.race(entries, {"m": (None, None)}, ["10", "20"], ["10"] * 4, big=4, repeats=2)
    one_round = [
        ("cfg-a", 1, 10),
        ("cfg-b", 1, 10),  # prompt 1: a then b
        ("cfg-b", 1, 20),
        ("cfg-a", 1, 20),  # prompt 2: rotated, b first
        ("cfg-a", 4, 10),
        ("cfg-b", 4, 10),  # the large batch, row by row
    ]
    assert calls == one_round * 2
    # a: prompt 1 best of 5, 3 -> 3; prompt 2 best of 2, 6 -> 2; 30 tokens in 5 s
    assert out["a"] == {"tps_b1": 30 / 5, "latency_b1_s": 5 / 2, "tps_big": 40 / 8}
    # b: prompt 1 -> 1, prompt 2 -> 0.5 (the best of each prompt, not of a whole round)
    assert out["b"] == {"tps_b1": 30 / 1.5, "latency_b1_s": 1.5 / 2, "tps_big": 40 / 1}


def test_race_prompts_are_the_lm_eval_models_prompts():
    """The timed prompts are the ids the lm-eval model decodes (chat template, one BOS)."""
    from d2f.lmeval.lm import D2FLM
    from d2f.tinyworld.pretrain import ASSETS
    from d2f.tinyworld.race import prompt_ids

    lm = D2FLM(pretrained=str(ASSETS / "teacher"), block_size=8, max_new_tokens=24)
    q = records("add2", "test", 1)[0]["question"]
    expected = lm._prompt_ids(lm.apply_chat_template([{"role": "user", "content": q}]))
    assert prompt_ids(lm.tokenizer, q) == expected
    assert expected.count(lm.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("world", ["add2", "chain"])
@pytest.mark.parametrize("kind", ["teacher", "ar", "student"])
def test_every_world_has_its_train_presets(world, kind):
    import yaml

    from d2f.config import config_dir
    from d2f.tinyworld.world import WORLDS, preset

    cfg = yaml.safe_load((config_dir() / "train" / f"{preset(world, kind)}.yaml").read_text())
    assert cfg["objective"] == {"teacher": "mdm", "ar": "ar", "student": "distill"}[kind]
    if kind == "student":  # the student's blocks are the quickstart's decoding blocks
        assert cfg["noise"]["block_size"] == quickstart.SIZES[world].student_block
    if world == "chain" and kind == "student":
        assert cfg["noise"]["block_size"] >= 8
    if kind == "teacher":  # the world's records fit its training length (else they are skipped)
        from d2f.tinyworld.race import prompt_ids
        from d2f.tinyworld.tokenizer import train_tokenizer

        spec = WORLDS[world]
        recs = records(spec.level, "train", 200)
        tok = train_tokenizer(r["question"] + " " + r["answer"] for r in recs)
        longest = max(
            len(prompt_ids(tok, r["question"])) + len(tok(r["answer"])["input_ids"]) + 1
            for r in recs
        )
        assert longest <= spec.max_length, (longest, spec.max_length)


def test_train_seconds_sums_every_segment_of_a_resumed_run(tmp_path):
    from d2f.tinyworld.pretrain import train_seconds

    lines = [  # steps 0-100 at 200 ms, 100-150 at 400 ms (a resumed segment), 150-250 at 100 ms
        '{"step": 100, "ms_per_step": 200.0}',
        '{"step": 150, "ms_per_step": 400.0}',
        '{"step": 250, "ms_per_step": 100.0}',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert train_seconds(tmp_path) == pytest.approx(20.0 + 20.0 + 10.0)


def test_learning_curve_scores_each_checkpoint_once_across_resumes(tmp_path, monkeypatch):
    from d2f.tinyworld import pretrain
    from d2f.tinyworld.world import WORLDS

    scored = []

    def fake_score(out, model, kind, name, spec, n):
        step = int(model.parent.name.split("-")[1])
        scored.append(step)
        return {"exact_match_strict": step / 10_000}

    monkeypatch.setattr(pretrain, "score", fake_score)
    run = tmp_path / "run"
    for step in (1000, 2000):
        (run / f"checkpoint-{step:06d}").mkdir(parents=True)
    path, spec = tmp_path / "curve_teacher.json", WORLDS["chain"]
    first = pretrain.learning_curve(path, pretrain.checkpoints(run), "teacher", "chain", spec, 100)
    assert scored == [1000, 2000] and [p["step"] for p in first] == [1000, 2000]
    # a later session: the old checkpoints are gone (a fresh machine), one new one is there
    for step in (1000, 2000):
        (run / f"checkpoint-{step:06d}").rmdir()
    (run / "checkpoint-003000").mkdir()
    again = pretrain.learning_curve(path, pretrain.checkpoints(run), "teacher", "chain", spec, 100)
    assert scored == [1000, 2000, 3000]  # only the new one was scored
    assert [(p["step"], p["exact_match_strict"]) for p in again] == [
        (1000, 0.1),
        (2000, 0.2),
        (3000, 0.3),
    ]
    pretrain.learning_curve(path, pretrain.checkpoints(run), "teacher", "chain", spec, 50)
    assert scored[-1] == 3000  # another sample size is another curve


def test_pretrain_continues_from_a_saved_work_directory(tmp_path, monkeypatch):
    """`--seed_from`: a committed state (runs + curve) is copied into an empty --work and the runs
    continue from it (here `train` is stubbed: the trainer's own resume is tested in
    tests/test_checkpoint.py); a directory that is not a pretrain work directory is refused."""
    from d2f.tinyworld import pretrain

    saved = tmp_path / "saved"
    ckpt = saved / "run_ar" / "checkpoint-000500"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "weights").write_text("w")
    (saved / "run_ar" / "metrics.jsonl").write_text('{"step": 500, "ms_per_step": 100.0}\n')
    (saved / "curve_ar.json").write_text('{"500": {"n": 4, "exact_match_strict": 0.5}}\n')
    seen = {}

    def fake_train(world, spec, name, kind, run_dir, threads, steps):
        seen["checkpoints"] = [p.name for p in pretrain.checkpoints(run_dir)]

    monkeypatch.setattr(pretrain, "train", fake_train)
    monkeypatch.setattr(pretrain, "build_world", lambda out, spec: None)
    monkeypatch.setattr(pretrain, "score", lambda *a, **k: {"exact_match_strict": 0.75, "n": 8})
    args = ["--world", "chain", "--only", "ar", "--curve_n", "4", "--eval_n", "8"]
    args += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="not a pretrain work directory"):
        pretrain.main([*args, "--seed_from", str(saved)])
    (saved / ".d2f_pretrain_work").touch()
    pretrain.main([*args, "--seed_from", str(saved)])
    assert seen["checkpoints"] == ["checkpoint-000500"]  # the run started from the saved state
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    info = manifest["models"]["ar"]
    assert info["steps"] == 500 and info["train_wall_s"] == 50.0
    assert info["learning_curve"]["points"] == [{"step": 500, "exact_match_strict": 0.5}]
    assert (tmp_path / "out" / "ar" / "weights").read_text() == "w"
    env = manifest["environment"]
    assert env["threads"] == 1 and env["torch"] and env["cpu"]


def test_students_build_in_parallel_and_a_failure_is_not_swallowed(tmp_path):
    """The quickstart distils its two students at once: both jobs run concurrently (each waits
    for the other to start), their results come back by name, and a failing job's error reaches
    the caller instead of a half-built table."""
    import threading

    started = threading.Barrier(2, timeout=10)

    def job(name):
        started.wait()  # deadlocks (BrokenBarrierError after 10 s) unless both run at once
        return tmp_path / name

    out = stages.build_in_parallel(
        {"student": lambda: job("a"), "student_random": lambda: job("b")}, 2, tmp_path, 10
    )
    assert out == {"student": tmp_path / "a", "student_random": tmp_path / "b"}

    def broken():
        raise RuntimeError("trainer failed")

    with pytest.raises(RuntimeError, match="trainer failed"):
        stages.build_in_parallel({"student": broken, "student_random": lambda: 1}, 2, tmp_path, 1)


def test_progress_reads_the_last_logged_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert stages._last_step(metrics) == 0  # not written yet
    metrics.write_text('{"step": 25, "loss": 1.0}\n{"step": 50, "loss": 0.5}\n')
    assert stages._last_step(metrics) == 50
    metrics.write_text('{"step": 25}\n{"ste')  # a line being written
    assert stages._last_step(metrics) == 0


def test_speed_up_is_n_a_when_vanilla_generated_nothing():
    """A barely trained teacher (the shrunk --fresh run) may end every answer at once: vanilla's
    TPS is 0 and the speed-up column must say n/a instead of dividing by zero."""
    assert results.ratio(6.0, 3.0) == 2.0
    assert results.ratio(6.0, 0.0) is None
    assert results.times(None) == "n/a" and results.times(2.0) == "2.00x"


def test_recipes_need_the_worlds_presets(capsys):
    """--recipes on a world without the recipes' presets stops before any work, naming them."""
    with pytest.raises(SystemExit):
        quickstart.main(["--world", "add2", "--recipes", "--out", "/nonexistent/never-written"])
    err = capsys.readouterr().err
    assert "--recipes" in err and "tinyworld_dparallel" in err


@pytest.mark.slow
def test_quickstart_recipes_stage_shrunk(tmp_path):
    """--recipes, with seconds of training: the teacher's trajectories are written, dParallel and
    d3LLM train LoRA adapters on them from the teacher, Fast-dLLM v2 fully fine-tunes the AR model
    into a block-diffusion model, and each gets its table row (scored and timed)."""
    import csv
    import subprocess
    import sys

    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "d2f.tinyworld.quickstart", "--out", str(out), "--recipes"]
    cmd += ["--recipe_steps", "4", "--trajectories", "12", "--student_steps", "4", "--n", "8"]
    cmd += ["--big_batch", "4", "--time_n", "1", "--repeats", "1", "--no_sweep"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    (traj,) = out.glob("cache/trajectories-*/trajectories.jsonl")
    lines = [json.loads(line) for line in traj.read_text().splitlines()]
    assert len(lines) == 12  # one token per step: the ranks are a permutation of the steps
    assert all(sorted(r["decode_rank"]) == list(range(r["gen_length"])) for r in lines)
    for kind in ("dparallel", "d3llm"):
        (run_dir,) = out.glob(f"cache/{kind}-*")
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    (fdv2,) = out.glob("cache/fdv2-*")
    config = json.loads((fdv2 / "model" / "config.json").read_text())
    assert config["bd_size"] == 8 and "mask_token_id" in config  # a block-diffusion AR model
    with (out / "results" / "table.csv").open() as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    for row in quickstart.recipe_rows(quickstart.SIZES["chain"]):
        assert table[row.name]["model"] == row.model
        assert float(table[row.name]["tpf"]) > 0 and float(table[row.name]["tps_b1"]) > 0
