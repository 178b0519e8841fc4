"""The results table over a hand-written output directory: rows, scores, speed and speed-up."""

import csv
import json
from pathlib import Path

import pytest

from d2f.lmeval.table import collect, main

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


def write_run(run: Path, strategy: str, tasks: dict, results: dict, stamp: str) -> None:
    """A run as `python -m d2f.eval` leaves it: d2f_speed.json, results in a model subfolder."""
    run.mkdir(parents=True, exist_ok=True)
    args = {"pretrained": MODEL, "adapter": None, "strategy": strategy, "block_size": 32}
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
        "task",
        "strategy",
        "score",
        "n",
        "TPS",
        "TPF",
        "latency (s)",
        "gen len",
        "speed-up",
    ]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells[0] == [
        "LLaDA-8B-Instruct",
        "gsm8k",
        "vanilla",
        "strict-match 0.774 / flexible-extract 0.790",
        "10",
        "7.2",
        "0.14",
        "10.00",
        "72.0",
        "1.00x",
    ]
    assert cells[1] == [
        "LLaDA-8B-Instruct",
        "gsm8k",
        "d2f",
        "strict-match 0.773 / flexible-extract 0.780",
        "10",
        "52.5",
        "5.26",
        "10.00",
        "525.0",
        "7.29x",
    ]
    assert cells[2][1:4] == ["minerva_math", "d2f", "exact_match 0.300 / math_verify 0.350"]
    assert cells[2][-1] == ""

    with (tmp_path / "t.csv").open() as f:
        table = {(r["task"], r["strategy"]): r for r in csv.DictReader(f)}
    assert float(table["gsm8k", "d2f"]["speedup"]) == pytest.approx(52.5 / 7.2)
    assert float(table["gsm8k", "d2f"]["exact_match,strict-match"]) == 0.773
    assert table["minerva_math", "d2f"]["exact_match,strict-match"] == ""
    assert float(table["minerva_math", "d2f"]["math_verify,none"]) == 0.35


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
