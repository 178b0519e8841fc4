"""The released Fast-dLLM v1 LLaDA functions, or d3LLM's `generate_multi_block`, on the tiny LLaDA
checkpoint: batch 1 per prompt, fp32 CPU, forwards counted by a forward hook (peer venv `venv`).

    SBS_SCRATCH=DIR SHARPEN=60 venv/bin/python theirs_llada.py fastdllm|d3llm
writes results/theirs_{fastdllm|d3llm}_s{SHARPEN}.json.
"""

import json
import sys
from pathlib import Path

import torch
from common import BLOCK, CKPT, D3LLM, FASTDLLM, GEN_LENGTH, SHARPEN, n_tokens, prompts, save


def peer(which: str):
    """(their LLaDAModelLM class, their module with the decoding functions)."""
    if which == "fastdllm":
        sys.path.insert(0, f"{FASTDLLM}/llada")
        import generate
        from model.modeling_llada import LLaDAModelLM

        return LLaDAModelLM, generate
    sys.path.insert(0, D3LLM)
    sys.path.insert(0, f"{D3LLM}/d3llm/d3llm_LLaDA")
    import d3llm_llada_generate_util
    from utils.utils_LLaDA.model.modeling_llada import LLaDAModelLM

    return LLaDAModelLM, d3llm_llada_generate_util


def main(which: str) -> None:
    torch.set_num_threads(1)
    LLaDAModelLM, G = peer(which)
    model = LLaDAModelLM.from_pretrained(CKPT["llada"], torch_dtype=torch.float32).eval()
    cfg = json.loads(Path(CKPT["llada"], "config.json").read_text())
    mask, eos = cfg["mask_token_id"], cfg["eos_token_id"]
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    P = prompts("llada", n_tokens(CKPT["llada"]))
    out = {"prompts": P, "runs": {}}

    def run(key, fn, **kw):
        rows = []
        for p in P:
            calls[0] = 0
            x, nfe = fn(model, torch.tensor([p]), temperature=0.0, mask_id=mask, **kw)
            rows.append({"answer": x[0, len(p) :].tolist(), "nfe": int(nfe), "hook": calls[0]})
        out["runs"][key] = rows
        print(key, [r["hook"] for r in rows], flush=True)

    if which == "fastdllm":
        fns = {
            "none": G.generate,
            "prefix": G.generate_with_prefix_cache,
            "dual": G.generate_with_dual_cache,
        }
        rules = {
            "thr0.9": dict(threshold=0.9),
            "thr0.5": dict(threshold=0.5),
            "factor1.0": dict(factor=1.0),
        }
        for cache, fn in fns.items():
            for rname, kw in rules.items():
                # steps = gen_length: the dual cache's refinement bound never binds (docs)
                run(
                    f"{cache}/{rname}",
                    fn,
                    steps=GEN_LENGTH,
                    gen_length=GEN_LENGTH,
                    block_length=BLOCK,
                    **kw,
                )
    else:
        for es in (True, False):
            for thr in (0.5, 1.5, 3.0):
                run(
                    f"es{int(es)}/thr{thr}",
                    G.generate_multi_block,
                    max_new_tokens=GEN_LENGTH,
                    block_size=BLOCK,
                    threshold=thr,
                    block_add_threshold=0.1,
                    decoded_token_threshold=0.95,
                    eos_token_id=eos,
                    early_stop=es,
                )
    save(f"theirs_{which}_s{SHARPEN}", out)


if __name__ == "__main__":
    main(sys.argv[1])
