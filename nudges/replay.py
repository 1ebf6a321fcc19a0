"""`nudges replay`: recorded hook calls through the service's own pipeline at a pinned instant,
compared with golden files, so any change in what clinicians would see shows up in review.

Each call runs as the EHR sent it (data as prefetch) and, when `<name>.server.json` sits beside it or
the call has no prefetch, with its data served by a loopback FHIR server so the fetch path runs too.
Nothing is suppressed and nothing is written to a database. NDJSON exports go to `bulk.py`.
"""

from __future__ import annotations

import asyncio
import difflib
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import orjson

from . import hooks
from .catalog import Catalog, service_id
from .clock import parse_instant
from .errors import NudgesError
from .fhirclient import FhirClient
from .record import CODE_ELEMENTS, codings, flatten, walk
from .settings import Settings

GOLDEN = ".golden.json"
SERVER = ".server.json"
PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")
NOT_FOUND = {"resourceType": "OperationOutcome",
             "issue": [{"severity": "error", "code": "not-found", "diagnostics": "not found"}]}


class ReplayError(Exception):
    """A fixture that cannot be replayed (no clock, unreadable file, a call the service rejects)."""


def patient_of(resource: dict[str, Any]) -> str | None:
    """The patient a resource belongs to: Patient.id, else subject/patient/beneficiary `Patient/x`."""
    if resource.get("resourceType") == "Patient":
        pid = resource.get("id")
        return pid if isinstance(pid, str) else None
    for key in ("subject", "patient", "beneficiary"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            match = PATIENT_REFERENCE.search(ref["reference"])
            if match:
                return match.group(1)
    return None


def instant_text(now: datetime) -> str:
    return now.isoformat().replace("+00:00", "Z")


# -- one call, the service's way ------------------------------------------------------------------
def run_body(catalog: Catalog, settings: Settings, body: dict[str, Any], now: datetime) -> hooks.Result:
    """Parse, fetch what prefetch lacks from `fhirServer`, evaluate: the steps of the API's hook call,
    minus suppression and card storage."""
    call = hooks.parse_call(catalog, service_id(str(body.get("hook"))), body)
    if call.request.fhirServer:
        asyncio.run(_fill(call, settings, call.request.fhirServer))
    else:
        hooks.require(call, hooks.still_missing(call), "not in prefetch and no fhirServer given")
    return hooks.evaluate(call, catalog, now, patient_hash="replay")


async def _fill(call: hooks.Call, settings: Settings, server: str) -> None:
    client = FhirClient(settings)
    try:
        await hooks.fill_missing(call, client, settings, [server])
    finally:
        await client.close()


def summarize(result: hooks.Result) -> list[dict[str, Any]]:
    """What a golden file pins: per card its rule, indicator, summary and suggested resources (no uuids)."""
    return [{"rule": record.rule_id, "indicator": card["indicator"], "summary": card["summary"],
             "suggestions": [{"label": s["label"],
                              "resources": [a["resource"] for a in s.get("actions", []) if "resource" in a]}
                             for s in card.get("suggestions", [])]}
            for card, record in zip(result.cards, result.records, strict=True)]


# -- the loopback FHIR server ---------------------------------------------------------------------
class _Listener(ThreadingHTTPServer):
    # The service fetches every prefetch key at once; the default backlog of 5 drops connections.
    request_queue_size = 128
    daemon_threads = True


class BundleServer:
    """Serves one Bundle on 127.0.0.1: read `Type/id`, search `Type?patient=id` with `code` filters."""

    def __init__(self, resources: list[dict[str, Any]]) -> None:
        self.resources = resources
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, body = owner.answer(self.path)
                payload = orjson.dumps(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = _Listener(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> BundleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(path)
        segments = [s for s in parts.path.removeprefix("/fhir").split("/") if s]
        if len(segments) == 2:
            found = next((r for r in self.resources
                          if r.get("resourceType") == segments[0] and r.get("id") == segments[1]), None)
            return (200, found) if found else (404, NOT_FOUND)
        if len(segments) != 1:
            return 404, NOT_FOUND
        kind, query = segments[0], parse_qs(parts.query)
        matches = [r for r in self.resources if r.get("resourceType") == kind]
        if "patient" in query:
            pid = query["patient"][0].removeprefix("Patient/")
            matches = [r for r in matches if patient_of(r) == pid]
        for name in ("code", "vaccine-code"):
            if name in query:
                tokens = query[name][0].split(",")
                matches = [r for r in matches if _has_token(r, tokens)]
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(matches),
                     "entry": [{"resource": r} for r in matches]}


def _has_token(resource: dict[str, Any], tokens: list[str]) -> bool:
    found = {key for element in CODE_ELEMENTS.get(resource.get("resourceType", ""), ())
             for concept in walk(resource, element) for key in codings(concept)}
    return any((tuple(t.split("|", 1)) in found) if "|" in t else any(c == t for _, c in found) for t in tokens)


# -- fixtures and golden files --------------------------------------------------------------------
@dataclass
class Fixture:
    path: Path
    body: dict[str, Any]

    @property
    def stem(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".json"))

    @property
    def golden(self) -> Path:
        return self.stem.with_name(self.stem.name + GOLDEN)

    @property
    def server(self) -> Path:
        return self.stem.with_name(self.stem.name + SERVER)


def is_call(data: Any) -> bool:
    return isinstance(data, dict) and "hook" in data and isinstance(data.get("context"), dict)


def discover(paths: list[Path]) -> tuple[list[Fixture], list[Path], list[str]]:
    """Hook calls (*.json with `hook` and `context`) and NDJSON files under the given paths."""
    fixtures: dict[Path, Fixture] = {}
    ndjson: set[Path] = set()
    warnings: list[str] = []
    for root in paths:
        if not root.exists():
            raise ReplayError(f"{root}: no such file or directory")
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for file in files:
            if file.name.endswith(".ndjson"):
                ndjson.add(file)
            elif file.suffix == ".json" and not file.name.endswith((GOLDEN, SERVER)):
                try:
                    data = orjson.loads(file.read_bytes())
                except orjson.JSONDecodeError as exc:
                    warnings.append(f"{file}: skipped, not JSON ({exc})")
                    continue
                if is_call(data):
                    fixtures[file] = Fixture(file, data)
    return [fixtures[p] for p in sorted(fixtures)], sorted(ndjson), warnings


def render(document: Any) -> str:
    """The one stable text form (sorted keys, indented) used for golden files and their diffs."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


def load_golden(fixture: Fixture) -> dict[str, Any] | None:
    if not fixture.golden.is_file():
        return None
    data = orjson.loads(fixture.golden.read_bytes())
    if not isinstance(data, dict) or not isinstance(data.get("cards"), list):
        raise ReplayError(f"{fixture.golden}: a golden file is an object with \"now\" and \"cards\"")
    return data


def server_resources(fixture: Fixture) -> list[dict[str, Any]]:
    """What the loopback FHIR server holds: `<name>.server.json`, else the call's own prefetch data, so
    every call is replayed both ways (as an EHR that prefetches, and one that lets the service fetch)."""
    if not fixture.server.is_file():
        prefetch = fixture.body.get("prefetch")
        if not prefetch:
            raise ReplayError(f"{fixture.path}: no prefetch and no {fixture.server.name} to serve its data")
        return [r for value in prefetch.values() for r in flatten(value)]
    data = orjson.loads(fixture.server.read_bytes())
    if not (isinstance(data, dict) and data.get("resourceType") == "Bundle"):
        raise ReplayError(f"{fixture.server}: must be a FHIR Bundle")
    entries = [e for e in data.get("entry") or () if isinstance(e, dict)]
    return [e["resource"] for e in entries if isinstance(e.get("resource"), dict)]


def run_modes(fixture: Fixture, catalog: Catalog, settings: Settings, now: datetime) -> dict[str, Any]:
    """Cards per data mode: "prefetch" (the body as sent) and "fhir-server" (loopback server)."""
    results: dict[str, Any] = {}
    has_prefetch = bool(fixture.body.get("prefetch"))
    try:
        # A recorded fhirServer/fhirAuthorization is dropped: a replay never leaves this machine.
        body = {k: v for k, v in fixture.body.items() if k not in ("fhirServer", "fhirAuthorization")}
        if has_prefetch:
            results["prefetch"] = summarize(run_body(catalog, settings, body, now))
        # Always also from a FHIR server: the same data fetched by the service must give the same cards.
        with BundleServer(server_resources(fixture)) as server:
            body = {k: v for k, v in body.items() if k != "prefetch"}
            body["fhirServer"] = server.base
            results["fhir-server"] = summarize(run_body(catalog, settings, body, now))
    except NudgesError as exc:
        raise ReplayError(f"{fixture.path}: the service would answer {exc.status}: {exc.diagnostics}") from None
    return results


def replay_fixture(fixture: Fixture, catalog: Catalog, settings: Settings, pinned: datetime | None,
                   update: bool, out: TextIO) -> bool:
    """Replay one call in every mode; print a diff per mode that differs from the golden file."""
    golden = load_golden(fixture)
    if pinned is None and (golden is None or not isinstance(golden.get("now"), str)):
        raise ReplayError(f"{fixture.path}: no clock: pass --now or add \"now\" to {fixture.golden.name}")
    now = pinned or parse_instant(str((golden or {})["now"]))
    results = run_modes(fixture, catalog, settings, now)
    if update:
        first = next(iter(results.values()))
        golden = {"now": instant_text(now), "cards": first}
        fixture.golden.write_text(render(golden), encoding="utf-8")
    if golden is None:
        out.write(f"MISSING {fixture.golden}: run with --update to create it\n")
        return False
    expected = render(golden).splitlines(keepends=True)
    ok = True
    for mode, cards in results.items():
        actual = render({"now": instant_text(now), "cards": cards}).splitlines(keepends=True)
        if actual != expected:
            ok = False
            out.write(f"DIFF {fixture.path} ({mode})\n")
            out.writelines(difflib.unified_diff(expected, actual, str(fixture.golden), f"{fixture.path} ({mode})"))
    if ok:
        verb = "updated" if update else "ok"
        out.write(f"{verb} {fixture.path} ({', '.join(results)}): {len(golden['cards'])} card(s)\n")
    return ok


def main(paths: list[Path], *, rules: Path | None, now: str | None, update: bool, hook: str,
         out: TextIO, err: TextIO) -> int:
    """The command: 0 when every call matches its golden file (or was updated), 1 otherwise."""
    from .ruleset import load_ruleset
    from .settings import load_settings

    try:
        pinned = parse_instant(now) if now else None
        fixtures, ndjson, warnings = discover(paths)
    except (ValueError, ReplayError) as exc:
        err.write(f"nudges replay: {exc}\n")
        return 1
    for warning in warnings:
        err.write(f"warning: {warning}\n")
    if not fixtures and not ndjson:
        err.write("nudges replay: no hook calls (*.json with hook and context) or *.ndjson files found\n")
        return 1
    if ndjson and pinned is None:
        err.write("nudges replay: NDJSON replay needs --now (deterministic output)\n")
        return 1
    settings = load_settings(rules=rules)
    # A loopback server never needs the production budget; a generous one keeps replays from flaking.
    settings = settings.model_copy(update={"fhir_timeout_seconds": max(settings.fhir_timeout_seconds, 30.0)})
    loaded = load_ruleset(settings.rules)
    if loaded.ruleset is None:
        for problem in loaded.problems:
            err.write(f"{problem}\n")
        err.write(f"nudges replay: the rule set in {settings.rules} has problems\n")
        return 1
    catalog = Catalog.build(loaded.ruleset, frozenset(settings.rule_statuses))
    failed = 0
    for fixture in fixtures:
        try:
            failed += not replay_fixture(fixture, catalog, settings, pinned, update, out)
        except (ReplayError, orjson.JSONDecodeError, OSError) as exc:
            out.write(f"ERROR {exc}\n")
            failed += 1
    if fixtures:
        out.write(f"{len(fixtures) - failed} of {len(fixtures)} call(s) match their golden files "
                  f"(rule set {loaded.ruleset.version})\n")
    if ndjson and pinned is not None:
        from .bulk import replay_bulk

        replay_bulk(ndjson, catalog, settings, hook, pinned, out, err)
    return 1 if failed else 0
