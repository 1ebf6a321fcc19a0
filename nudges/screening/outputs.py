"""What a screening run leaves behind: worklists per rule (CSV and Parquet, with real patient ids, only in
the folder the user names), the equity view (aggregates by group, suppressed, no patient id), a summary,
and the per-rule counts printed as `nudges replay` prints them.

Deterministic by construction: shard rows are each sorted by (rule, patient) and merged, so the bytes of
a worklist depend on the export, the rules and `--now`, never on how many workers ran or in which order
tasks finished.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from ..fhir import instant
from ..services import Service
from ..tools.audit import DIMENSIONS, HIDDEN, MIN_PATIENTS, OVERALL, SUPPRESSED, complements
from .run import Tally

WORKLIST_FIELDS = ("patient_id", "rule", "indicator", "summary", "evidence")
EQUITY_FIELDS = ("rule", "dimension", "group", "screened", "fired", "rate", "rate_ratio")
ROW_GROUP = 65_536  # Parquet rows per row group: fixed, so the file's bytes do not depend on the run


def merged(paths: list[str]) -> Iterator[list[Any]]:
    """Every worklist row of the run, sorted by rule then patient id (each shard's file already is)."""
    def read(path: str) -> Iterator[list[Any]]:
        with open(path, "rb") as stream:
            for line in stream:
                yield orjson.loads(line)

    yield from heapq.merge(*(read(p) for p in paths), key=lambda r: (r[0], r[1]))


def skipped(paths: list[str]) -> Iterator[list[str]]:
    """Every skipped patient of the run with the reason, in patient order."""
    def read(path: str) -> Iterator[list[str]]:
        with open(path + ".skipped", "rb") as stream:
            for line in stream:
                yield orjson.loads(line)

    yield from heapq.merge(*(read(p) for p in paths))


def evidence_text(evidence: list[list[str]]) -> str:
    """A binding per clause, readable in a spreadsheet: `troponin = Observation/t1 (date; display; value)`."""
    parts = []
    for name, reference, date, display, value in evidence:
        detail = "; ".join(v for v in (date, display, value) if v)
        parts.append(f"{name} = {reference}" + (f" ({detail})" if detail else ""))
    return " | ".join(parts)


class _RuleFiles:
    """One rule's CSV and Parquet worklists, written as rows arrive."""

    def __init__(self, folder: Path, rule: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        binding = pa.struct([(name, pa.string()) for name in ("name", "reference", "date", "display", "value")])
        self.schema = pa.schema([("patient_id", pa.string()), ("rule", pa.string()), ("indicator", pa.string()),
                                 ("summary", pa.string()), ("evidence", pa.list_(binding))])
        self.csv_stream = open(folder / f"{rule}.csv", "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.csv = csv.writer(self.csv_stream, lineterminator="\n")
        self.csv.writerow(WORKLIST_FIELDS)
        self.parquet = pq.ParquetWriter(folder / f"{rule}.parquet", self.schema)
        self.pending: list[list[Any]] = []
        self.count = 0

    def add(self, row: list[Any]) -> None:
        rule, patient, indicator, summary, evidence = row
        self.csv.writerow([patient, rule, indicator, summary, evidence_text(evidence)])
        self.pending.append(row)
        self.count += 1
        if len(self.pending) >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        columns = list(zip(*self.pending, strict=True))
        keys = ("name", "reference", "date", "display", "value")
        evidence = [[dict(zip(keys, b, strict=True)) for b in bindings] for bindings in columns[4]]
        self.parquet.write_table(self.pa.Table.from_arrays(
            [self.pa.array(columns[1]), self.pa.array(columns[0]), self.pa.array(columns[2]),
             self.pa.array(columns[3]), self.pa.array(evidence, type=self.schema.field("evidence").type)],
            schema=self.schema))
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.parquet.close()
        self.csv_stream.close()


def write_worklists(tally: Tally, rules: list[str], folder: Path) -> dict[str, int]:
    """`<rule>.csv` and `<rule>.parquet` for every rule of the service (empty ones too: a list with no one
    on it is an answer); rows per rule."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    current: _RuleFiles | None = None
    current_rule = ""
    for row in merged(tally.rows):
        if current is None or row[0] != current_rule:
            if current is not None:
                counts[current_rule] = current.count
                current.close()
            current_rule = row[0]
            current = _RuleFiles(folder, current_rule)
        current.add(row)
    if current is not None:
        counts[current_rule] = current.count
        current.close()
    for rule in rules:
        if rule not in counts:
            _RuleFiles(folder, rule).close()
            counts[rule] = 0
    return counts


# -- the equity view -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Firing:
    """How often a rule would fire in one group: `fired` of `screened` patients."""

    rule: str
    dimension: str
    group: str
    screened: int
    fired: int

    @property
    def patients(self) -> int:
        """The smaller of those who would get the card and those who would not: either is a count of
        people a small cell could single out (15 screened and 12 fired tells that 3 would not). What a
        hidden cell contributes to covering a suppressed one."""
        return min(self.fired, self.screened - self.fired)


def small(cell: Firing) -> bool:
    """A group of fewer than 11 patients, or 1 to 10 of them on either side of the rule. None at all is
    shown: "0 of 150" singles nobody out, and hiding it would hide a disparity the view exists to show."""
    return cell.screened < MIN_PATIENTS or 0 < cell.fired < MIN_PATIENTS or \
        0 < cell.screened - cell.fired < MIN_PATIENTS


def firings(tally: Tally, rules: list[str]) -> list[Firing]:
    cells = []
    for rule in rules:
        cells.append(Firing(rule, *OVERALL, tally.screened, tally.cards[rule]))
        for dimension in DIMENSIONS:
            for (d, group), screened in sorted(tally.groups.items()):
                if d == dimension:
                    cells.append(Firing(rule, dimension, group, screened, tally.fired[(rule, dimension, group)]))
    return cells


@dataclass(frozen=True)
class Population:
    """A group's size, the same under every rule (what the `screened` column shows)."""

    rule: str  # "" : one table per dimension, whatever the rule
    dimension: str
    group: str
    patients: int


def withheld_groups(cells: list[Firing]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The groups whose size is withheld under every rule: those under MIN_PATIENTS, and their complements,
    chosen once per dimension. Chosen per rule (as a rule's own small cells are), a complement hidden under
    one rule was shown under another, and the small group's size was the overall count less the others."""
    sizes = sorted({Population("", c.dimension, c.group, c.screened) for c in cells if c.dimension != OVERALL[0]},
                   key=lambda p: (p.dimension, p.group))
    tiny = {(p.dimension, p.group) for p in sizes if p.patients < MIN_PATIENTS}
    hidden = complements(sizes, lambda p: p.patients < MIN_PATIENTS)
    return tiny, {(p.dimension, p.group) for p in hidden}


def equity_rows(cells: list[Firing]) -> list[dict[str, Any]]:
    """The audit's suppression: a group too small to show (under MIN_PATIENTS, or its complement: the same
    under every rule, see withheld_groups) shows "<11" ("hidden"), and so does a cell with 1 to 10 patients
    on either side of the rule, with enough other groups of its rule and dimension "hidden"
    (audit.complements) that it cannot be worked out by subtraction; the group's size stays shown then (it
    is the same under every rule). The overall row's `screened` is the population, shown as summary.json
    shows it."""
    overall = {c.rule: c.fired / c.screened for c in cells if c.dimension == OVERALL[0] and c.screened}
    tiny, sized = withheld_groups(cells)

    def withheld(c: Firing) -> bool:
        return (c.dimension, c.group) in tiny or (c.dimension, c.group) in sized or small(c)

    hidden = complements(cells, withheld)
    rows: list[dict[str, Any]] = []
    for c in cells:
        if c.dimension == OVERALL[0] and (withheld(c) or c in hidden):
            rows.append({"rule": c.rule, "dimension": c.dimension, "group": c.group, "screened": c.screened,
                         "fired": SUPPRESSED, "rate": None, "rate_ratio": None})
            continue
        key = (c.dimension, c.group)
        size: Any = SUPPRESSED if key in tiny else HIDDEN if key in sized else c.screened  # alike under every rule
        if withheld(c) or c in hidden:
            mark = SUPPRESSED if key in tiny or (small(c) and key not in sized) else HIDDEN
            rows.append({"rule": c.rule, "dimension": c.dimension, "group": c.group, "screened": size,
                         "fired": mark, "rate": None, "rate_ratio": None})
            continue
        rate = c.fired / c.screened if c.screened else None
        base = overall.get(c.rule)
        ratio = rate / base if rate is not None and base else None
        rows.append({"rule": c.rule, "dimension": c.dimension, "group": c.group, "screened": c.screened,
                     "fired": c.fired, "rate": None if rate is None else round(rate, 4),
                     "rate_ratio": None if ratio is None else round(ratio, 3)})
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if value is None:
        return row["fired"] if row["fired"] in (SUPPRESSED, HIDDEN) else ""
    return str(value)


def write_equity(rows: list[dict[str, Any]], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EQUITY_FIELDS)
    writer.writerows([_cell(r, k) for k in EQUITY_FIELDS] for r in rows)


def print_equity(rows: list[dict[str, Any]], out: TextIO) -> None:
    table = [list(EQUITY_FIELDS)] + [[_cell(r, k) for k in EQUITY_FIELDS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(EQUITY_FIELDS))]
    for line in table:
        out.write("  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                            for i, (v, w) in enumerate(zip(line, widths, strict=True))).rstrip() + "\n")
    out.write(f"rows covering fewer than {MIN_PATIENTS} patients (fired or not) show {SUPPRESSED}; '{HIDDEN}' rows "
              "are withheld so those cannot be worked out from the overall row\n")


# -- summary and the printed report ------------------------------------------------------------------------
def summary(tally: Tally, service: Service, ruleset_version: str, now: str, source: str) -> dict[str, Any]:
    """The run's counts (no patient id): summary.json beside the worklists."""
    rules = sorted({r.id for r in service.rules} | set(tally.cards) | set(tally.errors))
    return {"source": source, "hook": service.hook.name, "now": now, "ruleset": ruleset_version,
            "files": tally.files, "resources": tally.resources, "unread": tally.unread,
            "without_patient": tally.unlinked,
            "medications": {"resources": tally.medications, "joined": tally.joined, "unresolved": tally.unresolved},
            "invalid_lines": tally.invalid, "patients": tally.patients, "screened": tally.screened,
            "skipped": dict(sorted(tally.skipped.items())),
            "rules": {r: {"cards": tally.cards[r], "errors": tally.errors[r]} for r in rules}}


def report(tally: Tally, service: Service, now: Any, out: TextIO) -> None:
    out.write(f"NDJSON: {tally.files} file(s), {tally.resources} resource(s) for {tally.patients} patient(s), "
              f"{tally.unlinked} without a patient, {len(tally.invalid)} invalid line(s)\n")
    if tally.unread:
        out.write(f"  {tally.unread} of them of types or codes no rule of the hook reads (left out of the calls)\n")
    if tally.medications or tally.unresolved:
        out.write(f"  {tally.medications} Medication resource(s), {tally.joined} joined to the patients whose orders "
                  f"name them, {tally.unresolved} reference(s) to a Medication the export does not have\n")
    for line in tally.invalid[:20]:
        out.write(f"  invalid {line}\n")
    if len(tally.invalid) > 20:
        out.write(f"  ... and {len(tally.invalid) - 20} more invalid line(s)\n")
    out.write(f"hook {service.hook.name} at {instant(now)}: {tally.screened} patient(s) screened, "
              f"{sum(tally.skipped.values())} skipped\n")
    for reason, count in sorted(tally.skipped.items()):
        out.write(f"  skipped {count}: {reason}\n")
    rules = sorted({r.id for r in service.rules} | set(tally.cards) | set(tally.errors))
    width = max([len("rule"), *map(len, rules)])
    out.write(f"{'rule':<{width}}  {'screened':>8}  {'cards':>7}  {'%':>6}  {'errors':>6}\n")
    for rule in rules:
        share = 100 * tally.cards[rule] / tally.screened if tally.screened else 0.0
        out.write(f"{rule:<{width}}  {tally.screened:>8}  {tally.cards[rule]:>7}  {share:>6.1f}  "
                  f"{tally.errors[rule]:>6}\n")
