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
    flex, _ = load_model(tiny_dir("llada"), device="cuda")  # load_model refuses flex
    flex.set_attn_implementation("flex_attention")
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


def _confident(path, dtype):
    model, _ = load_model(path, device="cuda", dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # a random model made confident: parallel commits happen
    return model


PROMPTS = [[10 + i, 11 + 2 * i, 12, 13 + i, 14][: 3 + i % 3] for i in range(8)]  # ragged, 3-5
CFG = DecodeConfig(block_size=4, max_new_tokens=16, tau_add=0.25, tau_act=0.75, tau_conf=0.6)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fp32_pipeline_equals_reference_on_cuda(tiny_dir, family):
    """The exact KV cache on CUDA: the cached, batched pipeline gives the full-recompute
    reference's tokens and step counts exactly, as on the CPU."""
    model = _confident(tiny_dir(family), "float32")
    fast = generate(model, PROMPTS, CFG)
    ref = generate(model, PROMPTS, CFG, strategy="reference")
    assert fast.tokens == ref.tokens
    assert [r.forwards for r in fast.stats.rows] == [r.forwards for r in ref.stats.rows]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_pipeline_matches_reference_on_cuda(tiny_dir, family):
    model = _confident(tiny_dir(family), "bfloat16")
    fast = generate(model, PROMPTS, CFG)
    ref = generate(model, PROMPTS, CFG, strategy="reference")
    # bf16 matmuls of different shapes (cached window vs full recompute) may flip a near-tie,
    # and one flip changes the rest of the row: the first block (before any flip can compound)
    # must agree in every row, and most positions overall. On the CPU in bf16 (2026-12-01):
    # every first block, 91-93% of the positions.
    assert [f[:4] for f in fast.tokens] == [r[:4] for r in ref.tokens]
    rows = list(zip(fast.tokens, ref.tokens, strict=True))
    same = sum(a == b for f, r in rows for a, b in zip(f, r, strict=False))
    total = sum(max(len(f), len(r)) for f, r in rows)  # a row that stops early disagrees after
    assert total >= 8 * 8 and same >= 0.8 * total, (same, total)


@pytest.mark.parametrize("compile_mode", ["off", "default", "reduce-overhead"])
def test_static_cache_and_compiled_step_equal_the_reference_on_cuda(tiny_dir, compile_mode):
    """The static cache and the compiled step (inductor; CUDA graphs with reduce-overhead) give
    the reference's tokens and step counts on CUDA, fp32, a ragged batch."""
    model = _confident(tiny_dir("llada"), "float32")
    fast = generate(model, PROMPTS, CFG, kv_cache="static", compile=compile_mode)
    ref = generate(model, PROMPTS, CFG, strategy="reference")
    assert fast.tokens == ref.tokens
    assert [r.forwards for r in fast.stats.rows] == [r.forwards for r in ref.stats.rows]
