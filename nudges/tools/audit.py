"""`nudges audit`: are nudges shown and acted on alike across groups of patients?

Per rule, and per group of each demographic dimension recorded at issue time: cards shown, accepted,
overridden (by each card's latest feedback), the acceptance rate and its ratio to the rule's overall
rate. Aggregation happens in SQL; only counts leave the database, never patient hashes. Any row
covering fewer than 11 distinct patients is suppressed ("<11"), the usual small-cell rule, and enough
other groups of the same dimension are withheld ("hidden") that the small one cannot be recovered by
subtracting the others from the overall row, so the report can be shared without re-identifying anyone.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TextIO, TypeVar

import orjson
from sqlalchemy import case, distinct, func, inspect, or_, select
from sqlalchemy.engine import Connection, make_url

from ..clock import parse_instant
from ..events.followups import pending_cards
from ..store import cards, feedback, make_engine, sqlite_path

DIMENSIONS = ("race", "ethnicity", "language", "payer_class")
OVERALL = ("overall", "all")
MIN_PATIENTS = 11
SUPPRESSED = "<11"
HIDDEN = "hidden"  # a complement of a suppressed cell
FIELDS = ("rule", "dimension", "group", "shown", "accepted", "overridden", "acceptance_rate", "rate_ratio")


class AuditError(Exception):
    pass


@dataclass(frozen=True)
class Cell:
    rule: str
    dimension: str
    group: str
    shown: int
    accepted: int
    overridden: int
    patients: int


def query_cells(conn: Connection, since: datetime | None) -> list[Cell]:
    """One GROUP BY per dimension (plus the rule overall) over cards joined to their latest feedback."""
    ranked = select(feedback.c.card_uuid, feedback.c.outcome, func.row_number().over(
        partition_by=feedback.c.card_uuid,
        order_by=(feedback.c.outcome_timestamp.desc(), feedback.c.id.desc())).label("position")).subquery()
    latest = select(ranked.c.card_uuid, ranked.c.outcome).where(ranked.c.position == 1).subquery()
    # A follow-up card still waiting for the patient's next visit has not been shown: not counted yet.
    source = cards.outerjoin(latest, latest.c.card_uuid == cards.c.uuid).outerjoin(
        pending_cards, pending_cards.c.uuid == cards.c.uuid)
    visible = or_(pending_cards.c.uuid.is_(None), pending_cards.c.delivered_at.is_not(None))
    measures = (func.count(),
                func.sum(case((latest.c.outcome == "accepted", 1), else_=0)),
                func.sum(case((latest.c.outcome == "overridden", 1), else_=0)),
                func.count(distinct(cards.c.patient_hash)))
    found: list[Cell] = []
    for dimension in (OVERALL[0], *DIMENSIONS):
        keys = [cards.c.rule_id] if dimension == OVERALL[0] else [cards.c.rule_id, cards.c[dimension]]
        statement = select(*keys, *measures).select_from(source).where(visible).group_by(*keys)
        if since is not None:
            statement = statement.where(cards.c.issued_at >= since)
        for row in conn.execute(statement):
            group = OVERALL[1] if dimension == OVERALL[0] else str(row[1])
            shown, accepted, overridden, patients = (int(v or 0) for v in row[len(keys):])
            found.append(Cell(str(row[0]), dimension, group, shown, accepted, overridden, patients))
    order = {d: i for i, d in enumerate((OVERALL[0], *DIMENSIONS))}
    return sorted(found, key=lambda c: (c.rule, order[c.dimension], c.group))


class Counted(Protocol):
    """A cell of a per-rule table by group: `patients` is the count the small-cell rule protects."""

    @property
    def rule(self) -> str: ...
    @property
    def dimension(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def patients(self) -> int: ...


C = TypeVar("C", bound=Counted)


def small_cell(cell: Counted) -> bool:
    return cell.patients < MIN_PATIENTS


def complements(cells: list[C], small: Callable[[C], bool] = small_cell) -> set[C]:
    """Cells hidden so that a small one cannot be recovered by subtraction.

    A dimension's groups add up to the rule's overall row, so one suppressed group would be the overall
    minus the others. Within each rule and dimension that has a small (suppressed) group, the smallest
    shown groups are hidden as well until the hidden ones together cover at least MIN_PATIENTS patients
    (the usual complementary suppression). Used for the audit and for population screening's equity view,
    which says what is small there."""
    by_table: dict[tuple[str, str], list[C]] = {}
    for c in cells:
        if c.dimension != OVERALL[0]:
            by_table.setdefault((c.rule, c.dimension), []).append(c)
    hidden: set[C] = set()
    for table in by_table.values():
        suppressed = [c for c in table if small(c)]
        if not suppressed:
            continue
        covered = sum(c.patients for c in suppressed)
        for c in sorted((c for c in table if not small(c)), key=lambda c: (c.patients, c.group)):
            if covered >= MIN_PATIENTS:
                break
            hidden.add(c)
            covered += c.patients
    return hidden


def rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """Report rows; a cell with fewer than MIN_PATIENTS patients shows "<11" and no rates, and its
    complements (see `complements`) show "hidden"."""
    overall = {c.rule: c.accepted / c.shown for c in cells if c.dimension == OVERALL[0] and c.shown}
    hidden = complements(cells)
    result: list[dict[str, Any]] = []
    for c in cells:
        if c.patients < MIN_PATIENTS or c in hidden:
            mark = SUPPRESSED if c.patients < MIN_PATIENTS else HIDDEN
            result.append({"rule": c.rule, "dimension": c.dimension, "group": c.group, "shown": mark,
                           "accepted": mark, "overridden": mark, "acceptance_rate": None, "rate_ratio": None})
            continue
        rate = c.accepted / c.shown if c.shown else None
        base = overall.get(c.rule)
        ratio = rate / base if rate is not None and base else None
        result.append({"rule": c.rule, "dimension": c.dimension, "group": c.group, "shown": c.shown,
                       "accepted": c.accepted, "overridden": c.overridden,
                       "acceptance_rate": None if rate is None else round(rate, 4),
                       "rate_ratio": None if ratio is None else round(ratio, 3)})
    return result


def load(url: str, since: datetime | None) -> list[dict[str, Any]]:
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise AuditError(f"no database at {path}")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not (inspect(conn).has_table("cards") and inspect(conn).has_table("feedback")):
                raise AuditError(f"no nudges tables in {make_url(url).render_as_string(hide_password=True)}")
            return rows(query_cells(conn, since))
    finally:
        engine.dispose()


def _text(row: dict[str, Any], key: str, style: str = "{}") -> str:
    value = row[key]
    if value is None:
        return row["shown"] if row["shown"] in (SUPPRESSED, HIDDEN) else ""
    return style.format(value) if isinstance(value, float) else str(value)


def write(report: list[dict[str, Any]], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows([_text(r, k) for k in FIELDS] for r in report)
    else:
        table = [["rule", "dimension", "group", "shown", "accepted", "overridden", "rate", "ratio"]]
        table += [[*(_text(r, k) for k in FIELDS[:6]), _text(r, "acceptance_rate", "{:.1%}"),
                   _text(r, "rate_ratio", "{:.2f}")]
                  for r in report]
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        for line in table:
            cells = [v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))]
            out.write("  ".join(cells).rstrip() + "\n")
        out.write(f"{len(report)} row(s); rows covering fewer than {MIN_PATIENTS} patients show {SUPPRESSED}, "
                  f"and '{HIDDEN}' rows are withheld so those cannot be worked out from the overall row\n")


def main(url: str | None, since: str | None, fmt: str, out: TextIO, err: TextIO) -> int:
    if url is None:
        from ..settings import Settings

        url = Settings().database_url
    try:
        report = load(url, parse_instant(since) if since else None)
    except (AuditError, ValueError) as exc:
        err.write(f"nudges audit: {exc}\n")
        return 1
    write(report, fmt, out)
    return 0
