"""One patient's resources as the hook call an EHR would send with everything prefetched, evaluated by the
service's own pipeline: the one implementation behind `nudges replay export/` and `nudges screen`.

Why a call and not a shortcut into the engine: the cards a navigator's worklist shows must be the cards
a clinician would see for that patient, so the request goes through the same parse, prefetch checks,
record index, rules and card building as a live hook call (nothing suppressed, nothing stored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..cards import IssuedCard, Renderer, ordered
from ..errors import NudgesError
from ..fhir import instant, parse_fhir_date
from ..pipeline import evaluate, parse_call, require, still_missing
from ..prefetch import fill
from ..services import Service, Services
from ..store import Bucket

log = logging.getLogger("nudges.screening")
USER = "Practitioner/population-screening"
NO_ENCOUNTER = "no Encounter (the hook needs one)"
NO_PATIENT = "no Patient resource in the export (resources name a patient the export does not have)"


def request_for(service: Service, pid: str, resources: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The call an EHR would send with everything prefetched, one prefetch key per template; None when the
    hook needs an encounter and the record has none. Encounter hooks take the patient's latest encounter."""
    prefetch = fill(service.plan, resources)
    context: dict[str, Any] = {"userId": USER, "patientId": pid}
    if service.hook.has_encounter:
        def start(encounter: dict[str, Any]) -> datetime:
            period = encounter.get("period")
            found = parse_fhir_date(period.get("start")) if isinstance(period, dict) else None
            return found or datetime.min.replace(tzinfo=UTC)

        encounters = [e for e in resources if e.get("resourceType") == "Encounter" and isinstance(e.get("id"), str)]
        if not encounters:
            return None
        context["encounterId"] = max(encounters, key=lambda e: (start(e), e["id"]))["id"]
    return {"hook": service.hook.name, "hookInstance": "population-screening", "context": context,
            "prefetch": prefetch}


@dataclass(frozen=True)
class Fired:
    """One worklist row: a card the rule would raise for this patient and what made it fire."""

    rule: str
    patient: str
    indicator: str
    summary: str
    evidence: tuple[tuple[str, str, str, str, str], ...]  # (name, reference, date, display, value) per binding

    def key(self) -> tuple[str, str]:
        return self.rule, self.patient


@dataclass(frozen=True)
class Screened:
    """A patient's outcome: the cards, the rules that raised, the demographic bucket; or why it was skipped."""

    fired: tuple[Fired, ...] = ()
    failed: tuple[str, ...] = ()
    bucket: Bucket | None = None
    skipped: str | None = None


def evidence(issued: IssuedCard, context: dict[str, Any], patient: dict[str, Any] | None, now: datetime,
             medications: dict[str, dict[str, Any]]) -> tuple[tuple[str, str, str, str, str], ...]:
    """The bound resources, as the card's placeholders show them (one renderer for both)."""
    match = issued.match
    if match is None:
        return ()
    render = Renderer(match, context, patient, now, medications)
    found = []
    for name in sorted(match.bindings):
        when = match.dates.get(name)
        value = render.value(f"{name}.value")
        found.append((name, render.value(f"{name}.reference"), instant(when) if when else "",
                      render.value(f"{name}.display"), "" if value == "not recorded" else value))
    return tuple(found)


def screen_patient(services: Services, service: Service, pid: str, resources: list[dict[str, Any]],
                   now: datetime) -> Screened:
    """The patient's call through the pipeline; a call the service would refuse is skipped with the
    reason it would give."""
    if not any(r.get("resourceType") == "Patient" for r in resources):
        # an EHR's call always has its patient; a shard of resources naming an absent Patient is not one
        # (age rules cannot hold, the equity view would count a person it knows nothing of)
        return Screened(skipped=NO_PATIENT)
    try:
        body = request_for(service, pid, resources)
        if body is None:
            return Screened(skipped=NO_ENCOUNTER)
        call = parse_call(services, service.id, body)
        missing = still_missing(call)
        if missing:
            require(call, missing, "not in the export")
        result = evaluate(call, services, now, patient_hash="population-screening", heads_only=True)
        patient = next(iter(r for r in resources if r.get("resourceType") == "Patient"), None)
        medications: dict[str, dict[str, Any]] = {}  # what `Medication/id` names: the first of an id, as the record
        for r in resources:
            if r.get("resourceType") == "Medication" and isinstance(r.get("id"), str):
                medications.setdefault(r["id"], r)
        fired = tuple(Fired(i.rule_id, pid, i.card["indicator"], i.card["summary"],
                            evidence(i, call.context, patient, now, medications)) for i in ordered(result.issued))
    except NudgesError as exc:
        return Screened(skipped=f"the service would answer {exc.status}: {exc.diagnostics}")
    except Exception as exc:  # one malformed record must not stop a population: counted, with its kind
        log.warning("patient not screened", extra={"error": type(exc).__name__})
        return Screened(skipped=f"could not be evaluated ({type(exc).__name__}: malformed data?)")
    return Screened(fired, tuple(result.failed), result.bucket)
