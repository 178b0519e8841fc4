"""dInfer's released decoders (inclusionAI/dInfer fce4e32, `python/dinfer/decoding/`) on the
checkpoint of `ours_dinfer.py` (`DINFER_CKPT`; by default the miniature world's teacher) loaded into their dense `LLaDAModelLM` (`python/dinfer/model/
modeling_llada.py`), batch 1, fp32 CPU (peer venv `venv-peers`; reads `ours_dinfer_{CKPT}.json`).

    SBS_SCRATCH=DIR venv-peers/bin/python theirs_dinfer.py     # -> DIR/results/theirs_dinfer_{CKPT}.json

Their files are imported unchanged from SCRATCH/dinfer; what the runner supplies instead of
their stack (each is printed in the log):
* `vllm`: a stub module `vllm.distributed` with `get_tensor_model_parallel_rank() -> 0` and
  `get_tensor_model_parallel_world_size() -> 1` (their modeling file imports those two names; with
  one rank their tensor-parallel layers are never built: `tensor_parallel()` is not called);
* the packages `dinfer` and `dinfer.model` as empty namespace packages over their directories,
  so their `__init__` files (serving, MoE models, sglang) are not run; `dinfer.decoding` is theirs;
* their `LLaDAModelLM.__init__` hard-codes `init_device = "cuda"`; the runner builds their
  `LLaDAModel` from `create_model_config_from_pretrained_config(config)` with `init_device =
  "cpu"` and passes it in (`LLaDAModelLM(config, model=...)`, their own constructor argument),
  then loads the checkpoint's tensors with `load_state_dict(strict=True)`;
* `H2Embed` (smoothing) is defined only in `model/modeling_fused_olmoe.py`, which needs the fused
  MoE stack: its class source is taken from that file with `ast` and executed unchanged, and
  `model.h2e = H2Embed(model.model.transformer.wte, tau=1.0)` as their MoE class's
  `init_h2e_module` does;
* `TORCHDYNAMO_DISABLE=1` (set by this script before torch is imported): their `@torch.compile`
  functions (`get_transfer_index_threshold`, the attention) run eagerly, like d2f.
Forwards are counted by a forward pre-hook on their model (and checked against their own
`num_forwards`); the token array is read from the `x` their decoder is given.
"""

import ast
import os
import sys
import types

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from common import SCRATCH, load, result_path, save  # noqa: E402
from dinfer_settings import CKPT, LOW_THRESHOLD, SETTINGS, THRESHOLD  # noqa: E402

DINFER = SCRATCH / "dinfer" / "python" / "dinfer"


