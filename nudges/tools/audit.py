"""`nudges audit`: are nudges shown and acted on alike across groups of patients?

Per rule, and per group of each demographic dimension recorded at issue time: cards shown, accepted,
overridden (by each card's latest feedback), the acceptance rate and its ratio to the rule's overall
rate. Aggregation happens in SQL; only counts leave the database, never patient hashes. Any row
covering fewer than 11 distinct patients is suppressed ("<11"), the usual small-cell rule, and enough
other groups of the same dimension are withheld ("hidden") that the small one cannot be recovered by
subtracting the others from the overall row, so the report can be shared without re-identifying anyone.

`nudges audit --overrides` (`override_rows`, which the console reuses) is the governance view of
overrides: per rule and group the override rate, and how often each reason was given, under the same
suppression. It is read by people: the service never silences a rule for its override rate, since a
rule overridden more often for some groups is exactly the disparity the audit exists to find.
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
    month: str | None = None  # YYYY-MM (UTC) when counted by month of issue


def month_of(conn: Connection, column: Any) -> Any:
    """The calendar month (UTC) of an issue time as 'YYYY-MM', in the database's own SQL."""
    if conn.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM")
    return func.strftime("%Y-%m", column)


def _shown_cards() -> tuple[Any, Any, Any]:
    """Cards joined to their latest feedback (by outcomeTimestamp), the join, and which were shown."""
    ranked = select(feedback.c.card_uuid, feedback.c.outcome, feedback.c.override_code, func.row_number().over(
        partition_by=feedback.c.card_uuid,
        order_by=(feedback.c.outcome_timestamp.desc(), feedback.c.id.desc())).label("position")).subquery()
    latest = select(ranked.c.card_uuid, ranked.c.outcome, ranked.c.override_code).where(
        ranked.c.position == 1).subquery()
    # A follow-up card still waiting for the patient's next visit has not been shown: not counted yet.
    source = cards.outerjoin(latest, latest.c.card_uuid == cards.c.uuid).outerjoin(
        pending_cards, pending_cards.c.uuid == cards.c.uuid)
    visible = or_(pending_cards.c.uuid.is_(None), pending_cards.c.delivered_at.is_not(None))
    return latest, source, visible


def query_cells(conn: Connection, since: datetime | None, by_month: bool = False) -> list[Cell]:
    """One GROUP BY per dimension (plus the rule overall) over cards joined to their latest feedback;
    `by_month` splits every cell by calendar month of issue (the dashboard's trend)."""
    latest, source, visible = _shown_cards()
    measures = (func.count(),
                func.sum(case((latest.c.outcome == "accepted", 1), else_=0)),
                func.sum(case((latest.c.outcome == "overridden", 1), else_=0)),
                func.count(distinct(cards.c.patient_hash)))
    found: list[Cell] = []
    month = month_of(conn, cards.c.issued_at).label("month")
    for dimension in (OVERALL[0], *DIMENSIONS):
        keys = [cards.c.rule_id] if dimension == OVERALL[0] else [cards.c.rule_id, cards.c[dimension]]
        keys += [month] if by_month else []
        statement = select(*keys, *measures).select_from(source).where(visible).group_by(*keys)
        if since is not None:
            statement = statement.where(cards.c.issued_at >= since)
        for row in conn.execute(statement):
            group = OVERALL[1] if dimension == OVERALL[0] else str(row[1])
            shown, accepted, overridden, patients = (int(v or 0) for v in row[len(keys):])
            found.append(Cell(str(row[0]), dimension, group, shown, accepted, overridden, patients,
                              str(row[len(keys) - 1]) if by_month else None))
    order = {d: i for i, d in enumerate((OVERALL[0], *DIMENSIONS))}
    return sorted(found, key=lambda c: (c.rule, order[c.dimension], c.group, c.month or ""))


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


# -- overrides: rates and reasons, for governance ---------------------------------------------------------
OVERRIDE_FIELDS = ("rule", "dimension", "group", "reason", "shown", "overridden", "override_rate", "share")
ALL_REASONS = "all"  # the `reason` of a group's own row: its override rate
UNSPECIFIED = "unspecified"  # overridden with a comment only, no coded reason


@dataclass(frozen=True)
class ReasonCell:
    rule: str
    dimension: str
    group: str
    reason: str
    overridden: int
    patients: int


def query_reasons(conn: Connection, since: datetime | None) -> list[ReasonCell]:
    """Per rule, group and reason code: cards whose latest feedback is an override with that reason."""
    latest, source, visible = _shown_cards()
    reason = func.coalesce(latest.c.override_code, UNSPECIFIED)
    found: list[ReasonCell] = []
    for dimension in (OVERALL[0], *DIMENSIONS):
        keys = [cards.c.rule_id] if dimension == OVERALL[0] else [cards.c.rule_id, cards.c[dimension]]
        statement = (select(*keys, reason, func.count(), func.count(distinct(cards.c.patient_hash)))
                     .select_from(source).where(visible, latest.c.outcome == "overridden")
                     .group_by(*keys, reason))
        if since is not None:
            statement = statement.where(cards.c.issued_at >= since)
        for row in conn.execute(statement):
            group = OVERALL[1] if dimension == OVERALL[0] else str(row[1])
            found.append(ReasonCell(str(row[0]), dimension, group, str(row[-3]), int(row[-2]), int(row[-1])))
    return found


