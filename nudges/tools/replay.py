"""`nudges replay`: recorded hook calls through the service's own pipeline at a pinned instant, compared
with golden files, so any change in what clinicians would see shows up in review.

Each call runs in two data modes: as the EHR sent it (prefetch), and with its data served by a loopback
FHIR server (`<name>.server.json` beside it, else the call's own prefetch data) so the fetch path runs too.
Nothing is suppressed and nothing is written to a database. A golden file pins every field a clinician
reads (summary, detail, source, suggestions with their resources, links, override reasons); differences
are shown per card (matched by rule id) and per field. NDJSON exports go to `bulk.py`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from ..cards import ordered
from ..clock import parse_instant
from ..errors import NudgesError
from ..fhir import flatten, instant
from ..pipeline import Result, run_body
from ..rules.valuesets import REMIND_LATER
from ..services import Services
from ..settings import Settings
from .loopback import BundleServer

GOLDEN = ".golden.json"
SERVER = ".server.json"
MODES = ("prefetch", "fhir-server")


class ReplayError(Exception):
    """A fixture that cannot be replayed (no clock, unreadable file, a call the service rejects)."""


def summarize(result: Result) -> list[dict[str, Any]]:
    """What a golden file pins: every field of each card a clinician reads or acts on, without the uuids
    (fresh on every call)."""
    pinned = []
    for issued in ordered(result.issued):
        card = issued.card
        entry: dict[str, Any] = {"rule": issued.rule_id, "indicator": card["indicator"], "summary": card["summary"],
                                 "source": card["source"]}
        if "detail" in card:
            entry["detail"] = card["detail"]
        if card.get("suggestions"):
            entry["selectionBehavior"] = card.get("selectionBehavior")
            entry["suggestions"] = [{k: v for k, v in s.items() if k != "uuid"} for s in card["suggestions"]]
        if card.get("links"):
            entry["links"] = card["links"]
        # The rule's own reasons: the service's remind-me-later, on every card that has any, is the same
        # for all rules (pinned by tests/test_suppression.py), so golden files do not repeat it.
        reasons = [r for r in card.get("overrideReasons", ()) if r != REMIND_LATER]
        if reasons:
            entry["overrideReasons"] = reasons
        pinned.append(entry)
    return pinned


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


def run_modes(fixture: Fixture, services: Services, settings: Settings, now: datetime,
              server: BundleServer) -> dict[str, list[dict[str, Any]]]:
    """Cards per data mode: "prefetch" (the body as sent) and "fhir-server" (the loopback server)."""
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        # A recorded fhirServer/fhirAuthorization is dropped: a replay never leaves this machine.
        body = {k: v for k, v in fixture.body.items() if k not in ("fhirServer", "fhirAuthorization")}
        if fixture.body.get("prefetch"):
            results["prefetch"] = summarize(run_body(services, settings, body, now))
        # Always also from a FHIR server: the same data fetched by the service must give the same cards.
        server.resources = server_resources(fixture)
        body = {k: v for k, v in body.items() if k != "prefetch"}
        body["fhirServer"] = server.base
        results["fhir-server"] = summarize(run_body(services, settings, body, now))
    except NudgesError as exc:
        raise ReplayError(f"{fixture.path}: the service would answer {exc.status}: {exc.diagnostics}") from None
    return results


# -- differences, per card and per field -------------------------------------------------------------
def _lines(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.splitlines() or [""]
    return render(value).splitlines()


def card_diff(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[str]:
    """Readable differences: cards matched by rule id, then each field that differs as a small diff, so a
    three-field edit reads as three short diffs rather than a reshuffled document."""
    want = {c.get("rule"): c for c in expected}
    got = {c.get("rule"): c for c in actual}
    out: list[str] = []
    for rule in [*want, *(r for r in got if r not in want)]:
        if rule not in got:
            out.append(f"  card {rule}: expected, not returned (summary: {want[rule].get('summary')!r})")
            continue
        if rule not in want:
            out.append(f"  card {rule}: returned, not expected (summary: {got[rule].get('summary')!r})")
            continue
        before, after = want[rule], got[rule]
        fields = [k for k in [*before, *(k for k in after if k not in before)] if before.get(k) != after.get(k)]
        if not fields:
            continue
        out.append(f"  card {rule}:")
        for key in fields:
            old, new = _lines(before.get(key, "")) if key in before else [], _lines(after[key]) if key in after \
                else []
            out.append(f"    {key}:")
            out += [f"      {line}" for line in difflib.unified_diff(old, new, "expected", "actual", n=1,
                                                                     lineterm="")][2:]
    order_want = [c.get("rule") for c in expected]
    order_got = [c.get("rule") for c in actual]
    if not out and order_want != order_got:
        out.append(f"  order: expected {order_want}, got {order_got}")
    return out


def fixture_clock(fixture: Fixture, golden: dict[str, Any] | None, pinned: datetime | None) -> datetime:
    """`--now`, else the golden file's `now`; with neither a replay would not be deterministic: refused."""
    if pinned is None and (golden is None or not isinstance(golden.get("now"), str)):
        raise ReplayError(f"{fixture.path}: no clock: pass --now or add \"now\" to {fixture.golden.name}")
    return pinned or parse_instant(str((golden or {})["now"]))


