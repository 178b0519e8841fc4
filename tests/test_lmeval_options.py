"""lm-eval model args `options.KEY=VALUE`: a strategy's own settings reach DecodeConfig.options."""

import pytest
from lm_eval.utils import simple_parse_args_string

from d2f.decoding.fast_dllm import FastDLLMOptions
from d2f.lmeval.lm import D2FLM, gather_options


def _lm(tiny_dir, args: str) -> D2FLM:
    """The model as lm-eval builds it from a --model_args string (values typed by lm-eval)."""
    return D2FLM(pretrained=str(tiny_dir("llada")), **simple_parse_args_string(args))


def test_options_model_args_reach_the_decode_config(tiny_dir):
    lm = _lm(
        tiny_dir,
        "strategy=fast_dllm,block_size=4,options.cache=none,options.rule=factor,"
        "options.factor=2,options.threshold=0.8,options.early_stop=True",
    )
    assert lm.decode.options == FastDLLMOptions(
        rule="factor", factor=2.0, threshold=0.8, cache="none", early_stop=True
    )
    assert lm.model_args["options"]["cache"] == "none"  # recorded with the run's settings


def test_typed_values_are_accepted():
    """lm-eval turns 0.8 / True / 2 into float / bool / int before the model sees them."""
    got = gather_options(
        {"strategy": "fast_dllm", "options.threshold": 0.8, "options.early_stop": False}
    )
    assert got == {"strategy": "fast_dllm", "options": {"threshold": 0.8, "early_stop": False}}
    assert gather_options({"strategy": "fast_dllm"}) == {"strategy": "fast_dllm"}


@pytest.mark.parametrize(
    "args, match",
    [
        ("strategy=fast_dllm,options.cache=full", "cache must be one of"),
        ("strategy=fast_dllm,options.steps=8", "expected KEY=VALUE with KEY in"),
        ("strategy=vanilla,options.cache=dual", "strategy 'vanilla' takes no options"),
        ("options.cache=dual", "strategy 'd2f' takes no options"),  # the default strategy
    ],
)
def test_bad_options_fail_at_construction(tiny_dir, args, match):
    with pytest.raises(ValueError, match=f"d2f model_args: .*{match}"):
        _lm(tiny_dir, args)


def test_none_text_comes_back():
    """ "none" is both a cache name and lm-eval's None: both options still parse."""
    got = gather_options(
        {"strategy": "fast_dllm", "options.cache": None, "options.threshold": None}
    )
    assert got["options"] == {"cache": "none", "threshold": None}
