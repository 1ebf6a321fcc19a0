"""Between visits: follow-ups scheduled by FHIR notifications, and the cards they leave for the next
hook call. Tables (SQLAlchemy Core, on the shared `metadata`; created by migration 0002) and their
repository functions; every function is one short transaction.

`followups.patient_ref` is the one raw identifier the service keeps: the FHIR patient id, needed to
fetch the patient's data when the follow-up is due. It is an operational identifier, never used for
anything else, and set to NULL as soon as the follow-up completes (done or failed); the row itself
stays so the same event delivered again schedules nothing. Pending cards are stored with the hook
context placeholders (`{{context.patientId}}` and the like) still in them, filled in from the
delivering call, and their JSON is emptied once delivered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
    bindparam,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ..fhir import patient_of
from ..prefetch import render
from ..record import PatientRecord
from ..rules.compiled import CompiledClause, CompiledRule
from ..rules.fhirpath import environment, truthy
from ..store import CLAIM, LEVELS, CardRecord, Store, aware, cards, metadata
from . import outbox

log = logging.getLogger("nudges.followups")

followups = Table(
    "followups", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule_id", String(128), nullable=False),
    Column("patient_hash", String(64), nullable=False),
    Column("patient_ref", String(64)),  # FHIR patient id while pending; NULL once completed
    Column("start_ref", String(200), nullable=False),  # Type/id of the resource that started it
    Column("fhir_server", String(512)),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),  # pending | running | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_by", String(64)),
    Column("claimed_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("rule_id", "patient_hash", "start_ref", name="uq_followups_start"),
    Index("ix_followups_status_due", "status", "due_at"),
)

pending_cards = Table(
    "pending_cards", metadata,
    Column("uuid", String(36), primary_key=True),  # also the card's row in `cards`
    Column("rule_id", String(128), nullable=False),
    Column("patient_hash", String(64), nullable=False),
    Column("card", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    Index("ix_pending_cards_patient", "patient_hash", "delivered_at"),
)

LEASE = timedelta(minutes=10)  # a row still `running` after this (crashed worker) may be claimed again
MAX_ATTEMPTS = 5
FOLLOWUP_SERVICE = "nudges-followup"  # cards.service_id until a hook call delivers the card
FOLLOWUP_HOOK = "followup"  # cards.hook of a follow-up card: marks its origin for the audit
PUSH_SERVICE = "nudges-push"  # cards.service_id of a follow-up card shown by a push (Communication, Task, webhook)
# Rendered into pending cards in place of the hook context, filled in by the delivering call.
CONTEXT_PLACEHOLDERS = {name: f"{{{{context.{name}}}}}" for name in ("patientId", "userId", "encounterId")}


@dataclass(frozen=True)
class Followup:
    id: int
    rule_id: str
    patient_hash: str
    patient_ref: str | None
    start_ref: str
    fhir_server: str | None
    due_at: datetime
    status: str
    attempts: int
    claimed_by: str | None


@dataclass(frozen=True)
class PendingCard:
    uuid: str
    rule_id: str
    card: dict[str, Any]


def _followup(row: Any) -> Followup:
    return Followup(row.id, row.rule_id, row.patient_hash, row.patient_ref, row.start_ref, row.fhir_server,
                    aware(row.due_at), row.status, row.attempts, row.claimed_by)


# -- which events start a follow-up ------------------------------------------------------------
def followup_rules(rules: tuple[CompiledRule, ...]) -> list[CompiledRule]:
    return [r for r in rules if r.followup_start and r.followup_after]


def start_clause(rule: CompiledRule) -> CompiledClause | None:
    return next((c for c in rule.all if isinstance(c, CompiledClause) and c.bind == rule.followup_start), None)


def starts(rule: CompiledRule, resource: dict[str, Any], now: datetime) -> bool:
    """Does this resource match the rule's `start` clause (type, codes, `where`)? Its time limits
    are not checked here: they are judged with the whole `when` when the follow-up is due."""
    clause = start_clause(rule)
    if clause is None or "record" not in clause.sources:
        return False
    record = PatientRecord()
    record.add_all([resource], "record")
    if clause.codes is not None:
        candidates = record.with_codes("record", clause.resource, clause.codes)
    else:
        candidates = record.of_type("record", clause.resource)
    env = environment(now, {"patientId": patient_of(resource)})
    return any(clause.where is None or truthy(clause.where(r, env)) for r in candidates)


# -- follow-ups ----------------------------------------------------------------------------------
def schedule(store: Store, *, rule_id: str, patient_id: str, start_ref: str, fhir_server: str | None,
             due_at: datetime) -> bool:
    """Schedule once: False when this (rule, patient, start resource) was already scheduled, even if
    the same event arrives twice at the same moment (one INSERT ... ON CONFLICT DO NOTHING)."""
    dialect_insert = postgresql.insert if store.dialect == "postgresql" else sqlite.insert
    statement = dialect_insert(followups).values(
        rule_id=rule_id, patient_hash=store.patient_hash(patient_id), patient_ref=patient_id, start_ref=start_ref,
        fhir_server=fhir_server, due_at=due_at, status="pending", attempts=0, created_at=store.clock.now(),
    ).on_conflict_do_nothing(index_elements=["rule_id", "patient_hash", "start_ref"]).returning(followups.c.id)
    with store.engine.begin() as conn:
        return conn.execute(statement).first() is not None


def claim_due(store: Store, worker: str, limit: int, now: datetime | None = None) -> list[Followup]:
    """Claim up to `limit` due follow-ups for `worker`; each row is claimed by exactly one worker.

    PostgreSQL: the candidate rows are locked with FOR UPDATE SKIP LOCKED, so replicas claiming at
    the same moment take disjoint rows without waiting on each other. SQLite has one writer at a
    time: the single UPDATE statement is the claim. Either way the outer WHERE re-checks that the
    row is still claimable. A row left `running` longer than LEASE (its worker died) is claimable again.
    """
    now = now or store.clock.now()
    claimable = and_(followups.c.due_at <= now, or_(
        followups.c.status == "pending",
        and_(followups.c.status == "running", followups.c.claimed_at < now - LEASE)))
    due = select(followups.c.id).where(claimable).order_by(followups.c.due_at, followups.c.id).limit(limit)
    if store.dialect == "postgresql":
        due = due.with_for_update(skip_locked=True)
    statement = (update(followups).where(followups.c.id.in_(due.scalar_subquery()), claimable)
                 .values(status="running", claimed_by=worker, claimed_at=now, attempts=followups.c.attempts + 1)
                 .returning(*followups.c))
    with store.engine.begin() as conn:
        rows = conn.execute(statement).all()
    return sorted((_followup(r) for r in rows), key=lambda f: (f.due_at, f.id))


def _mine(followup: Followup, worker: str) -> Any:
    return and_(followups.c.id == followup.id, followups.c.claimed_by == worker, followups.c.status == "running")


def complete(store: Store, followup: Followup, worker: str, status: str = "done") -> bool:
    """Finish a claimed follow-up (done or failed) and purge its patient id. False if no longer ours."""
    with store.engine.begin() as conn:
        result = conn.execute(update(followups).where(_mine(followup, worker))
                              .values(status=status, patient_ref=None))
    return result.rowcount == 1


def retry(store: Store, followup: Followup, worker: str, due_at: datetime) -> str:
    """Put a claimed follow-up back for a later attempt, or fail it after MAX_ATTEMPTS."""
    if followup.attempts >= MAX_ATTEMPTS:
        complete(store, followup, worker, "failed")
        return "failed"
    with store.engine.begin() as conn:
        conn.execute(update(followups).where(_mine(followup, worker))
                     .values(status="pending", due_at=due_at, claimed_by=None, claimed_at=None))
    return "retry"


# -- pending cards -------------------------------------------------------------------------------
def store_pending(store: Store, record: CardRecord, card: dict[str, Any], *, followup: Followup | None = None,
                  worker: str | None = None, deliveries: list[dict[str, Any]] | None = None) -> str:
    """Keep a card for the patient's next hook call and record it in `cards` (audit, feedback), in one
    transaction that also completes the follow-up that raised it and queues its pushes (`deliveries`,
    outbox rows). Returns "stored"; "lost" (nothing done) when the follow-up is no longer this worker's;
    "waiting" (follow-up completed, no second card) when the patient already has this rule's card waiting."""
    with store.engine.begin() as conn:
        if followup is not None:
            done = conn.execute(update(followups).where(_mine(followup, worker or ""))
                                .values(status="done", patient_ref=None))
            if done.rowcount != 1:
                return "lost"  # nothing was written
        waiting = conn.execute(select(pending_cards.c.uuid).where(
            pending_cards.c.patient_hash == record.patient_hash, pending_cards.c.rule_id == record.rule_id,
            pending_cards.c.delivered_at.is_(None))).first()
        if waiting is not None:
            return "waiting"
        conn.execute(insert(cards).values(record.row()))
        conn.execute(insert(pending_cards).values(uuid=record.uuid, rule_id=record.rule_id,
                                                  patient_hash=record.patient_hash, card=card,
                                                  created_at=record.issued_at))
        outbox.enqueue(conn, deliveries or [], record.issued_at)
    return "stored"


