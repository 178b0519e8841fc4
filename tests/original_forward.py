"""Plain-torch forwards of the ORIGINAL architectures, over original-format state dicts.

Written from the semantics of the original modeling code, independently of d2f (no d2f import, no
transformers model): a format test that maps keys with d2f's own mapping and writes them with d2f's
own saver cannot catch a mapping that is wrong in both directions (e.g. LLaDA's `ff_proj` and
`up_proj` swapped); these forwards can.

* LLaDA (`modeling_llada.py`, OLMo-style `LLaDALlamaBlock`): `model.transformer.wte`, per block
  `attn_norm` -> `q_proj` / `k_proj` / `v_proj` (no bias, `n_kv_heads` shared by repeat-interleave)
  -> RoPE (halves rotated) -> attention with no causal mask -> `attn_out`; `ff_norm` ->
  `ff_out(silu(ff_proj(x)) * up_proj(x))`; `ln_f`; the `ff_out` head (or `wte` when tied).
* Dream (`modeling_dream.py`, Qwen2 layout): the same block with Qwen2 names, q/k/v WITH bias,
  o_proj without, RMSNorm eps / RoPE theta from its config; logits are shifted at use (Dream's
  generation code: the prediction for token i is the logits row i - 1).

`mask`: bool (B, L, L), True where query i may attend key j (None: every key).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor


def read_original(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """The raw `config.json` and the original-format weights of a checkpoint directory."""
    config = json.loads((path / "config.json").read_text())
    return config, load_file(str(path / "model.safetensors"))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in fp32: x / sqrt(mean(x^2) + eps) * weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: Tensor, theta: float) -> Tensor:
    """Rotary embedding at positions 0..L-1, halves rotated. x: (B, H, L, D) -> (B, H, L, D)."""
    d, n = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (D/2,)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None]  # (L, D/2)
    angles = torch.cat([angles, angles], -1)  # (L, D)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def attention(q: Tensor, k: Tensor, v: Tensor, n_heads: int, n_kv: int, theta: float, mask):
    """Multi-head attention, no causal mask. q: (B, L, H*D), k/v: (B, L, Hkv*D) -> (B, L, H*D)."""
    b, n, _ = q.shape
    d = q.shape[-1] // n_heads
    q = rope(q.view(b, n, n_heads, d).transpose(1, 2), theta)  # (B, H, L, D)
    k = rope(k.view(b, n, n_kv, d).transpose(1, 2), theta)  # (B, Hkv, L, D)
    v = v.view(b, n, n_kv, d).transpose(1, 2)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (B, H, L, D): each kv head serves a group
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / d**0.5  # (B, H, L, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = scores.softmax(-1) @ v  # (B, H, L, D)
    return out.transpose(1, 2).reshape(b, n, n_heads * d)


def llada_logits(config: dict, w: dict[str, Tensor], ids: Tensor, mask=None) -> Tensor:
    """LLaDA's logits (B, L, V) for `ids` (B, L), from its original weights `w`."""
    eps, theta = config.get("rms_norm_eps", 1e-5), config.get("rope_theta", 10000.0)
    n_heads = config["n_heads"]
    n_kv = config.get("n_kv_heads") or n_heads
    x = w["model.transformer.wte.weight"][ids]  # (B, L, d)
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q, k, v = (F.linear(h, w[p + f"{n}_proj.weight"]) for n in "qkv")
        x = x + F.linear(attention(q, k, v, n_heads, n_kv, theta, mask), w[p + "attn_out.weight"])
        h = rms_norm(x, w[p + "ff_norm.weight"], eps)
        gated = F.silu(F.linear(h, w[p + "ff_proj.weight"])) * F.linear(h, w[p + "up_proj.weight"])
        x = x + F.linear(gated, w[p + "ff_out.weight"])
    x = rms_norm(x, w["model.transformer.ln_f.weight"], eps)
    head = (
        "model.transformer.wte.weight"
        if config.get("weight_tying")
        else "model.transformer.ff_out.weight"
    )
    return F.linear(x, w[head])  # (B, L, V)


def dream_logits(config: dict, w: dict[str, Tensor], ids: Tensor, mask=None) -> Tensor:
    """Dream's raw (unshifted) logits (B, L, V) for `ids` (B, L), from its original weights `w`."""
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    x = w["model.embed_tokens.weight"][ids]  # (B, L, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (
            F.linear(h, w[p + f"self_attn.{n}_proj.weight"], w[p + f"self_attn.{n}_proj.bias"])
            for n in "qkv"
        )
        att = attention(q, k, v, n_heads, n_kv, theta, mask)
        x = x + F.linear(att, w[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gated = F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(
            h, w[p + "mlp.up_proj.weight"]
        )
        x = x + F.linear(gated, w[p + "mlp.down_proj.weight"])
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    return F.linear(x, w[head])  # (B, L, V)


def dream_predictions(logits: Tensor) -> Tensor:
    """Dream's shift at use (B, L, V) -> (B, L, V): column i is predicted by row i - 1; column 0,
    which nothing predicts, repeats row 0 (as Dream's generation code does)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], 1)


ORIGINAL_LOGITS = {"llada": llada_logits, "dream": dream_logits}


def merge_lora(w: dict[str, Tensor], adapter: Path, targeted) -> dict[str, Tensor]:
    """Original weights with a PEFT LoRA adapter folded in: W + (alpha / r) * B @ A for every
    module `targeted(name)` wraps that the adapter file holds A and B for (what peft on the
    original model computes: a wrapped module without weights keeps B = 0, weights of a module
    that is not wrapped are dropped)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not cfg.get("use_rslora") and not cfg.get("use_dora")
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    merged = dict(w)
    for key in w:
        module = key.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        b = lora.get(f"base_model.model.{module}.lora_B.weight")
        if key.endswith(".weight") and a is not None and b is not None and targeted(module):
            merged[key] = w[key] + scale * b @ a
    return merged
