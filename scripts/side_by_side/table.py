"""Markdown table rows for docs/decoding.md ("Side by side with the released code") from two result
files: setting | tokens identical per prompt (alone) | batch | forwards theirs | ours alone | ours
batch rows.

    SBS_SCRATCH=DIR python table.py THEIRS OURS [full|cut]

`full` compares every answer column; `cut` compares up to and including the first end token (for
early stop, which fills the rest of the answer).
"""

import sys

from common import GEN_LENGTH, load


def main(theirs: str, ours: str, mode: str = "full") -> None:
    th_res, us_res = load(theirs), load(ours)
    assert th_res["prompts"] == us_res["prompts"], "the two sides ran different prompts"
    end = set(us_res["end_ids"])

    def cut(a):
        a = a[:GEN_LENGTH]
        if mode == "full":
            return a
        return next((a[: i + 1] for i, t in enumerate(a) if t in end), a)

    def f(v):
        return " ".join(str(x) for x in v)

    for k in th_res["runs"]:
        t, o = th_res["runs"][k], us_res["runs"][k]
        pairs = zip(t, o["alone"], strict=True)
        same = ["yes" if cut(a["answer"]) == cut(b["answer"]) else "**no**" for a, b in pairs]
        bsame = all(
            cut(a["answer"]) == cut(b) for a, b in zip(t, o["batch"]["answers"], strict=True)
        )
        th, nfe = [a["hook"] for a in t], [a["nfe"] for a in t]
        mine = [b["hook"] for b in o["alone"]]
        assert mine == [b["forwards"] for b in o["alone"]], "d2f's stats.forwards != its hook count"
        extra = f" (nfe {f(nfe)})" if nfe != th else ""
        print(
            f"| {k.replace('/', ', ')} | {' '.join(same)} | {'yes' if bsame else '**no**'} "
            f"| {f(th)}{extra} | {f(mine)} | {f(o['batch']['row_forwards'])} |"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
