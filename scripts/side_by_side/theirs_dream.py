"""The released Fast-dLLM v1 Dream sampler (`generation_utils_block` `diffusion_generate` / `_sample`,
bound to the model as their `dream/eval.py` does) on the tiny Dream checkpoint: batch 1, fp32 CPU,
forwards counted by a forward hook (peer venv `venv`). Writes results/theirs_fastdllm_dream_s{SHARPEN}.json.
"""

import sys
import types

import torch
from common import BLOCK, CKPT, FASTDLLM, GEN_LENGTH, SHARPEN, n_tokens, prompts, save


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, f"{FASTDLLM}/dream")
    from model.generation_utils_block import DreamGenerationMixin
    from model.modeling_dream import DreamModel

    model = DreamModel.from_pretrained(CKPT["dream"], torch_dtype=torch.float32).eval()
    model.diffusion_generate = types.MethodType(DreamGenerationMixin.diffusion_generate, model)
    model._sample = types.MethodType(DreamGenerationMixin._sample, model)
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    P = prompts("dream", n_tokens(CKPT["dream"]))
    out = {"prompts": P, "runs": {}}
    for cache, dual in (("dual", True), ("prefix", False)):
        for rname, thr in (("thr0.9", 0.9), ("thr0.5", 0.5)):
            rows = []
            for p in P:
                calls[0] = 0
                ids = torch.tensor([p])
                g = model.diffusion_generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_LENGTH,
                    output_history=False, return_dict_in_generate=True, steps=GEN_LENGTH,
                    temperature=0.0, top_p=None, top_k=None, alg="confidence_threshold",
                    alg_temp=0.0, threshold=thr, block_length=BLOCK, dual_cache=dual,
                )  # fmt: skip
                answer = g.sequences[0, len(p) :].tolist()
                rows.append({"answer": answer, "nfe": calls[0], "hook": calls[0]})
            out["runs"][f"{cache}/{rname}"] = rows
            print(cache, rname, [r["hook"] for r in rows], flush=True)
    save(f"theirs_fastdllm_dream_s{SHARPEN}", out)


if __name__ == "__main__":
    main()
