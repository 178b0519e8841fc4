"""Evaluate a miniature-world model through the real lm-eval path, in process.

`evaluate(...)` builds the `d2f` lm-eval model (d2f/lmeval/lm.py) and runs lm-eval's `simple_evaluate`
on the `d2f_tiny_add` task (the held-out split, scored like GSM8K), zero-shot with the chat
template, and saves what `python -m d2f.eval --output_path OUT --log_samples` saves: lm-eval's
results and samples plus `d2f_speed.json`. It runs in process only to load lm-eval's task index
once (restricted to our tasks), not to take another path.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path


@cache
def _task_manager(n: int, level: str, seed: int):
    from lm_eval.tasks import TaskManager

    from d2f.eval import tasks_dir

    return TaskManager(
        include_path=str(tasks_dir()),
        include_defaults=False,
        metadata={"n": n, "level": level, "world_seed": seed},
    )


def evaluate(
    out: str | Path,
    pretrained: str | Path,
    *,
    adapter: str | Path | None = None,
    n: int = 200,
    batch_size: int = 1,
    level: str = "add2",
    seed: int = 0,
    **decode,
) -> dict:
    """Run d2f_tiny_add on `n` held-out problems; returns {"score", "speed", "dir"}.

    `decode`: DecodeConfig fields (strategy, block_size, max_new_tokens, tau_*, ...).
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from d2f.lmeval.lm import D2FLM

    out = Path(out)
    lm = D2FLM(
        pretrained=str(pretrained),
        adapter=None if adapter is None else str(adapter),
        batch_size=batch_size,
        stats_dir=str(out),
        **decode,
    )
    tracker = EvaluationTracker(output_path=str(out))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["d2f_tiny_add"],
        task_manager=_task_manager(n, level, seed),
        apply_chat_template=True,
        log_samples=True,
        evaluation_tracker=tracker,
        bootstrap_iters=0,
    )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    tracker.save_results_samples(task_name="d2f_tiny_add", samples=samples["d2f_tiny_add"])
    task = results["results"]["d2f_tiny_add"]
    speed = json.loads((out / "d2f_speed.json").read_text())["tasks"]["d2f_tiny_add"]
    return {
        "score": task["exact_match,strict-match"],
        "flexible": task["exact_match,flexible-extract"],
        "speed": speed,
        "dir": str(out),
    }
