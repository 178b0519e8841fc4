"""Fast-dLLM v1 (`fast_dllm`): the released parallel rules, the three caches, batching, options.

Tiny random models are sharpened (lm_head scaled, as in tests/test_decoding.py) so that several
tokens pass the threshold in one step; the tests assert that parallel commits really happen.
"""

from pathlib import Path

import pytest
import torch

from d2f.decoding import DecodeConfig, generate
from d2f.decoding.config import KV_CACHES, parse_options
from d2f.decoding.fast_dllm import (
    FastDLLMOptions,
    confidence_dtype,
    factor_commit,
    factor_count,
    threshold_commit,
)
from d2f.family import family_of
from d2f.models import load_model
from tests.decode_helpers import Counter

NEG = float("-inf")


TEACHER = Path(__file__).resolve().parents[1] / "d2f" / "tinyworld" / "assets" / "teacher"


def _sharpen(model, end_bias: float) -> None:
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
        end = family_of(model).end_token_ids[0]
        model.lm_head.weight[end] += end_bias * model.lm_head.weight.std()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model, prompts) by name: "llada" is the shipped tiny-world teacher (trained, confident);
    "dream" a sharpened random Dream whose end bias makes some rows end early; ("llada", 1) and
    ("dream", 1) sharpened random one-layer models."""
    from d2f.tiny import write_tiny_checkpoint

    teacher, tok = load_model(TEACHER)
    made = {"llada": (teacher, [tok(t)["input_ids"] for t in ("12+7=", "3+45=9", "100-1=")])}
    for fam, layers_key, layers, bias in (
        ("dream", "num_hidden_layers", 2, 0.6),
        ("llada", "n_layers", 1, 0.0),
        ("dream", "num_hidden_layers", 1, 0.0),
    ):
        path = write_tiny_checkpoint(
            tmp_path_factory.mktemp(f"{fam}{layers}"), fam, **{layers_key: layers}
        )
        model, _ = load_model(path)
        _sharpen(model, bias)
        made[fam if layers == 2 else (fam, layers)] = (model, _prompts())
    return made


def _prompts(n_list=(5, 9, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 100, (n,), generator=g).tolist() for n in n_list]


def _cfg(bs=4, new=16, tau_conf=0.9, kv_cache="dynamic", **options):
    return DecodeConfig(
        strategy="fast_dllm",
        block_size=bs,
        max_new_tokens=new,
        tau_conf=tau_conf,
        options=options,
        kv_cache=kv_cache,
    )


def _parallel_steps(trace) -> int:
    """Steps in which some row committed more than one token."""
    return sum(int(e.committed.sum(1).max()) > 1 for e in trace)


# --- the parallel rules, table-driven -----------------------------------------------------------


def _upstream_factor_k(conf: list[float], factor: float) -> int:
    """The released per-row loop (get_transfer_index_dynamic), written out in plain Python."""
    n = len(conf)
    if n == 0:
        return 0
    c = sorted(conf, reverse=True)
    thr = [1 - factor / (m + 2) for m in range(n)]
    thr[0] = -1
    top_i = 0
    for top_i in range(n):
        if c[top_i] < thr[top_i]:
            break
    return top_i + 1 if top_i in (0, n - 1) else top_i


# factor 1: rank m (0-based) needs 1 - 1/(m + 2): [-1, 0.667, 0.75, 0.8, 0.833]
FACTOR_TABLE = [  # (masked confidences, sorted descending; factor; k)
    ([0.95, 0.9, 0.9, 0.9, 0.9], 1.0, 5),  # no failure: every mask
    ([0.9, 0.6, 0.5, 0.4, 0.3], 1.0, 1),  # failure at rank 1: only the top one
    ([0.9, 0.7, 0.7, 0.6, 0.5], 1.0, 2),  # failure at rank 2 (0.7 < 0.75)
    ([0.9, 0.9, 0.9, 0.79, 0.7], 1.0, 3),  # failure at rank 3 (0.79 < 0.8)
    ([0.9, 0.9, 0.9, 0.9, 0.5], 1.0, 5),  # failure at the LAST rank: still every mask (quirk)
    ([0.9, 0.1], 1.0, 2),  # n = 2: rank 1 is the last rank, so its failure commits both
    ([0.3, 0.2, 0.1], 1.0, 1),  # failure at rank 1 of 3
    ([0.05], 1.0, 1),  # n = 1: always one
    ([], 1.0, 0),  # nothing masked: nothing
    ([0.9, 0.34, 0.2, 0.1], 2.0, 2),  # factor 2: rank 1 needs 0.333 (passes), rank 2 0.5
    ([0.9, 0.3, 0.2, 0.1], 2.0, 1),  # factor 2: 0.3 < 0.333 fails at rank 1
    ([0.9, 0.75, 0.75], 1.0, 3),  # ties with the threshold pass (>=): 0.75 >= 0.75
]


@pytest.mark.parametrize("conf, factor, k", FACTOR_TABLE)
def test_factor_rule_table(conf, factor, k):
    assert _upstream_factor_k(conf, factor) == k  # the table itself agrees with the released loop
    W = 6  # rows padded with -inf past the n masked confidences
    padded = torch.tensor([[*conf, *([NEG] * (W - len(conf)))]], dtype=torch.float64)
    got = factor_count(padded, torch.tensor([len(conf)]), factor)
    assert got.tolist() == [k]
    # factor_commit: the k most confident masks, wherever they sit in the block
    perm = torch.randperm(W, generator=torch.Generator().manual_seed(len(conf)))
    masked = (torch.arange(W) < len(conf))[perm][None]
    chosen = factor_commit(padded[:, perm], masked, factor)
    assert int(chosen.sum()) == k and not bool((chosen & ~masked).any())
    if k:
        picked = padded[:, perm][chosen]
        assert float(picked.min()) >= sorted(conf, reverse=True)[k - 1]


def test_factor_rule_matches_the_released_loop_on_random_rows():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(0, 9, (1,), generator=g))
        factor = float(torch.rand(1, generator=g)) * 3 + 0.1
        conf = sorted((torch.rand(n, generator=g, dtype=torch.float64) ** 0.3).tolist())[::-1]
        row = torch.tensor([[*conf, *([NEG] * (8 - n))]], dtype=torch.float64)
        assert factor_count(row, torch.tensor([n]), factor).item() == _upstream_factor_k(
            conf, factor
        ), (conf, factor)


def test_threshold_rule_table():
    conf = torch.tensor(
        [
            [0.95, 0.9, 0.3, NEG],  # >= is inclusive: 0.9 commits with threshold 0.9
            [0.5, 0.7, 0.6, NEG],  # nothing passes: the single most confident (0.7)
            [0.8, 0.8, NEG, NEG],  # tie for the top: the first one (torch.argmax)
            [NEG, NEG, NEG, NEG],  # nothing masked: nothing
        ],
        dtype=torch.float64,
    )
    masked = conf > NEG
    got = threshold_commit(conf, masked, 0.9)
    want = [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert got.int().tolist() == want


def test_confidence_precision_is_upstreams(models):
    """LLaDA's confidences in float64, Dream's in the model's dtype; `precision` overrides."""
    llada, dream = family_of(models["llada"][0]), family_of(models["dream"][0])
    assert confidence_dtype("auto", llada, torch.bfloat16) == torch.float64
    assert confidence_dtype("auto", dream, torch.bfloat16) == torch.bfloat16
    assert confidence_dtype("float32", llada, torch.bfloat16) == torch.float32
    assert confidence_dtype("float64", dream, torch.bfloat16) == torch.float64
    assert confidence_dtype("model", llada, torch.bfloat16) == torch.bfloat16


