"""Equity statistics over the audit's cells: is a nudge followed alike across groups of patients?

Per rule and group of each dimension (race, ethnicity, language, payer class): cards shown, accepted and
overridden, the acceptance rate with its 95 % Wilson score interval (sound at small counts, unlike the
normal approximation), its ratio and difference to the rule's overall rate, and a flag in the manner of
AHRQ's National Healthcare Quality and Disparities Report: a difference is flagged when it is statistically
significant (p ≤ 0.05) and at least 10 % of the overall rate in relative terms. The test is a two-sided
two-proportion z-test (pooled) of the group's cards against the rule's other cards, so the two samples do
not overlap. Cards, not patients, are the unit: a patient with several cards counts several times, which
makes the interval somewhat too narrow for rules shown repeatedly to the same people.

Nothing is computed for a withheld cell: the audit's small-cell and complementary suppression decides
what is shown (tools/audit.py), and tools/disclosure.py extends it to the monthly trend. The share of
cards whose demographics are unknown or declined is given only when every cell it is made of is shown.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TextIO

import orjson
from sqlalchemy.engine import Connection

from ..clock import parse_instant
from . import audit
from .audit import DIMENSIONS, HIDDEN, MIN_PATIENTS, OVERALL, SUPPRESSED, Cell, complements, query_cells
from .disclosure import Key, withheld_trend

Z95 = 1.959963984540054
ALPHA = 0.05
MIN_RELATIVE = 0.10
MISSING = ("unknown", "declined")  # recorded as not known, or the patient declined to say
FIELDS = ("rule", "dimension", "group", "shown", "accepted", "overridden", "acceptance_rate", "ci_low",
          "ci_high", "rate_ratio", "rate_difference", "p_value", "flag")
TEST = ("two-sided two-proportion z-test (pooled) of the group's cards against the rule's other cards; flagged "
        "when p ≤ 0.05 and the rate differs from the rule's overall rate by at least 10 % of it (AHRQ NHQDR)")


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test; None when either sample is empty."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


@dataclass(frozen=True)
class Stat:
    """One row of the dashboard's table; counts and statistics are None when the cell is withheld."""

    rule: str
    dimension: str
    group: str
    status: str  # "shown", "<11" (too few patients) or "hidden" (withheld so a small cell stays hidden)
    shown: int | None = None
    accepted: int | None = None
    overridden: int | None = None
    acceptance_rate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    rate_ratio: float | None = None
    rate_difference: float | None = None
    p_value: float | None = None
    flag: bool = False

    @property
    def visible(self) -> bool:
        return self.status == "shown"


@dataclass(frozen=True)
class Point:
    """A month of the trend: the rule overall (dimension "overall") or one group; None when withheld."""

    rule: str
    dimension: str
    group: str
    month: str
    shown: int | None
    acceptance_rate: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class Missing:
    """Share of a rule's cards whose demographics in one dimension are unknown or declined."""

    rule: str
    dimension: str
    share: float | None  # None: withheld (a part of it is a withheld cell) or nothing shown
    cards: int | None


@dataclass
class Report:
    stats: list[Stat]
    trend: list[Point]
    missing: list[Missing]

    def rules(self) -> list[str]:
        return sorted({s.rule for s in self.stats})

    def as_json(self) -> dict[str, Any]:
        return {"test": TEST, "min_patients": MIN_PATIENTS, "stats": [asdict(s) for s in self.stats],
                "trend": [asdict(p) for p in self.trend], "missing": [asdict(m) for m in self.missing]}


def statistics(cells: list[Cell]) -> list[Stat]:
    """The table: the audit's suppression first, then statistics for what is shown."""
    hidden = complements(cells)
    overall = {c.rule: c for c in cells if c.dimension == OVERALL[0]}
    out: list[Stat] = []
    for c in cells:
        if c.patients < MIN_PATIENTS or c in hidden:
            out.append(Stat(c.rule, c.dimension, c.group, SUPPRESSED if c.patients < MIN_PATIENTS else HIDDEN))
            continue
        rate = c.accepted / c.shown if c.shown else None
        low, high = wilson(c.accepted, c.shown) if c.shown else (None, None)
        base = overall.get(c.rule)
        base_rate = base.accepted / base.shown if base and base.shown else None
        ratio = difference = p = None
        flag = False
        if rate is not None and base_rate is not None and base is not None:
            difference = rate - base_rate
            ratio = rate / base_rate if base_rate else None
            if c.dimension != OVERALL[0]:
                p = two_proportion_p(c.accepted, c.shown, base.accepted - c.accepted, base.shown - c.shown)
                relative = abs(difference) / base_rate if base_rate else 0.0
                flag = p is not None and p <= ALPHA and relative >= MIN_RELATIVE
        out.append(Stat(c.rule, c.dimension, c.group, "shown", c.shown, c.accepted, c.overridden,
                        _round(rate), _round(low), _round(high), _round(ratio, 3), _round(difference),
                        _round(p, 6), flag))
    return out


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def trend(cells: list[Cell], month_cells: list[Cell]) -> list[Point]:
    """Monthly points per rule (overall and per group), withheld as tools/disclosure.py decides."""
    hidden_totals = complements(cells) | {c for c in cells if c.patients < MIN_PATIENTS}
    points: list[Point] = []
    for rule in sorted({c.rule for c in cells}):
        totals = [c for c in cells if c.rule == rule]
        months = [c for c in month_cells if c.rule == rule]
        withheld = withheld_trend(totals, {_key(c) for c in hidden_totals if c.rule == rule}, months)
        for c in months:
            if _key(c) in withheld or not c.shown:
                points.append(Point(rule, c.dimension, c.group, str(c.month), None, None, None, None))
                continue
            low, high = wilson(c.accepted, c.shown)
            points.append(Point(rule, c.dimension, c.group, str(c.month), c.shown, _round(c.accepted / c.shown),
                                _round(low), _round(high)))
    return points


