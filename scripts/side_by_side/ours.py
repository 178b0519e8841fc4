"""d2f's ports (`fast_dllm`, `d3llm`) on the same checkpoint and prompts as `theirs_*.py` (d2f's venv,
PYTHONPATH = the d2f checkout): each prompt alone (batch 1) and all five as one ragged batch;
forwards counted by a forward hook.

    SBS_SCRATCH=DIR SHARPEN=60 python ours.py fastdllm|d3llm|fastdllm_dream
writes results/ours_{which}_s{SHARPEN}.json.
"""

import sys

import torch
from common import BLOCK, CKPT, GEN_LENGTH, SHARPEN, n_tokens, prompts, save

from d2f import DecodeConfig, generate, load_model
from d2f.family import family_of

RULES = {
    "thr0.9": dict(rule="threshold", threshold=0.9),
    "thr0.5": dict(rule="threshold", threshold=0.5),
    "factor1.0": dict(rule="factor", factor=1.0),
}


def full_answers(out, n: int) -> list[list[int]]:
    """The whole answer buffer of each row (every column, after an end token too): its last event."""
    ans = [None] * n
    for ev in out.trace:
        for j, r in enumerate(ev.rows.tolist()):
            ans[r] = ev.answer[j].tolist()
    return ans


def main(which: str) -> None:
    torch.set_num_threads(1)
    family = "dream" if which == "fastdllm_dream" else "llada"
    model, _ = load_model(CKPT[family], dtype="float32")
    P = prompts(family, n_tokens(CKPT[family]))
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    def run(cfg: DecodeConfig) -> dict:
        rows = []
        for p in P:
            calls[0] = 0
            out = generate(model, [p], cfg, record=True)
            rows.append({"answer": full_answers(out, 1)[0], "tokens": out.tokens[0],
                         "forwards": out.stats.forwards, "hook": calls[0]})  # fmt: skip
        calls[0] = 0
        out = generate(model, P, cfg, record=True)
        batch = {"answers": full_answers(out, len(P)), "tokens": out.tokens,
                 "row_forwards": [r.forwards for r in out.stats.rows], "hook": calls[0]}  # fmt: skip
        return {"alone": rows, "batch": batch}

    res = {"prompts": P, "end_ids": list(family_of(model).end_token_ids), "runs": {}}
    if which.startswith("fastdllm"):
        # The Dream release has the threshold rule only, and no cache-free path.
        caches = ("none", "prefix", "dual") if family == "llada" else ("dual", "prefix")
        rules = RULES if family == "llada" else {k: RULES[k] for k in ("thr0.9", "thr0.5")}
        for cache in caches:
            for rname, kw in rules.items():
                cfg = DecodeConfig(strategy="fast_dllm", block_size=BLOCK, max_new_tokens=GEN_LENGTH,
                                   options=dict(cache=cache, **kw))  # fmt: skip
                res["runs"][f"{cache}/{rname}"] = run(cfg)
                print(cache, rname, [r["hook"] for r in res["runs"][f"{cache}/{rname}"]["alone"]])
    else:
        for es in (True, False):
            for thr in (0.5, 1.5, 3.0):
                cfg = DecodeConfig(strategy="d3llm", block_size=BLOCK, max_new_tokens=GEN_LENGTH,
                                   tau_add=0.1, tau_act=0.95,
                                   options=dict(threshold=thr, early_stop=es))  # fmt: skip
                res["runs"][f"es{int(es)}/thr{thr}"] = run(cfg)
                print(es, thr, [r["hook"] for r in res["runs"][f"es{int(es)}/thr{thr}"]["alone"]])
    save(f"ours_{which}_s{SHARPEN}", res)


if __name__ == "__main__":
    main(sys.argv[1])
