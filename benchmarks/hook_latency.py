"""Hook latency benchmark: the real service over loopback HTTP against a large synthetic patient.

Not a test (pytest does not collect it). It starts `nudges serve` as a subprocess on a free port with a
temporary SQLite database, the clock pinned (NUDGES_NOW) and hot reload off, waits for /readyz, and
calls the patient-view service with one pooled keep-alive httpx client, in blocks of back-to-back calls
(steady state, as the fhir.resources baseline is measured) alternating with blocks of in-process parses
of the same payloads, plus a series of calls each after 50 ms idle. It reports:

1. hook latency (median, p95) for a patient with 2,000 Observations, ~50 Conditions and ~50
   MedicationRequests, against the in-process `orjson.loads` time of the same body (target <= 2.0x);
2. the speed-up over validating every resource of that body with fhir.resources R4B (target >= 20x);
3. latency as the record grows: 50, 500, 2,000, 5,000 resources (target: linear);
4. latency as the rule set grows: 10, 50, 100, 200 extra active rules that do not match the patient
   (target: nearly flat);

plus the in-process cost of each stage (parse, pydantic request model, index, evaluate, cards, database)
so HTTP overhead can be separated from rule work; and with `--peer DIR`,

6. nudges beside the HL7 CDS Hooks reference services (cds-hooks/sandbox-cds-services, Node/Express) at
   50 and 2,000 resources: their patient-greeting parses the body and returns one card, the least a CDS
   service can do with a call, so the ratio says what nudges' rules cost over merely taking the call
   (goal: nudges no slower at either size). Same bodies, same kind of client, blocks interleaved; beside
   them the stack's floor (Floor: a bare ASGI app under uvicorn), nudges without its database write
   (Unwritten: what the write costs over HTTP, and how near the peer nudges would be without it), and
   each server's CPU per call.

    python benchmarks/hook_latency.py            # full run (about a minute on 2 cores)
    python benchmarks/hook_latency.py --quick    # smoke run (about 20 s)
    python benchmarks/hook_latency.py --json     # machine-readable output on stdout
    python benchmarks/hook_latency.py --peer /path/to/sandbox-cds-services   # + section 6

The peer directory is a checkout of https://github.com/cds-hooks/sandbox-cds-services with its
dependencies installed (`npm install --omit=dev`); the script starts it with `node` on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from harness import (
    BUNDLED_RULES,
    LOINC,
    NOW,
    RXNORM,
    SERVICE,
    SNOMED,
    Body,
    Endpoint,
    Numbers,
    Server,
    all_resources,
    build_body,
    code_version,
    load_average,
    ms,
    nudges_command,
    progress,
    serving,
    split,
    summary,
)

# --------------------------------------------------------------------------------------------------
# Synthetic rules


def synthetic_rule_files(i: int) -> dict[str, str]:
    """One active rule that never matches the benchmark patient, its value set (a code the patient
    does not have) and the minimal cases file lint demands (one firing, one non-firing case)."""
    rule_id = f"bench-synthetic-{i:03d}"
    kind, system, date_field, where = [
        ("Observation", LOINC, "effectiveDateTime", "status = 'final'"),
        ("Condition", SNOMED, "onsetDateTime", "clinicalStatus.coding.where(code = 'active').exists()"),
        ("MedicationRequest", RXNORM, "authoredOn", "status = 'active'"),
    ][i % 3]
    code, other = f"BENCH-{i:03d}", f"BENCH-OTHER-{i:03d}"
    element = "medicationCodeableConcept" if kind == "MedicationRequest" else "code"

    def resource(with_code: str) -> str:
        data: dict[str, Any] = {"resourceType": kind, "id": f"{kind.lower()}-1",
                                element: {"coding": [{"system": system, "code": with_code}]},
                                date_field: "2026-02-01T09:00:00Z"}
        if kind != "Observation":  # required in R4 (lint validates case resources)
            data["subject"] = {"reference": "Patient/case-patient"}
        if kind == "Observation":
            data["status"] = "final"
        elif kind == "Condition":
            data["clinicalStatus"] = {"coding": [{"code": "active"}]}
        else:
            data.update(status="active", intent="order")
        return orjson.dumps(data).decode()

    rule = f"""id: {rule_id}
title: Synthetic benchmark rule {i:03d} (never matches the benchmark patient)
status: active
version: 1.0.0
hooks: [patient-view]
topic: care-navigation
owner: benchmarks
when:
  all:
    - as: hit
      resource: {kind}
      codes: {rule_id}
      within: 1y
      where: "{where}"
card:
  summary: "Synthetic benchmark rule {i:03d} matched {{{{hit.display}}}}"
  indicator: info
rationale: Generated by benchmarks/hook_latency.py to measure how latency grows with the rule count.
citations:
  - title: Synthetic benchmark rule
    url: https://example.org/nudges/benchmarks
falsepositives:
  - Synthetic; never served outside the benchmark.
"""
    cases = f"""rule: {rule_id}
now: "{NOW}"
cases:
  - name: synthetic code present
    hook: patient-view
    resources:
      - {resource(code)}
    expect:
      - indicator: info
  - name: near miss - another code
    hook: patient-view
    resources:
      - {resource(other)}
    expect: []
"""
    valueset = f"""name: {rule_id}
