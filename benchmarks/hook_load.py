"""Hook calls under load: concurrent EHR clients against `nudges serve --workers N` on PostgreSQL.

Not a test (timings on a shared machine are not a pass/fail matter). hook_latency.py measures one call at
a time; a site's question is what happens when many clinicians open charts at once, on the database a
deployment uses. So this script starts the real service (pinned clock, the bundled rules, hot reload off)
on a fresh PostgreSQL schema, sends a typical visit (about 15 resources, every prefetch key the
patient-view service declares filled, each call its own patient and hookInstance) from 16 concurrent
clients in one process (asyncio, a bare HTTP/1.1 client, each client its own keep-alive connection, a closed loop: the
next call leaves when the answer is in; the clients connect one after another over the first second, as
EHRs do not all connect at once), and after a warm-up measures for a fixed time:

- calls per second, and the latency median, p95 and p99 as the clients see it (goal: p99 < 100 ms);
- that nothing was lost: every call answered 200 with the visit's cards, and as many cards written to
  the database as were answered;
- CPU per call: the service's processes (the uvicorn parent and its workers), PostgreSQL's (all its
  processes, so only meaningful when nobody else uses it: the report says whether anyone did), and the
  load generator itself (it shares the machine); how many database connections were opened; and per
  worker, the client connections it holds and the cores it used.

    python benchmarks/hook_load.py                      # 1 worker, 16 clients, 20 s after a 5 s warm-up
    python benchmarks/hook_load.py --workers 2
    python benchmarks/hook_load.py --workers 2 --ramp 0       # all clients connect in the same instant
    python benchmarks/hook_load.py --database-url postgresql://root@127.0.0.1:5432/test --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
from harness import (
    BUNDLED_RULES,
    HS_TNI,
    INSTANCE_PLACEHOLDER,
    LOINC,
    NOW,
    NOW_DT,
    PID_PLACEHOLDER,
    RXNORM,
    SNOMED,
    VITALS,
    Body,
    Numbers,
    Server,
    code_version,
    condition,
    coverage_resource,
    load_average,
    ms,
    observation,
    patient_resource,
    percentile,
    progress,
    read_stat,
    searchset,
    summary,
)
from sqlalchemy.engine import make_url

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
PATIENT = f"Patient/{PID_PLACEHOLDER}"
ENCOUNTER = "enc-0000"  # the id harness.observation() gives the encounter of the first results


# --------------------------------------------------------------------------------------------------
# A typical visit


def at(delta: timedelta) -> str:
    return (NOW_DT - delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def coded(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def visit_resources() -> dict[str, list[dict[str, Any]]]:
    """An ambulatory visit today for a patient with type 2 diabetes, by resource type: what an EHR would
    hand over for each prefetch query. One result is a high-sensitivity troponin above its range 14 h ago
    with no cardiology plan, so the troponin rule shows a card on every call and each call writes to the
    database; an HbA1c three months ago keeps the diabetes navigation rule quiet."""
    note = "Follow-up visit for type 2 diabetes. Doing well on current regimen. Reviewed home glucose log."
    return {
        "Condition": [condition(1, random.Random(3))],  # type 2 diabetes, active
        "Consent": [{
            "resourceType": "Consent", "id": "consent-1", "status": "active",
            "scope": coded("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy",
                           "Privacy Consent"),
            "category": [coded(LOINC, "59284-0", "Patient Consent")],
            "patient": {"reference": PATIENT}, "dateTime": at(timedelta(days=400)),
            "policyRule": coded("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTIN", "opt-in")}],
        "Coverage": [coverage_resource()],
        "DiagnosticReport": [{
            "resourceType": "DiagnosticReport", "id": "dr-hba1c", "status": "final",
            "category": [coded("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
            "code": coded(LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
            "subject": {"reference": PATIENT}, "effectiveDateTime": at(timedelta(days=90)),
            "issued": at(timedelta(days=90, hours=-3)), "conclusion": "HbA1c 7.1 %"}],
        "DocumentReference": [{
            "resourceType": "DocumentReference", "id": "note-1", "status": "current",
            "type": coded(LOINC, "11506-3", "Progress note"), "subject": {"reference": PATIENT},
            "date": at(timedelta(minutes=10)), "author": [{"reference": "Practitioner/dr-1"}],
            "content": [{"attachment": {"contentType": "text/plain",
                                        "data": base64.b64encode(note.encode()).decode()}}],
            "context": {"encounter": [{"reference": f"Encounter/{ENCOUNTER}"}]}}],
        "Encounter": [{
            "resourceType": "Encounter", "id": ENCOUNTER, "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB",
                      "display": "ambulatory"},
            "type": [coded(SNOMED, "185349003", "Encounter for check up")],
            "subject": {"reference": PATIENT}, "period": {"start": at(timedelta(minutes=25))},
            "participant": [{"individual": {"reference": "Practitioner/dr-1"}}]}],
        "Flag": [{
            "resourceType": "Flag", "id": "flag-1", "status": "active",
            "category": [coded("http://terminology.hl7.org/CodeSystem/flag-category", "safety", "Safety")],
            "code": coded(SNOMED, "129839007", "At risk for falls"), "subject": {"reference": PATIENT},
            "period": {"start": at(timedelta(days=200))}}],
        "Media": [{
            "resourceType": "Media", "id": "media-1", "status": "completed",
            "type": coded("http://terminology.hl7.org/CodeSystem/media-type", "image", "Image"),
            "subject": {"reference": PATIENT}, "createdDateTime": at(timedelta(days=30)),
            "content": {"contentType": "image/jpeg", "url": "https://ehr.example.org/media/foot-exam.jpg",
                        "title": "Diabetic foot exam"}}],
        "MedicationAdministration": [{
            "resourceType": "MedicationAdministration", "id": "ma-1", "status": "completed",
            "medicationReference": {"reference": "Medication/medication-1"}, "subject": {"reference": PATIENT},
            "context": {"reference": f"Encounter/{ENCOUNTER}"}, "effectiveDateTime": at(timedelta(minutes=15)),
            "dosage": {"route": coded(SNOMED, "26643006", "Oral"),
                       "dose": {"value": 500, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}}],
        "Medication": [{
            "resourceType": "Medication", "id": "medication-1",
            "code": coded(RXNORM, "198440", "acetaminophen 500 MG Oral Tablet")}],
        "Observation": [
            observation(0, VITALS[4], NOW_DT - timedelta(minutes=20), 138.0, lab=False),  # systolic BP
            observation(1, HS_TNI, NOW_DT - timedelta(hours=14), 212.0, lab=True)],
        "Procedure": [{
            "resourceType": "Procedure", "id": "proc-1", "status": "completed",
            "code": coded(SNOMED, "430193006", "Medication reconciliation"), "subject": {"reference": PATIENT},
            "encounter": {"reference": f"Encounter/{ENCOUNTER}"}, "performedDateTime": at(timedelta(minutes=5))}],
        "QuestionnaireResponse": [{
            "resourceType": "QuestionnaireResponse", "id": "qr-phq2", "status": "completed",
            "questionnaire": "http://loinc.org/q/55757-9", "subject": {"reference": PATIENT},
            "authored": at(timedelta(minutes=22)),
            "item": [{"linkId": "44250-9", "text": "Little interest or pleasure in doing things",
                      "answer": [{"valueInteger": 0}]},
                     {"linkId": "44255-8", "text": "Feeling down, depressed, or hopeless",
                      "answer": [{"valueInteger": 0}]}]}],
        "ServiceRequest": [{
            "resourceType": "ServiceRequest", "id": "sr-lipids", "status": "active", "intent": "order",
            "code": coded(LOINC, "24331-1", "Lipid panel with reflex to direct LDL"),
            "subject": {"reference": PATIENT}, "encounter": {"reference": f"Encounter/{ENCOUNTER}"},
            "authoredOn": at(timedelta(minutes=3)), "requester": {"reference": "Practitioner/dr-1"}}],
    }


def generic_resource(resource_type: str) -> dict[str, Any]:
    """For a prefetch key of a type the visit above does not cover (the rule set may grow one): a minimal
    resource of that type, so the key is still filled and the report can say which keys were filled so."""
    return {"resourceType": resource_type, "id": f"{resource_type.lower()}-1", "status": "active",
            "subject": {"reference": PATIENT}}


def visit_body(prefetch: dict[str, str]) -> tuple[Body, list[str]]:
    """A patient-view request whose prefetch has every key of `prefetch` (discovery's key -> query
    template) filled with the visit's resources of that query's type, `_include`d resources in the same
    Bundle as a FHIR server returns them; and the keys filled with generic resources."""
    resources = visit_resources()
    generic = []
    filled: dict[str, Any] = {}
    for key, template in prefetch.items():
        if template.startswith("Patient/"):
            filled[key] = patient_resource()
            continue
        resource_type, _, query = template.partition("?")
        found = resources.get(resource_type)
        if not found:
            generic.append(key)
            found = [generic_resource(resource_type)]
        included = [r for part in query.split("&") if part.startswith("_include=")
                    for r in resources.get(part.split(":")[-1].capitalize(), [])]
        filled[key] = searchset(found + included)
    body = {"hook": "patient-view", "hookInstance": INSTANCE_PLACEHOLDER,
            "context": {"userId": "Practitioner/dr-1", "patientId": PID_PLACEHOLDER, "encounterId": ENCOUNTER},
            "prefetch": filled}
    every = [r for value in filled.values()
             for r in ([e["resource"] for e in value["entry"]] if value["resourceType"] == "Bundle" else [value])]
    size = statistics.fmean(len(orjson.dumps(r)) for r in every)
    return Body(orjson.dumps(body), len(every), size, body), generic


# --------------------------------------------------------------------------------------------------
# A fresh schema


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def create_schema(url: str) -> str:
    schema = f"nudges_bench_{secrets.token_hex(4)}"
    with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return schema


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def service_url(url: str, schema: str) -> str:
    """The service's URL for the schema: its tables made there (search_path, as the test suite does), and
    its connections named after it, so its PostgreSQL backends can be told from anyone else's."""
    base = "postgresql+psycopg://" + libpq_url(url).removeprefix("postgresql://")
    joiner = "&" if "?" in base else "?"
    return f"{base}{joiner}options=-csearch_path%3D{schema}&application_name={schema}"


