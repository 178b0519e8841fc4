"""The results table over a hand-written output directory: rows, scores, speed and speed-up."""

import csv
import json
from pathlib import Path

import pytest

from d2f.lmeval.table import collect, main, to_markdown

MODEL = "GSAI-ML/LLaDA-8B-Instruct"


def speed_entry(samples: int, tokens: int, with_end: int, forwards: int, wall_s: float) -> dict:
    """One task of d2f_speed.json, derived columns computed as the model writes them."""
    return {
        "samples": samples,
        "tokens": tokens,
        "tokens_with_end": with_end,
        "forwards": forwards,
        "wall_s": wall_s,
        "tokens_per_second": tokens / wall_s,
        "tokens_per_forward": with_end / forwards,
        "latency_s": wall_s / samples,
        "gen_length": tokens / samples,
    }


def write_run(
    run: Path, strategy: str, tasks: dict, results: dict, stamp: str, **model_args
) -> None:
    """A run as `python -m d2f.eval` leaves it: d2f_speed.json, results in a model subfolder."""
    run.mkdir(parents=True, exist_ok=True)
    args = {"pretrained": MODEL, "adapter": None, "strategy": strategy, "block_size": 32}
    args.update(model_args)
    speed = {
        "model_args": args,
        "world_size": 1,
        "tasks": tasks,
        "ranks": [{"rank": 0, "tasks": tasks}],
    }
    (run / "d2f_speed.json").write_text(json.dumps(speed))
    sub = run / "GSAI-ML__LLaDA-8B-Instruct"
    sub.mkdir(exist_ok=True)
    (sub / f"results_{stamp}.json").write_text(json.dumps(results))


def gsm8k_results(strict: float, flexible: float) -> dict:
    return {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": strict,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": flexible,
                "exact_match_stderr,flexible-extract": "N/A",
            }
        },
        "group_subtasks": {},
    }


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    # d2f: 5250 tokens in 100 s -> 52.5 TPS; an older results file of the same run must lose.
    d2f_tasks = {"gsm8k": speed_entry(10, 5250, 5260, 1000, 100.0)}
    write_run(out / "d2f/gsm8k", "d2f", d2f_tasks, gsm8k_results(0.1, 0.2), "2026-01-01T00-00-00.1")
    write_run(
        out / "d2f/gsm8k", "d2f", d2f_tasks, gsm8k_results(0.773, 0.78), "2026-01-02T00-00-00.1"
    )
    # vanilla: 720 tokens in 100 s -> 7.2 TPS.
    vanilla_tasks = {"gsm8k": speed_entry(10, 720, 730, 5120, 100.0)}
    write_run(
        out / "vanilla/gsm8k",
        "vanilla",
        vanilla_tasks,
        gsm8k_results(0.774, 0.79),
        "2026-01-01T00-00-00.1",
    )
    # d2f on a group: two subtasks and the group's aggregate score; no baseline run.
    math_tasks = {
        "minerva_math_algebra": speed_entry(4, 400, 404, 100, 4.0),
        "minerva_math_geometry": speed_entry(6, 300, 306, 200, 6.0),
    }
    math_results = {
        "results": {
            "minerva_math": {
                "alias": "minerva_math",
                "exact_match,none": 0.3,
                "math_verify,none": 0.35,
            },
            "minerva_math_algebra": {
                "alias": " - algebra",
                "exact_match,none": 0.5,
                "math_verify,none": 0.5,
            },
            "minerva_math_geometry": {
                "alias": " - geometry",
                "exact_match,none": 0.1667,
                "math_verify,none": 0.25,
            },
        },
        "groups": {"minerva_math": {"exact_match,none": 0.3, "math_verify,none": 0.35}},
        "group_subtasks": {"minerva_math": ["minerva_math_algebra", "minerva_math_geometry"]},
    }
    write_run(out / "d2f/minerva_math", "d2f", math_tasks, math_results, "2026-01-01T00-00-00.1")
    return out


def test_rows_scores_and_speedup(out_dir):
    rows = {(r.task, r.strategy): r for r in collect(out_dir)}
    assert set(rows) == {
        ("gsm8k", "vanilla"),
        ("gsm8k", "d2f"),
        ("minerva_math", "d2f"),
        ("minerva_math_algebra", "d2f"),
        ("minerva_math_geometry", "d2f"),
    }
    d2f, vanilla = rows["gsm8k", "d2f"], rows["gsm8k", "vanilla"]
    # newest results file wins; stderrs are not scores
    assert d2f.scores == {"exact_match,strict-match": 0.773, "exact_match,flexible-extract": 0.78}
    assert d2f.speed["tokens_per_second"] == pytest.approx(52.5)
    assert d2f.speedup == pytest.approx(52.5 / 7.2)  # 7.29x
    assert vanilla.speedup == pytest.approx(1.0)
    assert rows["minerva_math_algebra", "d2f"].speedup is None  # no vanilla run of this task
    group = rows["minerva_math", "d2f"]
    assert group.scores == {"exact_match,none": 0.3, "math_verify,none": 0.35}
    assert group.samples == 10
    # subtasks combined as ratios of totals: (400 + 300) / (4 + 6) s, (404 + 306) / (100 + 200)
    assert group.speed["tokens_per_second"] == pytest.approx(70.0)
    assert group.speed["tokens_per_forward"] == pytest.approx(710 / 300)
    assert group.speed["latency_s"] == pytest.approx(1.0)
    assert group.speed["gen_length"] == pytest.approx(70.0)


