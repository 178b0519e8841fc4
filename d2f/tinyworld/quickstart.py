"""`python -m d2f.tinyworld.quickstart` (`bash scripts/quickstart.sh`): D2F's whole story on a CPU.

From a miniature world's pretrained teacher and AR baseline that ship with the package (LLaDA and
Llama formats), this distils two D2F students with the real trainer (`python -m d2f.train`, LoRA,
asymmetric distillation): one with D2F's ramp schedule and one with the random schedule (the
paper's Table 4 ablation). Then it scores every row of the leaderboard through lm-eval on the
held-out split (`rows`: vanilla, Fast-dLLM, D2F without distillation, the random-schedule
student, cache-only, pipelined, AR and the peer decoders), times every row side by side in one
process (`d2f.tinyworld.race`), sweeps the student's thresholds (the paper's Figure 2) and draws a
decode with two blocks in flight. It writes `OUT/results/`: table.md / table.csv, sweep.md /
sweep.png, decode_student.png / .html. Every stage is cached by the content of everything that
changes its result (inputs, the package's code, the configs, package versions, thread count, CPU):
a second run reuses them. `--fresh` also rebuilds the teacher and the AR baseline
(`d2f.tinyworld.pretrain`, into OUT). `--recipes` (opt-in) also trains the peer training recipes
(the teacher's trajectories, then dParallel and d3LLM on them from the teacher, and Fast-dLLM v2
from the AR model) and adds their rows, each decoded as its authors decode.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from d2f.config import config_dir
from d2f.tinyworld.pretrain import assets_dir
from d2f.tinyworld.results import PIPELINED, blocks_in_flight, read_eval, write_results
from d2f.tinyworld.stages import (
    D2F,
    RECIPES,
    build_in_parallel,
    cached,
    digest,
    distil,
    environment,
    preset_file,
    preset_steps,
    train_recipes,
)
from d2f.tinyworld.world import WORLDS, WorldSpec, build_world

EVAL_VERSION = "3: scores at the large batch, speeds from the side-by-side race"  # in every key


@dataclass(frozen=True)
class Sizes:
    """A world's decoding sizes: the student's block (its training blocks), the teacher's block
    for the bidirectional rows, the answer budget, and D2F's thresholds."""

    student_block: int
    block: int
    max_new_tokens: int
    tau_add: float
    tau_act: float = 0.95
    tau_conf: float = 0.9


SIZES = {
    # first edition: 16-token answers in blocks of 4 (tau_add 0.1 and 0.5 alike at block 4)
    "add2": Sizes(student_block=4, block=8, max_new_tokens=24, tau_add=0.5),
    # second edition: 42-token answers, blocks of 8, the paper's thresholds
    "chain": Sizes(student_block=8, block=8, max_new_tokens=48, tau_add=0.1),
}


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # teacher | student | student_random | ar
    decode: dict


def d2f_decode(z: Sizes, **taus) -> dict:
    taus = {"tau_add": z.tau_add, "tau_act": z.tau_act, "tau_conf": z.tau_conf, **taus}
    return {"block_size": z.student_block, "max_new_tokens": z.max_new_tokens, **taus}


