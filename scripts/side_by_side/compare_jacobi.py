"""Compare `ours_jacobi.json` and `theirs_jacobi.json` (any Python with torch): one markdown row
per setting, guess source and end id.

    SBS_SCRATCH=DIR python compare_jacobi.py

Columns: prompts; tokens identical to d2f's greedy `ar` (both cut before the first end id and at
`GEN` tokens: theirs decodes whole chunks, so it can run past `GEN`); the same for d2f's `jacobi`;
forwards (totals, prefill included) of `ar`, d2f's `jacobi`, theirs; prompts with equal forwards.
"""

from common import load


def cut(answer: list[int], ends: set[int], gen: int) -> list[int]:
    for i, t in enumerate(answer):
        if t in ends:
            return answer[:i][:gen]
    return answer[:gen]


def main() -> None:
    ours, theirs = load("ours_jacobi"), load("theirs_jacobi")
    ends, gen = set(ours["end_ids"]), ours["gen"]
    ar = ours["runs"]["ar"]
    f_ar = sum(r["forwards"] for r in ar)
    print("| setting | guesses | their eos | prompts | theirs = ar | d2f = ar | forwards ar | "
          "d2f jacobi | theirs | equal forwards |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, rows in theirs["runs"].items():
        name, source, eos = key.split(" | ")
        mine = ours["runs"][name]
        n = len(rows)
        t_ok = sum(
            cut(t["answer"], ends, gen) == a["tokens"] for t, a in zip(rows, ar, strict=True)
        )
        o_ok = sum(o["tokens"] == a["tokens"] for o, a in zip(mine, ar, strict=True))
        f_o, f_t = sum(o["forwards"] for o in mine), sum(t["forwards"] for t in rows)
        eq = sum(o["forwards"] == t["forwards"] for o, t in zip(mine, rows, strict=True))
        print(f"| {name} | {source} | {eos[4:]} | {n} | {t_ok}/{n} | {o_ok}/{n} | {f_ar} | {f_o} | "
              f"{f_t} | {eq}/{n} |")  # fmt: skip


if __name__ == "__main__":
    main()
