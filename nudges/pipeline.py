"""One hook call from request body to cards: the pipeline shared by the HTTP API, rule cases, replay and
population screening, so every path evaluates exactly the same way.

parse (validate the body against the hook) → complete (fetch what prefetch lacks) → evaluate (index,
rules, cards, each card's focus: what suppression is keyed by). Whether a card may be shown (suppression),
storage and waiting follow-up cards are the runtime's business, not this module's: the pipeline is pure
but for the FHIR fetch.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from . import engine
from .api.models import CdsServiceRequest
from .cards import IssuedCard, build_card, card_head, ordered
from .demographics import bucket
from .errors import BadRequest, MissingField, NotFound
from .fhir import FHIR_ID, RELATIVE_REFERENCE, flatten
from .fhirserver.client import FhirClient, Found
from .fhirserver.guard import check_server
from .hooks import HOOKS
from .prefetch import missing_keys, paged_keys, render, unobtainable
from .record import IndexPlan, PatientRecord
from .services import Service, Services
from .settings import Settings
from .store import Bucket, CardRecord
from .suppression import focus_of

log = logging.getLogger("nudges.pipeline")

# The keyed hash a card's focus is stored as (Store.keyed); without one (offline runs) no focus is kept.
Keyed = Callable[[str], str]


@dataclass
class Call:
    """A validated request: what the engine needs, nothing it does not."""

    service: Service
    request: CdsServiceRequest
    context: dict[str, Any]
    prefetch: dict[str, Any]


def validation_error(exc: ValidationError) -> BadRequest:
    """A pydantic error as the 400 a client can act on: the first problem, naming its field."""
    error = exc.errors()[0]
    field_name = ".".join(str(p) for p in error["loc"])
    if error["type"] == "missing":
        return MissingField(field_name)
    if error["type"] == "extra_forbidden":
        return BadRequest(f"unknown field '{field_name}'", expression=field_name)
    return BadRequest(f"{field_name}: {error['msg']}" if field_name else error["msg"], expression=field_name or None)


def parse_call(services: Services, service_id: str, body: dict[str, Any]) -> Call:
    service = services.by_id.get(service_id)
    if service is None:
        raise NotFound(f"no CDS service '{service_id}'")
    try:
        request = CdsServiceRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    hook = service.hook
    if request.hook != hook.name:
        raise BadRequest(f"hook '{request.hook}' does not match service '{service_id}' ({hook.name})",
                         expression="hook")
    context = request.context
    for name in hook.required:
        if context.get(name) in (None, "", [], {}):
            raise MissingField(f"context.{name}")
    if not isinstance(context["patientId"], str) or not FHIR_ID.match(context["patientId"]):
        raise BadRequest("context.patientId must be a FHIR id", expression="context.patientId")
    if not isinstance(context["userId"], str) or not RELATIVE_REFERENCE.match(context["userId"]):
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
    return Call(service, request, context, request.prefetch or {})


def drafts(call: Call) -> list[dict[str, Any]]:
    """The draft resources of the call's hook (draft orders, appointments being booked)."""
    name = call.service.hook.drafts
    return list(flatten(call.context.get(name))) if name else []


