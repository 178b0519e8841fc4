"""LoRA at inference: the base model, the merged adapter and the unmerged PeftModel, side by side.

Loads `--model` (default: the miniature world's teacher) with `--adapter` (default: a random one
shaped like the quickstart student's, r 16 on q/k/v/o/gate/up/down), merged (`load_model(...,
merge_adapter=True)`) and unmerged (a PeftModel), plus `lean`: the base model with the same LoRA
written as two `F.linear` calls per wrapped layer, i.e. the cost of the LoRA matmuls alone, so
`unmerged - lean` is peft's own per-layer overhead. Times, per variant:

* call: one forward of the first prompt and a block of masks under the block-causal mask, no
  cache (the first call of a D2F decode), in ms;
* decode: `generate` (strategy `d2f`, batch 1) over `--prompts` prompts, ms per prompt and per
  forward: the miniature world's held-out questions for the default model (chat template, 25-27
  tokens), random ids of `--prompt_len` otherwise.

Every round runs one call (one prompt's decode) of each variant, in a fresh random order; each
variant keeps its fastest call (each prompt's fastest decode) over `--repeats` x `--calls` rounds
(`--repeats` per prompt), and the ratios are to `merged`. All variants must give the same tokens
(checked). CPU, `--threads` torch threads (default 1); compare ratios, not absolute times.

    python scripts/bench_lora.py
    python scripts/bench_lora.py --model DIR --adapter DIR --repeats 20
    python scripts/bench_lora.py --hidden 512 --layers 8    # a random LLaDA of that size
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from d2f.adapters import save_adapter
from d2f.decoding import DecodeConfig, encode_prompts, generate
from d2f.family import family_of
from d2f.mask import block_causal_mask, block_ids, to_additive
from d2f.models import load_model

TEACHER = Path(__file__).resolve().parents[1] / "d2f/tinyworld/assets/teacher"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(model_dir: str, out: str, r: int) -> str:
    """A non-zero LoRA (B != 0) on every attention and MLP projection, saved in d2f's format."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(model_dir)
    torch.manual_seed(0)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    return str(save_adapter(get_peft_model(base, lora), out))


