"""`python -m d2f.tinyworld.pretrain`: make a miniature world's pretrained teacher and AR baseline.

This is the command whose output ships in `d2f/tinyworld/assets/` (like LLaDA on the hub): a
masked-diffusion teacher in the LLaDA checkpoint format and a same-size Llama AR baseline, both
trained by the project's own trainer (`python -m d2f.train`, objectives `mdm` and `ar`) on the
same data and tokens, each scored on the held-out split through lm-eval, with a manifest saying
the command, seed, steps, training time, torch version, CPU and thread count, the held-out score
and the learning curve (every saved checkpoint scored on a smaller held-out sample).

The runs live in `--work` and RESUME: a stopped command (a killed session, a reboot) continues
from the newest checkpoint when run again with the same arguments (`--restart` starts over).
`--out` elsewhere rebuilds without touching the shipped models.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from d2f.tinyworld.world import WORLDS, World, WorldSpec, build_world, preset, train_overrides

ASSETS = Path(__file__).resolve().parent / "assets"
# decoding used to score the shipped models (vanilla for the teacher, as its own sampler: one token
# per step, blocks of 8), sized to the world's answers
EVAL = {
    "add2": {"block_size": 8, "max_new_tokens": 24},
    "chain": {"block_size": 8, "max_new_tokens": 48},
}
STRATEGY = {"teacher": "vanilla", "ar": "ar"}
_MARKER = ".d2f_pretrain_work"


def assets_dir(world: str) -> Path:
    """Where a world's shipped models are: the first edition's at the root of `assets/` (the test
    suite's world), every later world's in `assets/<world>/`."""
    return ASSETS if world == "add2" else ASSETS / world


def train(
    world: World, spec: WorldSpec, name: str, kind: str, run_dir: Path, threads: int, steps
) -> None:
    """Train (or resume) the teacher (`kind="teacher"`, mdm) or the AR baseline (`"ar"`)."""
    init = world.teacher_init if kind == "teacher" else world.ar_init
    overrides = train_overrides(spec, preset(name, kind), init, world.data, run_dir, threads, steps)
    cmd = [
        sys.executable,
        "-m",
        "d2f.train",
        "--config-name",
        "tiny",
        *overrides,
        "model.init=scratch",
        f"model.init_seed={spec.seed}",
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint-*"))


def train_seconds(run_dir: Path) -> float:
    """Optimiser time of the run from its metrics log (every segment of a resumed run, summed)."""
    total, last = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        total += record["ms_per_step"] * (record["step"] - last) / 1000.0
        last = record["step"]
    return total


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": threads,
    }


def score(out: Path, model: Path, kind: str, name: str, spec: WorldSpec, n: int) -> dict:
    from d2f.tinyworld.evaluate import evaluate

    decode = {"strategy": STRATEGY[kind], **EVAL[name]}
    result = evaluate(out, model, n=n, batch_size=50, level=spec.level, seed=spec.seed, **decode)
    return {
        "n": n,
        **decode,
        "exact_match_strict": result["score"],
        "exact_match_flexible": result["flexible"],
        "tokens_per_forward": result["speed"].get("tokens_per_forward"),
    }


def learning_curve(
    path: Path, ckpts: list[Path], kind: str, name: str, spec: WorldSpec, n: int
) -> list[dict]:
    """Every checkpoint's held-out score on `n` problems, kept in `path` (JSON) as it goes, so a
    resumed pretrain scores only the checkpoints it has not scored (a stopped session's
    checkpoints may be gone by then; their points are not)."""
    done = json.loads(path.read_text()) if path.exists() else {}
    for ckpt in ckpts:
        step = str(int(ckpt.name.split("-")[1]))
        if done.get(step, {}).get("n") != n:
            res = score(
                path.parent / f"curve_{kind}" / ckpt.name, ckpt / "model", kind, name, spec, n
            )
            done[step] = {"n": n, "exact_match_strict": res["exact_match_strict"]}
            path.write_text(json.dumps(done, indent=1) + "\n")
            print(f"{kind} step {step}: {res['exact_match_strict']:.3f}", flush=True)
    return [
        {"step": int(k), "exact_match_strict": v["exact_match_strict"]}
        for k, v in sorted(done.items(), key=lambda kv: int(kv[0]))
        if v["n"] == n
    ]


def reproducing_command(args: argparse.Namespace) -> str:
    """The command that rebuilds these models from nothing: the settings that change them, not
    where the runs lived or which saved state they continued from (resuming is exact)."""
    parts = [
        "python -m d2f.tinyworld.pretrain",
        f"--world {args.world}",
        f"--threads {args.threads}",
    ]
    for flag in ("teacher_steps", "ar_steps", "eval_n", "curve_n"):
        if getattr(args, flag) is not None:
            parts.append(f"--{flag} {getattr(args, flag)}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m d2f.tinyworld.pretrain", description=__doc__)
    p.add_argument("--world", choices=sorted(WORLDS), default="add2")
    p.add_argument("--out", type=Path, default=None, help="default: the shipped assets")
    p.add_argument("--work", type=Path, default=None, help="default: runs/pretrain_WORLD")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is safest on a busy machine)"
    )
    p.add_argument("--teacher_steps", type=int, default=None, help="default: the world's preset")
    p.add_argument("--ar_steps", type=int, default=None, help="default: the world's preset")
    p.add_argument("--eval_n", type=int, default=200, help="held-out problems for the score")
    p.add_argument(
        "--curve_n", type=int, default=100, help="held-out problems per learning-curve point"
    )
    p.add_argument("--only", choices=("teacher", "ar"), default=None, help="train one model")
    p.add_argument("--restart", action="store_true", help="delete --work's runs and start over")
    p.add_argument(
        "--seed_from",
        type=Path,
        default=None,
        help="a saved work directory (runs, curves) to continue from when --work has no runs yet "
        "(e.g. a stopped session's state, committed or copied from another machine)",
    )
    args = p.parse_args(argv)
    name, spec = args.world, WORLDS[args.world]
    out = args.out or assets_dir(name)
    work = args.work or Path(f"runs/pretrain_{name}")
    if work.exists() and any(work.iterdir()) and not (work / _MARKER).exists():
        raise SystemExit(f"--work {work} exists and is not a pretrain work directory")  # not ours
    if args.restart and work.exists():
        shutil.rmtree(work)
    if args.seed_from is not None and not any(work.glob("run_*/checkpoint-*")):
        if not (args.seed_from / _MARKER).exists():
            raise SystemExit(f"--seed_from {args.seed_from} is not a pretrain work directory")
        shutil.copytree(args.seed_from, work, dirs_exist_ok=True)
        print(f"continuing from {args.seed_from}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / _MARKER).touch()
    world = build_world(work / "world", spec)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest = {
        "command": reproducing_command(args),
        "world_name": name,
        "world": asdict(spec),
        "seed": spec.seed,
        "environment": environment(args.threads),
        "continued_from": str(args.seed_from) if args.seed_from else None,
        "models": old.get("models", {}) if old.get("world") == asdict(spec) else {},
    }
    kinds = [args.only] if args.only else ["teacher", "ar"]
    for kind in kinds:
        run_dir = work / f"run_{kind}"
        steps = args.teacher_steps if kind == "teacher" else args.ar_steps
        train(world, spec, name, kind, run_dir, args.threads, steps)
        ckpts = checkpoints(run_dir)
        curve = learning_curve(work / f"curve_{kind}.json", ckpts, kind, name, spec, args.curve_n)
        dest = out / kind
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ckpts[-1] / "model", dest)
        held_out = score(work / f"eval_{kind}", dest, kind, name, spec, args.eval_n)
        manifest["models"][kind] = {
            "path": dest.name,
            "objective": "mdm" if kind == "teacher" else "ar",
            "steps": int(ckpts[-1].name.split("-")[1]),
            "train_wall_s": round(train_seconds(run_dir), 1),  # optimiser steps, all segments
            "held_out_eval": held_out,
            "learning_curve": {"n": args.curve_n, "points": curve},
        }
        print(
            f"{kind}: held-out exact match {held_out['exact_match_strict']:.3f} "
            f"({args.eval_n} problems) -> {dest}",
            flush=True,
        )
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"manifest: {manifest_path}")


if __name__ == "__main__":
    main()