class BackendWatch:
    """Polls pg_stat_activity from a thread while the load runs: which backends serve the service (by the
    application name it connects with) and when each started, so connections opened and closed under
    load show up; and how many other clients' backends are busy, which would make the PostgreSQL CPU
    figures (summed over all its processes) include someone else's work."""

    def __init__(self, url: str, schema: str, interval: float = 0.2) -> None:
        self.url, self.schema, self.interval = libpq_url(url), schema, interval
        self.started: dict[int, datetime] = {}  # our backends seen inside the window -> backend_start
        self.others_busy: list[int] = []  # other clients' backends running a query, per sample
        self.recording = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="pg-watch", daemon=True)

    def __enter__(self) -> BackendWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            while not self._stop.wait(self.interval):
                if not self.recording:
                    continue
                rows = conn.execute(
                    "SELECT pid, backend_start, application_name = %s, state = 'active' FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()", (self.schema,)).fetchall()
                self.started.update((pid, start) for pid, start, ours, _ in rows if ours)
                self.others_busy.append(sum(1 for _, _, ours, active in rows if not ours and active))

    def summary(self, start: float, end: float) -> dict[str, Any]:
        opened = [pid for pid, at in self.started.items() if start <= at.timestamp() <= end]
        busy = self.others_busy
        return {"backends_seen": len(self.started), "backends_opened": len(opened),
                "backends_opened_per_second": len(opened) / (end - start),
                "other_busy_backends_mean": statistics.fmean(busy) if busy else 0.0,
                "other_busy_backends_max": max(busy, default=0), "samples": len(busy)}


