"""Question/answer records -> fixed-length training sequences (paper Sec. 3).

A sequence is

    [ prompt | answer | end | pad ... pad ]        length = max_length

with prompt = the question through the tokenizer's chat template (generation prompt included) when
the family uses one (else the plain question), end = the family's answer-end token (LLaDA
`<|eot_id|>`, Dream eos) and pad = the family's pad token. Records whose prompt + answer + end do not
fit in `max_length` are skipped and counted. Sources are hub dataset ids, local dataset directories
or local .jsonl/.json/.parquet/.csv files, concatenated in the given order.

Everything here runs before the model is loaded, so a missing field or an empty dataset fails fast.
The order of records is `EpochSampler`'s: a fresh permutation per epoch from (seed, epoch), a cursor
that is saved in checkpoints, and the same global batch on every process (each takes its own rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from d2f.config import DataConfig
from d2f.family import Family
from d2f.paths import is_local

# per-record fields of a trajectory file (docs/formats.md) that the trainer reads when present
TRAJECTORY_FIELDS = ("prompt_ids", "answer_ids", "decode_rank")
# decode rank of a position the teacher never decoded (beyond its generation length): last of all
NEVER_DECODED = 2**30

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_records(cfg: DataConfig):
    """All sources as one `datasets.Dataset` with exactly the question and answer columns."""
    import datasets

    datasets.disable_progress_bars()
    parts = []
    for i, src in enumerate(cfg.sources):
        key = f"data.sources[{i}] ({src})"
        path = Path(src).expanduser()
        if path.is_file():
            builder = _BUILDERS.get(path.suffix)
            if builder is None:
                raise ValueError(f"{key}: unsupported file type; use one of {sorted(_BUILDERS)}")
            if builder == "json" and path.suffix == ".jsonl":
                _check_jsonl(
                    path,
                    key,
                    {"question_field": cfg.question_field, "answer_field": cfg.answer_field},
                )
            elif path.stat().st_size == 0:  # datasets fails obscurely on an empty file
                raise ValueError(f"{key}: no records in {path} (the file is empty)")
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cfg.cache_dir
            )
        elif path.is_dir() and (path / "state.json").exists():  # Dataset.save_to_disk
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir() or not is_local(src):  # a directory of data files, or a hub id
            ds = datasets.load_dataset(
                str(path) if path.is_dir() else src, split=cfg.split, cache_dir=cfg.cache_dir
            )
        else:
            raise FileNotFoundError(f"{key}: no such file or directory")
        for field_key, name in (
            ("question_field", cfg.question_field),
            ("answer_field", cfg.answer_field),
        ):
            if name not in ds.column_names:
                raise ValueError(
                    f"{key}: no field {name!r} (data.{field_key}); its fields: {ds.column_names}"
                )
        _check_no_nulls(ds, key, (cfg.question_field, cfg.answer_field))
        parts.append(ds)
    # a teacher-trajectory file's extra fields (d2f.trajectories) are kept when every source has
    # them: `answer_ids` replace the re-tokenized answer, `decode_rank` feeds the d3llm objective
    extra = [c for c in TRAJECTORY_FIELDS if all(c in ds.column_names for ds in parts)]
    parts = [ds.select_columns([cfg.question_field, cfg.answer_field, *extra]) for ds in parts]
    records = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if cfg.max_records is not None:
        records = records.select(range(min(cfg.max_records, len(records))))
    if len(records) == 0:
        raise ValueError(f"data.sources {list(cfg.sources)}: no records")
    return records


def iter_jsonl(path: Path, where: str = ""):
    """(line number, record) for every non-blank line of a JSON-lines file; a line that is not a
    JSON object is an error naming the file and line (`where`, e.g. a config key, is appended)."""
    tag = f" [{where}]" if where else ""
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}){tag}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: not a JSON object{tag}")
            yield number, record


def _check_jsonl(path: Path, key: str, names: dict[str, str]) -> None:
    """Every non-blank line is a JSON object with a non-null value for each field (else an error
    naming the file and line); at least one record. names: config key -> field name."""
    records, first_keys, bad, seen = 0, None, {}, set()
    for number, record in iter_jsonl(path, key):
        first_keys = list(record) if first_keys is None else first_keys
        for name in names.values():
            if record.get(name) is not None:
                seen.add(name)
            elif name not in bad:
                bad[name] = (number, "is null" if name in record else "is missing")
        records += 1
    if records == 0:
        raise ValueError(f"{key}: no records in {path}")
    for field_key, name in names.items():
        if name not in seen:  # in no record: a wrong field name, not a bad record
            raise ValueError(
                f"{key}: no field {name!r} (data.{field_key}); its fields: {first_keys}"
            )
        if name in bad:
            number, what = bad[name]
            raise ValueError(f"{path}:{number}: field {name!r} {what} [{key}]")


def _check_no_nulls(ds, key: str, names: tuple[str, ...]) -> None:
    """No record of a loaded source lacks a field (datasets fills a missing field with None)."""
    for name in names:
        nulls = [k for k, value in enumerate(ds[name]) if value is None]
        if nulls:
            raise ValueError(
                f"{key}: {len(nulls)} record(s) with no {name!r} (null or missing), the first "
                f"is record {nulls[0]} (0-based); fix or drop them"
            )


@dataclass
class Encoded:
    """Tokenized records, unpadded. ids[k] = prompt + answer + end; prompt_lens[k] = len(prompt)."""

    ids: list[list[int]]
    prompt_lens: list[int]
    skipped: int  # records that did not fit in max_length
    max_length: int
    pad_token_id: int
    # the teacher's decode rank of each generated column (answer column j = position
    # prompt_len + j), per sequence; None when the records carry no `decode_rank`
    ranks: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def encode_records(records, cfg: DataConfig, tokenizer, family: Family) -> Encoded:
    """Tokenize question/answer records into sequences; skip (and count) those that do not fit."""
    if tokenizer is None:
        raise ValueError("model.path: the checkpoint has no tokenizer files; training needs one")
    use_template = family.use_chat_template if cfg.chat_template is None else cfg.chat_template
    for name in (cfg.question_field, cfg.answer_field):  # str(None) would train on "None"
        if any(value is None for value in records[name]):
            raise ValueError(f"data: a record has no {name!r} (null); fix or drop it")
    questions = [str(q) for q in records[cfg.question_field]]
    answers = [str(a) for a in records[cfg.answer_field]]
    if use_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template=true but the tokenizer has no chat template")
        texts = tokenizer.apply_chat_template(
            [[{"role": "user", "content": q}] for q in questions],
            add_generation_prompt=True,
            tokenize=False,
        )
        # the template already holds any bos; add nothing more
        prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        prompts = tokenizer(questions)["input_ids"]
    columns = set(records.column_names)
    if (
        "answer_ids" in columns
    ):  # a trajectory file: the teacher's own tokens, not a re-tokenization
        answer_ids = [list(a) for a in records["answer_ids"]]
    else:
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    if "prompt_ids" in columns:
        _check_same_prompts(prompts, records["prompt_ids"])
    ranks = [list(r) for r in records["decode_rank"]] if "decode_rank" in columns else None
    end = family.answer_end_token_id
    out = Encoded([], [], 0, cfg.max_length, family.pad_token_id, [] if ranks else None)
    for k, (prompt, answer) in enumerate(zip(prompts, answer_ids, strict=True)):
        seq = list(prompt) + list(answer) + [end]
        if len(seq) > cfg.max_length or not prompt:
            out.skipped += 1
            continue
        out.ids.append(seq)
        out.prompt_lens.append(len(prompt))
        if ranks is not None:
            out.ranks.append(ranks[k])
    if not out.ids:
        raise ValueError(
            f"data.max_length={cfg.max_length}: none of the {len(questions)} records fits "
            "(prompt + answer + end token)"
        )
    return out


def _check_same_prompts(prompts: list[list[int]], stored) -> None:
    """The trajectory was decoded from the prompt this run trains on (else its ranks are offset)."""
    for k, (prompt, saved) in enumerate(zip(prompts, stored, strict=True)):
        if saved is not None and list(prompt) != list(saved):
            raise ValueError(
                f"data: record {k} (0-based): its prompt tokens differ from the `prompt_ids` the "
                "trajectory was decoded from (data.chat_template or the tokenizer differ from "
                "the trajectory run's); the decode ranks would not line up"
            )


@dataclass
class TokenBatch:
    """A padded batch. input_ids (B, L) long; prompt_lens (B,) long; lengths (B,) long = real
    tokens (prompt + answer + end); positions >= lengths are padding. decode_rank: (B, L) long,
    the teacher's decode step of each answer position (-1 on the prompt, NEVER_DECODED where the
    teacher generated nothing), or None without trajectories."""

    input_ids: Tensor
    prompt_lens: Tensor
    lengths: Tensor
    decode_rank: Tensor | None = None

    def rows(self, start: int, stop: int) -> TokenBatch:
        rank = None if self.decode_rank is None else self.decode_rank[start:stop]
        return TokenBatch(
            self.input_ids[start:stop], self.prompt_lens[start:stop], self.lengths[start:stop], rank
        )


def collate(data: Encoded, indices: list[int]) -> TokenBatch:
    """Right-pad the chosen sequences with the family's pad token to `max_length`."""
    L = data.max_length
    input_ids = torch.full((len(indices), L), data.pad_token_id, dtype=torch.long)
    lengths = torch.empty(len(indices), dtype=torch.long)
    rank = None if data.ranks is None else torch.full((len(indices), L), NEVER_DECODED)
    for row, k in enumerate(indices):
        seq = data.ids[k]
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths[row] = len(seq)
        if rank is not None:
            p = data.prompt_lens[k]
            cols = data.ranks[k][: L - p]  # answer column j sits at position p + j
            rank[row, :p] = -1
            cols = torch.tensor(cols, dtype=torch.long)
            rank[row, p : p + len(cols)] = torch.where(cols < 0, NEVER_DECODED, cols)
    prompt_lens = torch.tensor([data.prompt_lens[k] for k in indices], dtype=torch.long)
    return TokenBatch(input_ids, prompt_lens, lengths, rank)


class EpochSampler:
    """Deterministic, resumable record order: epoch e is `randperm(n)` drawn from seed + e.

    `take(k)` returns the next k indices, running into the next epoch when one ends, so every
    global batch is full. Its state (epoch, cursor) is part of each checkpoint.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError(f"EpochSampler needs at least one record, got n={n}")
        self.n, self.seed = n, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            step = min(k - len(out), self.n - self.cursor)
            out.extend(self._perm[self.cursor : self.cursor + step])
            self.cursor += step
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(
                f"the checkpoint's data had {state['n']} records, this run's has {self.n}: "
                "resume with the same data (data.*) or start a new train.output_dir"
            )
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)
