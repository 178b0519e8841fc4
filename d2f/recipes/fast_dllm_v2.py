"""Fast-dLLM v2's AR -> block-diffusion adaptation (Wu et al., arXiv 2509.26328): objective `fast_dllm_v2`.

An autoregressive checkpoint (Llama / Qwen2) is fully fine-tuned into a block-diffusion model that
keeps its causal prior across blocks and reads its logits with the token shift. Followed: the
training forward of the hub `modeling.py` (`Fast_dLLM_QwenForCausalLM.forward`, training branch;
read from two copies, the fork `wangziyannb/Fast-dLLM` `v2/modeling_ori.py` and an indexed one) and
the trainer of NVlabs/Fast-dLLM `v2/train_scripts/` at upstream commit 5332e2fc. Per row of clean
tokens x_0 with answer (label) positions A and blocks b(i) (d2f.mask.block_ids):

    t_k ~ U[0, 1) per block,  p_k = (1 - 1e-3) t_k + 1e-3      (schedule "random", lo 1e-3, hi 1)
    M   = {i in A : u_i < p_b(i)},   M^c = A \\ M               (two complementary views)
    x_t^v = x_0 with MASK on the view's set (v = M, M^c)
    input  [x_t^v || x_0] (2L), positions [0..L-1 || 0..L-1], attention d2f.mask.bd3_mask
    z^v = lm_head(hidden of the x_t half)                     (the x_0 half is never scored)
    loss = ( sum_v sum_{j in v, j >= 1} CE(z^v[j - 1], x_0[j]) ) / |{j in A, j >= 1}|

No 1/t weight, no separate AR term; each answer token is scored in exactly one view, so the loss is
the mean cross-entropy per answer token of the micro-batch. Where d2f departs (blocks start at the
prompt end, padded question/answer rows instead of packed 512-token chunks): docs/training.md.

`adapt_checkpoint` turns the AR checkpoint's config.json and tokenizer into the `fast_dllm_v2`
family's (a mask token added when the tokenizer has none, `bd_size` and `mask_token_id` written);
`d2f.models.adopt_config` then gives the loaded AR weights that family (embeddings grown if needed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from d2f.config import NoiseConfig
from d2f.family import SPECS, Family
from d2f.mask import bd3_mask, to_additive

# the mask token the released recipe adds to Qwen2.5's vocabulary (id 151665 there)
QWEN_MASK_TOKEN = "|<MASK>|"
P_MIN = 1e-3  # p = (1 - P_MIN) t + P_MIN, the released per-block mask probability


def adapt_checkpoint(raw: dict[str, Any], tokenizer, noise: NoiseConfig) -> tuple[dict, Any]:
    """(config.json dict, tokenizer) of an AR or fast_dllm_v2 checkpoint -> the fast_dllm_v2 pair.

    An AR config (model_type llama / qwen2) gets `bd_size` = noise.block_size and the mask id: the
    tokenizer's own mask token if it has one (the miniature world's), else `|<MASK>|` added as a
    special token (Qwen2.5: id 151665, inside its padded embedding rows); `vocab_size` grows when
    the new id does not fit. A fast_dllm_v2 checkpoint is returned as it is, its `bd_size` checked.
    """
    spec = SPECS["fast_dllm_v2"]
    if spec.matches(raw):
        if raw["bd_size"] != noise.block_size:
            raise ValueError(
                f"the checkpoint was adapted with bd_size={raw['bd_size']} but "
                f"train.noise.block_size={noise.block_size}: set them equal"
            )
        return raw, tokenizer
    if not SPECS["ar"].matches(raw):
        raise ValueError(
            f"train.objective=fast_dllm_v2 adapts an autoregressive checkpoint (model_type llama "
            f"or qwen2) or continues a fast_dllm_v2 one; got model_type {raw.get('model_type')!r}"
        )
    if tokenizer is None:
        raise ValueError("train.objective=fast_dllm_v2 needs the checkpoint's tokenizer files")
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": QWEN_MASK_TOKEN})
    mask_id = int(tokenizer.mask_token_id)
    out = dict(raw)
    out["bd_size"] = noise.block_size
    out["mask_token_id"] = mask_id
    out["vocab_size"] = max(int(raw["vocab_size"]), mask_id + 1)
    return out, tokenizer


def doubled_input(batch, mask_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two complementary views of `batch` (d2f.objectives.Batch, (B, L)) as one 2B batch.

    Returns ids (2B, 2L) `[x_t || x_0]`, positions (2B, 2L) `[pos || pos]`, the bool attention
    mask (2B, 2L, 2L) (`bd3_mask`), and each view's scored set (2B, L) bool: rows 0..B-1 view 1
    (`batch.masked`), rows B..2B-1 view 2 (the answer positions not in view 1).
    """
    answer = batch.blocks >= 1  # (B, L) the label positions (answer, end token, attended padding)
    views = torch.cat([batch.masked, answer & ~batch.masked])  # (2B, L)
    x0 = batch.input_ids.repeat(2, 1)  # (2B, L)
    xt = torch.where(views, mask_id, x0)  # (2B, L)
    ids = torch.cat([xt, x0], 1)  # (2B, 2L)
    positions = batch.positions.repeat(2, 2)  # (2B, 2L): both halves share positions 0..L-1
    attn = bd3_mask(batch.blocks.repeat(2, 1))  # (2B, 2L, 2L)
    return ids, positions, attn, views


def fdv2_loss(logits: Tensor, x0: Tensor, views: Tensor, n_answer: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted cross-entropy of the x_t half, summed, over the micro-batch's answer count.

    logits (2B, L, V): the x_t half of both views. x0 (B, L) long. views (2B, L) bool, the scored
    set of each row. n_answer: () the number of answer positions j >= 1 of the B rows. Row j - 1
    scores token j (token shift). Returns (loss, (2,) the two views' parts; they sum to loss).
    """
    B = x0.shape[0]
    target = x0.repeat(2, 1)[:, 1:]  # (2B, L - 1)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")
    ce = ce * views[:, 1:]  # (2B, L - 1); a view with nothing masked contributes 0
    parts = torch.stack([ce[:B].sum(), ce[B:].sum()]) / n_answer.clamp(min=1)
    return parts.sum(), parts


def fast_dllm_v2_step(
    model, batch, family: Family, dtype: torch.dtype
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch: both views in one forward of (2B, 2L), only the x_t half projected."""
    if family.mask_token_id is None:
        raise ValueError(f"family {family.name!r} has no mask token: adapt it first")
    ids, positions, attn, views = doubled_input(batch, family.mask_token_id)
    L = batch.input_ids.shape[1]
    out = model(
        input_ids=ids,
        attention_mask=to_additive(attn, dtype),  # (2B, 1, 2L, 2L)
        position_ids=positions,
        use_cache=False,
        logits_to_keep=torch.arange(L, device=ids.device),  # the x_t half only
    )
    n_answer = (batch.blocks[:, 1:] >= 1).sum()
    loss, parts = fdv2_loss(out.logits, batch.input_ids, views, n_answer)
    return loss, {"view_masked": parts[0].detach(), "view_complement": parts[1].detach()}
