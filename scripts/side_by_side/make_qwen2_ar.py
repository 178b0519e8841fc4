"""The miniature world's AR model (`d2f/tinyworld/assets/ar`, Llama) as a Qwen2 checkpoint for
Jacobi Forcing's decoder, which is a method of transformers' `Qwen2ForCausalLM` (d2f's venv).

Qwen2 is Llama with q/k/v biases: the Llama tensors are copied under the same names, the three
biases per layer set to zero, and the logits checked equal to the Llama's on the held-out
prompts; written with `save_pretrained` to SCRATCH/ckpt/ar_qwen2 (d2f loads it as family `ar`).

    SBS_SCRATCH=DIR python scripts/side_by_side/make_qwen2_ar.py
"""

from pathlib import Path

import torch
from common import CKPT_ROOT
from transformers import Qwen2Config, Qwen2ForCausalLM

from d2f.decoding import DecodeConfig, encode_prompts
from d2f.family import family_of
from d2f.models import load_model
from d2f.tinyworld.task import problems

AR = Path(__file__).resolve().parents[2] / "d2f/tinyworld/assets/ar"
KEEP = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
        "rms_norm_eps", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    llama, tok = load_model(AR)
    c = llama.config
    assert (
        c.rope_parameters["rope_theta"] == 10000.0
        and c.head_dim * c.num_attention_heads == c.hidden_size
    )
    qwen = Qwen2ForCausalLM(Qwen2Config(**{k: getattr(c, k) for k in KEEP}, rope_theta=10000.0))
    state = llama.state_dict()
    for name, p in qwen.state_dict().items():
        p.copy_(state[name] if name in state else torch.zeros_like(p))
        assert name in state or name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")), name
    qwen.eval()
    family = family_of(llama)
    cfg = DecodeConfig(strategy="ar", block_size=1, max_new_tokens=24)
    ids = encode_prompts([p.question for p in problems("add2", "test", 20)], tok, family, cfg)
    with torch.no_grad():
        diff = max((qwen(torch.tensor([p])).logits - llama(torch.tensor([p])).logits).abs().max().item()
                   for p in ids)  # fmt: skip
    print(f"Qwen2 copy vs the Llama AR, 20 prompts: max |dlogit| {diff:.3g}")
    assert diff < 1e-4
    out = CKPT_ROOT / "ar_qwen2"
    qwen.save_pretrained(out)
    tok.save_pretrained(out)
    again, _ = load_model(out)  # d2f loads it as family `ar`, with the Llama's logits
    with torch.no_grad():
        diff = max((again(torch.tensor([p])).logits - llama(torch.tensor([p])).logits).abs().max().item()
                   for p in ids)  # fmt: skip
    print(
        f"{out} ({family_of(again).name}, {type(again).__name__}) vs the Llama: max |dlogit| {diff:.3g}"
    )


if __name__ == "__main__":
    main()
