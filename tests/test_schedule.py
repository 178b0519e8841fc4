"""Tests for d2f.schedule: block layout, ramp / random / single ratios, masking."""

import pytest
import torch

from d2f.mask import block_ids
from d2f.schedule import add_noise, block_ratios, num_blocks

MASK = 99


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noise_blocks_are_the_mask_blocks_literal():
    """One block numbering (d2f.mask.block_ids: 0 prompt, answer blocks 1, 2, ...): each answer
    block's tokens share one ratio, block k + 1 gets ratio r[k]. L=8, blocks of 3: row 0's answer
    starts at 2 (blocks 1,1,1,2,2,2), row 1's at 5 (one block)."""
    prompt = torch.tensor([2, 5])
    every = torch.ones(2, 8, dtype=torch.bool)
    want = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    assert torch.equal(block_ids(every, prompt, 3), want)
    assert num_blocks(torch.tensor([2, 5, 8, 0]), 8, 3).tolist() == [2, 1, 0, 3]
    ratios = block_ratios(prompt, 8, 3, kind="random", lo=0.0, hi=1.0, generator=gen(3))
    out = add_noise(torch.zeros(2, 8, dtype=torch.long), prompt, MASK, 3, kind="random",
                    lo=0.0, hi=1.0, generator=gen(3))  # fmt: skip
    r0, r1 = ratios[0].tolist(), ratios[1].tolist()
    expect = torch.tensor([[1, 1, r0[0], r0[0], r0[0], r0[1], r0[1], r0[1]],
                           [1, 1, 1, 1, 1, r1[0], r1[0], r1[0]]])  # fmt: skip
    assert torch.equal(out.p_mask, expect)


def test_ramp_monotone_in_bounds_zero_beyond_own_count():
    prompt = torch.randint(0, 60, (2000,), generator=gen(1))
    r = block_ratios(prompt, 64, 4, generator=gen(2))
    n = num_blocks(prompt, 64, 4)
    valid = torch.arange(r.shape[1]) < n[:, None]
    assert r.shape == (2000, int(n.max()))
    assert torch.all(r[~valid] == 0)
    assert torch.all(r[valid] >= 0.2) and torch.all(r[valid] < 0.7)
    diff = r[:, 1:] - r[:, :-1]
    assert torch.all(diff[valid[:, 1:]] >= 0)


def test_ramp_block_means_use_the_rows_own_count():
    # Half the rows have 16 blocks, half 2. E[r_k] = E[p0] + (hi - E[p0]) k / (2 (n - 1))
    # = 0.45 + 0.125 k / (n - 1): the last block of every row averages 0.575. A schedule using the
    # batch's block count for the short rows would give their last block ~0.458 instead.
    prompt = torch.tensor([0, 56]).repeat(10000)
    r = block_ratios(prompt, 64, 4, generator=gen(3))
    for rows, n in ((r[0::2], 16), (r[1::2], 2)):
        want = 0.45 + 0.125 * torch.arange(n) / (n - 1)
        # SE of a mean of 10k draws with std <= 0.15 is <= 0.0015; tolerance 0.006 ~ 4 SE.
        torch.testing.assert_close(rows[:, :n].mean(0), want, atol=0.006, rtol=0)
    assert abs(r[1::2, 1].mean().item() - 0.575) < 0.006


def test_first_block_uniform_on_lo_hi():
    p0 = block_ratios(torch.zeros(20000, dtype=torch.long), 32, 16, generator=gen(4))[:, 0]
    assert abs(p0.mean().item() - 0.45) < 0.004  # SE = 0.5/sqrt(12 * 20000) = 0.001
    assert 0.2 <= p0.min().item() < 0.201 and 0.699 < p0.max().item() < 0.7
    # Kolmogorov-Smirnov distance to U[0.2, 0.7); 1.63 / sqrt(N) is the 1% critical value.
    cdf = (p0.sort().values - 0.2) / 0.5
    ecdf = torch.arange(1, p0.numel() + 1) / p0.numel()
    assert (cdf - ecdf).abs().max().item() < 1.63 / 20000**0.5


def test_row_alone_equals_row_in_batch():
    # Row 0 (prompt 10, 14 blocks) alone and batched with a longer-prompt row (fewer blocks) and
    # with a shorter-prompt row (more blocks): same seed gives the same count and ratios.
    alone = block_ratios(torch.tensor([10]), 64, 4, generator=gen(5))
    for other in (50, 0):
        prompt = torch.tensor([10, other])
        both = block_ratios(prompt, 64, 4, generator=gen(5))
        assert num_blocks(prompt, 64, 4)[0].item() == alone.shape[1] == 14
        torch.testing.assert_close(both[0, :14], alone[0], rtol=0, atol=1e-7)
        assert torch.all(both[0, 14:] == 0)


def test_random_in_bounds_and_independent():
    r = block_ratios(torch.zeros(20000, dtype=torch.long), 64, 16, kind="random", generator=gen(6))
    assert torch.all(r >= 0.2) and torch.all(r < 0.7)
    assert abs(r.mean().item() - 0.45) < 0.003
    corr = torch.corrcoef(r.T)
    assert (corr - torch.eye(4)).abs().max().item() < 0.04  # SE of a correlation ~ 0.007
    assert (r[:, 1] < r[:, 0]).float().mean().item() > 0.45  # not a sorted (ramp) schedule


