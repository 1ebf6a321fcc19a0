"""The outbox: one row per push of a fired follow-up card (a Communication, a Task, a webhook), written
in the same transaction that stores the card, so a card that fired always has its deliveries.

    pending ──claim──► sending ──2xx──► sent
       ▲                  │
       └──── failed ◄─────┤ (5xx, 408, 429, timeout, connection: retried with backoff)
                          └──► dead (4xx, or max attempts: kept, counted in /metrics and /readyz)

A row is claimed by exactly one worker across replicas (FOR UPDATE SKIP LOCKED on PostgreSQL, one
UPDATE on SQLite, as follow-ups are). A row left `sending` longer than the lease (its replica died
between claim and answer) is claimed again; the FHIR write is a conditional create on the card's uuid
and a webhook keeps its `webhook-id`, so sending twice never makes two.

`payload` holds what the push says (the card, the patient and encounter references): it is emptied
once sent; a dead row keeps it so an operator can requeue it (`nudges deliveries retry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    and_,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ..store import Store, aware, metadata

deliveries = Table(
    "deliveries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("card_uuid", String(36), nullable=False),  # the Communication/Task identifier, the webhook-id
    Column("target", String(140), nullable=False),  # communication | task | webhook:<endpoint>
    Column("channel", String(16), nullable=False),
    Column("rule_id", String(128), nullable=False),
    Column("patient_hash", String(64), nullable=False),
    Column("fhir_server", String(512)),  # where FHIR writes go (and participants are read)
    Column("payload", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # pending | sending | sent | failed | dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("claimed_by", String(64)),
    Column("claimed_at", DateTime(timezone=True)),
    Column("last_error", String(300)),  # what went wrong, without patient data
    Column("location", String(512)),  # what the receiver answered: the resource written, or the status
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    UniqueConstraint("card_uuid", "target", name="uq_deliveries_card_target"),
    Index("ix_deliveries_status_due", "status", "due_at"),
)

STATUSES = ("pending", "sending", "sent", "failed", "dead")
WAITING = ("pending", "failed")  # to be sent when due


@dataclass(frozen=True)
class Delivery:
    id: int
    card_uuid: str
    target: str
    channel: str
    rule_id: str
    patient_hash: str
    fhir_server: str | None
    payload: dict[str, Any]
    attempts: int
    claimed_by: str | None


def _delivery(row: Any) -> Delivery:
    return Delivery(row.id, row.card_uuid, row.target, row.channel, row.rule_id, row.patient_hash, row.fhir_server,
                    row.payload or {}, row.attempts, row.claimed_by)


def enqueue(conn: Connection, rows: list[dict[str, Any]], now: datetime) -> None:
    """Queue deliveries inside the caller's transaction; a (card, target) already queued is left alone."""
    if not rows:
        return
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    values = [{**row, "status": "pending", "attempts": 0, "due_at": now, "created_at": now} for row in rows]
    conn.execute(dialect_insert(deliveries).values(values)
                 .on_conflict_do_nothing(index_elements=["card_uuid", "target"]))


def claim_due(store: Store, worker: str, limit: int, now: datetime, lease: timedelta) -> list[Delivery]:
    """Claim up to `limit` due deliveries for `worker`, each by exactly one worker (see followups.claim_due)."""
    claimable = or_(and_(deliveries.c.status.in_(WAITING), deliveries.c.due_at <= now),
                    and_(deliveries.c.status == "sending", deliveries.c.claimed_at < now - lease))
    due = select(deliveries.c.id).where(claimable).order_by(deliveries.c.due_at, deliveries.c.id).limit(limit)
    if store.dialect == "postgresql":
        due = due.with_for_update(skip_locked=True)
    statement = (update(deliveries).where(deliveries.c.id.in_(due.scalar_subquery()), claimable)
                 .values(status="sending", claimed_by=worker, claimed_at=now, attempts=deliveries.c.attempts + 1)
                 .returning(*deliveries.c))
    with store.engine.begin() as conn:
        rows = conn.execute(statement).all()
    return sorted((_delivery(r) for r in rows), key=lambda d: d.id)


def _mine(delivery: Delivery, worker: str) -> Any:
    return and_(deliveries.c.id == delivery.id, deliveries.c.claimed_by == worker, deliveries.c.status == "sending")


def mark_sent(conn: Connection, delivery: Delivery, worker: str, location: str | None, now: datetime) -> bool:
    """Inside the caller's transaction (which also drops the waiting card): False if no longer ours."""
    result = conn.execute(update(deliveries).where(_mine(delivery, worker)).values(
        status="sent", payload={}, sent_at=now, location=(location or "")[:512] or None, last_error=None,
        claimed_by=None))
    return result.rowcount == 1


def retry(store: Store, delivery: Delivery, worker: str, due_at: datetime, error: str) -> bool:
    with store.engine.begin() as conn:
        result = conn.execute(update(deliveries).where(_mine(delivery, worker)).values(
            status="failed", due_at=due_at, claimed_by=None, claimed_at=None, last_error=error[:300]))
    return result.rowcount == 1


def kill(store: Store, delivery: Delivery, worker: str, error: str) -> bool:
    """Give up on a delivery: it stays, `dead`, with its payload and the last error, until requeued."""
    with store.engine.begin() as conn:
        result = conn.execute(update(deliveries).where(_mine(delivery, worker)).values(
            status="dead", claimed_by=None, last_error=error[:300]))
    return result.rowcount == 1


def requeue_dead(store: Store, now: datetime, ids: list[int] | None = None) -> int:
    """Dead deliveries (all, or these ids) back to pending with a fresh count of attempts."""
    where = [deliveries.c.status == "dead"]
    if ids:
        where.append(deliveries.c.id.in_(ids))
    with store.engine.begin() as conn:
        result = conn.execute(update(deliveries).where(*where).values(status="pending", attempts=0, due_at=now))
    return int(result.rowcount)


def statuses(store: Store, ids: list[int]) -> dict[int, str]:
    """The status of each of these deliveries that exists."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(deliveries.c.id, deliveries.c.status).where(deliveries.c.id.in_(ids))).all()
    return {int(row[0]): str(row[1]) for row in rows}


def counts(store: Store) -> dict[str, int]:
    """Deliveries per status (every status present, 0 when none)."""
    with store.engine.connect() as conn:
        statement = select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
        found = {str(row[0]): int(row[1]) for row in conn.execute(statement)}
    return {status: int(found.get(status, 0)) for status in STATUSES}


def dead(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    """The dead deliveries, newest first, as an operator sees them (no payload: it names the patient)."""
    columns = (deliveries.c.id, deliveries.c.rule_id, deliveries.c.target, deliveries.c.attempts,
               deliveries.c.last_error, deliveries.c.created_at)
    with store.engine.connect() as conn:
        rows = conn.execute(select(*columns).where(deliveries.c.status == "dead")
                            .order_by(deliveries.c.id.desc()).limit(limit)).all()
    return [{"id": r.id, "rule": r.rule_id, "target": r.target, "attempts": r.attempts, "error": r.last_error,
             "created_at": aware(r.created_at).isoformat()} for r in rows]
