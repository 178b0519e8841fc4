"""`python -m d2f.tinyworld.quickstart` (`bash scripts/quickstart.sh`): D2F's whole story on a CPU.

From the pretrained miniature teacher that ships with the package (LLaDA format) this distils a
D2F student with the real trainer (`python -m d2f.train`, LoRA, ramp schedule, distillation loss),
then evaluates every row of the paper's comparison through lm-eval on the held-out split:

  vanilla dLLM (teacher) | Fast-dLLM v1, prefix and dual cache (teacher) |
  D2F without distillation (teacher) |
  D2F cache-only (student) | D2F pipelined (student) | autoregressive baseline (shipped AR)

at batch 1 and at a large batch, and writes the table (markdown + CSV) and a decode picture to
`OUT/results/`. Every stage is cached by the content of its inputs: a second run reuses them.
`--fresh` also rebuilds the teacher and the AR baseline (`d2f.tinyworld.pretrain`, into OUT).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from d2f.config import config_dir
from d2f.tinyworld.pretrain import ASSETS
from d2f.tinyworld.world import WorldSpec, build_world, train_overrides

EVAL_VERSION = "2: adapters merged for inference"  # part of the eval cache keys: bump to re-measure
D2F_DECODE = {
    "block_size": 4,
    "max_new_tokens": 24,
    "tau_add": 0.5,
    "tau_act": 0.95,
    "tau_conf": 0.9,
}


# Fast-dLLM v1 with the authors' threshold rule (0.9, via tau_conf), blocks of 8 as vanilla's
FAST_DLLM_DECODE = {"strategy": "fast_dllm", "block_size": 8, "max_new_tokens": 24, "tau_conf": 0.9}


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # teacher | student | ar
    decode: dict


ROWS = (
    Row("vanilla dLLM", "teacher", {"strategy": "vanilla", "block_size": 8, "max_new_tokens": 24}),
    Row(
        "Fast-dLLM v1 (prefix cache)",
        "teacher",
        {**FAST_DLLM_DECODE, "options": {"cache": "prefix"}},
    ),
    Row(
        "Fast-dLLM v1 (dual cache)",
        "teacher",
        {**FAST_DLLM_DECODE, "options": {"cache": "dual"}},
    ),
    # FreeDave's own defaults (4 drafts per call, dual cache, early exit): lossless w.r.t. static
    # one-token-per-step decoding, so its score is static's; block 8, 24 tokens as Fast-dLLM's rows
    Row(
        "FreeDave (dual cache)",
        "teacher",
        {"strategy": "freedave", "block_size": 8, "max_new_tokens": 24},
    ),
    Row("D2F, no distillation", "teacher", {"strategy": "d2f", **D2F_DECODE}),
    Row("D2F cache-only", "student", {"strategy": "cache_only", **D2F_DECODE}),
    Row("D2F pipelined", "student", {"strategy": "d2f", **D2F_DECODE}),
    Row("autoregressive", "ar", {"strategy": "ar", "block_size": 8, "max_new_tokens": 24}),
    # d3LLM's own defaults (entropy threshold 0.5, early stop; tau_add 0.1, tau_act 0.95)
    Row(
        "d3LLM multi-block", "teacher", {"strategy": "d3llm", "block_size": 8, "max_new_tokens": 24}
    ),
    Row(
        "Fast-dLLM v2",
        "student",
        {
            "strategy": "fast_dllm_v2",
            "block_size": 4,  # the student's block size (D2F_DECODE)
            "max_new_tokens": 24,
            "options": {"sub_block_size": 2, "threshold": 0.9},  # sub-blocks of half a block
        },
    ),
)


def digest(*parts) -> str:
    """Content hash of strings and of files / directories (their bytes and relative names)."""
    h = hashlib.sha256()
    for part in parts:
        path = Path(part) if isinstance(part, Path) else None
        if path is not None and path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if _hashed(p))
            for f in files:
                h.update(str(f.relative_to(path.parent if path.is_file() else path)).encode())
                h.update(f.read_bytes())
        else:
            h.update(str(part).encode())
    return h.hexdigest()[:12]


def _hashed(path: Path) -> bool:
    return path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"


def cached(root: Path, stage: str, key: str, build) -> Path:
    """`root/stage-key`, built once by `build(tmp_dir)` (the directory appears only when complete)."""
    out = root / f"{stage}-{key}"
    if (out / ".done").exists():
        print(f"[{stage}] cached: {out}", flush=True)
        return out
    tmp = root / f".{stage}-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    build(tmp)
    (tmp / ".done").write_text(f"{time.perf_counter() - t0:.1f} s\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[{stage}] built in {time.perf_counter() - t0:.0f} s: {out}", flush=True)
    return out


def distil(
    tmp: Path, teacher: Path, data: Path, spec: WorldSpec, threads: int, steps: int | None
) -> None:
    overrides = train_overrides(
        spec, "tinyworld_student", teacher, data, tmp / "run", threads, steps
    )
    cmd = [sys.executable, "-m", "d2f.train", "--config-name", "tiny", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    (last,) = sorted((tmp / "run").glob("checkpoint-*"))[-1:]
    shutil.copytree(last / "adapter", tmp / "adapter")
    shutil.copy(tmp / "run" / "metrics.jsonl", tmp / "metrics.jsonl")
    shutil.rmtree(tmp / "run")


def environment() -> str:
    """What the numbers depend on besides the inputs: torch version and thread count (training and
    timing are not bit-identical across them), so they are part of every cache key and the table note."""
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


D2F = Path(__file__).resolve().parents[1]  # the installed d2f package
# the code that makes each stage: part of its cache key (a code change rebuilds the stage)
TRAIN_CODE = [
    D2F / f
    for f in (
        "train.py",
        "objectives.py",
        "loss.py",
        "schedule.py",
        "data.py",
        "checkpoint.py",
        "models.py",
        "family.py",
        "mask.py",
        "config.py",
    )
]
EVAL_CODE = [D2F / f for f in ("decoding", "lmeval", "models.py", "family.py", "mask.py")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m d2f.tinyworld.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("outputs/tinyworld"))
    p.add_argument("--fresh", action="store_true", help="also rebuild the teacher and AR baseline")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("D2F_THREADS", "1")),
        help="torch threads (default 1; training is bit-identical only at the same thread count)",
    )
    p.add_argument("--n", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--big_batch", type=int, default=50, help="the large batch of the speed columns")
    p.add_argument(
        "--student_steps", type=int, default=None, help="default: tinyworld_student preset"
    )
    p.add_argument("--pretrain_args", default="", help="extra args for --fresh's pretrain (tests)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    spec, cache = WorldSpec(), args.out / "cache"
    results = args.out / "results"

    # 1. the world's data (the same files the shipped models were trained on)
    world_dir = cached(cache, "world", digest(spec.key()), lambda tmp: build_world(tmp, spec))
    data = world_dir / "train.jsonl"

    # 2. the pretrained teacher and AR baseline: shipped, or rebuilt with --fresh
    if args.fresh:
        from d2f.tinyworld import pretrain

        pre = cached(
            cache,
            "pretrained",
            digest(spec.key(), args.pretrain_args, "fresh"),
            lambda tmp: pretrain.main(
                [
                    "--out",
                    str(tmp),
                    "--work",
                    str(tmp / "work"),
                    "--threads",
                    str(args.threads),
                    *args.pretrain_args.split(),
                ]
            ),
        )
    else:
        pre = ASSETS
    models = {"teacher": pre / "teacher", "ar": pre / "ar"}
    for name, path in models.items():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no {name} model (run with --fresh to build one)")

    # 3. the D2F student, distilled with the real trainer
    student = cached(
        cache,
        "student",
        digest(
            models["teacher"],
            data,
            config_dir(),
            args.student_steps,
            environment(),
            *TRAIN_CODE,
        ),
        lambda tmp: distil(tmp, models["teacher"], data, spec, args.threads, args.student_steps),
    )

    # 4. every row, at batch 1 and at a large batch, through lm-eval
    from d2f.tinyworld.evaluate import evaluate

    table = []
    for row in ROWS:
        base = models["teacher"] if row.model == "student" else models[row.model]
        adapter = student / "adapter" if row.model == "student" else None
        cells = {"row": row.name, "model": row.model, "strategy": row.decode["strategy"]}
        for batch in (1, args.big_batch):
            key = digest(
                EVAL_VERSION,
                environment(),
                *EVAL_CODE,
                base,
                adapter if adapter else "-",
                json.dumps(row.decode, sort_keys=True),
                args.n,
                batch,
                spec.seed,
            )
            build = partial(
                evaluate,
                pretrained=base,
                adapter=adapter,
                n=args.n,
                batch_size=batch,
                seed=spec.seed,
                **row.decode,
            )
            run = cached(cache, f"eval-{row.decode['strategy']}-{row.model}-b{batch}", key, build)
            res = _read_eval(run)
            cells[f"b{batch}"] = res
        table.append(cells)
    _write_table(table, results, args)
    _picture(models["teacher"], student / "adapter", results, spec)
    print(f"\nquickstart done in {time.perf_counter() - t_start:.0f} s; results in {results}/")


def _read_eval(run: Path):
    """The `d2f_tiny_add` row of one cached eval run, read by the results-table module."""
    from d2f.lmeval.table import find_runs, rows_of_run

    ((_, row),) = [
        (s, r) for s, r in rows_of_run(run, find_runs(run)[run]) if r.task == "d2f_tiny_add"
    ]
    return row


def _write_table(table: list[dict], results: Path, args) -> None:
    from d2f.lmeval.table import BatchRow, batch_table, markdown

    results.mkdir(parents=True, exist_ok=True)
    big = args.big_batch
    rows = [
        BatchRow(
            {"method": c["row"], "model": c["model"]},
            {1: c["b1"], big: c[f"b{big}"]},
            baseline=c["strategy"] == "vanilla",
        )
        for c in table
    ]
    header, cells = batch_table(rows, 1, big, score="exact_match,strict-match")
    md = markdown(header, cells, left=len(header))
    note = (
        f"\nHeld-out split of d2f_tiny_add ({args.n} unseen operand pairs), exact match "
        "(strict `#### N`), lm-eval. TPF = generated tokens up to and including the first end "
        f"token per forward; TPS and latency at batch 1 and at batch {big}; speed-up vs "
        f"vanilla. {environment()}, {platform.machine()} CPU ({os.cpu_count()} cores).\n"
    )
    (results / "table.md").write_text(md + note)
    with open(results / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *cells])
    print("\n" + md + note)


def _picture(teacher: Path, adapter: Path, results: Path, spec: WorldSpec) -> None:
    from d2f.decoding import DecodeConfig, generate
    from d2f.models import load_model
    from d2f.render import render_html, render_png
    from d2f.tinyworld.task import records

    model, tok = load_model(teacher, adapter=adapter)
    question = records(spec.level, "test", 1, spec.seed)[0]["question"]
    out = generate(model, [question], DecodeConfig(**D2F_DECODE), tokenizer=tok, record=True)
    render_png(out.trace, results / "decode_student.png", title=f"D2F student: {question}")
    render_html(out.trace, results / "decode_student.html", tokenizer=tok)
    print(f"decode picture: {results / 'decode_student.png'}\n  Q: {question}\n  A: {out.texts[0]}")


if __name__ == "__main__":
    main()
