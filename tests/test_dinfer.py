"""dInfer (`dinfer`): the threshold / credit / hierarchy rules on hand-worked cases, and the decoder
against `fast_dllm` (the same block loop and caches) where the rules coincide.

References independent of the dInfer code: hand-built confidences and logits worked by hand in
each test; `fast_dllm` with a threshold above 1 (static decoding: the block's most confident mask,
one per step, over the same none / prefix / dual cache). The decoder runs on the trained tiny-world
teacher: a tiny random model's masked positions tie within 1e-5 almost everywhere (identical
inputs), so the tie rule would commit whole blocks at once and test nothing else.
"""

import math
from pathlib import Path

import pytest
import torch

from d2f.decoding import DecodeConfig, DInferOptions, generate
from d2f.decoding.config import parse_options
from d2f.decoding.dinfer import credit_fuse, hierarchy_commit, select, threshold_commit
from d2f.models import load_model
from tests.decode_helpers import Counter

TEACHER = Path(__file__).resolve().parents[1] / "d2f" / "tinyworld" / "assets" / "teacher"
F, T = False, True


@pytest.fixture(scope="module")
def teacher():
    model, tok = load_model(TEACHER)
    return model, tok, Counter(model)


def _prompts(n_list=(9, 3, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 100, (n,), generator=g).tolist() for n in n_list]


def _cfg(bs=4, new=12, **opts) -> DecodeConfig:
    return DecodeConfig(strategy="dinfer", block_size=bs, max_new_tokens=new, options=opts)


def _run(model, counter, prompts, cfg, **kw):
    counter.reset()
    out = generate(model, prompts, cfg, **kw)
    assert counter.calls == out.stats.forwards  # forwards counted by the hook, not the decoder
    return out


# ---- the rules, by hand ----


def test_threshold_rule_ties_commit_together():
    conf = torch.tensor(
        [
            [0.5, 0.5, 0.3, 0.5 - 5e-6, 0.5 - 2e-5, 0.95],  # none >= 0.9: the best and its ties
            [0.92, 0.91, 0.6, 0.2, 0.2, 0.2],  # two reach 0.9: exactly those
            [0.99, 0.98, 0.97, 0.96, 0.95, 0.94],  # no candidate: nothing
        ]
    )
    cand = torch.tensor([[T, T, T, T, T, F], [T, T, T, T, T, T], [F] * 6])
    want = torch.tensor([[T, T, F, T, F, F], [T, T, F, F, F, F], [F] * 6])
    assert torch.equal(threshold_commit(conf, cand, 0.9), want)


def test_hierarchy_rule_per_masked_segment():
    # segments {0, 1}, {3, 4, 5}, {7}; columns 2 and 6 are decoded (their conf must not count)
    masked = torch.tensor([[T, T, F, T, T, T, F, T]])
    conf = torch.tensor([[0.2, 0.35, 0.99, 0.5, 0.5, 0.1, 0.99, 0.25]])
    # segment maxima 0.35 (col 1) and the tie 0.5 (cols 3, 4) pass low 0.3; 0.25 (col 7) does not
    assert hierarchy_commit(conf, masked, 0.9, 0.3).tolist() == [[F, T, F, T, T, F, F, F]]
    # no segment maximum passes low 0.6; conf > 0.4: cols 3, 4 (col 3 is also the top-1)
    assert hierarchy_commit(conf, masked, 0.4, 0.6).tolist() == [[F, F, F, T, T, F, F, F]]
    # no thresholds: every segment's maximum, ties included
    assert hierarchy_commit(conf, masked, None, None).tolist() == [[F, T, F, T, T, F, F, T]]
    # nothing passes: only the first most confident mask (col 3)
    assert hierarchy_commit(conf, masked, 2.0, 2.0).tolist() == [[F, F, F, T, F, F, F, F]]


def test_credit_matrix_accumulates_with_decay():
    logits = torch.zeros(1, 2, 4)  # uniform: the top-1 is token 0 with p1 = 1/4 at both positions
    masked = torch.tensor([[T, F]])
    credit = torch.zeros(1, 2, 4)
    alpha, gamma, beta = 0.7, 0.5, 0.8
    fused = credit_fuse(logits, masked, credit, alpha, gamma, beta)
    # first forward: M[0, 0] = 0.25 ** 0.5 = 0.5; the decoded position gains nothing
    want = torch.zeros(1, 2, 4)
    want[0, 0, 0] = alpha * math.log(1.5)
    assert torch.allclose(fused, want)
    fused = credit_fuse(logits, masked, credit, alpha, gamma, beta)
    # second: M[0, 0] = 0.8 * 0.5 + 0.5 = 0.9
    want[0, 0, 0] = alpha * math.log(1.9)
    assert torch.allclose(fused, want)
    assert credit[0, 1].abs().sum() == 0


def test_select_never_commits_the_mask_id():
    mask_id = 4
    opts = DInferOptions(threshold=0.9)
    blk = torch.tensor([[mask_id, mask_id]])
    # col 0 predicts the mask id (prob ~0.95): not a candidate; col 1 (token 2) is then the best
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 3.0, 0.0, 1.0]]])
    x0, chosen = select(logits, blk, opts, mask_id)
    assert chosen.tolist() == [[F, T]] and int(x0[0, 1]) == 2
    # both predict the mask id: the released loop would stall; the position whose best other
    # token is likelier commits it: col 1, token 1 (e^3 / (e^3 + 3) > e / (e + 3) at col 0)
    logits = torch.tensor([[[0.0, 0.0, 1.0, 0.0, 5.0], [0.0, 3.0, 0.0, 0.0, 6.0]]])
    for decoder in ("threshold", "hierarchy"):
        x0, chosen = select(logits, blk, DInferOptions(decoder=decoder), mask_id)
        assert chosen.tolist() == [[F, T]] and int(x0[0, 1]) == 1, decoder


