"""Training data: sources, fields, chat template, end token, padding, skipping, order, fail-fast."""

from __future__ import annotations

import json

import pytest
import torch

import d2f.train
from d2f.config import DataConfig, NoiseConfig
from d2f.data import EpochSampler, collate, encode_records, load_records
from d2f.family import detect_spec
from d2f.models import load_tokenizer, read_config
from d2f.objectives import make_batch
from tests.train_helpers import TINY_QA, tiny_config

RECORDS = [
    {"question": "what is 3 plus 4 ?", "qwen7b_answer": "3 + 4 = 7 #### 7", "extra": 1},
    {
        "question": "what is the sum of 12 and 30 ?",
        "qwen7b_answer": "12 + 30 = 42 #### 42",
        "extra": 2,
    },
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _cfg(tmp_path, sources, **kw):
    return DataConfig(sources=list(sources), cache_dir=str(tmp_path / "cache"), **kw)


def _tok_family(path):
    raw = read_config(path)
    spec = detect_spec(raw)
    tok = load_tokenizer(path, spec)
    return tok, spec.facts(raw, tok)


def test_sources_concatenated_in_order(tmp_path):
    import datasets

    a = _jsonl(tmp_path / "a.jsonl", RECORDS)
    datasets.Dataset.from_list(RECORDS[::-1]).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "dir").mkdir()
    _jsonl(tmp_path / "dir" / "part-0.jsonl", RECORDS[:1])
    datasets.Dataset.from_list(RECORDS[1:]).save_to_disk(str(tmp_path / "saved"))
    sources = [a, str(tmp_path / "b.parquet"), str(tmp_path / "dir"), str(tmp_path / "saved")]
    ds = load_records(_cfg(tmp_path, sources))
    assert ds.column_names == ["question", "qwen7b_answer"]  # only the two fields are kept
    assert [r["qwen7b_answer"][:2] for r in ds] == ["3 ", "12", "12", "3 ", "3 ", "12"]
    assert len(load_records(_cfg(tmp_path, sources, max_records=3))) == 3


