"""Input and config checks of `generate`: prompts, lengths, bad values, warnings, family mismatch.

Every bad input fails with a clear message before any forward; tiny random checkpoints.
"""

import dataclasses

import pytest
import torch

from d2f.decoding import DecodeConfig, generate
from d2f.family import family_of
from d2f.models import load_model
from tests.decode_helpers import Counter, confident_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return confident_models(tmp_path_factory)


def test_string_prompts_and_chat_template(models):
    model, tok = models["llada"]
    seen = []
    out = generate(
        model,
        ["how many apples ?"],
        DecodeConfig(block_size=4, max_new_tokens=8),
        tokenizer=tok,
        on_step=seen.append,
    )
    assert isinstance(out.texts[0], str) and len(seen) == out.stats.rows[0].forwards
    from d2f.decoding import prepare_prompts

    ids = prepare_prompts(["how many apples ?"], tok, family_of(model), DecodeConfig(), 4096)[0]
    assert ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|start_header_id|>") in ids
    plain = prepare_prompts(
        ["how many apples ?"], tok, family_of(model), DecodeConfig(chat=False), 4096
    )
    assert tok.convert_tokens_to_ids("<|start_header_id|>") not in plain[0]


@pytest.mark.parametrize(
    "prompts,kwargs,match",
    [
        ([], {}, "non-empty list"),
        ([[]], {}, "prompt 0 is empty"),
        ([list(range(10, 60))], {"max_length": 40}, "prompt 0 has 50 tokens"),
        (["text"], {}, "pass tokenizer"),
        ([[10, 10**6]], {}, "token id 1000000 .position 1. is outside the vocabulary"),
        ([[1, -3, 4]], {}, "token id -3 .position 1. is outside the vocabulary"),
        ([[10, 11]], {"max_length": 10**6}, "max_length=1000000 is larger than the model's"),
        ([[10, 11]], {"max_length": 8}, "leaves no room for a prompt"),
    ],
)
def test_bad_input_fails_before_any_forward(models, prompts, kwargs, match):
    model, _ = models["llada"]
    counter = Counter(model)
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, DecodeConfig(block_size=4, max_new_tokens=8, **kwargs))
    assert counter.calls == 0


def test_bad_config_values():
    for kwargs, match in [
        ({"block_size": 0}, "block_size"),
        ({"tau_add": 1.5}, "tau_add"),
        ({"tau_conf": -0.1}, "tau_conf"),
        ({"strategy": "beam"}, "strategy"),
        ({"max_new_tokens": 2, "block_size": 4}, "max_new_tokens"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"max_length": 0}, "max_length must be > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            DecodeConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 4.0}, "block_size must be an int, got 4.0 .float."),
        ({"block_size": True}, "block_size must be an int, got True .bool."),
        ({"block_size": "4"}, "block_size must be an int, got '4' .str."),
        ({"max_new_tokens": 16.5}, "max_new_tokens must be an int or None"),
        ({"seed": 1.5}, "seed must be an int or None"),
        ({"temperature": "0.7"}, "temperature must be a number"),
        ({"tau_conf": True}, "tau_conf must be a number"),
        ({"truncate_prompt": "yes"}, "truncate_prompt must be True or False"),
        ({"chat": 1}, "chat must be True, False or None"),
    ],
)
def test_config_types_named(kwargs, match):
    with pytest.raises(TypeError, match=match):
        DecodeConfig(**kwargs)


def test_default_length_fits_the_context(models):
    """max_new_tokens=None: the most whole blocks that fit after the longest prompt, <= 512."""
    model, _ = models["llada"]
    prompts = [list(range(10, 40)), [10, 11]]  # longest: 30 tokens
    out = generate(model, prompts, DecodeConfig(block_size=8, max_length=100), record=True)
    assert out.trace[0].answer.shape[1] == 64  # 70 positions left -> 8 blocks of 8
    out = generate(model, [[10, 11]], DecodeConfig(block_size=8), record=True)
    assert out.trace[0].answer.shape[1] == 504  # the model's context: 512 - 2 = 510 -> 63 blocks
    from d2f.decoding import fit_to_context

    _, cfg = fit_to_context([[10, 11]], DecodeConfig(block_size=24), 4096)
    assert cfg.max_new_tokens == 504  # the paper's cap, 512, in whole blocks of 24
    with pytest.raises(ValueError, match="less than one block.*truncate_prompt=True"):
        generate(model, [list(range(10, 60))], DecodeConfig(block_size=8, max_length=54))
    cut = generate(model, [list(range(10, 60))], block_size=8, max_length=54, truncate_prompt=True)
    assert cut.stats.rows[0].forwards > 0  # the hint works: one block, the prompt's last 46


