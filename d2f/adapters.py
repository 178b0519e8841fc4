"""LoRA adapters (PEFT format) onto d2f's models: load with a strict key check, save in the
original module names.

Adapters load from a hub id or directory, including adapters saved against the original module
names (LLaDA's `attn_out`, `ff_proj`, `model.transformer.blocks.N`, as a name list or a regex);
every adapter key must match, and every module the file holds LoRA weights for must be named by its
`target_modules` (peft would drop it silently otherwise). `save_adapter` writes the original
format back, so adapters made here load in the upstream tools and vice versa (docs/formats.md).
`load_model(base, adapter=...)` (`d2f.models`) is the usual entry point.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from d2f.family import FamilySpec
from d2f.paths import check_safetensors, read_json, resolve_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(adapter: str | os.PathLike) -> dict[str, Any]:
    cfg = read_json(resolve_file(adapter, "adapter_config.json"))
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
    cfg = dict(adapter_config or read_adapter_config(adapter))
    lora_fields = set(LoraConfig.__dataclass_fields__)
    try:
        lora_config = LoraConfig(**{k: v for k, v in cfg.items() if k in lora_fields})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{adapter}/adapter_config.json: invalid LoRA config ({err})") from None
    weights = resolve_file(adapter, ADAPTER_WEIGHTS)
    check_safetensors(weights)
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
            f"name {len(untargeted)} module(s) that {ADAPTER_WEIGHTS} holds LoRA weights for "
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
        str(out / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return out
