"""What the console keeps between requests: results that depend only on the served rule set (its cases,
a replay of the fixture calls), computed once per rule-set version. Never patient data: the playground
keeps nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request

T = TypeVar("T")


class ConsoleState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Any] = {}

    def once(self, kind: str, version: str, compute: Callable[[], T]) -> T:
        """`compute()` for this rule-set version, once (other versions are dropped: they are not served)."""
        key = (kind, version)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = compute()
        with self._lock:
            for old in [k for k in self._cache if k[0] == kind and k != key]:
                del self._cache[old]
            self._cache[key] = value
        return value


async def console_state(request: Request) -> ConsoleState:
    state: ConsoleState | None = getattr(request.app.state, "console", None)
    if state is None:
        state = request.app.state.console = ConsoleState()
    return state
