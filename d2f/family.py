"""Model families: everything that differs between LLaDA and Dream, in one place.

A dLLM family is an original checkpoint format (its `config.json` fields and weight names) laid onto a
stock transformers architecture run without a causal mask:

* LLaDA (`model_type "llada"`) -> `LlamaForCausalLM`, weights renamed `model.transformer.*` <-> `model.*`.
* Dream (`model_type "Dream"`) -> `Qwen2ForCausalLM`, weight names already identical.

Beside them: `ar` (a plain causal Llama / Qwen2, the AR baseline) and `fast_dllm_v2` (an AR model
adapted to block diffusion: the AR format plus `bd_size` and a mask id; block-causal, shifted).

`FamilySpec` knows the format (config conversion, weight renames); `Family` holds the facts a loaded
model needs at run time (mask id, end ids, shifted logits, LoRA targets, chat template use). No other
module asks "is this LLaDA?": it asks `family_of(model)`. A new family is one new `FamilySpec`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)


@dataclass(frozen=True)
class Family:
    """Run-time facts of a loaded dLLM, read from its `config.json` and tokenizer."""

    name: str  # family name, e.g. "llada", "dream", "ar"
    mask_token_id: int | None  # the [MASK] token that marks undecoded positions (None: AR model)
    end_token_ids: tuple[int, ...]  # generation stops at the first of these
    answer_end_token_id: int  # appended to training answers (LLaDA <|eot_id|>, Dream eos)
    pad_token_id: int  # right-padding of training answers
    bos_token_id: int | None  # beginning of sequence, if the family has one
    shift_logits: bool  # True: logits at position i-1 predict token i (Dream)
    lora_target_modules: tuple[str, ...]  # attention projections, transformers module names
    use_chat_template: bool  # whether prompts go through the chat template by default
    causal: bool = False  # True only for autoregressive baselines (attention stays causal)
    # the block size it was trained with, for families whose attention is block-causal by training
    # (Fast-dLLM v2's bd_size); None: not fixed by the checkpoint
    block_size: int | None = None
    original_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def align_logits(self, logits: Tensor, carry: Tensor | None = None) -> Tensor:
        """A model call's logits (B, L, V) -> predictions aligned with its input columns (B, L, V).

        Column i of the result predicts the token at input column i. Unshifted families (LLaDA)
        return `logits` as they are. Shifted families (Dream, AR): row i - 1 predicts token i, so
        `out[:, i] = logits[:, i - 1]`, and column 0 takes `carry` (B, V), the logits of the
        position just before the call's first column (e.g. the last prompt position of a cached
        prefix); without a carry column 0 repeats `logits[:, 0]`, a placeholder for a column
        that nothing predicts (position 0 of a full sequence).
        NOTE: this is the one place the Dream shift is written; decoders and loglikelihood use it.
        """
        if not self.shift_logits:
            return logits
        first = logits[:, :1] if carry is None else carry[:, None]
        return torch.cat([first, logits[:, :-1]], 1)


class FamilySpec:
    """A checkpoint format: how its config and weight names map onto a transformers model."""

    name: str
    model_types: tuple[str, ...]
    # regex on original key -> replacement giving the transformers key (applied in order)
    key_mapping: dict[str, str] = {}
    # config.json fields this format cannot do without, checked before any weight is read
    required_fields: tuple[str, ...] = ()
    shift_logits: bool = False  # the source of Family.shift_logits (Dream, AR: True)
    use_chat_template: bool = False
    # tokenizer class used when `tokenizer_config.json` names a remote-code class
    tokenizer_fallback: str = "PreTrainedTokenizerFast"

    def matches(self, raw: dict[str, Any]) -> bool:
        """Whether a raw `config.json` dict is in this format (by default: its model_type)."""
        return raw.get("model_type") in self.model_types

    def hf_config(self, raw: dict[str, Any]) -> PretrainedConfig:
        raise NotImplementedError

    def architecture(self, raw: dict[str, Any]) -> type[PreTrainedModel]:
        raise NotImplementedError

    def facts(self, raw: dict[str, Any], tokenizer=None) -> Family:
        raise NotImplementedError

    def check_config(self, raw: dict[str, Any], where: str = "config.json") -> None:
        """Raise a ValueError naming `where` and the field when a required field is missing."""
        for name in self.required_fields:
            if raw.get(name) is None:
                raise ValueError(
                    f"{where}: missing field {name!r} (required in a {self.name} config.json)"
                )

    def generation_config(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """The `generation_config.json` dict the original loader needs, or None (none needed)."""
        return None

    def write_tokenizer(self, tokenizer, out) -> None:
        """Save `tokenizer` into directory `out` in the family's original layout."""
        tokenizer.save_pretrained(str(out))
        edit_tokenizer_config(Path(out), portable_tokenizer_config)

    def to_hf_key(self, key: str) -> str:
        for pattern, repl in self.key_mapping.items():
            key = re.sub(pattern, repl, key)
        return key

    def to_original_key(self, key: str) -> str:
        for pattern, repl in self._inverse_mapping().items():
            key = re.sub(pattern, repl, key)
        return key

    def _inverse_mapping(self) -> dict[str, str]:
        return {}