def stub_imports() -> None:
    vllm, dist = types.ModuleType("vllm"), types.ModuleType("vllm.distributed")
    dist.get_tensor_model_parallel_rank = lambda: 0
    dist.get_tensor_model_parallel_world_size = lambda: 1
    vllm.distributed = dist
    sys.modules |= {"vllm": vllm, "vllm.distributed": dist}
    for name, path in (("dinfer", DINFER), ("dinfer.model", DINFER / "model")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    print("stubs: vllm.distributed (rank 0, world 1); namespace packages dinfer, dinfer.model")


def h2embed_class():
    """Their `H2Embed`, from modeling_fused_olmoe.py, unchanged (class source via ast)."""
    src = (DINFER / "model" / "modeling_fused_olmoe.py").read_text()
    node = next(
        n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "H2Embed"
    )
    from typing import Optional

    ns = {"torch": torch, "nn": torch.nn, "Optional": Optional}
    ns |= {k: getattr(sys.modules["vllm.distributed"], k) for k in dir(sys.modules["vllm.distributed"])
           if k.startswith("get_")}  # fmt: skip
    exec(compile(ast.get_source_segment(src, node), "modeling_fused_olmoe.py:H2Embed", "exec"), ns)
    return ns["H2Embed"]


def load_their_model(path: str):
    from dinfer.model.configuration_llada import LLaDAConfig
    from dinfer.model.modeling_llada import (
        LLaDAModel,
        LLaDAModelLM,
        create_model_config_from_pretrained_config,
    )
    from safetensors.torch import load_file

    config = LLaDAConfig.from_pretrained(path)
    mc = create_model_config_from_pretrained_config(config)
    mc.init_device = "cpu"
    model = LLaDAModelLM(config, model=LLaDAModel(mc, init_params=False))
    state = load_file(f"{path}/model.safetensors")
    print("load_state_dict:", model.load_state_dict(state, strict=True))
    model.float().eval()
    model.h2e = h2embed_class()(model.model.transformer.wte, tau=1.0)
    return model


def build(model, opts: dict, mask_id: int, eos_id: int):
    """The released objects for d2f's option dict `opts` (see dinfer_settings.py)."""
    from dinfer.decoding import (
        BlockIteratorFactory,
        BlockWiseDiffusionLLM,
        CreditThresholdParallelDecoder,
        HierarchyDecoder,
        IterSmoothDiffusionLLM,
        IterSmoothWithVicinityCacheDiffusionLLM,
        KVCacheFactory,
        ThresholdParallelDecoder,
        VicinityCacheDiffusionLLM,
    )

    dec = opts.get("decoder", "threshold")
    if dec == "threshold":
        decoder = ThresholdParallelDecoder(0, THRESHOLD, mask_id=mask_id, eos_id=eos_id)
    elif dec == "credit":
        decoder = CreditThresholdParallelDecoder(
            temperature=0, threshold=THRESHOLD, mask_id=mask_id, eos_id=eos_id
        )
    else:
        decoder = HierarchyDecoder(
            0, mask_id=mask_id, eos_id=eos_id, threshold=THRESHOLD, low_threshold=LOW_THRESHOLD
        )
    # d2f's block layout: blocks start at the prompt's end (theirs can also align them)
    it = BlockIteratorFactory(start_block_align=False)
    cache = opts.get("cache", "dual")
    look = {k: opts[k] for k in ("prefix_look", "after_look", "warmup_steps") if k in opts}
    factory = KVCacheFactory("dual" if cache == "vicinity" else cache) if cache != "none" else None
    if opts.get("smoothing"):
        if cache == "vicinity":
            return decoder, IterSmoothWithVicinityCacheDiffusionLLM(
                model, decoder, it, factory, early_stop=True, **look
            )
        return decoder, IterSmoothDiffusionLLM(model, decoder, it, early_stop=True,
                                               cache_factory=factory)  # fmt: skip
    if cache == "vicinity":
        return decoder, VicinityCacheDiffusionLLM(
            model, decoder, it, factory, early_stop=True, **look
        )
    return decoder, BlockWiseDiffusionLLM(
        model, decoder, it, early_stop=True, cache_factory=factory
    )


def main() -> None:
    torch.set_num_threads(1)
    stub_imports()
    ours = load(f"ours_dinfer_{CKPT}")
    model = load_their_model(ours["ckpt"])
    probe = torch.load(result_path(f"dinfer_logits_{CKPT}", "pt"))
    with torch.no_grad():
        diff = max((model(torch.tensor([p])).logits[0] - lo).abs().max().item()
                   for p, lo in zip(probe["ids"], probe["logits"], strict=True))  # fmt: skip
    print(
        f"their LLaDAModelLM vs d2f's model, {len(probe['ids'])} sequences: max |dlogit| {diff:.3g}"
    )
    calls = [0]
    model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    mask_id, P = ours["mask_id"], ours["ids"]
    out = {"logit_diff": diff, "runs": {}}
    # their early stop and output know one end id: each of d2f's on the teacher (which ends its
    # answers with <|eot_id|> and then <|endoftext|>), the config's eos on a random model
    for eos_id in ours["end_ids"] if CKPT == "teacher" else ours["end_ids"][:1]:
        for name, opts in SETTINGS:
            rows = []
            for p in P:
                decoder, llm = build(model, opts, mask_id, eos_id)
                box, idle = [], [0]  # the token array; forwards whose block had no mask left

                def decode(logits, s, e, x, *a, _d=decoder.decode, _box=box, _idle=idle):
                    _box.append(x)
                    _idle[0] += not bool((x.data[:, s:e] == mask_id).any())
                    return _d(logits, s, e, x, *a)

                decoder.decode = decode
                calls[0] = 0
                llm.generate(torch.tensor([p]), gen_length=ours["gen"], block_length=ours["block"])
                assert calls[0] == llm.num_forwards, (calls[0], llm.num_forwards)
                rows.append(
                    {
                        "answer": box[-1].data[0, len(p) :].tolist(),
                        "forwards": calls[0],
                        "idle": idle[0],
                    }
                )
            out["runs"][f"{name} | eos {eos_id}"] = rows
            print(f"dInfer {name} eos {eos_id}: {sum(r['forwards'] for r in rows)} forwards")
    save(f"theirs_dinfer_{CKPT}", out)


if __name__ == "__main__":
    main()
