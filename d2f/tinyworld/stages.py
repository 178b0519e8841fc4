"""The quickstart's stages: content-hashed caching, training runs through the real trainer (one
at a time or several at once, one progress bar), the teacher's trajectories and the peer recipes.

`cached(root, stage, key, build)` builds a stage once into `root/stage-key` (it appears only when
complete); every key holds what changes the stage's result, `environment()` and the package's own
code (`D2F`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from d2f.config import config_dir
from d2f.tinyworld.pretrain import cpu_model
from d2f.tinyworld.world import WorldSpec, preset, train_overrides

RECIPES = ("dparallel", "d3llm", "fdv2")  # --recipes: the peer training recipes (d2f/configs/train)


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
    tmp: Path,
    base: Path,
    data: Path,
    world: str,
    spec: WorldSpec,
    threads: int,
    steps: int | None,
    kind: str = "student",
    extra: tuple[str, ...] = (),
    quiet: bool = False,
) -> None:
    """Train one model with the real trainer and the world's `kind` preset (`student`, or a peer
    recipe: `dparallel`, `d3llm`, `fdv2`) from `base`, into `tmp/adapter` (LoRA) or `tmp/model`
    (full fine-tuning). `quiet`: the trainer's output goes to `tmp/train.log` (several models
    training at once), shown if it fails."""
    overrides = train_overrides(spec, preset(world, kind), base, data, tmp / "run", threads, steps)
    overrides += list(extra)
    cmd = [sys.executable, "-m", "d2f.train", "--config-name", "tiny", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    if quiet:
        with open(tmp / "train.log", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            sys.stderr.write((tmp / "train.log").read_text()[-5000:])
            raise subprocess.CalledProcessError(done.returncode, cmd)
    else:
        subprocess.run(cmd, check=True)
    (last,) = sorted((tmp / "run").glob("checkpoint-*"))[-1:]
    weights = "adapter" if (last / "adapter").is_dir() else "model"
    shutil.copytree(last / weights, tmp / weights)
    shutil.copy(tmp / "run" / "metrics.jsonl", tmp / "metrics.jsonl")
    shutil.rmtree(tmp / "run")


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):  # not written yet, or a line being written
        return 0


def build_in_parallel(jobs: dict[str, Callable[[], Path]], workers: int, root: Path, total: int):
    """Run `jobs` (stage name -> a `cached(root, name, ...)` call) on `workers` threads (each job is
    a training subprocess, so threads suffice), with one progress bar over the jobs' logged steps
    (`total`: their steps together)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        with tqdm(total=total, desc=f"train {', '.join(jobs)}", unit="step") as bar:
            while not all(f.done() for f in futures.values()):
                logs = [m for name in jobs for m in root.glob(f".{name}-*.tmp/run/metrics.jsonl")]
                steps = sum(_last_step(m) for m in logs)
                if min(steps, bar.total) > bar.n:  # redraw on progress only (quiet in a log file)
                    bar.n = min(steps, bar.total)
                    bar.refresh()
                time.sleep(2.0)
            bar.n = bar.total
            bar.refresh()
        return {name: f.result() for name, f in futures.items()}  # re-raises a job's error


def environment() -> str:
    """What the numbers depend on besides the inputs and the code: package versions, the thread
    count and the CPU (training is not bit-identical across them), so it is part of every cache
    key and of the table's note."""
    from importlib.metadata import version

    import torch

    packages = ", ".join(
        f"{p} {version(p)}" for p in ("transformers", "peft", "accelerate", "lm_eval")
    )
    return (
        f"torch {torch.__version__}, {packages}, {torch.get_num_threads()} thread(s), "
        f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores)"
    )


D2F = Path(__file__).resolve().parents[1]  # the installed d2f package: every stage's key has it


def preset_file(world: str, kind: str) -> Path:
    return Path(config_dir()) / "train" / f"{preset(world, kind)}.yaml"


def preset_steps(world: str, kind: str) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(preset_file(world, kind)).max_steps)


def teacher_trajectories(
    tmp: Path, teacher: Path, data: Path, block: int, gen_length: int, n: int, threads: int
) -> None:
    """The teacher's answers and decode ranks on the first `n` training problems
    (`python -m d2f.trajectories`: one token per step, blocks of the teacher's size)."""
    cmd = [sys.executable, "-m", "d2f.trajectories", "--model", str(teacher), "--data", str(data)]
    cmd += ["--out", str(tmp / "trajectories.jsonl"), "--block-size", str(block)]
    cmd += ["--gen-length", str(gen_length), "--batch-size", "100", "--limit", str(n)]
    cmd += ["--threads", str(threads)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train_recipes(cache, world, spec, z, models, data, args, env, parallel) -> dict:
    """Train the peer recipes (cached stages) for `world` (`z`: its quickstart `Sizes`); their
    (base, adapter) pairs by row model name."""
    trajectories = cached(
        cache,
        "trajectories",
        digest(models["teacher"], data, args.trajectories, z.block, z.max_new_tokens, env, D2F),
        partial(
            teacher_trajectories,
            teacher=models["teacher"],
            data=data,
            block=z.block,
            gen_length=z.max_new_tokens,
            n=args.trajectories,
            threads=args.threads,
        ),
    )
    traj = trajectories / "trajectories.jsonl"
    start = {"dparallel": (models["teacher"], traj), "d3llm": (models["teacher"], traj)}
    start["fdv2"] = (models["ar"], data)
    jobs = {
        kind: partial(
            cached,
            cache,
            kind,
            digest(base, train_data, config_dir(), args.recipe_steps, env, D2F),
            partial(
                distil,
                base=base,
                data=train_data,
                world=world,
                spec=spec,
                threads=args.threads,
                steps=args.recipe_steps,
                kind=kind,
                quiet=parallel,
            ),
        )
        for kind, (base, train_data) in start.items()
    }
    if parallel:
        total = sum(args.recipe_steps or preset_steps(world, k) for k in jobs)
        runs = build_in_parallel(jobs, 2, cache, total)
    else:
        runs = {name: job() for name, job in jobs.items()}
    out = {}
    for kind, run in runs.items():
        lora = (run / "adapter").is_dir()
        out[kind] = (start[kind][0], run / "adapter") if lora else (run / "model", None)
    return out
