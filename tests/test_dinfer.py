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

from d2f.decoding import DecodeConfig, DInferOptions, dinfer, generate
from d2f.decoding.api import encode_prompts
from d2f.decoding.config import parse_options
from d2f.decoding.dinfer import (
    annealed,
    credit_fuse,
    hierarchy_commit,
    select,
    smoothed_embeddings,
    threshold_commit,
)
from d2f.decoding.fast_dllm import start_block
from d2f.family import family_of
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


def test_threshold_rule_takes_one_threshold_per_row():
    conf = torch.tensor([[0.95, 0.92, 0.5], [0.95, 0.92, 0.5]])
    cand = torch.ones(2, 3, dtype=torch.bool)
    thr = torch.tensor([[1.0], [0.9]], dtype=torch.float64)  # row 0: only the best; row 1: two
    assert threshold_commit(conf, cand, thr).tolist() == [[T, F, F], [T, T, F]]
    masked = torch.ones(2, 3, dtype=torch.bool)  # hierarchy: one segment; conf > thr, + top-1
    assert hierarchy_commit(conf, masked, thr, None).tolist() == [[T, F, F], [T, T, F]]


def test_smoothing_schedule_by_hand():
    """The released anneal: thr = max(1 - 0.02 it, thr), weight = min(0.15 + 0.02 it, 0.3)."""
    thr, weight = annealed(DInferOptions(threshold=0.9), torch.tensor([0, 1, 5, 20]))
    assert torch.allclose(thr[:, 0], torch.tensor([1.0, 0.98, 0.9, 0.9], dtype=torch.float64))
    want = torch.tensor([0.15, 0.17, 0.25, 0.3], dtype=torch.float64)
    assert torch.allclose(weight[:, 0], want)


def test_smoothed_embeddings_by_hand():
    """H2Embed: E[x] + w * softmax(logits) @ E on masks, E[x] elsewhere (mask id 2)."""
    embed = torch.nn.Embedding(3, 2)
    with torch.no_grad():
        embed.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    x = torch.tensor([[2, 0]])
    logits = torch.tensor([[[math.log(3.0), 0.0, -1e9], [0.0, 0.0, 0.0]]])  # p = (3/4, 1/4, 0)
    out = smoothed_embeddings(embed, x, logits, torch.tensor([[0.5]]), 2)
    # masked col 0: E[2] + 0.5 * (3/4 E[0] + 1/4 E[1]) = (5.375, 5.125); col 1: E[0] as it is
    assert torch.allclose(out, torch.tensor([[[5.375, 5.125], [1.0, 0.0]]]))


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
    assert parse_options("dinfer", ["cache=vicinity", "prefix_look=8", "smoothing=true"]) == {
        "cache": "vicinity",
        "prefix_look": 8,
        "smoothing": True,
    }
    with pytest.raises(ValueError, match="cache"):
        DInferOptions(cache="window")
    for name, bad in (("prefix_look", -1), ("after_look", 1.5), ("warmup_steps", True)):
        with pytest.raises(ValueError, match=name):
            DInferOptions(**{name: bad})
    with pytest.raises(TypeError, match="smoothing"):
        DInferOptions(smoothing=1)
    with pytest.raises(ValueError, match="cont_weight_growth"):
        DInferOptions(cont_weight_growth=float("nan"))


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


VICINITY = {"cache": "vicinity", "prefix_look": 3, "after_look": 5, "warmup_steps": 3}


