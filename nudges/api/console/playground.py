"""GET|POST /console/try: one hook call through the real pipeline (pipeline.run_body: parse, complete,
evaluate; nothing suppressed, nothing stored; traced by tools/explain), the cards as the HL7 CDS Hooks
sandbox draws them, the raw
JSON, and the explain trace. POST /console/try/feedback shows the feedback a Dismiss or a suggestion would
send, checked against the same model as POST /cds-services/{id}/feedback, and stores nothing either.

Nothing from the form is logged: the body holds patient data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Form, Request, Response
from pydantic import ValidationError

from ... import pipeline
from ...clock import parse_instant
from ...errors import BadRequest, NudgesError
from ...fhir import bundle, flatten, instant
from ...hooks import HOOK_NAMES, HOOKS
from ...prefetch import fill
from ...rules.compiled import RuleSet
from ...services import Services
from ...tools import explain
from ..deps import RuntimeDep
from ..models import FeedbackRequest
from .render import page
from .security import ViewerDep, check_form

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)
CONTEXT_KEYS = ("encounterId", "draftOrders", "appointments", "selections")


@dataclass(frozen=True)
class Fixture:
    name: str
    kind: str  # call | patient
    path: Path
    hook: str | None  # a call's own hook


def fixtures(ruleset: RuleSet) -> dict[str, Fixture]:
    """Bundled fixtures by name: hook calls (`calls/*.json`) first, then patient Bundles (`patients/*.json`)."""
    found: dict[str, Fixture] = {}
    for folder in ruleset.fixture_dirs:
        for kind, sub in (("call", "calls"), ("patient", "patients")):
            for path in sorted((folder / sub).glob("*.json")) if (folder / sub).is_dir() else ():
                if path.name.endswith((".golden.json", ".server.json")) or path.stem in found:
                    continue
                hook = None
                if kind == "call":
                    try:
                        hook = str(orjson.loads(path.read_bytes()).get("hook"))
                    except (OSError, orjson.JSONDecodeError, AttributeError):
                        continue
                found[path.stem] = Fixture(path.stem, kind, path, hook)
    return found


def _json(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not JSON: {exc}") from None


def request_body(services: Services, hook: str, fixture: Fixture | None, bundle_text: str,
                 context_text: str) -> dict[str, Any]:
    """The CDS Hooks request the playground sends: a bundled call as recorded, or a Bundle's resources as
    an EHR would prefetch them for the hook's service (prefetch.fill), with the context given."""
    extra = _json(context_text, "context") if context_text.strip() else {}
    if not isinstance(extra, dict):
        raise BadRequest("context must be a JSON object (encounterId, draftOrders, appointments, selections)")
    if fixture is not None and fixture.kind == "call":
        body = orjson.loads(fixture.path.read_bytes())
        if hook and body.get("hook") != hook:
            raise BadRequest(f"fixture {fixture.name} is a {body.get('hook')} call, not {hook}: choose its hook "
                             "or leave the hook to the fixture")
        body = {k: v for k, v in body.items() if k not in ("fhirServer", "fhirAuthorization")}  # never leaves here
        body["context"] = {**body.get("context", {}), **extra}
        return body
    if hook not in HOOKS:
        raise BadRequest(f"choose a hook ({', '.join(HOOK_NAMES)})")
    if fixture is not None:
        data = orjson.loads(fixture.path.read_bytes())
    elif bundle_text.strip():
        data = _json(bundle_text, "the bundle")
    else:
        raise BadRequest("paste a FHIR Bundle or choose a fixture")
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise BadRequest("the bundle must be a FHIR Bundle (resourceType Bundle)")
    resources = list(flatten(data))
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    if patient is None or not isinstance(patient.get("id"), str):
        raise BadRequest("the bundle needs a Patient with an id")
    context: dict[str, Any] = {"userId": "Practitioner/console-playground", "patientId": patient["id"]}
    encounters = sorted((r for r in resources if r.get("resourceType") == "Encounter" and r.get("id")),
                        key=lambda r: str((r.get("period") or {}).get("start", "")))
    if HOOKS[hook].has_encounter and encounters:
        context["encounterId"] = encounters[-1]["id"]
    context.update({k: v for k, v in extra.items()})
    drafts = HOOKS[hook].drafts
    if drafts is not None:
        if isinstance(context.get(drafts), list):  # resources as rule cases list them: the Bundle CDS Hooks sends
            context[drafts] = bundle([r for r in context[drafts] if isinstance(r, dict)])
        context.setdefault(drafts, bundle([]))
        if hook == "order-select" and "selections" not in context:
            chosen = [f"{r.get('resourceType')}/{r.get('id')}" for r in flatten(context[drafts])]
            if not chosen:
                raise BadRequest("order-select is about the orders being selected: give them in the context as "
                                 'draftOrders, a Bundle or a list of resources ({"draftOrders": [{"resourceType": '
                                 '"ServiceRequest", ...}]}); selections default to all of them')
            context["selections"] = chosen
    instance = hashlib.sha256(orjson.dumps([hook, context.get("patientId")])).hexdigest()[:32]
    service = services.for_hook(hook)
    return {"hook": hook, "hookInstance": instance, "context": context, "prefetch": fill(service.plan, resources)}


