"""Jacobi decoding (`jacobi`): greedy AR's tokens exactly, in no more forwards than `ar`.

Three causal models: the tiny random AR of `d2f.tiny`, the same made confident (output layer x12)
with an end-token bias so that rows end at different steps, and the miniature world's shipped AR
baseline (its answers repeat n-grams: rejection recycling pays there).
"""

import math

import pytest
import torch

import d2f.decoding.jacobi as jacobi
from d2f.decoding import DecodeConfig, JacobiOptions, generate
from d2f.family import family_of
from d2f.models import load_model
from d2f.tinyworld.pretrain import ASSETS
from d2f.tinyworld.task import records
from tests.decode_helpers import Counter, random_prompts

CAP = 24  # max_new_tokens: not a multiple of chunk 5 (the last chunk is cut to the room left)
SETTINGS = [  # jacobi options: chunk sizes, 1 / 2 / 3 blocks (provisional chunks spawned early
    # enough to happen on random models), recycling on / off, two draft seeds
    {"chunk": n, "blocks": k, "pool_size": pool, "spawn_ratio": 0.5, "draft_seed": seed}
    for n in (2, 4, 8)
    for k in (1, 2)
    for pool, seed in ((0, 0), (4, 1))
] + [{}, {"chunk": 5, "blocks": 3, "spawn_ratio": 0.25}]


@pytest.fixture(scope="module")
def models(tiny_dir):
    plain, _ = load_model(tiny_dir("ar"))
    sharp, _ = load_model(tiny_dir("ar"))
    with torch.no_grad():
        sharp.lm_head.weight.mul_(12.0)
        end = family_of(sharp).end_token_ids[0]
        sharp.lm_head.weight[end] += 0.3 * sharp.lm_head.weight.std() * 12  # some rows end early
    shipped, tok = load_model(ASSETS / "ar")
    return {"random": plain, "confident": sharp, "shipped": shipped, "tokenizer": tok}


def _questions(tok, n=12):
    """Token ids of held-out questions, chat template applied as `generate` does for strings."""
    from d2f.decoding import encode_prompts

    cfg = DecodeConfig(strategy="ar", block_size=4, max_new_tokens=CAP)
    family = family_of(load_model(ASSETS / "ar")[0])
    return encode_prompts([r["question"] for r in records("add2", "test", n)], tok, family, cfg)


def _run(model, prompts, counter, **kw):
    counter.reset()
    out = generate(model, prompts, DecodeConfig(block_size=4, max_new_tokens=CAP), **kw)
    return out, counter.calls


def _streamed_once(out) -> bool:
    """The step trace commits every answer position up to and including the first end token
    exactly once, and nothing after it (an end token inside an accepted prefix cuts it)."""
    times = torch.zeros(len(out.tokens), CAP, dtype=torch.long)
    for event in out.trace:
        times[event.rows] += event.committed[:, :CAP].long()
    return all(
        times[i, : row.tokens_with_end].eq(1).all() and times[i, row.tokens_with_end :].eq(0).all()
        for i, row in enumerate(out.stats.rows)
    )


@pytest.mark.parametrize("which", ["random", "confident"])
def test_tokens_equal_ar_every_setting(models, which):
    """Ragged batch of 3: `ar`'s tokens for every setting; the hook-counted forwards of the call
    and every row's forwards never exceed `ar`'s."""
    model = models[which]
    counter = Counter(model)
    prompts = random_prompts()
    ar, ar_calls = _run(model, prompts, counter, strategy="ar")
    ended = sum(r.hit_end for r in ar.stats.rows)
    assert which == "random" or 0 < ended < len(prompts)  # rows really end at different steps
    for opts in SETTINGS:
        out, calls = _run(model, prompts, counter, strategy="jacobi", options=opts, record=True)
        assert out.tokens == ar.tokens, opts
        assert _streamed_once(out), opts
        assert calls == out.stats.forwards <= ar_calls, opts
        for mine, theirs in zip(out.stats.rows, ar.stats.rows, strict=True):
            assert mine.forwards <= theirs.forwards, opts
    counter.handle.remove()


def test_shipped_ar_same_answers_in_fewer_forwards(models):
    """The shipped AR (confident, repetitive answers): `ar`'s tokens, each streamed once (here end
    tokens also fall inside accepted prefixes); strictly fewer forwards with the authors'
    settings, never more with any."""
    model = models["shipped"]
    counter = Counter(model)
    prompts = _questions(models["tokenizer"])
    ar, ar_calls = _run(model, prompts, counter, strategy="ar")
    assert all(r.hit_end for r in ar.stats.rows)
    for opts in ({}, {"blocks": 1}, {"pool_size": 0}, {"chunk": 8, "spawn_ratio": 0.5}):
        out, calls = _run(model, prompts, counter, strategy="jacobi", options=opts, record=True)
        assert out.tokens == ar.tokens, opts
        assert _streamed_once(out), opts
        assert calls <= ar_calls, opts
        assert all(
            m.forwards <= t.forwards for m, t in zip(out.stats.rows, ar.stats.rows, strict=True)
        )
        if opts == {}:
            assert calls < ar_calls
            assert sum(r.forwards for r in out.stats.rows) < sum(r.forwards for r in ar.stats.rows)
    counter.handle.remove()