def cards_written(url: str, schema: str) -> int:
    with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(f"SELECT count(*) FROM {schema}.cards").fetchone()
    return int(row[0]) if row else 0


# --------------------------------------------------------------------------------------------------
# CPU time from /proc


def processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command name, CPU seconds) of every process readable now. The CPU includes that
    of children it has reaped: a PostgreSQL backend that closes mid-run is gone from /proc, but its time
    is in the postmaster's, so summing a set of live processes loses nothing that ended inside the set."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := read_stat(entry.name)) is not None:  # None: gone since the scan
            found[int(entry.name)] = stat
    return found


def tree(root: int, table: dict[int, tuple[int, str, float]]) -> set[int]:
    """`root` and every process descended from it (uvicorn's supervisor, its workers, anything they start)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    members, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in members:
            members.add(pid)
            todo.extend(children.get(pid, []))
    return members


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


@dataclass
class Snapshot:
    at: float  # perf_counter, as the clients time their calls
    wall: float  # time.time(), as PostgreSQL stamps its backends
    table: dict[int, tuple[int, str, float]]
    client: float
    machine: tuple[int, int]


def snapshot() -> Snapshot:
    return Snapshot(time.perf_counter(), time.time(), processes(), time.process_time(), machine_ticks())


def cpu_between(before: Snapshot, after: Snapshot, pids: set[int]) -> float:
    """CPU seconds the processes `pids` used between the snapshots, a process new since `before` counted
    from zero (so the window starts after the warm-up: startup costs stay out of it)."""
    return sum(after.table[p][2] - (before.table[p][2] if p in before.table else 0.0) for p in pids
               if p in after.table)


def connections_per_worker(port: int, workers: set[int]) -> dict[int, int]:
    """Established connections to `port` held by each worker process: keep-alive connections stay with
    the worker that accepted them, so how the 16 clients were spread decides how busy each worker can be."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    cols = line.split()
                    if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":  # 01: ESTABLISHED
                        inodes.add(cols[9])
        except OSError:
            continue
    held: dict[int, int] = {}
    for pid in workers:
        held[pid] = 0
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed since the listing (database connections come and go)
                continue
            held[pid] += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def worker_pids(root: int, workers: int, table: dict[int, tuple[int, str, float]]) -> set[int]:
    """The processes that serve calls: the service itself with one worker; with more, the children uvicorn
    spawns for them (not its supervisor, nor multiprocessing's resource tracker)."""
    if workers == 1:
        return {root}
    found = set()
    for pid in tree(root, table) - {root}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"spawn_main" in handle.read():
                    found.add(pid)
        except OSError:
            continue
    return found


