"""Jacobi Forcing's released decoder (hao-ai-lab/JacobiForcing 028dbd6,
`modeling/cllm2_qwen2_modeling_kv_terminate_on_eos_improved_multiblock_lookahead_unified.py::
jacobi_forward_greedy_multiblock`, bound to transformers' `Qwen2ForCausalLM` as their drivers do)
on the Qwen2 copy of the miniature world's AR model, batch 1, fp32 CPU (peer venv `venv-peers`,
transformers 4.53.0 = their requirements.txt; reads `ours_jacobi.json`).

    SBS_SCRATCH=DIR venv-peers/bin/python theirs_jacobi.py     # -> DIR/results/theirs_jacobi.json

Their modeling file is imported unchanged from SCRATCH/jacobiforcing. The per-prompt loop is
their driver's (`JacobiForcing/jacobi_forcing_inference_MR_humaneval.py` l.137-240, which loads
their 7B model and HumanEval, so it is restated here): a prefill call on prompt + n random
guesses, then one call per chunk, the first on the prefill's draft, later ones on [the returned
next token | n - 1 guesses]; stop when the answer holds the end id or has >= max_new_tokens. The
guesses are the one thing a driver chooses; two sources are run:
* `random`: theirs, `random.choice` over the prompt and answer so far (Python's `random`, seeded
  0 per prompt);
* `d2f`: d2f's rule (`d2f/decoding/jacobi.py` `Row.guesses`: `torch.randint` over the prompt and
  answer from a generator seeded `draft_seed = 0` per prompt, n - 1 per chunk; the prefill's n-th
  guess, whose logits nothing reads, is the pad id), so both decoders start every chunk from the
  same draft.
Forwards are counted by a forward hook on `lm_head` (their function runs the layers itself; one
`lm_head` call per forward, prefill included). Their knobs besides n, K, pool and r are left at
their defaults (`lookahead_start_ratio 0.0`, `max_iteration_count 128`).

The mask (`JF_MASK_FIX=1`, the default; `0` runs without it): in every generation call their
function builds the causal mask from `attention_mask = torch.ones_like(out)`, a 2D mask as long
as the draft window only. Their driver loads the model with `flash_attention_2`, which reads an
all-ones 2D mask as "no padding"; on CPU (sdpa / eager) transformers 4.53's `create_causal_mask`
pads a short 2D mask with False up to the key length (`prepare_padding_mask`), so the window
attends only to the first len(window) cached columns: the answer stops being greedy's as soon as
prompt + answer is longer than the window (seen: 0/10 prompts greedy at n = 8). The runner wraps
the module's `create_causal_mask` so that an all-ones mask is passed as None (plain causal over
the cache, what FA2 computes); their file is not changed.
"""

import os
import random
import sys

import torch
from common import SCRATCH, load, save
from jacobi_settings import SETTINGS

JF = SCRATCH / "jacobiforcing"
MASK_FIX = os.environ.get("JF_MASK_FIX", "1") == "1"


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(JF))
    import modeling.cllm2_qwen2_modeling_kv_terminate_on_eos_improved_multiblock_lookahead_unified as jf
    from transformers import Qwen2ForCausalLM

    jacobi_forward_greedy_multiblock = jf.jacobi_forward_greedy_multiblock
    if MASK_FIX:  # see the module doc: an all-ones 2D mask means "no padding", as FA2 reads it
        made = jf.create_causal_mask

        def create_causal_mask(**kw):
            m = kw["attention_mask"]
            return made(**(kw | {"attention_mask": None if m is not None and bool(m.all()) else m}))

        jf.create_causal_mask = create_causal_mask
        print("create_causal_mask: an all-ones attention_mask is passed as None")

    Qwen2ForCausalLM.jacobi_forward_greedy_multiblock = jacobi_forward_greedy_multiblock
    ours = load("ours_jacobi")
    model, info = Qwen2ForCausalLM.from_pretrained(
        ours["ckpt"], torch_dtype=torch.float32, output_loading_info=True
    )
    print("loading info", info)
    model.eval()
    calls = [0]
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    pad, gen = ours["pad_id"], ours["gen"]

    def decode(p: list[int], opts: dict, eos_id: int, source: str) -> dict:
        n = opts["chunk"]
        kw = dict(n_token_seq_len=n, K=opts["blocks"], r=opts["spawn_ratio"],
                  n_gram_pool_size=opts["pool_size"], eos_token_id=eos_id, pad_token_id=pad)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        random.seed(0)

        def guesses(ids: list[int], k: int) -> list[int]:
            if source == "random":
                return [random.choice(ids) for _ in range(k)]
            return [ids[i] for i in torch.randint(len(ids), (k,), generator=g).tolist()]

        input_ids = torch.tensor([p])
        generated = input_ids
        first = guesses(p, n) if source == "random" else guesses(p, n - 1) + [pad]
        pkv, next_tok, draft, _ = model.jacobi_forward_greedy_multiblock(
            input_ids=torch.cat([input_ids, torch.tensor([first])], -1),
            attention_mask=torch.ones_like(input_ids), past_key_values=None, use_cache=True,
            prefill_phase=True, **kw,
        )  # fmt: skip
        chunks, iters = 0, []
        while True:
            if bool((generated[0, len(p) :] == eos_id).any()) or generated.shape[1] - len(p) >= gen:
                break
            if chunks == 0:
                q = draft
            else:
                q = torch.cat(
                    [next_tok.view(1, -1), torch.tensor([guesses(generated[0].tolist(), n - 1)])],
                    -1,
                )
            pkv, next_tok, acc, it = model.jacobi_forward_greedy_multiblock(
                input_ids=q, attention_mask=None, past_key_values=pkv, use_cache=True,
                prefill_phase=False, **kw,
            )  # fmt: skip
            generated = torch.cat([generated, acc], -1)
            chunks += 1
            iters.append(it)
        return {"answer": generated[0, len(p) :].tolist(), "iters": iters}

    out = {"runs": {}}
    for source in ("d2f", "random"):
        for eos_id in ours["end_ids"]:
            for name, opts in SETTINGS:
                rows = []
                for p in ours["ids"]:
                    calls[0] = 0
                    r = decode(p, opts, eos_id, source)
                    r["forwards"] = calls[0]
                    assert calls[0] == 1 + sum(r["iters"]), (calls[0], r["iters"])
                    rows.append(r)
                out["runs"][f"{name} | {source} | eos {eos_id}"] = rows
                print(f"JF {name} guesses {source} eos {eos_id}: "
                      f"{sum(r['forwards'] for r in rows)} forwards")  # fmt: skip
    save("theirs_jacobi", out)


if __name__ == "__main__":
    main()