def rows(world: str, recipes: bool = False) -> tuple[Row, ...]:
    """The leaderboard's rows for `world`, each with the decoder its authors use (with `recipes`,
    also the peer training recipes' rows). Later methods add a Row here; nothing else changes."""
    z = SIZES[world]
    teacher = {"block_size": z.block, "max_new_tokens": z.max_new_tokens}
    # Fast-dLLM v1 with the authors' threshold rule (0.9), on vanilla's blocks
    fast = {"strategy": "fast_dllm", **teacher, "tau_conf": 0.9}
    return (
        Row("vanilla dLLM", "teacher", {"strategy": "vanilla", **teacher}),
        # early exit on vanilla's sampler, the authors' thresholds (SchED: exponential k 16 from
        # 7.5 to 2.5; Prophet: 7.5 / 5.0 / 2.5 over 5 answer columns, here from column 0)
        Row("SchED (vanilla + early exit)", "teacher", {"strategy": "sched", **teacher}),
        Row("Prophet", "teacher", {"strategy": "prophet", **teacher}),
        Row("Fast-dLLM v1 (prefix cache)", "teacher", {**fast, "options": {"cache": "prefix"}}),
        Row("Fast-dLLM v1 (dual cache)", "teacher", {**fast, "options": {"cache": "dual"}}),
        # FreeDave's own defaults (4 drafts per call, dual cache, early exit): lossless w.r.t.
        # static one-token-per-step decoding, so its score is static's
        Row("FreeDave (dual cache)", "teacher", {"strategy": "freedave", **teacher}),
        # dInfer's own defaults (threshold 0.9 with its tie rule, dual cache, early stop)
        Row("dInfer (threshold, dual cache)", "teacher", {"strategy": "dinfer", **teacher}),
        Row("D2F, no distillation", "teacher", {"strategy": "d2f", **d2f_decode(z)}),
        Row("D2F, random-schedule student", "student_random", {"strategy": "d2f", **d2f_decode(z)}),
        Row("D2F cache-only", "student", {"strategy": "cache_only", **d2f_decode(z)}),
        Row(PIPELINED, "student", {"strategy": "d2f", **d2f_decode(z)}),
        Row("autoregressive", "ar", {"strategy": "ar", **teacher}),
        # Jacobi Forcing's decoder with its authors' defaults (chunk 64, 2 blocks, pool 4):
        # lossless w.r.t. greedy AR, so its score is the AR row's
        Row("Jacobi (AR)", "ar", {"strategy": "jacobi", **teacher}),
        # d3LLM's own defaults (entropy threshold 0.5, early stop; tau_add 0.1, tau_act 0.95)
        Row("d3LLM multi-block", "teacher", {"strategy": "d3llm", **teacher}),
        Row(
            "Fast-dLLM v2",
            "student",
            {
                "strategy": "fast_dllm_v2",
                "block_size": z.student_block,
                "max_new_tokens": z.max_new_tokens,
                "options": {"sub_block_size": z.student_block // 2, "threshold": 0.9},
            },
        ),
    ) + (recipe_rows(z) if recipes else ())


def recipe_rows(z: Sizes) -> tuple[Row, ...]:
    """The peer recipes' rows, each decoded as its authors decode (docs/tinyworld.md)."""
    teacher = {"block_size": z.block, "max_new_tokens": z.max_new_tokens}
    return (
        # dParallel's eval (LLaDA/eval.sh): one block at a time (tau_add 1: a block is added when
        # the last one is complete), commit every masked position of it with entropy under 0.5,
        # at least the lowest-entropy one: d3LLM's `llada` commit rule, no cache
        Row(
            "dParallel (entropy threshold)",
            "dparallel",
            {"strategy": "d3llm", **teacher, "tau_add": 1.0, "options": {"threshold": 0.5}},
        ),
        Row("d3LLM (trajectory student, multi-block)", "d3llm", {"strategy": "d3llm", **teacher}),
        Row(
            "Fast-dLLM v2 (adapted AR)",
            "fdv2",
            {
                "strategy": "fast_dllm_v2",
                "block_size": z.student_block,
                "max_new_tokens": z.max_new_tokens,
                "options": {"sub_block_size": z.student_block // 2, "threshold": 0.9},
            },
        ),
    )


# The threshold trade-off (the paper's Figure 2): the D2F student over tau_add x tau_conf
SWEEP_TAU_ADD = (0.1, 0.5, 0.9)
SWEEP_TAU_CONF = (0.7, 0.9, 0.97)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m d2f.tinyworld.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world", choices=sorted(WORLDS), default=DEFAULT_WORLD)
    p.add_argument("--out", type=Path, default=None, help="default: outputs/tinyworld[_WORLD]")
    p.add_argument("--fresh", action="store_true", help="also rebuild the teacher and AR baseline")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("D2F_THREADS", "1")),
        help="torch threads (default 1; training is bit-identical only at the same thread count)",
    )
    p.add_argument("--n", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--big_batch", type=int, default=64, help="the large batch of the speed columns")
    p.add_argument("--time_n", type=int, default=16, help="prompts timed one by one (batch 1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the timing race (best of)")
    p.add_argument(
        "--student_steps", type=int, default=None, help="default: the world's student preset"
    )
    p.add_argument("--no_sweep", action="store_true", help="skip the threshold sweep")
    p.add_argument(
        "--serial",
        action="store_true",
        help="distil the two students one after the other (default: at once, given 2x --threads cores)",
    )
    p.add_argument(
        "--recipes",
        action="store_true",
        help=f"also train and score the peer training recipes ({', '.join(RECIPES)}; opt-in: "
        "about 10 more minutes, docs/tinyworld.md)",
    )
    p.add_argument(
        "--recipe_steps", type=int, default=None, help="default: each recipe's world preset"
    )
    p.add_argument(
        "--trajectories", type=int, default=800, help="training problems the teacher decodes"
    )
    p.add_argument("--pretrain_args", default="", help="extra args for --fresh's pretrain (tests)")
    args = p.parse_args(argv)
    for name in ("n", "big_batch", "time_n", "repeats", "threads", "trajectories"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.recipes:
        missing = [k for k in RECIPES if not preset_file(args.world, k).exists()]
        if missing:
            p.error(
                f"--recipes: world {args.world!r} has no preset for {missing} "
                f"({preset_file(args.world, missing[0])}); the chain world has them"
            )
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    world, spec = args.world, WORLDS[args.world]
    out = args.out or default_out(world)
    cache, results = out / "cache", out / "results"
    env = environment()

    # 1. the world's data (the same files the shipped models were trained on)
    world_dir = cached(cache, "world", digest(spec.key()), lambda tmp: build_world(tmp, spec))
    data = world_dir / "train.jsonl"

    # 2. the pretrained teacher and AR baseline: shipped, or rebuilt with --fresh
    if args.fresh:
        from d2f.tinyworld import pretrain

        pre = cached(
            cache,
            "pretrained",
            digest(spec.key(), args.pretrain_args, env, D2F, config_dir()),
            lambda tmp: pretrain.main(
                [
                    "--world",
                    world,
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
        pre = assets_dir(world)
    models = {"teacher": pre / "teacher", "ar": pre / "ar"}
    for name, path in models.items():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path}: no {name} model for world {world!r} "
                f"(run with --fresh, or `python -m d2f.tinyworld.pretrain --world {world}`)"
            )

    # 3. the D2F students, distilled with the real trainer: the ramp schedule (D2F) and the
    #    random schedule (the paper's Table 4 ablation)
    #    Both train at once when the machine has the cores (each at --threads): a training run is
    #    bit-identical whatever else runs beside it, only its wall time changes.
    parallel = (os.cpu_count() or 1) >= 2 * args.threads and not args.serial
    jobs = {}
    for model, schedule in (("student", "ramp"), ("student_random", "random")):
        jobs[model] = partial(
            cached,
            cache,
            model,
            digest(models["teacher"], data, config_dir(), args.student_steps, schedule, env, D2F),
            partial(
                distil,
                base=models["teacher"],
                data=data,
                world=world,
                spec=spec,
                threads=args.threads,
                steps=args.student_steps,
                extra=(f"train.noise.schedule={schedule}",),
                quiet=parallel,
            ),
        )
    if parallel:
        steps = 2 * (args.student_steps or preset_steps(world, "student"))
        runs = build_in_parallel(jobs, 2, cache, steps)
    else:
        runs = {name: job() for name, job in jobs.items()}
    adapters = {name: run / "adapter" for name, run in runs.items()}
    bases = {name: (models["teacher"], adapter) for name, adapter in adapters.items()}

    # 3b. (--recipes) the peer training recipes, each from the same shipped model as its authors'
    #     (dParallel and d3LLM: the teacher + LoRA, on the teacher's trajectories; Fast-dLLM v2:
    #     the AR model, fully fine-tuned)
    if args.recipes:
        bases |= train_recipes(cache, world, spec, SIZES[world], models, data, args, env, parallel)

    def base_of(model: str) -> tuple[Path, Path | None]:
        return bases.get(model, (models.get(model), None))

    # 4. every row's score, TPF and length through lm-eval, at the large batch (batched decoding
    #    equals decoding alone: tests/test_decoding.py)
    def scored(stage: str, model: str, decode: dict):
        base, adapter = base_of(model)
        key = digest(
            EVAL_VERSION,
            env,
            D2F,
            base,
            adapter or "-",
            json.dumps(decode, sort_keys=True),
            args.n,
            args.big_batch,
            spec.seed,
            spec.level,
        )
        build = partial(
            evaluate,
            pretrained=base,
            adapter=adapter,
            n=args.n,
            batch_size=args.big_batch,
            level=spec.level,
            seed=spec.seed,
            **decode,
        )
        return read_eval(cached(cache, stage, key, build))

    from d2f.tinyworld.evaluate import evaluate

    table_rows = rows(world, recipes=args.recipes)
    table = [
        (row, scored(f"eval-{row.decode['strategy']}-{row.model}", row.model, row.decode))
        for row in table_rows
    ]
    z = SIZES[world]
    sweep = []
    if not args.no_sweep:
        for tau_add in SWEEP_TAU_ADD:
            for tau_conf in SWEEP_TAU_CONF:
                decode = {"strategy": "d2f", **d2f_decode(z, tau_add=tau_add, tau_conf=tau_conf)}
                sweep.append(((tau_add, tau_conf), scored("eval-d2f-student", "student", decode)))

    # 5. speed: every row timed side by side in one process (d2f.tinyworld.race)
    speeds = _race(cache, table_rows, base_of, args, env, spec)

    write_results(world, table, sweep, speeds, results, args, env)
    _picture(models["teacher"], adapters["student"], results, spec, z)
    print(f"\nquickstart done in {time.perf_counter() - t_start:.0f} s; results in {results}/")


def default_out(world: str) -> Path:
    """The quickstart's default --out for `world` (the demo finds the cached student there)."""
    return Path("outputs/tinyworld" + ("" if world == DEFAULT_WORLD else f"_{world}"))


DEFAULT_WORLD = "chain"  # the second edition; `add2` stays for the test suite


def _race(cache, table_rows, base_of, args, env, spec) -> dict:
    from d2f.decoding import DecodeConfig
    from d2f.tinyworld.race import Entry, race
    from d2f.tinyworld.task import records

    entries = [Entry(r.name, r.model, DecodeConfig(**r.decode)) for r in table_rows]
    used = sorted({e.model for e in entries})
    key = digest(
        EVAL_VERSION,
        env,
        D2F,
        *(path or "-" for name in used for path in base_of(name)),
        repr(entries),
        args.time_n,
        args.big_batch,
        args.repeats,
        spec.key(),
    )

    def build(tmp: Path) -> None:
        from d2f.models import load_model

        loaded = {}
        for name in used:
            base, adapter = base_of(name)
            loaded[name] = load_model(base, adapter=adapter, merge_adapter=adapter is not None)
        questions = [r["question"] for r in records(spec.level, "test", args.big_batch, spec.seed)]
        speeds = race(
            entries, loaded, questions[: args.time_n], questions, args.big_batch, args.repeats
        )
        (tmp / "speeds.json").write_text(json.dumps(speeds, indent=2) + "\n")

    return json.loads((cached(cache, "race", key, build) / "speeds.json").read_text())


def _picture(teacher: Path, adapter: Path, results: Path, spec: WorldSpec, z: Sizes) -> None:
    """The decode picture of the first held-out problem (of 50) whose decode has two blocks in
    flight in one step, semi- and fully activated (the first problem if none has)."""
    from d2f.decoding import DecodeConfig, generate
    from d2f.models import load_model
    from d2f.render import render_html, render_png
    from d2f.tinyworld.task import records

    model, tok = load_model(teacher, adapter=adapter, merge_adapter=True)
    questions = [r["question"] for r in records(spec.level, "test", 50, spec.seed)]
    out = generate(
        model, questions, DecodeConfig(strategy="d2f", **d2f_decode(z)), tokenizer=tok, record=True
    )
    shown = [blocks_in_flight(out.trace, i, z.student_block) for i in range(len(questions))]
    pick = next((i for i, (n, both) in enumerate(shown) if n >= 2 and both), 0)
    question = questions[pick]
    title = f"D2F student: {question}"
    render_png(out.trace, results / "decode_student.png", row=pick, title=title)
    render_html(out.trace, results / "decode_student.html", row=pick, tokenizer=tok)
    n, both = shown[pick]
    print(
        f"decode picture: {results / 'decode_student.png'} (problem {pick}: up to {n} blocks in "
        f"flight{', semi- and fully activated' if both else ''})\n  Q: {question}\n"
        f"  A: {out.texts[pick]}"
    )


if __name__ == "__main__":
    main()
