"""`python -m d2f.trajectories`: the teacher's own answers and decode order, for dParallel / d3LLM.

Decodes every question of a dataset with the teacher the way both recipes' authors do: LLaDA's
semi-autoregressive sampler, one token per step (`vanilla`, steps per block = block size, so
steps = generation length), committing the most confident masked token of the current block
(low-confidence remasking), greedy. d3LLM's `d3llm_llada_generate_partly.py` keeps the whole
sequence after each of its 256 steps; here each answer column's decode rank (the 0-based step
that committed it) is stored instead, which holds the same mask patterns in far less space
(state t = the columns with rank <= t). dParallel trains on the answers, d3LLM on the ranks.

    python -m d2f.trajectories --model DIR --data train.jsonl --out traj.jsonl \\
        [--question-field question --answer-field answer --block-size 8 --gen-length 48]

One JSON object per line (fields: docs/formats.md), in dataset order, batch by batch. Resumable:
run the same command again and it appends what is missing. Each batch is written with one write
and fsync; a line cut short by a kill is dropped (the file is truncated to its last whole line)
before resuming. Batches are fixed slices of the dataset order, so a resumed file equals a file
written in one run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from d2f.config import DataConfig
from d2f.data import load_records
from d2f.decoding import DecodeConfig, StepEvent, generate
from d2f.decoding.api import encode_prompts
from d2f.family import family_of


def trajectory_config(block_size: int, gen_length: int) -> DecodeConfig:
    """One token per step: `vanilla`, low-confidence remasking, greedy, steps = gen_length."""
    if block_size <= 0 or gen_length <= 0 or gen_length % block_size:
        raise ValueError(
            f"gen_length ({gen_length}) must be a positive multiple of block_size ({block_size})"
        )
    return DecodeConfig(
        strategy="vanilla",
        block_size=block_size,
        max_new_tokens=gen_length,
        steps_per_block=block_size,
        remasking="low_confidence",
        temperature=0.0,
    )


def decode_with_ranks(model, prompts: list[list[int]], cfg: DecodeConfig, tokenizer=None):
    """`generate` with each answer column's decode rank. Returns (DecodeOutput, (B, G) long
    ranks: the 0-based step that committed column j; -1 for a column never committed)."""
    rank = torch.full((len(prompts), cfg.gen_length), -1, dtype=torch.long)

    def on_step(event: StepEvent) -> None:
        rows, committed = event.rows.cpu(), event.committed.cpu()  # (b,), (b, G)
        rank[rows] = torch.where(committed, event.step - 1, rank[rows])

    out = generate(model, prompts, cfg, tokenizer=tokenizer, on_step=on_step)
    return out, rank


def read_done(path: Path, settings: dict) -> set[int]:
    """Indices already in `path`. A last line cut short (no newline or not JSON) is removed from
    the file; a bad line elsewhere, or a record written with other settings, is an error."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    lines = data[:whole].decode("utf-8").splitlines()
    if whole < len(data):  # a partial last line: a kill inside a write
        with path.open("r+b") as f:
            f.truncate(whole)
    done = set()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not valid JSON; not a trajectory file?") from None
        for key, value in settings.items():
            if record.get(key) != value:
                raise ValueError(
                    f"{path}:{number}: written with {key}={record.get(key)!r}, this run has "
                    f"{value!r}: use another --out or the same settings"
                )
        done.add(record["index"])
    return done


def append_lines(path: Path, records: list[dict]) -> None:
    """One write + fsync per batch: a kill leaves at most one partial last line."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def write_trajectories(
    model,
    tokenizer,
    questions: list[str],
    references: list[str] | None,
    out: Path,
    block_size: int,
    gen_length: int,
    batch_size: int = 64,
    progress: bool = True,
) -> int:
    """Decode `questions` in fixed batches of `batch_size` and append the missing records to
    `out`. Returns the number of records written by this call."""
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    cfg = trajectory_config(block_size, gen_length)
    settings = {"block_size": block_size, "gen_length": gen_length}
    done = read_done(out, settings)
    family = family_of(model)
    written = 0
    bar = tqdm(total=len(questions), initial=len(done), desc="trajectories", disable=not progress)
    for start in range(0, len(questions), batch_size):
        todo = [i for i in range(start, min(start + batch_size, len(questions))) if i not in done]
        if not todo:
            continue
        prompts = encode_prompts([questions[i] for i in todo], tokenizer, family, cfg)
        result, rank = decode_with_ranks(model, prompts, cfg, tokenizer)
        records = []
        for row, i in enumerate(todo):
            records.append(
                {
                    "index": i,
                    "question": questions[i],
                    "answer": result.texts[row],
                    "answer_ids": result.tokens[row],
                    "prompt_ids": prompts[row],
                    "decode_rank": rank[row].tolist(),
                    "hit_end": result.stats.rows[row].hit_end,
                    "reference": None if references is None else references[i],
                    **settings,
                }
            )
        append_lines(out, records)
        written += len(records)
        bar.update(len(records))
    bar.close()
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m d2f.trajectories",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the teacher: hub id or checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", help="question sources (as data.sources)")
    p.add_argument("--out", required=True, type=Path, help="JSON-lines file to write / append to")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer", help="reference answer, kept as `reference`")
    p.add_argument("--block-size", type=int, default=32, help="the teacher's decoding block")
    p.add_argument("--gen-length", type=int, default=256, help="answer tokens (= steps)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (None: the checkpoint's)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from d2f.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    trajectory_config(args.block_size, args.gen_length)  # bad settings fail before any loading
    data = DataConfig(
        sources=list(args.data),
        question_field=args.question_field,
        answer_field=args.answer_field,
        max_records=args.limit,
    )
    records = load_records(data)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer files")
    n = write_trajectories(
        model,
        tokenizer,
        [str(q) for q in records[args.question_field]],
        [str(a) for a in records[args.answer_field]],
        args.out,
        args.block_size,
        args.gen_length,
        args.batch_size,
    )
    print(f"{args.out}: {n} records written, {len(records)} in the dataset")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
