"""FHIR R4 Subscriptions Backport IG notifications: what they say, and the follow-ups they schedule.

A notification is a `history` Bundle whose first entry is the SubscriptionStatus as a `Parameters`
resource (`subscription`, `type`, `notification-event` parts with `focus` references). Handshakes and
heartbeats schedule nothing. For an event notification each focus resource is taken from the Bundle
(full-resource payload) or read from the notifying server (id-only payload), and every served rule with a
`followup` whose `start` clause it matches gets a follow-up scheduled `after` from now, once per
(rule, patient, resource) however often the event is sent.

The notifying server is the one configured for the subscription (`subscription_servers`), else the base
of the absolute focus reference, of the entry's fullUrl or of the subscription reference; it passes the
same SSRF guard as a hook call's fhirServer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..clock import Clock
from ..errors import BadRequest, MissingField
from ..fhir import Reference, parse_reference, patient_of
from ..fhirserver.client import FhirClient, Found
from ..fhirserver.guard import check_server
from ..rules.compiled import CompiledRule
from ..services import Services
from ..settings import Settings
from ..store import Store
from . import followups
from .subscriptions import Heard

QUIET_TYPES = ("handshake", "heartbeat")
EVENT_TYPE = "event-notification"
QUERY_TYPE = "query-event"  # the Bundle a server's `$events` answers with (Backport IG), never pushed to us


@dataclass
class Notification:
    subscription: str
    type: str
    focus: list[str]
    entries: list[dict[str, Any]]  # the entries after the SubscriptionStatus
    heard: Heard  # event numbers and counts, for missed-event detection


MAX_EVENT_NUMBER = 2**31 - 1  # the subscriptions table's INTEGER columns; no real subscription counts more


def _number(value: Any, expression: str) -> int | None:
    """The IG's counts are strings in R4 (`valueString`); integer forms are read too. A number past any
    real server's count is refused, not stored (it would stand as the count the subscription must reach)."""
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit() or len(text) > 10 or int(text) > MAX_EVENT_NUMBER:
        raise BadRequest(f"'{text[:20]}' is not an event number", expression=expression)
    return int(text)


def _reference(parameter: dict[str, Any]) -> Any:
    """A parameter's `valueReference.reference`, or None when it has none or is not shaped as a Reference."""
    value = parameter.get("valueReference")
    return value.get("reference") if isinstance(value, dict) else None


def _value(parameter: dict[str, Any]) -> Any:
    return next((v for k, v in parameter.items() if k.startswith("value")), None)


def parse_notification(body: dict[str, Any], kinds: tuple[str, ...] = (*QUIET_TYPES, EVENT_TYPE)) -> Notification:
    """A subscription-notification Bundle, of one of `kinds` (what a server pushes, by default)."""
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
    subscription = kind = status_code = None
    events_since: int | None = None
    focus: list[str] = []
    events: list[tuple[int, str | None]] = []
    for parameter in parameters:
        name = parameter.get("name")
        if name == "subscription":
            subscription = _reference(parameter)
        elif name == "type":
            kind = parameter.get("valueCode")
        elif name == "status":
            status_code = parameter.get("valueCode")
        elif name == "events-since-subscription-start":
            events_since = _number(_value(parameter), "Parameters.parameter:events-since-subscription-start")
        elif name == "notification-event":
            parts = parameter.get("part") or []
            if not isinstance(parts, list):
                raise BadRequest("notification-event parts must be a list", expression="Parameters.parameter.part")
            number = stamp = None
            for part in parts:
                if not isinstance(part, dict):
                    continue
                if part.get("name") == "focus":
                    reference = _reference(part)
                    if not isinstance(reference, str) or not reference:
                        raise BadRequest("a notification-event focus needs a reference",
                                         expression="Parameters.parameter.part.valueReference")
                    focus.append(reference)
                elif part.get("name") == "event-number":
                    number = _number(_value(part), "Parameters.parameter:notification-event.event-number")
                elif part.get("name") == "timestamp" and isinstance(part.get("valueInstant"), str):
                    stamp = part["valueInstant"]
            if number is not None:
                events.append((number, stamp))
    if not isinstance(subscription, str) or not subscription:
        raise MissingField("Parameters.parameter:subscription")
    if not isinstance(kind, str) or not kind:
        raise MissingField("Parameters.parameter:type")
    if kind not in kinds:
        raise BadRequest(f"unsupported notification type '{kind}'", expression="Parameters.parameter:type")
    timestamp = body.get("timestamp") if isinstance(body.get("timestamp"), str) else None
    heard = Heard(kind, status_code if isinstance(status_code, str) else None, events_since, events, timestamp)
    return Notification(subscription, kind, focus, entries[1:], heard)


def absolute_base(reference: Reference | None) -> str | None:
    base = reference.base if reference else None
    return base if base and base.startswith(("http://", "https://")) else None


class Intake:
    """Turns event notifications into scheduled follow-ups."""

    def __init__(self, settings: Settings, clock: Clock, store: Store, fhir: FhirClient) -> None:
        self.settings, self.clock, self.store, self.fhir = settings, clock, store, fhir

    def server_for(self, note: Notification, ref: Reference | None, full_url: Any,
                   allowed: list[str], server: str | None = None) -> str | None:
        settings = self.settings
        if server is not None:  # a managed subscription: its server holds everything it notifies about
            named = absolute_base(ref) or absolute_base(parse_reference(full_url))
            if named is not None and named.rstrip("/") != server.rstrip("/"):
                raise BadRequest(f"the notification names a resource on another server than its subscription's "
                                 f"({named[:100]})", expression="notification-event.focus")
            return check_server(server, settings, [server])
        candidate = settings.subscription_servers.get(note.subscription) or absolute_base(ref) \
            or absolute_base(parse_reference(full_url)) or absolute_base(parse_reference(note.subscription))
        if candidate is None:
            return None
        return check_server(candidate, settings, [*allowed, *settings.subscription_servers.values()])

    async def resolve(self, note: Notification, allowed: list[str], types: set[str],
                      server: str | None = None) -> list[tuple[dict[str, Any], str | None]]:
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
            base = self.server_for(note, ref, entry.get("fullUrl"), allowed, server)
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
            results = await self.fhir.fetch_as_service(base, queries)
            for outcome in results.values():
                if not isinstance(outcome, Found):
                    raise outcome.error  # 412, so the server delivers the notification again
                value = outcome.value
                if isinstance(value, dict) and value.get("resourceType") not in (None, "OperationOutcome"):
                    found.append((value, base))
        return found

    def schedule(self, rules: list[CompiledRule], resources: list[tuple[dict[str, Any], str | None]]) -> int:
        now = self.clock.now()
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
        return sum(followups.schedule(self.store, rule_id=rule_id, patient_id=patient_id, start_ref=start_ref,
                                      fhir_server=base, due_at=due)
                   for (rule_id, patient_id, start_ref), (base, due) in wanted.items())

    async def accept(self, note: Notification, services: Services, allowed: list[str],
                     server: str | None = None) -> int:
        """Schedule what an event notification starts; how many follow-ups were new. `server`: the managed
        subscription's server, which every focus must be on."""
        rules = followups.followup_rules(services.rules())
        types = {c.resource for c in map(followups.start_clause, rules) if c is not None}
        resources = await self.resolve(note, allowed, types, server)
        return await asyncio.to_thread(self.schedule, rules, resources)