@pytest.mark.parametrize(
    "opts",
    [
        {"decoder": "threshold"},
        {"decoder": "credit"},
        {"decoder": "hierarchy"},
        {**VICINITY, "early_stop": False},
        {
            **VICINITY,
            "decoder": "credit",
            "warmup_steps": 8,
            "threshold": 0.99,
            "early_stop": False,
        },
        {"smoothing": True},
        {"smoothing": True, "cache": "prefix", "decoder": "credit", "early_stop": False},
        {**VICINITY, "smoothing": True, "decoder": "hierarchy", "early_stop": False},
    ],
    ids=[
        "threshold", "credit", "hierarchy", "vicinity", "vicinity-credit", "smooth",
        "smooth-prefix", "both",
    ],
)  # fmt: skip
def test_batched_equals_alone(teacher, opts):
    """Per row the same tokens and forwards in a ragged batch as alone. With the vicinity warmup
    rows leave it at different forwards (the two vicinity cases refresh rows of the second block
    apart, in two groups with their own caches); smoothing anneals per row, and its idle forwards
    (every smoothing case has some) run in the same calls as other rows' productive ones."""
    model, tok, counter = teacher
    qs = list(QUESTIONS[::-1])  # ragged prompts; rows end at different blocks, the first first
    cfg = _cfg(8, 48, **opts)
    batched = _run(model, counter, qs, cfg, tokenizer=tok)
    for i, q in enumerate(qs):
        alone = _run(model, counter, [q], cfg, tokenizer=tok)
        assert alone.tokens[0] == batched.tokens[i], (opts, i)
        assert alone.stats.rows[0].forwards == batched.stats.rows[i].forwards, (opts, i)


@pytest.mark.parametrize(
    "opts",
    [
        {"cache": "prefix"},
        {"cache": "dual", "decoder": "credit"},
        {**VICINITY, "early_stop": False},
        {"smoothing": True, "cache": "prefix", "early_stop": False},
        {**VICINITY, "smoothing": True, "decoder": "hierarchy", "early_stop": False},
    ],
    ids=["prefix", "dual-credit", "vicinity", "smooth-prefix", "smooth-vicinity"],
)
def test_static_cache_gives_the_dynamic_tokens(teacher, opts):
    """kv_cache="static": every cached forward runs over a `StaticKV` (keys in column order, the
    released layout), one buffer per refresh (the vicinity warmup refreshes the second block's
    rows in two groups); per row the dynamic cache's tokens and forwards on a ragged batch."""
    model, tok, counter = teacher
    qs = list(QUESTIONS[::-1])
    dynamic = _run(model, counter, qs, _cfg(8, 48, **opts), tokenizer=tok)
    kinds = []

    def hook(module, args, kwargs):
        kinds.append(type(kwargs.get("cache")).__name__)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cfg = DecodeConfig(
            strategy="dinfer", block_size=8, max_new_tokens=48, options=opts, kv_cache="static"
        )
        static = _run(model, counter, qs, cfg, tokenizer=tok)
    finally:
        handle.remove()
    assert static.tokens == dynamic.tokens
    assert [r.forwards for r in static.stats.rows] == [r.forwards for r in dynamic.stats.rows]
    assert "StaticKV" in kinds and "DynamicCache" not in kinds  # (None: vicinity warmup)


# ---- the vicinity window ----


@pytest.mark.parametrize("decoder", ["threshold", "credit", "hierarchy"])
def test_vicinity_without_looks_or_warmup_is_the_dual_cache(teacher, decoder):
    model, tok, counter = teacher
    dual = _run(model, counter, QUESTIONS, _cfg(8, 48, decoder=decoder), tokenizer=tok)
    opts = {"cache": "vicinity", "prefix_look": 0, "after_look": 0, "warmup_steps": 0}
    vic = _run(model, counter, QUESTIONS, _cfg(8, 48, decoder=decoder, **opts), tokenizer=tok)
    assert vic.tokens == dual.tokens
    assert [r.forwards for r in vic.stats.rows] == [r.forwards for r in dual.stats.rows]


@pytest.mark.parametrize("warmup", [0, 2, 1000])
def test_vicinity_window_over_everything_is_no_cache(teacher, warmup):
    """A window reaching both ends recomputes every column: each cached forward is a full one,
    so any warmup gives the no-cache decoder's tokens and forwards. So does a warmup longer than
    the decode with no window at all."""
    model, tok, counter = teacher
    none = _run(model, counter, QUESTIONS, _cfg(8, 48, cache="none"), tokenizer=tok)
    opts = {"cache": "vicinity", "prefix_look": 1000, "after_look": 1000, "warmup_steps": warmup}
    if warmup == 1000:
        opts.update(prefix_look=0, after_look=0)
    vic = _run(model, counter, QUESTIONS, _cfg(8, 48, **opts), tokenizer=tok)
    assert vic.tokens == none.tokens
    assert [r.forwards for r in vic.stats.rows] == [r.forwards for r in none.stats.rows]


