"""The original formats, checked independently of d2f's own key mapping and saver.

`tests/original_forward.py` runs each original architecture (LLaDA's OLMo-style blocks, Dream's
Qwen2 layout) in plain torch over the raw original-format weights; the model `load_model` returns
must give the same logits (Dream: through `Family.align_logits`, against Dream's own shift).
Adapters are read the way the authors' stack reads them: peft's target-module rule applied to the
original module names, LoRA folded into the original weights. Tokenizer configs must have the
field types transformers 4.49 (the authors' pin) reads.
"""

import json
import shutil
import time
import warnings

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file

from d2f.adapters import save_adapter
from d2f.family import edit_tokenizer_config, family_of, portable_tokenizer_config
from d2f.mask import to_additive
from d2f.models import load_model, load_tokenizer, read_config, save_model
from d2f.tiny import write_tiny_checkpoint
from tests.original_forward import (
    ORIGINAL_LOGITS,
    dream_predictions,
    merge_lora,
    read_original,
)

LLADA_MLP_REGEX = r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)"
LLADA_NAMES = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory):
    """Tiny checkpoint by name: "llada", "dream", or "llada_gqa" (LLaDA with n_kv_heads 2 of 4)."""

    def get(name: str):
        if name == "llada_gqa":
            path = tmp_path_factory.getbasetemp() / "tiny_llada_gqa"
            if not path.exists():
                write_tiny_checkpoint(path, "llada", seed=3, n_kv_heads=2)
            return path
        return tiny_dir(name)

    return get


def _masks(n: int) -> dict[str, torch.Tensor]:
    """Literal bool masks (2, n, n), True = may attend: every key; every key but row 1's first two
    (padding); block-causal with blocks of 4 (query i sees key j iff j // 4 <= i // 4)."""
    every = torch.ones(2, n, n, dtype=torch.bool)
    padded = every.clone()
    padded[1, :, :2] = False
    blocks = torch.arange(n) // 4
    block_causal = (blocks[None, :] <= blocks[:, None]).expand(2, n, n)
    return {"bidirectional": every, "padded": padded, "block_causal": block_causal}


def _model_predictions(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=to_additive(mask)).logits  # (B, L, V)
    return family_of(model).align_logits(logits)


def _original_predictions(family, config, weights, ids, mask):
    logits = ORIGINAL_LOGITS[family](config, weights, ids, mask)  # (B, L, V)
    return dream_predictions(logits) if family == "dream" else logits


@pytest.mark.parametrize("name", ["llada", "llada_gqa", "dream"])
def test_loaded_model_equals_the_original_architecture(checkpoint, name):
    path = checkpoint(name)
    family = "dream" if name == "dream" else "llada"
    config, weights = read_original(path)
    model, _ = load_model(path)
    torch.manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (2, 12))
    results = {}
    for kind, mask in _masks(12).items():
        want = _original_predictions(family, config, weights, ids, mask)
        got = _model_predictions(model, ids, mask)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=f"{name} {kind}")
        results[kind] = want
    # the masks matter (the comparison above can fail for a wrong mask rule)
    assert (results["block_causal"] - results["bidirectional"]).abs().max() > 1e-3


