"""Loading, saving and adapters of both families in their original checkpoint formats."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2f.adapters import save_adapter
from d2f.family import family_of
from d2f.mask import block_ids, causal_mask, full_mask, to_additive
from d2f.models import load_model, read_config, save_model

LLADA_BLOCK_KEYS = {
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "ff_norm",
    "ff_proj",
    "up_proj",
    "ff_out",
}


def _ids(tok, n=11):
    return torch.tensor([tok(" ".join(["how many apples are 12 + 3 ?"] * 2))["input_ids"][:n]])


def _logits(model, ids, mask_bool=None):
    kwargs = {}
    if mask_bool is not None:
        kwargs["attention_mask"] = to_additive(mask_bool)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_original_format_on_disk(tiny_dir):
    llada = load_file(tiny_dir("llada") / "model.safetensors")
    assert "model.transformer.wte.weight" in llada and "model.transformer.ff_out.weight" in llada
    blocks = {k.split(".")[4] for k in llada if k.startswith("model.transformer.blocks.")}
    assert blocks == LLADA_BLOCK_KEYS
    assert read_config(tiny_dir("llada"))["model_type"] == "llada"
    dream = load_file(tiny_dir("dream") / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.bias" in dream and "lm_head.weight" in dream
    assert read_config(tiny_dir("dream"))["model_type"] == "Dream"


def test_every_weight_loaded(tiny_dir, family_name):
    path = tiny_dir(family_name)
    model, tok = load_model(path)
    on_disk = load_file(path / "model.safetensors")
    spec = model.d2f_spec
    state = model.state_dict()
    assert len(on_disk) == len(state)
    for key, value in on_disk.items():
        assert torch.equal(state[spec.to_hf_key(key)], value), key
    fam = family_of(model)
    assert fam.mask_token_id == tok.mask_token_id == read_config(path)["mask_token_id"]
    assert fam.shift_logits == (family_name == "dream")
    assert not model.training


def test_family_facts_from_tokenizer(tiny_dir):
    model, tok = load_model(tiny_dir("llada"))
    fam = family_of(model)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert fam.end_token_ids == (tok.eos_token_id, eot) and fam.answer_end_token_id == eot
    assert fam.use_chat_template
    dream, dtok = load_model(tiny_dir("dream"))
    assert type(dtok).__name__ == "Qwen2Tokenizer"  # no remote code for Dream's DreamTokenizer
    assert family_of(dream).end_token_ids == (dtok.eos_token_id,)
    assert not family_of(dream).use_chat_template


def test_save_roundtrip_bit_exact(tiny_dir, family_name, tmp_path):
    path = tiny_dir(family_name)
    model, tok = load_model(path)
    out = save_model(model, tmp_path / "saved", tokenizer=tok)
    a, b = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == read_config(path)
    again, tok2 = load_model(out)
    s1, s2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert tok2("apples 12")["input_ids"] == tok("apples 12")["input_ids"]


def test_sharded_save_loads(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir("llada"))
    out = save_model(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    again, tok = load_model(out)
    assert tok is None  # no tokenizer files were written
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_attention_is_not_causal(tiny_dir, family_name):
    model, tok = load_model(tiny_dir(family_name))
    ids = _ids(tok)
    valid = torch.ones_like(ids, dtype=torch.bool)
    bidir = _logits(model, ids, full_mask(block_ids(valid, torch.tensor([ids.shape[1]]), 4)))
    causal = _logits(model, ids, causal_mask(valid))
    assert (bidir - causal).abs().max() > 1e-3
    # and with no mask at all the model is bidirectional, never silently causal
    torch.testing.assert_close(_logits(model, ids), bidir, atol=1e-5, rtol=1e-5)


def _write_original_llada_adapter(base, out, n_layers, d, r=4, bad_key=False, rank_d=None):
    torch.manual_seed(1)
    rank_d = rank_d or d
    state = {}
    for i in range(n_layers):
        for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
            pre = f"base_model.model.model.transformer.blocks.{i}.{name}"
            state[f"{pre}.lora_A.weight"] = torch.randn(r, rank_d) * 0.5
            state[f"{pre}.lora_B.weight"] = torch.randn(d, r) * 0.5
    if bad_key:
        state["base_model.model.model.transformer.blocks.0.attn_outt.lora_A.weight"] = torch.zeros(
            r, d
        )
    out.mkdir(parents=True)
    save_file(state, str(out / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "attn_out"],
        "base_model_name_or_path": str(base),
        "bias": "none",
        "fan_in_fan_out": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return state


def test_adapter_in_original_llada_naming(tiny_dir, tmp_path):
    base_dir = tiny_dir("llada")
    raw = read_config(base_dir)
    state = _write_original_llada_adapter(
        base_dir, tmp_path / "ad", raw["n_layers"], raw["d_model"]
    )
    base, tok = load_model(base_dir)
    model, _ = load_model(base_dir, adapter=tmp_path / "ad")
    o_proj = model.get_base_model().model.layers[1].self_attn.o_proj
    want = state["base_model.model.model.transformer.blocks.1.attn_out.lora_B.weight"]
    assert torch.equal(o_proj.lora_B["default"].weight, want)
    assert family_of(model).name == "llada"
    ids = _ids(tok)
    assert (_logits(model, ids) - _logits(base, ids)).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=0, rtol=0)
    # save back in the original naming, load again: same logits, same on-disk keys
    out = save_adapter(model, tmp_path / "again")
    assert load_file(out / "adapter_model.safetensors").keys() == state.keys()
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "attn_out",
    }
    model2, _ = load_model(base_dir, adapter=out)
    torch.testing.assert_close(_logits(model2, ids), _logits(model, ids), atol=0, rtol=0)


def test_dream_adapter_roundtrip(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tok = load_model(tiny_dir("dream"))
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4, target_modules=list(family_of(base).lora_target_modules), init_lora_weights=False
        ),
    )
    out = save_adapter(peft_model, tmp_path / "dream_ad")
    assert any(
        ".self_attn.o_proj.lora_A" in k for k in load_file(out / "adapter_model.safetensors")
    )
    ids = _ids(tok)
    loaded, _ = load_model(tiny_dir("dream"), adapter=out)
    torch.testing.assert_close(_logits(loaded, ids), _logits(peft_model, ids), atol=0, rtol=0)


def test_adapter_with_bad_key_raises(tiny_dir, tmp_path):
    raw = read_config(tiny_dir("llada"))
    _write_original_llada_adapter(
        tiny_dir("llada"), tmp_path / "bad", raw["n_layers"], raw["d_model"], bad_key=True
    )
    with pytest.raises(ValueError, match="adapter keys do not match"):
        load_model(tiny_dir("llada"), adapter=tmp_path / "bad")


def test_adapter_for_another_base_raises(tiny_dir, tmp_path):
    raw = read_config(tiny_dir("llada"))
    _write_original_llada_adapter(
        tiny_dir("llada"),
        tmp_path / "wide",
        raw["n_layers"],
        raw["d_model"],
        rank_d=raw["d_model"] * 2,
    )
    with pytest.raises(ValueError, match="adapter"):
        load_model(tiny_dir("llada"), adapter=tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(tiny_dir("llada"), adapter=tmp_path / "nowhere")


def test_unknown_model_type(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir("llada"), tmp_path / "m")
    raw = read_config(tmp_path / "m")
    raw["model_type"] = "gpt_neox"
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=r"unknown model_type 'gpt_neox'; supported: 'llada', 'Dream'"
    ):
        load_model(tmp_path / "m")


def test_missing_weights_and_config(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir("dream"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "m")


def test_mismatched_shapes(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir("llada"), tmp_path / "m")
    raw = read_config(tmp_path / "m")
    raw["mlp_hidden_size"] *= 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="(do not fit|does not match)"):
        load_model(tmp_path / "m")


def test_unsupported_llada_field(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir("llada"), tmp_path / "m")
    raw = read_config(tmp_path / "m")
    raw["alibi"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="alibi"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_attention_that_cannot_take_4d_masks_is_refused_before_any_load(tmp_path, tiny_dir, attn):
    """flex aborts the process on CPU when transformers converts d2f's 4D masks (a double free):
    refused with a clear error, before the path is even read (a missing one is not reported)."""
    from d2f.decoding import generate

    with pytest.raises(ValueError, match=f"attn_implementation='{attn}' is not supported"):
        load_model(tmp_path / "does-not-exist", attn_implementation=attn)
    model, _ = load_model(tiny_dir("llada"), attn_implementation="eager")  # the allowed ones load
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("flex_attention")  # a model switched after loading: generate
    with pytest.raises(ValueError, match="the model's attention='flex_attention'"):
        generate(model, [[10, 11, 12]], max_new_tokens=4, block_size=4)


def test_load_by_hub_id_from_cache(tmp_path, tiny_dir, monkeypatch):
    """A hub id resolves through the hub cache (populated here, read offline), as on a cluster."""
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llada" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir("llada"), snap)
    (cache / "models--tiny-org--tiny-llada" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llada" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("transformers.utils.hub.HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(cache), raising=False)
    model, tok = load_model("tiny-org/tiny-llada")
    ref, _ = load_model(tiny_dir("llada"))
    assert tok is not None
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_autoregressive_baseline_stays_causal(tiny_dir):
    model, tok = load_model(tiny_dir("ar"))
    fam = family_of(model)
    assert fam.causal and fam.mask_token_id is None and fam.shift_logits
    assert read_config(tiny_dir("ar"))["model_type"] == "llama"
    ids = _ids(tok)
    valid = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(_logits(model, ids), _logits(model, ids, causal_mask(valid)))


def test_merged_adapter_gives_the_same_logits(tiny_dir, tmp_path):
    from peft import PeftModel

    base_dir = tiny_dir("llada")
    raw = read_config(base_dir)
    _write_original_llada_adapter(base_dir, tmp_path / "ad", raw["n_layers"], raw["d_model"])
    peft_model, tok = load_model(base_dir, adapter=tmp_path / "ad")
    merged, _ = load_model(base_dir, adapter=tmp_path / "ad", merge_adapter=True)
    assert not isinstance(merged, PeftModel) and family_of(merged).name == "llada"
    ids = _ids(tok)
    torch.testing.assert_close(_logits(merged, ids), _logits(peft_model, ids), atol=1e-5, rtol=1e-5)


def test_merged_adapter_decodes_the_same_tokens(tiny_dir, tmp_path):
    """`merge_adapter=True` (the inference default of the CLIs and lm-eval) decodes exactly the
    unmerged PeftModel's tokens in the same forwards, and the adapter does change the decode."""
    from d2f.decoding import DecodeConfig, generate

    base_dir = tiny_dir("llada")
    raw = read_config(base_dir)
    _write_original_llada_adapter(base_dir, tmp_path / "ad", raw["n_layers"], raw["d_model"])
    models = {
        "unmerged": load_model(base_dir, adapter=tmp_path / "ad")[0],
        "merged": load_model(base_dir, adapter=tmp_path / "ad", merge_adapter=True)[0],
        "base": load_model(base_dir)[0],
    }
    cfg = DecodeConfig(block_size=4, max_new_tokens=16, tau_add=0.25, tau_act=0.75, tau_conf=0.6)
    prompts = [[10, 11, 12], [13, 14, 15, 16, 17], [20, 21, 22, 23]]
    outs = {}
    for name, model in models.items():
        with torch.no_grad():  # confident predictions: several tokens per step (not a LoRA target)
            model.get_output_embeddings().weight.mul_(12.0)
        outs[name] = generate(model, prompts, cfg)
    un, me = outs["unmerged"], outs["merged"]
    assert me.tokens == un.tokens
    assert [r.forwards for r in me.stats.rows] == [r.forwards for r in un.stats.rows]
    assert any(r.tokens_with_end > r.forwards for r in me.stats.rows), "no parallel commit"
    assert outs["base"].tokens != un.tokens, "the adapter changes nothing: the test is too weak"
