"""d2f's D2F decoder against the D2F authors' released loop, timed side by side (issue #19).

Two persistent workers, `speed_ours.py` in d2f's venv and `speed_theirs.py` in the peer venv
(`SBS_SCRATCH/venv`: transformers 4.49, peft 0.17, their `LLaDAModelLM`), driven from this
process (standard library only), one request at a time, so the two never run at once. Every
item is done by both back to back, the order flipped from one item to the next, so load from
other processes falls on both alike; only ratios (theirs / ours: above 1 = d2f faster) are
meant to be read. Batch 1, one torch thread on each side.

* `--bench decode`: the miniature world's `--n` held-out questions, each decoded by each side
  for each variant (`base`: the teacher alone; `merged`, `unmerged`: with `--adapter`), `--repeats`
  times. Per variant: the per-pair wall and CPU ratios (median, p10-p90), the ratio of the
  totals, tokens identical (d2f's answer = theirs up to its first end id, and both hit an end
  id or neither), model calls per prompt on each side; and d2f's unmerged / merged time.
* `--bench call`: one model call, `[prompt | block 1]` with no cache and block 1 over the
  prompt's cache, each side's call as its loop makes it (d2f's `common.forward` and mask; their
  `attention_bias`, tuple cache, `update_kvcache`); `--rounds` rounds of `--calls` calls, the
  ratio of the two medians per round; the block's logits of both compared.

    SBS_SCRATCH=DIR python scripts/side_by_side/speed.py --adapter ADAPTER_DIR
    SBS_SCRATCH=DIR python scripts/side_by_side/speed.py --bench call --adapter ADAPTER_DIR
    SBS_SCRATCH=DIR python scripts/side_by_side/speed.py --variants base --n 20   # teacher only

`--ours '{"kv_cache": "static"}'`: DecodeConfig fields for d2f's side. Results (every pair) go
to `SBS_SCRATCH/results/speed_<bench>.json` (`--out` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class Worker:
    """A worker process answering one JSON request per line (`common.serve`)."""

    def __init__(self, python: str, script: str, env: dict):
        self.proc = subprocess.Popen(
            [python, str(HERE / script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=HERE,
            env=env,
            text=True,
        )

    def ask(self, cmd: str, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.proc.args[1]} died on {cmd!r} (its stderr is above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def quantiles(xs: list[float]) -> dict:
    """Median, p10 and p90 of `xs`."""
    deciles = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
    return {"median": statistics.median(xs), "p10": deciles[0], "p90": deciles[-1], "n": len(xs)}


def line(row: dict) -> str:
    """A summary row as text: the ratios' median (p10-p90), then the row's other fields."""
    parts = []
    for key, value in row.items():
        if isinstance(value, dict) and "median" in value:
            value = f"{value['median']:.2f} ({value['p10']:.2f}-{value['p90']:.2f}, n {value['n']})"
        elif isinstance(value, float):
            value = f"{value:.3g}"
        elif isinstance(value, list):
            value = " ".join(f"{v:.2f}" for v in value)
        parts.append(f"{key} {value}")
    return "; ".join(parts)


def cut(tokens: list[int], ends: set[int]) -> tuple[list[int], bool]:
    """Tokens before the first end id, and whether there was one."""
    first = next((i for i, t in enumerate(tokens) if t in ends), None)
    return (tokens, False) if first is None else (tokens[:first], True)


def alternated(sides: dict, k: int, cmd: str, **kw) -> dict:
    """Both sides answer the same request back to back; who goes first flips with `k`."""
    order = list(sides) if k % 2 == 0 else list(sides)[::-1]
    return {name: sides[name].ask(cmd, **kw) for name in order}


def bench_decode(sides: dict, info: dict, args) -> dict:
    """Every prompt decoded by both sides for every variant, `args.repeats` times: the pairs
    (tokens, calls, wall and CPU seconds of each side) and their summary."""
    ends = set(info["end_ids"])
    for variant in args.variants:  # warm-up: the first prompts once each, untimed
        for prompt in info["prompts"][: args.warmup]:
            alternated(sides, 0, "decode", variant=variant, prompt=prompt)
    pairs, k = [], 0
    for rep in range(args.repeats):
        for i, prompt in enumerate(info["prompts"]):
            for variant in args.variants:
                r = alternated(sides, k, "decode", variant=variant, prompt=prompt)
                o, t = r["ours"], r["theirs"]
                same = (o["tokens"], o["hit_end"]) == cut(t["tokens"], ends)
                pairs.append(
                    {"rep": rep, "prompt": i, "variant": variant, "first": next(iter(r))}
                    | {"same": same, "ours": o, "theirs": t}
                )
                k += 1
    return {"summary": decode_summary(pairs, args.variants, args.repeats), "pairs": pairs}


def decode_summary(pairs: list[dict], variants: list[str], repeats: int) -> dict:
    """Per variant: ratios (theirs / ours) per pair and of the totals, tokens identical, calls
    (of the first repeat); d2f's unmerged / merged time per prompt when both ran."""
    summary = {}
    for variant in variants:
        ps = [p for p in pairs if p["variant"] == variant]
        first = [p for p in ps if p["rep"] == 0]
        diff = Counter(p["ours"]["calls"] - p["theirs"]["calls"] for p in first)
        summary[variant] = {
            "wall": quantiles([p["theirs"]["wall"] / p["ours"]["wall"] for p in ps]),
            "cpu": quantiles([p["theirs"]["cpu"] / p["ours"]["cpu"] for p in ps]),
            "total_wall": sum(p["theirs"]["wall"] for p in ps) / sum(p["ours"]["wall"] for p in ps),
            "total_wall_per_repeat": [
                sum(p["theirs"]["wall"] for p in ps if p["rep"] == r)
                / sum(p["ours"]["wall"] for p in ps if p["rep"] == r)
                for r in range(repeats)
            ],
            "total_cpu": sum(p["theirs"]["cpu"] for p in ps) / sum(p["ours"]["cpu"] for p in ps),
            "same": sum(p["same"] for p in ps),
            "decodes": len(ps),
            "calls_ours": sum(p["ours"]["calls"] for p in first),
            "calls_theirs": sum(p["theirs"]["calls"] for p in first),
            "calls_diff": dict(sorted(diff.items())),
        }
    if {"merged", "unmerged"} <= set(variants):
        key = {(p["rep"], p["prompt"], p["variant"]): p["ours"]["wall"] for p in pairs}
        summary["ours_unmerged_over_merged"] = quantiles(
            [key[r, i, "unmerged"] / key[r, i, "merged"] for r, i, v in key if v == "merged"]
        )
    return summary