def test_options_parse_and_validate():
    assert parse_options("dinfer", ["decoder=credit", "credit_alpha=0"]) == {
        "decoder": "credit",
        "credit_alpha": 0.0,
    }
    assert _cfg(low_threshold=None).options.low_threshold is None
    with pytest.raises(ValueError, match="decoder"):
        DInferOptions(decoder="fixed")
    with pytest.raises(ValueError, match="credit_beta"):
        DInferOptions(credit_beta=-0.1)


# ---- the decoder ----

QUESTIONS = (
    "tom has 3 apples and gets 4 more . how many apples does tom have now ?",
    "ann has 12 pens and gets 30 more . how many pens does ann have now ?",
    "bob has 7 cards , gets 5 more and then loses 2 . how many cards does bob have now ?",
)


def _static(cache: str) -> DecodeConfig:
    """Static decoding over `cache`: `fast_dllm` with a threshold no confidence reaches."""
    opts = {"threshold": 2.0, "cache": cache, "early_stop": True, "precision": "float32"}
    return DecodeConfig(strategy="fast_dllm", block_size=8, max_new_tokens=48, options=opts)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_thresholds_above_one_are_static_decoding(teacher, cache):
    """Nothing reaches 2: the hierarchy rule commits only the first most confident mask per
    forward, exactly static decoding. The threshold rule (and credit with alpha 0) also commits
    every mask within 1e-5 of it: the trained teacher has such ties (confidences saturated at
    ~1), so it takes the same tokens in fewer forwards, never more."""
    model, tok, counter = teacher
    ref = _run(model, counter, QUESTIONS, _static(cache), tokenizer=tok)
    ref_rows = [r.forwards for r in ref.stats.rows]
    hier = _cfg(8, 48, decoder="hierarchy", cache=cache, threshold=2.0, low_threshold=2.0)
    out = _run(model, counter, QUESTIONS, hier, tokenizer=tok)
    assert out.tokens == ref.tokens
    assert [r.forwards for r in out.stats.rows] == ref_rows
    for decoder in ("threshold", "credit"):
        cfg = _cfg(8, 48, decoder=decoder, cache=cache, threshold=2.0, credit_alpha=0.0)
        out = _run(model, counter, QUESTIONS, cfg, tokenizer=tok, record=True)
        assert out.tokens == ref.tokens, decoder
        rows = [r.forwards for r in out.stats.rows]
        assert all(f <= r for f, r in zip(rows, ref_rows, strict=True)), (rows, ref_rows)
        assert sum(rows) < sum(ref_rows)  # ties committed together
        assert max(int(e.committed.sum(1).max()) for e in out.trace) > 1


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_credit_with_alpha_zero_is_the_threshold_decoder(teacher, cache):
    model, tok, counter = teacher
    plain = _run(model, counter, QUESTIONS, _cfg(8, 48, cache=cache), tokenizer=tok)
    cfg = _cfg(8, 48, cache=cache, decoder="credit", credit_alpha=0.0)
    zero = _run(model, counter, QUESTIONS, cfg, tokenizer=tok)
    assert zero.tokens == plain.tokens
    assert [r.forwards for r in zero.stats.rows] == [r.forwards for r in plain.stats.rows]
    # credit is not a no-op: a strong credit (alpha 5, every arg-max gains 1) commits earlier
    cfg = _cfg(8, 48, cache=cache, decoder="credit", credit_alpha=5.0, credit_gamma=0.0)
    strong = _run(model, counter, QUESTIONS, cfg, tokenizer=tok)
    assert strong.stats.forwards < plain.stats.forwards


@pytest.mark.parametrize("decoder", ["threshold", "credit", "hierarchy"])
def test_batched_equals_alone(teacher, decoder):
    model, tok, counter = teacher
    qs = list(QUESTIONS)  # ragged prompts; rows end at different blocks
    cfg = _cfg(8, 48, decoder=decoder)
    batched = _run(model, counter, qs, cfg, tokenizer=tok)
    for i, q in enumerate(qs):
        alone = _run(model, counter, [q], cfg, tokenizer=tok)
        assert alone.tokens[0] == batched.tokens[i], (decoder, i)
        assert alone.stats.rows[0].forwards == batched.stats.rows[i].forwards, (decoder, i)


def test_early_stop_on_the_trained_teacher(teacher):
    """The teacher ends its answers: early stop gives the same text in fewer forwards."""
    model, tok, counter = teacher
    full = _run(model, counter, QUESTIONS, _cfg(8, 48, early_stop=False), tokenizer=tok)
    early = _run(model, counter, QUESTIONS, _cfg(8, 48), tokenizer=tok)
    assert all(r.hit_end for r in early.stats.rows)
    assert early.tokens == full.tokens
    rows = zip(early.stats.rows, full.stats.rows, strict=True)
    assert all(e.forwards < f.forwards for e, f in rows)


def test_refuses_what_is_not_ported(tiny_dir):
    model, _ = load_model(tiny_dir("llada"))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, _prompts((3,)), _cfg(), temperature=0.5)
    dream, _ = load_model(tiny_dir("dream"))
    with pytest.raises(ValueError, match="shifted"):
        generate(dream, _prompts((3,)), _cfg())