def test_missing_field_and_empty_data_fail_clearly(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", RECORDS)
    with pytest.raises(
        ValueError, match=r"data.sources\[0\].*no field 'answer'.*data.answer_field"
    ):
        load_records(_cfg(tmp_path, [a], answer_field="answer"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"data.sources\[1\].*no records in .*empty.jsonl"):
        load_records(_cfg(tmp_path, [a, str(empty)]))
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hello")
        load_records(_cfg(tmp_path, [str(tmp_path / "x.txt")]))


def test_llada_sequence_layout(tmp_path, tiny_dir):
    """prompt = chat template with the generation prompt; answer + <|eot_id|>; padded with eos."""
    tok, fam = _tok_family(tiny_dir("llada"))
    cfg = _cfg(tmp_path, [_jsonl(tmp_path / "a.jsonl", RECORDS)], max_length=40)
    data = encode_records(load_records(cfg), cfg, tok, fam)
    assert len(data) == 2 and data.skipped == 0
    batch = collate(data, [1, 0])
    ids, p = batch.input_ids[0], int(batch.prompt_lens[0])
    prompt = tok.convert_ids_to_tokens(ids[:p].tolist())
    assert prompt[:4] == ["<|startoftext|>", "<|start_header_id|>", "user", "<|end_header_id|>"]
    assert prompt[-3:] == ["<|start_header_id|>", "assistant", "<|end_header_id|>"]
    n = int(batch.lengths[0])
    answer = tok(RECORDS[1]["qwen7b_answer"], add_special_tokens=False)["input_ids"]
    assert ids[p:n].tolist() == answer + [fam.answer_end_token_id]
    assert fam.answer_end_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert torch.all(ids[n:] == fam.pad_token_id) and fam.pad_token_id == tok.eos_token_id
    assert batch.input_ids.shape == (2, 40)
    short = _cfg(tmp_path, cfg.sources, max_length=n - 1)  # record 1 no longer fits
    assert encode_records(load_records(short), short, tok, fam).skipped == 1


def test_dream_plain_prompt_and_no_template(tmp_path, tiny_dir):
    tok, fam = _tok_family(tiny_dir("dream"))
    cfg = _cfg(tmp_path, [_jsonl(tmp_path / "a.jsonl", RECORDS)], max_length=64)
    data = encode_records(load_records(cfg), cfg, tok, fam)
    assert data.ids[0][: data.prompt_lens[0]] == tok(RECORDS[0]["question"])["input_ids"]
    assert data.ids[0][-1] == fam.answer_end_token_id == tok.eos_token_id
    forced = _cfg(tmp_path, cfg.sources, chat_template=True)
    with pytest.raises(ValueError, match="no chat template"):
        encode_records(load_records(forced), forced, tok, fam)
    tiny = _cfg(tmp_path, cfg.sources, max_length=4)
    with pytest.raises(ValueError, match="data.max_length=4: none of the 2 records fits"):
        encode_records(load_records(tiny), tiny, tok, fam)


def test_make_batch_padding_and_ar_targets(tiny_dir, tmp_path):
    tok, fam = _tok_family(tiny_dir("llada"))
    cfg = _cfg(tmp_path, [str(TINY_QA)], max_length=48)
    tokens = collate(encode_records(load_records(cfg), cfg, tok, fam), list(range(16)))
    pos = torch.arange(48)[None]
    pad = pos >= tokens.lengths[:, None]
    prompt = pos < tokens.prompt_lens[:, None]
    gen = torch.Generator().manual_seed(0)
    with_pad = make_batch(tokens, fam, NoiseConfig("ramp", 4), gen)
    assert with_pad.valid.all() and with_pad.masked[pad].any() and not with_pad.masked[prompt].any()
    no_pad = make_batch(tokens, fam, NoiseConfig("ramp", 4, mask_padding=False), gen)
    assert torch.equal(no_pad.valid, ~pad) and not no_pad.masked[pad].any()
    assert torch.all(no_pad.blocks[pad] == -1)
    ar = make_batch(tokens, fam, NoiseConfig(None, 4), gen)
    assert torch.equal(ar.noisy_ids, tokens.input_ids) and torch.equal(ar.masked, ~prompt & ~pad)


def test_epoch_sampler_order_and_resume():
    s = EpochSampler(5, seed=3)
    first = s.take(3) + s.take(3) + s.take(4)  # two epochs
    assert sorted(first[:5]) == sorted(first[5:]) == list(range(5)) and first[:5] != first[5:]
    again = EpochSampler(5, seed=3)
    again.take(4)
    state = again.state_dict()
    resumed = EpochSampler(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(6) == first[4:10]
    with pytest.raises(ValueError, match="same data"):
        EpochSampler(6, seed=3).load_state_dict(state)


def test_data_errors_come_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(d2f.train, "load_model", no_weights)
    monkeypatch.setattr(d2f.train, "build_model", no_weights)
    with pytest.raises(ValueError, match="data.question_field"):
        d2f.train.main(tiny_config(tiny_dir("llada"), tmp_path / "run", "data.question_field=q"))


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([RECORDS[0], {"question": "what is 1 plus 1 ?", "qwen7b_answer": None}],
         r"bad.jsonl:2: field 'qwen7b_answer' is null"),
        ([RECORDS[0], RECORDS[1], {"question": "what is 1 plus 1 ?"}],
         r"bad.jsonl:3: field 'qwen7b_answer' is missing"),
        ([{"qwen7b_answer": "2"}, RECORDS[0]], r"bad.jsonl:1: field 'question' is missing"),
        ([RECORDS[0], '{"question": "x", "qwen7b_answer": '], r"bad.jsonl:2: not valid JSON"),
        (["", "  ", ""], r"data.sources\[0\] .*: no records in .*bad.jsonl"),
    ],
)  # fmt: skip
def test_bad_jsonl_lines_are_named_by_file_and_line(tmp_path, lines, match):
    """Never trained on str(None): a null or missing field, a malformed line, a file of blank
    lines each fail naming the file (and line), before any model is read."""
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    with pytest.raises(ValueError, match=match):
        load_records(_cfg(tmp_path, [str(path)]))


def test_null_answer_in_other_formats_is_an_error(tmp_path, tiny_dir):
    import datasets

    rows = [RECORDS[0], {**RECORDS[1], "qwen7b_answer": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r"1 record\(s\) with no 'qwen7b_answer'.*record 1"):
        load_records(_cfg(tmp_path, [str(tmp_path / "b.parquet")]))
    tok, fam = _tok_family(tiny_dir("llada"))
    cfg = _cfg(tmp_path, [str(tmp_path / "b.parquet")])
    with pytest.raises(ValueError, match="has no 'qwen7b_answer'"):  # the API path too
        encode_records(datasets.Dataset.from_list(rows), cfg, tok, fam)


def test_relative_path_with_one_slash_is_local(tmp_path, monkeypatch):
    """`data/nope` where `data/` exists is a missing local file, not a hub id (d2f.paths)."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data.sources\[0\] does not exist"):
        DataConfig(sources=["data/nope"])
