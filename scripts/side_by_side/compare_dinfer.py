"""Compare `ours_dinfer_{CKPT}.json` (`_static` with DINFER_KV=static) and
`theirs_dinfer_{CKPT}.json` (any Python): one markdown row per setting and end id given to their
decoder.

    SBS_SCRATCH=DIR python compare_dinfer.py

Columns: prompts; answers identical (theirs cut before its first d2f end id, against d2f's
answer, which stops there); forwards (totals over the prompts) d2f, theirs, theirs' forwards
that decoded a block with no mask left ("idle": the cached forward after a refresh that completed
the block, and the forwards after an early stop their loop does not take); prompts where
d2f = theirs - idle (d2f skips the idle forward: every setting without smoothing) and where
d2f = theirs (d2f makes it: smoothing with a cache).
"""

from common import load
from dinfer_settings import CKPT, OURS


def cut(answer: list[int], ends: set[int]) -> list[int]:
    for i, t in enumerate(answer):
        if t in ends:
            return answer[:i]
    return answer


def main() -> None:
    ours, theirs = load(OURS), load(f"theirs_dinfer_{CKPT}")
    ends = set(ours["end_ids"])
    print(f"their model vs d2f's: max |dlogit| {theirs['logit_diff']:.3g}")
    print("| setting | their eos | prompts | same tokens | forwards d2f | theirs | theirs idle | "
          "d2f = theirs - idle | d2f = theirs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for key, rows in theirs["runs"].items():
        name, eos = key.split(" | eos ")
        mine = ours["runs"][name]
        same = sum(cut(t["answer"], ends) == o["tokens"] for t, o in zip(rows, mine, strict=True))
        f_o = sum(o["forwards"] for o in mine)
        f_t = sum(t["forwards"] for t in rows)
        idle = sum(t["idle"] for t in rows)
        expl = sum(
            o["forwards"] == t["forwards"] - t["idle"] for t, o in zip(rows, mine, strict=True)
        )
        equal = sum(o["forwards"] == t["forwards"] for t, o in zip(rows, mine, strict=True))
        n = len(rows)
        print(
            f"| {name} | {eos} | {n} | {same}/{n} | {f_o} | {f_t} | {idle} | {expl}/{n} "
            f"| {equal}/{n} |"
        )


if __name__ == "__main__":
    main()
