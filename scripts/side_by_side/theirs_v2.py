"""Fast-dLLM v2 `batch_sample` (NVlabs/Fast-dLLM 5332e2fc `v2/generation_functions.py`, bound as their
`v2/eval.py` does) with the model class of the fork's `v2/modeling_ori.py` (the authors ship it with
the hub checkpoint) on the tiny d2f-written Dream checkpoint (Qwen2 weights, shifted logits):
batch 1, fp32 CPU (peer venv `venv-v2`).

    SBS_SCRATCH=DIR SHARPEN=60 venv-v2/bin/python theirs_v2.py [logits]
writes results/theirs_v2_s{SHARPEN}.json, or with `logits` the block-causal logits of one
sequence (results/v2_logits_theirs.pt) for `ours_v2.py logits`.
"""

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from common import (
    BLOCK,
    CKPT,
    FASTDLLM,
    FASTDLLM_FORK,
    GEN_LENGTH,
    SHARPEN,
    n_tokens,
    prompts_v2,
    result_path,
    save,
)

KEEP = (  # config fields copied into their Fast_dLLM_QwenConfig
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "rope_theta", "tie_word_embeddings", "use_sliding_window", "sliding_window",
    "max_window_layers", "attention_dropout", "initializer_range", "pad_token_id",
    "bos_token_id", "eos_token_id",
)  # fmt: skip


def main(logits_only: bool) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, f"{FASTDLLM_FORK}/v2")
    import modeling_ori
    from configuration import Fast_dLLM_QwenConfig

    sys.path.insert(0, f"{FASTDLLM}/v2")  # ahead of the fork's: NVlabs' generation_functions.py
    import generation_functions

    raw = json.loads(Path(CKPT["dream"], "config.json").read_text())
    cfg = Fast_dLLM_QwenConfig(**{k: raw[k] for k in KEEP}, bd_size=BLOCK)
    model, info = modeling_ori.Fast_dLLM_QwenForCausalLM.from_pretrained(
        CKPT["dream"], config=cfg, torch_dtype=torch.float32, output_loading_info=True
    )
    print("loading info", info)
    model.eval()
    sample = generation_functions.Fast_dLLM_QwenForCausalLM.batch_sample
    model.mdm_sample = types.MethodType(sample, model)
    mask, eos = raw["mask_token_id"], raw["eos_token_id"]
    tok = SimpleNamespace(pad_token_id=raw["pad_token_id"])
    calls = [0]
    # batch_sample calls self.forward() directly (no hook fires on the outer model): hook the inner one
    model.model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    P = prompts_v2(n_tokens(CKPT["dream"]))
    if logits_only:
        x = torch.tensor([P[0] + [mask] * BLOCK])
        with torch.no_grad():
            torch.save(
                model(input_ids=x, block_size=BLOCK).logits, result_path("v2_logits_theirs", "pt")
            )
        return
    out = {"prompts": P, "runs": {}}
    for sbs in (2, 4, 8):
        for thr in (0.9, 0.5):
            rows = []
            for p in P:
                calls[0] = 0
                res = model.mdm_sample(
                    torch.tensor([p]), tokenizer=tok, block_size=BLOCK, max_new_tokens=GEN_LENGTH,
                    small_block_size=sbs, min_len=len(p), seq_len=torch.tensor([len(p)]),
                    mask_id=mask, threshold=thr, stop_token=eos, use_block_cache=False,
                    top_p=0.95, temperature=0.0,
                )  # fmt: skip
                rows.append(
                    {"answer": res[0][len(p) :].tolist(), "nfe": calls[0], "hook": calls[0]}
                )
            out["runs"][f"sbs{sbs}/thr{thr}"] = rows
            print(sbs, thr, [r["hook"] for r in rows], [len(r["answer"]) for r in rows], flush=True)
    save(f"theirs_v2_s{SHARPEN}", out)


if __name__ == "__main__":
    main(sys.argv[1:] == ["logits"])