class LeanLoRA(nn.Module):
    """`base(x) + (x A^T) B^T * scale`: the LoRA matmuls and nothing else (eval, no dropout)."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        lora = nn.functional.linear(nn.functional.linear(x, self.a), self.b)
        return self.base(x) + lora * self.scale


def lean_copy(model_dir: str, peft_model) -> nn.Module:
    """The base model with each of `peft_model`'s LoRA layers replaced by a `LeanLoRA`."""
    from peft.tuners.lora import Linear as LoraLinear

    lean, _ = load_model(model_dir)
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLinear):
            parent_name, leaf = name.rsplit(".", 1)
            parent = lean.get_submodule(parent_name)
            a = module.lora_A["default"].weight.detach()
            b = module.lora_B["default"].weight.detach()
            setattr(parent, leaf, LeanLoRA(getattr(parent, leaf), a, b, module.scaling["default"]))
    return lean.eval()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=str(TEACHER), help="base checkpoint (default: tiny teacher)")
    p.add_argument("--hidden", type=int, default=0, help="> 0: a random LLaDA this wide instead")
    p.add_argument("--layers", type=int, default=2, help="layers of the --hidden random model")
    p.add_argument("--adapter", default=None, help="LoRA adapter (default: a random r-16 one)")
    p.add_argument("--rank", type=int, default=16, help="rank of the random adapter")
    p.add_argument("--prompt_len", type=int, default=27, help="tokens per random-id prompt")
    p.add_argument("--block_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--prompts", type=int, default=20, help="random prompts per decode round")
    p.add_argument("--calls", type=int, default=30, help="call rounds per repeat")
    p.add_argument("--repeats", type=int, default=10, help="rounds; each variant keeps its best")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if min(args.prompt_len, args.block_size, args.prompts, args.calls, args.repeats) < 1:
        p.error("--prompt_len, --block_size, --prompts, --calls and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    if args.hidden > 0:
        from d2f.tiny import write_tiny_checkpoint

        sizes = {
            "d_model": args.hidden,
            "n_layers": args.layers,
            "n_heads": max(args.hidden // 64, 1),
        }
        sizes["mlp_hidden_size"] = 3 * args.hidden
        args.model = str(
            write_tiny_checkpoint(tempfile.mkdtemp(prefix="lora_base_"), "llada", **sizes)
        )
    adapter = args.adapter or random_adapter(
        args.model, tempfile.mkdtemp(prefix="lora_"), args.rank
    )
    unmerged, _ = load_model(args.model, adapter=adapter)
    base, tok = load_model(args.model)
    variants = {
        "base": base,
        "merged": load_model(args.model, adapter=adapter, merge_adapter=True)[0],
        "lean": lean_copy(args.model, unmerged),
        "unmerged": unmerged,
    }
    family = family_of(variants["base"])
    vocab = variants["base"].config.vocab_size
    special = {family.mask_token_id, *family.end_token_ids, family.pad_token_id}
    words = [t for t in range(vocab) if t not in special]
    rng = random.Random(0)
    cfg = DecodeConfig(
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        tau_add=0.5,
        tau_act=0.95,
        tau_conf=0.9,
    )
    if Path(args.model).resolve() == TEACHER.resolve():
        from d2f.tinyworld.task import problems

        questions = [q.question for q in problems("add2", "test", args.prompts)]
        prompts = encode_prompts(questions, tok, family, cfg)
    else:
        prompts = [[rng.choice(words) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    P = len(prompts[0])

    L = P + args.block_size
    x = torch.tensor([prompts[0] + [family.mask_token_id] * args.block_size])  # (1, L)
    ids = block_ids(torch.ones(1, L, dtype=torch.bool), torch.tensor([P]), args.block_size)
    mask = to_additive(block_causal_mask(ids))  # (1, 1, L, L)
    pos = torch.arange(L)[None]

    def one_call(model):
        return model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False).logits

    def decode(model):
        return [generate(model, [q], cfg) for q in prompts]

    with torch.no_grad():
        want = one_call(variants["unmerged"])
        for name, model in variants.items():
            diff = (one_call(model) - want).abs().max().item()
            print(f"{name:9s} max |logit - unmerged's| {diff:.2e}")
    outs = {name: decode(m) for name, m in variants.items()}
    tokens = {name: [o.tokens for o in out] for name, out in outs.items()}
    forwards = {name: sum(o.stats.forwards for o in out) for name, out in outs.items()}
    same = {name: t == tokens["unmerged"] for name, t in tokens.items() if name != "base"}
    if not all(same.values()):
        raise SystemExit(f"the adapted variants decode different tokens: {same}")

    # Alternate at the finest grain: one call (one prompt's decode) of each variant in a fresh
    # random order, so that load from other processes hits every variant alike; keep each one's
    # minimum per call (per prompt) over the rounds.
    call_ms = {name: float("inf") for name in variants}
    with torch.no_grad():
        for _ in range(args.repeats * args.calls):
            for name in rng.sample(list(variants), len(variants)):
                t0 = time.perf_counter()
                one_call(variants[name])
                call_ms[name] = min(call_ms[name], (time.perf_counter() - t0) * 1e3)
    prompt_ms = {name: [float("inf")] * len(prompts) for name in variants}
    for _ in range(args.repeats):
        for i, q in enumerate(prompts):
            for name in rng.sample(list(variants), len(variants)):
                t0 = time.perf_counter()
                generate(variants[name], [q], cfg)
                ms = (time.perf_counter() - t0) * 1e3
                prompt_ms[name][i] = min(prompt_ms[name][i], ms)
    best = {name: [call_ms[name], sum(prompt_ms[name]) / len(prompts)] for name in variants}

    ref = best["merged"]
    print(
        f"\n{args.model} + {args.adapter or f'random r {args.rank} adapter'}; {L}-column call; "
        f"{args.prompts} prompts x {args.max_new_tokens} tokens (d2f, batch 1); "
        f"fastest of {args.repeats * args.calls} calls, {args.repeats} decodes per prompt, alternated; "
        f"{args.threads} thread(s). decode: ms per prompt and per forward "
        "(base decodes other tokens: compare it per forward)"
    )
    head = ("variant", "call ms", "x merged", "forwards", "decode ms", "ms/forward", "x merged")
    print("{:9s} {:>8s} {:>9s} {:>9s} {:>10s} {:>11s} {:>9s}".format(*head))
    per_fw = {name: best[name][1] * args.prompts / forwards[name] for name in best}
    for name, (call_ms, decode_ms) in best.items():
        print(
            f"{name:9s} {call_ms:8.3f} {call_ms / ref[0]:9.2f} {forwards[name]:9d} "
            f"{decode_ms:10.2f} {per_fw[name]:11.3f} {per_fw[name] / per_fw['merged']:9.2f}"
        )
    un, lean, me = best["unmerged"][0], best["lean"][0], ref[0]
    print(
        f"per call: LoRA matmuls (lean - merged) {lean - me:.3f} ms, "
        f"peft overhead (unmerged - lean) {un - lean:.3f} ms"
    )


if __name__ == "__main__":
    main()
