"""The patient's data for one call, indexed in a single pass by type and by (system, code).

Resources stay plain dicts from orjson: no pydantic/fhir.resources model is built on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

# Elements whose codings identify what a resource *is*; these feed the code index.
CODE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Observation": ("code",),
    "Condition": ("code",),
    "Procedure": ("code",),
    "ServiceRequest": ("code",),
    "DiagnosticReport": ("code",),
    "MedicationRequest": ("medicationCodeableConcept",),
    "MedicationStatement": ("medicationCodeableConcept",),
    "MedicationAdministration": ("medicationCodeableConcept",),
    "MedicationDispense": ("medicationCodeableConcept",),
    "Medication": ("code",),
    "Immunization": ("vaccineCode",),
    "AllergyIntolerance": ("code",),
    "Encounter": ("type", "hospitalization.dischargeDisposition", "reasonCode"),
    "Appointment": ("serviceType", "appointmentType", "reasonCode"),
    "Coverage": ("type",),
    "Flag": ("code",),
    "Task": ("code",),
    "DocumentReference": ("type",),
    "CarePlan": ("category",),
    "DeviceRequest": ("codeCodeableConcept",),
    "Communication": ("reasonCode",),
    "CommunicationRequest": ("reasonCode",),
    "ClinicalImpression": ("code",),
    "RiskAssessment": ("code",),
    "EpisodeOfCare": ("type",),
    "Consent": ("category",),
    "QuestionnaireResponse": (),
}

# Where each type keeps its clinically relevant date, first present wins.
DATE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "Condition": ("onsetDateTime", "onsetPeriod.start", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "ServiceRequest": ("authoredOn", "occurrenceDateTime", "occurrencePeriod.start"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "MedicationRequest": ("authoredOn",),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "Immunization": ("occurrenceDateTime", "recorded"),
    "AllergyIntolerance": ("recordedDate", "onsetDateTime"),
    "Encounter": ("period.start",),
    "Appointment": ("start", "created"),
    "Coverage": ("period.start",),
    "Flag": ("period.start",),
    "Task": ("authoredOn", "executionPeriod.start"),
    "DocumentReference": ("date",),
    "CarePlan": ("period.start", "created"),
    "DeviceRequest": ("authoredOn", "occurrenceDateTime"),
    "Communication": ("sent", "received"),
    "CommunicationRequest": ("authoredOn",),
    "QuestionnaireResponse": ("authored",),
    "ClinicalImpression": ("effectiveDateTime", "date"),
    "RiskAssessment": ("occurrenceDateTime",),
    "EpisodeOfCare": ("period.start",),
    "Consent": ("dateTime",),
    "NutritionOrder": ("dateTime",),
}

SOURCES = ("record", "draft", "selected")
_CODE_PATHS = {kind: tuple(tuple(p.split(".")) for p in paths) for kind, paths in CODE_ELEMENTS.items()}


def walk(resource: dict[str, Any], path: str) -> Iterator[Any]:
    """Values at a dotted path, flattening lists on the way."""
    values: list[Any] = [resource]
    for part in path.split("."):
        nxt: list[Any] = []
        for value in values:
            if isinstance(value, dict) and part in value:
                child = value[part]
                nxt.extend(child if isinstance(child, list) else [child])
        values = nxt
    yield from values


def codings(concept: Any) -> Iterator[tuple[str, str]]:
    if isinstance(concept, dict):
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    yield system, code


def words(resource: dict[str, Any]) -> Iterator[str]:
    """The human-readable text of a resource: its code elements' text and displays, notes, strings."""
    for path in CODE_ELEMENTS.get(resource.get("resourceType", ""), ()):
        for concept in walk(resource, path):
            if isinstance(concept, dict):
                if isinstance(concept.get("text"), str):
                    yield concept["text"]
                for coding in concept.get("coding") or ():
                    if isinstance(coding, dict) and isinstance(coding.get("display"), str):
                        yield coding["display"]
    for note in resource.get("note") or ():
        if isinstance(note, dict) and isinstance(note.get("text"), str):
            yield note["text"]
    if isinstance(resource.get("valueString"), str):
        yield resource["valueString"]