def portable_tokenizer_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A `tokenizer_config.json` dict that transformers 4.x reads too, with the same meaning.

    transformers 5 writes the unnamed extra special tokens as a list under `extra_special_tokens`;
    transformers 4.x reads that key as a dict of *named* tokens (4.49 calls `.keys()` on it and
    fails). The list under `additional_special_tokens` is read by 4.x, and 5.x maps it back to
    `extra_special_tokens` on load, so both versions get the same tokens. 5.x's class name
    `TokenizersBackend` is 4.x's `PreTrainedTokenizerFast` (5.x exports both names for one class).
    `is_local` / `local_files_only` record how the tokenizer was last loaded, not the tokenizer.
    """
    cfg = {k: v for k, v in cfg.items() if k not in ("is_local", "local_files_only")}
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        del cfg["extra_special_tokens"]
        cfg["additional_special_tokens"] = extra
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    return cfg


def edit_tokenizer_config(out: Path, edit) -> None:
    """Rewrite `out/tokenizer_config.json` (if written) through `edit(dict) -> dict`."""
    path = out / "tokenizer_config.json"
    if path.is_file():
        path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=2) + "\n")


def _token_id(tokenizer, token: str) -> int | None:
    if tokenizer is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


class LLaDASpec(FamilySpec):
    """LLaDA (GSAI-ML/LLaDA-8B-*): an OLMo-style config whose `llama` block is exactly Llama."""

    name = "llada"
    model_types = ("llada",)
    key_mapping = {
        r"^model\.transformer\.wte\.": "model.embed_tokens.",
        r"^model\.transformer\.ln_f\.": "model.norm.",
        r"^model\.transformer\.ff_out\.": "lm_head.",
        r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
        r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
        r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
    }
    required_fields = (
        "d_model",
        "n_layers",
        "n_heads",
        "mlp_hidden_size",
        "vocab_size",
        "mask_token_id",
        "eos_token_id",
    )
    use_chat_template = True
    # (field, required value) pairs this mapping reproduces exactly; anything else is refused
    _supported = {
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "alibi": False,
        "rope": True,
        "include_bias": False,
        "input_emb_norm": False,
        "scale_logits": False,
        "block_group_size": 1,
    }

    def _inverse_mapping(self) -> dict[str, str]:
        return {
            r"^model\.embed_tokens\.": "model.transformer.wte.",
            r"^model\.norm\.": "model.transformer.ln_f.",
            r"^lm_head\.": "model.transformer.ff_out.",
            r"^model\.layers\.(\d+)\.input_layernorm\.": r"model.transformer.blocks.\1.attn_norm.",
            r"^model\.layers\.(\d+)\.post_attention_layernorm\.": r"model.transformer.blocks.\1.ff_norm.",
            r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.": r"model.transformer.blocks.\1.\2.",
            r"^model\.layers\.(\d+)\.self_attn\.o_proj\.": r"model.transformer.blocks.\1.attn_out.",
            r"^model\.layers\.(\d+)\.mlp\.gate_proj\.": r"model.transformer.blocks.\1.ff_proj.",
            r"^model\.layers\.(\d+)\.mlp\.up_proj\.": r"model.transformer.blocks.\1.up_proj.",
            r"^model\.layers\.(\d+)\.mlp\.down_proj\.": r"model.transformer.blocks.\1.ff_out.",
        }

    def write_tokenizer(self, tokenizer, out) -> None:
        """LLaDA's hub layout: `PreTrainedTokenizerFast` named, chat template inside
        `tokenizer_config.json` (transformers 5 would write the class as TokenizersBackend and the
        template to a separate chat_template.jinja)."""
        tokenizer.save_pretrained(str(out))
        jinja = Path(out) / "chat_template.jinja"
        template = jinja.read_text() if jinja.exists() else None

        def llada_layout(cfg: dict[str, Any]) -> dict[str, Any]:
            cfg = portable_tokenizer_config(cfg)
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            if template is not None:
                cfg["chat_template"] = template
            return cfg

        edit_tokenizer_config(Path(out), llada_layout)
        if template is not None:
            jinja.unlink()

    def hf_config(self, raw: dict[str, Any]) -> PretrainedConfig:
        for key, want in self._supported.items():
            if key in raw and raw[key] != want:
                raise ValueError(
                    f"LLaDA config field {key}={raw[key]!r} is not supported (only {want!r} maps onto Llama)"
                )
        if raw.get("include_qkv_bias", False):
            raise ValueError("LLaDA config field include_qkv_bias=True is not supported")
        n_heads = raw["n_heads"]
        return LlamaConfig(
            vocab_size=raw.get("embedding_size") or raw["vocab_size"],
            hidden_size=raw["d_model"],
            intermediate_size=raw["mlp_hidden_size"],
            num_hidden_layers=raw["n_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=raw.get("n_kv_heads") or n_heads,
            head_dim=raw["d_model"] // n_heads,
            max_position_embeddings=raw.get("max_sequence_length", 4096),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_parameters={"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)},
            tie_word_embeddings=raw.get("weight_tying", False),
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )

    def architecture(self, raw: dict[str, Any]) -> type[PreTrainedModel]:
        return LlamaForCausalLM

    def facts(self, raw: dict[str, Any], tokenizer=None) -> Family:
        eos = raw["eos_token_id"]
        eot = _token_id(tokenizer, "<|eot_id|>")
        ends = (eos,) if eot is None else (eos, eot)
        bos = raw.get("bos_token_id")
        if bos is None and tokenizer is not None:
            bos = tokenizer.bos_token_id
        return Family(
            name=self.name,
            mask_token_id=raw["mask_token_id"],
            end_token_ids=ends,
            answer_end_token_id=eos if eot is None else eot,
            pad_token_id=raw.get("pad_token_id", eos),
            bos_token_id=bos,
            shift_logits=self.shift_logits,
            lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            use_chat_template=self.use_chat_template,
            original_config=raw,
        )


class DreamSpec(FamilySpec):
    """Dream (Dream-org/Dream-v0-*): a Qwen2 config and Qwen2 weight names; logits are shifted."""

    name = "dream"
    model_types = ("Dream",)
    shift_logits = True
    use_chat_template = False
    tokenizer_fallback = "Qwen2Tokenizer"
    required_fields = ("mask_token_id", "eos_token_id", "vocab_size", "hidden_size")
    _dropped = ("model_type", "architectures", "auto_map", "transformers_version")

    def hf_config(self, raw: dict[str, Any]) -> PretrainedConfig:
        kwargs = {k: v for k, v in raw.items() if k not in self._dropped}
        if "rope_theta" in kwargs and "rope_parameters" not in kwargs:
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs["rope_theta"]}
        if kwargs.get("use_sliding_window"):
            raise ValueError("Dream config field use_sliding_window=True is not supported")
        return Qwen2Config(**kwargs)

    def generation_config(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """Dream's own `DreamModel.from_pretrained` always reads `generation_config.json`."""
        fields = ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")
        return {k: raw[k] for k in fields if raw.get(k) is not None}

    def architecture(self, raw: dict[str, Any]) -> type[PreTrainedModel]:
        return Qwen2ForCausalLM

    def facts(self, raw: dict[str, Any], tokenizer=None) -> Family:
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        eos = raw["eos_token_id"] if eos is None else eos
        return Family(
            name=self.name,
            mask_token_id=raw["mask_token_id"],
            end_token_ids=(eos,),
            answer_end_token_id=eos,
            pad_token_id=raw.get("pad_token_id", eos),
            bos_token_id=raw.get("bos_token_id"),
            shift_logits=self.shift_logits,
            lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            use_chat_template=self.use_chat_template,
            original_config=raw,
        )