@dataclass
class Outcome:
    body: dict[str, Any] | None = None
    cards: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (rule id, card)
    trace: dict[str, Any] | None = None
    now: datetime | None = None
    error: str | None = None

    @property
    def raw(self) -> dict[str, Any]:
        """The response body exactly as the service answers the hook call."""
        return {"cards": [card for _, card in self.cards]}


def run(services: Services, runtime: Any, body: dict[str, Any], now: datetime) -> Outcome:
    """In a worker thread: the pipeline with the engine's tracer (tools/explain: the same run_body, so the
    cards are the call's own), nothing stored, nothing suppressed."""
    explanation = explain.explain(services, body, now, runtime.settings)
    rule_of = {t.card["uuid"]: t.rule for t in explanation.rules if t.card is not None}
    cards = [(rule_of.get(card["uuid"], ""), card) for card in explanation.cards]
    return Outcome(body, cards, explanation.to_dict(), now)


def _form(request: Request, runtime: RuntimeDep, viewer: ViewerDep, outcome: Outcome | None, values: dict[str, str],
          status: int = 200) -> Response:
    services = runtime.services()
    return page(request, runtime, viewer, "try.html", status=status, hooks=HOOK_NAMES,
                fixtures=sorted(fixtures(services.ruleset).values(), key=lambda f: (f.kind, f.hook or "", f.name)),
                values=values, outcome=outcome, clock_now=instant(runtime.clock.now()))


@router.get("/try")
async def try_form(request: Request, runtime: RuntimeDep, viewer: ViewerDep, fixture: str = "",
                   hook: str = "") -> Response:
    return _form(request, runtime, viewer, None, {"fixture": fixture, "hook": hook, "bundle": "", "context": "",
                                                  "now": ""})


@router.post("/try")
async def try_call(request: Request, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    """Read as a form here, not by FastAPI's Form parameters: Starlette holds each field to 1 MB by
    default, and a pasted record is one field; the service's own `max_body_bytes` is the limit (BodyLimit
    holds the whole body to it as it arrives)."""
    form = await request.form(max_part_size=runtime.settings.max_body_bytes)
    csrf = form.get("csrf", "")
    check_form(request, runtime, csrf if isinstance(csrf, str) else "")
    values = {name: value if isinstance(value := form.get(name, ""), str) else ""
              for name in ("hook", "fixture", "bundle", "context", "now")}
    hook, fixture, bundle, context, now = values.values()
    services = runtime.services()
    try:
        known = fixtures(services.ruleset)
        if fixture and fixture not in known:
            raise BadRequest(f"no fixture '{fixture}'")
        instant_now = parse_instant(now) if now.strip() else runtime.clock.now()
        body = request_body(services, hook, known.get(fixture) if fixture else None, bundle, context)
        outcome = await anyio.to_thread.run_sync(run, services, runtime, body, instant_now)
    except NudgesError as exc:
        return _form(request, runtime, viewer, Outcome(error=f"{exc.status}: {exc.diagnostics}"), values, 400)
    except ValueError as exc:
        return _form(request, runtime, viewer, Outcome(error=f"400: {exc}"), values, 400)
    return _form(request, runtime, viewer, outcome, values)


@router.post("/try/feedback")
async def try_feedback(request: Request, runtime: RuntimeDep, viewer: ViewerDep, csrf: str = Form(""),
                       service: str = Form(""), card: str = Form(""), outcome: str = Form(""),
                       suggestion: str = Form(""), system: str = Form(""), code: str = Form(""),
                       display: str = Form("")) -> Response:
    """The feedback the EHR would send for this card (CDS Hooks feedback, validated); not stored."""
    check_form(request, runtime, csrf)
    entry: dict[str, Any] = {"card": card, "outcome": outcome, "outcomeTimestamp": instant(runtime.clock.now())}
    if outcome == "accepted":
        entry["acceptedSuggestions"] = [{"id": suggestion}]
    elif code:
        entry["overrideReason"] = {"reason": {k: v for k, v in (("system", system), ("code", code),
                                                                  ("display", display)) if v}}
    document = {"feedback": [entry]}
    try:
        FeedbackRequest.model_validate(document)
        error = None
    except ValidationError as exc:
        error = pipeline.validation_error(exc).diagnostics
    return page(request, runtime, viewer, "feedback.html", status=400 if error else 200, document=document,
                error=error, service=service, endpoint=f"/cds-services/{service}/feedback")