def _key(c: Cell) -> Key:
    if c.month is None:
        return ("G",) if c.dimension == OVERALL[0] else ("T", c.dimension, c.group)
    return ("M", c.month) if c.dimension == OVERALL[0] else ("x", c.dimension, c.group, c.month)


def missing_shares(stats: list[Stat]) -> list[Missing]:
    """Unknown or declined, per rule and dimension, only from shown cells (a share made partly of a
    withheld cell would let it be worked out)."""
    out = []
    overall = {s.rule: s for s in stats if s.dimension == OVERALL[0]}
    for rule in sorted({s.rule for s in stats}):
        base = overall.get(rule)
        for dimension in DIMENSIONS:
            parts = [s for s in stats if s.rule == rule and s.dimension == dimension and s.group in MISSING]
            if base is None or not base.visible or not base.shown or any(not s.visible for s in parts):
                out.append(Missing(rule, dimension, None, None))
                continue
            count = sum(s.shown or 0 for s in parts)
            out.append(Missing(rule, dimension, round(count / base.shown, 4), count))
    return out


def build(cells: list[Cell], month_cells: list[Cell]) -> Report:
    stats = statistics(cells)
    return Report(stats, trend(cells, month_cells), missing_shares(stats))


def load(conn: Connection, since: datetime | None) -> Report:
    """Two queries (totals, and the same by month); only counts leave the database."""
    return build(query_cells(conn, since), query_cells(conn, since, by_month=True))


# -- output: the CSV the dashboard offers and `nudges audit --format equity-csv` prints are the same -------
def _text(stat: Stat, key: str) -> str:
    if key in ("rule", "dimension", "group"):
        return str(getattr(stat, key))
    if not stat.visible:  # every number of a withheld row carries its mark, as in `nudges audit --format csv`
        return "" if key == "flag" else stat.status
    value = getattr(stat, key)
    if value is None:
        return ""
    if key == "flag":
        return "yes" if value else ""
    return str(value)


def write_csv(report: Report, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    writer.writerows([_text(s, k) for k in FIELDS] for s in report.stats)


def write(report: Report, fmt: str, out: TextIO) -> None:
    """`equity` (a table for people), `equity-csv`, `equity-json` (with the trend and missing shares)."""
    if fmt == "equity-csv":
        write_csv(report, out)
        return
    if fmt == "equity-json":
        out.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    head = ["rule", "dimension", "group", "shown", "accepted", "rate", "95% CI", "ratio", "diff", "p", "flag"]
    table = [head]
    for s in report.stats:
        if not s.visible:
            table.append([s.rule, s.dimension, s.group, *[s.status] * 7, ""])
            continue
        table.append([s.rule, s.dimension, s.group, str(s.shown), str(s.accepted), _pct(s.acceptance_rate),
                      f"{_pct(s.ci_low)}–{_pct(s.ci_high)}" if s.ci_low is not None else "",
                      "" if s.rate_ratio is None else f"{s.rate_ratio:.2f}",
                      "" if s.rate_difference is None else f"{s.rate_difference * 100:+.1f}",
                      "" if s.p_value is None else f"{s.p_value:.3f}", "DISPARITY" if s.flag else ""])
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for line in table:
        cells = [v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))]
        out.write("  ".join(cells).rstrip() + "\n")
    out.write(f"{TEST}.\nRows covering fewer than {MIN_PATIENTS} patients show {SUPPRESSED}; '{HIDDEN}' rows are "
              "withheld so those cannot be worked out from the overall row.\n")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def main(url: str | None, since: str | None, fmt: str, out: TextIO, err: TextIO) -> int:
    """`nudges audit --format equity|equity-csv|equity-json`: the dashboard's table from the command line."""
    if url is None:
        from ..settings import Settings

        url = Settings().database_url
    try:
        report = audit.load(url, parse_instant(since) if since else None, load)
    except (audit.AuditError, ValueError) as exc:
        err.write(f"nudges audit: {exc}\n")
        return 1
    write(report, fmt, out)  # type: ignore[arg-type]  # audit.load returns what the report function returns
    return 0