def test_cli_prints_markdown_and_writes_csv(out_dir, tmp_path, capsys):
    main([str(out_dir), "--csv", str(tmp_path / "t.csv"), "--md", str(tmp_path / "t.md")])
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "t.md").read_text()
    lines = printed.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "model",
        "adapter",
        "task",
        "strategy",
        "settings",
        "score",
        "n",
        "TPS",
        "TPF",
        "latency (s)",
        "gen len",
        "speed-up",
        "TPF (d3LLM)",
        "AUP",
    ]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells[0] == [
        "LLaDA-8B-Instruct",
        "",
        "gsm8k",
        "vanilla",
        "",
        "strict-match 0.774 / flexible-extract 0.790",
        "10",
        "7.2",
        "0.14",
        "10.00",
        "72.0",
        "1.00x",
        "0.14",
        "n/a",  # one point per curve: no AUP (tests/test_aup.py has curves)
    ]
    assert cells[1] == [
        "LLaDA-8B-Instruct",
        "",
        "gsm8k",
        "d2f",
        "",
        "strict-match 0.773 / flexible-extract 0.780",
        "10",
        "52.5",
        "5.26",
        "10.00",
        "525.0",
        "7.29x",
        "5.25",
        "n/a",
    ]
    assert cells[2][2:6] == ["minerva_math", "d2f", "", "exact_match 0.300 / math_verify 0.350"]
    assert cells[2][-3] == ""

    with (tmp_path / "t.csv").open() as f:
        table = {(r["task"], r["strategy"]): r for r in csv.DictReader(f)}
    assert float(table["gsm8k", "d2f"]["speedup"]) == pytest.approx(52.5 / 7.2)
    assert float(table["gsm8k", "d2f"]["exact_match,strict-match"]) == 0.773
    assert table["minerva_math", "d2f"]["exact_match,strict-match"] == ""
    assert float(table["minerva_math", "d2f"]["math_verify,none"]) == 0.35


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])


def test_runs_differing_only_in_adapter_or_a_setting_are_separate_rows(tmp_path):
    """The paper's "D2F without distillation" vs "D2F student": same base, same strategy."""
    tasks = {"gsm8k": speed_entry(10, 500, 510, 100, 10.0)}
    write_run(tmp_path / "a", "d2f", tasks, gsm8k_results(0.5, 0.5), "2026-01-01T00-00-00.1")
    write_run(
        tmp_path / "b",
        "d2f",
        tasks,
        gsm8k_results(0.7, 0.7),
        "2026-01-02T00-00-00.1",
        adapter="org/D2F_LoRA",
    )
    write_run(
        tmp_path / "c",
        "d2f",
        tasks,
        gsm8k_results(0.6, 0.6),
        "2026-01-03T00-00-00.1",
        adapter="org/D2F_LoRA",
        block_size=64,
    )
    rows = collect(tmp_path)
    got = {(r.adapter, r.settings): r.scores["exact_match,strict-match"] for r in rows}
    assert got == {
        ("", ""): 0.5,
        ("org/D2F_LoRA", "block_size=32"): 0.7,
        ("org/D2F_LoRA", "block_size=64"): 0.6,
    }
    lines = to_markdown(rows).splitlines()[2:]
    assert [line.split(" | ")[1:5] for line in lines] == [
        ["", "gsm8k", "d2f", ""],
        ["D2F_LoRA", "gsm8k", "d2f", "block_size=32"],
        ["D2F_LoRA", "gsm8k", "d2f", "block_size=64"],
    ]


