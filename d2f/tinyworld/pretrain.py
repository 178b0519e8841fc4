"""`python -m d2f.tinyworld.pretrain`: make the miniature world's pretrained teacher and AR baseline.

This is the command whose output ships in `d2f/tinyworld/assets/` (like LLaDA on the hub): a
masked-diffusion teacher in the LLaDA checkpoint format and a same-size Llama AR baseline, both
trained by the project's own trainer (`python -m d2f.train`, objectives `mdm` and `ar`) on the
same data and tokens, each scored on the held-out split through lm-eval, with a manifest saying
the command, seed, steps, wall time and score. `--out` elsewhere rebuilds without touching them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from d2f.tinyworld.world import World, WorldSpec, build_world, train_overrides

ASSETS = Path(__file__).resolve().parent / "assets"
# decoding used to score the shipped models (vanilla for the teacher, as its own sampler)
TEACHER_EVAL = {"strategy": "vanilla", "block_size": 8, "max_new_tokens": 24}
AR_EVAL = {"strategy": "ar", "block_size": 8, "max_new_tokens": 24}


def train(
    world: World, kind: str, run_dir: Path, threads: int, steps: int | None, spec: WorldSpec
) -> Path:
    """Train the teacher (`kind="teacher"`, mdm) or the AR baseline (`"ar"`); returns its model dir."""
    init = world.teacher_init if kind == "teacher" else world.ar_init
    overrides = train_overrides(
        spec, f"tinyworld_{kind}", init, world.data, run_dir, threads, steps
    )
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
    (last,) = sorted(run_dir.glob("checkpoint-*"))[-1:]
    return last / "model"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m d2f.tinyworld.pretrain", description=__doc__)
    p.add_argument(
        "--out", type=Path, default=ASSETS, help="where the models go (default: the shipped assets)"
    )
    p.add_argument(
        "--work", type=Path, default=Path("runs/tinyworld_pretrain"), help="data and runs"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is safest on a busy 2-core machine)",
    )
    p.add_argument(
        "--teacher_steps",
        type=int,
        default=None,
        help="default: d2f/configs/train/tinyworld_teacher.yaml",
    )
    p.add_argument(
        "--ar_steps", type=int, default=None, help="default: d2f/configs/train/tinyworld_ar.yaml"
    )
    p.add_argument(
        "--eval_n", type=int, default=200, help="held-out problems scored for the manifest"
    )
    args = p.parse_args(argv)
    spec = WorldSpec()
    work = args.work
    marker = work / ".d2f_pretrain_work"
    if work.exists() and any(work.iterdir()):
        if not marker.exists():  # never delete a directory we did not make
            raise SystemExit(f"--work {work} exists and is not a pretrain work directory")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    world = build_world(work / "world", spec)
    manifest = {
        "command": "python -m d2f.tinyworld.pretrain " + " ".join(argv or sys.argv[1:]),
        "world": asdict(spec),
        "threads": args.threads,
        "models": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from d2f.tinyworld.evaluate import evaluate

    for kind, steps, decode in (
        ("teacher", args.teacher_steps, TEACHER_EVAL),
        ("ar", args.ar_steps, AR_EVAL),
    ):
        t0 = time.perf_counter()
        model_dir = train(world, kind, work / f"run_{kind}", args.threads, steps, spec)
        wall = time.perf_counter() - t0
        dest = args.out / kind
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(model_dir, dest)
        result = evaluate(
            work / f"eval_{kind}", dest, n=args.eval_n, batch_size=50, seed=spec.seed, **decode
        )
        manifest["models"][kind] = {
            "path": dest.name,
            "objective": "mdm" if kind == "teacher" else "ar",
            "steps": steps or _preset_steps(kind),
            "train_wall_s": round(wall, 1),
            "held_out_eval": {
                "n": args.eval_n,
                **decode,
                "exact_match_strict": result["score"],
                "exact_match_flexible": result["flexible"],
            },
        }
        print(
            f"{kind}: held-out exact match {result['score']:.3f} ({args.eval_n} problems), "
            f"trained in {wall:.0f} s -> {dest}",
            flush=True,
        )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"manifest: {args.out / 'manifest.json'}")


def _preset_steps(kind: str) -> int:
    import yaml

    from d2f.config import config_dir

    return yaml.safe_load((config_dir() / "train" / f"tinyworld_{kind}.yaml").read_text())[
        "max_steps"
    ]


if __name__ == "__main__":
    main()