def wait_until_settled(server: Server, workers: int, timeout: float = 90) -> None:
    """/readyz answers as soon as one worker is up; with several, the others may still be loading rules
    when the clients connect, and every keep-alive connection would stay with the first. Wait until the
    workers all exist and the service's processes are idle (startup is CPU-bound)."""
    assert server.process is not None
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        table = processes()
        cpu = sum(table[p][2] for p in tree(server.process.pid, table))
        if (previous is not None and len(worker_pids(server.process.pid, workers, table)) >= workers
                and cpu - previous < 0.05):
            return
        previous = cpu
        time.sleep(0.5)
    raise SystemExit(f"the service's {workers} workers did not settle within {timeout:.0f} s")


# --------------------------------------------------------------------------------------------------
# The load




@dataclass
class Tally:
    """What the clients saw. A call counts in the window if its answer arrived inside it."""

    expected_cards: int
    start: float | None = None
    end: float | None = None
    stop: bool = False
    latencies: list[float] = field(default_factory=list)
    answered: int = 0  # every call answered correctly, warm-up and tail included
    failures: Counter[str] = field(default_factory=Counter)
    failures_in_window: int = 0

    def record(self, began: float, ended: float, problem: str | None) -> None:
        inside = self.start is not None and ended >= self.start and (self.end is None or ended <= self.end)
        if problem is None:
            self.answered += 1
            if inside:
                self.latencies.append(ended - began)
            return
        self.failures[problem] += 1
        if inside:
            self.failures_in_window += 1