# --- whole decodes ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_threshold_above_one_is_one_token_per_step_low_confidence(models, cache):
    """Nothing reaches threshold 1.5: one token per step, the most confident. LLaDA without a
    cache is then exactly `vanilla` low-confidence remasking with steps_per_block = block_size."""
    model, prompts = models["llada"]
    counter = Counter(model)
    out = generate(model, prompts, _cfg(threshold=1.5, cache=cache), record=True)
    counter.handle.remove()
    assert out.stats.forwards == counter.calls == 16  # 4 blocks x 4 steps, batched
    assert all(r.forwards == 16 for r in out.stats.rows)
    assert all(e.committed.sum(1).tolist() == [1, 1, 1] for e in out.trace)
    if cache == "none":
        vanilla = generate(
            model, prompts, DecodeConfig(strategy="vanilla", block_size=4, max_new_tokens=16)
        )
        assert out.tokens == vanilla.tokens


def test_dream_commits_the_block_start_token_first(models):
    """Dream as released: the block-start forward commits column s of the block, and only it."""
    model, prompts = models["dream"]
    out = generate(model, prompts, _cfg(threshold=0.0, cache="prefix"), record=True)
    # threshold 0: the block start commits one token, the next forward all the rest
    assert len(out.trace) == 8 and out.stats.forwards == 8
    for k in range(4):
        start, rest = out.trace[2 * k].committed, out.trace[2 * k + 1].committed
        assert start[:, 4 * k].all() and int(start.sum()) == 3  # one per row, at column s
        assert rest[:, 4 * k + 1 : 4 * k + 4].all() and int(rest.sum()) == 9