def differences(expected: list[dict[str, Any]],
                results: dict[str, list[dict[str, Any]]]) -> list[tuple[list[str], list[str]]]:
    """The modes whose cards differ from the golden file, grouped when they agree with each other, each
    group with its per-card, per-field differences (what `nudges replay` prints and the console shows)."""
    groups: dict[str, list[str]] = {}
    for mode in (m for m in results if results[m] != expected):
        groups.setdefault(render(results[mode]), []).append(mode)
    return [(same, card_diff(expected, results[same[0]])) for same in groups.values()]


def replay_fixture(fixture: Fixture, services: Services, settings: Settings, pinned: datetime | None,
                   update: bool, out: TextIO, server: BundleServer) -> bool:
    """Replay one call in every mode; print per-card differences from the golden file (once when the
    modes agree with each other)."""
    golden = load_golden(fixture)
    now = fixture_clock(fixture, golden, pinned)
    results = run_modes(fixture, services, settings, now, server)
    modes = list(results)
    if update:
        if len({render(c) for c in results.values()}) > 1:
            out.write(f"DIFF {fixture.path}: the data modes disagree; golden file not rewritten\n")
            out.writelines(line + "\n" for line in card_diff(results[modes[0]], results[modes[-1]]))
            return False
        golden = {"now": instant(now), "cards": results[modes[0]]}
        if not fixture.golden.is_file() or fixture.golden.read_text(encoding="utf-8") != render(golden):
            fixture.golden.write_text(render(golden), encoding="utf-8")
            out.write(f"updated {fixture.golden}\n")
    if golden is None:
        out.write(f"MISSING {fixture.golden}: run with --update to create it\n")
        return False
    expected = golden["cards"]
    found = differences(expected, results)
    if not found:
        out.write(f"ok {fixture.path} ({', '.join(modes)}): {len(expected)} card(s)\n")
        return True
    for same, lines in found:
        out.write(f"DIFF {fixture.path} ({', '.join(same)}) against {fixture.golden}\n")
        out.writelines(line + "\n" for line in lines)
    return False


def main(paths: list[Path], *, rules: Path | None, now: str | None, update: bool, hook: str,
         out: TextIO, err: TextIO) -> int:
    """The command: 0 when every call matches its golden file (or was updated), 1 otherwise."""
    from ..settings import load_settings
    from .loading import load_services

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
    services = load_services(settings.rules, settings.rule_statuses, err, settings.site_valuesets)
    if services is None:
        return 1
    failed = 0
    with BundleServer() as server:
        for fixture in fixtures:
            try:
                failed += not replay_fixture(fixture, services, settings, pinned, update, out, server)
            except (ReplayError, orjson.JSONDecodeError, OSError) as exc:
                out.write(f"ERROR {exc}\n")
                failed += 1
    if fixtures:
        out.write(f"{len(fixtures) - failed} of {len(fixtures)} call(s) match their golden files "
                  f"(rule set {services.ruleset.version})\n")
    if ndjson and pinned is not None:
        from .bulk import replay_bulk

        replay_bulk(ndjson, services, settings, hook, pinned, out, err)
    return 1 if failed else 0
