"""FreeDave (`freedave`): lossless against static one-token-per-step decoding, in fewer calls.

Static references, independent of the FreeDave loop: `fast_dllm` with a threshold above 1 (one
token per step, over the same none / prefix / dual cache) for the bidirectional caches,
`cache_only` with `tau_conf = 1` for the block-causal `exact` cache, and a brute-force
full-recompute static loop written here. Tiny random models get a sharpened output layer (x12,
as scripts/bench_decode.py) so that drafts really are accepted; the tests assert that they are.
"""

from pathlib import Path

import pytest
import torch

from d2f.decoding import DecodeConfig, FreeDaveOptions, generate
from d2f.decoding.common import predict
from d2f.decoding.config import parse_options
from d2f.decoding.freedave import draft_and_verify
from d2f.family import family_of
from d2f.mask import block_causal_mask, block_ids, to_additive
from d2f.models import load_model
from tests.decode_helpers import Counter, random_prompts

CACHES = ("none", "prefix", "dual", "exact")
TEACHER = Path(__file__).resolve().parents[1] / "d2f" / "tinyworld" / "assets" / "teacher"


@pytest.fixture(scope="module")
def models(tiny_dir):
    """Sharpened tiny random models by family, each with a forward-hook Counter."""
    made = {}
    for fam in ("llada", "dream"):
        model, _ = load_model(tiny_dir(fam))
        with torch.no_grad():
            model.lm_head.weight.mul_(12.0)
        made[fam] = (model, Counter(model))
    return made


def _static_cfg(cache: str, bs: int, new: int = 16, early: bool = True) -> DecodeConfig:
    """Static decoding: one token per step, the block's most confident masked position."""
    if cache == "exact":
        return DecodeConfig(strategy="cache_only", block_size=bs, max_new_tokens=new, tau_conf=1.0)
    opts = {"threshold": 2.0, "cache": cache, "early_stop": early}  # > 1: only the forced top-1
    return DecodeConfig(strategy="fast_dllm", block_size=bs, max_new_tokens=new, options=opts)


def _cfg(cache: str, bs: int, draft_steps: int, new: int = 16, early: bool = True):
    opts = {"draft_steps": draft_steps, "cache": cache, "early_exit": early}
    return DecodeConfig(strategy="freedave", block_size=bs, max_new_tokens=new, options=opts)


def _run(model, counter, prompts, cfg, record=False):
    counter.reset()
    out = generate(model, prompts, cfg, record=record)
    assert counter.calls == out.stats.forwards  # K drafts scored in ONE model call
    return out


def _row_states(trace, row: int) -> list[list[int]]:
    """Row `row`'s answer after every event it was in, consecutive repeats dropped."""
    states = []
    for e in trace:
        hit = (e.rows == row).nonzero()
        if hit.numel():
            state = e.answer[int(hit[0, 0])].tolist()
            if not states or states[-1] != state:
                states.append(state)
    return states


def _is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(any(p == w for w in it) for p in part)


# blocks of 8 without a cache or with the prefix cache: in the slow run (pytest -m slow), to keep
# this file near 20 s; dual and exact (the defaults) run both block sizes by default
BS_CACHE = [
    *[(4, c) for c in CACHES],
    pytest.param(8, "none", marks=pytest.mark.slow),
    pytest.param(8, "prefix", marks=pytest.mark.slow),
    (8, "dual"),
    (8, "exact"),
]


@pytest.mark.parametrize("bs, cache", BS_CACHE)
def test_freedave_gives_static_tokens_in_fewer_forwards(models, family_name, bs, cache):
    model, counter = models[family_name]
    prompts = random_prompts((9, 3))  # ragged
    static = _run(model, counter, prompts, _static_cfg(cache, bs))
    static_rows = [r.forwards for r in static.stats.rows]
    for D in (1, 2, 4):
        out = _run(model, counter, prompts, _cfg(cache, bs, D), record=True)
        assert out.tokens == static.tokens, f"draft_steps={D}"
        rows = [r.forwards for r in out.stats.rows]
        if D == 1:  # one draft per call IS static: the same calls
            assert rows == static_rows and out.stats.forwards == static.stats.forwards
        else:
            assert all(f <= s for f, s in zip(rows, static_rows, strict=True)), (rows, static_rows)
            assert sum(rows) < sum(static_rows), "no draft was ever accepted"
        # every call a row takes part in accepts >= 1 token (no prefill-only call, `exact`
        # included); they sum to the decoded positions
        for r, forwards in enumerate(rows):
            accepted = [
                int(e.committed[e.rows == r].sum()) for e in out.trace if (e.rows == r).any()
            ]
            accepted = [a for a in accepted if a]
            decoded = sum(
                t != family_of(model).mask_token_id for t in _row_states(out.trace, r)[-1]
            )
            assert len(accepted) == forwards
            assert sum(accepted) == decoded
            if D == 1:
                assert set(accepted) == {1}
        if D == 4:
            assert max(int(e.committed.sum(1).max()) for e in out.trace) > 1


