"""A hook call's write, the one on the path of every call: each card's display claimed (suppression),
the cards that got it recorded, and whether the patient has follow-up cards waiting, before the answer.

On PostgreSQL it is one statement, run outside a transaction (a statement is atomic by itself, so the
claim and the card rows go together or not at all) and awaited on the event loop over psycopg's asyncio
connection. The three statements in a transaction were five round trips (BEGIN and COMMIT included), in
a worker thread that slept and woke for each one while the GIL changed hands: under load
(benchmarks/hook_load.py, 16 clients, two workers) one statement took the service's CPU per call from
2.5–2.7 ms to 2.2 ms and PostgreSQL's from 0.55 to 0.35 ms, and awaiting it instead of a thread another
fifth off the service's CPU (README "Performance"). SQLite answers in-process, without round trips, and
has no data-modifying WITH: there the three statements share one transaction, on the connection the
process holds for them (writers.HeldSqlite).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, exists, func, select, true, union_all

from .events.followups import ANY_WAITING
from .store import CardRecord, Store, cards, claim_statement, claims, insert_cards

CARD_COLUMNS = tuple(column.name for column in cards.c)
# What every card of one call has alike: bound once per statement, as `c_{column}`.
CALL_COLUMNS = ("service_id", "hook", "hook_instance", "patient_hash", "race", "ethnicity", "language",
                "payer_class", "tenant", "issued_at")
# Each card's own: the claim's binds where it has them (claim_statement), else short ones (the text's
# length counts, below).
CARD_BINDS = {"uuid": "card_uuid_{i}", "rule_id": "rule_id_{i}", "rule_version": "v_{i}", "indicator": "ind_{i}",
              "focus": "f_{i}"}


def one_statement(rows: int) -> Any:
    """PostgreSQL: `WITH claimed AS (claim_statement for `rows` keys), stored AS (INSERT INTO cards the
    card of each key claimed) SELECT waiting, the keys claimed`: one row per key claimed, or one row of
    NULL keys when none was; `who` and `oldest` are the waiting-card check's binds (followups.WAITING).
    Few binds, a short text: psycopg converts a statement of more than 50 parameters or 4 kB afresh on
    every execution (0.23 ms for three cards, with a bind per card and column; 0.01 ms from its cache),
    and up to three cards, nearly every call's, stay within its cache."""
    waiting = ANY_WAITING.exists().label("waiting")
    if not rows:
        return select(waiting)
    claimed = claim_statement("postgresql", rows).cte("claimed")

    def value(name: str, i: int) -> Any:
        key = f"c_{name}" if name in CALL_COLUMNS else CARD_BINDS[name].format(i=i)
        return bindparam(key, type_=cards.c[name].type).label(name)

    kept = [select(*(value(name, i) for name in CARD_COLUMNS))
            .where(exists().where(claimed.c.rule_id == bindparam(f"rule_id_{i}"),
                                  claimed.c.focus == bindparam(f"focus_{i}")))
            for i in range(rows)]
    stored = (insert_cards("postgresql").from_select(list(CARD_COLUMNS), kept[0] if rows == 1 else union_all(*kept))
              .returning(cards.c.uuid).cte("stored"))
    head = select(waiting, select(func.count()).select_from(stored).scalar_subquery().label("stored")).subquery("head")
    return select(head.c.waiting, claimed.c.rule_id, claimed.c.focus).select_from(head.outerjoin(claimed, true()))


async def show(store: Store, records: Sequence[CardRecord], window: timedelta, patient_hash: str,
               oldest: datetime) -> tuple[list[CardRecord], bool]:
    """The records whose cards may be shown, claimed and stored (Store.show_cards decides alike), and
    whether `patient_hash` has waiting cards created since `oldest`. On the event loop: SQLite's
    transaction runs in-process, PostgreSQL's statement is awaited (writers.py)."""
    waiting_binds = {"who": patient_hash, "oldest": oldest}
    rows = [record.row() for record in records]
    if any(row[name] != rows[0][name] for row in rows[1:] for name in CALL_COLUMNS):
        raise ValueError("the cards of one write must come from one call (CALL_COLUMNS alike)")
    if store.dialect != "postgresql":
        with store.held.transaction() as held:  # writers.HeldSqlite: the driver's transaction, no checkout
            shown = store.show_cards(records, window, held)
            waiting = store.prepared("any-waiting", lambda: ANY_WAITING).rows(held, waiting_binds)
        return shown, bool(waiting)
    first, values = claims(records, window) if records else ({}, {})
    if rows:
        values.update({f"c_{name}": rows[0][name] for name in CALL_COLUMNS})
    for i, record in enumerate(first.values()):
        values.update({f"v_{i}": record.rule_version, f"ind_{i}": record.indicator, f"f_{i}": record.focus})
    statement = store.prepared(("one-statement", len(first)), lambda: one_statement(len(first)))
    async with store.writers.connection() as connection:
        answer = await statement.rows_async(connection, values | waiting_binds)
    claimed = {(row[1], row[2]) for row in answer if len(row) > 1 and row[1] is not None}
    chosen = {id(r) for key, r in first.items() if key in claimed}
    return [r for r in records if id(r) in chosen], bool(answer and answer[0][0])
