"""The patient's data for one call, indexed in a single pass by type and by (system, code).

Resources stay plain dicts from orjson: no pydantic/fhir.resources model is built on the hot path.
"""

from __future__ import annotations

import re
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
_DATE_PATHS = {kind: tuple(tuple(p.split(".")) for p in paths) for kind, paths in DATE_ELEMENTS.items()}


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
        parsed = datetime.fromisoformat(value)  # 3.11+: any ISO 8601 form, "Z" included
    except ValueError:
        return None
    zone = parsed.tzinfo
    if zone is UTC:
        return parsed
    return parsed.replace(tzinfo=UTC) if zone is None else parsed.astimezone(UTC)


def resource_date(resource: dict[str, Any]) -> datetime | None:
    for path in _DATE_PATHS.get(resource.get("resourceType", ""), ()):
        if len(path) == 1:
            parsed = parse_fhir_date(resource.get(path[0]))
            if parsed is not None:
                return parsed
            continue
        for value in walk(resource, ".".join(path)):
            parsed = parse_fhir_date(value)
            if parsed is not None:
                return parsed
    return None


def _voided(resource: dict[str, Any]) -> bool:
    if resource.get("status") == "entered-in-error":
        return True
    verification = resource.get("verificationStatus")
    found = verification.get("coding") if isinstance(verification, dict) else None
    return isinstance(found, list) and any(  # the code decides, whether or not a system is given
        isinstance(c, dict) and c.get("code") in ("entered-in-error", "refuted") for c in found)


def _note(index: dict[Any, list[Resource]], key: Any, resource: Resource) -> None:
    members = index.get(key)
    if members is None:
        index[key] = [resource]
    elif members[-1] is not resource:  # two codings of one set: listed once
        members.append(resource)


def _usable(resources: Iterable[Resource]) -> list[Resource]:
    """Without entered-in-error or refuted resources, and each id once (the first seen wins)."""
    kept: list[Resource] = []
    seen: set[str | int] = set()
    for resource in resources:
        if _voided(resource):
            continue
        rid = resource.get("id")
        marker = rid if isinstance(rid, str) else id(resource)  # no id: the same object only
        if marker in seen:
            continue
        seen.add(marker)
        kept.append(resource)
    return kept


def _contained_medication_codes(resource: Resource) -> Iterator[tuple[str, str]]:
    """A medication given by reference to a contained Medication is indexed by that Medication's codes."""
    reference = resource.get("medicationReference")
    ref = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return
    for contained in resource.get("contained") or ():
        if isinstance(contained, dict) and contained.get("id") == ref[1:]:
            yield from codings(contained.get("code"))


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


class IndexPlan:
    """The code sets one group of rules looks up, each indexed as a bucket of its own.

    A hook call carries thousands of codings no rule asks about (every vital sign, every lab). With a
    plan the index keeps only codings some clause asks for, and each clause's code set is one bucket, so a
    look-up is one dict access however large the value set."""

    __slots__ = ("buckets", "codes")

    def __init__(self, keysets: Iterable[tuple[str, frozenset[tuple[str, str]]]]) -> None:
        self.buckets: dict[tuple[str, frozenset[tuple[str, str]]], int] = {}
        codes: dict[str, dict[str, list[tuple[str, int]]]] = {}
        for kind, keys in keysets:
            if (kind, keys) in self.buckets:
                continue
            bucket = self.buckets[kind, keys] = len(self.buckets)
            for system, code in keys:
                codes.setdefault(kind, {}).setdefault(code, []).append((system, bucket))
        # type -> code -> ((system, bucket), ...): keyed by code first, so a coding no rule wants costs
        # one hash of a short string
        self.codes: dict[str, dict[str, tuple[tuple[str, int], ...]]] = {
            kind: {code: tuple(found) for code, found in by_code.items()} for kind, by_code in codes.items()}


Resource = dict[str, Any]


