"""The D2F authors' decode loop on the same prompts as `ours_d2f_calls.py`; per-prompt model calls
of both, side by side (peer venv `venv`, transformers 4.49).

Their loop is `_generate_block_single` + `_update_block_completion_states` of
`D2F-eval/eval_llada.py` (zhijie-group/Discrete-Diffusion-Forcing @ 771f745, checked out in
`SBS_SCRATCH/d2f-authors`) with the module helpers it calls, taken from their file with `ast` at
run time (nothing of theirs is in this repository), bound to a stub `self` (cpu, fp32, greedy,
`max_length` 128 = the tiny model's context, the settings of `ours_d2f_calls.py`), on their own
`LLaDAModelLM` loading the tiny teacher. Two edits, each asserted to hit once: their hard-coded
8B end id `126081` becomes a set of end ids, so that the loop stops adding blocks at the tiny
model's `<|endoftext|>` alone (their rule) or at d2f's end ids `<|endoftext|>`, `<|eot_id|>` (the
same stop rule as d2f). Model calls are counted by a forward pre-hook. Prints, per setting: the
total calls of both, the per-prompt differences (d2f - theirs), and whether d2f's tokens equal
theirs up to their first end id.

    SBS_SCRATCH=DIR DIR/venv/bin/python scripts/side_by_side/theirs_d2f_calls.py
"""

import ast
import collections
import functools
import sys
import types

import torch
import torch.distributions as dists
import torch.nn.functional as F
from common import SCRATCH, load, save

EVAL = SCRATCH / "d2f-authors" / "D2F-eval"
HELPERS = ("create_full_block_attention_mask", "extract_attention_mask", "sample_tokens")
HELPERS += ("top_p_logits", "top_k_logits")
METHODS = ("_generate_block_single", "_update_block_completion_states")
EDITS = [
    ("eos_token_id = 126081", "eos_token_id = self.eos_token_id"),
    ("if x0[idx].item() == eos_token_id:", "if x0[idx].item() in self.end_ids:"),
]


@functools.cache
def their_code() -> tuple[dict, dict]:
    """Their module helpers (the namespace they run in) and their two methods, compiled from
    their source: (namespace, {method name -> function})."""
    src = (EVAL / "eval_llada.py").read_text()
    ns = {"torch": torch, "F": F, "dists": dists}
    found = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and node.name in HELPERS:
            exec(compile(ast.Module([node], []), str(EVAL / "eval_llada.py"), "exec"), ns)
        if isinstance(node, ast.ClassDef):  # their LLaDA eval class (named DreamLoRA upstream)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in METHODS:
                    lines = ast.get_source_segment(src, item).splitlines()
                    text = "\n".join([lines[0]] + [line[4:] for line in lines[1:]])
                    if item.name == "_generate_block_single":
                        for old, new in EDITS:
                            assert text.count(old) == 1, old
                            text = text.replace(old, new)
                    exec(text, ns)
                    found[item.name] = ns[item.name]
    assert set(found) == set(METHODS) and all(h in ns for h in HELPERS), sorted(found)
    return ns, found


def their_helpers() -> dict:
    """Their module helpers by name (e.g. `create_full_block_attention_mask`)."""
    return their_code()[0]


def their_decoder(model, s: dict, mask_id: int, eos_token_id: int, tokenizer=None):
    """Their loop bound to a stub `self`: `stub._generate_block_single(prompt (1, P) long)`.

    s: d2f's settings (block_size, max_new_tokens, tau_add, tau_act, tau_conf); cpu, fp32, greedy,
    `max_length` 128 (the tiny model's context). Set `stub.end_ids` (the ids that stop adding
    blocks) before decoding. `tokenizer`: theirs decodes the answer text every step (unused);
    None gives a stub that renders ids.
    """
    if tokenizer is None:
        tokenizer = types.SimpleNamespace(decode=lambda ids, **kw: " ".join(map(str, ids)))
    stub = types.SimpleNamespace(
        model=model,
        device="cpu",
        mask_token_id=mask_id,
        block_size=s["block_size"],
        block_add_threshold=s["tau_add"],
        skip_threshold=s["tau_conf"],
        decoded_token_threshold=s["tau_act"],
        max_new_tokens=s["max_new_tokens"],
        max_length=128,
        target_dtype=torch.float32,
        temperature=0.0,
        top_p=None,
        top_k=None,
        sampling_strategy="default",
        tokenizer=tokenizer,
        eos_token_id=eos_token_id,
    )
    for name, fn in their_code()[1].items():
        setattr(stub, name, types.MethodType(fn, stub))
    return stub


def cut(tokens: list[int], ends: set[int]) -> tuple[list[int], bool]:
    """Tokens before the first end id, and whether there was one."""
    first = next((i for i, t in enumerate(tokens) if t in ends), None)
    return (tokens, False) if first is None else (tokens[:first], True)


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(EVAL))
    from model_cache.llada.configuration_llada import LLaDAConfig
    from model_cache.llada.modeling_llada import LLaDAModelLM

    ours = load("ours_d2f_calls")
    s = ours["settings"]
    config = LLaDAConfig.from_pretrained(ours["teacher"])
    model = LLaDAModelLM.from_pretrained(ours["teacher"], config=config, torch_dtype=torch.float32)
    model.eval()
    calls, widths = [0], []

    def count(module, args):
        calls[0] += 1
        widths.append(args[0].shape[1])  # their loop passes the input ids positionally

    model.register_forward_pre_hook(count)
    stub = their_decoder(model, s, ours["mask_id"], config.eos_token_id)
    ends = set(ours["end_ids"])
    results = {}
    runs = [
        ("d2f", "their end rule (<|endoftext|>)", [config.eos_token_id], s["tau_add"]),
        ("d2f", "d2f's end ids", ours["end_ids"], s["tau_add"]),
        ("cache_only", "d2f's end ids", ours["end_ids"], 1.0),
    ]
    for strategy, label, end_ids, tau_add in runs:
        stub.end_ids, stub.block_add_threshold = set(end_ids), tau_add
        theirs, first_is_prompt_and_block = [], 0
        for p in ours["ids"]:
            calls[0], widths[:] = 0, []
            seq = stub._generate_block_single(torch.tensor([p]))
            theirs.append({"tokens": seq, "calls": calls[0]})
            first_is_prompt_and_block += widths[0] == len(p) + s["block_size"]
        rows = ours[strategy]
        diff = collections.Counter(
            o["calls"] - t["calls"] for o, t in zip(rows, theirs, strict=True)
        )
        same = sum(
            (o["tokens"], o["hit_end"]) == cut(t["tokens"], ends)
            for o, t in zip(rows, theirs, strict=True)
        )
        print(
            f"{strategy} (tau_add {tau_add}) vs theirs, blocks stop on {label}: calls d2f "
            f"{sum(o['calls'] for o in rows)}, theirs {sum(t['calls'] for t in theirs)}; per prompt "
            f"d2f - theirs {dict(sorted(diff.items()))}; tokens equal {same}/{len(rows)}; their "
            f"first call is prompt + one block on {first_is_prompt_and_block}/{len(rows)}"
        )
        results[f"{strategy}/{label}"] = theirs
    save("theirs_d2f_calls", results)


if __name__ == "__main__":
    main()
