"""A hook call's write, the one on the path of every call: each card's display claimed (suppression),
the cards that got it recorded, and whether the patient has follow-up cards waiting, before the answer.

On PostgreSQL it is one statement, run outside a transaction: a statement is atomic by itself, so the
claim and the card rows go together or not at all. The three statements in a transaction were five
round trips (BEGIN and COMMIT included), each one a worker thread going to sleep and waking and the GIL
changing hands: under load (benchmarks/hook_load.py, 16 clients, two workers) one statement took the
service's CPU per call from 2.5–2.7 ms to 2.2 ms and PostgreSQL's from 0.55 to 0.35 ms (README
"Performance"). SQLite answers in-process, without round trips, and has no data-modifying WITH: there
the three statements share one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, exists, func, insert, select, true, union_all

from .events.followups import ANY_WAITING
from .store import CardRecord, Store, cards, claim_statement, claims

CARD_COLUMNS = tuple(column.name for column in cards.c)


def one_statement(rows: int) -> Any:
    """PostgreSQL: `WITH claimed AS (claim_statement for `rows` keys), stored AS (INSERT INTO cards the
    card of each key claimed) SELECT waiting, the keys claimed`: one row per key claimed, or one row of
    NULL keys when none was. The card of key i has binds `card_{column}_{i}`, the claim's are
    claim_statement's; `who` and `oldest` are the waiting-card check's (followups.WAITING)."""
    waiting = ANY_WAITING.exists().label("waiting")
    if not rows:
        return select(waiting)
    claimed = claim_statement("postgresql", rows).cte("claimed")
    kept = [select(*(bindparam(f"card_{name}_{i}", type_=cards.c[name].type).label(name) for name in CARD_COLUMNS))
            .where(exists().where(claimed.c.rule_id == bindparam(f"rule_id_{i}"),
                                  claimed.c.focus == bindparam(f"focus_{i}")))
            for i in range(rows)]
    stored = (insert(cards).from_select(list(CARD_COLUMNS), kept[0] if rows == 1 else union_all(*kept))
              .returning(cards.c.uuid).cte("stored"))
    head = select(waiting, select(func.count()).select_from(stored).scalar_subquery().label("stored")).subquery("head")
    return select(head.c.waiting, claimed.c.rule_id, claimed.c.focus).select_from(head.outerjoin(claimed, true()))


def show(store: Store, records: Sequence[CardRecord], window: timedelta, patient_hash: str,
         oldest: datetime) -> tuple[list[CardRecord], bool]:
    """The records whose cards may be shown, claimed and stored (Store.show_cards decides alike), and
    whether `patient_hash` has waiting cards created since `oldest`."""
    waiting_binds = {"who": patient_hash, "oldest": oldest}
    if store.dialect != "postgresql":
        with store.transaction() as conn:
            shown = store.show_cards(records, window, conn)
            waiting = store.prepared("any-waiting", lambda: ANY_WAITING).rows(conn, waiting_binds)
        return shown, bool(waiting)
    first, values = claims(records, window) if records else ({}, {})
    for i, record in enumerate(first.values()):
        values.update({f"card_{name}_{i}": value for name, value in record.row().items()})
    statement = store.prepared(("one-statement", len(first)), lambda: one_statement(len(first)))
    with store.autocommit.connect() as conn:
        answer = statement.rows(conn, values | waiting_binds)
    claimed = {(row[1], row[2]) for row in answer if len(row) > 1 and row[1] is not None}
    chosen = {id(r) for key, r in first.items() if key in claimed}
    return [r for r in records if id(r) in chosen], bool(answer and answer[0][0])
