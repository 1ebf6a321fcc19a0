"""A content-addressed cache of what is slow to parse at rule load: YAML files' plain values and FHIRPath
syntax trees. Entries are keyed by a hash of the input (and the parser's version), so an edited file or
expression simply misses; nothing is ever invalidated by hand. JSON on disk, and a copy in memory for
processes that load rule sets again and again (hot reload, tests).

NUDGES_CACHE_DIR names the folder ("" turns the disk cache off); by default the user's cache folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, TypeVar

import orjson

T = TypeVar("T")
_memory: dict[str, Any] = {}
_MEMORY_LIMIT = 20_000


def folder() -> Path | None:
    configured = os.environ.get("NUDGES_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nudges"


def key(kind: str, *parts: bytes) -> str:
    digest = hashlib.sha256(kind.encode())
    for part in parts:
        digest.update(b"\0" + part)
    return f"{kind}-{digest.hexdigest()}"


def lookup(entry: str) -> Any:
    """The cached value, or None."""
    if entry in _memory:
        return _memory[entry]
    base = folder()
    if base is None:
        return None
    try:
        value = orjson.loads((base / entry.split("-", 1)[0] / f"{entry}.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    _remember(entry, value)
    return value


def store(entry: str, value: Any) -> None:
    """Keep `value` if it is plain JSON (anything else would not come back the same)."""
    try:
        blob = orjson.dumps(value)
    except TypeError:
        return
    if orjson.loads(blob) != value:
        return
    _remember(entry, value)
    base = folder()
    if base is None:
        return
    path = base / entry.split("-", 1)[0] / f"{entry}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(blob)
        temporary.replace(path)  # atomic: a concurrent reader sees the whole entry or none
    except OSError:
        pass  # a read-only or full cache only costs speed


def _remember(entry: str, value: Any) -> None:
    keep(_memory, entry, value, _MEMORY_LIMIT)


def keep(memory: dict[Any, Any], key: Any, value: T, limit: int) -> T:
    """`value` kept in an in-process memory under `key`; a memory at `limit` is emptied first, in one step
    (a rule set reloaded many times over fills it; never evicted entry by entry, so two rule loads on two
    threads cannot trip over each other). Every such memory of the rule load goes through here."""
    if len(memory) >= limit:
        memory.clear()
    memory[key] = value
    return value
