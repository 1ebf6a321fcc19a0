"""A hook call's write (nudges/showing.py) on both real databases: what it claims, stores and reports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from nudges import showing
from nudges.clock import FixedClock
from nudges.events import followups
from nudges.store import Bucket, CardRecord, Store, aware, cards, suppressions

WINDOW = timedelta(minutes=5)


@pytest.fixture
async def store(make_store) -> AsyncIterator[Store]:  # type: ignore[no-untyped-def]
    """A migrated store on each database; its asyncio engine (PostgreSQL's write) closed on this loop."""
    store = make_store()
    yield store
    await store.writers.close()


def card(uuid: str, rule: str, patient_hash: str, clock: FixedClock, focus: str | None) -> CardRecord:
    return CardRecord(uuid=uuid, service_id="nudges-patient-view", rule_id=rule, rule_version="2.0.0",
                      hook="patient-view", hook_instance="hook-instance-1", patient_hash=patient_hash,
                      bucket=Bucket(race="2106-3", language="es"), indicator="warning", issued_at=clock.now(),
                      tenant=None, focus=focus)


async def test_the_write_claims_stores_and_says_whether_cards_wait(store: Store, database_url: str,
                                                                   clock: FixedClock) -> None:
    """The keys held stay back, a second card for a key this call claims is not shown, each card shown
    is stored as it was issued, and the waiting-card check answers with it (none, then one)."""
    tag = database_url[-6:].encode().hex()[:10]
    h = store.patient_hash(f"pt-write-{tag}")
    oldest = clock.now() - timedelta(days=1)

    def record(n: int, rule: str, focus: str | None) -> CardRecord:
        return card(f"00000000-0000-4000-8005-{tag}{n:02d}", rule, h, clock, focus)

    assert await showing.show(store, [], WINDOW, h, oldest) == ([], False)
    first = record(1, "rule-b", "f1")
    assert await showing.show(store, [first], WINDOW, h, oldest) == ([first], False)
    batch = [record(2, "rule-c", None), record(3, "rule-b", "f1"), record(4, "rule-a", "f2"),
             record(5, "rule-a", "f2"), record(6, "rule-a", "f1")]
    shown, waiting = await showing.show(store, batch, WINDOW, h, oldest)
    assert [r.uuid[-2:] for r in shown] == ["02", "04", "06"] and not waiting
    with store.engine.connect() as conn:
        stored = {row["uuid"]: dict(row) for row in conn.execute(
            select(cards).where(cards.c.patient_hash == h)).mappings()}
        held = conn.execute(select(suppressions.c.rule_id, suppressions.c.focus, suppressions.c.shown_until,
                                   suppressions.c.level).where(suppressions.c.patient_hash == h)).all()
    assert sorted(u[-2:] for u in stored) == ["01", "02", "04", "06"]
    for r in (first, *shown):
        row = stored[r.uuid]
        assert {**row, "issued_at": aware(row["issued_at"])} == r.row()
    assert sorted((rule, focus) for rule, focus, _, _ in held) == [
        ("rule-a", "f1"), ("rule-a", "f2"), ("rule-b", "f1"), ("rule-c", "")]
    assert {aware(until) for _, _, until, _ in held} == {clock.now() + WINDOW} and {lv for *_, lv in held} == {1}

    later = replace(record(7, "troponin-without-cath-plan", None), service_id=followups.FOLLOWUP_SERVICE,
                    hook=followups.FOLLOWUP_HOOK)
    assert followups.store_pending(store, later, {"uuid": later.uuid, "summary": "waiting"}) == "stored"
    assert await showing.show(store, [], WINDOW, h, oldest) == ([], True)
    assert (await showing.show(store, [record(8, "rule-d", None)], WINDOW, h, oldest))[1] is True
    assert await showing.show(store, [], WINDOW, h, clock.now() + timedelta(seconds=1)) == ([], False)  # too old
    assert await showing.show(store, [record(9, "rule-d", None)], WINDOW, h, oldest) == ([], True)  # held


async def test_the_write_keeps_no_claim_when_a_card_cannot_be_stored(store: Store, database_url: str,
                                                                     clock: FixedClock) -> None:
    """Claim and card rows go together or not at all (one statement on PostgreSQL, one transaction on
    SQLite): a card that cannot be stored leaves no claim that would hold back the next call's card."""
    tag = database_url[-6:].encode().hex()[:10]
    h = store.patient_hash(f"pt-atomic-{tag}")
    taken = card(f"00000000-0000-4000-8006-{tag}01", "rule-a", h, clock, "f1")
    assert (await showing.show(store, [taken], WINDOW, h, clock.now()))[0] == [taken]
    clash = replace(card(f"00000000-0000-4000-8006-{tag}03", "rule-b", h, clock, "f2"),
                    rule_version=None)  # NOT NULL: its row cannot be stored
    with pytest.raises(IntegrityError):
        await showing.show(store, [clash, card(f"00000000-0000-4000-8006-{tag}02", "rule-c", h, clock, None)],
                     WINDOW, h, clock.now())
    after = card(f"00000000-0000-4000-8006-{tag}04", "rule-d", h, clock, None)  # the next call's write, on
    assert (await showing.show(store, [after], WINDOW, h, clock.now()))[0] == [after]  # the same connection
    with store.engine.connect() as conn:
        keys = conn.execute(select(suppressions.c.rule_id).where(suppressions.c.patient_hash == h)).scalars().all()
        rows = conn.execute(select(cards.c.uuid).where(cards.c.patient_hash == h)).scalars().all()
    assert sorted(keys) == ["rule-a", "rule-d"] and sorted(rows) == sorted([taken.uuid, after.uuid])


def test_the_statement_of_up_to_three_cards_stays_in_psycopgs_cache() -> None:
    """psycopg converts a statement's placeholders afresh on every execution once it has more than 50
    parameters or 4 kB of text (0.23 ms for a three-card write, 0.01 ms cached); a call's write of up to
    three cards, nearly every call's, stays under both."""
    from psycopg import _queries  # its limits live there (psycopg 3.1 to 3.3)
    from sqlalchemy.dialects.postgresql import psycopg

    from nudges.prepared import Prepared

    for rows in (0, 1, 2, 3):
        statement = Prepared(showing.one_statement(rows), psycopg.dialect())
        assert len(statement.sql.encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH
        assert len(statement.named) + len(statement.fixed) <= _queries.MAX_CACHED_STATEMENT_PARAMS


async def test_the_cards_of_one_write_come_from_one_call(store: Store, clock: FixedClock) -> None:
    h = store.patient_hash("pt-one-call")
    one = card("00000000-0000-4000-8007-000000000001", "rule-a", h, clock, None)
    other = replace(card("00000000-0000-4000-8007-000000000002", "rule-b", h, clock, None), hook_instance="h-2")
    with pytest.raises(ValueError, match="one call"):
        await showing.show(store, [one, other], WINDOW, h, clock.now())
    with store.engine.connect() as conn:  # refused before anything was claimed
        assert conn.execute(select(suppressions).where(suppressions.c.patient_hash == h)).first() is None


async def test_sqlite_writes_on_the_connection_the_process_holds(tmp_path, clock: FixedClock) -> None:  # type: ignore[no-untyped-def]
    """SQLite's hook write takes no pool checkout per call (writers.HeldSqlite), and a held connection
    that became unusable is replaced: the call's write is tried once more on a fresh one, and is stored."""
    from sqlalchemy import event

    store = Store(f"sqlite:///{tmp_path}/held.db", clock)
    store.migrate()
    h = store.patient_hash("pt-held")  # the key's read: a checkout of its own, before counting
    checkouts: list[object] = []
    event.listen(store.engine, "checkout", lambda *args: checkouts.append(args[0]))
    try:
        for n in range(5):
            record = card(f"00000000-0000-4000-8008-0000000000{n:02d}", f"rule-{n}", h, clock, None)
            assert await store.writers.retrying(lambda r=record: showing.show(store, [r], WINDOW, h, clock.now())) \
                == ([record], False)
        assert len(checkouts) == 1
        store.held.connection.dbapi_connection.close()  # as if the file had gone away under it
        last = card("00000000-0000-4000-8008-000000000099", "rule-9", h, clock, None)
        assert await store.writers.retrying(lambda: showing.show(store, [last], WINDOW, h, clock.now())) \
            == ([last], False)
        assert len(checkouts) == 2
        with store.engine.connect() as conn:
            assert len(conn.execute(select(cards.c.uuid).where(cards.c.patient_hash == h)).all()) == 6
    finally:
        store.dispose()
