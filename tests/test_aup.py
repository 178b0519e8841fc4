"""AUP (d3LLM's Accuracy Under Parallelism): hand-computed values, the leaderboard's published
GSM8K-CoT numbers, the point filter, and the errors."""

import json
import math

import pytest

from d2f.lmeval.aup import aup, weight

# GSM8K-CoT rows of d3LLM's AUP leaderboard data (LLaDA-based methods), y_max = 74.98 (D2F at
# TPF 1); the AUPs its leaderboard code prints for them, to two decimals.
Y_MAX = 74.98
PUBLISHED = {
    "d3LLM-LLaDA": ([(1.0, 74.02), (9.11, 73.09)], 637.65),
    "dParallel-LLaDA": ([(1.0, 74.0), (5.14, 72.63)], 358.14),
    "D2F": ([(1.0, 74.98), (2.88, 74.39)], 213.76),
    "Fast-dLLM-LLaDA": ([(1.0, 74.79), (2.77, 74.68)], 205.78),
    "LLaDA": ([(1.0, 72.55)], 72.55),
}


def test_hand_computed_example():
    # W(80) = 1; W(78) = exp(-3 * (1 - 78 / 80)) = exp(-0.075) = 0.927743486...
    # AUP = 1 * 80 + (3 - 1) / 2 * (78 * 0.927743486 + 80 * 1) = 80 + 72.363992 + 80
    assert aup([(3.0, 78.0), (1.0, 80.0)], y_max=80.0) == pytest.approx(232.363992, abs=1e-6)
    assert weight(78.0, 80.0) == pytest.approx(0.927743486, abs=1e-9)
    assert weight(85.0, 80.0) == 1.0  # capped at 1 above y_max


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_leaderboard_values(name):
    points, want = PUBLISHED[name]
    assert round(aup(points, Y_MAX), 2) == want


def test_first_term_unweighted_and_single_point():
    assert aup([(1.0, 50.0)], y_max=90.0) == 50.0
    assert aup([(2.5, 50.0)], y_max=90.0) == 125.0


def test_points_more_than_five_below_the_first_are_dropped():
    # the middle point (74 < 80 - 5) is dropped: the trapezoid joins (1, 80) and (3, 76) directly
    w = math.exp(-3 * (1 - 76 / 80))
    want = 80 + 0.5 * 2 * (76 * w + 80)
    assert aup([(1.0, 80.0), (2.0, 74.0), (3.0, 76.0)], 80.0) == pytest.approx(want, rel=1e-12)


def test_more_parallelism_at_equal_accuracy_raises_aup():
    base = [(1.0, 70.0), (2.0, 69.0)]
    assert aup([*base, (4.0, 69.0)], 75.0) > aup(base, 75.0)
    # a shared y_max matters: a stronger method elsewhere lowers the weights (never raises them)
    assert aup(base, 80.0) < aup(base, 70.0)


@pytest.mark.parametrize(
    ("points", "y_max", "match"),
    [
        ([], 80.0, "at least one"),
        ([(1.0, 80.0), (4.0, 74.0)], 80.0, "more than 5.0 points"),
        ([(0.0, 80.0)], 80.0, "point 0: TPF must be a positive"),
        ([(1.0, 80.0), (2.0, 120.0)], 80.0, "point 1: accuracy must be a percentage"),
        ([(1.0, float("nan"))], 80.0, "point 0: accuracy"),
        ([(1.0, 80.0)], 0.0, "y_max must be a positive"),
    ],
)
def test_bad_curves_refused(points, y_max, match):
    with pytest.raises(ValueError, match=match):
        aup(points, y_max)


def _run(run, strategy: str, score: float, tokens: int, forwards: int, **args) -> None:
    """A run directory as the d2f lm-eval model leaves it (d2f_speed.json + a results file)."""
    run.mkdir(parents=True)
    task = {
        "samples": 10,
        "tokens": tokens,
        "tokens_with_end": tokens + 10,  # d2f's TPF counts the end token, d3LLM's does not
        "forwards": forwards,
        "wall_s": 1.0,
        "tokens_per_second": tokens,
        "tokens_per_forward": (tokens + 10) / forwards,
        "latency_s": 0.1,
        "gen_length": tokens / 10,
    }
    model_args = {"pretrained": "m", "adapter": None, "strategy": strategy, **args}
    speed = {"model_args": model_args, "tasks": {"gsm8k": task}}
    (run / "d2f_speed.json").write_text(json.dumps(speed))
    results = {"results": {"gsm8k": {"exact_match,strict-match": score}}}
    (run / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results))


def test_table_aup_of_a_curve(tmp_path):
    from d2f.lmeval.table import collect, to_markdown

    # one d3llm curve of two settings, and a single vanilla point (AUP n/a, but it sets y_max)
    _run(tmp_path / "a", "d3llm", 0.80, 1000, 1000, options="threshold=0.1")
    _run(tmp_path / "b", "d3llm", 0.78, 3000, 1000, options="threshold=0.5")
    _run(tmp_path / "c", "vanilla", 0.82, 500, 1000)
    rows = {r.strategy + r.settings: r for r in collect(tmp_path)}
    curve = [(1.0, 80.0), (3.0, 78.0)]  # (tokens / forwards, percent): d3LLM's TPF
    assert rows["d3llmoptions=threshold=0.1"].tpf_d3llm == 1.0
    for key in ("d3llmoptions=threshold=0.1", "d3llmoptions=threshold=0.5"):
        assert rows[key].aup == pytest.approx(aup(curve, y_max=82.0))
    assert rows["vanilla"].aup is None
    assert aup(curve, 82.0) < aup(curve, 80.0)  # y_max is the task's best, not the curve's
    text = to_markdown(list(rows.values()))
    assert f"| {aup(curve, 82.0):.2f} |" in text and text.count("| n/a |") == 1