class AutoregressiveSpec(FamilySpec):
    """A plain causal LM in transformers' own format (Llama / Qwen2): the AR baseline.

    Not a dLLM: no mask token, attention stays causal, logits predict the next token.
    """

    name = "ar"
    model_types = ("llama", "qwen2")
    shift_logits = True
    _archs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}

    def hf_config(self, raw: dict[str, Any]) -> PretrainedConfig:
        config_class = self._archs[raw["model_type"]][0]
        return config_class.from_dict({k: v for k, v in raw.items() if k != "model_type"})

    def matches(self, raw: dict[str, Any]) -> bool:
        return raw.get("model_type") in self.model_types and "bd_size" not in raw

    def architecture(self, raw: dict[str, Any]) -> type[PreTrainedModel]:
        return self._archs[raw["model_type"]][1]

    def facts(self, raw: dict[str, Any], tokenizer=None) -> Family:
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        eos = raw["eos_token_id"] if eos is None else eos
        ends = tuple(eos) if isinstance(eos, list) else (eos,)
        pad = raw.get("pad_token_id")
        return Family(
            name=self.name,
            mask_token_id=None,
            end_token_ids=ends,
            answer_end_token_id=ends[0],
            pad_token_id=ends[0] if pad is None else pad,
            bos_token_id=raw.get("bos_token_id"),
            shift_logits=self.shift_logits,
            lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            use_chat_template=bool(tokenizer is not None and tokenizer.chat_template),
            causal=True,
            original_config=raw,
        )


