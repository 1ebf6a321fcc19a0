"""Managed Subscriptions (R4 Subscriptions Backport IG) as the service keeps them: which subscription
each secret belongs to, and which of its events have arrived.

Each subscription nudges creates carries its own secret in `channel.header` (`Authorization: Bearer
nsub_...`); only its SHA-256 is stored. A notification is authenticated by that secret, and the secret
names the subscription: the row is written before the Subscription is created, so a handshake that
arrives before the server's create response (servers queue it right after the commit) is recognised.

Event numbers (`event-number`, `events-since-subscription-start`) tell what was missed: `last_event` is
the number up to which everything has arrived, `above` the numbers beyond it that arrived early
(servers deliver from several threads, out of order). Anything between is missing; once that lasts
longer than the grace period, or heartbeats stop, the subscription is degraded and recovered
(events/subscriber.py).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any, overload

from sqlalchemy import JSON, Column, DateTime, Integer, String, Table, delete, insert, or_, select, update

from ..store import Store, aware, metadata

subscriptions = Table(
    "subscriptions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("server", String(512), nullable=False),  # FHIR base
    Column("topic", String(512), nullable=False),  # SubscriptionTopic canonical
    Column("filter", String(512)),  # backport filter criteria
    Column("endpoint", String(512), nullable=False),
    Column("resource_id", String(128)),  # the server's Subscription id, once known
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # requested | active | degraded | retired
    Column("server_status", String(16)),  # as the server last said: requested | active | error | off
    Column("heartbeat_seconds", Integer, nullable=False),
    Column("resource_types", JSON, nullable=False),  # what the topic notifies about (recovery searches these)
    Column("last_event", Integer, nullable=False, default=0),  # every event up to this one has arrived
    Column("above", JSON, nullable=False),  # {number: server timestamp} arrived beyond last_event
    Column("server_events", Integer),  # events-since-subscription-start, as last reported
    Column("last_event_at", String(40)),  # server time of event `last_event` (or of the handshake)
    Column("last_seen_at", DateTime(timezone=True)),  # last notification of any kind (our clock)
    Column("gap_since", DateTime(timezone=True)),  # when the current gap was first seen
    Column("reason", String(300)),  # why degraded
    Column("checked_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

SECRET_PREFIX = "nsub_"
MAX_ABOVE = 1000  # early arrivals kept; beyond this the gap is recovered by search anyway


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Managed:
    id: int
    server: str
    topic: str
    filter: str | None
    endpoint: str
    resource_id: str | None
    status: str
    server_status: str | None
    heartbeat_seconds: int
    resource_types: tuple[str, ...]
    last_event: int
    above: dict[int, str] = field(default_factory=dict)
    server_events: int | None = None
    last_event_at: str | None = None
    last_seen_at: datetime | None = None
    gap_since: datetime | None = None
    reason: str | None = None

    @property
    def reference(self) -> str | None:
        return f"{self.server}/Subscription/{self.resource_id}" if self.resource_id else None

    @property
    def missing(self) -> Missing:
        """Event numbers the server has sent (or counted) that have not arrived."""
        return missing(self.last_event, self.above, self.server_events)


def missing(last_event: int, above: dict[int, str], server_events: int | None) -> Missing:
    top = max([server_events or 0, *above])
    return Missing(last_event, above, top)


class Missing(Sequence[int]):
    """The event numbers after `last_event` up to `top` that have not arrived (those in `above` have),
    without listing them: a server's count can run millions ahead after an outage, or be absurd in a
    hostile heartbeat, and a list of them was built while the request waited (gigabytes, a hung replica).
    Read as a sequence: its length, its first and last, a short slice."""

    def __init__(self, last_event: int, above: Iterable[int], top: int) -> None:
        self._span = range(last_event + 1, max(top, last_event) + 1)
        self._above = sorted(n for n in above if last_event < n <= top)

    def __len__(self) -> int:
        return len(self._span) - len(self._above)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, list | tuple | Missing) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a view of changing numbers, compared by value

    def __iter__(self) -> Iterator[int]:
        held = set(self._above)
        return (n for n in self._span if n not in held)

    def __reversed__(self) -> Iterator[int]:
        held = set(self._above)
        return (n for n in reversed(self._span) if n not in held)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):  # a short head ([:20]) is all anyone reads
            start, stop, step = index.indices(len(self))
            return list(islice(iter(self), start, stop, step))
        size = len(self)
        if not -size <= index < size:
            raise IndexError(index)
        return next(islice(iter(self), index, None)) if index >= 0 else next(islice(reversed(self), -index - 1, None))


def _managed(row: Any) -> Managed:
    return Managed(row.id, row.server, row.topic, row.filter, row.endpoint, row.resource_id, row.status,
                   row.server_status, row.heartbeat_seconds, tuple(row.resource_types or ()), row.last_event,
                   {int(k): v for k, v in (row.above or {}).items()}, row.server_events, row.last_event_at,
                   aware(row.last_seen_at) if row.last_seen_at else None,
                   aware(row.gap_since) if row.gap_since else None, row.reason)


# -- rows ----------------------------------------------------------------------------------------------
def add(store: Store, *, server: str, topic: str, filter: str | None, endpoint: str, heartbeat_seconds: int,
        resource_types: list[str], secret: str) -> int:
    """Record a subscription about to be created (before the create, for the early handshake)."""
    with store.engine.begin() as conn:
        return int(conn.execute(insert(subscriptions).values(
            server=server, topic=topic, filter=filter, endpoint=endpoint, secret_hash=secret_hash(secret),
            status="requested", heartbeat_seconds=heartbeat_seconds, resource_types=resource_types, last_event=0,
            above={}, created_at=store.clock.now()).returning(subscriptions.c.id)).scalar_one())


def bind(store: Store, row_id: int, resource_id: str) -> bool:
    """Record the server's id from the create response; False if a handshake bound another one."""
    with store.engine.begin() as conn:
        conn.execute(update(subscriptions).where(subscriptions.c.id == row_id, subscriptions.c.resource_id.is_(None))
                     .values(resource_id=resource_id))
        bound = conn.execute(select(subscriptions.c.resource_id).where(subscriptions.c.id == row_id)).scalar()
    return bool(bound == resource_id)