@pytest.mark.parametrize("kv", KV_CACHES)
@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("rule", ["threshold", "factor"])
def test_caches_agree_on_a_one_layer_model(models, fam, rule, kv):
    """With one layer the cached K/V are projections of the token embeddings: the prefix KV
    (and dual's suffix of masks) is then exact, so the three caches give the same tokens and the
    same forwards. With more layers they legitimately differ (stale KV), see docs/decoding.md.
    Over both KV cache kinds (the static dual cache keeps its keys in column order)."""
    model, prompts = models[fam, 1]
    runs = {
        c: generate(
            model, prompts, _cfg(rule=rule, threshold=0.3, cache=c, kv_cache=kv), record=True
        )
        for c in ("none", "prefix", "dual")
    }
    assert runs["prefix"].tokens == runs["none"].tokens == runs["dual"].tokens
    rows = {c: [r.forwards for r in o.stats.rows] for c, o in runs.items()}
    assert rows["prefix"] == rows["none"] == rows["dual"]
    assert _parallel_steps(runs["dual"].trace) > 0


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_prefix_and_dual_agree_on_a_single_block(models, fam):
    """One block: dual's suffix is empty and prefix forwards the same block over the same prefix
    KV, so the two caches are the same computation even with two layers."""
    model, prompts = models[fam]
    prefix = generate(model, prompts, _cfg(bs=8, new=8, threshold=0.5, cache="prefix"))
    dual = generate(model, prompts, _cfg(bs=8, new=8, threshold=0.5, cache="dual"))
    assert prefix.tokens == dual.tokens
    assert prefix.stats.forwards == dual.stats.forwards


@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", ["threshold", "factor"])
def test_static_cache_equals_dynamic(models, fam, cache, rule):
    """Two layers (stale KV: not exact) and a ragged batch: the static buffer rewritten in place
    is the same computation as the dynamic cache's concatenations."""
    model, prompts = models[fam]
    dyn = generate(model, prompts, _cfg(rule=rule, threshold=0.6, cache=cache))
    sta = generate(model, prompts, _cfg(rule=rule, threshold=0.6, cache=cache, kv_cache="static"))
    assert sta.tokens == dyn.tokens
    assert [r.forwards for r in sta.stats.rows] == [r.forwards for r in dyn.stats.rows]