def bench_call(sides: dict, info: dict, args) -> dict:
    """Per variant, with and without the prompt's cache: `args.rounds` rounds of `args.calls`
    calls per side (after one warm-up round), the ratio of the medians per round, and the largest
    difference between the two sides' block logits."""
    rounds, summary, k = [], {}, 0
    for variant in args.variants:
        for cached in (False, True):
            name = f"{variant}/{'cached' if cached else 'no cache'}"
            ratios, cpu_ratios, worst = [], [], 0.0
            for i in range(args.rounds + 1):  # round 0 is a warm-up
                prompt = info["prompts"][i % len(info["prompts"])]
                r = alternated(
                    sides, k, "call", variant=variant, prompt=prompt, cached=cached, reps=args.calls
                )
                k += 1
                lo, lt = r["ours"].pop("logits"), r["theirs"].pop("logits")
                diff = max(
                    abs(a - b)
                    for ra, rb in zip(lo, lt, strict=True)
                    for a, b in zip(ra, rb, strict=True)
                )
                worst = max(worst, diff)
                if i == 0:
                    continue
                med = {s: statistics.median(r[s]["wall"]) for s in r}
                cpu = {s: statistics.median(r[s]["cpu"]) for s in r}
                ratios.append(med["theirs"] / med["ours"])
                cpu_ratios.append(cpu["theirs"] / cpu["ours"])
                rounds.append({"name": name, "round": i} | med)
            summary[name] = {
                "wall": quantiles(ratios),
                "cpu": quantiles(cpu_ratios),
                "max_abs_logit_diff": worst,
            }
    return {"summary": summary, "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bench", choices=("decode", "call"), default="decode")
    p.add_argument("--world", default="chain", help="the miniature world (its shipped teacher)")
    p.add_argument("--adapter", default=None, help="the student's LoRA adapter directory")
    p.add_argument("--variants", nargs="+", choices=("base", "merged", "unmerged"), default=None)
    p.add_argument("--n", type=int, default=200, help="held-out questions")
    p.add_argument("--repeats", type=int, default=1, help="decode passes over the questions")
    p.add_argument("--warmup", type=int, default=3, help="untimed decodes first (per variant)")
    p.add_argument("--rounds", type=int, default=30, help="call rounds per variant and cache")
    p.add_argument("--calls", type=int, default=20, help="calls per round and side")
    p.add_argument("--ours", default="{}", help="JSON of DecodeConfig fields for d2f's side")
    p.add_argument("--python_ours", default=sys.executable, help="d2f's venv (default: this one)")
    p.add_argument("--python_theirs", default=None, help="default: SBS_SCRATCH/venv/bin/python")
    p.add_argument("--out", default=None, help="default: SBS_SCRATCH/results/speed_<bench>.json")
    args = p.parse_args()
    if "SBS_SCRATCH" not in os.environ:
        p.error("set SBS_SCRATCH to the scratch directory (the peers' venv and checkouts)")
    scratch = Path(os.environ["SBS_SCRATCH"]).resolve()
    if args.variants is None:
        args.variants = ["merged", "unmerged"] if args.adapter else ["base"]
    if args.adapter is None and set(args.variants) != {"base"}:
        p.error("--variants merged / unmerged need --adapter")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    sides = {
        "ours": Worker(args.python_ours, "speed_ours.py", env),
        "theirs": Worker(
            args.python_theirs or str(scratch / "venv/bin/python"), "speed_theirs.py", env
        ),
    }
    adapter = None if args.adapter is None else str(Path(args.adapter).resolve())
    t0 = time.perf_counter()
    info = sides["ours"].ask(
        "setup",
        world=args.world,
        n=args.n,
        adapter=adapter,
        variants=args.variants,
        overrides=json.loads(args.ours),
    )
    their_info = sides["theirs"].ask(
        "setup",
        base=info["base"],
        adapter=adapter,
        variants=args.variants,
        settings=info["settings"],
        mask_id=info["mask_id"],
        end_ids=info["end_ids"],
    )
    result = (bench_decode if args.bench == "decode" else bench_call)(sides, info, args)
    for side in sides.values():
        side.close()
    meta = {k: v for k, v in info.items() if k != "prompts"} | {"theirs": their_info}
    meta |= {"args": vars(args), "seconds": time.perf_counter() - t0, "load": os.getloadavg()}
    out = Path(args.out or scratch / "results" / f"speed_{args.bench}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta} | result))
    print(json.dumps({k: meta[k] for k in ("config", "torch", "theirs", "seconds", "load")}))
    for name, row in result["summary"].items():
        print(f"{name:22s} {line(row)}")
    print(f"-> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