def _record_calls(model):
    """Record (input width, cached columns or None) of every model call; returns (list, handle)."""
    calls = []

    def hook(module, args, kwargs):
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        cache = kwargs.get("cache")
        calls.append((inputs.shape[1], None if cache is None else cache.get_seq_length()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def _first_masked_block(answer, mask_id: int) -> int:
    """The block (of 8) of the first mask of a (G,) answer."""
    return int((answer == mask_id).nonzero()[0, 0]) // 8


def _complete(after, before, mask_id: int) -> bool:
    """Whether answer `after` has no mask in the block that was the first masked in `before`."""
    k = _first_masked_block(before, mask_id)
    return not bool((after[8 * k : 8 * k + 8] == mask_id).any())


def _released_schedule(states, L, P, width, warmup=0, idle=False):
    """The released schedule of one row's forwards, worked from the row's answer before each
    forward ((G,) each: the start, then one per forward): (input width, cached columns or None)
    per forward, and the indices of the idle forwards. Blocks of 8; a forward's block is the
    first one still masked before it. width(s): a cached forward's input width for the block at
    s, None = no cache. The first `warmup` forwards of the sequence are full and uncached; then
    the first forward in each block (and the first after the warmup) is the refresh, full into an
    empty cache, and the others are cached: `width(s)` columns over the cache of the other
    L - width(s). With `idle`, a refresh that completes its block is followed by one cached
    forward of that block (theirs' idle forward)."""
    mask_id = int(states[0][0])  # the first state is all masks
    want, idles, last = [], [], None
    for i, answer in enumerate(states[:-1]):
        if idle and want and want[-1] == (L, 0) and _complete(answer, states[i - 1], mask_id):
            w = width(P + 8 * last)
            want.append((w, L - w))
            idles.append(i)
            continue
        block = _first_masked_block(answer, mask_id)
        if width is None or i < warmup:
            want.append((L, None))
        elif block != last or i == warmup:
            want.append((L, 0))
        else:
            w = width(P + 8 * block)
            want.append((w, L - w))
        last = block
    return want, idles


def _schedule_run(model, tok, counter, opts, question=QUESTIONS[2], new=24):
    """One row decoded with `opts`: (the model calls, (new,) answers before each forward and
    after the last, the trace)."""
    calls, handle = _record_calls(model)
    try:
        out = _run(model, counter, [question], _cfg(8, new, **opts), tokenizer=tok, record=True)
    finally:
        handle.remove()
    assert len(calls) == len(out.trace) == out.stats.forwards
    mask_id = family_of(model).mask_token_id
    states = [torch.full((new,), mask_id)] + [e.answer[0] for e in out.trace]
    return calls, states, out.trace


def _cached_width(cache: str, L: int):
    """s -> a cached forward's input width for the block at s (blocks of 8): prefix [s, L), dual
    the block, vicinity the window [s - 3, s + 8 + 5) within [0, L); None without a cache."""
    return {
        "none": None,
        "prefix": lambda s: L - s,
        "dual": lambda s: 8,
        "vicinity": lambda s: min(L, s + 13) - max(0, s - 3),
    }[cache]


@pytest.mark.parametrize("warmup", range(1, 8))
def test_vicinity_schedule_is_the_released_one(teacher, warmup):
    """One row, blocks of 8, prefix_look 3, after_look 5: the first `warmup` forwards of the
    SEQUENCE are full and uncached; then the first forward in each block is the refresh (full,
    into an empty cache) and every later one forwards the window [s - 3, e + 5) over the cache
    of the other columns (as released, less its second refresh when the warmup ends after the
    first block: docs/decoding.md; and less the idle forward: no smoothing). Warmups ending
    inside a block and at a block start."""
    model, tok, counter = teacher
    opts = {**VICINITY, "warmup_steps": warmup, "early_stop": False}
    calls, states, _ = _schedule_run(model, tok, counter, opts)
    L = calls[0][0]
    want, _ = _released_schedule(states, L, L - 24, _cached_width("vicinity", L), warmup)
    assert calls == want
    assert any(c[1] is not None and c[1] > 0 for c in calls)  # the window forwards happen


@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "vicinity"])
def test_idle_forward_exactly_with_smoothing_and_a_cache(teacher, cache, smoothing):
    """Theirs follows a refresh that completed its block with one cached forward of that block
    (`IterationSmooth.forward`: the refresh, then the cached forward, in one iteration). d2f makes
    it with smoothing (it advances the anneal and rewrites soft embeddings) and skips it without
    (it would change nothing); without a cache there is no refresh. The idle forward commits
    nothing and counts as a forward (hook = stats); every other forward commits. Schedule worked
    from the trace (`_released_schedule`, `_cached_width`; vicinity with warmup 2)."""
    model, tok, counter = teacher
    opts = {"cache": cache, "smoothing": smoothing, "early_stop": False, "threshold_decay": 0.05}
    if cache == "vicinity":
        opts |= {**VICINITY, "warmup_steps": 2}
    warmup = 2 if cache == "vicinity" else 0
    idle, completed = smoothing and cache != "none", 0
    for q in QUESTIONS:
        calls, states, trace = _schedule_run(model, tok, counter, opts, question=q, new=48)
        L = calls[0][0]
        width = _cached_width(cache, L)
        want, idles = _released_schedule(states, L, L - 48, width, warmup, idle)
        assert calls == want
        commits = [int(e.committed.sum()) for e in trace]
        assert [i for i, c in enumerate(commits) if c == 0] == idles
        assert all(torch.equal(states[i], states[i + 1]) for i in idles)
        # the refreshes that complete their block: exactly those are followed by an idle forward
        mask_id = int(states[0][0])
        refreshes = [i for i, c in enumerate(calls) if c == (L, 0)]
        done = [i for i in refreshes if _complete(states[i + 1], states[i], mask_id)]
        assert idles == ([i + 1 for i in done] if idle else [])
        completed += len(done)
    assert bool(completed) == (cache != "none")  # the case happens in every cached setting