title: Synthetic benchmark code {i:03d}
codes:
  - {{system: "{system}", code: "{code}", display: "Synthetic benchmark code {i:03d}"}}
"""
    return {f"bench/{rule_id}.yaml": rule, f"bench/{rule_id}.cases.yaml": cases,
            f"valuesets/{rule_id}.yaml": valueset}


def make_rules_dir(base: Path, extra: int, source: Path = BUNDLED_RULES) -> Path:
    """A copy of the base rules plus `extra` synthetic active rules (the seeds and fixtures folders copied
    beside it, as lint resolves citations and cases' bundles there)."""
    target = base / "rules"
    shutil.copytree(source, target)
    for folder in ("seeds", "fhir_fixtures"):
        if (source.resolve().parent / folder).is_dir():
            shutil.copytree(source.resolve().parent / folder, base / folder)
    for i in range(extra):
        for relative, text in synthetic_rule_files(i).items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return target


# --------------------------------------------------------------------------------------------------
# The service under test


def lint_all(directories: list[Path]) -> list[str]:
    """`nudges lint` on each directory (in parallel); any problem stops the benchmark."""
    running = [(d, subprocess.Popen([*nudges_command(), "lint", str(d)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)) for d in directories]
    lines = []
    for directory, process in running:
        output, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"nudges lint {directory} failed:\n{output[-4000:]}")
        lines.append(output.strip().splitlines()[-1])
    return lines


# The HL7 reference services (github.com/cds-hooks/sandbox-cds-services) as shipped, but for one setting:
# their index.js mounts body-parser's JSON parser with its default 100 kB limit, which answers 413 to any
# call over that (a 2,000-resource patient is 2 MB). This launcher loads their own app from the checkout
# and swaps that one middleware for the same parser with a larger limit; everything else (routes, CORS,
# error handler, pretty-printed JSON answers) is theirs. It is written into the run's temporary folder.
PEER_LAUNCHER = """\
'use strict';
const path = require('path');
const { createRequire } = require('module');

const checkout = path.resolve(process.argv[2]);
const fromCheckout = createRequire(path.join(checkout, 'index.js'));
const bodyParser = fromCheckout('body-parser');
const app = fromCheckout('./index.js');
const layer = app._router.stack.find((entry) => entry.name === 'jsonParser');
if (!layer) {
  throw new Error(`no body-parser JSON layer in ${checkout}/index.js: not the expected app`);
}
layer.handle = bodyParser.json({ limit: process.env.PEER_BODY_LIMIT });
app.listen(Number(process.env.PORT), '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${process.env.PORT}`);
});
"""
PEER_SERVICE = "patient-greeting"


def peer_problem(directory: Path) -> str | None:
    """Why `directory` cannot be run as the peer, in words that say what to do about it."""
    if shutil.which("node") is None:
        return "node is not on PATH (the reference services are a Node.js app)"
    if not (directory / "index.js").is_file() or not (directory / "services" / f"{PEER_SERVICE}.js").is_file():
        return (f"{directory} is not a checkout of cds-hooks/sandbox-cds-services "
                f"(no index.js, services/{PEER_SERVICE}.js)")
    if not (directory / "node_modules" / "express").is_dir():
        return f"{directory}/node_modules has no express: run `npm install --omit=dev` there first"
    return None


class Peer(Endpoint):
    """The reference services' patient-greeting, started with `node` on a free port: the same kind of
    client and the same bodies as nudges, so the ratio compares the two services and nothing else."""

    hook_path = f"/cds-services/{PEER_SERVICE}"

    def __init__(self, directory: Path, workdir: Path, body_limit: str = "64mb") -> None:
        super().__init__(workdir)
        launcher = workdir / "peer-launcher.js"
        launcher.write_text(PEER_LAUNCHER, encoding="utf-8")
        env = dict(os.environ, PORT=str(self.port), PEER_BODY_LIMIT=body_limit)
        self.launch(["node", str(launcher), str(directory)], env, directory)
        self.directory = directory

    def wait_ready(self, timeout: float = 60) -> None:
        services = [s["id"] for s in self.wait_for("/cds-services", timeout).json()["services"]]
        if PEER_SERVICE not in services:
            raise SystemExit(f"the peer's discovery lists {services}, not {PEER_SERVICE}")

    def describe(self) -> dict[str, Any]:
        def version(relative: str) -> str | None:
            try:
                return str(orjson.loads((self.directory / relative).read_bytes())["version"])
            except (OSError, KeyError, orjson.JSONDecodeError):
                return None

        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        return {"directory": str(self.directory), "service": PEER_SERVICE, "node": node,
                "express": version("node_modules/express/package.json"),
                "body_parser": version("node_modules/body-parser/package.json")}


FLOOR_APP = """\
import orjson

CARD = orjson.dumps({"cards": [{"uuid": "00000000-0000-4000-8000-000000000000", "summary": "Hello",
                                "indicator": "info", "source": {"label": "floor"}}]})


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    if body:
        orjson.loads(body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": CARD})
"""


class Floor(Endpoint):
    """The least this stack can do with a call: a bare ASGI app under uvicorn, with the HTTP parser and
    event loop `nudges serve` runs on (httptools, uvloop), that reads the body, parses all of it with
    orjson and answers one fixed card. nudges' distance to it is what the service's own work costs
    (rules, cards, suppression and its database write, middleware); its distance to the peer is the
    stack's."""

    hook_path = "/cds-services/floor"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        (workdir / "floor_app.py").write_text(FLOOR_APP, encoding="utf-8")
        self.launch([sys.executable, "-m", "uvicorn", "floor_app:app", "--host", "127.0.0.1", "--port",
                     str(self.port), "--http", "httptools", "--loop", "uvloop", "--lifespan", "off",
                     "--no-access-log", "--no-server-header", "--log-level", "warning"], dict(os.environ), workdir)

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_for("/", timeout)


# `nudges serve` as it is, but for a hook call's database write (nudges/showing.py): every card is shown
# without its suppression claim and its row, and no waiting follow-up card is looked for. Benchmark only (it breaks
# suppression and the audit): it says what the database write costs in a call over HTTP, where its
# share is larger than in-process (section 5), and how fast nudges would be without it.
UNWRITTEN_LAUNCHER = """\
import sys

from nudges import showing
from nudges.cli import main


async def show(store, records, window, patient_hash, oldest):
    return list(records), False


showing.show = show
sys.exit(main(sys.argv[1:]))
"""


class Unwritten(Server):
    """nudges with its per-call database write left out (UNWRITTEN_LAUNCHER), on the same rules."""

    def launch(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        launcher = self.workdir / "unwritten.py"
        launcher.write_text(UNWRITTEN_LAUNCHER, encoding="utf-8")
        super().launch([sys.executable, str(launcher), *command[len(nudges_command()):]], env, cwd)


# --------------------------------------------------------------------------------------------------
# Measurement


def timed_loads(payload: bytes, *, gc_enabled: bool = True) -> float:
    """One in-process orjson.loads of the body; with gc_enabled=False the collector is paused around it
    (the pure parse cost, without the collections that allocating ~100k containers triggers)."""
    if not gc_enabled:
        gc.disable()
    try:
        start = time.perf_counter()
        orjson.loads(payload)
        return time.perf_counter() - start
    finally:
        if not gc_enabled:
            gc.enable()


@dataclass
class Series:
    """Samples for one (server, body): HTTP latency and in-process loads of the same payloads."""

    server: Endpoint
    body: Body
    http: list[float]
    loads: list[float]
    loads_nogc: list[float]
    cards: set[int]
    cpu: float = 0.0  # the server process's CPU seconds over the recorded blocks

    @classmethod
    def of(cls, server: Endpoint, body: Body) -> Series:
        return cls(server, body, [], [], [], set())

    def block(self, numbers: Numbers, size: int, *, record: bool = True, loads: bool = True) -> None:
        """`size` calls back to back (a closed loop, as a load generator drives a service), then `size`
        in-process loads of the same payloads, so both are measured in steady state."""
        payloads = []
        cpu = self.server.cpu_seconds() if record else 0.0
        for _ in range(size):
            # Made just before its call (outside the timed region), as a client serializes a request just
            # before sending it: a body built long before is cold in the client's caches (+1.5 ms here).
            payload = self.body.instance(numbers.next())
            payloads.append(payload)
            elapsed, answer = self.server.call(payload)
            self.cards.add(len(answer["cards"]))
            if record:
                self.http.append(elapsed)
        if record:
            self.cpu += self.server.cpu_seconds() - cpu
        if record and loads:
            self.loads.extend(timed_loads(payload) for payload in payloads)
            self.loads_nogc.extend(timed_loads(payload, gc_enabled=False) for payload in payloads)

    def after_idle(self, numbers: Numbers, calls: int, idle: float) -> list[float]:
        """Calls each preceded by `idle` seconds of nothing: what a lightly used service sees, every call
        starting with cold caches and sleeping CPUs (slower on this VM by a third or more)."""
        times = []
        for _ in range(calls):
            payload = self.body.instance(numbers.next())
            time.sleep(idle)
            elapsed, _ = self.server.call(payload)
            times.append(elapsed)
        return times


BLOCK = 10  # calls per back-to-back block


def interleave(series: list[Series], calls: int, warmup: int, numbers: Numbers, *, loads: bool = True,
               seed: int = 11) -> None:
    """Blocks of back-to-back calls, round-robin over the series in a shuffled order each round, so load
    on the machine that drifts during the run hits every series alike."""
    rng = random.Random(seed)
    size = max(1, min(BLOCK, calls))
    for item in series:
        item.block(numbers, max(1, warmup), record=False)
    for _ in range(math.ceil(calls / size)):
        order = list(series)
        rng.shuffle(order)
        for item in order:
            item.block(numbers, size, loads=loads)


PEER_SIZES = (50, 2000)


def compare_with_peer(server: Server, directory: Path, workdir: Path, calls: int, warmup: int,
                      numbers: Numbers) -> dict[str, Any]:
    """nudges' patient-view, the peer's patient-greeting, the stack's floor (Floor) and nudges without its
    database write (Unwritten) on the same bodies, in one interleaved run: each size's series take turns
    block by block with the other size's, so a slow spell on this shared machine falls on every service
    alike and the ratios stay meaningful even when the milliseconds drift. Each server's CPU per call is
    read from /proc around its blocks."""
    # A nudges of its own, started with the others: the benchmark's main server has served sections 1 and
    # 3 by now (a grown database and heap), which would weigh on it and not on the fresh ones beside it.
    ours = Server(server.rules, workdir / "nudges")
    peer, floor = Peer(directory, workdir), Floor(workdir / "floor")
    unwritten = Unwritten(server.rules, workdir / "unwritten")
    endpoints = (ours, peer, floor, unwritten)
    try:
        for endpoint in endpoints:
            endpoint.wait_ready()
        bodies = [build_body(ours.keys, *split(size)) for size in PEER_SIZES]
        sets = [[Series.of(endpoint, body) for endpoint in endpoints] for body in bodies]
        interleave([item for group in sets for item in group], calls, warmup, numbers, loads=False)
        description = peer.describe()
    finally:
        for endpoint in endpoints:
            endpoint.stop()
    rows = []
    for body, group in zip(bodies, sets, strict=True):
        mine, other, least, bound = (summary(series.http) | {"cpu_ms": ms(series.cpu / len(series.http)),
                                                             "cards_per_call": sorted(series.cards)}
                                     for series in group)
        rows.append({"resources": body.resources, "bytes": len(body.template), "nudges": mine, "peer": other,
                     "floor": least, "unwritten": bound, "ratio": mine["median_ms"] / other["median_ms"],
                     "ratio_p95": mine["p95_ms"] / other["p95_ms"],
                     "floor_ratio": least["median_ms"] / other["median_ms"],
                     "unwritten_ratio": bound["median_ms"] / other["median_ms"]})
    return {"peer": description, "calls": calls, "warmup": warmup, "sizes": rows}


def measure_fhir_resources(body: Body, runs: int) -> dict[str, Any]:
    from fhir.resources.R4B import get_fhir_model_class

    resources = all_resources(body.parsed)
    classes = {r["resourceType"]: get_fhir_model_class(r["resourceType"]) for r in resources}
    for resource in {r["resourceType"]: r for r in resources}.values():  # import and build validators once
        classes[resource["resourceType"]].model_validate(resource)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for resource in resources:
            classes[resource["resourceType"]].model_validate(resource)
        times.append(time.perf_counter() - start)
    return {"resources": len(resources), "runs": runs, "median_ms": ms(statistics.median(times)),
            "min_ms": ms(min(times))}


class GcClock:
    """Time spent in the cyclic garbage collector (all generations) while active, via gc.callbacks."""

    def __init__(self) -> None:
        self.total = 0.0
        self.collections = [0, 0, 0]
        self.active = False
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1


STAGES = ("parse_body", "orjson_loads", "parse_call", "build_record", "engine_evaluate", "runtime_evaluate", "db_cards",
          "runtime_rest", "engine_only", "pipeline")


class Timed:
    """Wraps one method of one object (an instance attribute, nothing else patched) to time its calls."""

    def __init__(self, owner: Any, name: str) -> None:
        self.inner = getattr(owner, name)
        self.last = 0.0
        setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.last += time.perf_counter() - start


def measure_in_process(rules: Path, body: Body, runs: int, workdir: Path, *, light: bool = False) -> dict[str, Any]:
    """The service's own pipeline without HTTP, on a fresh body each run.

    Pass A pauses the garbage collector inside each run and times every stage on its own: the planned
    parse (planned.parse_body, what the service parses; orjson.loads of the whole body beside it, for
    reference), pipeline.parse_call, the index and the rules alone, then Runtime.evaluate (index, rules,
    cards, the suppression claim and card write in one transaction, and whatever else it runs; on the
    event loop with SQLite).
    Pass B runs parse_body + parse_call + Runtime.evaluate with the collector as the service has it (heap
    settled after the rule load: frozen, a high young threshold) and counts the GC pauses that still fall
    inside. `light` stops after the index and the rules (pass A only)."""
    from nudges import engine, pipeline
    from nudges.api.auth import Caller
    from nudges.heap import settle_heap
    from nudges.planned import parse_body
    from nudges.runtime import Runtime
    from nudges.settings import Settings

    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(rules=rules, database_url=f"sqlite:///{workdir / 'inprocess.db'}", now=NOW,
                        reload_interval_seconds=0)
    runtime = Runtime.create(settings)
    runtime.store.migrate()
    if not runtime.reloader.reload():
        raise SystemExit("\n".join(str(p) for p in runtime.reloader.last_problems))
    services, caller = runtime.services(), Caller(authenticated=False)
    heads = services.by_id[SERVICE].index.heads
    now = runtime.clock.now()
    db_cards = Timed(runtime.store, "show_cards")
    loop = asyncio.new_event_loop()  # Runtime.evaluate is awaited on the service's loop
    samples: dict[str, list[float]] = {name: [] for name in STAGES}
    with_gc: list[float] = []
    gc_clock = GcClock()
    numbers = Numbers()
    try:
        for i in range(runs + 3):  # pass A: stage by stage, collector paused
            payload = body.instance(numbers.next())
            db_cards.last = 0.0
            gc.disable()
            try:
                tl = time.perf_counter()
                whole = orjson.loads(payload)
                loaded = time.perf_counter() - tl
                del whole
                t0 = time.perf_counter()
                data = parse_body(payload, heads)
                t1 = time.perf_counter()
                call = pipeline.parse_call(services, SERVICE, data)
                t2 = time.perf_counter()
                record = pipeline.build_record(call, call.service.index)
                t3 = time.perf_counter()
                engine.evaluate(call.service.rules, record, now)
                t4 = time.perf_counter()
                if not light:
                    loop.run_until_complete(runtime.evaluate(call, caller))  # evaluation and write, as served
                t5 = time.perf_counter()
            finally:
                gc.enable()
            del data, call, record
            if i < 3:  # warm-up
                continue
            stages = [("parse_body", t1 - t0), ("orjson_loads", loaded), ("parse_call", t2 - t1),
                      ("build_record", t3 - t2), ("engine_evaluate", t4 - t3), ("engine_only", t4 - t0)]
            if not light:
                rest = (t5 - t4) - (t3 - t2) - (t4 - t3) - db_cards.last
                stages += [("runtime_evaluate", t5 - t4), ("db_cards", db_cards.last), ("runtime_rest", rest),
                           ("pipeline", (t2 - t0) + (t5 - t4))]
            for name, value in stages:
                samples[name].append(value)
        gc.callbacks.append(gc_clock)
        settle_heap()  # as the service does after a rule load
        for i in range(0 if light else runs + 3):  # pass B: the pipeline with the collector as the service has it
            payload = body.instance(numbers.next())
            if i == 3:
                gc_clock.total, gc_clock.collections = 0.0, [0, 0, 0]
            gc_clock.active = True
            t0 = time.perf_counter()
            data = parse_body(payload, heads)
            loop.run_until_complete(runtime.evaluate(pipeline.parse_call(services, SERVICE, data), caller))
            t1 = time.perf_counter()
            del data
            gc_clock.active = False
            if i >= 3:
                with_gc.append(t1 - t0)
    finally:
        if gc_clock in gc.callbacks:
            gc.callbacks.remove(gc_clock)
        runtime.store.dispose()
        loop.run_until_complete(runtime.fhir.close())
        loop.close()
    result: dict[str, Any] = {
        "rules": len(services.by_id[SERVICE].rules), "runs": runs, "tracked_objects": len(gc.get_objects()),
        "stages_median_ms": {k: ms(statistics.median(v)) for k, v in samples.items() if v},
        "stages_min_ms": {k: ms(min(v)) for k, v in samples.items() if v}}
    if with_gc:
        result.update({"pipeline_with_gc": summary(with_gc) | {"mean_ms": ms(statistics.fmean(with_gc))},
                       "gc_ms_per_call": ms(gc_clock.total / runs),
                       "gc_full_collections_per_call": gc_clock.collections[2] / runs,
                       "gc_collections_per_call": [n / runs for n in gc_clock.collections]})
    return result


# --------------------------------------------------------------------------------------------------
# Report


def fit_line(xs: list[float], ys: list[float]) -> dict[str, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"fixed_ms": intercept, "us_per_resource": slope * 1000, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report_text(r: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    cfg, body, main = r["config"], r["body"], r["main"]
    lat, loads, nogc = main["latency"], main["orjson_loads"], main["orjson_loads_gc_paused"]
    add(f"nudges hook latency benchmark: {'quick' if cfg['quick'] else 'full'} run, {cfg['cpus']} CPUs, "
        f"Python {cfg['python']}, code {cfg['code']}")
    add(f"load average {cfg['load_before']} at start, {cfg['load_after']} at end; NUDGES_NOW={NOW}")
    add(f"service: {cfg['command']} serve (uvicorn, SQLite); loopback HTTP, one keep-alive httpx client; "
        f"blocks of {BLOCK} back-to-back calls alternating with blocks of in-process orjson.loads of the same payloads")
    add("")
    add(f"1. Large patient: {body['observations']} Observations + {body['conditions']} Conditions + "
        f"{body['medication_requests']} MedicationRequests (+ Patient, Coverage)")
    add(f"   body {body['bytes'] / 1e6:.2f} MB, mean clinical resource {body['mean_resource_bytes']:.0f} bytes; "
        f"prefetch keys: {', '.join(body['prefetch_keys'])}")
    add(f"   rules: {main['lint']}; {main['service_rules']} on patient-view; cards per call: {lat['cards_per_call']}")
    add(f"   {'':32}{'median':>9}  {'p95':>9}  {'min':>9}")
    add(f"   {'hook latency (HTTP)':<32}{lat['median_ms']:>9.2f}  {lat['p95_ms']:>9.2f}  {lat['min_ms']:>9.2f} ms  "
        f"({lat['n']} calls after {cfg['warmup']} warm-up)")
    add(f"   {'orjson.loads, in-process':<32}{loads['median_ms']:>9.2f}  {loads['p95_ms']:>9.2f}  "
        f"{loads['min_ms']:>9.2f} ms  ({loads['n']} runs)")
    add(f"   {'orjson.loads, GC paused':<32}{nogc['median_ms']:>9.2f}  {nogc['p95_ms']:>9.2f}  "
        f"{nogc['min_ms']:>9.2f} ms  (pure parse)")
    idle = main["after_idle"]
    add(f"   {'hook latency after 50 ms idle':<32}{idle['median_ms']:>9.2f}  {idle['p95_ms']:>9.2f}  "
        f"{idle['min_ms']:>9.2f} ms  ({idle['n']} calls, each after a pause: cold caches)")
    add(f"   latency / orjson.loads = {main['ratio']:.2f}x   target <= 2.0x   {verdict(main['ratio'] <= 2.0)}")
    add(f"   (latency / GC-paused loads = {main['ratio_gc_paused']:.2f}x; min / min = {main['ratio_min']:.2f}x)")
    add("")
    fr = r["fhir_resources"]
    add(f"2. fhir.resources R4B: model_validate of all {fr['resources']} resources of that body takes "
        f"{fr['median_ms']:.1f} ms (median of {fr['runs']})")
    add(f"   speed-up = {fr['median_ms']:.1f} / {lat['median_ms']:.2f} ms = {fr['speedup']:.1f}x   target >= 20x   "
        f"{verdict(fr['speedup'] >= 20)}")
    add(f"   (both in steady state; against the latency after idle: {fr['speedup_after_idle']:.1f}x)")
    add("")
    add(f"3. Scaling in resources (same server, sizes interleaved, {cfg['scaling_calls']} calls each)")
    add(f"   {'resources':>9}  {'body MB':>7}  {'median ms':>9}  {'p95 ms':>8}  {'min ms':>8}  {'us/resource':>11}  "
        f"{'loads ms':>8}  {'ratio':>6}  {'parse ms':>8}")
    for row in r["scaling_resources"]:
        add(f"   {row['resources']:>9}  {row['bytes'] / 1e6:>7.2f}  {row['median_ms']:>9.2f}  {row['p95_ms']:>8.2f}  "
            f"{row['min_ms']:>8.2f}  {row['us_per_resource']:>11.1f}  {row['loads_median_ms']:>8.2f}  "
            f"{row['ratio']:>6.2f}  {row['parse_ms']:>8.2f}")
    fit = r["scaling_resources_fit"]
    add(f"   least-squares fit of the medians: {fit['fixed_ms']:.2f} ms + {fit['us_per_resource']:.1f} us per "
        f"resource (R^2 {fit['r2']:.4f}): {'linear' if fit['r2'] >= 0.98 else 'NOT linear'} (R^2 >= 0.98)")
    add("   (loads and parse: orjson.loads of the whole body, with and without collections, for reference: the\n"
        "   service parses only the entries its rules can read; orjson.loads itself costs more per resource as\n"
        "   bodies outgrow the CPU caches: "
        + " -> ".join(f"{row['parse_ms'] * 1000 / row['resources']:.1f}" for row in r["scaling_resources"])
        + " us per resource)")
    add("")
    add(f"4. Scaling in rules ({body['observations']}-Observation patient; extra active rules that do not match; "
        f"servers interleaved, {cfg['rule_calls']} calls each)")
    add(f"   {'extra':>5}  {'patient-view':>12}  {'median ms':>9}  {'p95 ms':>8}  {'min ms':>8}  {'vs +0':>6}  "
        f"{'engine-only ms':>14}  {'rules ms':>8}  lint")
    for row in r["scaling_rules"]:
        engine_ms = f"{row['engine_only_ms']:>14.2f}" if row["engine_only_ms"] is not None else f"{'-':>14}"
        rules_ms = f"{row['rules_only_ms']:>8.2f}" if row["rules_only_ms"] is not None else f"{'-':>8}"
        add(f"   {row['extra_rules']:>5}  {row['service_rules']:>12}  {row['median_ms']:>9.2f}  {row['p95_ms']:>8.2f}  "
            f"{row['min_ms']:>8.2f}  {row['vs_base']:>5.2f}x  {engine_ms}  {rules_ms}  {row['lint']}")
    if any(row["engine_only_ms"] is not None for row in r["scaling_rules"]):
        add("   (engine-only and rules: in-process with the collector paused, as in section 5)")
    worst = max((row["vs_base"] for row in r["scaling_rules"]), default=1.0)
    add(f"   worst: {worst:.2f}x the latency with no extra rules: {'nearly flat' if worst <= 1.25 else 'NOT flat'} "
        "(<= 1.25x)")
    add("")
    ip = r["in_process"]
    med, low, wgc = ip["stages_median_ms"], ip["stages_min_ms"], ip["pipeline_with_gc"]
    add(f"5. Where the time goes: the same pipeline in-process, same body, {ip['runs']} runs "
        f"({ip['tracked_objects']:,} GC-tracked objects in this process)")
    add(f"   stage costs with the garbage collector paused {'':3}{'median':>9}  {'min':>9}")
    for name, label in (("parse_body", "planned.parse_body (what the service parses)"),
                        ("orjson_loads", "  (orjson.loads of the whole body, for reference)"),
                        ("parse_call", "pipeline.parse_call (pydantic model)"),
                        ("runtime_evaluate", "Runtime.evaluate, made of"),
                        ("build_record", "  pipeline.build_record (index)"),
                        ("engine_evaluate", "  engine.evaluate (rules)"),
                        ("db_cards", "  DB suppression claim + card write"),
                        ("runtime_rest", "  the rest (cards, follow-ups; a difference)"),
                        ("engine_only", "engine-only: parse + parse_call + index + rules"),
                        ("pipeline", "pipeline: parse + parse_call + Runtime.evaluate")):
        lowest = "n/a" if name == "runtime_rest" else f"{low[name]:.2f}"  # min of a difference means nothing
        add(f"   {label:<50}{med[name]:>9.2f}  {lowest:>9} ms")
    add(f"   the same pipeline with the collector as the service runs it: median {wgc['median_ms']:.2f} ms, "
        f"mean {wgc['mean_ms']:.2f} ms, "
        f"p95 {wgc['p95_ms']:.2f} ms;")
    add(f"     GC pauses {ip['gc_ms_per_call']:.2f} ms per call on average, collections per call "
        f"(gen0/gen1/gen2) {'/'.join(f'{n:.2f}' for n in ip['gc_collections_per_call'])}")
    add(f"   HTTP, uvicorn and middleware (HTTP median - pipeline-with-GC median): "
        f"{ip['http_overhead_ms']:.2f} ms; min - min: {ip['http_overhead_min_ms']:.2f} ms")
    if "peer" in r:
        add("")
        add(peer_report(r["peer"]))
    return "\n".join(lines)


def peer_report(peer: dict[str, Any]) -> str:
    about = peer["peer"]
    lines = [f"6. Side by side with the HL7 reference services' {about['service']} (Node {about['node']}, express "
             f"{about['express']}; its 100 kB body limit raised) and the stack's floor (a bare ASGI app under "
             f"uvicorn that parses the body and answers one card), same bodies, same kind of client, "
             f"{peer['calls']} calls each, sizes and services interleaved; CPU: the server process's per call",
             f"   {'resources':>9}  {'body MB':>7}  {'nudges median':>13}  {'p95':>6}  {'CPU':>5}  "
             f"{'peer median':>11}  {'p95':>6}  {'CPU':>5}  {'floor median':>12}  {'CPU':>5}  "
             f"{'nudges / peer':>13}  {'floor / peer':>12}  cards (nudges, peer)"]
    for row in peer["sizes"]:
        ours, theirs, least = row["nudges"], row["peer"], row["floor"]
        lines.append(f"   {row['resources']:>9}  {row['bytes'] / 1e6:>7.2f}  {ours['median_ms']:>10.2f} ms  "
                     f"{ours['p95_ms']:>6.2f}  {ours['cpu_ms']:>5.2f}  {theirs['median_ms']:>8.2f} ms  "
                     f"{theirs['p95_ms']:>6.2f}  {theirs['cpu_ms']:>5.2f}  {least['median_ms']:>9.2f} ms  "
                     f"{least['cpu_ms']:>5.2f}  {row['ratio']:>12.2f}x  {row['floor_ratio']:>11.2f}x  "
                     f"{ours['cards_per_call']}, {theirs['cards_per_call']}")
    lines.append("   without its database write (suppression claims, card rows and the waiting-card check left out, "
                 "benchmark only):")
    for row in peer["sizes"]:
        bound = row["unwritten"]
        lines.append(f"   {row['resources']:>9}  {bound['median_ms']:.2f} ms, CPU {bound['cpu_ms']:.2f} ms "
                     f"({bound['cpu_ms'] - row['nudges']['cpu_ms']:+.2f} ms against nudges'): "
                     f"{row['unwritten_ratio']:.2f}x the peer")
    slowest = max(row["ratio"] for row in peer["sizes"])
    lines.append(f"   nudges no slower than the peer at either size (median ratio <= 1.0; worst {slowest:.2f}x)   "
                 f"{verdict(slowest <= 1.0)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    calls, warmup = (25, 3) if quick else (200, 20)
    scale_calls = 8 if quick else 30
    rule_calls = 8 if quick else 30
    fhir_runs = 1 if quick else 3
    engine_runs = 8 if quick else 60
    sizes = [50, 500, 2000, 5000]
    extra_rules = [0, 10, 200] if quick else [0, 10, 50, 100, 200]
    peer_calls = 20 if quick else 100
    numbers = Numbers()
    results: dict[str, Any] = {"config": {
        "quick": quick, "cpus": os.cpu_count(), "python": sys.version.split()[0], "now": NOW, "code": code_version(),
        "load_before": load_average(), "rules_base": str(args.rules), "command": " ".join(nudges_command()),
        "calls": calls, "warmup": warmup, "scaling_calls": scale_calls, "rule_calls": rule_calls,
        "fhir_runs": fhir_runs, "engine_runs": engine_runs, "peer": str(args.peer) if args.peer else None}}
    with tempfile.TemporaryDirectory(prefix="nudges-bench-") as tmp_name:
        tmp = Path(tmp_name)
        progress(f"generating rule directories ({args.rules} + {extra_rules} synthetic rules) and linting them")
        rule_dirs = {extra: make_rules_dir(tmp / f"rules-{extra}", extra, args.rules) for extra in extra_rules}
        lint_lines = dict(zip(extra_rules, lint_all(list(rule_dirs.values())), strict=True))

        progress("starting the service with the base rules")
        with serving((rule_dirs[0], tmp / "serve-main")) as (server,):
            body = build_body(server.keys, 2000, 50, 50)
            results["body"] = {"observations": 2000, "conditions": 50, "medication_requests": 50,
                               "bytes": len(body.template), "mean_resource_bytes": body.resource_bytes,
                               "prefetch_keys": server.keys}
            progress(f"1. {calls} calls with a {len(body.template) / 1e6:.2f} MB body")
            main = Series.of(server, body)
            interleave([main], calls, warmup, numbers)
            latency = summary(main.http) | {"cards_per_call": sorted(main.cards)}
            loads, nogc = summary(main.loads), summary(main.loads_nogc)
            idle_calls = 10 if quick else 40
            progress(f"1b. {idle_calls} calls after 50 ms idle")
            after_idle = summary(main.after_idle(numbers, idle_calls, 0.05))
            results["main"] = {
                "lint": lint_lines[0], "rule_count": server.ready.get("rule_count"), "latency": latency,
                "orjson_loads": loads, "orjson_loads_gc_paused": nogc,
                "ratio": latency["median_ms"] / loads["median_ms"],
                "ratio_gc_paused": latency["median_ms"] / nogc["median_ms"],
                "ratio_min": latency["min_ms"] / loads["min_ms"], "after_idle": after_idle}

            progress(f"3. scaling in resources: {sizes}")
            series = [Series.of(server, build_body(server.keys, *split(size))) for size in sizes]
            interleave(series, scale_calls, max(2, warmup // 5), numbers)
            rows = []
            for item in series:
                lat = summary(item.http)
                rows.append({"resources": item.body.resources, "bytes": len(item.body.template),
                             "median_ms": lat["median_ms"], "p95_ms": lat["p95_ms"], "min_ms": lat["min_ms"],
                             "us_per_resource": lat["median_ms"] * 1000 / item.body.resources,
                             "loads_median_ms": ms(statistics.median(item.loads)),
                             "parse_ms": ms(statistics.median(item.loads_nogc)),
                             "ratio": lat["median_ms"] / ms(statistics.median(item.loads)),
                             "cards_per_call": sorted(item.cards)})
            results["scaling_resources"] = rows
            results["scaling_resources_fit"] = fit_line([float(r["resources"]) for r in rows],
                                                        [r["median_ms"] for r in rows])

            if args.peer:
                progress(f"6. side by side with the reference services' {PEER_SERVICE} at {list(PEER_SIZES)} "
                         f"resources, {peer_calls} interleaved calls each")
                results["peer"] = compare_with_peer(server, args.peer.resolve(), tmp / "peer", peer_calls, warmup,
                                                    numbers)

        progress(f"2. fhir.resources validation of the same body ({fhir_runs} run(s))")
        fhir = measure_fhir_resources(body, fhir_runs)
        fhir["speedup"] = fhir["median_ms"] / latency["median_ms"]
        fhir["speedup_after_idle"] = fhir["median_ms"] / results["main"]["after_idle"]["median_ms"]
        results["fhir_resources"] = fhir

        progress(f"5. in-process stages ({engine_runs} runs)")
        in_process = measure_in_process(rule_dirs[0], body, engine_runs, tmp / "in-process")
        in_process["http_overhead_ms"] = latency["median_ms"] - in_process["pipeline_with_gc"]["median_ms"]
        in_process["http_overhead_min_ms"] = latency["min_ms"] - in_process["pipeline_with_gc"]["min_ms"]
        results["in_process"] = in_process
        results["main"]["service_rules"] = in_process["rules"]

        progress(f"4. scaling in rules: {len(extra_rules)} servers, {rule_calls} interleaved calls each")
        with serving(*((rule_dirs[extra], tmp / f"serve-{extra}") for extra in extra_rules)) as servers:
            series = [Series.of(s, build_body(s.keys, 2000, 50, 50)) for s in servers]
            interleave(series, rule_calls, max(2, warmup // 5), numbers, loads=False)
        rows = []
        for extra, item, server in zip(extra_rules, series, servers, strict=True):
            engine_only = rules_only = None
            if not quick:
                measured = measure_in_process(rule_dirs[extra], item.body, max(10, engine_runs // 4),
                                              tmp / f"in-process-{extra}", light=True)
                engine_only = measured["stages_median_ms"]["engine_only"]
                rules_only = measured["stages_median_ms"]["engine_evaluate"]
            lat = summary(item.http)
            rows.append({"extra_rules": extra, "rule_count": server.ready.get("rule_count"),
                         "service_rules": in_process["rules"] + extra,  # every synthetic rule is patient-view
                         "median_ms": lat["median_ms"], "p95_ms": lat["p95_ms"], "min_ms": lat["min_ms"],
                         "engine_only_ms": engine_only, "rules_only_ms": rules_only,
                         "lint": lint_lines[extra].split(",")[0],
                         "prefetch_keys": server.keys, "cards_per_call": sorted(item.cards)})
        base = rows[0]["median_ms"]
        for row in rows:
            row["vs_base"] = row["median_ms"] / base
        results["scaling_rules"] = rows
    results["config"]["load_after"] = load_average()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Hook latency benchmark of the nudges CDS Hooks service.")
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run of about 20 s")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    parser.add_argument("--rules", type=Path, default=BUNDLED_RULES,
                        help="base rules directory copied for every run (default: the bundled rules/)")
    parser.add_argument("--peer", type=Path, metavar="DIR",
                        help="a checkout of cds-hooks/sandbox-cds-services with its node_modules installed: "
                             "also time its patient-greeting beside nudges on the same bodies (section 6)")
    args = parser.parse_args(argv)
    if args.peer and (problem := peer_problem(args.peer)):
        parser.error(f"--peer: {problem}")
    started = time.perf_counter()
    results = run(args)
    results["config"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(report_text(results))
        print(f"\n(total wall time {results['config']['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
