"""Theirs vs ours, one line per setting: tokens over the whole answer (`full`: every column, after
the end token too; `cut`: up to the first end token against ours' returned tokens), the ragged
batch against theirs (`batch_full`), and forwards (their hook and own `nfe`; our hook and
`stats.forwards` alone; our per-row counts and hook in the batch).

    SBS_SCRATCH=DIR python compare.py THEIRS OURS      e.g. theirs_fastdllm_s60 ours_fastdllm_s60

Only the first GEN_LENGTH answer columns count (Fast-dLLM v2 returns one token more).
"""

import sys

from common import GEN_LENGTH, load


def yn(flags) -> str:
    return "".join("Y" if f else "n" for f in flags)


def main(theirs: str, ours: str) -> None:
    th_res, us_res = load(theirs), load(ours)
    assert th_res["prompts"] == us_res["prompts"], "the two sides ran different prompts"
    end = set(us_res["end_ids"])

    def cut(a):
        return next((a[:i] for i, t in enumerate(a) if t in end), a)

    for k in th_res["runs"]:
        t, o = th_res["runs"][k], us_res["runs"][k]
        their = [r["answer"][:GEN_LENGTH] for r in t]
        alone = list(zip(their, o["alone"], strict=True))
        full = yn(a == b["answer"] for a, b in alone)
        upto = yn(cut(a) == b["tokens"] for a, b in alone)
        bat = yn(a == b for a, b in zip(their, o["batch"]["answers"], strict=True))
        print(
            f"{k:18s} full={full} cut={upto} batch_full={bat} "
            f"theirs hook={[a['hook'] for a in t]} nfe={[a['nfe'] for a in t]} "
            f"ours alone={[b['hook'] for b in o['alone']]} "
            f"stats={[b['forwards'] for b in o['alone']]} "
            f"batch rows={o['batch']['row_forwards']} batch hook={o['batch']['hook']}"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