def parse_fhir_date(value: Any) -> datetime | None:
    """FHIR date/dateTime/instant at any precision ("2026", "2026-03", "2026-03-01T10:00:00Z")."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) == 4:
            return datetime(int(value), 1, 1, tzinfo=UTC)
        if len(value) == 7:
            return datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def resource_date(resource: dict[str, Any]) -> datetime | None:
    for path in DATE_ELEMENTS.get(resource.get("resourceType", ""), ()):
        for value in walk(resource, path):
            parsed = parse_fhir_date(value)
            if parsed is not None:
                return parsed
    return None


def _voided(resource: dict[str, Any]) -> bool:
    if resource.get("status") == "entered-in-error":
        return True
    verification = resource.get("verificationStatus")
    return any(code in ("entered-in-error", "refuted") for _, code in codings(verification))


def flatten(value: Any) -> Iterator[dict[str, Any]]:
    """Resources in a prefetch value: a resource, or a Bundle's entries (OperationOutcomes dropped)."""
    if not isinstance(value, dict):
        return
    kind = value.get("resourceType")
    if kind == "Bundle":
        for entry in value.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") not in (None, "OperationOutcome"):
                yield resource
    elif isinstance(kind, str) and kind != "OperationOutcome":
        yield value


class PatientRecord:
    """Resources by (source, type) and by (source, type, system, code); built once per call."""

    __slots__ = ("_by_code", "_by_type", "_dates", "_seen", "patient")

    def __init__(self) -> None:
        self._by_type: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._by_code: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
        self._dates: dict[int, datetime | None] = {}
        self._seen: set[tuple[str, str, str]] = set()
        self.patient: dict[str, Any] | None = None

    def add_all(self, resources: Iterable[dict[str, Any]], source: str = "record") -> None:
        """The hot loop of every call: plain dict access only, one pass, no models."""
        by_type, by_code, seen = self._by_type, self._by_code, self._seen
        for resource in resources:
            kind = resource.get("resourceType")
            if not isinstance(kind, str) or resource.get("status") == "entered-in-error":
                continue
            verification = resource.get("verificationStatus")
            if verification is not None and _voided(resource):
                continue
            rid = resource.get("id")
            if isinstance(rid, str):
                key = (source, kind, rid)
                if key in seen:  # the same resource from two prefetch keys counts once
                    continue
                seen.add(key)
            if kind == "Patient" and self.patient is None and source == "record":
                self.patient = resource
            by_type.setdefault((source, kind), []).append(resource)
            for path in _CODE_PATHS.get(kind, ()):
                if len(path) == 1:
                    value = resource.get(path[0])
                    concepts = value if isinstance(value, list) else (value,)
                else:
                    concepts = tuple(walk(resource, ".".join(path)))
                for concept in concepts:
                    if not isinstance(concept, dict):
                        continue
                    for coding in concept.get("coding") or ():
                        if isinstance(coding, dict):
                            system, code = coding.get("system"), coding.get("code")
                            if isinstance(system, str) and isinstance(code, str):
                                by_code.setdefault((source, kind, system, code), []).append(resource)
            if kind.startswith("Medication") and "medicationReference" in resource:
                self._index_contained_medication(resource, source)

    def _index_contained_medication(self, resource: dict[str, Any], source: str) -> None:
        ref = (resource.get("medicationReference") or {}).get("reference", "")
        if not isinstance(ref, str) or not ref.startswith("#"):
            return
        for contained in resource.get("contained") or ():
            if isinstance(contained, dict) and contained.get("id") == ref[1:]:
                for system, code in codings(contained.get("code")):
                    self._by_code.setdefault((source, resource["resourceType"], system, code),
                                             []).append(resource)

    def of_type(self, source: str, kind: str) -> list[dict[str, Any]]:
        return self._by_type.get((source, kind), [])

    def with_codes(self, source: str, kind: str, keys: frozenset[tuple[str, str]]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        ids: set[int] = set()
        by_code = self._by_code
        for system, code in keys:
            for resource in by_code.get((source, kind, system, code), ()):
                if id(resource) not in ids:
                    ids.add(id(resource))
                    found.append(resource)
        return found

    def date_of(self, resource: dict[str, Any]) -> datetime | None:
        key = id(resource)
        if key not in self._dates:
            self._dates[key] = resource_date(resource)
        return self._dates[key]

    def count(self) -> int:
        return sum(len(v) for v in self._by_type.values())

    @classmethod
    def from_prefetch(cls, prefetch: dict[str, Any]) -> PatientRecord:
        """The record from prefetch-shaped data (key -> resource, Bundle, null or OperationOutcome)."""
        record = cls()
        for value in prefetch.values():
            record.add_all(flatten(value), "record")  # flatten skips null and OperationOutcome
        return record
