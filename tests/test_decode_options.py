"""Per-strategy options: one small dataclass per strategy, typed from text, checked by name."""

import dataclasses
from typing import Literal

import pytest

from d2f.decoding.config import STRATEGY_OPTIONS, DecodeConfig, parse_options


@dataclasses.dataclass(frozen=True)
class _Opts:
    cache: Literal["none", "prefix", "dual"] = "prefix"
    factor: float = 1.0
    early_stop: bool = False
    refresh: int | None = None


@pytest.fixture
def vanilla_has_options(monkeypatch):
    monkeypatch.setitem(STRATEGY_OPTIONS, "vanilla", _Opts)


def test_options_default_dict_and_instance(vanilla_has_options):
    assert DecodeConfig(strategy="vanilla").options == _Opts()
    assert DecodeConfig(strategy="vanilla", options={"cache": "dual"}).options == _Opts("dual")
    assert DecodeConfig(strategy="vanilla", options=_Opts(factor=2.0)).options.factor == 2.0
    with pytest.raises(ValueError, match=r"unknown vanilla options \['cahce'\]; known: "):
        DecodeConfig(strategy="vanilla", options={"cahce": "dual"})
    with pytest.raises(TypeError, match="must be a dict or _Opts"):
        DecodeConfig(strategy="vanilla", options="cache=dual")


def test_strategy_without_options_refuses_them():
    assert DecodeConfig(strategy="d2f").options is None
    with pytest.raises(ValueError, match="strategy 'd2f' takes no options"):
        DecodeConfig(strategy="d2f", options={"cache": "dual"})


def test_parse_options_types_each_value(vanilla_has_options):
    got = parse_options("vanilla", ["cache=dual", "factor=1.5", "early_stop=true", "refresh=None"])
    assert got == {"cache": "dual", "factor": 1.5, "early_stop": True, "refresh": None}
    assert parse_options("vanilla", ["refresh=3"]) == {"refresh": 3}
    for bad, match in [
        ("cache=triple", "one of"),
        ("factor=x", "must be float"),
        ("early_stop=maybe", "true or false"),
        ("nosuch=1", "KEY=VALUE with KEY in"),
        ("cache", "KEY=VALUE"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_options("vanilla", [bad])
    with pytest.raises(ValueError, match="takes no options"):
        parse_options("d2f", ["cache=dual"])
