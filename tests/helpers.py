"""Builders for hook requests and checks every card must pass."""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ALLOWED_TOKEN = re.compile(r"\{\{context\.(patientId|userId|encounterId)\}\}")


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def patient(pid: str = "pt-1", race: str | None = None, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": pid, "birthDate": "1961-05-04", **extra}
    if race:
        resource["extension"] = [{"url": US_CORE_RACE, "extension": [
            {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race}},
            {"url": "text", "valueString": race}]}]
    return resource


def troponin(oid: str = "trop-1", value: float = 212, high: float = 34,
             when: str = "2026-03-01T22:00:00Z") -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "89579-7"}]},
            "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": "ng/L"},
            "referenceRange": [{"high": {"value": high, "unit": "ng/L"}}]}


def patient_view(pid: str = "pt-1", *resources: dict[str, Any], prefetch: dict[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                            "context": {"userId": "Practitioner/dr-1", "patientId": pid}}
    if prefetch is None:
        prefetch = {"patient": patient(pid), "observation": bundle(*resources), "procedure": None,
                    "serviceRequest": None, "coverage": None}
    body["prefetch"] = prefetch
    body.update(extra)
    return body


def assert_no_empty(value: Any, path: str = "$") -> None:
    """CDS Hooks: no null, "", [] or {} anywhere in a response (cards: [] at the top is allowed)."""
    assert value is not None and value != "" and value != [] and value != {}, f"empty value at {path}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert_no_empty(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_no_empty(item, f"{path}[{i}]")


def assert_valid_card(card: dict[str, Any]) -> None:
    assert_no_empty(card)
    uuid.UUID(card["uuid"])
    assert len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"]
    if "url" in card["source"]:
        assert card["source"]["url"].startswith(("http://", "https://"))
    if card.get("suggestions"):
        assert card["selectionBehavior"] in ("at-most-one", "any")
        for suggestion in card["suggestions"]:
            uuid.UUID(suggestion["uuid"])
            assert suggestion["label"]
            for action in suggestion.get("actions", []):
                assert action["type"] in ("create", "update", "delete")
                assert action["description"]
                if "resource" in action:
                    resource = copy.deepcopy(action["resource"])
                    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for reason in card.get("overrideReasons", []):
        assert reason["system"] and reason["code"] and reason["display"]
    for link in card.get("links", []):
        assert link["url"].startswith(("http://", "https://")) and link["type"] in ("absolute", "smart")
