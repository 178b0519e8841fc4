"""The block-causal rule: literal matrices, ragged batches, window slices, and its three forms."""

import pytest
import torch
import torch.nn.functional as F

from d2f.mask import (
    block_causal_mask,
    block_ids,
    causal_mask,
    flex_block_mask,
    full_mask,
    position_ids,
    to_additive,
)


def rows(*bits: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in bits])


# prompt 3, block 2, length 9: blocks 0 0 0 | 1 1 | 2 2 | 3 3
EXPECTED_SIMPLE = rows(
    "111000000",
    "111000000",
    "111000000",
    "111110000",
    "111110000",
    "111111100",
    "111111100",
    "111111111",
    "111111111",
)
# two left pads, prompt 2, block 2: -1 -1 0 0 1 1 2 2 3
EXPECTED_LEFT_PADDED = rows(
    "100000000",
    "010000000",
    "001100000",
    "001100000",
    "001111000",
    "001111000",
    "001111110",
    "001111110",
    "001111111",
)


def ragged():
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :2] = False
    return valid, torch.tensor([3, 4])


def test_block_ids_literal():
    valid, prompt_end = ragged()
    ids = block_ids(valid, prompt_end, 2)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3], [-1, -1, 0, 0, 1, 1, 2, 2, 3]]


def test_literal_mask_prompt3_block2_len9():
    valid = torch.ones(1, 9, dtype=torch.bool)
    ids = block_ids(valid, torch.tensor([3]), 2)
    assert torch.equal(block_causal_mask(ids)[0], EXPECTED_SIMPLE)


def test_ragged_batch_literal_and_padding_never_attended():
    valid, prompt_end = ragged()
    mask = block_causal_mask(block_ids(valid, prompt_end, 2))
    assert torch.equal(mask[0], EXPECTED_SIMPLE)
    assert torch.equal(mask[1], EXPECTED_LEFT_PADDED)
    # right padding too (training rows padded at the end)
    valid_r = torch.ones(1, 9, dtype=torch.bool)
    valid_r[0, 7:] = False
    m = block_causal_mask(block_ids(valid_r, torch.tensor([3]), 2))[0]
    real = valid_r[0]
    assert not m[real][:, ~real].any(), "a real query attends a padding key"
    assert torch.equal(m[~real][:, ~real], torch.eye(2, dtype=torch.bool))


@pytest.mark.parametrize("q_start,q_end", [(3, 9), (5, 9), (3, 7), (0, 4)])
def test_window_slice_equals_full_rows(q_start, q_end):
    valid, prompt_end = ragged()
    ids = block_ids(valid, prompt_end, 2)
    full = block_causal_mask(ids)
    window = block_causal_mask(ids[:, :q_end], q_start, q_end)
    assert torch.equal(window, full[:, q_start:q_end, :q_end])
    assert torch.equal(
        full_mask(ids[:, :q_end], q_start, q_end), full_mask(ids)[:, q_start:q_end, :q_end]
    )


def test_full_and_causal_forms():
    valid, prompt_end = ragged()
    ids = block_ids(valid, prompt_end, 2)
    bidir = full_mask(ids)
    assert bidir[0].all()
    assert torch.equal(bidir[1, 2:, 2:], torch.ones(7, 7, dtype=torch.bool))
    assert not bidir[1, 2:, :2].any()
    causal = causal_mask(valid)
    assert torch.equal(causal[0], torch.ones(9, 9).tril().bool())
    assert not causal[1, 2:, :2].any()


def test_block_size_validated():
    with pytest.raises(ValueError, match="block_size"):
        block_ids(torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]), 0)


def test_position_ids_skip_padding():
    valid, _ = ragged()
    assert position_ids(valid).tolist() == [list(range(9)), [0, 0, 0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_additive_values_dtype_and_shape(dtype):
    mask = rows("10", "11")[None]  # (1, 2, 2)
    out = to_additive(mask, dtype)
    assert out.dtype == dtype and out.shape == (1, 1, 2, 2)
    low = torch.finfo(dtype).min
    want = torch.tensor([[[[0.0, low], [0.0, 0.0]]]], dtype=dtype)
    assert torch.equal(out, want)


def test_bool_float_and_block_mask_agree():
    """Attention under the bool mask (sdpa), the additive mask (explicit softmax) and the flex
    BlockMask gives the same output, padding rows included."""
    torch.manual_seed(0)
    valid, prompt_end = ragged()
    ids = block_ids(valid, prompt_end, 2)
    B, H, L, D = 2, 2, 9, 8
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    for q_start in (0, 4):
        mask = block_causal_mask(ids, q_start)
        qs = q[:, :, q_start:]
        out_bool = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask[:, None])
        scores = qs @ k.transpose(-1, -2) / D**0.5 + to_additive(mask)
        out_float = scores.softmax(-1) @ v
        torch.testing.assert_close(out_float, out_bool, atol=1e-5, rtol=1e-5)
        from torch.nn.attention.flex_attention import flex_attention

        out_flex = flex_attention(qs, k, v, block_mask=flex_block_mask(ids, q_start))
        torch.testing.assert_close(out_flex, out_bool, atol=1e-5, rtol=1e-5)
        # and the mask really matters: the bidirectional mask gives something else
        out_full = F.scaled_dot_product_attention(
            qs, k, v, attn_mask=full_mask(ids, q_start)[:, None]
        )
        assert not torch.allclose(out_full, out_bool, atol=1e-3)
    bidir = F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask(ids)[:, None])
    out_flex = flex_attention(q, k, v, block_mask=flex_block_mask(ids, causal=False))
    torch.testing.assert_close(out_flex, bidir, atol=1e-5, rtol=1e-5)
