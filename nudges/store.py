"""Persistence (SQLAlchemy 2 Core): cards issued, feedback, replayed-token guard, service secrets.

Only keyed hashes of patient ids and coarse demographic buckets are stored: no names, no raw
identifiers, no tokens. The same code runs on SQLite (embedded default) and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

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
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .clock import Clock

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

    def row(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "bucket"}
        data.update(asdict(self.bucket))
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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


# Statements on the path of every hook call, built once: constructing a SQLAlchemy statement costs more
# than running it on SQLite (0.14 ms against 0.04 ms for the suppression look-up).
LAST_SHOWN = (select(cards.c.rule_id, func.max(cards.c.issued_at))
              .where(cards.c.patient_hash == bindparam("patient_hash"), cards.c.issued_at >= bindparam("oldest"),
                     cards.c.issued_at <= bindparam("now"))
              .group_by(cards.c.rule_id))
INSERT_CARDS = insert(cards)


class Store:
    """Repository over one SQLAlchemy engine; every method is a short transaction."""

    def __init__(self, url: str, clock: Clock, *, hash_key: bytes | None = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.clock = clock
        self._hash_key = hash_key

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

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
        return hmac.new(self.hash_key(), patient_id.encode(), hashlib.sha256).hexdigest()

    # -- cards ---------------------------------------------------------------------------
    def record_cards(self, records: Sequence[CardRecord]) -> None:
        if records:
            with self.engine.begin() as conn:
                conn.execute(INSERT_CARDS, [r.row() for r in records])

    def recently_shown(self, patient_hash: str, windows: dict[str, timedelta]) -> set[str]:
        """Rule ids whose card was issued to this patient within that rule's suppression window."""
        if not windows:
            return set()
        now = self.clock.now()
        oldest = now - max(windows.values())
        with self.engine.connect() as conn:  # one statement whatever the rules
            rows = conn.execute(LAST_SHOWN, {"patient_hash": patient_hash, "oldest": oldest, "now": now}).all()
        return {rule_id for rule_id, last in rows
                if rule_id in windows and aware(last) >= now - windows[rule_id]}

    def card_service(self, card_uuid: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(cards.c.service_id).where(cards.c.uuid == card_uuid)).scalar()

    # -- feedback ------------------------------------------------------------------------
    def record_feedback(self, records: Iterable[FeedbackRecord]) -> int:
        """Store feedback idempotently: an entry already stored (same fingerprint) is skipped."""
        stored = 0
        now = self.clock.now()
        with self.engine.begin() as conn:
            for r in records:
                fingerprint = r.fingerprint()
                exists = conn.execute(
                    select(feedback.c.id).where(feedback.c.fingerprint == fingerprint)).first()
                if exists:
                    continue
                try:
                    with conn.begin_nested():
                        conn.execute(insert(feedback).values(
                            fingerprint=fingerprint, card_uuid=r.card_uuid, service_id=r.service_id,
                            outcome=r.outcome, accepted_suggestions=list(r.accepted_suggestions) or None,
                            override_system=r.override_system, override_code=r.override_code,
                            has_comment=r.has_comment, outcome_timestamp=r.outcome_timestamp,
                            received_at=now))
                    stored += 1
                except IntegrityError:  # a concurrent duplicate won the race
                    continue
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