def forget(store: Store, row_id: int) -> None:
    """A create that never happened: the secret is refused from now on."""
    with store.engine.begin() as conn:
        conn.execute(delete(subscriptions).where(subscriptions.c.id == row_id))


def set_status(store: Store, row_id: int, status: str, *, reason: str | None = None,
               server_status: str | None = None) -> None:
    values: dict[str, Any] = {"status": status, "reason": reason[:300] if reason else None}
    if server_status is not None:
        values["server_status"] = server_status
    with store.engine.begin() as conn:
        conn.execute(update(subscriptions).where(subscriptions.c.id == row_id).values(**values))


def live(store: Store, server: str | None = None) -> list[Managed]:
    """Every subscription not retired (of one server), oldest first."""
    statement = select(subscriptions).where(subscriptions.c.status != "retired").order_by(subscriptions.c.id)
    if server is not None:
        statement = statement.where(subscriptions.c.server == server)
    with store.engine.connect() as conn:
        return [_managed(r) for r in conn.execute(statement)]


def retired(store: Store, server: str) -> list[Managed]:
    with store.engine.connect() as conn:
        return [_managed(r) for r in conn.execute(select(subscriptions).where(
            subscriptions.c.status == "retired", subscriptions.c.server == server))]


def get(store: Store, row_id: int) -> Managed | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(subscriptions).where(subscriptions.c.id == row_id)).first()
    return _managed(row) if row is not None else None


def by_secret(store: Store, secret: str) -> Managed | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(subscriptions).where(subscriptions.c.secret_hash == secret_hash(secret))).first()
    return _managed(row) if row is not None else None


