"""The decoders: the fast D2F pipeline against the slow reference, batching, the baselines.

Tiny random models are made confident (lm_head scaled) so that thresholds, parallel commits and
several blocks in flight really happen; an end-token bias makes rows stop at different steps.
"""

import dataclasses

import pytest
import torch

from d2f.decoding import DecodeConfig, generate
from d2f.decoding.config import KV_CACHES
from d2f.family import family_of
from tests.decode_helpers import Counter, confident_models, random_prompts

SETTINGS = [  # (tau_add, tau_act, tau_conf)
    (0.1, 0.95, 0.9),
    (0.5, 0.5, 0.5),
    (1.0, 0.95, 0.3),  # tau_add = 1: one block at a time
    (0.25, 0.75, 0.6),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return confident_models(tmp_path_factory)


@pytest.mark.parametrize("kv", KV_CACHES)
@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("bs", [4, 8])
def test_pipeline_equals_reference(models, fam, bs, kv):
    """Identical tokens AND identical step counts at temperature 0, batch 1 and a ragged batch 3,
    over every KV cache kind."""
    model, _ = models[fam]
    prompts = random_prompts()
    parallel_steps = ended = 0
    for tau_add, tau_act, tau_conf in SETTINGS:
        cfg = DecodeConfig(
            block_size=bs,
            max_new_tokens=24,
            tau_add=tau_add,
            tau_act=tau_act,
            tau_conf=tau_conf,
            kv_cache=kv,
        )
        ref = generate(model, prompts, cfg, strategy="reference", kv_cache="dynamic")
        fast = generate(model, prompts, cfg)
        assert fast.tokens == ref.tokens, (tau_add, tau_act, tau_conf)
        # one forward per step and no separate prefill: the reference's count (one full
        # recompute per step), where a prefill call would make it one more per row
        assert [r.forwards for r in fast.stats.rows] == [r.forwards for r in ref.stats.rows]
        for p, want in zip(prompts, ref.tokens, strict=True):
            assert generate(model, [p], cfg).tokens[0] == want
        parallel_steps += sum(r.tokens_with_end > r.forwards for r in fast.stats.rows)
        ended += sum(r.hit_end for r in fast.stats.rows)
    assert parallel_steps > 0, "no setting decoded more than one token per forward: test too weak"
    assert ended > 0, "no row hit an end token: the stop rule is not exercised"


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_pipelining_really_overlaps_blocks(models, fam):
    model, _ = models[fam]
    cfg = DecodeConfig(block_size=4, max_new_tokens=24, tau_add=0.25, tau_act=0.75, tau_conf=0.6)
    out = generate(model, random_prompts((6,)), cfg, record=True)
    in_flight = [int(((e.block_state == 1) | (e.block_state == 2)).sum()) for e in out.trace]
    live = [int((e.block_state > 0).sum(1).max()) for e in out.trace]
    assert max(live) >= 2 and max(in_flight) >= 2
    committed = torch.zeros_like(out.trace[-1].committed[0])
    for e in out.trace:
        assert e.committed[0].any(), "a D2F step committed nothing"
        assert not (committed & e.committed[0]).any(), "a position was committed twice"
        committed |= e.committed[0]
    decoded = out.trace[-1].answer[0] != family_of(model).mask_token_id
    assert torch.equal(committed, decoded)


def test_cache_only_is_tau_add_one(models):
    model, _ = models["llada"]
    cfg = DecodeConfig(block_size=4, max_new_tokens=16, tau_conf=0.5)
    a = generate(model, random_prompts(), cfg, strategy="cache_only")
    b = generate(model, random_prompts(), cfg, tau_add=1.0)
    assert a.tokens == b.tokens and a.stats.forwards == b.stats.forwards


def test_forward_count_and_finished_rows_stop(models):
    model, _ = models["llada"]
    counter = Counter(model)
    cfg = DecodeConfig(block_size=4, max_new_tokens=24, tau_add=0.1, tau_act=0.95, tau_conf=0.9)
    counter.reset()
    out = generate(model, random_prompts(), cfg)
    assert counter.calls == out.stats.forwards
    fw = [r.forwards for r in out.stats.rows]
    assert out.stats.rows[2].hit_end and fw[2] < max(fw), "an ended row kept costing forwards"
    assert len(out.tokens[2]) == out.stats.rows[2].tokens < 24
    assert family_of(model).end_token_ids[0] not in out.tokens[2]


@pytest.mark.parametrize("kv", KV_CACHES)
@pytest.mark.parametrize("strategy", ["d2f", "cache_only"])
@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_no_separate_prefill_call(models, fam, strategy, kv):
    """The prompt is processed in the first step's call (prompt + first block, the authors' first
    call), so a row costs one forward per step: exactly the full-recompute reference's count,
    computed row by row with no cache (the old separate prefill made it one more). Counted by a
    forward hook; the first call is P + block_size columns wide and no call is the prompt alone."""
    from d2f.decoding.reference import reference_decode_row

    model, _ = models[fam]
    family = family_of(model)
    counter = Counter(model)
    cfg = DecodeConfig(
        strategy=strategy, block_size=4, max_new_tokens=16, tau_add=0.25, tau_act=0.75, kv_cache=kv
    )
    run_cfg = dataclasses.replace(cfg, tau_add=1.0) if strategy == "cache_only" else cfg
    prompts = random_prompts((5, 9, 3, 7))
    try:
        for p in prompts:
            answer, steps = reference_decode_row(model, p, run_cfg, family)
            counter.reset()
            out = generate(model, [p], cfg, record=True)
            assert counter.calls == steps == len(out.trace) == out.stats.forwards
            assert counter.shapes[0] == (1, len(p) + 4), counter.shapes
            assert all(w != len(p) for _, w in counter.shapes), "a prompt-only call"
        counter.reset()
        out = generate(model, prompts, cfg)
        assert counter.shapes[0] == (4, 9 + 4)  # ragged: the longest prompt + the first block
        assert out.stats.prefill_s > 0  # the time up to the end of that first call
    finally:
        counter.handle.remove()


@pytest.mark.parametrize("kv", KV_CACHES)
def test_one_host_sync_per_step(models, monkeypatch, kv):
    model, _ = models["llada"]
    cfg = DecodeConfig(
        block_size=4, max_new_tokens=24, tau_add=0.25, tau_act=0.75, tau_conf=0.6, kv_cache=kv
    )
    prompts = random_prompts()
    generate(model, prompts, cfg)  # warm up
    count = {"n": 0}
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            count["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    from d2f.decoding.common import Recorder
    from d2f.decoding.pipeline import d2f_decode

    rec = Recorder(len(prompts), cfg.gen_length, "cpu")
    d2f_decode(model, prompts, cfg, family_of(model), rec)
    monkeypatch.undo()
    assert 0 < count["n"] <= rec.step + 1, (count["n"], rec.step)


@pytest.mark.parametrize(
    "strategy, kv",
    [(s, "dynamic") for s in ("d2f", "cache_only", "vanilla", "fast_dllm")]
    + [(s, "static") for s in ("d2f", "cache_only", "fast_dllm")],
)
@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_batch_equals_alone(models, fam, strategy, kv):
    model, _ = models[fam]
    cfg = DecodeConfig(
        strategy=strategy,
        block_size=4,
        max_new_tokens=16,
        tau_add=0.25,
        tau_act=0.75,
        tau_conf=0.6,
        kv_cache=kv,
    )
    prompts = random_prompts()
    out = generate(model, prompts, cfg)
    assert out.tokens == [generate(model, [p], cfg).tokens[0] for p in prompts]


def test_vanilla_steps(models):
    model, _ = models["llada"]
    counter = Counter(model)
    out = generate(
        model, random_prompts(), DecodeConfig(strategy="vanilla", block_size=4, max_new_tokens=16)
    )
    assert out.stats.forwards == 16 and counter.calls == 16  # one token per step, full length
    out = generate(
        model,
        random_prompts(),
        DecodeConfig(strategy="vanilla", block_size=4, max_new_tokens=16, steps_per_block=2),
        record=True,
    )
    assert out.stats.forwards == 8
    assert all(int(e.committed.sum(1).min()) == 2 for e in out.trace)


def test_fast_dllm_commits_above_threshold(models):
    model, _ = models["dream"]
    low = generate(
        model,
        random_prompts(),
        DecodeConfig(strategy="fast_dllm", block_size=8, max_new_tokens=16, tau_conf=0.15),
    )
    high = generate(
        model,
        random_prompts(),
        DecodeConfig(strategy="fast_dllm", block_size=8, max_new_tokens=16, tau_conf=1.0),
    )
    assert high.stats.forwards == 16  # nothing passes tau_conf = 1: one token per step
    assert low.stats.forwards < high.stats.forwards


@pytest.mark.parametrize("kv", KV_CACHES)
def test_ar_matches_naive_greedy(models, kv):
    """AR with KV cache and batching == argmax over a full causal recompute, one row at a time."""
    model, tok = models["ar"]
    prompts = random_prompts((4, 7))
    cfg = DecodeConfig(strategy="ar", block_size=4, max_new_tokens=12, kv_cache=kv)
    out = generate(model, prompts, cfg)
    ends = family_of(model).end_token_ids
    for p, got in zip(prompts, out.tokens, strict=True):
        x = list(p)
        for _ in range(12):
            with torch.no_grad():
                nxt = int(model(torch.tensor([x])).logits[0, -1].argmax())
            if nxt in ends:
                break
            x.append(nxt)
        assert got == x[len(p) :]


@pytest.mark.parametrize("strategy", ["d2f", "reference", "vanilla", "fast_dllm"])
def test_sampling_seeded(models, strategy):
    """`seed` alone fixes the samples: the global torch RNG (moved between calls) plays no part."""
    model, _ = models["llada"]
    cfg = DecodeConfig(
        strategy=strategy,
        block_size=4,
        max_new_tokens=16,
        temperature=1.0,
        top_p=0.9,
        top_k=20,
        seed=1,
    )
    torch.manual_seed(0)
    a = generate(model, random_prompts(), cfg)
    torch.manual_seed(1)
    b = generate(model, random_prompts(), cfg)
    c = generate(model, random_prompts(), cfg, seed=2)
    assert a.tokens == b.tokens and a.tokens != c.tokens
