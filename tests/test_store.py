"""Storage on both real databases: migrations, cards, suppression windows, feedback, replay guard."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from nudges.clock import FixedClock
from nudges.store import (
    INSERT_CARDS,
    Bucket,
    CardRecord,
    FeedbackRecord,
    Lockout,
    aware,
    cards,
    feedback,
    suppressions,
)


def card(uuid: str, rule: str, patient_hash: str, clock: FixedClock, **bucket: str) -> CardRecord:
    return CardRecord(uuid=uuid, service_id="nudges-patient-view", rule_id=rule, rule_version="1.0.0",
                      hook="patient-view", hook_instance="h", patient_hash=patient_hash, bucket=Bucket(**bucket),
                      indicator="info", issued_at=clock.now())


def test_processes_starting_together_on_a_new_sqlite_file_migrate_it_once(tmp_path, clock: FixedClock) -> None:  # type: ignore[no-untyped-def]
    """`nudges serve --workers N` on a new SQLite database: each worker migrates at start. They had raced
    (alembic's DDL ran outside any transaction: "table meta already exists"; the WAL switch met another's
    lock: "database is locked"), and one failing stopped the server. Here as threads with stores of their
    own, released together, three times."""
    import threading

    from nudges.store import Store

    for trial in range(3):
        url = f"sqlite:///{tmp_path}/new-{trial}.db"
        stores = [Store(url, clock) for _ in range(3)]
        start, failures = threading.Barrier(len(stores)), list[str]()

        def migrate(store: Store, start: threading.Barrier, failures: list[str]) -> None:
            start.wait()
            try:
                store.migrate()
            except Exception as exc:  # collected: the assertion below says which
                failures.append(f"{type(exc).__name__}: {exc}"[:300])

        threads = [threading.Thread(target=migrate, args=(store, start, failures)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        try:
            assert failures == [] and all(store.ping() for store in stores)
            with stores[0].engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        finally:
            for store in stores:
                store.dispose()


def test_migrations_are_idempotent_and_ping(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    store.migrate()
    assert store.ping()


def test_patient_hash_is_keyed_and_stable(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    first = store.patient_hash("pt-1")
    assert first == make_store().patient_hash("pt-1")  # key kept in the database
    assert first != store.patient_hash("pt-2") and "pt-1" not in first and len(first) == 64
    assert make_store(hash_key=b"other").patient_hash("pt-1") != first


def test_cards_and_suppression_windows(make_store, database_url: str, clock: FixedClock) -> None:  # type: ignore[no-untyped-def]
    """A card is shown (claimed and stored) only while nothing holds its (patient, rule, focus)."""
    store = make_store()
    h = store.patient_hash(f"pt-{database_url[-6:]}")
    tag = database_url[-6:].encode().hex()[:10]

    def show(n: int, rule: str = "rule-a", focus: str = "f1") -> bool:
        record = card(f"00000000-0000-4000-8000-{tag}{n:02d}", rule, h, clock, race="black", language="es")
        return bool(store.show_cards([replace(record, focus=focus)], timedelta(minutes=5)))

    assert show(1)
    assert not show(2) and show(3, focus="f2") and show(4, rule="rule-b")  # same key held; other keys free
    assert store.suppressed(h, "rule-a", "f1") and not store.suppressed(h, "rule-a", "f9")
    clock.advance(minutes=5)
    assert not store.suppressed(h, "rule-a", "f1") and show(5)
    with store.engine.connect() as conn:
        rows = conn.execute(select(cards).where(cards.c.patient_hash == h)).mappings().all()
    assert len(rows) == 4  # the refused card was not recorded
    row = next(r for r in rows if r["uuid"].endswith(f"{tag}01"))
    assert row["race"] == "black" and row["language"] == "es" and row["payer_class"] == "unknown"
    assert row["focus"] == "f1"
    assert not any("pt-" in str(v) for v in row.values())  # no raw patient id anywhere in the row


def test_several_cards_claimed_in_one_statement(make_store, database_url: str, clock: FixedClock) -> None:  # type: ignore[no-untyped-def]
    """One call's cards are claimed together: those whose key is held stay back, the rest are shown, a
    second card for a key this call already claims is not, and the answer keeps the call's order."""
    store = make_store()
    h = store.patient_hash(f"pt-many-{database_url[-6:]}")
    tag = database_url[-6:].encode().hex()[:10]

    def record(n: int, rule: str, focus: str) -> CardRecord:
        return replace(card(f"00000000-0000-4000-8001-{tag}{n:02d}", rule, h, clock), focus=focus)

    assert store.show_cards([record(1, "rule-b", "f1")], timedelta(minutes=5))
    batch = [record(2, "rule-c", "f1"), record(3, "rule-b", "f1"), record(4, "rule-a", "f2"),
             record(5, "rule-a", "f2"), record(6, "rule-a", "f1")]
    shown = store.show_cards(batch, timedelta(minutes=5))
    assert [r.uuid[-2:] for r in shown] == ["02", "04", "06"]
    with store.engine.connect() as conn:
        stored = conn.execute(select(cards.c.uuid).where(cards.c.patient_hash == h)).scalars().all()
    assert sorted(u[-2:] for u in stored) == ["01", "02", "04", "06"]


