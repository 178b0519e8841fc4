"""Fast-dLLM v2 hierarchical decoding: a slow reference, `cache_only`, batching, forwards, options.

Tiny random models are made confident (lm_head scaled, as in tests/test_decoding.py, more) so that
thresholds and parallel commits really happen; an end-token bias makes rows stop at different
steps. The reference below is written from the authors' pseudo-code (docs/decoding.md), not from
the decoder: one row at a time, the whole sequence recomputed under the block-causal mask at every
step, Python lists for the tokens.
"""

import pytest
import torch

from d2f.decoding import DecodeConfig, FastDLLMv2Options, generate
from d2f.decoding.config import parse_options
from d2f.family import family_of
from d2f.mask import block_causal_mask, block_ids, position_ids, to_additive
from d2f.models import load_model
from tests.decode_helpers import Counter, random_prompts

THRESHOLDS = (0.3, 0.5, 0.9)
SHARPEN = 40.0  # x12 (tests/test_decoding.py) is too flat for 2-token sub-blocks to commit both


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from d2f.tiny import write_tiny_checkpoint

    made = {}
    for fam, bias in (("llada", 0.0), ("dream", 2.0)):  # chosen so that some rows end early
        model, _ = load_model(write_tiny_checkpoint(tmp_path_factory.mktemp(fam), fam))
        with torch.no_grad():
            model.lm_head.weight.mul_(SHARPEN)
            end = family_of(model).end_token_ids[0]
            model.lm_head.weight[end] += bias * model.lm_head.weight.std()
        made[fam] = model
    return made


def _cfg(bs=4, sbs=2, thr=0.6, n=16, **kw):
    return DecodeConfig(
        strategy="fast_dllm_v2",
        block_size=bs,
        max_new_tokens=n,
        options={"sub_block_size": sbs, "threshold": thr},
        **kw,
    )