# ---- iteration smoothing ----


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "vicinity"])
def test_smoothing_without_weight_is_the_annealed_threshold_decoder(teacher, monkeypatch, cache):
    """cont_weight 0: the inputs are the plain embeddings, so smoothing is the threshold decoder
    with the threshold max(1 - 0.02 it, 0.9) at the row's forward `it` (0-based), its idle
    forwards included: with a cache, a refresh that completes its block is followed by one cached
    forward that commits nothing. Reference: the plain decoder (no idle forward) with its rule's
    threshold replaced per call, `it` = the hook's forwards so far + the idle forwards the rule
    adds (one after each refresh, a call into an empty cache, that commits every mask left)."""
    model, tok, counter = teacher
    opts = {"cache": cache, "threshold": 0.9}
    smooth = {**opts, "smoothing": True, "cont_weight": 0.0}
    real_select = dinfer.select
    idle = [0]

    def annealed_select(logits, blk, o, mask_id, threshold=None):
        assert threshold is None  # the plain decoder
        it = counter.calls - 1 + idle[0]
        x0, chosen = real_select(logits, blk, o, mask_id, max(1 - 0.02 * it, 0.9))
        if calls[-1][1] == 0 and bool((chosen == (blk == mask_id)).all()):
            idle[0] += 1  # a refresh that completes its block: one idle forward follows
        return x0, chosen

    idles = 0
    calls, handle = _record_calls(model)
    try:
        for q in QUESTIONS:  # alone: the hook counts this row's forwards
            got = _run(model, counter, [q], _cfg(8, 48, **smooth), tokenizer=tok)
            plain = _run(model, counter, [q], _cfg(8, 48, **opts), tokenizer=tok)
            idle[0] = 0
            with monkeypatch.context() as m:
                m.setattr(dinfer, "select", annealed_select)
                want = _run(model, counter, [q], _cfg(8, 48, **opts), tokenizer=tok)
            assert got.tokens == want.tokens
            assert got.stats.forwards == want.stats.forwards + idle[0]
            assert want.stats.forwards > plain.stats.forwards  # the anneal is not a no-op here
            idles += idle[0]
    finally:
        handle.remove()
    assert (idles > 0) == (cache != "none")  # without a cache there is no refresh


