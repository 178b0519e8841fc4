"""Load and save dLLM checkpoints in their original formats on stock transformers models.

`load_model` reads `config.json` from a hub id or a local directory, detects the family
(`d2f.family`), builds transformers' own Llama / Qwen2 model with non-causal attention, and loads the
original weights through `from_pretrained(key_mapping=...)`. Every weight must match: a missing,
unexpected or mis-shaped key is an error, never a silently random-initialised tensor.

Adapters (PEFT LoRA) load from a hub id or directory, including adapters saved against the original
module names (LLaDA's `attn_out`, `ff_proj`, `model.transformer.blocks.N`, as a name list or a
regex); every adapter key must match, and every module the file holds LoRA weights for must be named
by its `target_modules` (peft would drop it silently otherwise). `save_model` / `save_adapter` write
the original formats back, so checkpoints made here load in the upstream tools and vice versa
(docs/formats.md).

Broken files fail before the expensive weights load, with the file and field named: an invalid
`config.json`, a missing required field, a truncated safetensors file, a missing shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, split_torch_state_dict_into_shards
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from d2f.config import check_attention
from d2f.family import Family, FamilySpec, detect_spec, family_of
from d2f.paths import is_local, missing

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


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
    try:  # through the hub cache; offline (HF_HUB_OFFLINE=1) reads the cache only
        return hf_hub_download(str(name_or_path), filename)
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as err:
        if required:
            raise FileNotFoundError(
                f"{missing(name_or_path)}: cannot get {filename} from the hub ({err})"
            ) from None
        return None


def _read_json(path: str | os.PathLike, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON file's dict; invalid JSON is a ValueError naming the file, line and column."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    return data


def read_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The raw `config.json` dict of a checkpoint (hub id or local directory)."""
    return _read_json(_resolve(name_or_path, "config.json"))


