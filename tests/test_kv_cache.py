"""KV-cache exactness: a block computed over a cached prefix gives the logits of one full forward.

This is what makes D2F's cache exact (paper Sec. 3.2): under the block-causal rule a finished block's
keys and values never change, so caching them loses nothing. Checked for both families, on a ragged
(left-padded) batch, with two blocks in flight at once and explicit position ids.
"""

import pytest
import torch
from transformers import DynamicCache

from d2f.mask import block_causal_mask, block_ids, position_ids, to_additive

BS = 4


def _batch(vocab, mask_id):
    torch.manual_seed(0)
    P, n_blocks = 7, 3
    L = P + n_blocks * BS
    ids = torch.randint(10, vocab - 10, (2, L))
    ids[:, P + 5 :] = mask_id  # undecoded positions in the later blocks, as while decoding
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, :3] = False  # row 1: 3 left pads, a 4-token prompt
    return ids, valid, torch.tensor([P, P]), P


def _forward(model, ids, blocks, pos, q_start, q_end, cache):
    mask = to_additive(block_causal_mask(blocks[:, :q_end], q_start, q_end))  # (B, 1, Q, K)
    with torch.no_grad():
        out = model(
            input_ids=ids[:, q_start:q_end],
            attention_mask=mask,
            position_ids=pos[:, q_start:q_end],
            cache=cache,
            use_cache=True,
        )
    return out.logits  # (B, Q, V)


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache argument is `cache=` now
def test_cached_windows_equal_full_forward(tiny_dir, family_name):
    from d2f.family import family_of
    from d2f.models import load_model

    model, _ = load_model(tiny_dir(family_name))
    fam = family_of(model)
    ids, valid, prompt_end, P = _batch(model.config.vocab_size, fam.mask_token_id)
    blocks = block_ids(valid, prompt_end, BS)
    pos = position_ids(valid)
    full = _forward(model, ids, blocks, pos, 0, ids.shape[1], None)

    cache = DynamicCache(config=model.config)
    prefill = _forward(model, ids, blocks, pos, 0, P, cache)  # prompt into the cache
    real = valid[:, :P]
    torch.testing.assert_close(prefill[real], full[:, :P][real], atol=1e-5, rtol=1e-5)

    # two blocks in flight at once over the cached prompt
    win = _forward(model, ids, blocks, pos, P, P + 2 * BS, cache)
    torch.testing.assert_close(win, full[:, P : P + 2 * BS], atol=1e-5, rtol=1e-5)

    # block 1 finished: keep its KV, drop block 2's, then run blocks 2 and 3 over the cache
    cache.crop(-BS)
    assert cache.get_seq_length() == P + BS
    win2 = _forward(model, ids, blocks, pos, P + BS, P + 3 * BS, cache)
    torch.testing.assert_close(win2, full[:, P + BS :], atol=1e-5, rtol=1e-5)


def test_cache_is_not_trivially_equal(tiny_dir):
    """The check above can fail: a window run without its prefix in the cache gives other logits."""
    from d2f.family import family_of
    from d2f.models import load_model

    model, _ = load_model(tiny_dir("llada"))
    ids, valid, prompt_end, P = _batch(model.config.vocab_size, family_of(model).mask_token_id)
    blocks = block_ids(valid, prompt_end, BS)
    pos = position_ids(valid)
    full = _forward(model, ids, blocks, pos, 0, ids.shape[1], None)
    cache = DynamicCache(config=model.config)
    _forward(model, ids, blocks, pos, 0, P, cache)
    wrong_pos = pos + 1  # positions off by one: RoPE makes the logits differ
    win = _forward(model, ids, blocks, wrong_pos, P, P + BS, cache)
    assert (win - full[:, P : P + BS]).abs().max() > 1e-4


def test_flex_block_mask_inside_the_model_matches_the_float_mask(tiny_dir, family_name):
    """The flex-attention BlockMask form of the rule gives the model's logits of the additive form
    (flex runs unfused on CPU; tests/test_gpu.py repeats this on CUDA)."""
    from d2f.mask import flex_block_mask
    from d2f.models import load_model

    sdpa, _ = load_model(tiny_dir(family_name), attn_implementation="sdpa")
    flex, _ = load_model(tiny_dir(family_name))  # load_model refuses flex: d2f passes 4D masks
    flex.set_attn_implementation("flex_attention")
    torch.manual_seed(0)
    ids = torch.randint(10, 100, (2, 16))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :3] = False
    blocks = block_ids(valid, torch.tensor([6, 6]), BS)
    pos = position_ids(valid)
    with torch.no_grad():
        mask = to_additive(block_causal_mask(blocks))
        a = sdpa(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = flex(input_ids=ids, attention_mask=flex_block_mask(blocks), position_ids=pos).logits
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)
