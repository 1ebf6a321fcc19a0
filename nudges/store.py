"""Persistence (SQLAlchemy 2 Core): cards issued, feedback, suppression state, replayed-token guard,
service secrets.

Only keyed hashes of patient ids (and of what a card is about: an encounter, an order, an appointment)
and coarse demographic buckets are stored: no names, no raw identifiers, no tokens. The same code runs
on SQLite (embedded default) and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    create_engine,
    event,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.sql import ClauseElement

from .clock import Clock
from .prepared import DriverConnection, Prepared
from .writers import HeldSqlite, Writers

T = TypeVar("T")

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

cards = Table(
    "cards", metadata,
    Column("uuid", String(36), primary_key=True),
    Column("service_id", String(64), nullable=False),
    Column("rule_id", String(128), nullable=False),
    Column("rule_version", String(32), nullable=False),
    Column("hook", String(64), nullable=False),
    Column("hook_instance", String(64), nullable=False),
    Column("patient_hash", String(64), nullable=False),
    Column("race", String(64), nullable=False),
    Column("ethnicity", String(64), nullable=False),
    Column("language", String(32), nullable=False),
    Column("payer_class", String(64), nullable=False),
    Column("tenant", String(128)),
    Column("indicator", String(16), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("focus", String(64)),  # keyed hash of what the card is about (suppression.py); NULL before 0003
    Index("ix_cards_patient_rule", "patient_hash", "rule_id", "issued_at"),
    Index("ix_cards_issued_at", "issued_at"),
)

feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fingerprint", String(64), nullable=False, unique=True),
    Column("card_uuid", String(36), nullable=False, index=True),
    Column("service_id", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("accepted_suggestions", JSON),
    Column("override_system", String(256)),
    Column("override_code", String(128)),
    Column("has_comment", Boolean, nullable=False, default=False),
    Column("outcome_timestamp", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

# One row per (patient, rule, focus): whether a card about that focus may be shown now. A display sets
# `shown_until` (the short window of a card nobody answered); feedback sets `feedback_until`, and only the
# feedback with the latest outcomeTimestamp (ties: the larger fingerprint) ever does, whatever order it
# arrives in. Both are changed by single INSERT ... ON CONFLICT DO UPDATE ... WHERE statements, so two
# replicas deciding at once cannot both show a card, and late feedback cannot overwrite newer feedback.
suppressions = Table(
    "suppressions", metadata,
    Column("patient_hash", String(64), primary_key=True),
    Column("rule_id", String(128), primary_key=True),
    Column("focus", String(64), primary_key=True),
    Column("card_uuid", String(36)),  # the last card shown for this focus
    Column("shown_at", DateTime(timezone=True)),
    Column("shown_until", DateTime(timezone=True), nullable=False),
    Column("level", Integer),  # how urgent the last card shown was: 0 info, 1 warning, 2 critical
    Column("feedback_at", DateTime(timezone=True)),  # outcomeTimestamp of the feedback in force
    Column("feedback_key", String(64)),  # its fingerprint: the tie-break between equal timestamps
    Column("feedback_until", DateTime(timezone=True)),
    Column("outcome", String(16)),
    Column("reason_code", String(128)),
)

seen_tokens = Table(
    "seen_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)


@dataclass(frozen=True)
class Bucket:
    """Demographic bucket recorded at issue time, only for the equity audit."""

    race: str = "unknown"
    ethnicity: str = "unknown"
    language: str = "unknown"
    payer_class: str = "unknown"


@dataclass(frozen=True)
class CardRecord:
    uuid: str
    service_id: str
    rule_id: str
    rule_version: str
    hook: str
    hook_instance: str
    patient_hash: str
    bucket: Bucket
    indicator: str
    issued_at: datetime
    tenant: str | None = None
    focus: str | None = None  # keyed hash of what the card is about (suppression.focus_of)

    def row(self) -> dict[str, Any]:
        """Shallow on purpose: `dataclasses.asdict` deep-copies every value (the datetimes too), which
        cost more than the card's insert on SQLite."""
        data = {k: v for k, v in vars(self).items() if k != "bucket"}
        data.update(vars(self.bucket))
        return data


