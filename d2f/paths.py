"""The one rule for "is this a local path or a hub id?" (models, adapters, tokenizers, datasets).

A source is **local** when it exists on disk, when it is written as a path (starts with `/`, `.` or
`~`, has more than one `/`, or ends in a data-file suffix), or when it has the hub's `owner/name`
shape but `owner` is an existing local directory (`runs/adapter` inside a checkout with `runs/`).
Everything else of the form `owner/name` (or a bare `name`) is a **hub id**. A local source that
does not exist is an error at once: it is never sent to the hub (offline that costs ~25 s of
retries, online it could fetch an unrelated repository).
"""

from __future__ import annotations

import os
from pathlib import Path

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