def _brute_static_exact(model, prompt: list[int], bs: int, new: int) -> list[list[int]]:
    """Static decoding of a block-causal model, obviously right: every step recomputes the
    whole sequence up to the block's end (no cache) and commits the first most confident mask.
    Returns the answer after every step."""
    fam = family_of(model)
    M, P = fam.mask_token_id, len(prompt)
    x = torch.tensor([prompt + [M] * new])
    ids = block_ids(torch.ones_like(x, dtype=torch.bool), torch.tensor([P]), bs)
    states = []
    for s in range(P, P + new, bs):
        e = s + bs
        while (x[0, s:e] == M).any():
            with torch.no_grad():
                logits = model(
                    input_ids=x[:, :e],
                    attention_mask=to_additive(block_causal_mask(ids[:, :e])),
                    position_ids=torch.arange(e)[None],
                ).logits
            x0, conf, _ = predict(fam.align_logits(logits)[:, s:e], DecodeConfig(), M)
            conf = conf[0].masked_fill(x[0, s:e] != M, float("-inf"))
            j = int(conf.argmax())
            x[0, s + j] = x0[0, j]
            states.append(x[0, P:].tolist())
    return states


@pytest.mark.parametrize("cache", CACHES)
def test_every_call_lands_on_a_static_state(models, family_name, cache):
    """Brute force: static's answer after every step; FreeDave's answer after every call is one
    of them, in order, and both end in the same answer (no early exit: every block decoded)."""
    model, counter = models[family_name]
    prompts, bs, new = random_prompts(), 4, 16
    out = _run(model, counter, prompts, _cfg(cache, bs, 4, new, early=False), record=True)
    if cache == "exact":
        static = [_brute_static_exact(model, p, bs, new) for p in prompts]
    else:
        trace = generate(model, prompts, _static_cfg(cache, bs, new, early=False), record=True)
        static = [_row_states(trace.trace, r) for r in range(len(prompts))]
    jumps = 0
    for r in range(len(prompts)):
        ours = _row_states(out.trace, r)
        assert _is_subsequence(ours, static[r]), f"row {r}"
        assert ours[-1] == static[r][-1]
        jumps += len(static[r]) - len(ours)
    assert jumps > 0  # some call skipped static states


# no cache / prefix cache share the draft scoring with dual: in the slow run
SOME_CACHES = [pytest.param(c, marks=pytest.mark.slow) for c in ("none", "prefix")] + [
    "dual",
    "exact",
]


@pytest.mark.parametrize("cache", SOME_CACHES)
def test_batched_equals_alone(models, family_name, cache):
    model, counter = models[family_name]
    prompts, cfg = random_prompts(), _cfg(cache, 4, 4)
    batched = _run(model, counter, prompts, cfg)
    for i, p in enumerate(prompts):
        alone = _run(model, counter, [p], cfg)
        assert alone.tokens == [batched.tokens[i]]
        assert alone.stats.rows[0].forwards == batched.stats.rows[i].forwards
        assert alone.stats.forwards == alone.stats.rows[0].forwards  # a row counts each call once


@pytest.fixture(scope="module")
def teacher():
    model, tok = load_model(TEACHER)
    return model, tok, Counter(model)