@torch.no_grad()
def _reference(model, prompt, bs, sbs, thr, n):
    """(tokens cut before the first end, model calls) of one row, recomputing everything.

    Per block: shifted family -> first token = argmax of the logits that predict it; per
    sub-block, while it has masks: commit the masked positions with probability > thr, and the
    most probable one, among that sub-block's masked positions (the mask id never predicted).
    """
    fam = family_of(model)
    mask = fam.mask_token_id
    x = list(prompt) + [mask] * n
    P, calls = len(prompt), 0

    def probs(upto):  # (upto, V) aligned predictions of columns [0, upto)
        nonlocal calls
        calls += 1
        t = torch.tensor([x[:upto]])
        valid = torch.ones_like(t, dtype=torch.bool)
        ids = block_ids(valid, torch.tensor([P]), bs)
        logits = model(
            input_ids=t,
            attention_mask=to_additive(block_causal_mask(ids)),
            position_ids=position_ids(valid),
        ).logits.float()
        logits = fam.align_logits(logits)[0]
        logits[:, mask] = float("-inf")
        return logits.softmax(-1)

    def answer():
        a = x[P:]
        cut = next((i for i, t in enumerate(a) if t in fam.end_token_ids), None)
        return a if cut is None else a[:cut], cut is not None and mask not in a[:cut]

    for k in range(n // bs):
        start, end = P + k * bs, P + (k + 1) * bs
        if fam.shift_logits:
            x[start] = int(probs(start + 1)[start].argmax())
        for j in range(bs // sbs):
            cols = range(start + j * sbs, start + (j + 1) * sbs)
            while any(x[c] == mask for c in cols) and not answer()[1]:
                p = probs(end)
                conf = {c: float(p[c].max()) for c in cols if x[c] == mask}
                best = max(conf, key=lambda c: (conf[c], -c))  # first maximum
                for c in conf:
                    if conf[c] > thr or c == best:
                        x[c] = int(p[c].argmax())
        if answer()[1]:
            break
    return answer()[0], calls


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("bs,sbs", [(4, 2), (8, 4), (4, 4)])
def test_equals_full_recompute_reference(models, fam, bs, sbs):
    """Exact block cache => the same tokens as recomputing the block-causal sequence each step."""
    model = models[fam]
    prompts = random_prompts()
    parallel = ended = 0
    for thr in THRESHOLDS:
        out = generate(model, prompts, _cfg(bs, sbs, thr, n=24))
        for p, got, row in zip(prompts, out.tokens, out.stats.rows, strict=True):
            want, calls = _reference(model, p, bs, sbs, thr, 24)
            assert got == want, (thr, p)
            parallel += row.tokens_with_end > calls
            ended += row.hit_end
    assert parallel > 0, "no row committed more than one token per step: test too weak"
    assert ended > 0, "no row hit an end token: the stop rule is not exercised"


@pytest.mark.parametrize("thr", THRESHOLDS)
def test_sub_block_equal_to_block_is_cache_only_on_llada(models, thr):
    """sub_block_size = block_size on a non-shifted family: `cache_only`'s tokens (same strict
    threshold, same fallback), and exactly one caching forward more per block left behind, plus
    v2's separate prefill (`cache_only` processes the prompt in its first step's call)."""
    model = models["llada"]
    v2_cfg = _cfg(bs=4, sbs=4, thr=thr, n=16)
    co_cfg = DecodeConfig(strategy="cache_only", block_size=4, max_new_tokens=16, tau_conf=thr)
    parallel = 0
    for p in random_prompts((5, 9, 3, 7)):
        v2, co = generate(model, [p], v2_cfg), generate(model, [p], co_cfg)
        assert v2.tokens == co.tokens
        row = v2.stats.rows[0]
        blocks_left_behind = (row.tokens_with_end - 1) // 4 if row.hit_end else 16 // 4 - 1
        assert v2.stats.forwards == co.stats.forwards + blocks_left_behind + 1
        parallel += row.tokens_with_end > co.stats.forwards
    if thr < 0.9:
        assert parallel > 0, "no parallel commit: the threshold is not exercised"


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_sub_blocks_decode_in_order(models, fam):
    """Each step commits >= 1 token, all inside one sub-block; a sub-block starts only when the
    one before it is complete; Dream's block starts with its one forward-free AR token."""
    model = models[fam]
    out = generate(model, random_prompts((6,)), _cfg(bs=8, sbs=2, thr=0.3, n=24), record=True)
    mask = family_of(model).mask_token_id
    seen = set()
    for e in out.trace:
        cols = e.committed[0].nonzero()[:, 0].tolist()
        assert cols, "a step committed nothing"
        assert len({c // 2 for c in cols}) == 1, f"step {e.step} spans sub-blocks: {cols}"
        earlier = range(cols[0] // 2 * 2)
        assert all(int(e.answer[0, c]) != mask for c in earlier), "a sub-block started early"
        assert not seen & set(cols), "a position was committed twice"
        seen |= set(cols)
    if family_of(model).shift_logits:
        first = [e for e in out.trace if int(e.committed[0].sum()) == 1 and e.committed[0, 0]]
        assert first, "Dream's first token was not committed alone"
    assert max(int(e.committed[0].sum()) for e in out.trace) >= 2, "no parallel commit"


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_batch_equals_alone_and_forwards_counted(models, fam):
    model = models[fam]
    counter = Counter(model)
    try:
        prompts = random_prompts((5, 9, 3, 12))
        for thr in (0.3, 0.9):
            cfg = _cfg(bs=4, sbs=2, thr=thr, n=24)
            counter.calls = 0
            out = generate(model, prompts, cfg)
            assert counter.calls == out.stats.forwards  # one batched call per step, not per row
            alone = [generate(model, [p], cfg) for p in prompts]
            assert out.tokens == [a.tokens[0] for a in alone]
            for row, a in zip(out.stats.rows, alone, strict=True):
                assert row.forwards >= a.stats.forwards  # block-synchronous rows may wait
            if fam == "dream":  # the end bias makes rows stop: they leave the batch
                fw = [r.forwards for r in out.stats.rows]
                ended = [i for i, r in enumerate(out.stats.rows) if r.hit_end]
                assert ended and min(fw[i] for i in ended) < max(fw)
    finally:
        counter.handle.remove()


def test_options_validated_before_any_forward(models):
    model = models["llada"]
    assert DecodeConfig(strategy="fast_dllm_v2").options == FastDLLMv2Options(8, 0.9, False)
    got = parse_options("fast_dllm_v2", ["sub_block_size=2", "threshold=0.5", "use_block_cache=1"])
    assert got == {"sub_block_size": 2, "threshold": 0.5, "use_block_cache": True}
    for opts, err, match in [
        ({"sub_block_size": 0}, ValueError, "sub_block_size must be > 0"),
        ({"sub_block_size": True}, TypeError, "sub_block_size must be an int"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\]"),
        ({"threshold": float("nan")}, ValueError, r"threshold must be in \[0, 1\]"),
        ({"small_block_size": 8}, ValueError, "unknown fast_dllm_v2 options"),
        ({"use_block_cache": "yes"}, TypeError, "use_block_cache must be True or False"),
    ]:
        with pytest.raises(err, match=match):
            DecodeConfig(strategy="fast_dllm_v2", block_size=4, options=opts)
    counter = Counter(model)
    try:
        with pytest.raises(ValueError, match="sub_block_size=3 must divide block_size=4"):
            generate(model, random_prompts(), _cfg(bs=4, sbs=3))
        assert counter.calls == 0
    finally:
        counter.handle.remove()


def _lengths(model):
    """Input lengths of every model call (a forward pre-hook)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["input_ids"].shape[1])

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_block_cache_with_one_sub_block_is_exact(models, fam):
    """With one sub-block per block, a stale-cache step feeds the whole block: every key is
    fresh, so use_block_cache changes nothing (the stale keys of the slot must be left out)."""
    model = models[fam]
    prompts = random_prompts((5, 9, 3))
    for thr in (0.3, 0.9):
        exact = generate(model, prompts, _cfg(bs=4, sbs=4, thr=thr, n=24))
        cfg = DecodeConfig(
            strategy="fast_dllm_v2",
            block_size=4,
            max_new_tokens=24,
            options={"sub_block_size": 4, "threshold": thr, "use_block_cache": True},
        )
        cached = generate(model, prompts, cfg)
        assert cached.tokens == exact.tokens
        assert cached.stats.forwards == exact.stats.forwards


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_block_cache_batch_equals_alone(models, fam):
    """Rows refresh the block cache on their own (a sub-block whose first token is undecoded):
    a ragged batch mixes refreshing and stale rows in one call and still gives each row its
    alone tokens; sub-block-only calls (the saving) really happen."""
    model = models[fam]
    prompts = random_prompts((5, 9, 3, 12))
    seen, handle = _lengths(model)
    try:
        for thr in (0.3, 0.9):
            cfg = DecodeConfig(
                strategy="fast_dllm_v2",
                block_size=8,
                max_new_tokens=24,
                options={"sub_block_size": 2, "threshold": thr, "use_block_cache": True},
            )
            out = generate(model, prompts, cfg)
            assert out.tokens == [generate(model, [p], cfg).tokens[0] for p in prompts]
    finally:
        handle.remove()
    assert 2 in seen, "no sub-block-only forward: the stale block cache was never used"


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_stale_step_sees_the_released_keys(models, fam):
    """Logits of one block-cache step against the cache API used directly: a stale row's
    sub-block attends [prefix | the old block KV outside the sub-block | its own fresh KV]; a row
    that refreshes in the same call sees only the fresh block; the returned block KV keeps the old
    columns of a stale row and takes every fresh column of a refreshing one."""
    from transformers import DynamicCache

    from d2f.decoding.common import Batch, Recorder, forward
    from d2f.decoding.fast_dllm_v2 import _block_forward, _stale_forward

    model = models[fam]
    mask, pad = family_of(model).mask_token_id, family_of(model).pad_token_id
    bs, sbs = 4, 2
    batch = Batch.create([[11, 12, 13, 14, 15], [20, 21, 22]], bs, mask, pad, "cpu")  # ragged
    P = batch.prompt_len
    start, end, s0, s1 = P, P + bs, P + sbs, P + bs  # sub-block 1 of block 0
    ids = block_ids(batch.valid, torch.full((2,), P), bs)
    rec = Recorder(2, bs, "cpu")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        forward(model, rec, batch, block_causal_mask(ids[:, :P]), 0, P, cache)
        prefix = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        batch.x[:, start:end] = torch.tensor([mask, mask, 42, mask])  # state A
        _, old = _block_forward(model, rec, batch, ids, start, end, cache)
        old = [(k.clone(), v.clone()) for k, v in old]
        batch.x[:, start:end] = torch.tensor([40, 41, 42, mask])  # B: sub-block 0 decoded since
        fresh_logits, fresh = _block_forward(model, rec, batch, ids, start, end, cache)
        fresh = [(k.clone(), v.clone()) for k, v in fresh]

        def released(b):  # row b's sub-block over [prefix | old KV of sub-block 0 | itself]
            ref = DynamicCache(config=model.config)
            for i, ((pk, pv), (ok, ov)) in enumerate(zip(prefix, old, strict=True)):
                ref.update(
                    torch.cat([pk[b : b + 1], ok[b : b + 1, :, :sbs]], -2),
                    torch.cat([pv[b : b + 1], ov[b : b + 1, :, :sbs]], -2),
                    i,
                )
            keys = torch.cat([batch.valid[b, :P], torch.ones(2 * sbs, dtype=torch.bool)])
            logits = model(
                input_ids=batch.x[b : b + 1, s0:s1],
                position_ids=batch.pos[b : b + 1, s0:s1],
                attention_mask=to_additive(keys.expand(1, sbs, -1)),
                cache=ref,
                use_cache=True,
            ).logits
            return logits, [layer.keys[0, :, -sbs:] for layer in ref.layers]

        stale = torch.tensor([False, False])
        logits, lo, kv = _stale_forward(model, rec, batch, ids, start, s0, s1, stale, cache, old)
        assert lo == s0 and cache.get_seq_length() == P
        for b in (0, 1):
            torch.testing.assert_close(logits[b : b + 1], released(b)[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(logits, fresh_logits[:, sbs:], atol=1e-3), "stale == fresh"
        mixed = torch.tensor([False, True])
        logits, lo, kv = _stale_forward(model, rec, batch, ids, start, s0, s1, mixed, cache, old)
        assert lo == start
        want, want_kv = released(0)
        torch.testing.assert_close(logits[:1, s0 - lo :], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1], fresh_logits[1], atol=1e-4, rtol=1e-4)
        for (k, _), (ok, _), (fk, _), wk in zip(kv, old, fresh, want_kv, strict=True):
            torch.testing.assert_close(k[0, :, :sbs], ok[0, :, :sbs])  # stale row: old kept
            torch.testing.assert_close(k[0, :, sbs:], wk, atol=1e-4, rtol=1e-4)  # ... and its own
            torch.testing.assert_close(k[1], fk[1], atol=1e-4, rtol=1e-4)  # refreshed row