def test_dream_predictions_are_shifted(checkpoint):
    """Dream's column i is predicted by row i - 1 (its generation code); LLaDA's is not shifted."""
    config, weights = read_original(checkpoint("dream"))
    ids = torch.randint(0, config["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(1))
    raw = ORIGINAL_LOGITS["dream"](config, weights, ids)
    model, _ = load_model(checkpoint("dream"))
    got = _model_predictions(model, ids, torch.ones(1, 9, 9, dtype=torch.bool))
    torch.testing.assert_close(got[:, 1:], raw[:, :-1], atol=2e-5, rtol=1e-5)
    assert (got[:, 1:] - raw[:, 1:]).abs().max() > 1e-3
    llada, _ = load_model(checkpoint("llada"))
    assert not family_of(llada).shift_logits


def _peft_rule(adapter_dir):
    """The authors' stack's choice of modules: peft's rule on the adapter's `target_modules`."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    config = LoraConfig(target_modules=cfg["target_modules"])
    return lambda name: bool(check_target_module_exists(config, name))


def _original_modules(path):
    return {k.removesuffix(".weight") for k in load_file(path / "model.safetensors")}


def _lora_modules(adapter_dir):
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_saved_adapter_reads_the_original_way(tiny_dir, tmp_path, family):
    """A d2f-saved LoRA on attention + MLP: peft on the original module names wraps exactly the
    modules the file holds weights for, and folding them in gives d2f's logits."""
    from peft import get_peft_model

    base_dir = tiny_dir(family)
    base, _ = load_model(base_dir)
    torch.manual_seed(2)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=HF_NAMES, init_lora_weights=False)
    )
    out = save_adapter(peft_model, tmp_path / "ad")
    targeted = _peft_rule(out)
    trained = _lora_modules(out)
    assert len(trained) == 7 * 2  # 7 modules x 2 layers
    assert {m for m in _original_modules(base_dir) if targeted(m)} == trained
    if family == "llada":
        assert "model.transformer.ff_out" not in trained and not targeted(
            "model.transformer.ff_out"
        )
        assert {m.rsplit(".", 1)[1] for m in trained} == set(LLADA_NAMES)
    config, weights = read_original(base_dir)
    adapted = merge_lora(weights, out, targeted)
    ids = torch.randint(
        0, config["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3)
    )
    mask = _masks(10)["block_causal"]
    want = _original_predictions(family, config, adapted, ids, mask)
    torch.testing.assert_close(
        _model_predictions(peft_model, ids, mask), want, atol=2e-5, rtol=1e-5
    )
    loaded, _ = load_model(base_dir, adapter=out)
    torch.testing.assert_close(_model_predictions(loaded, ids, mask), want, atol=2e-5, rtol=1e-5)
    plain = _original_predictions(family, config, weights, ids, mask)
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the model


def test_adapter_on_some_layers_names_exactly_those(tiny_dir, tmp_path):
    """Only layer 1 adapted: neither the leaf list nor the per-layer regex is exact, so the full
    module names are written, and peft's rule on the original names picks exactly them."""
    from peft import get_peft_model

    base, _ = load_model(tiny_dir("llada"))
    config = LoraConfig(r=4, target_modules=HF_NAMES, layers_to_transform=[1])
    out = save_adapter(get_peft_model(base, config), tmp_path / "ad")
    trained = _lora_modules(out)
    assert {m.split(".")[3] for m in trained} == {"1"} and len(trained) == 7
    assert {m for m in _original_modules(tiny_dir("llada")) if _peft_rule(out)(m)} == trained
    loaded, _ = load_model(tiny_dir("llada"), adapter=out)
    assert len([n for n, _ in loaded.named_parameters() if "lora_A" in n]) == 7


def _write_llada_adapter(base_dir, out, target_modules, modules=LLADA_NAMES, r=4):
    """An adapter in LLaDA's own naming, as the authors' trainer writes it."""
    raw = read_config(base_dir)
    d, m = raw["d_model"], raw["mlp_hidden_size"]
    dims = {"ff_proj": (d, m), "up_proj": (d, m), "ff_out": (m, d)}  # (in, out)
    gen = torch.Generator().manual_seed(4)
    state = {}
    for i in range(raw["n_layers"]):
        for name in modules:
            d_in, d_out = dims.get(name, (d, d))
            pre = f"base_model.model.model.transformer.blocks.{i}.{name}"
            state[f"{pre}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.3
            state[f"{pre}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.3
    out.mkdir(parents=True)
    save_file(state, str(out / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "base_model_name_or_path": str(base_dir),
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    "targets",
    [LLADA_NAMES, LLADA_MLP_REGEX, HF_NAMES],
    ids=["llada_names", "llada_regex", "transformers_names"],
)
def test_adapter_with_llada_mlp_names_loads(tiny_dir, tmp_path, targets):
    """LLaDA's own MLP names (list: `ff_out` also names the output head, which has no LoRA
    weights; or the regex) load as the original model reads them; so do the transformers names
    older d2f versions wrote."""
    base_dir = tiny_dir("llada")
    ad = _write_llada_adapter(base_dir, tmp_path / "ad", targets)
    model, _ = load_model(base_dir, adapter=ad)
    config, weights = read_original(base_dir)
    ids = torch.randint(
        0, config["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5)
    )
    mask = _masks(10)["bidirectional"]
    every = merge_lora(weights, ad, lambda name: True)
    want = _original_predictions("llada", config, every, ids, mask)
    torch.testing.assert_close(_model_predictions(model, ids, mask), want, atol=2e-5, rtol=1e-5)
    if targets != HF_NAMES:  # the authors' stack reads these the same way
        rule = merge_lora(weights, ad, _peft_rule(ad))
        assert all(torch.equal(rule[k], every[k]) for k in every)
    saved = save_adapter(model, tmp_path / "again")  # and d2f writes them back exactly
    assert {m for m in _original_modules(base_dir) if _peft_rule(saved)(m)} == _lora_modules(ad)


def test_adapter_weights_its_targets_do_not_name_are_refused(tiny_dir, tmp_path):
    """peft would drop them silently (the authors' stack did, for 8 of 28 tensors)."""
    base_dir = tiny_dir("llada")
    ad = _write_llada_adapter(base_dir, tmp_path / "ad", ["q_proj", "k_proj", "v_proj", "attn_out"])
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules .* do not name 6"):
        load_model(base_dir, adapter=ad)


def _assert_readable_by_transformers_4(cfg: dict) -> None:
    """The fields transformers 4.49's tokenizer loader reads, with the types it needs."""
    assert not isinstance(cfg.get("extra_special_tokens"), list), "4.49 calls .keys() on it"
    extra = cfg.get("additional_special_tokens", [])
    assert isinstance(extra, list) and all(isinstance(t, str) for t in extra)
    assert cfg.get("tokenizer_class") in {"PreTrainedTokenizerFast", "Qwen2Tokenizer"}
    assert isinstance(cfg.get("chat_template", ""), str)


def _same_tokenizer(a, b) -> None:
    text = "<|start_header_id|>user<|end_header_id|> how many apples are 12 + 3 ? <|eot_id|>"
    assert type(a) is type(b) and a.get_vocab() == b.get_vocab()
    assert a.special_tokens_map == b.special_tokens_map
    assert list(a.extra_special_tokens) == list(b.extra_special_tokens)
    assert a(text)["input_ids"] == b(text)["input_ids"] and a.chat_template == b.chat_template


@pytest.mark.parametrize("family", ["llada", "ar", "dream"])
def test_written_tokenizer_config_reads_in_transformers_4(tiny_dir, tmp_path, family):
    model, tok = load_model(tiny_dir(family))
    out = save_model(model, tmp_path / "saved", tokenizer=tok)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    _assert_readable_by_transformers_4(cfg)
    if family != "dream":
        want = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        assert cfg["additional_special_tokens"] == want
    _same_tokenizer(load_tokenizer(out), tok)  # and transformers 5 reads it back the same


@pytest.mark.parametrize("asset", ["teacher", "ar"])
def test_shipped_tokenizer_rewrite_loads_identically(tmp_path, asset):
    """The shipped tiny-world tokenizers (written in transformers 5's form), rewritten by
    `portable_tokenizer_config`, load identically in transformers 5 and in 4.49's form."""
    from importlib.resources import files

    src = files("d2f.tinyworld") / "assets" / asset
    shutil.copytree(src, tmp_path / asset)
    edit_tokenizer_config(tmp_path / asset, portable_tokenizer_config)
    _assert_readable_by_transformers_4(
        json.loads((tmp_path / asset / "tokenizer_config.json").read_text())
    )
    _same_tokenizer(load_tokenizer(tmp_path / asset), load_tokenizer(src))


def test_dream_checkpoint_has_a_generation_config(tiny_dir):
    """Dream's own `DreamModel.from_pretrained` always reads generation_config.json."""
    from transformers import GenerationConfig

    raw = read_config(tiny_dir("dream"))
    gen = GenerationConfig.from_pretrained(tiny_dir("dream"))
    assert (gen.mask_token_id, gen.eos_token_id) == (raw["mask_token_id"], raw["eos_token_id"])
    assert not (tiny_dir("llada") / "generation_config.json").exists()


# ---------------------------------------------------------------- broken and stale checkpoints


@pytest.mark.parametrize("first,second", [(None, "20KB"), ("20KB", None)])
def test_save_over_an_older_checkpoint_removes_its_weights(tiny_dir, tmp_path, first, second):
    a, _ = load_model(tiny_dir("llada"))
    b, _ = load_model(write_tiny_checkpoint(tmp_path / "b", "llada", seed=7))
    out = tmp_path / "reused"
    save_model(a, out, **({"max_shard_size": first} if first else {}))
    save_model(b, out, **({"max_shard_size": second} if second else {}))
    names = {p.name for p in out.iterdir() if "safetensors" in p.name}
    assert ("model.safetensors" in names) == (second is None)
    assert ("model.safetensors.index.json" in names) == (second is not None)
    again, _ = load_model(out)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in b.state_dict().items())


def _copy(tiny_dir, tmp_path, family="llada"):
    return shutil.copytree(tiny_dir(family), tmp_path / "m")


def test_truncated_weights_name_the_file(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) // 2, 20, 0):
        weights.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"m/model.safetensors: not a readable safetensors"):
            load_model(path)


def test_truncated_or_missing_shard_names_it(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir("llada"))
    out = save_model(model, tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(out.glob("model-*-of-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors"):
        load_model(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"names shard '{shard.name}', which is missing"):
        load_model(out)


def test_truncated_adapter_names_the_file(tiny_dir, tmp_path):
    ad = _write_llada_adapter(tiny_dir("llada"), tmp_path / "ad", LLADA_NAMES)
    weights = ad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors"):
        load_model(tiny_dir("llada"), adapter=ad)


def test_invalid_config_json_names_file_and_line(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    (path / "config.json").write_text('{\n  "model_type": "llada",\n  "d_model": 48,,\n}')
    with pytest.raises(ValueError, match=r"m/config.json: invalid JSON at line 3"):
        load_model(path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"m/config.json: expected a JSON object, got a JSON list"):
        load_model(path)


def test_invalid_adapter_and_tokenizer_json_name_the_file(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    ad = _write_llada_adapter(path, tmp_path / "ad", LLADA_NAMES)
    (ad / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(ValueError, match=r"ad/adapter_config.json: invalid JSON at line 1"):
        load_model(path, adapter=ad)
    (path / "tokenizer_config.json").write_text("{\n\n  oops")
    with pytest.raises(ValueError, match=r"m/tokenizer_config.json: invalid JSON at line 3"):
        load_tokenizer(path)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_missing_mask_token_id_names_file_and_field(tiny_dir, tmp_path, family):
    path = _copy(tiny_dir, tmp_path, family)
    raw = read_config(path)
    del raw["mask_token_id"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"m/config.json: missing field 'mask_token_id'"):
        load_model(path)


@pytest.mark.parametrize("name", ["AutoTokenizer", "LlamaForCausalLM", "no_such_thing.x", 7])
def test_untrusted_tokenizer_class(tiny_dir, tmp_path, name):
    """A non-tokenizer class is refused at once (AutoTokenizer recursed, a model class hung); a
    class transformers does not export (remote code) falls back to the family's stock class."""
    path = _copy(tiny_dir, tmp_path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = name
    cfg_path.write_text(json.dumps(cfg))
    start = time.perf_counter()
    if name == "no_such_thing.x":
        assert type(load_tokenizer(path)).__name__ == "TokenizersBackend"
    else:
        with pytest.raises(ValueError, match=r"tokenizer_config.json: field 'tokenizer_class'"):
            load_tokenizer(path)
    # a hang is what this guards against: generous, so a loaded CI machine does not fail it
    assert time.perf_counter() - start < 60


def test_relative_path_under_an_existing_directory_fails_fast(tmp_path, monkeypatch):
    """`nope/x` with a local `nope/` is a missing local directory, never a hub lookup."""
    (tmp_path / "nope").mkdir()
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"nope/x: no such directory \(a local path"):
        load_model("nope/x")
    assert time.perf_counter() - start < 0.5


# ---------------------------------------------------------------- quiet loads


def test_adapter_load_warns_only_for_another_base(tiny_dir, tmp_path, monkeypatch):
    """peft's "base_model_name_or_path was renamed" fires for the right base written as another
    path string (relative vs absolute): d2f keeps it only for another base."""
    base_dir = tiny_dir("llada")
    monkeypatch.chdir(base_dir.parent)
    attention = ["q_proj", "k_proj", "v_proj", "attn_out"]
    ad = _write_llada_adapter(base_dir.name, tmp_path / "ad", attention, modules=attention)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_model(base_dir, adapter=ad)  # the same base, absolute
    assert not [w for w in seen if "was renamed" in str(w.message)]
    other = shutil.copytree(base_dir, tmp_path / "other")
    with pytest.warns(UserWarning, match="was renamed"):
        load_model(other, adapter=ad)


def test_load_prints_no_progress_bar(tiny_dir, capfd):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    model, _ = load_model(tiny_dir("dream"), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == was