def acknowledge(conn: Connection, card_uuid: str, now: datetime, hook_instance: str, window: timedelta,
                dialect: str) -> bool:
    """A push of this card was acknowledged (inside the caller's transaction): the waiting card is dropped,
    so nobody sees the same nudge again at the next hook call, and the card counts as shown, attributed
    to the push; like any card shown and not yet answered it holds its focus (the chart) for `window`
    (suppression.ignored), so opening the chart right after the page does not repeat it. False when a
    hook call had already shown it (or a first push already acknowledged it)."""
    taken = conn.execute(update(pending_cards).where(pending_cards.c.uuid == card_uuid,
                                                     pending_cards.c.delivered_at.is_(None))
                         .values(delivered_at=now, card={}))
    if taken.rowcount != 1:
        return False
    conn.execute(update(cards).where(cards.c.uuid == card_uuid)
                 .values(service_id=PUSH_SERVICE, hook_instance=hook_instance[:64]))
    row = conn.execute(select(cards.c.patient_hash, cards.c.rule_id, cards.c.focus, cards.c.indicator)
                       .where(cards.c.uuid == card_uuid)).first()
    if row is not None:
        conn.execute(CLAIM[dialect], {"patient_hash": row.patient_hash, "rule_id": row.rule_id,
                                      "focus": row.focus or "", "card_uuid": card_uuid, "shown_at": now,
                                      "shown_until": now + window, "level": LEVELS.get(row.indicator, 0)})
    return True


