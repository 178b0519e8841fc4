"""The dual-cache step bound of Fast-dLLM v1 at 5332e2fc, measured (peer venv `venv`): with
steps = gen_length / block_length (one step per block, as in their `llada/eval_humaneval.sh`) the
refinement loop never runs and blocks keep masks; with steps = gen_length none are left.
"""

import json
import sys
from pathlib import Path

import torch
from common import BLOCK, CKPT, FASTDLLM, GEN_LENGTH, n_tokens, prompts


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, f"{FASTDLLM}/llada")
    import generate
    from model.modeling_llada import LLaDAModelLM

    model = LLaDAModelLM.from_pretrained(CKPT["llada"], torch_dtype=torch.float32).eval()
    mask = json.loads(Path(CKPT["llada"], "config.json").read_text())["mask_token_id"]
    for steps in (GEN_LENGTH // BLOCK, GEN_LENGTH):
        left = []
        for p in prompts("llada", n_tokens(CKPT["llada"])):
            x, _ = generate.generate_with_dual_cache(
                model, torch.tensor([p]), steps=steps, gen_length=GEN_LENGTH,
                block_length=BLOCK, mask_id=mask, threshold=0.9,
            )  # fmt: skip
            left.append(int((x[0, len(p) :] == mask).sum()))
        print(f"dual, threshold 0.9, steps={steps}: masks left per prompt {left}")


if __name__ == "__main__":
    main()