@pytest.mark.parametrize("cache", SOME_CACHES)
def test_early_exit_on_a_trained_teacher(teacher, cache):
    """The tiny-world teacher ends its answers: early exit stops rows where static does (one
    draft: the same forwards), losslessly, and earlier than decoding every block."""
    model, tok, counter = teacher
    prompts = [tok(t)["input_ids"] for t in ("12+7=", "3+45=9", "100-1=")]
    static = _run(model, counter, prompts, _static_cfg(cache, 8, 24))
    one = _run(model, counter, prompts, _cfg(cache, 8, 1, 24))
    assert [r.forwards for r in one.stats.rows] == [r.forwards for r in static.stats.rows]
    early = _run(model, counter, prompts, _cfg(cache, 8, 4, 24))
    late = _run(model, counter, prompts, _cfg(cache, 8, 4, 24, early=False))
    assert early.tokens == static.tokens == late.tokens
    assert any(r.hit_end for r in early.stats.rows)
    for e, s, a in zip(early.stats.rows, static.stats.rows, late.stats.rows, strict=True):
        assert e.forwards <= s.forwards
        assert e.forwards <= a.forwards
    assert early.stats.forwards < late.stats.forwards  # some row really stopped early


def test_draft_and_verify_by_hand():
    """One call, worked out by hand. Mask id 0; stale predictions x0 = [5, 6, 7, 8] with
    confidences ranking positions 1, 2, 3, 0, so the drafts are d0 = [0 0 0 0] (the state),
    d1 = [0 6 0 0], d2 = [0 6 7 0], d3 = [0 6 7 8]. The fake model's predictions are x0 + 10 at
    every position except the one its confidences rank first, where they are x0:
      d0 -> commits position 1 (6): t0 = [0 6 0 0] == d1, accepted;
      d1 -> commits position 2 (7): t1 = [0 6 7 0] == d2, accepted;
      d2 -> commits position 0 (5): t2 = [5 6 7 0] != d3: the chain stops at d2.
    So best = 2, the new window is t2 and the predictions are those scored on d2. A second row
    (K = 3) commits position 3 from d0 (t0 = [0 0 0 8] != d1) but position 2 from d1
    (t1 = [0 6 7 0] == d2): the chain is broken at d1, so best = 0."""
    window = torch.zeros(2, 4, dtype=torch.long)
    x0 = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.1, 0.9, 0.5, 0.3]])
    first = {(0, 0): 1, (0, 1): 2, (0, 2): 0, (0, 3): 3, (1, 0): 3, (1, 1): 2, (1, 2): 0}
    seen = []

    def score(drafts, rows):
        seen.append(len(rows))
        n_filled = (drafts != 0).sum(1)  # draft k has k tokens
        out_x0 = x0[rows] + 10
        out_conf = torch.full(drafts.shape, 0.2)
        for i, (row, k) in enumerate(zip(rows.tolist(), n_filled.tolist(), strict=True)):
            j = first[(row, k)]
            out_x0[i, j] = x0[row, j]
            out_conf[i, j] = 0.9
        return out_x0, out_conf

    new, nx0, _, best = draft_and_verify(window, x0, conf, [4, 3], torch.arange(2), score, 0)
    assert seen == [7]  # one call: 4 + 3 drafts
    assert best.tolist() == [2, 0]
    assert new.tolist() == [[5, 6, 7, 0], [0, 0, 0, 8]]
    assert nx0[0].tolist() == [5, 16, 17, 18]  # scored on d2: position 0 kept x0
    assert nx0[1].tolist() == [15, 16, 17, 8]  # scored on d0 of row 1


def test_options():
    assert parse_options("freedave", ["draft_steps=8", "cache=exact", "early_exit=false"]) == {
        "draft_steps": 8,
        "cache": "exact",
        "early_exit": False,
    }
    assert DecodeConfig(strategy="freedave").options == FreeDaveOptions(4, "dual", True)
    with pytest.raises(ValueError, match="draft_steps"):
        FreeDaveOptions(draft_steps=0)
    with pytest.raises(TypeError, match="draft_steps"):
        FreeDaveOptions(draft_steps=2.0)
    with pytest.raises(ValueError, match="cache"):
        FreeDaveOptions(cache="tree")
    with pytest.raises(ValueError, match="unknown freedave options"):
        DecodeConfig(strategy="freedave", options={"threshold": 0.9})


def test_sampling_is_refused(models):
    model, _ = models["llada"]
    with pytest.raises(ValueError, match="temperature 0"):
        generate(model, random_prompts()[:1], _cfg("dual", 4, 4), temperature=0.5)
