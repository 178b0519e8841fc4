"""The quickstart's results: the leaderboard table (markdown and CSV), the threshold sweep's
table and plot, and the numbers they are made of (AUP points, speed-up ratios), from the cached
lm-eval runs and the side-by-side race of `d2f.tinyworld.quickstart`."""

from __future__ import annotations

import csv
from pathlib import Path

PIPELINED = "D2F pipelined"  # the row whose AUP is its sweep's


def read_eval(run: Path):
    """The `d2f_tiny_add` row of one cached eval run, read by the results-table module."""
    from d2f.lmeval.table import find_runs, rows_of_run

    ((_, row),) = [
        (s, r) for s, r in rows_of_run(run, find_runs(run)[run]) if r.task == "d2f_tiny_add"
    ]
    return row


SCORE = "exact_match,strict-match"


def point(r) -> tuple[float, float]:
    """(TPF as d3LLM counts it, accuracy in percent): an AUP point."""
    return r.tpf_d3llm, 100 * r.scores[SCORE]


def curve_aup_of(points: list[tuple[float, float]], y_max: float) -> float | None:
    """AUP of a curve, over the points within 5 of the lowest-TPF one (the leaderboard keeps only
    those and refuses a curve whose last point is below): None when fewer than one is left."""
    from d2f.lmeval.aup import Y_MIN_OFFSET, aup

    pts = sorted(p for p in points if p[0] > 0)
    if not pts or y_max <= 0:
        return None
    kept = [p for p in pts if p[1] >= pts[0][1] - Y_MIN_OFFSET]
    return aup(kept, y_max)


def ratio(a: float, b: float) -> float | None:
    """a / b, None when vanilla generated nothing to compare with (e.g. a barely trained teacher)."""
    return a / b if b > 0 else None


def times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def write_results(world, table, sweep, speeds, results: Path, args, env: str) -> None:
    from d2f.lmeval.table import markdown

    results.mkdir(parents=True, exist_ok=True)
    big = args.big_batch
    y_max = max(100 * r.scores[SCORE] for _, r in table + sweep)
    sweep_aup = curve_aup_of([point(r) for _, r in sweep], y_max) if sweep else None
    (base,) = [s for row, _ in table if row.decode["strategy"] == "vanilla" for s in [row.name]]
    header = ["method", "model", "score", "TPF", "gen len", "TPS b1", "latency b1 (s)"]
    header += ["speed-up b1", f"TPS b{big}", f"speed-up b{big}", "AUP"]
    cells, records = [], []
    for row, r in table:
        sp, b = speeds[row.name], speeds[base]
        curve_aup = (
            sweep_aup if row.name == PIPELINED and sweep else curve_aup_of([point(r)], y_max)
        )
        rec = {
            "method": row.name,
            "model": row.model,
            "strategy": row.decode["strategy"],
            "score": r.scores[SCORE],
            "tpf": r.speed["tokens_per_forward"],
            "tpf_d3llm": r.tpf_d3llm,
            "gen_len": r.speed["gen_length"],
            "tps_b1": sp["tps_b1"],
            "latency_b1_s": sp["latency_b1_s"],
            "speedup_b1": ratio(sp["tps_b1"], b["tps_b1"]),
            f"tps_b{big}": sp["tps_big"],
            f"speedup_b{big}": ratio(sp["tps_big"], b["tps_big"]),
            "aup": curve_aup,
        }
        records.append(rec)
        cells.append(
            [
                row.name,
                row.model,
                f"{100 * rec['score']:.1f}%",
                f"{rec['tpf']:.2f}",
                f"{rec['gen_len']:.1f}",
                f"{rec['tps_b1']:.0f}",
                f"{rec['latency_b1_s']:.3f}",
                times(rec["speedup_b1"]),
                f"{rec[f'tps_b{big}']:.0f}",
                times(rec[f"speedup_b{big}"]),
                "n/a" if curve_aup is None else f"{curve_aup:.1f}",
            ]
        )
    md = markdown(header, cells, left=2)
    note = (
        f"\nWorld `{world}`: held-out split ({args.n} unseen operand sequences), exact match "
        "(strict `#### N`), lm-eval, scored at the large batch. TPF = generated tokens up to and "
        "including the first end token per forward. TPS and latency: one process alternating "
        f"the rows on the same prompts, best of {args.repeats} rounds ({args.time_n} prompts one "
        f"by one; {big} prompts in one batch); speed-up vs vanilla. AUP: d3LLM's, TPF as d3LLM "
        f"counts it, y_max {y_max:.1f}; D2F pipelined's is its threshold sweep's, the other "
        f"rows' a single point. {env}.\n"
    )
    (results / "table.md").write_text(md + note)
    with open(results / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print("\n" + md + note)
    if sweep:
        write_sweep(table, sweep, sweep_aup, y_max, results)


def write_sweep(table, sweep, sweep_aup, y_max, results: Path) -> None:
    """The threshold trade-off: the sweep's table and its score-against-TPF plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from d2f.lmeval.table import markdown

    cells = [
        [f"{a}", f"{c}", f"{100 * r.scores[SCORE]:.1f}%", f"{r.speed['tokens_per_forward']:.2f}"]
        for (a, c), r in sweep
    ]
    md = markdown(["tau_add", "tau_conf", "score", "TPF"], cells, left=0)
    aup_text = "n/a" if sweep_aup is None else f"{sweep_aup:.1f}"
    (results / "sweep.md").write_text(
        md + f"\nD2F student, tau_act 0.95. AUP of the sweep: {aup_text} (y_max {y_max:.1f}).\n"
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted(
        (r.speed["tokens_per_forward"], 100 * r.scores[SCORE], a, c) for (a, c), r in sweep
    )
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="D2F student (sweep)")
    for x, y, a, c in pts:
        ax.annotate(f"{a}/{c}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    for row, r in table:
        if row.decode["strategy"] in ("vanilla", "fast_dllm", "ar"):
            ax.plot(r.speed["tokens_per_forward"], 100 * r.scores[SCORE], "s", label=row.name)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"Threshold trade-off (labels tau_add/tau_conf); AUP {aup_text}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / "sweep.png", dpi=120)
    plt.close(fig)


def blocks_in_flight(trace, row: int, block: int) -> tuple[int, bool]:
    """The most blocks with undecoded or just-committed cells in one step of prompt `row`'s
    decode, and whether some step shows a semi-activated and a fully activated block at once."""
    from d2f.render import FULL, NEW, SEMI, decode_grid

    grid = decode_grid(trace, row)
    most, both = 0, False
    for cells in grid:
        per_block = cells.view(-1, block)
        live = [set(b.tolist()) & {SEMI, FULL, NEW} for b in per_block]
        most = max(most, sum(1 for s in live if s))
        codes = set(cells.tolist())
        both = both or (SEMI in codes and FULL in codes)
    return most, both
