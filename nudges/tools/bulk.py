"""`nudges replay` over a FHIR Bulk Data export (NDJSON): every patient through the service pipeline.

Exports come one file per resource type, so one patient's data is spread over every file. To stay
in bounded memory, a first pass streams each file line by line into a temporary SQLite file on disk
keyed by patient id; a second pass reads it back in patient order, one patient in memory at a time.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from ..errors import NudgesError
from ..fhir import instant, parse_fhir_date, patient_of
from ..pipeline import run_body
from ..prefetch import fill
from ..services import Service, Services
from ..settings import Settings
from .progress import Progress

BULK_HOOKS = ("patient-view", "encounter-start", "encounter-discharge")
BATCH = 5000


@dataclass
class Tally:
    files: int = 0
    resources: int = 0
    unlinked: int = 0
    invalid: list[str] = field(default_factory=list)  # file:line: why, for each line that is not a resource
    patients: int = 0
    screened: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    cards: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


def index(files: list[Path], db: sqlite3.Connection, tally: Tally, err: TextIO) -> None:
    """Pass 1: (patient id, raw line) rows; resources that name no patient are only counted."""
    db.execute("CREATE TABLE res (seq INTEGER PRIMARY KEY, patient TEXT NOT NULL, body BLOB NOT NULL)")
    for path in files:
        batch: list[tuple[str, bytes]] = []
        count = 0
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, 1):
                line = raw.strip()
                if not line:
                    continue
                try:
                    resource = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    tally.invalid.append(f"{path}:{number}: not JSON ({exc})")
                    continue
                if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                    tally.invalid.append(f"{path}:{number}: not a FHIR resource (no resourceType)")
                    continue
                pid = patient_of(resource)
                if pid is None:
                    tally.unlinked += 1
                    continue
                batch.append((pid, line))
                count += 1
                if len(batch) >= BATCH:
                    db.executemany("INSERT INTO res (patient, body) VALUES (?, ?)", batch)
                    batch.clear()
        db.executemany("INSERT INTO res (patient, body) VALUES (?, ?)", batch)
        tally.files += 1
        tally.resources += count
        err.write(f"indexed {path}: {count} resource(s) of a patient\n")
    db.execute("CREATE INDEX ix_res_patient ON res (patient, seq)")
    db.commit()
    tally.patients = db.execute("SELECT COUNT(DISTINCT patient) FROM res").fetchone()[0]


def patients(db: sqlite3.Connection) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Pass 2: one patient's resources at a time, in patient id order (deterministic)."""
    current: str | None = None
    group: list[dict[str, Any]] = []
    for pid, body in db.execute("SELECT patient, body FROM res ORDER BY patient, seq"):
        if pid != current:
            if current is not None:
                yield current, group
            current, group = pid, []
        group.append(orjson.loads(body))
    if current is not None:
        yield current, group


def request_for(service: Service, pid: str, resources: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The call an EHR would send with everything prefetched, one prefetch key per template."""
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource in resources:
        by_type[str(resource.get("resourceType"))].append(resource)
    prefetch = fill(service.plan, resources)
    context: dict[str, Any] = {"userId": "Practitioner/bulk-replay", "patientId": pid}
    if service.hook.name != "patient-view":
        def start(encounter: dict[str, Any]) -> datetime:
            found = parse_fhir_date((encounter.get("period") or {}).get("start"))
            return found or datetime.min.replace(tzinfo=UTC)

        encounters = [e for e in by_type.get("Encounter", []) if isinstance(e.get("id"), str)]
        if not encounters:
            return None
        context["encounterId"] = max(encounters, key=lambda e: (start(e), e["id"]))["id"]
    return {"hook": service.hook.name, "hookInstance": "bulk-replay", "context": context, "prefetch": prefetch}


def replay_bulk(files: list[Path], services: Services, settings: Settings, hook: str, now: datetime,
                out: TextIO, err: TextIO) -> Tally:
    """Evaluate every patient in the export and print per-rule card counts."""
    service = services.for_hook(hook)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="nudges-replay-") as folder, \
            closing(sqlite3.connect(Path(folder) / "index.sqlite")) as db:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        index(files, db, tally, err)
        progress = Progress(tally.patients, "patients", err, plain=True, delay=0, prefix="replay: ")
        for done, (pid, resources) in enumerate(patients(db), 1):
            body = request_for(service, pid, resources)
            if body is None:
                tally.skipped["no Encounter"] += 1
            else:
                try:
                    result = run_body(services, settings, body, now)
                except NudgesError as exc:
                    tally.skipped[exc.diagnostics] += 1
                else:
                    tally.screened += 1
                    tally.cards.update(r.rule_id for r in result.records)
                    tally.errors.update(result.failed)
            progress.step(done)
        progress.finish()
    report(tally, service, now, out)
    return tally


def report(tally: Tally, service: Service, now: datetime, out: TextIO) -> None:
    out.write(f"NDJSON: {tally.files} file(s), {tally.resources} resource(s) for {tally.patients} patient(s), "
              f"{tally.unlinked} without a patient, {len(tally.invalid)} invalid line(s)\n")
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