def is_managed(store: Store, reference: str) -> bool:
    """Does this subscription reference (absolute, or Subscription/id) name one of ours, retired or not?"""
    resource_id = reference.rstrip("/").rsplit("/", 1)[-1]
    with store.engine.connect() as conn:
        rows = conn.execute(select(subscriptions.c.server).where(subscriptions.c.resource_id == resource_id)).all()
    return any(reference in (f"{r.server}/Subscription/{resource_id}", f"Subscription/{resource_id}") for r in rows)


# -- what has arrived ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heard:
    """One notification's bookkeeping: its kind, the server's status and count, and the events in it."""

    kind: str
    status: str | None
    events_since: int | None
    events: list[tuple[int, str | None]]  # (event-number, timestamp)
    timestamp: str | None  # the Bundle's (server time)


def observe(store: Store, managed: Managed, heard: Heard, resource_id: str | None) -> Managed:
    """Record a notification for `managed` and return the updated state. The row is written first, so
    concurrent notifications for one subscription take turns (a row lock on PostgreSQL, the write lock on
    SQLite) and none of their event numbers is lost."""
    now = store.clock.now()
    where = subscriptions.c.id == managed.id
    with store.engine.begin() as conn:
        conn.execute(update(subscriptions).where(where).values(last_seen_at=now))
        row = conn.execute(select(subscriptions).where(where)).one()
        last, above = row.last_event, {int(k): v for k, v in (row.above or {}).items()}
        last_at = row.last_event_at or heard.timestamp
        for number, stamp in heard.events:
            if number > last:
                above[number] = stamp or heard.timestamp or ""
        while last + 1 in above:
            last += 1
            last_at = above.pop(last) or last_at
        server_events = max(row.server_events or 0, heard.events_since or 0, last)
        gap = bool(missing(last, above, server_events))
        values: dict[str, Any] = {
            "last_event": last, "above": {str(k): v for k, v in sorted(above.items())[:MAX_ABOVE]},
            "server_events": server_events, "last_event_at": last_at,
            "gap_since": (aware(row.gap_since) if row.gap_since else now) if gap else None,
            "server_status": heard.status or row.server_status}
        if resource_id and row.resource_id is None:
            values["resource_id"] = resource_id
        if row.status == "requested" and heard.kind in ("handshake", "heartbeat", "event-notification"):
            values["status"] = "active"
        conn.execute(update(subscriptions).where(where).values(**values))
        return _managed(conn.execute(select(subscriptions).where(where)).one())


def claim_check(store: Store, row_id: int, now: datetime, since: datetime) -> bool:
    """One replica checks a subscription per interval: the first to move `checked_at` past `since` wins."""
    with store.engine.begin() as conn:
        result = conn.execute(update(subscriptions).where(
            subscriptions.c.id == row_id,
            or_(subscriptions.c.checked_at.is_(None), subscriptions.c.checked_at <= since)).values(checked_at=now))
    return result.rowcount == 1


def caught_up(store: Store, row_id: int, through: int, last_event_at: str | None) -> None:
    """Everything up to `through` is accounted for (recovered by search or `$events`)."""
    with store.engine.begin() as conn:
        row = conn.execute(select(subscriptions).where(subscriptions.c.id == row_id)).one()
        top = max(through, row.last_event)
        above = {k: v for k, v in (row.above or {}).items() if int(k) > top}
        # the count caught up to is the server's own ($status): a higher one heard before (a stray or
        # hostile notification) would otherwise keep the subscription degraded for good
        conn.execute(update(subscriptions).where(subscriptions.c.id == row_id).values(
            last_event=top, above=above, server_events=top,
            last_event_at=last_event_at or row.last_event_at, gap_since=None, status="active", reason=None))


def counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(subscriptions.c.status, subscriptions.c.id)).all()
    found: dict[str, int] = {"requested": 0, "active": 0, "degraded": 0}
    for status, _ in rows:
        if status != "retired":
            found[status] = found.get(status, 0) + 1
    return found
