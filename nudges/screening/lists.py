"""Worklists as FHIR R4 `List` resources on the FHIR server, for navigators who work from the EHR.

One List per rule and run, written with a conditional update keyed by an identifier made of the rule,
the hook and the pinned instant: running the same screen again replaces that List instead of adding a
second one. Written with the service's own token (`fhir_backend_clients`; the registered scope must allow
writing List, e.g. `system/List.cu`).
"""

from __future__ import annotations

import asyncio
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


def worklist(rule: CompiledRule, hook: str, now: Any, ruleset_version: str, patients: list[str]) -> dict[str, Any]:
    """The List for one rule: its patients in id order, or empty with the reason `nilknown` (none found)."""
    when = instant(now)
    resource: dict[str, Any] = {
        "resourceType": "List", "status": "current", "mode": "working",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": identifier(rule.id, hook, when)}],
        "title": f"nudges worklist: {rule.title}",
        "code": {"coding": [{"system": RULE_SYSTEM, "code": rule.id, "display": rule.title}], "text": rule.title},
        "date": when,
        "note": [{"text": f"Patients for whom the rule {rule.id} (version {rule.version}) would raise a card on "
                          f"{hook} at {when}, from a population screen with rule set {ruleset_version}."}]}
    if patients:
        resource["entry"] = [{"item": {"reference": f"Patient/{pid}"}} for pid in patients]
    else:
        resource["emptyReason"] = {"coding": [{"system": EMPTY_REASON, "code": "nilknown"}]}
    return resource


def identifier(rule: str, hook: str, when: str) -> str:
    return f"{rule}/{hook}/{when}"


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
                response = await http.put(f"{base.rstrip('/')}/List", headers=headers, content=orjson.dumps(resource),
                                          params={"identifier": f"{IDENTIFIER_SYSTEM}|{value}"})
            except httpx.HTTPError as exc:
                raise ListWriteError(f"could not write the List {value} to {base} ({type(exc).__name__})") from None
            if response.status_code not in (200, 201):
                raise ListWriteError(f"the server refused the List {value}: {diagnostics(response)}")
            written.append(response.headers.get("Location") or value)
    return written


def write_lists(settings: Settings, base: str, lists: Iterable[dict[str, Any]]) -> list[str]:
    """PUT each List by its identifier (create or replace); where each one went."""
    return asyncio.run(_write(settings, base, lists))