@dataclass(frozen=True)
class FeedbackRecord:
    card_uuid: str
    service_id: str
    outcome: str
    outcome_timestamp: datetime
    accepted_suggestions: tuple[str, ...] = ()
    override_system: str | None = None
    override_code: str | None = None
    has_comment: bool = False

    def fingerprint(self) -> str:
        parts = [self.card_uuid, self.service_id, self.outcome, self.outcome_timestamp.isoformat(),
                 ",".join(sorted(self.accepted_suggestions)), self.override_system or "",
                 self.override_code or "", str(self.has_comment)]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Lockout:
    """What one piece of feedback does to its card's focus: no card about it until `until`."""

    patient_hash: str
    rule_id: str
    focus: str
    until: datetime
    reason_code: str | None = None


@dataclass(frozen=True)
class IssuedRow:
    """What feedback needs to know about the card it is about."""

    service_id: str
    rule_id: str
    patient_hash: str
    focus: str | None


SQLITE_BUSY_MS, SQLITE_SETUP_WAIT_SECONDS = 5000, 60  # a write's wait for another's; a new connection's (_wal)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    _wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _wal(cursor: Any) -> None:
    """WAL mode, waited for: switching a new file needs it to itself, and SQLite says "locked" at once there,
    not after the busy timeout (`serve --workers N` on a new database: one worker migrating, another
    connecting, had stopped the server). Once the file is in WAL mode this is one quick read."""
    deadline = time.monotonic() + SQLITE_SETUP_WAIT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# Connections kept open per process by the threads' pool: an overflow connection is closed when
# returned, and under load that meant a new PostgreSQL backend (a fork) for every few calls.
POOL_SIZE = 8


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_SIZE, pool_timeout=DATABASE_WAIT_SECONDS,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})
    event.listen(engine, "checkin", _idle_from)
    event.listen(engine, "checkout", partial(_ping_if_idle, engine))
    return engine


# How long a request waits for a database connection (a free one from the pool, or a new one) before it is
# answered 503 (api/errors.py): the pools' own default, 30 s, held a hook call, and the chart behind it,
# for 30 s whenever PostgreSQL was down.
DATABASE_WAIT_SECONDS = 2.0
CONNECT_TIMEOUT_SECONDS = 2  # libpq's connect_timeout: whole seconds


# A pooled connection idle for longer than this is pinged before use (one round trip), so that one the
# server dropped meanwhile (a restart, a failover, an idle timeout) is replaced instead of failing the
# call. Under load connections come back within milliseconds and go unpinged: pool_pre_ping cost a round
# trip on every hook call (README "Performance"). One dropped while in steady use fails its statement,
# and a hook call's transaction is then tried once more on a new connection (Store.retrying).
PING_IDLE_SECONDS = 1.0