@pytest.mark.parametrize("kv", KV_CACHES)
@pytest.mark.parametrize("fam", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("rule", ["threshold", "factor"])
def test_batch_equals_alone(models, fam, cache, rule, kv):
    """Ragged batch of 3 == each prompt alone (tokens AND per-row forwards: a row whose block is
    complete leaves the step's sub-batch); the hook counts every batched call once."""
    model, prompts = models[fam]
    cfg = _cfg(rule=rule, threshold=0.6, cache=cache, kv_cache=kv)
    counter = Counter(model)
    out = generate(model, prompts, cfg, record=True)
    assert counter.calls == out.stats.forwards
    alone = [generate(model, [p], cfg) for p in prompts]
    counter.handle.remove()
    assert out.tokens == [a.tokens[0] for a in alone]
    assert [r.forwards for r in out.stats.rows] == [a.stats.rows[0].forwards for a in alone]
    # the batch costs the slowest row's steps per block, not the sum of the rows' steps
    assert out.stats.forwards < sum(a.stats.forwards for a in alone)
    assert _parallel_steps(out.trace) > 0


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_early_stop_is_an_option_and_changes_no_token(models, cache):
    """Upstream decodes every block; early_stop drops a row at the first block start after its
    end token. Blocks are decoded left to right, so the kept tokens are the same."""
    model, prompts = models["llada"]
    full = generate(model, prompts, _cfg(new=24, cache=cache))
    stop = generate(model, prompts, _cfg(new=24, cache=cache, early_stop=True))
    assert stop.tokens == full.tokens
    assert any(r.hit_end for r in full.stats.rows)
    every = [r.forwards for r in full.stats.rows]
    early = [r.forwards for r in stop.stats.rows]
    assert all(e <= f for e, f in zip(early, every, strict=True)) and sum(early) < sum(every)


def test_threshold_none_uses_tau_conf(models):
    model, prompts = models["llada"]
    by_option = generate(model, prompts, _cfg(tau_conf=0.9, threshold=0.4))
    by_tau = generate(model, prompts, _cfg(tau_conf=0.4))
    default = generate(model, prompts, _cfg(tau_conf=0.9))
    assert by_option.tokens == by_tau.tokens
    assert by_option.stats.forwards == by_tau.stats.forwards < default.stats.forwards


def test_every_block_is_completed(models):
    """The refinement loop runs until the block has no mask (the paper-time loop), whatever
    steps_per_block says: no mask id is left in any answer."""
    model, prompts = models["llada"]
    mask = family_of(model).mask_token_id
    out = generate(model, prompts, _cfg(cache="dual"), record=True, steps_per_block=1)
    assert not bool((out.trace[-1].answer == mask).any())


# --- options ------------------------------------------------------------------------------------


def test_options_defaults_and_parsing():
    assert _cfg().options == FastDLLMOptions()
    assert FastDLLMOptions() == FastDLLMOptions(
        rule="threshold", threshold=None, factor=1.0, cache="dual", early_stop=False
    )
    parsed = parse_options(
        "fast_dllm", ["rule=factor", "factor=2", "cache=none", "early_stop=true", "threshold=1.5"]
    )
    assert parsed == {
        "rule": "factor",
        "factor": 2.0,
        "cache": "none",
        "early_stop": True,
        "threshold": 1.5,
    }
    assert parse_options("fast_dllm", ["threshold=none"]) == {"threshold": None}


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"rule": "top_k"}, ValueError, "option rule must be one of"),
        ({"cache": "full"}, ValueError, "option cache must be one of"),
        ({"threshold": -0.1}, ValueError, "option threshold must be finite and >= 0"),
        ({"threshold": float("nan")}, ValueError, "option threshold must be finite"),
        ({"factor": 0}, ValueError, "factor must be > 0"),
        ({"factor": "1"}, TypeError, "option factor must be a number"),
        ({"early_stop": 1}, TypeError, "early_stop must be True or False"),
        ({"precision": "bf16"}, ValueError, "option precision must be one of"),
        ({"steps": 8}, ValueError, r"unknown fast_dllm options \['steps'\]"),
    ],
)
def test_bad_options_fail_naming_the_option(options, error, match):
    with pytest.raises(error, match=match):
        _cfg(**options)


def test_bad_option_text_fails():
    with pytest.raises(ValueError, match="cache must be one of"):
        parse_options("fast_dllm", ["cache=dual2"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_options("fast_dllm", ["dual"])


# --- random remasking ---------------------------------------------------------------------------


def test_random_remasking_follows_the_seeded_draws(models):
    """remasking="random" (upstream LLaDA's): conf is a uniform draw per block position, so the
    committed positions of one LLaDA row with no cache are those of the threshold rule applied
    to the seed's draws, replayed here (one (1, bs) float64 draw per forward, temperature 0)."""
    model, prompts = models["llada"]
    cfg = _cfg(threshold=0.7, cache="none")
    for seed in (0, 1):
        out = generate(model, prompts[:1], cfg, record=True, remasking="random", seed=seed)
        g = torch.Generator().manual_seed(seed)
        answer = [True] * 16  # still masked
        for e in out.trace:
            k = next(i for i, m in enumerate(answer) if m) // 4  # the block being decoded
            u = torch.rand((1, 4), generator=g, dtype=torch.float64)[0]
            cols = [4 * k + i for i in range(4) if answer[4 * k + i]]
            best = max(cols, key=lambda c: float(u[c - 4 * k]))
            want = sorted({c for c in cols if u[c - 4 * k] >= 0.7} | {best})
            assert e.committed[0].nonzero()[:, 0].tolist() == want
            for c in want:
                answer[c] = False
        assert not any(answer)


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_random_remasking_reproducible_from_the_seed(models, fam):
    model, prompts = models[fam]
    cfg = _cfg(threshold=0.9, cache="dual")
    runs = [generate(model, prompts, cfg, remasking="random", seed=s) for s in (3, 3, 4)]
    assert runs[0].tokens == runs[1].tokens
    low = generate(model, prompts, cfg)
    assert runs[0].tokens != low.tokens or runs[2].tokens != low.tokens  # the draws matter