def test_feedback_is_stored_once(make_store, database_url: str, clock: FixedClock) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    entry = FeedbackRecord(card_uuid=f"card-{database_url[-8:]}", service_id="nudges-patient-view",
                           outcome="overridden", outcome_timestamp=clock.now(),
                           override_system="http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes",
                           override_code="too-costly-uncovered", has_comment=True)
    assert store.record_feedback([entry]) == 1
    assert store.record_feedback([entry, entry]) == 0
    with store.engine.connect() as conn:
        rows = conn.execute(select(feedback).where(feedback.c.card_uuid == entry.card_uuid)).all()
    assert len(rows) == 1


def test_replay_guard(make_store, database_url: str, clock: FixedClock) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    jti = f"jti-{database_url[-8:]}"
    assert store.claim_token("https://ehr", jti, clock.now() + timedelta(minutes=5))
    assert not store.claim_token("https://ehr", jti, clock.now() + timedelta(minutes=5))
    assert store.claim_token("https://other-ehr", jti, clock.now() + timedelta(minutes=5))


def test_models_and_migrations_agree(make_store) -> None:  # type: ignore[no-untyped-def]
    """The tables the code uses (store.metadata) are exactly what the migrations create: a column added
    to a model without a migration, or the reverse, fails here on both databases."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from nudges.events import followups, outbox, subscriptions
    from nudges.store import metadata

    # their tables join the shared metadata when imported
    assert {followups.followups.name, outbox.deliveries.name, subscriptions.subscriptions.name} <= set(metadata.tables)

    store = make_store()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = [d for d in compare_metadata(context, metadata)
                       if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "alembic_version")]
    assert differences == []


def test_inert_suppressions_are_purged(make_store, database_url: str, clock: FixedClock) -> None:  # type: ignore[no-untyped-def]
    """Only rows that hold nothing since the cutoff go; a held display window or lockout stays, and a
    purged key is free exactly as it was before."""
    store = make_store()
    h = store.patient_hash(f"pt-purge-{database_url[-6:]}")
    tag = database_url[-6:].encode().hex()[:10]

    def show(n: int, rule: str) -> bool:
        record = replace(card(f"00000000-0000-4000-8002-{tag}{n:02d}", rule, h, clock), focus="f")
        return bool(store.show_cards([record], timedelta(minutes=5)))

    assert show(1, "rule-old") and show(2, "rule-locked")
    lockout = Lockout(patient_hash=h, rule_id="rule-locked", focus="f", until=clock.now() + timedelta(days=90))
    entry = FeedbackRecord(card_uuid=f"00000000-0000-4000-8002-{tag}02", service_id="nudges-patient-view",
                           outcome="overridden", outcome_timestamp=clock.now())
    assert store.apply_feedback([(entry, lockout)]) == [True]
    clock.advance(days=40)
    assert show(3, "rule-now")
    purged = store.purge_suppressions(clock.now() - timedelta(days=30))  # this module's other rows may go too
    with store.engine.connect() as conn:
        left = set(conn.execute(select(suppressions.c.rule_id).where(suppressions.c.patient_hash == h)).scalars())
    assert purged >= 1 and left == {"rule-locked", "rule-now"}
    assert store.suppressed(h, "rule-locked", "f") and not store.suppressed(h, "rule-old", "f")
    assert show(4, "rule-old")  # as free as before the purge


def test_hot_statements_run_on_the_driver_as_sqlalchemy_would(make_store, database_url: str,  # type: ignore[no-untyped-def]
                                                              clock: FixedClock) -> None:
    """A hook call's claim and card insert go straight to the driver (prepared.py): what they write
    reads back through SQLAlchemy as written (the datetimes in SQLite's stored format included), and a
    driver error is SQLAlchemy's own exception, which callers catch."""
    store = make_store()
    h = store.patient_hash(f"pt-hot-{database_url[-6:]}")
    tag = database_url[-6:].encode().hex()[:10]
    record = replace(card(f"00000000-0000-4000-8003-{tag}01", "rule-hot", h, clock), focus="f", indicator="warning")
    assert store.show_cards([record], timedelta(minutes=7)) == [record]
    with store.engine.connect() as conn:
        row = conn.execute(select(suppressions).where(suppressions.c.patient_hash == h)).mappings().one()
        stored = conn.execute(select(cards).where(cards.c.uuid == record.uuid)).mappings().one()
    assert aware(row["shown_until"]) == clock.now() + timedelta(minutes=7) and row["level"] == 1
    assert aware(stored["issued_at"]) == clock.now() and stored["indicator"] == "warning"
    insert_cards = store.prepared("insert-cards", lambda: INSERT_CARDS)
    with pytest.raises(IntegrityError), store.transaction() as conn:  # the same card uuid twice
        insert_cards.many(conn, [record.row()])
    with pytest.raises(KeyError, match="focus"), store.transaction() as conn:
        insert_cards.many(conn, [{k: v for k, v in record.row().items() if k != "focus"}])
