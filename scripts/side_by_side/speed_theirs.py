"""The D2F authors' side of `speed.py`: a persistent worker in the peer venv (`SBS_SCRATCH/venv`,
transformers 4.49, peft 0.17) running their decode loop on their `LLaDAModelLM`.

Their loop (`_generate_block_single` of `D2F-eval/eval_llada.py`, taken with `ast`, see
`theirs_d2f_calls.py`) on their model as their eval script builds it: `LLaDAModelLM.from_pretrained`
(fp32, eval) and, with an adapter, `PeftModel.from_pretrained` (`unmerged`) or that followed by
`merge_and_unload()` (`merged`). Blocks stop being added at d2f's end ids (the same stop rule as
d2f), and the loop decodes the answer text every step with the checkpoint's own tokenizer, as
theirs does. Model calls are counted by a forward pre-hook on the object the loop calls.
Requests (`common.serve`): `setup`, `decode`, `call`; see `speed.py`.
"""

import sys

import torch
from common import serve, timed
from theirs_d2f_calls import EVAL, their_decoder, their_helpers

STATE = {}


def setup(base: str, adapter: str | None, variants: list, settings: dict, mask_id: int, end_ids):
    """Load one model per variant (`base`, `merged`, `unmerged`) and bind their loop."""
    torch.set_num_threads(1)
    sys.path.insert(0, str(EVAL))
    from model_cache.llada.configuration_llada import LLaDAConfig
    from model_cache.llada.modeling_llada import LLaDAModelLM
    from transformers import PreTrainedTokenizerFast

    config = LLaDAConfig.from_pretrained(base)
    models, calls = {}, [0]
    for variant in variants:
        model = LLaDAModelLM.from_pretrained(base, config=config, torch_dtype=torch.float32)
        if variant != "base":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
            if variant == "merged":
                model = model.merge_and_unload()
        model.eval()
        model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        models[variant] = model
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    stub = their_decoder(models[variants[0]], settings, mask_id, config.eos_token_id, tokenizer)
    stub.end_ids = set(end_ids)
    STATE.update(models=models, calls=calls, stub=stub, bs=settings["block_size"], mask=mask_id)
    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def decode(variant: str, prompt: list) -> dict:
    """One prompt through their loop: its whole answer (their cut is the caller's), calls, time."""
    stub, calls = STATE["stub"], STATE["calls"]
    stub.model, calls[0] = STATE["models"][variant], 0
    tokens, wall, cpu = timed(lambda: stub._generate_block_single(torch.tensor([prompt])))
    return {"tokens": tokens, "calls": calls[0], "wall": wall, "cpu": cpu}


def _block_mask(P: int, bs: int) -> torch.Tensor:
    """(1, 1, P + bs, P + bs) their additive mask for `[prompt | block 1]` (0 / -inf)."""
    make = their_helpers()["create_full_block_attention_mask"]
    return make(prompt_length=P, max_length=P + bs, block_size=bs, dtype=torch.float32)


def call(variant: str, prompt: list, cached: bool, reps: int) -> dict:
    """`reps` model calls as their loop makes them: `[prompt | block 1]` with no cache (their
    first step, which caches the prompt), or block 1 alone over the prompt's cache."""
    model, P, bs = STATE["models"][variant], len(prompt), STATE["bs"]
    x = torch.tensor([prompt + [STATE["mask"]] * bs])  # (1, P + bs)
    full = _block_mask(P, bs)
    with torch.inference_mode():
        past = model(x[:, :P], attention_bias=full[:, :, :P, :P], use_cache=True, update_kvcache=P)
        past = past.past_key_values
        if cached:
            args = {"attention_bias": full[:, :, P:], "past_key_values": past, "use_cache": True}
            inputs, args["update_kvcache"] = x[:, P:], 0
        else:
            args = {"attention_bias": full, "past_key_values": None, "use_cache": True}
            inputs, args["update_kvcache"] = x, P
        walls, cpus = [], []
        for _ in range(reps):
            out, wall, cpu = timed(lambda: model(inputs, **args))
            walls.append(wall)
            cpus.append(cpu)
        logits = out.logits[0, -bs:].tolist()  # (bs, V) the block's columns
    return {"wall": walls, "cpu": cpus, "logits": logits}


if __name__ == "__main__":
    serve({"setup": setup, "decode": decode, "call": call})