def protect_reasons(cells: list[ReasonCell], withheld: set[tuple[str, str, str]]) -> set[ReasonCell]:
    """Reason cells to withhold: those of a withheld group (its rate row is "<11" or "hidden"), those under
    MIN_PATIENTS patients, and complements. A group's reasons add up to its overrides, and one reason's
    groups add up to the rule's overall count for it, so in every such table with a withheld cell at
    least two are withheld, covering at least MIN_PATIENTS patients (smallest first), until nothing
    changes: no withheld cell can be had by subtraction along either margin."""
    masked = {c for c in cells if (c.rule, c.dimension, c.group) in withheld or c.patients < MIN_PATIENTS}
    tables: dict[tuple[str, ...], list[ReasonCell]] = {}
    for c in cells:
        tables.setdefault(("group", c.rule, c.dimension, c.group), []).append(c)
        if c.dimension != OVERALL[0]:
            tables.setdefault(("reason", c.rule, c.dimension, c.reason), []).append(c)
    changed = True
    while changed:
        changed = False
        for table in tables.values():
            hit = [c for c in table if c in masked]
            if not hit:
                continue
            covered = sum(c.patients for c in hit)
            for c in sorted((c for c in table if c not in masked), key=lambda c: (c.patients, c.group, c.reason)):
                if len(hit) >= 2 and covered >= MIN_PATIENTS:
                    break
                masked.add(c)
                hit.append(c)
                covered += c.patients
                changed = True
    return masked


def override_rows(conn: Connection, since: datetime | None = None) -> list[dict[str, Any]]:
    """The override report: for each rule and group (as in `rows`), a row with reason "all" (cards shown,
    overridden, override_rate = overridden / shown), then a row per reason given (overridden with that
    reason, its override_rate among cards shown and its share of the group's overrides). Counts are of
    each card's latest feedback; cells covering fewer than MIN_PATIENTS patients show "<11", their
    complements "hidden", and rates are None wherever a count is withheld. A withheld group has no reason
    rows at all: listing them (even withheld) would tell which reasons its few patients' cards were
    overridden with, and listing none that there were none."""
    cells = query_cells(conn, since)
    hidden = complements(cells)
    withheld = {(c.rule, c.dimension, c.group) for c in cells if c.patients < MIN_PATIENTS or c in hidden}
    reasons = query_reasons(conn, since)
    masked = protect_reasons(reasons, withheld)
    by_group: dict[tuple[str, str, str], list[ReasonCell]] = {}
    for r in reasons:
        by_group.setdefault((r.rule, r.dimension, r.group), []).append(r)
    report: list[dict[str, Any]] = []
    for c in cells:
        key = (c.rule, c.dimension, c.group)
        row: dict[str, Any] = {"rule": c.rule, "dimension": c.dimension, "group": c.group, "reason": ALL_REASONS}
        if key in withheld:  # and none of its reasons: which reasons a small group gave, or that it gave none, is
            mark = SUPPRESSED if c.patients < MIN_PATIENTS else HIDDEN  # a fact about a few patients
            row.update(shown=mark, overridden=mark, override_rate=None, share=None)
            report.append(row)
            continue
        else:
            row.update(shown=c.shown, overridden=c.overridden,
                       override_rate=round(c.overridden / c.shown, 4) if c.shown else None, share=None)
        report.append(row)
        for r in sorted(by_group.get(key, ()), key=lambda r: r.reason):
            entry: dict[str, Any] = {"rule": r.rule, "dimension": r.dimension, "group": r.group, "reason": r.reason,
                                     "shown": None}
            if r in masked:
                mark = SUPPRESSED if r.patients < MIN_PATIENTS else HIDDEN
                entry.update(overridden=mark, override_rate=None, share=None)
            else:
                entry.update(overridden=r.overridden, override_rate=round(r.overridden / c.shown, 4),
                             share=round(r.overridden / c.overridden, 4) if c.overridden else None)
            report.append(entry)
    return report


def write_overrides(report: list[dict[str, Any]], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return

    def text(row: dict[str, Any], key: str, style: str = "{}") -> str:
        value = row[key]
        if value is None:
            return row["overridden"] if row["overridden"] in (SUPPRESSED, HIDDEN) and key != "shown" else ""
        return style.format(value) if isinstance(value, float) else str(value)

    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(OVERRIDE_FIELDS)
        writer.writerows([text(r, k) for k in OVERRIDE_FIELDS] for r in report)
        return
    table = [["rule", "dimension", "group", "reason", "shown", "overridden", "rate", "share"]]
    table += [[*(text(r, k) for k in OVERRIDE_FIELDS[:6]), text(r, "override_rate", "{:.1%}"),
               text(r, "share", "{:.1%}")] for r in report]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = [v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))]
        out.write("  ".join(cells).rstrip() + "\n")
    out.write(f"{len(report)} row(s); rate: overridden / shown; share: of the group's overrides. Rows covering "
              f"fewer than {MIN_PATIENTS} patients show {SUPPRESSED}, '{HIDDEN}' rows are withheld so those cannot "
              "be worked out from the others. Override rates are for review: no rule is silenced for them\n")


def load(url: str, since: datetime | None, report: Any = None) -> list[dict[str, Any]]:
    """A report (`report(conn, since)`, by default the acceptance rows) from the database at `url`."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise AuditError(f"no database at {path}")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not (inspect(conn).has_table("cards") and inspect(conn).has_table("feedback")):
                raise AuditError(f"no nudges tables in {make_url(url).render_as_string(hide_password=True)}")
            return (report or (lambda c, s: rows(query_cells(c, s))))(conn, since)
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


def main(url: str | None, since: str | None, fmt: str, out: TextIO, err: TextIO, *, overrides: bool = False) -> int:
    if url is None:
        from ..settings import Settings

        url = Settings().database_url
    try:
        report = load(url, parse_instant(since) if since else None, override_rows if overrides else None)
    except (AuditError, ValueError) as exc:
        err.write(f"nudges audit: {exc}\n")
        return 1
    (write_overrides if overrides else write)(report, fmt, out)
    return 0
