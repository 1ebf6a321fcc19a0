"""POST /fhir/notifications: FHIR R4 Subscriptions Backport IG notifications (events between visits).

A notification is a `history` Bundle whose first entry is the SubscriptionStatus as a `Parameters`
resource (`subscription`, `type`, `notification-event` parts with `focus` references). Handshakes
and heartbeats are acknowledged and nothing else happens. For an event notification each focus
resource is taken from the Bundle (full-resource payload) or read from the notifying server (id-only
payload), and every served rule with a `followup` whose `start` clause it matches gets a follow-up
scheduled `after` from now, once per (rule, patient, resource) however often the event is sent.

The notifying server is the one configured for the subscription (`subscription_servers`), else the
base of the absolute focus reference, of the entry's fullUrl or of the subscription reference; it
passes the same SSRF guard as a hook call's fhirServer.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response

from .. import followups
from ..auth import Caller
from ..errors import BadRequest, MissingField
from ..fhirclient import check_server
from ..hooks import FHIR_ID
from ..ruleset import CompiledRule
from ..runtime import Runtime

REFERENCE = re.compile(r"^(?:(?P<base>https?://[^\s?#]+?)/)?(?P<type>[A-Z][A-Za-z]{1,63})/"
                       r"(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
QUIET_TYPES = ("handshake", "heartbeat")
EVENT_TYPE = "event-notification"


@dataclass(frozen=True)
class Reference:
    base: str | None
    type: str
    id: str

    @property
    def relative(self) -> str:
        return f"{self.type}/{self.id}"


def parse_reference(text: Any) -> Reference | None:
    match = REFERENCE.match(text) if isinstance(text, str) else None
    return Reference(match["base"], match["type"], match["id"]) if match else None


@dataclass
class Notification:
    subscription: str
    type: str
    focus: list[str]
    entries: list[dict[str, Any]]  # the entries after the SubscriptionStatus


def parse_notification(body: dict[str, Any]) -> Notification:
    if body.get("resourceType") != "Bundle":
        raise BadRequest("a notification must be a FHIR Bundle", expression="Bundle")
    if body.get("type") != "history":
        raise BadRequest("a notification Bundle must have type 'history'", expression="Bundle.type")
    entries = body.get("entry")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise MissingField("Bundle.entry", "the first entry must be the SubscriptionStatus")
    status = entries[0].get("resource")
    if not isinstance(status, dict) or status.get("resourceType") != "Parameters":
        raise BadRequest("the first entry must be the SubscriptionStatus as a Parameters resource",
                         expression="Bundle.entry[0].resource")
    parameters = status.get("parameter")
    if not isinstance(parameters, list) or not all(isinstance(p, dict) for p in parameters):
        raise MissingField("Parameters.parameter")
    subscription = kind = None
    focus: list[str] = []
    for parameter in parameters:
        name = parameter.get("name")
        if name == "subscription":
            subscription = (parameter.get("valueReference") or {}).get("reference")
        elif name == "type":
            kind = parameter.get("valueCode")
        elif name == "notification-event":
            parts = parameter.get("part") or []
            if not isinstance(parts, list):
                raise BadRequest("notification-event parts must be a list", expression="Parameters.parameter.part")
            for part in parts:
                if isinstance(part, dict) and part.get("name") == "focus":
                    reference = (part.get("valueReference") or {}).get("reference")
                    if not isinstance(reference, str) or not reference:
                        raise BadRequest("a notification-event focus needs a reference",
                                         expression="Parameters.parameter.part.valueReference")
                    focus.append(reference)
    if not isinstance(subscription, str) or not subscription:
        raise MissingField("Parameters.parameter:subscription")
    if not isinstance(kind, str) or not kind:
        raise MissingField("Parameters.parameter:type")
    if kind not in (*QUIET_TYPES, EVENT_TYPE):
        raise BadRequest(f"unsupported notification type '{kind}'", expression="Parameters.parameter:type")
    return Notification(subscription, kind, focus, entries[1:])


def router(runtime: Runtime, authenticate: Callable[[Request], Awaitable[Caller]]) -> APIRouter:
    """The notifications route, authenticated by the app's own `authenticate`."""
    from .app import json_response, parse_object, read_body  # app.py includes this router

    settings = runtime.settings
    api = APIRouter()

    def server_for(note: Notification, ref: Reference | None, full_url: Any, caller: Caller) -> str | None:
        candidate = settings.subscription_servers.get(note.subscription) or (ref.base if ref else None) \
            or getattr(parse_reference(full_url), "base", None) \
            or getattr(parse_reference(note.subscription), "base", None)
        if candidate is None:
            return None
        allowed = [*(caller.client.fhir_servers if caller.client else ()), *settings.subscription_servers.values()]
        return check_server(candidate, settings, allowed)

    async def resolve(note: Notification, caller: Caller,
                      types: set[str]) -> list[tuple[dict[str, Any], str | None]]:
        """Each focus resource with the server it came from: from the Bundle, else read from the
        server when its type is one a follow-up can start from (`types`)."""
        by_url: dict[str, dict[str, Any]] = {}
        by_ref: dict[str, dict[str, Any]] = {}
        for entry in note.entries:
            resource = entry.get("resource")
            if isinstance(entry.get("fullUrl"), str):
                by_url[entry["fullUrl"]] = entry
            if isinstance(resource, dict) and isinstance(resource.get("id"), str):
                by_ref[f"{resource.get('resourceType')}/{resource['id']}"] = entry
        found: list[tuple[dict[str, Any], str | None]] = []
        reads: dict[str, dict[str, str]] = {}
        for i, text in enumerate(note.focus):
            ref = parse_reference(text)
            entry = by_url.get(text) or (by_ref.get(ref.relative) if ref else None) or {}
            resource = entry.get("resource")
            base = server_for(note, ref, entry.get("fullUrl"), caller)
            if isinstance(resource, dict):
                found.append((resource, base))
            elif ref is None:
                raise BadRequest(f"focus '{text[:100]}' is neither in the Bundle nor a resource reference",
                                 expression=f"notification-event[{i}].focus")
            elif base is None:
                raise BadRequest(f"cannot tell which FHIR server holds '{ref.relative}': send absolute "
                                 "references or configure subscription_servers",
                                 expression=f"notification-event[{i}].focus")
            elif ref.type in types:
                reads.setdefault(base, {})[text] = ref.relative
        for base, queries in reads.items():
            results = await runtime.fhir.fetch_as_service(base, queries)
            for value in results.values():
                if isinstance(value, Exception):
                    raise value  # FhirServerError: 412, so the server delivers the notification again
                if isinstance(value, dict) and value.get("resourceType") not in (None, "OperationOutcome"):
                    found.append((value, base))
        return found

    def schedule(rules: list[CompiledRule], resources: list[tuple[dict[str, Any], str | None]]) -> int:
        now = runtime.clock.now()
        wanted: dict[tuple[str, str, str], tuple[str | None, Any]] = {}
        for resource, base in resources:
            patient_id, rid = patient_of(resource), resource.get("id")
            if patient_id is None or not isinstance(rid, str):
                continue
            start_ref = f"{resource['resourceType']}/{rid}"
            for rule in rules:
                if rule.followup_after is not None and followups.starts(rule, resource, now):
                    if base is None:
                        raise BadRequest(f"cannot tell which FHIR server holds '{start_ref}' for the follow-up: "
                                         "send absolute fullUrls or configure subscription_servers")
                    wanted[(rule.id, patient_id, start_ref)] = (base, now + rule.followup_after)
        return sum(followups.schedule(runtime.store, rule_id=rule_id, patient_id=patient_id, start_ref=start_ref,
                                      fhir_server=base, due_at=due)
                   for (rule_id, patient_id, start_ref), (base, due) in wanted.items())

    @api.post("/fhir/notifications", summary="FHIR Subscriptions (R4 Backport IG) notifications")
    async def notifications(request: Request) -> Response:
        caller = await authenticate(request)
        note = parse_notification(parse_object(await read_body(request, settings.max_body_bytes)))
        if note.type != EVENT_TYPE:
            return json_response({"type": note.type, "events": 0, "scheduled": 0})
        rules = list({r.id: r for s in runtime.catalog().services.values()
                      for r in followups.followup_rules(s.rules)}.values())
        types = {c.resource for c in map(followups.start_clause, rules) if c is not None}
        resources = await resolve(note, caller, types)
        scheduled = await anyio.to_thread.run_sync(schedule, rules, resources)
        return json_response({"type": note.type, "events": len(note.focus), "scheduled": scheduled})

    return api


def patient_of(resource: dict[str, Any]) -> str | None:
    """The FHIR id of the patient a resource is about (the Patient itself, subject or patient)."""
    if resource.get("resourceType") == "Patient":
        pid = resource.get("id")
    else:
        pid = None
        for element in ("subject", "patient", "beneficiary"):
            value = resource.get(element)
            ref = parse_reference(value.get("reference")) if isinstance(value, dict) else None
            if ref is not None and ref.type == "Patient":
                pid = ref.id
                break
    return pid if isinstance(pid, str) and FHIR_ID.match(pid) else None
