"""What a pushed card looks like on each channel: a FHIR R4 Communication, a FHIR R4 Task, or the data
of a CloudEvent, built from the outbox row's payload (the card as it fired, the patient, the encounter
and the resource that started the follow-up) and the recipients found for it.

The card uuid is the resource's identifier (`urn:ietf:rfc:3986` / `urn:uuid:...`, the FHIR way to carry
a UUID) and the conditional create's criteria, so the same card written twice is one resource.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ..clock import parse_instant
from ..fhir import instant
from ..settings import DeliverySettings

IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/communication-category"
PRIORITY = {"critical": "stat", "warning": "urgent", "info": "routine"}  # FHIR request-priority
CATEGORY = {"critical": "alert", "warning": "alert", "info": "notification"}
SENDER = {"display": "nudges"}


def identifier(card_uuid: str) -> dict[str, str]:
    return {"system": IDENTIFIER_SYSTEM, "value": f"urn:uuid:{card_uuid}"}


def if_none_exist(card_uuid: str) -> str:
    return f"identifier={IDENTIFIER_SYSTEM}|urn:uuid:{card_uuid}"


def link(payload: dict[str, Any], settings: DeliverySettings, console: str | None = None) -> dict[str, str] | None:
    """The rule's page: `delivery.rule_page_url`, else the console's (`console`, a base URL), else the card's
    source (the evidence behind it)."""
    rule = payload["rule"]
    if settings.rule_page_url:
        return {"url": settings.rule_page_url.replace("{rule}", rule["id"]), "title": rule["title"]}
    if console:
        return {"url": f"{console.rstrip('/')}/console/rules/{rule['id']}", "title": rule["title"]}
    source = payload["card"].get("source") or {}
    return {"url": source["url"], "title": source.get("label") or rule["title"]} if source.get("url") else None


def _common(payload: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if payload.get("encounter"):
        found["encounter"] = {"reference": payload["encounter"]}
    return found


def communication(uuid: str, payload: dict[str, Any], recipients: list[dict[str, str]],
                  settings: DeliverySettings, now: datetime, console: str | None = None) -> dict[str, Any]:
    card = payload["card"]
    indicator = card.get("indicator", "info")
    content: list[dict[str, Any]] = [{"contentString": card["summary"]}]
    if card.get("detail"):
        content.append({"contentString": card["detail"]})
    page = link(payload, settings, console)
    if page:
        content.append({"contentAttachment": {"contentType": "text/html", "url": page["url"], "title": page["title"]}})
    resource: dict[str, Any] = {
        "resourceType": "Communication", "identifier": [identifier(uuid)], "status": "completed",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": CATEGORY.get(indicator, "notification")}]}],
        "priority": PRIORITY.get(indicator, "routine"), "subject": {"reference": f"Patient/{payload['patient']}"},
        **_common(payload), "about": [{"reference": payload["about"]}], "sent": instant(now),
        "recipient": recipients, "sender": {"reference": settings.sender} if settings.sender else SENDER,
        "topic": {"text": payload["rule"]["title"]}, "payload": content}
    return resource


def task(uuid: str, payload: dict[str, Any], owner: dict[str, str], settings: DeliverySettings,
         now: datetime) -> dict[str, Any]:
    card, spec = payload["card"], payload["spec"]
    resource: dict[str, Any] = {
        "resourceType": "Task", "identifier": [identifier(uuid)], "status": "requested", "intent": "order",
        "priority": PRIORITY.get(card.get("indicator", "info"), "routine"), "description": card["summary"],
        "focus": {"reference": payload["about"]}, "for": {"reference": f"Patient/{payload['patient']}"},
        **_common(payload), "authoredOn": instant(now), "owner": owner}
    if spec.get("code"):
        resource["code"] = {"coding": [spec["code"]], "text": spec["code"]["display"]}
    if settings.sender:
        resource["requester"] = {"reference": settings.sender}
    if spec.get("due_seconds"):
        fired = parse_instant(payload["fired_at"])
        resource["restriction"] = {"period": {"end": instant(fired + timedelta(seconds=spec["due_seconds"]))}}
    if card.get("detail"):
        resource["note"] = [{"text": card["detail"]}]
    return resource


def event_data(payload: dict[str, Any], fhir_server: str | None, settings: DeliverySettings,
               console: str | None = None) -> dict[str, Any]:
    """The CloudEvent's `data`: what a paging or secure-chat integration needs to reach the right person
    about the right patient (the EHR's own references; no demographics)."""
    data: dict[str, Any] = {"rule": payload["rule"], "card": payload["card"],
                            "patient": {"reference": f"Patient/{payload['patient']}"},
                            "about": {"reference": payload["about"]},
                            "priority": PRIORITY.get(payload["card"].get("indicator", "info"), "routine"),
                            "firedAt": payload["fired_at"]}
    if payload.get("encounter"):
        data["encounter"] = {"reference": payload["encounter"]}
    if fhir_server:
        data["fhirServer"] = fhir_server
    page = link(payload, settings, console)
    if page:
        data["link"] = page
    return data