class PatientRecord:
    """The resources of one call, by (source, type) and by code.

    Built in two steps so the per-call cost follows what the rules ask for. `add_all` only groups
    resources by type and, for the code sets in the IndexPlan, notes which resources carry them.
    Everything else happens on first use and is cached for the call: dropping entered-in-error and
    refuted resources and duplicates (the same id from two prefetch keys or pages) from a type's list,
    the same for a code bucket's few members, dates, texts. Without a plan every (system, code) is
    indexed, for callers that do not know in advance which rules will ask."""

    __slots__ = ("_by_code", "_clean", "_dates", "_plan", "_raw", "_text")

    def __init__(self, plan: IndexPlan | None = None) -> None:
        self._raw: dict[tuple[str, str], list[Resource]] = {}
        self._clean: dict[Any, list[Resource]] = {}
        self._by_code: dict[tuple[str, str, Any], list[Resource]] = {}
        self._dates: dict[int, datetime | None] = {}
        self._text: dict[int, tuple[str, ...]] = {}
        self._plan = plan

    def add_all(self, resources: Iterable[Resource], source: str = "record") -> None:
        """The hot path of every call: plain dict access, one tight loop per type, no models."""
        groups: dict[str, list[Resource]] = {}
        for resource in resources:
            kind = resource.get("resourceType")
            if isinstance(kind, str):
                group = groups.get(kind)
                if group is None:
                    group = groups[kind] = []
                group.append(resource)
        self._add_groups(groups, source)

    def add_value(self, value: Any, source: str = "record") -> None:
        """One prefetch value (a resource, a Bundle, null or an OperationOutcome).

        A prefetch Bundle is the answer to one search, so its resources are nearly always of one type:
        that case is taken whole, with comprehensions instead of a Python loop per resource."""
        if isinstance(value, dict) and value.get("resourceType") == "Bundle" and isinstance(
                entries := value.get("entry"), list):
            try:
                resources = [entry["resource"] for entry in entries]
                kinds = {resource["resourceType"] for resource in resources}
            except (KeyError, TypeError):  # an entry without a resource, a resource that is not an object
                kinds = set()
            if len(kinds) == 1 and isinstance(kind := next(iter(kinds)), str) and kind != "OperationOutcome":
                self._add_groups({kind: resources}, source)
                return
        self.add_all(flatten(value), source)

    def _add_groups(self, groups: dict[str, list[Resource]], source: str) -> None:
        self._clean.clear()
        for kind, group in groups.items():
            self._raw.setdefault((source, kind), []).extend(group)
            if self._plan is None:
                self._index_all(kind, group, source)
            elif kind in self._plan.codes:
                self._index_planned(kind, group, source)

    def _index_planned(self, kind: str, group: list[Resource], source: str) -> None:
        assert self._plan is not None
        wanted, by_code = self._plan.codes[kind], self._by_code

        def hit(resource: Resource, coding: dict[str, Any], targets: tuple[tuple[str, int], ...]) -> None:
            system = coding.get("system")
            for want, bucket in targets:
                if system == want:
                    _note(by_code, (source, kind, bucket), resource)

        for path in _CODE_PATHS.get(kind, ()):
            name, nested, dotted = path[0], len(path) > 1, ".".join(path)
            for resource in group:
                value: Any = resource.get(name)
                if value is None:
                    continue
                try:  # malformed codings raise here and are simply not indexed
                    if nested:
                        value = list(walk(resource, dotted))
                    if value.__class__ is dict:  # one CodeableConcept, the common case: no tuple per resource
                        for coding in value.get("coding") or ():
                            targets = wanted.get(coding.get("code"))
                            if targets is not None:
                                hit(resource, coding, targets)
                    else:
                        for concept in value:
                            for coding in concept.get("coding") or ():
                                targets = wanted.get(coding.get("code"))
                                if targets is not None:
                                    hit(resource, coding, targets)
                except (AttributeError, TypeError):
                    continue
        if kind.startswith("Medication"):
            for resource in group:
                for system, code in _contained_medication_codes(resource):
                    for want, bucket in wanted.get(code, ()):
                        if system == want:
                            _note(by_code, (source, kind, bucket), resource)

    def _index_all(self, kind: str, group: list[Resource], source: str) -> None:
        by_code = self._by_code
        for resource in group:
            for path in CODE_ELEMENTS.get(kind, ()):
                for concept in walk(resource, path):
                    for system, code in codings(concept):
                        _note(by_code, (source, kind, (system, code)), resource)
            for system, code in _contained_medication_codes(resource):
                _note(by_code, (source, kind, (system, code)), resource)

    def of_type(self, source: str, kind: str) -> list[Resource]:
        key = (source, kind)
        found = self._clean.get(key)
        if found is None:
            found = self._clean[key] = _usable(self._raw.get(key, ()))
        return found

    def with_codes(self, source: str, kind: str, keys: frozenset[tuple[str, str]]) -> list[Resource]:
        """Resources of a type carrying any of these codes, each once, in record order."""
        if self._plan is not None:
            bucket = self._plan.buckets.get((kind, keys))
            if bucket is None:  # a programming error: the rules evaluated are not the ones planned for
                raise LookupError(f"a code set of {kind} was looked up that this record's index plan lacks")
            cache_key: Any = (source, kind, bucket)
            found = self._clean.get(cache_key)
            if found is None:
                found = self._clean[cache_key] = _usable(self._by_code.get(cache_key, ()))
            return found
        hits: set[int] = set()
        for system_code in keys:
            hits.update(id(r) for r in self._by_code.get((source, kind, system_code), ()))
        return [r for r in self.of_type(source, kind) if id(r) in hits] if hits else []

    @property
    def patient(self) -> Resource | None:
        patients = self.of_type("record", "Patient")
        return patients[0] if patients else None

    def says(self, pattern: re.Pattern[str], resource: Resource) -> bool:
        """Whether any of a resource's texts (see words) matches; the texts are gathered once per call."""
        key = id(resource)
        texts = self._text.get(key)
        if texts is None:
            texts = self._text[key] = tuple(words(resource))
        return any(pattern.search(text) for text in texts)

    def date_of(self, resource: dict[str, Any]) -> datetime | None:
        key = id(resource)
        if key not in self._dates:
            self._dates[key] = resource_date(resource)
        return self._dates[key]

    @classmethod
    def from_prefetch(cls, prefetch: dict[str, Any], plan: IndexPlan | None = None) -> PatientRecord:
        """The record from prefetch-shaped data (key -> resource, Bundle, null or OperationOutcome)."""
        record = cls(plan)
        for value in prefetch.values():
            record.add_value(value, "record")
        return record