@pytest.mark.parametrize("which", ["confident", "shipped"])
def test_batched_equals_alone(models, which):
    """Each row decodes what it decodes alone: the same tokens and the same forwards."""
    model = models[which]
    prompts = random_prompts() if which == "confident" else _questions(models["tokenizer"], 4)
    for opts in ({}, {"chunk": 4, "blocks": 2, "spawn_ratio": 0.5}):
        cfg = DecodeConfig(strategy="jacobi", block_size=4, max_new_tokens=CAP, options=opts)
        batched = generate(model, prompts, cfg)
        for i, p in enumerate(prompts):
            alone = generate(model, [p], cfg)
            assert alone.tokens[0] == batched.tokens[i], (opts, i)
            assert alone.stats.rows[0].forwards == batched.stats.rows[i].forwards, (opts, i)


@pytest.mark.parametrize("n", [4, 8])
def test_oracle_draft_accepts_a_whole_chunk_per_forward(models, n, monkeypatch):
    """Guesses that ARE greedy's continuation: the prefill's draft is the first n tokens and every
    forward accepts its whole chunk, so a row of CAP tokens takes 1 + ceil(CAP / n) forwards."""
    model = models["random"]
    prompts = random_prompts((4, 7))
    ar = generate(model, prompts, DecodeConfig(strategy="ar", block_size=4, max_new_tokens=CAP))
    assert all(len(t) == CAP for t in ar.tokens)  # no end token: every chunk is whole
    truth = {tuple(p): t for p, t in zip(prompts, ar.tokens, strict=True)}

    def oracle(row, k):  # the prefill guesses tokens 1..k, a later chunk the ones after its first
        at = len(row.answer) + 1 if row.drafts else 0
        return truth[tuple(row.prompt)][at : at + k]

    monkeypatch.setattr(jacobi.Row, "guesses", oracle)
    cfg = DecodeConfig(strategy="jacobi", block_size=4, max_new_tokens=CAP)
    out = generate(model, prompts, cfg, options={"chunk": n, "blocks": 1, "pool_size": 0})
    assert out.tokens == ar.tokens
    assert [r.forwards for r in out.stats.rows] == [1 + math.ceil(CAP / n)] * 2


def test_cache_is_a_fresh_prefill_of_the_committed_tokens(models, monkeypatch):
    """After every forward, each row's cached KV (right-aligned) equals a causal prefill of its
    prompt and committed tokens, and the columns left of it are marked invalid."""
    model = models["confident"]
    seen = []
    keep, advance = jacobi.keep_accepted, jacobi.advance

    def recording_advance(row, *args):
        out = advance(row, *args)
        seen.append((row.prompt + row.answer, row.done))
        return out

    def recording_keep(*args):
        kv, valid = keep(*args)
        states = [s for s in seen[-len(valid) :]]
        for b, (ids, _) in enumerate(states):
            n = int(valid[b].sum())
            assert n == len(ids) and valid[b, -n:].all()
            ref = model(torch.tensor([ids]), use_cache=True).past_key_values
            for (k, v), layer in zip(kv, ref.layers, strict=True):
                torch.testing.assert_close(k[b : b + 1, :, -n:], layer.keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(v[b : b + 1, :, -n:], layer.values, atol=1e-5, rtol=1e-4)
        checks.append(len(valid))
        return kv, valid

    checks = []
    monkeypatch.setattr(jacobi, "advance", recording_advance)
    monkeypatch.setattr(jacobi, "keep_accepted", recording_keep)
    opts = {"chunk": 4, "blocks": 2, "pool_size": 4, "spawn_ratio": 0.5}
    generate(
        model,
        random_prompts((4, 7)),
        DecodeConfig(strategy="jacobi", block_size=4, max_new_tokens=CAP, options=opts),
    )
    assert len(checks) > 3


def test_accepted_and_recycle_by_hand():
    # draft [c, 1, 2, 3]; greedy predicts 1 after c, 2 after 1, then 9: c, 1, 2 are verified
    assert jacobi.accepted([7, 1, 2, 3], [1, 2, 9, 4]) == 3
    assert jacobi.accepted([7, 5, 2, 3], [1, 2, 9, 4]) == 1  # the known token alone
    assert jacobi.accepted([7, 1, 2, 3], [1, 2, 3, 0]) == 4
    pool = [[4, 8, 6], [1, 5, 8, 2, 9], [5, 8, 3], [8, 0]]  # oldest first; the newest is skipped
    # newest first: [5, 8, 3] -> [8, 3] + draft's [_, _, 7]; [1, 5, 8, 2, 9] -> [8, 2, 9]
    assert jacobi.recycle(pool, 8, [8, 1, 7]) == [[8, 3, 7], [8, 2, 9], [8, 6, 7]]
    assert jacobi.recycle([[8, 3], [0, 8]], 8, [8, 1]) == []  # one candidate: unused, as released


def test_refused_settings(models, tiny_dir):
    llada, _ = load_model(tiny_dir("llada"))
    with pytest.raises(ValueError, match="strategy 'jacobi' needs an autoregressive model"):
        generate(llada, [[10, 11]], DecodeConfig(strategy="jacobi", block_size=4, max_new_tokens=8))
    with pytest.raises(ValueError, match="use temperature 0"):
        generate(
            models["random"],
            [[10, 11]],
            DecodeConfig(strategy="jacobi", block_size=4, max_new_tokens=8, temperature=0.7),
        )
    with pytest.raises(ValueError, match="chunk >= 1"):
        JacobiOptions(chunk=0)
    with pytest.raises(ValueError, match="spawn_ratio"):
        JacobiOptions(spawn_ratio=0.0)
    with pytest.raises(ValueError, match="unknown jacobi options"):
        DecodeConfig(strategy="jacobi", options={"n": 4})
    assert JacobiOptions() == JacobiOptions(chunk=64, blocks=2, spawn_ratio=0.85, pool_size=4)