def _check_safetensors(path: str | os.PathLike) -> None:
    """Read a safetensors header (cheap: no tensor is loaded); a broken file names itself."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({err})"
        ) from None


def _weight_files(name_or_path: str | os.PathLike) -> list[str]:
    """The local paths of a checkpoint's weight files (one file, or every shard of the index),
    each checked to be a whole safetensors file."""
    single = _resolve(name_or_path, _WEIGHTS, required=False)
    if single is not None:
        files = [single]
    else:
        index = _resolve(name_or_path, _WEIGHTS_INDEX, required=False)
        if index is None:
            raise FileNotFoundError(
                f"{name_or_path}: no {_WEIGHTS} or {_WEIGHTS_INDEX} "
                "(only safetensors checkpoints are supported)"
            )
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: field 'weight_map' is missing or empty")
        files = []
        for shard in sorted(set(weight_map.values())):
            found = _resolve(name_or_path, shard, required=False)
            if found is None:
                raise FileNotFoundError(f"{index}: names shard {shard!r}, which is missing")
            files.append(found)
    for file in files:
        _check_safetensors(file)
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
    if not any(_resolve(name_or_path, f, required=False) for f in _TOKENIZER_FILES):
        return None
    if spec is None:
        spec = detect_spec(read_config(name_or_path))
    cfg_file = _resolve(name_or_path, "tokenizer_config.json", required=False)
    tok_class = None
    if cfg_file is not None:
        tok_class = _read_json(cfg_file).get("tokenizer_class")
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
        adapter_config = _read_adapter_config(adapter)
        _check_safetensors(_resolve(adapter, _ADAPTER_WEIGHTS))
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


def _read_adapter_config(adapter: str | os.PathLike) -> dict[str, Any]:
    cfg = _read_json(_resolve(adapter, "adapter_config.json"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter}: only LoRA adapters are supported, got {cfg.get('peft_type')}")
    return cfg


def _adapter_prefix(key: str) -> tuple[str, str]:
    prefix = "base_model.model."
    return (prefix, key[len(prefix) :]) if key.startswith(prefix) else ("", key)


def _lora_module(key: str) -> str:
    """`...q_proj.lora_A.weight` -> `...q_proj` (the module a LoRA tensor belongs to)."""
    return _adapter_prefix(key)[1].split(".lora_", 1)[0]


def _module_names(keys, spec: FamilySpec) -> dict[str, str]:
    """transformers module name -> original module name, for every module holding a tensor in the
    state-dict `keys` (peft's `base_layer` / LoRA entries folded away)."""
    names = {}
    for key in keys:
        rest = _adapter_prefix(key)[1]
        if ".lora_" in rest or "modules_to_save" in rest or "original_module" in rest:
            continue
        rest = rest.replace(".base_layer.", ".")
        module, _, leaf = rest.rpartition(".")
        if module:
            names[module] = spec.to_original_key(rest)[: -len(leaf) - 1]
    return names


def _targets(lora_config, name: str) -> bool:
    """Whether peft wraps module `name` under `lora_config` (peft's own matching rule)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(lora_config, name))


def _same_base(recorded: str | None, actual: str | None) -> bool:
    """Whether an adapter's `base_model_name_or_path` names the base it is being loaded onto."""
    if not recorded or not actual:
        return False
    if recorded == actual:
        return True
    try:
        return os.path.samefile(os.path.expanduser(recorded), os.path.expanduser(actual))
    except OSError:
        return False


def load_adapter(model: PreTrainedModel, adapter: str | os.PathLike, adapter_config=None):
    """Wrap `model` in a PeftModel holding the LoRA adapter at `adapter`; every key must match.

    Adapters saved against the original module names (LLaDA `attn_out`, `ff_proj`,
    `model.transformer.*`) are renamed onto the transformers module tree first. `target_modules`
    (a name list or a regex) is matched by peft's rule against the original module names (as the
    authors' stack does) and, for adapters written by older d2f versions, the transformers names.
    peft only warns about unmatched keys and keeps a zero adapter, and drops weights of modules
    `target_modules` does not name; here both raise. A module that `target_modules` names but
    the file holds no weights for (LLaDA's list form `ff_out` also names the output head) is
    left unwrapped: peft would give it a zero update.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    spec: FamilySpec = model.d2f_spec
    cfg = dict(adapter_config or _read_adapter_config(adapter))
    lora_fields = set(LoraConfig.__dataclass_fields__)
    try:
        lora_config = LoraConfig(**{k: v for k, v in cfg.items() if k in lora_fields})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{adapter}/adapter_config.json: invalid LoRA config ({err})") from None
    weights = _resolve(adapter, _ADAPTER_WEIGHTS)
    _check_safetensors(weights)
    renamed = {}
    for key, value in load_file(weights).items():
        prefix, rest = _adapter_prefix(key)
        renamed[prefix + spec.to_hf_key(rest)] = value
    names = _module_names(model.state_dict().keys(), spec)
    trained = {_lora_module(k) for k in renamed}
    unknown = sorted(k for k in renamed if _lora_module(k) not in names)
    if unknown:
        raise ValueError(
            f"{adapter}: adapter keys do not match the base model (unexpected: {unknown[:3]})"
        )
    untargeted = sorted(
        names[m]
        for m in trained
        if not (_targets(lora_config, names[m]) or _targets(lora_config, m))
    )
    if untargeted:
        raise ValueError(
            f"{adapter}/adapter_config.json: target_modules {cfg.get('target_modules')!r} do not "
            f"name {len(untargeted)} module(s) that {_ADAPTER_WEIGHTS} holds LoRA weights for "
            f"(e.g. {untargeted[:3]}); peft would drop those weights silently"
        )
    # exact transformers module names: the name rules were applied above, on the original names
    lora_config.target_modules = sorted(trained)
    lora_config.layers_to_transform = lora_config.layers_pattern = None
    lora_config.exclude_modules = None
    lora_config.inference_mode = True
    if _same_base(lora_config.base_model_name_or_path, model.name_or_path):
        # NOTE: peft warns "base_model_name_or_path was renamed" whenever the strings differ
        # (a relative vs an absolute path of the same base); keep the warning for another base.
        lora_config.base_model_name_or_path = model.name_or_path
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


def original_target_modules(wrapped: set[str], universe: set[str]) -> list[str] | str:
    """`target_modules` naming exactly the original module names `wrapped` among `universe`
    (all original module names of the base), under peft's matching rule.

    The plain list of leaf names when it is exact (attention-only LLaDA adapters:
    `attn_out, k_proj, q_proj, v_proj`); else a regex. A list with LLaDA's `ff_out` (the MLP down
    projection `blocks.N.ff_out`) would also wrap the output head `model.transformer.ff_out`, so
    such adapters get `.*\\.blocks\\.\\d+\\.(attn_out|ff_out|...)` (per-layer modules of all
    layers), or an alternation of the full names when only some layers are wrapped.
    """
    from peft import LoraConfig

    def exact(target) -> bool:
        config = LoraConfig(target_modules=target)
        return {m for m in universe if _targets(config, m)} == wrapped

    leaves = sorted({m.rsplit(".", 1)[-1] for m in wrapped})
    if exact(leaves):
        return leaves
    per_layer = [re.fullmatch(r"(?:.*\.)?([^.]+)\.\d+\.[^.]+", m) for m in wrapped]
    parents = {m.group(1) for m in per_layer if m is not None}
    if None not in per_layer and len(parents) == 1:
        pattern = rf".*\.{re.escape(parents.pop())}\.\d+\.({'|'.join(map(re.escape, leaves))})"
        if exact(pattern):
            return pattern
    pattern = "(" + "|".join(re.escape(m) for m in sorted(wrapped)) + ")"
    assert exact(pattern), pattern  # full names: exact by construction
    return pattern


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
    names = _module_names((peft_model.state_dict() if state_dict is None else state_dict), spec)
    wrapped = {names[_lora_module(k)] for k in adapter_state}
    cfg = peft_model.peft_config["default"].to_dict()
    # NOTE: the targets are written in the original module names, so that peft on the original
    # modeling code (the authors' stack) wraps exactly the modules this file holds weights for.
    cfg["target_modules"] = original_target_modules(wrapped, set(names.values()))
    cfg["layers_to_transform"] = cfg["layers_pattern"] = cfg["exclude_modules"] = None
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(out / _ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return out