def problem_with(status: int, content: bytes, expected_cards: int) -> str | None:
    if status != 200:
        return f"HTTP {status}"
    try:
        cards = orjson.loads(content).get("cards")
    except (orjson.JSONDecodeError, AttributeError):
        return "not a JSON object"
    if not isinstance(cards, list):
        return "no cards list"
    if len(cards) != expected_cards:
        return f"{len(cards)} cards, not {expected_cards}"
    return None


class Connection:
    """One keep-alive HTTP/1.1 connection, written by hand on purpose: the load generator shares the two
    cores with the service, and httpx spent about 1.5 ms of CPU per call (a third of the service's own),
    which the service then lacked. Enough HTTP for this server: Content-Length bodies, reconnecting when
    the server closes; anything else is reported as a failure, never papered over."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), self.port,
                                                             len(payload)))
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" not in headers:
            raise ValueError("an answer without Content-Length")
        content = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def client(url: str, path: str, body: Body, numbers: Numbers, tally: Tally, delay: float) -> None:
    """One EHR: its own connection, kept alive, the next call sent as soon as the answer is read.

    EHRs connect at different moments; sixteen connections opened in the same millisecond are all
    accepted by whichever worker wakes first (it drains the listen queue), and as keep-alive connections
    never move, a second worker would then sit idle for the whole run. `delay` spreads the connects."""
    await asyncio.sleep(delay)
    connection = Connection(url)
    try:
        while not tally.stop:
            payload = body.instance(numbers.next())
            began = time.perf_counter()
            try:
                status, content = await asyncio.wait_for(connection.post(path, payload), 30)
                problem = problem_with(status, content, tally.expected_cards)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, IndexError) as exc:
                problem = type(exc).__name__
                await connection.close()
            tally.record(began, time.perf_counter(), problem)
    finally:
        await connection.close()


@dataclass
class Window:
    before: Snapshot
    after: Snapshot
    workers: set[int]
    connections_at_start: dict[int, int]
    connections_at_end: dict[int, int]


async def drive(server: Server, body: Body, numbers: Numbers, tally: Tally, args: argparse.Namespace,
                watch: BackendWatch) -> Window:
    assert server.process is not None
    tasks = [asyncio.create_task(client(server.url, server.hook_path, body, numbers, tally,
                                        args.ramp * i / args.clients)) for i in range(args.clients)]
    await asyncio.sleep(args.warmup)
    before = snapshot()
    tally.start, watch.recording = before.at, True
    workers = worker_pids(server.process.pid, args.workers, before.table)
    at_start = connections_per_worker(server.port, workers)
    await asyncio.sleep(args.seconds)
    after = snapshot()
    tally.end, watch.recording = after.at, False
    at_end = connections_per_worker(server.port, workers)
    tally.stop = True
    await asyncio.gather(*tasks)
    return Window(before, after, workers, at_start, at_end)


def run_loop(coroutine: Any) -> tuple[Any, str]:
    """Run the clients on uvloop when it is installed (nudges depends on it on Linux): the load generator's
    own overhead is CPU it takes from the service on this machine, so it is kept small."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine), "asyncio"
    return uvloop.run(coroutine), "uvloop"


