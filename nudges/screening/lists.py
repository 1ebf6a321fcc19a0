"""Worklists as FHIR R4 `List` resources on the FHIR server, for navigators who work from the EHR.

One List per rule and run, identified by the rule, the hook and the pinned instant, and written by an
update at an id derived from that identifier (`PUT List/nudges-<hash>`, update as create): running the
same screen again replaces that List instead of adding a second one, on any server that lets a client
choose ids (CapabilityStatement `updateCreate`), whether or not it can search List by identifier.
Written with the service's own token (`fhir_backend_clients`; the registered scope must allow writing
List, e.g. `system/List.cu`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from typing import Any

import httpx
import orjson

from ..errors import FhirServerError
from ..fhir import instant
from ..fhirserver.tokens import BackendTokens
from ..rules.compiled import CompiledRule
from ..settings import Settings
from .source import diagnostics

IDENTIFIER_SYSTEM = "urn:nudges:worklist"
RULE_SYSTEM = "urn:nudges:rule"
EMPTY_REASON = "http://terminology.hl7.org/CodeSystem/list-empty-reason"


class ListWriteError(Exception):
    pass


def worklist(rule: CompiledRule, hook: str, now: Any, ruleset_version: str, patients: list[str],
             scope: str) -> dict[str, Any]:
    """The List for one rule: its patients in id order, or empty with the reason `nilknown` (none found).
    `scope` (export_scope) is part of its identity: a Group's screen replaces that Group's List, never the
    whole population's."""
    when = instant(now)
    resource: dict[str, Any] = {
        "resourceType": "List", "status": "current", "mode": "working",
        "id": list_id(identifier(rule.id, hook, when, scope)),
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": identifier(rule.id, hook, when, scope)}],
        "title": f"nudges worklist: {rule.title}",
        "code": {"coding": [{"system": RULE_SYSTEM, "code": rule.id, "display": rule.title}], "text": rule.title},
        "date": when,
        "note": [{"text": f"Patients for whom the rule {rule.id} (version {rule.version}) would raise a card on "
                          f"{hook} at {when}, from a population screen ({scope}) with rule set "
                          f"{ruleset_version}."}]}
    if patients:
        resource["entry"] = [{"item": {"reference": f"Patient/{pid}"}} for pid in patients]
    else:
        resource["emptyReason"] = {"coding": [{"system": EMPTY_REASON, "code": "nilknown"}]}
    return resource


def identifier(rule: str, hook: str, when: str, scope: str) -> str:
    return f"{rule}/{hook}/{when}/{scope}"


def export_scope(level: str, group: str | None, since: str | None, types: tuple[str, ...]) -> str:
    """Which population a screen covered: the export's level (and Group), `_since` and `_type`."""
    parts = [f"group={group}" if level == "group" and group else level]
    if since:
        parts.append(f"since={since}")
    if types:
        parts.append("types=" + ",".join(sorted(types)))
    return ";".join(parts)


def list_id(value: str) -> str:
    """A FHIR id (at most 64 characters) that is the same for the same identifier on every run."""
    return "nudges-" + hashlib.sha256(value.encode()).hexdigest()[:40]


async def _write(settings: Settings, base: str, lists: Iterable[dict[str, Any]]) -> list[str]:
    tokens = BackendTokens(settings.fhir_backend_clients) if settings.fhir_backend_clients else None
    written = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0)) as http:
        for resource in lists:
            headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
            try:
                token = await tokens.token(base, http) if tokens else None
            except FhirServerError as exc:
                raise ListWriteError(f"no access token for {base}: {exc.diagnostics}") from None
            if token:
                headers["Authorization"] = f"Bearer {token}"
            value = resource["identifier"][0]["value"]
            try:
                response = await http.put(f"{base.rstrip('/')}/List/{resource['id']}", headers=headers,
                                          content=orjson.dumps(resource))
            except httpx.HTTPError as exc:
                raise ListWriteError(f"could not write the List {value} to {base} ({type(exc).__name__})") from None
            if response.status_code not in (200, 201):
                raise ListWriteError(f"the server refused the List {value}: {diagnostics(response)}")
            written.append(f"List/{resource['id']}")
    return written


def write_lists(settings: Settings, base: str, lists: Iterable[dict[str, Any]]) -> list[str]:
    """PUT each List at its id (create or replace); the references written."""
    return asyncio.run(_write(settings, base, lists))
