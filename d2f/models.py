"""Load and save dLLM checkpoints in their original formats on stock transformers models.

`load_model` reads `config.json` from a hub id or a local directory, detects the family
(`d2f.family`), builds transformers' own Llama / Qwen2 model with non-causal attention, and loads the
original weights through `from_pretrained(key_mapping=...)`. Every weight must match: a missing,
unexpected or mis-shaped key is an error, never a silently random-initialised tensor.

`adapter=` loads a PEFT LoRA adapter onto it (`d2f.adapters`: strict key check, original module
names). `save_model` writes the original format back, so checkpoints made here load in the upstream
tools and vice versa (docs/formats.md).

Broken files fail before the expensive weights load, with the file and field named: an invalid
`config.json`, a missing required field, a truncated safetensors file, a missing shard.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
from safetensors.torch import save_file
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from d2f.adapters import ADAPTER_WEIGHTS, load_adapter, read_adapter_config
from d2f.config import check_attention
from d2f.family import Family, FamilySpec, detect_spec, family_of
from d2f.paths import check_safetensors, read_json, resolve_file

__all__ = [
    "build_model",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "read_config",
    "save_model",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def read_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The raw `config.json` dict of a checkpoint (hub id or local directory)."""
    return read_json(resolve_file(name_or_path, "config.json"))


def _weight_files(name_or_path: str | os.PathLike) -> list[str]:
    """The local paths of a checkpoint's weight files (one file, or every shard of the index),
    each checked to be a whole safetensors file."""
    single = resolve_file(name_or_path, _WEIGHTS, required=False)
    if single is not None:
        files = [single]
    else:
        index = resolve_file(name_or_path, _WEIGHTS_INDEX, required=False)
        if index is None:
            raise FileNotFoundError(
                f"{name_or_path}: no {_WEIGHTS} or {_WEIGHTS_INDEX} "
                "(only safetensors checkpoints are supported)"
            )
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: field 'weight_map' is missing or empty")
        files = []
        for shard in sorted(set(weight_map.values())):
            found = resolve_file(name_or_path, shard, required=False)
            if found is None:
                raise FileNotFoundError(f"{index}: names shard {shard!r}, which is missing")
            files.append(found)
    for file in files:
        check_safetensors(file)
    return files


@contextlib.contextmanager
def _no_loading_bar():
    """Hide transformers' per-load "Loading weights" tqdm bar (public switch), then restore it.

    The weight files are already resolved (downloaded) when this is entered, so no download bar
    is hidden by it.
    """
    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if hub_was_off:  # enable_progress_bar() also turns the hub's bars on
            disable_progress_bars()


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
    if not any(resolve_file(name_or_path, f, required=False) for f in _TOKENIZER_FILES):
        return None
    if spec is None:
        spec = detect_spec(read_config(name_or_path))
    cfg_file = resolve_file(name_or_path, "tokenizer_config.json", required=False)
    tok_class = None
    if cfg_file is not None:
        tok_class = read_json(cfg_file).get("tokenizer_class")
    cls = _tokenizer_class(tok_class, spec.tokenizer_fallback, where=cfg_file)
    return cls.from_pretrained(str(name_or_path))


def _tokenizer_class(name: Any, fallback: str, where: str | None) -> type:
    """The transformers tokenizer class `name` (read from an untrusted tokenizer_config.json).

    A class transformers does not export (a remote-code class such as Dream's `DreamTokenizer`)
    gives the family's stock `fallback`, which reads the same files; an exported name that is not
    a tokenizer class (`AutoTokenizer` would recurse, a model class would hang) is refused.
    NOTE: never AutoTokenizer here: it reads config.json, finds the remote-code `auto_map` of the
    original checkpoint and asks (interactively) to run it.
    """
    import transformers
    from transformers import PreTrainedTokenizerBase

    if name is None:
        return getattr(transformers, fallback)
    if not isinstance(name, str):
        raise ValueError(f"{where}: field 'tokenizer_class' must be a string, got {name!r}")
    if name not in dir(transformers):
        return getattr(transformers, fallback)
    cls = getattr(transformers, name)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase)):
        raise ValueError(
            f"{where}: field 'tokenizer_class' is {name!r}, not a transformers tokenizer class"
        )
    return cls


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


def adopt_config(model: PreTrainedModel, raw_config: dict[str, Any], tokenizer=None):
    """Give a loaded model the family of another config of the same architecture (AR -> a
    `fast_dllm_v2` model): its config gains the new fields, its embeddings grow to the new
    `vocab_size` (transformers' resize: new rows at the mean of the old ones), its family and the
    config written at save become `raw_config`'s."""
    spec = detect_spec(raw_config)
    if not isinstance(model, spec.architecture(raw_config)):
        raise ValueError(
            f"a {type(model).__name__} cannot become a {spec.name} model "
            f"({spec.architecture(raw_config).__name__})"
        )
    vocab = int(raw_config["vocab_size"])
    if model.get_input_embeddings().weight.shape[0] < vocab:
        model.resize_token_embeddings(vocab, mean_resizing=True)
    before = family_of(model).original_config
    for key, value in raw_config.items():  # the fields the new config adds or changes
        if before.get(key) != value:
            setattr(model.config, key, value)
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
    check_attention(attn_implementation)
    raw = read_config(name_or_path)
    spec = detect_spec(raw, where=f"{name_or_path}/config.json")
    hf_config = spec.hf_config(raw)
    if adapter is not None:  # fail on a bad adapter before the (expensive) weights load
        adapter_config = read_adapter_config(adapter)
        check_safetensors(resolve_file(adapter, ADAPTER_WEIGHTS))
    _weight_files(name_or_path)
    kwargs = {}
    if device is not None:
        kwargs["device_map"] = str(device)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with _no_loading_bar():
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


def _write_state_dict(state: dict[str, torch.Tensor], out: Path, max_shard: str) -> None:
    """Write `state` as `model.safetensors` or shards + index, then remove the weight files of
    an older checkpoint in `out` (else a stale single file would win over the new shards)."""
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard
    )
    for shard_file, names in split.filename_to_tensors.items():
        shard = {n: state[n].detach().contiguous().cpu() for n in names}
        save_file(shard, str(out / shard_file), metadata={"format": "pt"})
    written = set(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        (out / _WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
        written.add(_WEIGHTS_INDEX)
    stale = [out / _WEIGHTS, out / _WEIGHTS_INDEX, *out.glob("model-*-of-*.safetensors")]
    for path in stale:
        if path.name not in written and path.is_file():
            path.unlink()


def save_model(
    model, path: str | os.PathLike, tokenizer=None, max_shard_size: str = "5GB", state_dict=None
) -> Path:
    """Write the base model (no adapter) in its family's original checkpoint format.

    Weight files of an older checkpoint in `path` (single file or shards) are removed, so the
    directory holds exactly this model. `state_dict`: the weights to write instead of `model.state_dict()` (e.g. gathered from FSDP shards).
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
    _write_state_dict(state, out, max_shard_size)
    (out / "config.json").write_text(json.dumps(family.original_config, indent=2) + "\n")
    generation = spec.generation_config(family.original_config)
    if generation is not None:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        spec.write_tokenizer(tokenizer, out)
    return out