# --------------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict[str, Any]:
    database_url = args.database_url
    shown_url = make_url(service_url(database_url, "x")).set(query={}).render_as_string(hide_password=True)
    results: dict[str, Any] = {"config": {
        "workers": args.workers, "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
        "ramp": args.ramp,
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "now": NOW, "code": code_version(),
        "rules": str(args.rules), "database": shown_url, "load_before": load_average()}}
    try:
        schema = create_schema(database_url)
    except psycopg.Error as exc:
        raise SystemExit(f"PostgreSQL not reachable at {shown_url}: {str(exc).strip()}; "
                         "pass --database-url") from exc
    results["config"]["schema"] = schema
    progress(f"schema {schema}; starting nudges serve --workers {args.workers}")
    try:
        with tempfile.TemporaryDirectory(prefix="nudges-load-") as tmp:
            server = Server(args.rules, Path(tmp) / "serve", database_url=service_url(database_url, schema),
                            workers=args.workers)
            try:
                server.wait_ready()
                wait_until_settled(server, args.workers)
                body, generic = visit_body(server.prefetch)
                numbers = Numbers()
                # What every call must answer. The setup client then lets go of its connection, so that the
                # connections counted per worker are the load's own.
                _, first = server.call(body.instance(numbers.next()))
                server.client.close()
                cards = first["cards"]
                results["body"] = {
                    "resources": body.resources, "bytes": len(body.template), "prefetch_keys": server.keys,
                    "generic_keys": generic, "cards_per_call": len(cards),
                    "cards": [card.get("summary", "") for card in cards]}
                tally = Tally(expected_cards=len(cards))
                progress(f"{args.clients} clients, {args.warmup:g} s warm-up, then {args.seconds:g} s measured "
                         f"({len(cards)} card(s) per call, {body.resources} resources, {len(body.template):,} bytes)")
                with BackendWatch(database_url, schema) as watch:
                    measured, loop = run_loop(drive(server, body, numbers, tally, args, watch))
                assert server.process is not None
                before, after = measured.before, measured.after
                members = tree(server.process.pid, after.table) | tree(server.process.pid, before.table)
            finally:
                server.stop()
        written = cards_written(database_url, schema)
    finally:
        drop_schema(database_url, schema)

    window = after.at - before.at
    calls = len(tally.latencies)
    if not calls:
        raise SystemExit(f"no call was answered inside the window; failures: {dict(tally.failures)}")
    postgres = {p for p, (_, name, _) in after.table.items() if name.startswith("postgres")}
    busy = (after.machine[0] - before.machine[0]) / max(1, after.machine[1] - before.machine[1])
    server_cpu = cpu_between(before, after, members)
    latency = summary(tally.latencies) | {"p99_ms": ms(percentile(tally.latencies, 99))}
    answered_cards = (tally.answered + 1) * tally.expected_cards  # + the first call
    results["config"]["load_after"] = load_average()
    results["config"]["client_loop"] = loop
    results["load"] = {
        "window_seconds": window, "calls": calls, "calls_per_second": calls / window, "latency": latency,
        "answered_total": tally.answered + 1, "failures": dict(tally.failures),
        "failures_total": sum(tally.failures.values()), "failures_in_window": tally.failures_in_window,
        "cards_answered": answered_cards, "cards_written": written,
        "per_worker": [{"pid": pid, "cores": cpu_between(before, after, {pid}) / window,
                        "connections_at_start": measured.connections_at_start.get(pid, 0),
                        "connections_at_end": measured.connections_at_end.get(pid, 0)}
                       for pid in sorted(measured.workers)]}
    results["database"] = watch.summary(before.wall, after.wall)
    per_call = 1000 / calls
    results["cpu"] = {
        "server_ms_per_call": server_cpu * per_call, "server_cores": server_cpu / window,
        "server_processes": len(members), "workers": len(measured.workers),
        "postgres_ms_per_call": cpu_between(before, after, postgres) * per_call,
        "postgres_cores": cpu_between(before, after, postgres) / window,
        "client_ms_per_call": (after.client - before.client) * per_call,
        "client_cores": (after.client - before.client) / window,
        "machine_busy": busy}
    return results


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report_text(r: dict[str, Any]) -> str:
    cfg, body, load, cpu, db = r["config"], r["body"], r["load"], r["cpu"], r["database"]
    lat = load["latency"]
    lost = load["failures_total"] or load["cards_written"] != load["cards_answered"]
    workers = "; ".join(f"{w['connections_at_start']}/{w['connections_at_end']}, {w['cores']:.2f}"
                        for w in load["per_worker"])
    generic = f" (generic: {', '.join(body['generic_keys'])})" if body["generic_keys"] else ""
    lines = [
        f"nudges hook load benchmark: {cfg['clients']} concurrent clients, nudges serve --workers {cfg['workers']}, "
        f"{cfg['seconds']:g} s measured after {cfg['warmup']:g} s warm-up (clients connecting over the first "
        f"{cfg['ramp']:g} s); {cfg['cpus']} CPUs (the load generator on the same machine), Python {cfg['python']}, "
        f"code {cfg['code']}",
        f"load average {cfg['load_before']} at start, {cfg['load_after']} at end; NUDGES_NOW={cfg['now']}; "
        f"{cfg['database']} schema {cfg['schema']} (fresh, dropped after); client loop {cfg['client_loop']}",
        f"visit: {body['resources']} resources, {body['bytes']:,} bytes, all {len(body['prefetch_keys'])} prefetch "
        f"keys of patient-view filled{generic}; a distinct patient and hookInstance per call; "
        f"{body['cards_per_call']} card(s) per call",
        "",
        f"throughput   {load['calls_per_second']:8.1f} calls/s  ({load['calls']:,} calls answered in "
        f"{load['window_seconds']:.1f} s)",
        f"latency      median {lat['median_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
        f"max {lat['max_ms']:.1f} ms   goal p99 < 100 ms   {verdict(lat['p99_ms'] < 100)}",
        f"nothing lost {load['answered_total']:,} calls answered 200 with their cards, "
        f"{load['failures_total']} failed{' ' + str(load['failures']) if load['failures'] else ''}; "
        f"cards answered {load['cards_answered']:,}, written to the database {load['cards_written']:,}   "
        f"{verdict(not lost)}",
        f"CPU per call service {cpu['server_ms_per_call']:.2f} ms ({cpu['server_cores']:.2f} cores, "
        f"{cpu['workers']} worker(s), {cpu['server_processes']} processes); PostgreSQL (all its processes) "
        f"{cpu['postgres_ms_per_call']:.2f} ms ({cpu['postgres_cores']:.2f} cores); load generator "
        f"{cpu['client_ms_per_call']:.2f} ms ({cpu['client_cores']:.2f} cores)",
        f"database     {db['backends_seen']} backends seen serving the service, {db['backends_opened']} of them "
        f"opened inside the window ({db['backends_opened_per_second']:.1f}/s; sampled every 0.2 s, so at least "
        f"that many); other clients' busy backends: mean "
        f"{db['other_busy_backends_mean']:.2f}, max {db['other_busy_backends_max']}"
        f"{'  (PostgreSQL CPU includes their work)' if db['other_busy_backends_max'] else ''}",
        f"machine      {cpu['machine_busy'] * 100:.0f} % busy over the window; per worker (client connections "
        f"at start/end of the window, cores used): {workers}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Hook calls under load: concurrent clients, nudges on PostgreSQL.")
    parser.add_argument("--workers", type=int, default=1, help="nudges serve --workers N (default 1)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent EHR clients (default 16)")
    parser.add_argument("--seconds", type=float, default=20, help="measured duration (default 20)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load before measuring (default 5)")
    parser.add_argument("--ramp", type=float, default=1.0,
                        help="start the clients one after another over this many seconds of the warm-up "
                             "(default 1; 0: all at once)")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE,
                        help=f"PostgreSQL to make a fresh schema in (default {DEFAULT_DATABASE})")
    parser.add_argument("--rules", type=Path, default=BUNDLED_RULES, help="rules directory (default: bundled)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    args = parser.parse_args(argv)
    if not 0 <= args.ramp < args.warmup:
        parser.error("--ramp: from 0 to less than --warmup (the clients all run before measuring starts)")
    if not args.database_url.startswith(("postgresql://", "postgresql+psycopg://")):
        parser.error("--database-url: a postgresql:// URL (the load is measured on PostgreSQL)")
    results = run(args)
    if args.json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(report_text(results))
    failed = results["load"]["failures_total"] or results["load"]["cards_written"] != results["load"]["cards_answered"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