class FastDLLMv2Spec(AutoregressiveSpec):
    """An AR model adapted to block diffusion by Fast-dLLM v2 (Wu et al., arXiv 2509.26328).

    Format: the AR checkpoint's own (model_type llama / qwen2, transformers' weight names) with two
    fields more, `bd_size` (the trained block size) and `mask_token_id`, so transformers'
    `AutoModelForCausalLM.from_pretrained` loads it with no remote code; also read: the released
    hub format (model_type `Fast_dLLM_Qwen`: Qwen2 fields and weight names, `bd_size`; the mask id
    then comes from the tokenizer's `|<MASK>|`). Facts: a mask id, shifted logits (the AR prior),
    block-causal attention (`causal=False`: a dLLM to the decoders), `block_size` = bd_size.
    """

    name = "fast_dllm_v2"
    model_types = ("Fast_dLLM_Qwen", "llama", "qwen2")
    required_fields = ("bd_size", "vocab_size")
    tokenizer_fallback = "PreTrainedTokenizerFast"
    _released = "Fast_dLLM_Qwen"
    _dropped = ("model_type", "architectures", "auto_map", "transformers_version")

    def matches(self, raw: dict[str, Any]) -> bool:
        model_type = raw.get("model_type")
        return model_type == self._released or (model_type in self._archs and "bd_size" in raw)

    def _arch(self, raw: dict[str, Any]) -> str:
        return "qwen2" if raw.get("model_type") == self._released else raw["model_type"]

    def hf_config(self, raw: dict[str, Any]) -> PretrainedConfig:
        config_class = self._archs[self._arch(raw)][0]
        return config_class.from_dict({k: v for k, v in raw.items() if k not in self._dropped})

    def architecture(self, raw: dict[str, Any]) -> type[PreTrainedModel]:
        return self._archs[self._arch(raw)][1]

    def facts(self, raw: dict[str, Any], tokenizer=None) -> Family:
        mask = raw.get("mask_token_id")
        if mask is None:
            mask = _token_id(tokenizer, "|<MASK>|")
        if mask is None:
            raise ValueError(
                "a fast_dllm_v2 checkpoint needs mask_token_id in config.json or a |<MASK>| "
                "token in its tokenizer"
            )
        ar = super().facts(raw, tokenizer)
        return dataclasses.replace(
            ar, name=self.name, mask_token_id=mask, causal=False, block_size=raw["bd_size"]
        )


SPECS: dict[str, FamilySpec] = {
    spec.name: spec for spec in (LLaDASpec(), DreamSpec(), FastDLLMv2Spec(), AutoregressiveSpec())
}


def detect_spec(raw: dict[str, Any], where: str = "config.json") -> FamilySpec:
    """The family whose `model_type` matches the raw `config.json` dict (its required fields
    checked: a missing one is a ValueError naming `where` and the field)."""
    model_type = raw.get("model_type")
    for spec in SPECS.values():
        if spec.matches(raw):
            spec.check_config(raw, where)
            return spec
    types = dict.fromkeys(t for spec in SPECS.values() for t in spec.model_types)
    supported = ", ".join(repr(t) for t in types)
    raise ValueError(f"{where}: unknown model_type {model_type!r}; supported: {supported}")


def family_of(model) -> Family:
    """The `Family` of a model loaded by `d2f.load_model` (works through peft and DDP wrappers)."""
    seen = model
    while seen is not None:
        fam = seen.__dict__.get("d2f_family")
        if fam is not None:
            return fam
        seen = seen.__dict__.get("_modules", {}).get("module") or _peft_inner(seen)
    raise ValueError(
        "model has no d2f family: load it with d2f.load_model or d2f.models.build_model"
    )


def _peft_inner(model):
    mods = model.__dict__.get("_modules", {})
    inner = mods.get("base_model")
    if inner is not None:
        return inner
    return mods.get("model")
