"""One hook call from validated request to cards: the pipeline shared by the HTTP API, rule tests
and replay, so every path evaluates exactly the same way."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from . import engine
from .api.models import CdsServiceRequest
from .cards import build_card, order_key
from .catalog import Catalog, Service
from .demographics import bucket
from .errors import BadRequest, MissingField, NotFound
from .fhirclient import FhirClient, check_server
from .prefetch import REQUIRED_CONTEXT, missing_keys, render, unobtainable
from .record import IndexPlan, PatientRecord, flatten
from .settings import Settings
from .store import Bucket, CardRecord

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
REFERENCE = re.compile(r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


@dataclass
class Call:
    """A validated request: what the engine needs, nothing it does not."""

    service: Service
    request: CdsServiceRequest
    context: dict[str, Any]
    prefetch: dict[str, Any]


def validation_error(exc: ValidationError) -> BadRequest:
    error = exc.errors()[0]
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "missing":
        return MissingField(field)
    if error["type"] == "extra_forbidden":
        return BadRequest(f"unknown field '{field}'", expression=field)
    return BadRequest(f"{field}: {error['msg']}" if field else error["msg"], expression=field or None)


def parse_call(catalog: Catalog, service_id: str, body: dict[str, Any]) -> Call:
    service = catalog.services.get(service_id)
    if service is None:
        raise NotFound(f"no CDS service '{service_id}'")
    try:
        request = CdsServiceRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if request.hook != service.hook:
        raise BadRequest(f"hook '{request.hook}' does not match service '{service_id}' ({service.hook})",
                         expression="hook")
    context = request.context
    for name in REQUIRED_CONTEXT[service.hook]:
        if context.get(name) in (None, "", [], {}):
            raise MissingField(f"context.{name}")
    if not isinstance(context["patientId"], str) or not FHIR_ID.match(context["patientId"]):
        raise BadRequest("context.patientId must be a FHIR id", expression="context.patientId")
    if not isinstance(context["userId"], str) or not REFERENCE.match(context["userId"]):
        raise BadRequest("context.userId must be a reference such as Practitioner/123",
                         expression="context.userId")
    encounter = context.get("encounterId")
    if encounter is not None and (not isinstance(encounter, str) or not FHIR_ID.match(encounter)):
        raise BadRequest("context.encounterId must be a FHIR id", expression="context.encounterId")
    for name in ("draftOrders", "appointments"):
        if name in context and not (isinstance(context[name], dict)
                                    and context[name].get("resourceType") == "Bundle"):
            raise BadRequest(f"context.{name} must be a FHIR Bundle", expression=f"context.{name}")
    if "selections" in context and not (isinstance(context["selections"], list)
                                        and all(isinstance(s, str) for s in context["selections"])):
        raise BadRequest("context.selections must be a list of references", expression="context.selections")
    prefetch = request.prefetch or {}
    return Call(service, request, context, prefetch)


def build_record(call: Call, index: IndexPlan | None = None) -> PatientRecord:
    """The call's record; with the service's index plan on the hot path, a full index without one."""
    record = PatientRecord.from_prefetch(call.prefetch, index)
    context = call.context
    drafts = list(flatten(context.get("draftOrders"))) + list(flatten(context.get("appointments")))
    if drafts:
        record.add_all(drafts, "draft")
        selections = set(context.get("selections") or ())
        chosen = [r for r in drafts if f"{r.get('resourceType')}/{r.get('id')}" in selections] \
            if call.service.hook == "order-select" else drafts
        record.add_all(chosen, "selected")
    return record


def still_missing(call: Call) -> list[str]:
    return missing_keys(call.service.plan, call.prefetch)


def queries_for(call: Call, keys: list[str]) -> dict[str, str]:
    templates = call.service.plan.templates
    return {key: render(templates[key], call.context) for key in keys}


async def fill_missing(call: Call, fhir: FhirClient, settings: Settings, allowed: list[str] | None = None) -> None:
    """Fetch what prefetch lacks from the call's fhirServer (SSRF-checked); 412 when required data
    cannot be had from either source."""
    missing = still_missing(call)
    if not missing:
        return
    server = call.request.fhirServer
    if not server:
        require(call, missing, "not in prefetch and no fhirServer given")
        return
    base = check_server(server, settings, allowed)
    auth = call.request.fhirAuthorization
    fetched = await fhir.fetch_all(base, auth.access_token if auth else None, queries_for(call, missing))
    failed, reasons = [], set()
    for key, value in fetched.items():
        if isinstance(value, Exception):
            failed.append(key)
            reasons.add(str(value))
        else:
            call.prefetch[key] = value
    if failed:
        require(call, failed, "; ".join(sorted(reasons)))


def require(call: Call, missing: list[str], why: str) -> None:
    if any(k in call.service.plan.required for k in missing):
        raise unobtainable(missing, call.service.plan, why)


@dataclass
class Result:
    cards: list[dict[str, Any]]
    records: list[CardRecord]
    failed: list[str]
    matched: list[str]


def evaluate(call: Call, catalog: Catalog, now: datetime, *, patient_hash: str,
             recently_shown: Callable[[dict[str, timedelta]], set[str]] | None = None,
             tenant: str | None = None) -> Result:
    """Evaluate, drop cards suppressed for this patient, build and order the cards."""
    record = build_record(call, call.service.index)
    outcome = engine.evaluate(call.service.rules, record, now, call.context, call.service.hook)
    windows = {m.rule.id: m.rule.suppress for m in outcome.matches if m.rule.suppress}
    suppressed = recently_shown(windows) if (windows and recently_shown) else set()
    coverages = list(flatten(call.prefetch.get("coverage")))
    who: Bucket = bucket(record.patient, coverages)
    cards: list[tuple[tuple[int, str], dict[str, Any], str, str]] = []
    for match in outcome.matches:
        if match.rule.id in suppressed:
            continue
        card = build_card(match, catalog.ruleset, call.context, record.patient, now)
        cards.append((order_key(match.rule.id, card), card, match.rule.id, match.rule.version))
    cards.sort(key=lambda item: item[0])
    records = [CardRecord(uuid=card["uuid"], service_id=call.service.id, rule_id=rule_id,
                          rule_version=version, hook=call.service.hook,
                          hook_instance=call.request.hookInstance, patient_hash=patient_hash, bucket=who,
                          indicator=card["indicator"], issued_at=now, tenant=tenant)
               for _, card, rule_id, version in cards]
    return Result([c for _, c, _, _ in cards], records, outcome.failed,
                  [m.rule.id for m in outcome.matches])
