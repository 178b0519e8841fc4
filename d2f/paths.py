"""The one rule for "is this a local path or a hub id?" (models, adapters, tokenizers, datasets).

A source is **local** when it exists on disk, when it is written as a path (starts with `/`, `.` or
`~`, has more than one `/`, or ends in a data-file suffix), or when it has the hub's `owner/name`
shape but `owner` is an existing local directory (`runs/adapter` inside a checkout with `runs/`).
Everything else of the form `owner/name` (or a bare `name`) is a **hub id**. A local source that
does not exist is an error at once: it is never sent to the hub (offline that costs ~25 s of
retries, online it could fetch an unrelated repository).

`resolve_file` finds one file of a checkpoint (model, adapter, tokenizer) by that rule: in the local
directory, or through the hub cache; `read_json` and `check_safetensors` read such files and name
the file in every error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from safetensors import SafetensorError, safe_open

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_local(source: str | os.PathLike) -> bool:
    """True when `source` names a local path (see the module docstring), False for a hub id."""
    text = os.fspath(source)
    if os.path.exists(os.path.expanduser(text)):
        return True
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith(DATA_SUFFIXES):
        return True
    if text.count("/") == 1:
        return Path(text.split("/", 1)[0]).expanduser().is_dir()
    return False


def missing(source: str | os.PathLike, what: str = "directory") -> str:
    """The message for a source that is neither an existing local path nor reachable on the hub."""
    text = os.fspath(source)
    if is_local(text):
        return f"{text}: no such {what} (a local path: it is not looked up on the hub)"
    return f"{text}: no such local {what}, and not found as a hub id"


def resolve_file(
    name_or_path: str | os.PathLike, filename: str, required: bool = True
) -> str | None:
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


def read_json(path: str | os.PathLike, what: str = "a JSON object") -> dict[str, Any]:
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


def check_safetensors(path: str | os.PathLike) -> None:
    """Read a safetensors header (cheap: no tensor is loaded); a broken file names itself."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({err})"
        ) from None
