"""The miniature world: the shipped models must work; the whole quickstart runs (slow)."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from d2f.decoding import DecodeConfig, generate
from d2f.family import family_of
from d2f.models import load_model
from d2f.tinyworld.pretrain import ASSETS, assets_dir
from d2f.tinyworld.task import records
from d2f.tinyworld.world import WORLDS

EVAL = {"add2": 24, "chain": 48}  # max_new_tokens: the world's answers plus slack


def _accuracy(world, model, tok, cfg, n=40):
    recs = records(WORLDS[world].level, "test", n, WORLDS[world].seed)
    out = generate(model, [r["question"] for r in recs], cfg, tokenizer=tok)
    right = [
        t.strip().endswith(r["answer"].split("####")[-1].strip()) and "####" in t
        for t, r in zip(out.texts, recs, strict=True)
    ]
    return sum(right) / len(right)


def _manifest(world: str) -> dict:
    return json.loads((assets_dir(world) / "manifest.json").read_text())


def _recorded(world: str, kind: str) -> float:
    """The held-out score the manifest claims for a shipped model (200 problems, lm-eval)."""
    return _manifest(world)["models"][kind]["held_out_eval"]["exact_match_strict"]


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_shipped_teacher_solves_held_out_problems(world):
    """A broken checkpoint or tokenizer cannot ship: vanilla accuracy far above chance (~0%), and
    consistent with the score the manifest records (40 problems here: a margin of 0.15)."""
    model, tok = load_model(assets_dir(world) / "teacher")
    assert family_of(model).name == "llada" and tok is not None
    cfg = DecodeConfig(strategy="vanilla", block_size=8, max_new_tokens=EVAL[world])
    acc = _accuracy(world, model, tok, cfg)
    assert acc >= 0.6, acc
    assert abs(acc - _recorded(world, "teacher")) <= 0.15, (acc, _recorded(world, "teacher"))


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_shipped_ar_baseline_and_manifest(world):
    model, tok = load_model(assets_dir(world) / "ar")
    assert family_of(model).causal
    cfg = DecodeConfig(strategy="ar", block_size=8, max_new_tokens=EVAL[world])
    acc = _accuracy(world, model, tok, cfg)
    assert acc >= 0.6, acc
    assert abs(acc - _recorded(world, "ar")) <= 0.15, (acc, _recorded(world, "ar"))
    manifest = _manifest(world)
    for kind in ("teacher", "ar"):
        info = manifest["models"][kind]
        assert info["steps"] > 0 and info["train_wall_s"] > 0
        assert info["held_out_eval"]["n"] >= 100  # the recorded score is not a handful of problems
        size = sum(f.stat().st_size for f in (assets_dir(world) / kind).iterdir())
        assert size < 5 * 2**20, f"{kind} is {size} bytes"
    assert manifest["command"].startswith("python -m d2f.tinyworld.pretrain")


def test_chain_manifest_records_how_the_models_were_made():
    """The second world's manifest: the reproducing command, the world it was trained on (the
    package's own spec, so a changed spec cannot silently ship old models), the environment, a
    teacher of at least 85% held-out (the issue's bar) and a learning curve that ends there."""
    manifest = _manifest("chain")
    assert manifest["world_name"] == "chain" and manifest["world"] == asdict(WORLDS["chain"])
    assert "--world chain" in manifest["command"] and "--seed_from" not in manifest["command"]
    env = manifest["environment"]
    assert env["torch"] and env["cpu"] and env["threads"] >= 1
    teacher = manifest["models"]["teacher"]
    assert teacher["objective"] == "mdm" and teacher["held_out_eval"]["strategy"] == "vanilla"
    assert teacher["held_out_eval"]["exact_match_strict"] >= 0.85
    points = teacher["learning_curve"]["points"]
    assert [p["step"] for p in points] == sorted(p["step"] for p in points)
    assert points[-1]["step"] == teacher["steps"]
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"shipped assets are {total} bytes"


@pytest.mark.slow
def test_quickstart_end_to_end_shrunk(tmp_path):
    """The whole pipeline, --fresh, with seconds of training: every artifact and column exists,
    and a second run is served from the cache."""
    out = tmp_path / "tw"
    cmd = [
        sys.executable,
        "-m",
        "d2f.tinyworld.quickstart",
        "--world",
        "add2",
        "--out",
        str(out),
        "--fresh",
        "--pretrain_args=--teacher_steps 20 --ar_steps 20 --eval_n 8 --curve_n 4",
        "--student_steps",
        "10",
        "--n",
        "8",
        "--big_batch",
        "4",
        "--time_n",
        "2",
        "--repeats",
        "1",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (out / "results" / "table.md").read_text()
    from d2f.tinyworld.quickstart import rows

    for row in rows("add2"):
        assert f"| {row.name} | {row.model} |" in table
    header = table.splitlines()[0]
    for col in ("score", "TPF", "gen len", "TPS b1", "latency b1 (s)", "speed-up b1", "TPS b4"):
        assert f" {col} |" in header
    assert header.endswith("| AUP |")
    assert (out / "results" / "table.csv").exists()
    for picture in ("decode_student.png", "sweep.png"):
        assert (out / "results" / picture).read_bytes()[:4] == b"\x89PNG"
    assert "tau_add" in (out / "results" / "sweep.md").read_text()
    assert json.loads((next(out.glob("cache/pretrained-*")) / "manifest.json").read_text())[
        "models"
    ]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "built in" not in second.stdout
    assert (out / "results" / "table.md").read_text().count("|") == table.count("|")


@pytest.mark.parametrize("world", sorted(WORLDS))
@pytest.mark.parametrize("kind", ["teacher", "ar"])
def test_shipped_tokenizer_configs_are_portable(world, kind):
    """The shipped tokenizer configs are already in the form transformers 4.49 reads (the authors'
    stack): rewriting them portably changes nothing."""
    from d2f.family import portable_tokenizer_config

    cfg = json.loads((assets_dir(world) / kind / "tokenizer_config.json").read_text())
    assert portable_tokenizer_config(cfg) == cfg
    assert not isinstance(cfg.get("extra_special_tokens"), list)


@pytest.mark.slow
def test_quickstart_scores_and_tpf_reproduce_run_to_run(tmp_path):
    """The README's reproducibility contract: on one machine, same thread count, two quickstart
    runs into separate (empty) caches give byte-identical student adapters and identical scores and
    TPF in every row (only the timing columns may differ)."""
    import csv

    tables, adapters = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "d2f.tinyworld.quickstart", "--out", str(out), "--n", "8"]
        cmd += ["--big_batch", "4", "--time_n", "1", "--repeats", "1", "--student_steps", "10"]
        cmd += ["--no_sweep"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        with (out / "results" / "table.csv").open() as f:
            tables.append(
                [(r["method"], r["score"], r["tpf"], r["gen_len"]) for r in csv.DictReader(f)]
            )
        adapters.append(
            [p.read_bytes() for p in sorted(out.glob("cache/student*/adapter/*.safetensors"))]
        )
    assert tables[0] == tables[1] and len(tables[0]) >= 7
    assert adapters[0] == adapters[1] and len(adapters[0]) == 2  # ramp and random students