def test_second_task_into_the_same_output_path_keeps_the_first(tmp_path):
    """Two `python -m d2f.eval` runs of one configuration into one --output_path, one task each:
    the speed file keeps both tasks and the table both rows (each from its own results file)."""
    from d2f.lmeval.stats import SpeedLog, TaskSpeed

    args = {"pretrained": MODEL, "adapter": None, "strategy": "d2f", "batch_size": 1}
    out = tmp_path / "run"
    for task, tokens in (("gsm8k", 100), ("d2f_code_local", 300)):
        log = SpeedLog()
        log.tasks[task] = TaskSpeed()
        log.tasks[task].add_call(2.0, [(tokens, tokens + 1, 10)])
        SpeedLog.check_same_run(out / "d2f_speed.json", args)
        SpeedLog.write(out / "d2f_speed.json", SpeedLog.merged([log.state()], args))
    speed = json.loads((out / "d2f_speed.json").read_text())
    assert {t: s["tokens"] for t, s in speed["tasks"].items()} == {
        "gsm8k": 100,
        "d2f_code_local": 300,
    }
    assert set(speed["ranks"][0]["tasks"]) == {"gsm8k", "d2f_code_local"}
    sub = out / "model"
    sub.mkdir()
    (sub / "results_2026-01-01T00-00-00.1.json").write_text(json.dumps(gsm8k_results(0.4, 0.5)))
    code = {"results": {"d2f_code_local": {"pass_at_1,none": 0.25}}}
    (sub / "results_2026-01-02T00-00-00.1.json").write_text(json.dumps(code))
    rows = {r.task: r for r in collect(tmp_path)}
    assert rows["gsm8k"].scores["exact_match,strict-match"] == 0.4
    assert rows["gsm8k"].speed["tokens_per_second"] == pytest.approx(50.0)
    assert rows["d2f_code_local"].scores == {"pass_at_1,none": 0.25}
    # another configuration into the same directory is refused before anything runs
    with pytest.raises(ValueError, match="adapter=None there, 'x/lora' here"):
        SpeedLog.check_same_run(out / "d2f_speed.json", {**args, "adapter": "x/lora"})


def test_quickstart_table_from_the_table_module(tmp_path):
    """The tiny world's table.md / table.csv / sweep.md: scores, TPF and lengths from the lm-eval
    runs the quickstart caches (read by d2f.lmeval.table), speeds from the side-by-side race,
    AUP from d2f.lmeval.aup's formula (numbers worked out by hand)."""
    import math
    from argparse import Namespace

    from d2f.tinyworld.quickstart import Row
    from d2f.tinyworld.results import read_eval, write_results

    def tiny_run(name, strategy, score, tokens, forwards=50):
        run = tmp_path / "cache" / name
        tasks = {"d2f_tiny_add": speed_entry(10, tokens, tokens + 10, forwards, 1.0)}
        results = {"results": {"d2f_tiny_add": {"exact_match,strict-match": score}}}
        write_run(run, strategy, tasks, results, "2026-01-01T00-00-00.1", batch_size=4)
        return read_eval(run)

    vanilla = Row("vanilla dLLM", "teacher", {"strategy": "vanilla"})
    d2f = Row("D2F pipelined", "student", {"strategy": "d2f"})
    table = [(vanilla, tiny_run("v", "vanilla", 0.95, 100)), (d2f, tiny_run("d", "d2f", 0.98, 120))]
    # the sweep: TPF (d3LLM) 2.0 at 96% and 3.0 at 97%; and 4.0 at 80%, more than 5 below: dropped
    sweep = [
        ((0.1, 0.9), tiny_run("s1", "d2f", 0.96, 100)),
        ((0.5, 0.9), tiny_run("s2", "d2f", 0.97, 150)),
        ((0.9, 0.7), tiny_run("s3", "d2f", 0.80, 200)),
    ]
    speeds = {
        "vanilla dLLM": {"tps_b1": 10.0, "latency_b1_s": 1.0, "tps_big": 50.0},
        "D2F pipelined": {"tps_b1": 30.0, "latency_b1_s": 0.4, "tps_big": 120.0},
    }
    results = tmp_path / "results"
    args = Namespace(big_batch=4, n=10, repeats=3, time_n=2)
    write_results("add2", table, sweep, speeds, results, args, "env")

    def w(y):  # the leaderboard's weight, y_max 98 (the best score in the table)
        return min(math.exp(-3 * (1 - y / 98.0)), 1.0)

    sweep_aup = 2.0 * 96 + 0.5 * (3.0 - 2.0) * (97 * w(97) + 96 * w(96))
    md = (results / "table.md").read_text().splitlines()
    assert md[:4] == [
        "| method | model | score | TPF | gen len | TPS b1 | latency b1 (s) | speed-up b1 "
        "| TPS b4 | speed-up b4 | AUP |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| vanilla dLLM | teacher | 95.0% | 2.20 | 10.0 | 10 | 1.000 | 1.00x | 50 | 1.00x "
        f"| {2.0 * 95:.1f} |",
        "| D2F pipelined | student | 98.0% | 2.60 | 12.0 | 30 | 0.400 | 3.00x | 120 | 2.40x "
        f"| {sweep_aup:.1f} |",
    ]
    with (results / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["method"] == "D2F pipelined" and float(rows[1]["aup"]) == pytest.approx(
        sweep_aup
    )
    assert float(rows[1]["speedup_b4"]) == pytest.approx(2.4)
    sweep_md = (results / "sweep.md").read_text()
    assert "| 0.9 | 0.7 | 80.0% |" in sweep_md and f"{sweep_aup:.1f}" in sweep_md
    assert (results / "sweep.png").read_bytes()[:4] == b"\x89PNG"