# A patient's waiting cards young enough to show (older ones are left for expire_pending); asked on
# every hook call, so built once (see store.LAST_SHOWN).
WAITING = (pending_cards.c.patient_hash == bindparam("who"), pending_cards.c.delivered_at.is_(None),
           pending_cards.c.created_at >= bindparam("oldest"))
ANY_WAITING = select(pending_cards.c.uuid).where(*WAITING).limit(1)


def expire_pending(store: Store, max_age: timedelta, now: datetime | None = None) -> int:
    """Drop waiting cards older than `max_age`, and their `cards` rows: a card that was never shown
    is not counted as shown, and a stale nudge is worse than none. Returns how many were dropped."""
    cutoff = (now or store.clock.now()) - max_age
    with store.engine.begin() as conn:
        stale = [row.uuid for row in conn.execute(select(pending_cards.c.uuid).where(
            pending_cards.c.delivered_at.is_(None), pending_cards.c.created_at < cutoff))]
        for start in range(0, len(stale), 500):
            chunk = stale[start:start + 500]
            conn.execute(delete(cards).where(cards.c.uuid.in_(chunk)))
            conn.execute(delete(pending_cards).where(pending_cards.c.uuid.in_(chunk),
                                                     pending_cards.c.delivered_at.is_(None)))
    return len(stale)


def oldest_waiting(now: datetime, max_age: timedelta | None) -> datetime:
    """The creation time from which a waiting card may still be shown (older ones are expire_pending's)."""
    return now - max_age if max_age is not None else datetime.min.replace(tzinfo=UTC)


def take_pending(store: Store, patient_hash: str, *, service_id: str, hook_instance: str,
                 live_rules: frozenset[str] | set[str] = frozenset(), now: datetime | None = None,
                 max_age: timedelta | None = None) -> list[PendingCard]:
    """The patient's waiting cards, marked delivered by the same statement that reads them, so each
    surfaces exactly once however many calls race; the stored JSON is emptied. A waiting card whose
    rule fired live in this call (`live_rules`: the live card is fresher), or a second one for a rule,
    is dropped. The `cards` rows of those returned are attributed to the delivering service, where
    the EHR will send feedback. A hook call asks only when its write (showing.py) found cards waiting."""
    now = now or store.clock.now()
    # "who": a column's own name is reserved in UPDATE
    params = {"who": patient_hash, "oldest": oldest_waiting(now, max_age)}
    with store.transaction() as conn:
        if not store.prepared("any-waiting", lambda: ANY_WAITING).rows(conn, params):  # another call took them
            return []
        rows = conn.execute(
            update(pending_cards)
            .where(*WAITING)
            .values(delivered_at=now)
            .returning(pending_cards.c.uuid, pending_cards.c.rule_id, pending_cards.c.card,
                       pending_cards.c.created_at), params).all()
        shown: list[PendingCard] = []
        seen = set(live_rules)
        for row in sorted(rows, key=lambda r: (aware(r.created_at), r.uuid)):
            if row.rule_id not in seen and row.card:
                seen.add(row.rule_id)
                shown.append(PendingCard(row.uuid, row.rule_id, row.card))
        if rows:
            conn.execute(update(pending_cards).where(pending_cards.c.uuid.in_([r.uuid for r in rows]))
                         .values(card={}))
        if shown:
            conn.execute(update(cards).where(cards.c.uuid.in_([p.uuid for p in shown]))
                         .values(service_id=service_id, hook_instance=hook_instance[:64]))
    return shown


def fill_context(value: Any, context: dict[str, Any]) -> Any:
    """Put the delivering call's context into a pending card's placeholders."""
    if isinstance(value, str):
        return render(value, context) if "{{" in value else value
    if isinstance(value, list):
        return [fill_context(v, context) for v in value]
    if isinstance(value, dict):
        return {k: fill_context(v, context) for k, v in value.items()}
    return value