def test_impossible_length_hint_works(models):
    """A max_new_tokens that fills the context names a value that fits (truncate_prompt cannot
    help), and that value then works."""
    model, _ = models["llada"]
    cfg = DecodeConfig(block_size=8, max_new_tokens=128, max_length=128)
    for truncate in (False, True):
        with pytest.raises(ValueError, match="use max_new_tokens at most 120") as err:
            generate(model, [[10, 11]], cfg, truncate_prompt=truncate)
        assert "truncate_prompt" not in str(err.value)
    assert generate(model, [[10, 11]], cfg, max_new_tokens=120).stats.forwards > 0


def test_prompt_with_the_mask_id_warns(models):
    model, _ = models["llada"]
    mask = family_of(model).mask_token_id
    with pytest.warns(
        UserWarning, match=f"prompt 1 contains the mask token id {mask} at positions .2."
    ):
        generate(model, [[10, 11], [10, 11, mask]], DecodeConfig(block_size=4, max_new_tokens=8))


@pytest.mark.parametrize("strategy", ["d2f", "reference", "vanilla", "fast_dllm"])
def test_nan_weights_warn(tiny_dir, strategy):
    """NaN weights -> NaN logits -> token 0 (an end token) everywhere: an empty answer, which
    must not come silently."""
    model, _ = load_model(tiny_dir("llada"))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or infinite logits in [1-9]"):
        out = generate(
            model, [[10, 11]], DecodeConfig(strategy=strategy, block_size=4, max_new_tokens=8)
        )
    assert out.tokens == [[]]


@pytest.mark.parametrize("strategy", ["d2f", "reference", "fast_dllm"])
def test_decoders_run_in_inference_mode_and_finite_logits_do_not_warn(models, strategy):
    """Every model call of `generate` runs under `torch.inference_mode` (cheaper per op than
    no_grad), and a healthy model's decode counts no non-finite forward (no RuntimeWarning)."""
    import warnings

    model, _ = models["llada"]
    seen = []
    hook = model.register_forward_hook(lambda *a: seen.append(torch.is_inference_mode_enabled()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            cfg = DecodeConfig(strategy=strategy, block_size=4, max_new_tokens=8)
            out = generate(model, [[10, 11], [12]], cfg)
    finally:
        hook.remove()
    assert seen and all(seen) and len(seen) == out.stats.forwards
    assert not torch.is_inference_mode_enabled()


def test_no_future_or_deprecation_warning(models):
    """Every strategy runs without FutureWarning/DeprecationWarning (transformers 5.24 renamed
    the forward's `past_key_values` to `cache`)."""
    import warnings

    cfg = DecodeConfig(block_size=4, max_new_tokens=8)
    runs = [(models["llada"][0], s) for s in ("d2f", "vanilla", "fast_dllm", "reference")]
    runs.append((models["ar"][0], "ar"))
    for model, strategy in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            generate(model, [[10, 11, 12]], cfg, strategy=strategy)


def test_long_prompt_truncated_when_asked(models):
    model, _ = models["llada"]
    long = list(range(10, 60))
    out = generate(
        model,
        [long],
        DecodeConfig(block_size=4, max_new_tokens=8, max_length=40, truncate_prompt=True),
    )
    short = generate(model, [long[-32:]], DecodeConfig(block_size=4, max_new_tokens=8))
    assert out.tokens == short.tokens


def test_model_family_mismatch(models):
    ar, _ = models["ar"]
    with pytest.raises(ValueError, match="needs a dLLM"):
        generate(ar, [[10, 11]], DecodeConfig(block_size=4, max_new_tokens=8))
    llada, _ = models["llada"]
    with pytest.raises(ValueError, match="autoregressive model"):
        generate(llada, [[10, 11]], DecodeConfig(strategy="ar", block_size=4, max_new_tokens=8))
    no_mask = dataclasses.replace(family_of(llada), mask_token_id=None)
    old = llada.d2f_family
    llada.d2f_family = no_mask
    try:
        with pytest.raises(ValueError, match="no mask token"):
            generate(llada, [[10, 11]], DecodeConfig(block_size=4, max_new_tokens=8))
    finally:
        llada.d2f_family = old
