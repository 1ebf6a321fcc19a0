"""Which trend cells the equity dashboard may publish: the audit's small-cell and complementary suppression
carried over to a rule's cells by month, where every count sits in two sums at once.

The audit's table (tools/audit.py) is one-way: a dimension's groups add up to the rule's overall row, and
withholding at least two groups covering 11 patients stops subtraction. A trend adds a second way: a group's
months add up to its total in that table, and each month's groups add up to the month's overall point (which
the dashboard also draws). A count can then be recovered by combining rows and columns even when every line
withholds two cells, so each candidate set of withheld cells is checked exactly: a withheld count is
derivable iff it is determined by the linear system of all those sums (its unit vector lies in the row space),
found by exact elimination over the rationals. Cells are withheld, smallest first, until nothing is derivable
and every line that withholds anything withholds at least two cells covering 11 patients (the audit's rule).
When that cannot be reached the rule's trend is withheld whole; the audit's table alone is protected as before.

The same counts (shown, accepted, overridden) share this structure, so one check covers all three. Values
are hidden up to the sums' freedom, not up to sign: with enough cells at zero an interval can still narrow,
as with any complementary suppression by subtraction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from .audit import MIN_PATIENTS, OVERALL, Cell

# A count in one rule's structure: ("G",) the rule overall; ("T", dimension, group) a group's total in the
# audit table; ("M", month) the rule's month overall; ("x", dimension, group, month) a group's month.
Key = tuple[str, ...]
MAX_UNKNOWNS = 240  # beyond this the elimination is not worth it: withhold the rule's trend whole


@dataclass(frozen=True)
class Line:
    """One published sum: members with their signs (the sum is zero: parts minus their total)."""

    members: tuple[tuple[Key, int], ...]


def structure(totals: list[Cell], months: list[Cell]) -> tuple[dict[Key, int], list[Line]]:
    """Patients per count, and the sums that tie them, for one rule's audit cells and month cells."""
    patients: dict[Key, int] = {}
    for c in totals:
        patients[("G",) if c.dimension == OVERALL[0] else ("T", c.dimension, c.group)] = c.patients
    for c in months:
        key: Key = ("M", str(c.month)) if c.dimension == OVERALL[0] else ("x", c.dimension, c.group, str(c.month))
        patients[key] = c.patients
    rows: dict[tuple[str, str], list[tuple[Key, int]]] = {}
    columns: dict[tuple[str, str], list[tuple[Key, int]]] = {}
    groups: dict[str, list[tuple[Key, int]]] = {}
    for key in patients:
        if key[0] == "x":
            rows.setdefault((key[1], key[2]), []).append((key, 1))
            columns.setdefault((key[1], key[3]), []).append((key, 1))
        elif key[0] == "T":
            groups.setdefault(key[1], []).append((key, 1))
    lines = []
    for (dimension, group), parts in rows.items():
        total = ("T", dimension, group)
        lines.append(Line((*parts, (total, -1)) if total in patients else tuple(parts)))
    for (_, month), parts in columns.items():
        lines.append(Line((*parts, (("M", month), -1))))
    overall = (("G",), -1) if ("G",) in patients else None
    for parts in groups.values():
        lines.append(Line((*parts, overall) if overall else tuple(parts)))
    month_parts = [(k, 1) for k in patients if k[0] == "M"]
    if month_parts:
        lines.append(Line((*month_parts, overall) if overall else tuple(month_parts)))
    return patients, lines


def determined(unknowns: Iterable[Key], lines: list[Line]) -> set[Key]:
    """The unknowns whose value the sums fix, by exact Gauss-Jordan elimination: an unknown is fixed when
    its pivot row has nothing in the free columns (every solution agrees on it)."""
    order = sorted(set(unknowns))
    index = {k: i for i, k in enumerate(order)}
    matrix = []
    for line in lines:
        row = [Fraction(0)] * len(order)
        for key, sign in line.members:
            if key in index:
                row[index[key]] += sign
        if any(row):
            matrix.append(row)
    pivots: list[int] = []
    r = 0
    for col in range(len(order)):
        found = next((i for i in range(r, len(matrix)) if matrix[i][col] != 0), None)
        if found is None:
            continue
        matrix[r], matrix[found] = matrix[found], matrix[r]
        lead = matrix[r][col]
        matrix[r] = [v / lead for v in matrix[r]]
        for i in range(len(matrix)):
            if i != r and matrix[i][col] != 0:
                factor = matrix[i][col]
                matrix[i] = [a - factor * b for a, b in zip(matrix[i], matrix[r], strict=True)]
        pivots.append(col)
        r += 1
    free = set(range(len(order))) - set(pivots)
    return {order[col] for row, col in enumerate(pivots) if not any(matrix[row][f] for f in free)}


def withheld_trend(totals: list[Cell], withheld_totals: set[Key], months: list[Cell]) -> set[Key]:
    """Every count of one rule the dashboard must not show: the audit's withheld totals (given, fixed)
    plus month and group-month cells, chosen so that no withheld count can be derived from what is shown."""
    patients, lines = structure(totals, months)
    hidden = set(withheld_totals)
    hidden |= {k for k, n in patients.items() if n < MIN_PATIENTS}
    hidden |= {k for k in patients if k[0] == "x" and ("T", k[1], k[2]) in hidden}  # a withheld group's months
    trend = {k for k in patients if k[0] in ("x", "M")}
    while True:
        if len(hidden) > MAX_UNKNOWNS:
            return hidden | trend
        problems: list[list[Key]] = []
        for line in lines:  # the audit's rule, where a line's total is shown (its withheld parts' sum is known)
            members = [k for k, _ in line.members]
            held = [k for k in members if k in hidden]
            total_shown = all(k not in hidden for k, sign in line.members if sign < 0)
            if held and total_shown and (len(held) < 2 or sum(patients[k] for k in held) < MIN_PATIENTS):
                problems.append(members)
        fixed = determined(hidden, lines)
        for key in sorted(fixed):
            problems.append([k for line in lines if any(m == key for m, _ in line.members)
                             for k, _ in line.members])
        if not problems:
            return hidden
        # One cell at a time (the smallest that helps with the first problem that can be helped): one cell
        # often settles several problems, and each extra one withholds more than it must.
        candidates = next(([k for k in members if k in trend and k not in hidden] for members in problems
                           if any(k in trend and k not in hidden for k in members)), [])
        if not candidates:  # nothing left to withhold that would help: the trend goes, the audit table stays
            return hidden | trend
        hidden.add(min(candidates, key=lambda k: (patients[k], k)))