@pytest.mark.parametrize("cache", ["none", "prefix", "vicinity"])
def test_smoothing_feeds_the_soft_embeddings_of_the_last_forward(teacher, cache):
    """The inputs of forward t + 1, on the columns forward t covered, are E[x_t] plus, at
    positions still masked after forward t, w_t * softmax(logits_t) @ E with w_t = min(0.15 +
    0.02 t, 0.3); the first forward gets E[x] (E[mask] on masks). Checked on every pair's shared
    columns (read from the position ids: one row, no padding): without a cache every pair; with
    prefix [s, L) and the vicinity window [s - 3, e + 5) also the idle forward after a refresh
    that completed its block, whose soft embeddings of the masks after the block the next
    block's refresh reads."""
    model, tok, counter = teacher
    seen = []

    def hook(module, args, kwargs, output):
        start = int(kwargs["position_ids"][0, 0])
        seen.append((start, kwargs["inputs_embeds"][0].clone(), output.logits[0].clone()))

    opts = {**VICINITY, "warmup_steps": 0} if cache == "vicinity" else {"cache": cache}
    cfg = _cfg(8, 48, smoothing=True, early_stop=False, threshold=0.99, **opts)
    (ids,) = encode_prompts(QUESTIONS[:1], tok, family_of(model), cfg)
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        out = _run(model, counter, [ids], cfg, record=True)
    finally:
        handle.remove()
    E = model.get_input_embeddings().weight
    mask_id = family_of(model).mask_token_id
    prompt = torch.tensor(ids)
    xs = [torch.cat([prompt, torch.full((48,), mask_id)])]
    xs += [torch.cat([prompt, e.answer[0]]) for e in out.trace]
    assert torch.equal(seen[0][1], E[xs[0]])
    checked, idle_masks = set(), 0
    for t in range(len(seen) - 1):
        (a, _, logits), (b, emb, _) = seen[t], seen[t + 1]
        lo, hi = max(a, b), min(a + len(logits), b + len(emb))  # the columns both covered
        if lo >= hi:
            continue
        x = xs[t + 1][lo:hi]
        soft = logits[lo - a : hi - a].softmax(-1) @ E
        w = min(0.15 + 0.02 * t, 0.3)
        want = torch.where((x == mask_id)[:, None], E[x] + w * soft, E[x])
        assert torch.allclose(emb[lo - b : hi - b], want, atol=1e-6), t
        checked.add((len(logits), len(emb)))
        if not bool(out.trace[t].committed.any()):  # an idle forward
            idle_masks += int((x == mask_id).sum())
    L = len(xs[0])
    # with a cache, a refresh is always followed by a cached forward (the idle one if it completed
    # the block); without, every forward is full
    assert ((L, L) in checked) == (cache == "none")
    if cache == "vicinity":  # refresh -> window and window -> window (its after_look masks too)
        assert any(n == L and m <= 16 for n, m in checked), checked
        assert any(n <= 16 for n, _ in checked), checked
    assert (idle_masks > 0) == (cache != "none")  # idle soft embeddings read by the next forward


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


def test_idle_forward_needs_a_cache():
    """The idle forward is a cached forward: asking for it without a cache is an error."""
    with pytest.raises(ValueError, match="idle forward"):
        start_block(None, None, None, None, 0, 4, "none", None, None, None, idle=True)
