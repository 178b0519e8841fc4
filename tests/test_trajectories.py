"""d2f.trajectories: the teacher's answers and decode ranks, resume, and the trainer reading them."""

from __future__ import annotations

import json

import pytest

from d2f.config import DataConfig
from d2f.data import NEVER_DECODED, collate, encode_records, load_records
from d2f.decoding import generate
from d2f.family import family_of
from d2f.models import load_model
from d2f.trajectories import main, trajectory_config, write_trajectories
from tests.train_helpers import TINY_QA

QUESTIONS = [json.loads(line)["question"] for line in TINY_QA.read_text().splitlines()[:10]]


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    return load_model(tiny_dir("llada"))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ranks_are_the_decoders_step_trace(teacher, tmp_path):
    """Each record's decode_rank is the step (0-based) at which the decoder's own trace
    (record=True) committed that column; one column per step; answers as generate gives them."""
    model, tok = teacher
    out = tmp_path / "t.jsonl"
    write_trajectories(model, tok, QUESTIONS, None, out, 4, 8, 4, progress=False)
    recs = _lines(out)
    assert [r["index"] for r in recs] == list(range(10))
    for start in range(0, 10, 4):  # the same fixed batches
        qs = QUESTIONS[start : start + 4]
        cfg = trajectory_config(4, 8)
        res = generate(model, qs, cfg, tokenizer=tok, record=True)
        assert len(res.trace) == 8  # steps = generation length
        want = [[None] * 8 for _ in qs]
        for event in res.trace:
            assert event.committed.sum(dim=1).tolist() == [1] * len(qs)  # one token per step
            for row, col in event.committed.nonzero().tolist():
                want[int(event.rows[row])][col] = event.step - 1
        for k, rec in enumerate(recs[start : start + 4]):
            assert rec["decode_rank"] == want[k]
            assert rec["answer_ids"] == res.tokens[k] and rec["answer"] == res.texts[k]
            assert rec["question"] == qs[k] and rec["block_size"] == 4 and rec["gen_length"] == 8
            # semi-AR: every column of block 0 is decoded before any of block 1
            assert max(want[k][:4]) < min(want[k][4:])


def test_resume_after_a_kill_gives_the_one_run_file(teacher, tmp_path):
    model, tok = teacher
    one = tmp_path / "one.jsonl"
    write_trajectories(model, tok, QUESTIONS, None, one, 4, 8, 4, progress=False)
    text = one.read_text()
    cut = tmp_path / "cut.jsonl"
    lines = text.splitlines(keepends=True)
    cut.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # killed inside a write
    n = write_trajectories(model, tok, QUESTIONS, None, cut, 4, 8, 4, progress=False)
    assert n == 5 and cut.read_text() == text
    assert write_trajectories(model, tok, QUESTIONS, None, cut, 4, 8, 4, progress=False) == 0
    with pytest.raises(ValueError, match="written with block_size=4"):
        write_trajectories(model, tok, QUESTIONS, None, cut, 8, 8, 4, progress=False)


def test_the_trainer_reads_answers_and_ranks(teacher, tiny_dir, tmp_path):
    """The loader trains on the stored answer ids and lays each rank at prompt_len + column."""
    model, tok = teacher
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS))
    out = tmp_path / "t.jsonl"
    assert main(["--model", str(tiny_dir("llada")), "--data", str(data), "--out", str(out),
                 "--block-size", "4", "--gen-length", "8", "--batch-size", "4"]) == 0  # fmt: skip
    recs = _lines(out)
    assert [r["reference"] for r in recs] == ["x"] * 10
    cfg = DataConfig(sources=[str(out)], answer_field="answer", max_length=48)
    family = family_of(model)
    enc = encode_records(load_records(cfg), cfg, tok, family)
    batch = collate(enc, list(range(len(enc))))
    for b, rec in enumerate(recs):
        p = len(rec["prompt_ids"])
        seq = rec["prompt_ids"] + rec["answer_ids"] + [family.answer_end_token_id]
        assert enc.ids[b] == seq and int(batch.prompt_lens[b]) == p
        assert batch.decode_rank[b, :p].tolist() == [-1] * p
        assert batch.decode_rank[b, p : p + 8].tolist() == rec["decode_rank"]
        assert bool((batch.decode_rank[b, p + 8 :] == NEVER_DECODED).all())
    # a trajectory decoded from another prompt cannot be trained on
    bad = tmp_path / "bad.jsonl"
    rows = [{**r, "prompt_ids": r["prompt_ids"][1:]} for r in recs]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[str(bad)], answer_field="answer", max_length=48)
    with pytest.raises(ValueError, match="prompt tokens differ"):
        encode_records(load_records(cfg), cfg, tok, family)


def test_bad_settings_fail_first():
    with pytest.raises(ValueError, match="multiple of block_size"):
        trajectory_config(4, 10)
