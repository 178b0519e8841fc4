"""Load and save dLLM checkpoints in their original formats on stock transformers models.

`load_model` reads `config.json` from a hub id or a local directory, detects the family
(`d2f.family`), builds transformers' own Llama / Qwen2 model with non-causal attention, and loads the
original weights through `from_pretrained(key_mapping=...)`. Every weight must match: a missing,
unexpected or mis-shaped key is an error, never a silently random-initialised tensor.

Adapters (PEFT LoRA) load from a hub id or directory, including adapters saved against the original
module names (LLaDA's `attn_out`, `model.transformer.blocks.N`); every adapter key must match.
`save_model` / `save_adapter` write the original formats back, so checkpoints made here load in the
upstream tools and vice versa.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.utils import cached_file

from d2f.family import Family, FamilySpec, detect_spec, family_of
from d2f.paths import is_local, missing

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _resolve(name_or_path: str | os.PathLike, filename: str, required: bool = True) -> str | None:
    """Local path of `filename` in a local directory or a hub repo (through the hub cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        found = path / filename
        if found.is_file():
            return str(found)
        if required:
            raise FileNotFoundError(f"{path}: no {filename} in this directory")
        return None
    if path.exists():
        raise NotADirectoryError(f"{path}: expected a checkpoint directory or a hub id, got a file")
    if is_local(name_or_path):
        raise FileNotFoundError(missing(name_or_path))
    try:
        return cached_file(
            str(name_or_path),
            filename,
            _raise_exceptions_for_missing_entries=required,
            _raise_exceptions_for_connection_errors=required,
        )
    except OSError as err:
        if required:
            raise FileNotFoundError(
                f"{missing(name_or_path)}: cannot get {filename} from the hub ({err})"
            ) from None
        return None


def read_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The raw `config.json` dict of a checkpoint (hub id or local directory)."""
    with open(_resolve(name_or_path, "config.json")) as f:
        return json.load(f)


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (try 'bfloat16', 'float32')")
    return resolved


def load_tokenizer(name_or_path: str | os.PathLike, spec: FamilySpec | None = None):
    """The checkpoint's tokenizer, or None when it ships no tokenizer files.

    Remote-code tokenizer classes (Dream's `DreamTokenizer`) are replaced by the family's stock
    transformers class, which reads the same files: no remote code is ever run.
    """
    if not any(_resolve(name_or_path, f, required=False) for f in _TOKENIZER_FILES):
        return None
    if spec is None:
        spec = detect_spec(read_config(name_or_path))
    cfg_file = _resolve(name_or_path, "tokenizer_config.json", required=False)
    tok_class = None
    if cfg_file is not None:
        with open(cfg_file) as f:
            tok_class = json.load(f).get("tokenizer_class")
    import transformers

    # NOTE: never AutoTokenizer here: it reads config.json, finds the remote-code `auto_map` of the
    # original checkpoint and asks (interactively) to run it.
    cls = getattr(transformers, tok_class or "", None) or getattr(
        transformers, spec.tokenizer_fallback
    )
    return cls.from_pretrained(str(name_or_path))


def _attach(model: PreTrainedModel, family: Family, spec: FamilySpec) -> PreTrainedModel:
    # NOTE: dLLMs are bidirectional. is_causal=False makes transformers build bidirectional masks
    # when no mask is given; d2f itself always passes an explicit 4D mask (d2f.mask).
    if not family.causal:
        model.config.is_causal = False
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
    model.d2f_family = family
    model.d2f_spec = spec
    return model


def build_model(
    raw_config: dict[str, Any], tokenizer=None, seed: int | None = None, dtype=torch.float32
) -> PreTrainedModel:
    """A randomly initialised model of the family described by an original-format config dict."""
    spec = detect_spec(raw_config)
    hf_config = spec.hf_config(raw_config)
    if seed is not None:
        torch.manual_seed(seed)
    model = spec.architecture(raw_config)(hf_config).to(dtype)
    return _attach(model, spec.facts(raw_config, tokenizer), spec)


def load_model(
    name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    merge_adapter: bool = False,
):
    """Load a dLLM (and optionally a LoRA adapter) from a hub id or a local original-format directory.

    Returns `(model, tokenizer)`; `tokenizer` is None when the checkpoint has no tokenizer files.
    The model is in eval mode; its family facts are `d2f.family_of(model)`. `merge_adapter=True`
    folds the LoRA weights into the base weights (faster inference; the adapter can no longer be
    disabled, so no teacher pass).
    """
    raw = read_config(name_or_path)
    spec = detect_spec(raw, where=f"{name_or_path}/config.json")
    hf_config = spec.hf_config(raw)
    if attn_implementation is not None:
        hf_config._attn_implementation = attn_implementation
    if adapter is not None:  # fail on a bad adapter before the (expensive) weights load
        adapter_config = _read_adapter_config(adapter)
    has_weights = any(
        _resolve(name_or_path, f, required=False)
        for f in ("model.safetensors", "model.safetensors.index.json")
    )
    if not has_weights:
        raise FileNotFoundError(
            f"{name_or_path}: no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are supported)"
        )
    kwargs = {}
    if device is not None:
        kwargs["device_map"] = str(device)
    try:
        model, info = spec.architecture(raw).from_pretrained(
            str(name_or_path),
            config=hf_config,
            dtype=_torch_dtype(dtype),
            key_mapping=spec.key_mapping or None,
            output_loading_info=True,
            **kwargs,
        )
    except RuntimeError as err:  # size mismatches
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ValueError(f"{name_or_path}: weights do not fit config.json: {first}") from None
    problems = {
        k: sorted(v) for k, v in info.items() if k != "error_msgs" and v and not _benign(k, v)
    }
    if problems or info.get("error_msgs"):
        detail = "; ".join(
            f"{k}: {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in problems.items()
        )
        raise ValueError(f"{name_or_path}: checkpoint does not match its config.json ({detail})")
    tokenizer = load_tokenizer(name_or_path, spec)
    model = _attach(model, spec.facts(raw, tokenizer), spec)
    model.eval()
    if adapter is not None:
        model = load_adapter(model, adapter, adapter_config)
        if merge_adapter:
            model = model.merge_and_unload()
        model.eval()
    return model, tokenizer


def _benign(kind: str, keys) -> bool:
    """Loading-info entries that are not weights (e.g. rotary buffers) or are empty."""
    return all("rotary_emb" in str(k) for k in keys) if kind != "mismatched_keys" else False


def _read_adapter_config(adapter: str | os.PathLike) -> dict[str, Any]:
    with open(_resolve(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter}: only LoRA adapters are supported, got {cfg.get('peft_type')}")
    return cfg


def _adapter_prefix(key: str) -> tuple[str, str]:
    prefix = "base_model.model."
    return (prefix, key[len(prefix) :]) if key.startswith(prefix) else ("", key)


def load_adapter(model: PreTrainedModel, adapter: str | os.PathLike, adapter_config=None):
    """Wrap `model` in a PeftModel holding the LoRA adapter at `adapter`; every key must match.

    Adapters saved against the original module names (LLaDA `attn_out`, `model.transformer.*`)
    are renamed onto the transformers module tree first. peft only warns about unmatched keys and
    keeps a zero adapter; here any unmatched key raises.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    spec: FamilySpec = model.d2f_spec
    cfg = dict(adapter_config or _read_adapter_config(adapter))
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError(f"{adapter}: regex target_modules are not supported ({targets!r})")
    cfg["target_modules"] = sorted({spec.hf_module(t) for t in targets})
    lora_fields = set(LoraConfig.__dataclass_fields__)
    lora_config = LoraConfig(**{k: v for k, v in cfg.items() if k in lora_fields})
    lora_config.inference_mode = True
    state = load_file(_resolve(adapter, _ADAPTER_WEIGHTS))
    renamed = {}
    for key, value in state.items():
        prefix, rest = _adapter_prefix(key)
        renamed[prefix + spec.to_hf_key(rest)] = value
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as err:
        raise ValueError(f"{adapter}: adapter does not fit this base model: {err}") from None
    try:
        result = set_peft_model_state_dict(peft_model, renamed)
    except RuntimeError as err:  # size mismatch: an adapter trained on another base
        detail = next((ln.strip() for ln in str(err).splitlines() if "mismatch" in ln), str(err))
        raise ValueError(f"{adapter}: adapter does not fit this base model: {detail}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"{adapter}: adapter keys do not match the base model "
            f"(unexpected: {unexpected[:3]}, missing: {missing[:3]})"
        )
    return peft_model


def _write_state_dict(state: dict[str, torch.Tensor], out: Path, filename: str, max_shard: str):
    pattern = filename.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(
        state, filename_pattern=pattern, max_shard_size=max_shard
    )
    for shard_file, names in split.filename_to_tensors.items():
        shard = {n: state[n].detach().contiguous().cpu() for n in names}
        save_file(shard, str(out / shard_file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        (out / filename.replace(".safetensors", ".safetensors.index.json")).write_text(
            json.dumps(index, indent=2)
        )


def save_model(
    model, path: str | os.PathLike, tokenizer=None, max_shard_size: str = "5GB", state_dict=None
) -> Path:
    """Write the base model (no adapter) in its family's original checkpoint format.

    `state_dict`: the weights to write instead of `model.state_dict()` (e.g. gathered from FSDP shards).
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    family = family_of(model)
    spec: FamilySpec = model.d2f_spec
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state_dict is None else state_dict
    state = {spec.to_original_key(k): v for k, v in source.items()}
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if spec.to_hf_key(k) != "lm_head.weight"}
    _write_state_dict(state, out, "model.safetensors", max_shard_size)
    (out / "config.json").write_text(json.dumps(family.original_config, indent=2) + "\n")
    if tokenizer is not None:
        spec.write_tokenizer(tokenizer, out)
    return out


def save_adapter(peft_model, path: str | os.PathLike, state_dict=None) -> Path:
    """Write the LoRA adapter with the family's original module and key names (PEFT format).

    `state_dict`: the peft model's full state dict to take the adapter from (e.g. gathered from FSDP
    shards); None reads the model's own.
    """
    from peft import get_peft_model_state_dict

    spec: FamilySpec = peft_model.get_base_model().d2f_spec
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    # NOTE: save_embedding_layers=False: peft's "auto" re-reads the base config.json with the
    # transformers config class (wrong for LLaDA's format; a hub request for hub ids) to guess
    # whether embeddings were resized. A D2F adapter never touches the embeddings.
    adapter_state = get_peft_model_state_dict(
        peft_model, state_dict=state_dict, save_embedding_layers=False
    )
    for key, value in adapter_state.items():
        prefix, rest = _adapter_prefix(key)
        state[prefix + spec.to_original_key(rest)] = value
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(out / _ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    cfg = peft_model.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted({spec.original_module(t) for t in cfg["target_modules"]})
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return out