def selected(call: Call, draft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """order-select: the drafts the clinician selected; every other hook: all of them."""
    if call.service.hook.name != "order-select":
        return draft
    chosen = set(call.context.get("selections") or ())
    return [r for r in draft if f"{r.get('resourceType')}/{r.get('id')}" in chosen]


def build_record(call: Call, index: IndexPlan | None = None) -> PatientRecord:
    """The call's record; with the service's index plan on the hot path, a full index without one."""
    record = PatientRecord.from_prefetch(call.prefetch, index, call.context.get("patientId"))
    draft = drafts(call)
    if draft:
        record.add_all(draft, "draft")
        record.add_all(selected(call, draft), "selected")
    return record


def still_missing(call: Call) -> list[str]:
    return missing_keys(call.service.plan, call.prefetch)


def require(call: Call, keys: list[str], why: str) -> None:
    """412 when any of these keys, which could not be had, is one the rules cannot do without."""
    failure = unobtainable(keys, call.service.plan, why)
    if failure is not None:
        raise failure


async def complete(call: Call, fhir: FhirClient | None, settings: Settings, allowed: list[str] | None = None) -> None:
    """Fetch what prefetch lacks from the call's fhirServer (SSRF-checked); 412 when required data
    cannot be had from either source."""
    missing = still_missing(call)
    partial = paged_keys(call.service.plan, call.prefetch)  # one page of several: searched again, whole
    server = call.request.fhirServer
    if partial and (not server or fhir is None):
        log.warning("prefetch holds only the first page of a search and no fhirServer was given to read the "
                    "rest: rules see that page alone", extra={"keys": partial})
    if not missing and not (partial and server and fhir is not None):
        return
    if not server or fhir is None:
        require(call, missing, "not in prefetch and no fhirServer given")
        return
    base = check_server(server, settings, allowed)
    auth = call.request.fhirAuthorization
    templates = call.service.plan.templates
    queries = {key: render(templates[key], call.context) for key in missing + partial}
    fetched = await fhir.fetch_all(base, auth.access_token if auth else None, queries)
    failed, reasons = [], set()
    for key, outcome in fetched.items():
        if isinstance(outcome, Found):
            call.prefetch[key] = outcome.value
        elif key in missing:  # a page that could not be completed is still what the client sent
            failed.append(key)
            reasons.add(outcome.error.diagnostics)
        else:
            log.warning("the rest of a paged prefetch search could not be read: rules see its first page",
                        extra={"keys": [key]})
    if failed:
        require(call, failed, "; ".join(sorted(reasons)))


@dataclass
class Result:
    """What a call produced: every card it issues, each with its record, in one list; rules that raised."""

    issued: list[IssuedCard] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bucket: Bucket = field(default_factory=Bucket)  # the patient's demographic bucket (the audit's groups)

    @property
    def cards(self) -> list[dict[str, Any]]:
        return [i.card for i in ordered(self.issued)]

    @property
    def records(self) -> list[CardRecord]:
        """Cards this call issued for the first time (waiting follow-up cards were recorded when they fired)."""
        return [i.record for i in ordered(self.issued) if i.record is not None]


def evaluate(call: Call, services: Services, now: datetime, *, patient_hash: str, keyed: Keyed | None = None,
             tenant: str | None = None, why_base: str | None = None, trace: engine.Tracer | None = None,
             heads_only: bool = False) -> Result:
    """Evaluate, build the cards and their records, each with the keyed hash of its focus (and with a "Why
    this nudge" link to the console when `why_base`, the service's public URL, is known; a tracer, for
    `nudges explain`, hears every step of the evaluation). `heads_only`: each card only its summary and
    indicator (cards.card_head) and no record, for population screening's worklists."""
    record = build_record(call, call.service.index)
    record.date_current_encounters(call.context.get("encounterId"), now)
    hook = call.service.hook
    outcome = engine.evaluate(call.service.rules, record, now, call.context, hook.name, trace)
    who: Bucket = bucket(record.patient, record.of_type("record", "Coverage"))  # the patient's own (elsewhere)
    result = Result(failed=outcome.failed, bucket=who)
    draft = selected(call, drafts(call)) if hook.drafts else []
    medications = record.medications() if hook.focus == "order" else None  # an order's identity may be its Medication
    for match in outcome.matches:
        if heads_only:
            head = card_head(match, call.context, record.patient, now, record.medications())
            result.issued.append(IssuedCard(match.rule.id, head, match=match))
            continue
        focus = keyed(focus_of(hook, call.context, match.drafts, draft, medications)) if keyed else None
        card = build_card(match, services.ruleset, call.context, record.patient, now, record.medications(),
                          why_base=why_base, card_id=card_uuid(keyed, call, patient_hash, match.rule.id, focus)
                          if keyed and focus else None)
        result.issued.append(IssuedCard(match.rule.id, card, match=match, record=CardRecord(
            uuid=card["uuid"], service_id=call.service.id, rule_id=match.rule.id, rule_version=match.rule.version,
            hook=hook.name, hook_instance=call.request.hookInstance, patient_hash=patient_hash,
            bucket=who, indicator=card["indicator"], issued_at=now, tenant=tenant, focus=focus)))
    return result


def card_uuid(keyed: Keyed, call: Call, patient_hash: str, rule_id: str, focus: str) -> str:
    """A card's uuid, the same each time one call (service, hookInstance) raises it for this patient and
    focus: a call sent again, as an EHR that timed out retries, then claims its own card again and stores
    it once (store.claim_statement, store.insert_cards) instead of finding it shown and answering nothing.
    Keyed under the service's secret, so no one can derive another call's card uuid and send feedback on it."""
    digest = keyed("\x1f".join(("card", call.service.id, call.request.hookInstance, patient_hash, rule_id, focus)))
    return str(uuid.UUID(hex=digest[:32], version=4))


def run_body(services: Services, settings: Settings, body: dict[str, Any], now: datetime,
             trace: engine.Tracer | None = None) -> Result:
    """A whole call outside the service (rule cases, replay, screening, explain): parse, complete,
    evaluate, with nothing suppressed and nothing stored. Fetches on an event loop of its own: call it
    from a thread."""
    hook = HOOKS.get(str(body.get("hook")))
    call = parse_call(services, hook.service_id if hook else str(body.get("hook")), body)
    missing = still_missing(call)
    if (missing or paged_keys(call.service.plan, call.prefetch)) and call.request.fhirServer:
        asyncio.run(_complete_offline(call, settings, call.request.fhirServer))
    elif missing:
        require(call, missing, "not in prefetch and no fhirServer given")
    why = settings.public_base_url if settings is not None else None  # some callers run rules without settings
    return evaluate(call, services, now, patient_hash="offline", why_base=why, trace=trace)


async def _complete_offline(call: Call, settings: Settings, server: str) -> None:
    client = FhirClient(settings)
    try:
        await complete(call, client, settings, [server])
    finally:
        await client.close()
