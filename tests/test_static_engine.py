"""The static KV cache and the compiled D2F step (`d2f.decoding.kv`, `d2f.decoding.step`).

The equivalence of every decoder over both caches is in test_decoding.py / test_fast_dllm.py
(parametrized by `KV_CACHES`); here: the cache's own mechanics, the window buckets, the
config checks, and the compiled step's tokens against the eager decoder and the reference.
"""

import pytest
import torch

from d2f.decoding import DecodeConfig, generate
from d2f.decoding.kv import PositionedLayer, StaticKV, key_mask, make_cache
from d2f.decoding.step import bucket, max_padding, window_buckets
from d2f.family import family_of
from d2f.mask import block_causal_mask, block_ids, position_ids, to_additive
from d2f.models import load_model
from tests.decode_helpers import random_prompts


def _sharpened(path, fam):
    model, _ = load_model(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
        end = family_of(model).end_token_ids[0]
        model.lm_head.weight[end] += {"llada": 0.0, "dream": 0.2}[fam] * (
            model.lm_head.weight.std() * 12
        )
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from d2f.tiny import write_tiny_checkpoint

    return {
        fam: _sharpened(write_tiny_checkpoint(tmp_path_factory.mktemp(fam), fam), fam)
        for fam in ("llada", "dream")
    }


def test_window_buckets():
    # whole blocks, powers of two of them, and all of them
    assert window_buckets(8, 4) == [4, 8, 16, 32]
    assert window_buckets(5, 4) == [4, 8, 16, 20]
    assert window_buckets(1, 8) == [8]
    assert [bucket(w, [4, 8, 16, 32]) for w in (4, 8, 12, 16, 20, 32)] == [4, 8, 16, 16, 32, 32]
    # widths 4..32 step 4: the most padding is 20 -> 32
    assert max_padding([4, 8, 16, 32], 4) == 12
    assert max_padding([8], 8) == 0


def _forward(model, ids, blocks, pos, q_start, q_end, cache):
    mask = key_mask(block_causal_mask(blocks[:, :q_end], q_start, q_end), cache)
    with torch.no_grad():
        return model(
            input_ids=ids[:, q_start:q_end],
            attention_mask=to_additive(mask),
            position_ids=pos[:, q_start:q_end],
            cache=cache,
            use_cache=True,
        ).logits


def test_static_cache_pointer_and_compaction(models):
    """The pointer is the write position (crop moves it, the buffer stays); stale columns past it
    are overwritten by the next window and masked until then; finished rows are compacted into
    the buffer's first rows in place."""
    model = models["llada"]
    torch.manual_seed(0)
    P, BS = 6, 4
    L = P + 3 * BS
    ids = torch.randint(10, 100, (3, L))
    valid = torch.ones(3, L, dtype=torch.bool)
    valid[1, :2] = False
    blocks = block_ids(valid, torch.full((3,), P), BS)
    pos = position_ids(valid)
    full = _forward(model, ids, blocks, pos, 0, L, None)
    cache = make_cache(model, "static", L + 5)  # room past the sequence: masked columns
    assert isinstance(cache, StaticKV)
    _forward(model, ids, blocks, pos, 0, P + 2 * BS, cache)
    keys = cache.layers[0].keys
    ptr = keys.data_ptr()
    assert keys.shape[:3] == (3, keys.shape[1], L + 5)
    cache.crop(-BS)  # block 2 unfinished: drop it (a pointer move)
    assert int(cache.get_seq_length()) == P + BS
    win = _forward(model, ids, blocks, pos, P + BS, L, cache)
    torch.testing.assert_close(win, full[:, P + BS :], atol=1e-5, rtol=1e-5)
    before = cache.layers[0].keys[[2, 0]].clone()
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert cache.layers[0].keys.data_ptr() == ptr  # no new buffer
    torch.testing.assert_close(cache.layers[0].keys[:2], before, atol=0, rtol=0)
    cache.crop(-(2 * BS))
    win = _forward(model, ids[[2, 0]], blocks[[2, 0]], pos[[2, 0]], P + BS, L, cache)
    torch.testing.assert_close(win, full[[2, 0], P + BS :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_static_cache_allocated_before_the_first_call(models, fam, monkeypatch):
    """With `batch`, the static cache's buffers exist before any call, with the model's shape,
    dtype and device, marked as static addresses (what CUDA graphs need), so a compiled first
    step never allocates them; D2F's decoder asks for that (the buffer it uses is the one made
    up front: no layer is initialized inside a call)."""
    import d2f.decoding.pipeline as pipeline

    model = models[fam]
    cfg = model.config
    cache = make_cache(model, "static", 20, batch=3)
    layer = cache.layers[0]
    assert layer.is_initialized
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert layer.keys.shape == (3, cfg.num_key_value_heads, 20, head_dim)
    assert layer.values.dtype == next(model.parameters()).dtype
    assert layer.keys._dynamo_static_input_type == "unguarded"
    made = []

    def recording(*args, **kwargs):
        made.append(make_cache(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline, "make_cache", recording)
    seen = []
    update = PositionedLayer.update

    def checking(self, *args, **kwargs):
        seen.append(self.is_initialized)  # before the call's own (lazy) initialization
        return update(self, *args, **kwargs)

    monkeypatch.setattr(PositionedLayer, "update", checking)
    cfg = DecodeConfig(block_size=4, max_new_tokens=8)
    generate(model, random_prompts(), cfg, kv_cache="static")
    assert seen and all(seen)
    assert isinstance(made[0], StaticKV) and made[0].layers[0].keys.shape[0] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"compile": "default"}, "needs kv_cache='static'"),
        ({"compile": "eager", "kv_cache": "static", "strategy": "fast_dllm"}, "d2f and cache_only"),
        ({"kv_cache": "static", "strategy": "vanilla"}, "implemented for"),
        ({"kv_cache": "paged"}, "kv_cache must be one of"),
        ({"compile": "eager", "kv_cache": "static", "temperature": 0.5}, "greedy"),
    ],
)
def test_engine_options_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeConfig(block_size=4, max_new_tokens=8, **kwargs)


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_compiled_step_smoke_equals_reference(models, fam, monkeypatch):
    """compile='eager': the step traced by dynamo with fullgraph=True (any host sync in it, an
    `.item()`, a `.tolist()`, a tensor in an `if`, is an error), run without inductor: the
    reference's tokens and step counts, and every model call, the first (prompt + first block)
    included, made by a compiled graph (a backend that counts its graphs' runs). One row and two
    blocks keep it to a few graphs; the ragged batches are in the slow inductor test."""
    import d2f.decoding.step as step

    runs = []

    def counting(gm, example_inputs):
        def run(*args):
            runs.append(1)
            return gm(*args)

        return run

    compiled = torch.compile(step.d2f_step, backend=counting, fullgraph=True)
    monkeypatch.setitem(step._COMPILED, "eager", compiled)
    model = models[fam]
    cfg = DecodeConfig(block_size=4, max_new_tokens=8, tau_add=0.25, tau_act=0.75, tau_conf=0.6)
    prompts = random_prompts((5,))
    ref = generate(model, prompts, cfg, strategy="reference")
    out = generate(model, prompts, cfg, kv_cache="static", compile="eager")
    assert out.tokens == ref.tokens
    assert [r.forwards for r in out.stats.rows] == [r.forwards for r in ref.stats.rows]
    assert len(runs) == out.stats.forwards


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_inductor_step_equals_eager_without_recompiling(models, fam):
    """compile='default' (inductor): the eager decoder's tokens and step counts, both families,
    two threshold settings, a ragged batch; a second decode of the same shapes builds no graph."""
    from torch._dynamo.utils import counters

    model = models[fam]
    prompts = random_prompts()
    for tau_add, tau_act, tau_conf in [(0.25, 0.75, 0.6), (1.0, 0.95, 0.3)]:
        cfg = DecodeConfig(
            block_size=4, max_new_tokens=16, tau_add=tau_add, tau_act=tau_act, tau_conf=tau_conf
        )
        eager = generate(model, prompts, cfg)
        comp = generate(model, prompts, cfg, kv_cache="static", compile="default")
        assert comp.tokens == eager.tokens
        assert [r.forwards for r in comp.stats.rows] == [r.forwards for r in eager.stats.rows]
        graphs = counters["stats"]["unique_graphs"]
        again = generate(model, prompts, cfg, kv_cache="static", compile="default")
        assert again.tokens == eager.tokens
        assert counters["stats"]["unique_graphs"] == graphs, "a repeated decode recompiled"