def _idle_from(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_from"] = time.monotonic()


def _ping_if_idle(engine: Engine, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    since = record.info.get("idle_from")
    if since is None or time.monotonic() - since < PING_IDLE_SECONDS:
        return
    try:
        engine.dialect.do_ping(dbapi_connection)
    except Exception as exc:  # the pool replaces the connection and checks out another
        raise DisconnectionError("the database dropped an idle pooled connection") from exc


def _upsert(dialect: str, table: Table | None = None) -> Any:
    """An INSERT that can say what to do ON CONFLICT, in the dialect's own form (suppressions by default)."""
    table = suppressions if table is None else table
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


SUPPRESSION_KEY = ["patient_hash", "rule_id", "focus"]


LEVELS = {"info": 0, "warning": 1, "critical": 2}


CLAIM_COLUMNS = ("patient_hash", "rule_id", "focus", "card_uuid", "shown_at", "shown_until", "level")


def claim_statement(dialect: str, rows: int = 0) -> Any:
    """May a card about this focus be shown at `shown_at`? One statement decides and records it: the row
    is inserted, or updated only while neither its display window nor its feedback lockout holds, and
    RETURNING says whether it was. A concurrent claim for the same key waits for this one's row lock and
    then finds the window taken. With `rows`, the statement claims that many keys at once, its binds
    named `patient_hash_0`, `rule_id_0`, … (one round trip for all of a call's cards).

    A card more urgent than the last one shown for its focus (`escalate:`: a troponin warning that has
    become critical) is shown through the display window and through an accept (acted on, yet still no
    plan), never through an override: a clinician's explicit reason stands until its lockout ends."""
    upsert = _upsert(dialect)
    if rows:
        statement = upsert.values([{c: bindparam(f"{c}_{i}") for c in CLAIM_COLUMNS} for i in range(rows)])
    else:
        statement = upsert.values(**{c: bindparam(c) for c in CLAIM_COLUMNS})
    now = statement.excluded.shown_at
    unlocked = or_(suppressions.c.feedback_until.is_(None), suppressions.c.feedback_until <= now)
    free = and_(suppressions.c.shown_until <= now, unlocked)
    escalated = and_(suppressions.c.level < statement.excluded.level,
                     or_(suppressions.c.outcome.is_(None), suppressions.c.outcome == "accepted", unlocked))
    # The same call sent again (its hookInstance: an EHR that timed out and retried) claims the same card
    # uuid (pipeline.card_uuid) and gets its card again, unless feedback on it has come in since.
    retried = and_(suppressions.c.card_uuid == statement.excluded.card_uuid, unlocked)
    return statement.on_conflict_do_update(
        index_elements=SUPPRESSION_KEY, where=or_(free, escalated, retried),
        set_={"card_uuid": statement.excluded.card_uuid, "shown_at": now,
              "shown_until": statement.excluded.shown_until, "level": statement.excluded.level},
    ).returning(suppressions.c.rule_id, suppressions.c.focus)


def feedback_statement(dialect: str) -> Any:
    """Feedback sets its focus's lockout only if it is the latest (outcomeTimestamp, then fingerprint)
    seen for that focus: the same answer whichever order the feedback arrives in, on any replica."""
    statement = _upsert(dialect).values(
        patient_hash=bindparam("patient_hash"), rule_id=bindparam("rule_id"), focus=bindparam("focus"),
        shown_until=bindparam("feedback_at"), feedback_at=bindparam("feedback_at"),
        feedback_key=bindparam("feedback_key"), feedback_until=bindparam("feedback_until"),
        outcome=bindparam("outcome"), reason_code=bindparam("reason_code"))
    newer = or_(suppressions.c.feedback_at.is_(None),
                suppressions.c.feedback_at < statement.excluded.feedback_at,
                and_(suppressions.c.feedback_at == statement.excluded.feedback_at,
                     suppressions.c.feedback_key < statement.excluded.feedback_key))
    return statement.on_conflict_do_update(
        index_elements=SUPPRESSION_KEY, where=newer,
        set_={k: statement.excluded[k] for k in ("feedback_at", "feedback_key", "feedback_until", "outcome",
                                                "reason_code")})


def claims(records: Sequence[CardRecord], window: timedelta) -> tuple[dict[tuple[str, str], CardRecord],
                                                                       dict[str, Any]]:
    """The first card of each (rule, focus) key of a call, in key order, and the binds of the multi-row
    claim_statement that claims them (row i is key i)."""
    first: dict[tuple[str, str], CardRecord] = {}
    for r in sorted(records, key=lambda r: (r.rule_id, r.focus or "")):
        first.setdefault((r.rule_id, r.focus or ""), r)
    values: dict[str, Any] = {}
    for i, ((_, focus), r) in enumerate(first.items()):
        values.update({f"patient_hash_{i}": r.patient_hash, f"rule_id_{i}": r.rule_id, f"focus_{i}": focus,
                       f"card_uuid_{i}": r.uuid, f"shown_at_{i}": r.issued_at,
                       f"shown_until_{i}": r.issued_at + window, f"level_{i}": LEVELS.get(r.indicator, 0)})
    return first, values


SUPPRESSION_RETENTION = timedelta(days=30)  # how long an inert suppression row is kept (purge_suppressions)

# Statements on the path of every hook call, built once: constructing a SQLAlchemy statement costs more
# than running it on SQLite (0.14 ms against 0.04 ms for a look-up).
CLAIM = {dialect: claim_statement(dialect) for dialect in ("sqlite", "postgresql")}
LOCK = {dialect: feedback_statement(dialect) for dialect in ("sqlite", "postgresql")}
INSERT_CARDS = insert(cards)


def insert_cards(dialect: str) -> Any:
    """A hook call's card rows: a call sent again stores its cards once (their uuids are the call's own)."""
    return _upsert(dialect, cards).on_conflict_do_nothing(index_elements=["uuid"])


class Store:
    """Repository over one SQLAlchemy engine; every method is a short transaction."""

    def __init__(self, url: str, clock: Clock, *, hash_key: bytes | None = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.clock = clock
        self._hash_key = hash_key
        self._keyed: hmac.HMAC | None = None
        self._prepared: dict[Hashable, Prepared] = {}
        self.writers = Writers(self.engine.url, lambda: PING_IDLE_SECONDS, lambda: DATABASE_WAIT_SECONDS,
                               CONNECT_TIMEOUT_SECONDS)  # the hook write's, on PostgreSQL
        self.held = HeldSqlite(self.engine)  # the hook write's, on SQLite (checked out at its first use)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Database work asked for on the event loop. PostgreSQL answers over the network: the work goes to
        a worker thread, so the loop serves other calls while it waits for round trips. SQLite answers
        in-process, with nothing to wait for: a thread hop would only cost (a sixth of a small hook call,
        README "Performance"), so the work runs on the loop."""
        if self.dialect == "sqlite":
            return work(*args)
        return await anyio.to_thread.run_sync(work, *args)

    def prepared(self, key: Hashable, statement: Callable[[], ClauseElement]) -> Prepared:
        """A hot statement lowered to this database's driver (prepared.py), compiled on first use."""
        found = self._prepared.get(key)
        if found is None:
            found = self._prepared[key] = Prepared(statement(), self.engine.dialect)
        return found

    def migrate(self) -> None:
        from .migrations import upgrade

        upgrade(self.engine)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        self.held.close()
        self.engine.dispose()

    # -- patient hashing -------------------------------------------------------------
    def hash_key(self) -> bytes:
        """The HMAC key: configured, else generated once and kept in the database."""
        if self._hash_key is None:
            with self.engine.begin() as conn:
                row = conn.execute(select(meta.c.value).where(meta.c.key == "patient_hash_key")).first()
                if row is None:
                    value = secrets.token_hex(32)
                    try:
                        with conn.begin_nested():
                            conn.execute(insert(meta).values(key="patient_hash_key", value=value))
                    except IntegrityError:
                        value = conn.execute(
                            select(meta.c.value).where(meta.c.key == "patient_hash_key")).scalar_one()
                else:
                    value = row[0]
            self._hash_key = bytes.fromhex(value)
        return self._hash_key

    def patient_hash(self, patient_id: str) -> str:
        return self.keyed(patient_id)

    def keyed(self, text: str) -> str:
        """HMAC of an identifier (a patient id, what a card is about) under the service's key."""
        keyed = self._keyed
        if keyed is None:  # the key's padded blocks hashed once, not on each of a call's several ids
            keyed = self._keyed = hmac.new(self.hash_key(), digestmod=hashlib.sha256)
        mac = keyed.copy()
        mac.update(text.encode())
        return mac.hexdigest()

    # -- cards ---------------------------------------------------------------------------
    def record_cards(self, records: Sequence[CardRecord]) -> None:
        if records:
            with self.engine.begin() as conn:
                conn.execute(INSERT_CARDS, [r.row() for r in records])

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A new transaction (the hook call's write has its own connections: writers.py)."""
        with self.engine.begin() as conn:
            yield conn

    def retrying(self, work: Callable[[], T]) -> T:
        """`work` (one transaction) once more when the database dropped its connection: the pool has
        discarded the dropped connections and the transaction was rolled back, so a second try starts
        clean (PostgreSQL restarted or failed over, or its backend was terminated). Should the drop fall
        between the server's commit and its acknowledgement, the second try finds its own claims and
        shows those cards no more: a card is never shown twice, at worst once not at all."""
        try:
            return work()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        return work()

    def show_cards(self, records: Sequence[CardRecord], window: timedelta,
                   conn: DriverConnection | None = None) -> list[CardRecord]:
        """The cards that may be shown, claimed and recorded in one transaction: one atomic statement (see
        claim_statement; a row per (patient, rule, focus), sent as one multi-row INSERT) takes each display
        window, `window` long, unless a display or feedback still holds it; the cards that got it are
        stored. Rows go in a fixed key order, so two calls claiming several keys cannot deadlock on
        PostgreSQL; a second card for a key already claimed in this call is not shown, as it would not be
        in a later call."""
        if not records:
            return []
        if conn is None:
            with self.transaction() as own:
                return self.show_cards(records, window, own)
        first, values = claims(records, window)
        claim = self.prepared(("claim", len(first)), lambda: claim_statement(self.dialect, len(first)))
        claimed = set(claim.rows(conn, values))
        shown = [r for key, r in first.items() if key in claimed]
        self.prepared("insert-cards-once", lambda: insert_cards(self.dialect)).many(conn, [r.row() for r in shown])
        chosen = {id(r) for r in shown}
        return [r for r in records if id(r) in chosen]

    def purge_suppressions(self, before: datetime) -> int:
        """Drop suppression rows that have held nothing since `before`: display window and lockout both
        over. Such a row decides nothing (a claim takes it as if it were absent), so the table stays as
        large as what is held. The caller leaves a margin (SUPPRESSION_RETENTION) so that feedback arriving
        late and out of order still meets the newer outcome it must not override."""
        inert = and_(suppressions.c.shown_until < before,
                     or_(suppressions.c.feedback_until.is_(None), suppressions.c.feedback_until < before))
        with self.engine.begin() as conn:
            return conn.execute(suppressions.delete().where(inert)).rowcount or 0

    def suppressed(self, patient_hash: str, rule_id: str, focus: str, now: datetime | None = None,
                   indicator: str = "info") -> bool:
        """Whether a card about this focus, of this urgency, would be held back now (a read, for checks
        that do not show; the same decision as claim_statement)."""
        now = now or self.clock.now()
        with self.engine.connect() as conn:
            row = conn.execute(select(suppressions.c.shown_until, suppressions.c.feedback_until, suppressions.c.level,
                                      suppressions.c.outcome).where(
                suppressions.c.patient_hash == patient_hash, suppressions.c.rule_id == rule_id,
                suppressions.c.focus == focus)).first()
        if row is None:
            return False
        shown_until, feedback_until, level, outcome = row
        window = aware(shown_until) > now
        lockout = feedback_until is not None and aware(feedback_until) > now
        if level is not None and level < LEVELS.get(indicator, 0) and not (lockout and outcome != "accepted"):
            return False  # escalated: shown through the window and an accept, never through an override
        return window or lockout

    def card_info(self, card_uuid: str) -> IssuedRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(cards.c.service_id, cards.c.rule_id, cards.c.patient_hash, cards.c.focus)
                               .where(cards.c.uuid == card_uuid)).first()
        return IssuedRow(*row) if row is not None else None

    def card_service(self, card_uuid: str) -> str | None:
        info = self.card_info(card_uuid)
        return info.service_id if info else None

    # -- feedback ------------------------------------------------------------------------
    def record_feedback(self, records: Iterable[FeedbackRecord]) -> int:
        """Store feedback idempotently: an entry already stored (same fingerprint) is skipped."""
        return sum(self.apply_feedback([(r, None) for r in records]))

    def apply_feedback(self, entries: Sequence[tuple[FeedbackRecord, Lockout | None]]) -> list[bool]:
        """Store each entry once (by fingerprint) and, in the same transaction, let a newly stored one set
        its focus's lockout if it is the latest feedback for that focus. True for each entry stored now."""
        stored: list[bool] = []
        now = self.clock.now()
        lock = LOCK[self.dialect]
        with self.engine.begin() as conn:
            for r, lockout in entries:
                fingerprint = r.fingerprint()
                exists = conn.execute(
                    select(feedback.c.id).where(feedback.c.fingerprint == fingerprint)).first()
                if exists:
                    stored.append(False)
                    continue
                try:
                    with conn.begin_nested():
                        conn.execute(insert(feedback).values(
                            fingerprint=fingerprint, card_uuid=r.card_uuid, service_id=r.service_id,
                            outcome=r.outcome, accepted_suggestions=list(r.accepted_suggestions) or None,
                            override_system=r.override_system, override_code=r.override_code,
                            has_comment=r.has_comment, outcome_timestamp=r.outcome_timestamp,
                            received_at=now))
                except IntegrityError:  # a concurrent duplicate won the race
                    stored.append(False)
                    continue
                if lockout is not None:
                    conn.execute(lock, {"patient_hash": lockout.patient_hash, "rule_id": lockout.rule_id,
                                        # as the lockout's start: a clock running ahead in the EHR must
                                        # not make this outcome the latest for good (Policy.of)
                                        "focus": lockout.focus, "feedback_at": min(r.outcome_timestamp, now),
                                        "feedback_key": fingerprint, "feedback_until": lockout.until,
                                        "outcome": r.outcome, "reason_code": lockout.reason_code})
                stored.append(True)
        return stored

    # -- replay protection ---------------------------------------------------------------
    def claim_token(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        """True the first time (issuer, jti) is seen while unexpired; False on a replay."""
        token_hash = hashlib.sha256(f"{issuer}\x1f{jti}".encode()).hexdigest()
        now = self.clock.now()
        with self.engine.begin() as conn:
            conn.execute(seen_tokens.delete().where(seen_tokens.c.expires_at < now - timedelta(minutes=5)))
            try:
                with conn.begin_nested():
                    conn.execute(insert(seen_tokens).values(token_hash=token_hash, expires_at=expires_at))
            except IntegrityError:
                return False
        return True


def aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)


def sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) and len(url) > len(prefix) else None