def test_single_one_ratio_per_row():
    prompt = torch.tensor([0, 40, 60]).repeat(5000)
    r = block_ratios(prompt, 64, 4, kind="single", eps=0.1, generator=gen(7))
    n = num_blocks(prompt, 64, 4)
    valid = torch.arange(r.shape[1]) < n[:, None]
    first = r[:, :1].expand_as(r)
    assert torch.all(r[valid] == first[valid]) and torch.all(r[~valid] == 0)
    assert torch.all(r[:, 0] > 0.1) and torch.all(r[:, 0] <= 1.0)
    assert abs(r[:, 0].mean().item() - 0.55) < 0.01  # mean of U(0.1, 1]


def test_prompt_never_masked_answer_fully_masked_at_ratio_one():
    ids = torch.arange(40).reshape(4, 10)
    prompt = torch.tensor([0, 3, 9, 10])
    for kind in ("ramp", "random"):  # "single" draws t < 1: covered by the next test
        out = add_noise(ids, prompt, MASK, 4, kind=kind, lo=1.0, hi=1.0, generator=gen(8))
        answer = block_ids(torch.ones(4, 10, dtype=torch.bool), prompt, 4) >= 1
        assert torch.equal(out.masked, answer)
        assert torch.equal(out.noisy_ids, torch.where(answer, MASK, ids))
        assert torch.equal(out.p_mask, torch.ones(4, 10))  # answer ratio 1, prompt 1 by choice


@pytest.mark.parametrize("kind", ["ramp", "random", "single"])
def test_prompt_never_masked_and_block_starts_at_prompt_end(kind):
    ids = torch.zeros(3000, 32, dtype=torch.long)
    prompt = torch.tensor([5, 12, 20]).repeat(1000)
    out = add_noise(ids, prompt, MASK, 8, kind=kind, generator=gen(9))
    pos = torch.arange(32)
    is_prompt = pos[None] < prompt[:, None]
    assert not out.masked[is_prompt].any()
    assert torch.all(out.p_mask[is_prompt] == 1.0)
    assert torch.all(out.noisy_ids[~out.masked] == 0) and torch.all(
        out.noisy_ids[out.masked] == MASK
    )
    # p_mask is constant on [prompt + 8k, prompt + 8k + 8) and equals that block's ratio.
    r = block_ratios(prompt, 32, 8, kind=kind, generator=gen(9))
    for b in range(3):
        p, row_r = prompt[b].item(), r[b]
        want = row_r.repeat_interleave(8)[: 32 - p]
        assert torch.equal(out.p_mask[b, p:], want)


def test_padding_masked_only_when_allowed():
    ids = torch.ones(2, 12, dtype=torch.long)
    prompt = torch.tensor([2, 4])
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[:, 8:] = True
    kw = {"lo": 1.0, "hi": 1.0, "pad": pad, "generator": gen(10)}
    assert add_noise(ids, prompt, MASK, 4, **kw).masked[pad].all()
    out = add_noise(ids, prompt, MASK, 4, mask_padding=False, **kw)
    assert not out.masked[pad].any()
    assert torch.equal(out.masked, (torch.arange(12)[None] >= prompt[:, None]) & ~pad)
    assert torch.all(out.p_mask[pad] == 1.0)  # padding keeps its block's nominal ratio


def test_empirical_mask_rate_matches_block_ratio():
    # Paired residual masked - p_mask per block: a Bernoulli(p) residual has variance <= 1/4, so
    # over 40k tokens per block its mean has SE <= 0.0025; tolerance 0.01 = 4 SE. Using a
    # neighbouring block's ratio would shift it by E[r_{k+1} - r_k] = 0.0417 (n = 4).
    ids = torch.zeros(2500, 64, dtype=torch.long)
    out = add_noise(ids, torch.zeros(2500, dtype=torch.long), MASK, 16, generator=gen(11))
    resid = (out.masked.float() - out.p_mask).reshape(2500, 4, 16)
    assert resid.mean(dim=(0, 2)).abs().max().item() < 0.01
    rate = out.masked.float().reshape(2500, 4, 16).mean(dim=(0, 2))
    torch.testing.assert_close(rate, 0.45 + 0.125 * torch.arange(4) / 3, atol=0.01, rtol=0)


def test_deterministic_with_seed():
    ids = torch.zeros(4, 32, dtype=torch.long)
    prompt = torch.tensor([0, 5, 17, 31])
    a = add_noise(ids, prompt, MASK, 4, generator=gen(12))
    b = add_noise(ids, prompt, MASK, 4, generator=gen(12))
    c = add_noise(ids, prompt, MASK, 4, generator=gen(13))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.p_mask, c.p_mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size"),
        ({"lo": 0.8, "hi": 0.7}, "lo and hi"),
        ({"lo": -0.1}, "lo and hi"),
        ({"hi": 1.5}, "lo and hi"),
        ({"kind": "linear"}, "kind"),
        ({"eps": 1.0}, "eps"),
        ({"prompt_lens": torch.tensor([3, 9])}, "prompt_lens"),
        ({"prompt_lens": torch.tensor([-1, 2])}, "prompt_lens"),
        ({"prompt_lens": torch.tensor([1])}, "prompt_lens"),
        ({"mask_padding": False}, "pad"),
    ],
)
def test_bad_args_raise(kwargs, match):
    args = {
        "input_ids": torch.zeros(2, 8, dtype=torch.long),
        "prompt_lens": torch.tensor([1, 2]),
        "mask_token_id": MASK,
        "block_size": 4,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        add_noise(**args)
