"""d2f's `fast_dllm_v2` on the same Dream checkpoint and prompts as `theirs_v2.py` (d2f's venv,
PYTHONPATH = the d2f checkout).

    SBS_SCRATCH=DIR SHARPEN=60 python ours_v2.py            -> results/ours_v2_s{SHARPEN}.json
    SBS_SCRATCH=DIR SHARPEN=60 python ours_v2.py aligned    -> results/ours_v2_aligned_s{SHARPEN}.json
    SBS_SCRATCH=DIR SHARPEN=60 python ours_v2.py logits     (prints the logit check)

`aligned` is a counterfactual, patched here only: d2f's decoder given block ids
`position // block_size` from the first real token (the prompt split into blocks from position 0,
as theirs) instead of the whole prompt as block 0.
"""

import sys

import torch
from common import BLOCK, CKPT, GEN_LENGTH, SHARPEN, n_tokens, prompts_v2, result_path, save
from ours import full_answers

import d2f.decoding.fast_dllm_v2 as V2
from d2f import DecodeConfig, generate, load_model
from d2f.family import family_of


def aligned_block_ids(valid, prompt_end, bs):
    pos = torch.arange(valid.shape[1])
    pad = (~valid).long().sum(1, keepdim=True)  # left padding only
    return torch.where(valid, (pos[None] - pad).clamp(min=0) // bs, -1)


def logit_check(model, P) -> None:
    """d2f's Dream under the block-causal mask vs their Fast_dLLM_Qwen (theirs_v2.py logits)."""
    mask_id = family_of(model).mask_token_id
    L = len(P[0]) + BLOCK
    x = torch.tensor([P[0] + [mask_id] * BLOCK])
    blk = torch.arange(L) // BLOCK
    allowed = blk[None, :] <= blk[:, None]  # query i sees key j iff block(j) <= block(i)
    add = torch.zeros(1, 1, L, L).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        lg = model(input_ids=x, attention_mask=add).logits
    ref = torch.load(result_path("v2_logits_theirs", "pt"))
    diff = (lg - ref).abs().max().item()
    print("max |logit diff| d2f Dream (block-causal additive mask) vs their Fast_dLLM_Qwen:", diff)


def main(mode: str) -> None:
    torch.set_num_threads(1)
    model, _ = load_model(CKPT["dream"], dtype="float32")
    P = prompts_v2(n_tokens(CKPT["dream"]))
    if mode == "logits":
        return logit_check(model, P)
    tag = ""
    if mode == "aligned":
        V2.block_ids = aligned_block_ids
        tag = "_aligned"
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    res = {"prompts": P, "end_ids": list(family_of(model).end_token_ids), "runs": {}}
    for sbs in (2, 4, 8):
        for thr in (0.9, 0.5):
            cfg = DecodeConfig(strategy="fast_dllm_v2", block_size=BLOCK, max_new_tokens=GEN_LENGTH,
                               options=dict(sub_block_size=sbs, threshold=thr))  # fmt: skip
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
            res["runs"][f"sbs{sbs}/thr{thr}"] = {"alone": rows, "batch": batch}
            print(sbs, thr, [r["hook"] for r in rows], flush=True)
    save(f"ours_v2{tag}_s{SHARPEN}", res)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
