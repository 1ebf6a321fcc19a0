"""The one clock every time comparison goes through, so replays and tests can pin "now"."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class FixedClock:
    """A pinned instant (NUDGES_NOW, rule test cases); `advance` lets tests move time forward."""

    instant: datetime

    def now(self) -> datetime:
        return self.instant

    def advance(self, **kwargs: float) -> None:
        from datetime import timedelta

        self.instant = self.instant + timedelta(**kwargs)


def parse_instant(text: str) -> datetime:
    """Parse an ISO 8601 instant; a value without an offset is taken as UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def clock_for(now: str | None) -> Clock:
    return FixedClock(parse_instant(now)) if now else SystemClock()
