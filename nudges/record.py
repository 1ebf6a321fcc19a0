"""The patient's data for one call, indexed in a single pass by type and by (system, code).

Resources stay plain dicts from orjson: no pydantic/fhir.resources model is built on the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .fhir import (
    CODE_ELEMENTS,
    MEDICATION_TYPES,
    SYSTEM_ALIASES,
    Resource,
    canonicalize,
    code_text_languages,
    codings,
    flatten,
    patient_of,
    referenced_medication,
    resource_date,
    voided,
    walk,
    words,
)
from .planned import Heads
from .prefilter import lowered, may_match, needles

_CODE_PATHS = {kind: tuple(tuple(p.split(".")) for p in paths) for kind, paths in CODE_ELEMENTS.items()}
# What every call's record reads besides the rules' clauses: the patient (age, `patient:`, the audit's
# bucket), coverage (the payer class) and Medication (what `medicationReference` names).
NEEDED = frozenset({"Patient", "Coverage", "Medication"})


def _either(patterns: list[re.Pattern[str]]) -> tuple[re.Pattern[str], ...]:
    """Patterns of the same flags as one alternation (one search instead of several); as they are when
    they would not combine (different flags, back-references, group names used twice)."""
    if len(patterns) > 1 and len({p.flags for p in patterns}) == 1 and \
            not any(re.search(r"\\[1-9]|\(\?P[=<]", p.pattern) for p in patterns):
        try:
            return (re.compile("|".join(f"(?:{p.pattern})" for p in patterns), patterns[0].flags),)
        except re.error:
            pass
    return tuple(patterns)


def _note(index: dict[Any, list[Resource]], key: Any, resource: Resource) -> None:
    members = index.get(key)
    if members is None:
        index[key] = [resource]
    elif members[-1] is not resource:  # two codings of one set: listed once
        members.append(resource)


def _usable(resources: Iterable[Resource], patient: str | None = None) -> list[Resource]:
    """Without entered-in-error or refuted resources, without those about a patient other than the call's
    (`patient`, when known), and each id once (the first seen wins)."""
    kept: list[Resource] = []
    seen: set[str | int] = set()
    for resource in resources:
        if voided(resource) or (patient is not None and elsewhere(resource, patient)):
            continue
        rid = resource.get("id")
        marker = rid if isinstance(rid, str) else id(resource)  # no id: the same object only
        if marker in seen:
            continue
        seen.add(marker)
        kept.append(resource)
    return kept


CURRENT_ENCOUNTER = frozenset({"in-progress", "arrived", "triaged", "onleave"})  # R4 Encounter.status under way


def elsewhere(resource: Resource, patient: str) -> bool:
    """Whether a resource is about another patient than `patient` (the call's context.patientId): a
    Patient of another id, or a subject, patient or beneficiary naming another Patient. An EHR's prefetch
    or a FHIR search gone wrong (a missing patient filter, a merged chart) must not give this patient
    another's troponin or age. A resource that names no Patient (a contained or urn:uuid subject, none at
    all) is not judged."""
    subject = resource.get("subject")
    if type(subject) is dict and subject.get("reference") == "Patient/" + patient:  # the common case, in short
        return False
    about = patient_of(resource)
    return about is not None and about != patient


class IndexPlan:
    """The code sets one group of rules looks up, each indexed as a bucket of its own.

    A hook call carries thousands of codings no rule asks about (every vital sign, every lab). With a
    plan the index keeps only codings some clause asks for, and each clause's code set is one bucket, so a
    look-up is one dict access however large the value set."""

    __slots__ = ("buckets", "codes", "heads", "texts", "whole")

    def __init__(self, keysets: Iterable[tuple[str, frozenset[tuple[str, str]]]], whole: Iterable[str] = (),
                 texts: Iterable[tuple[str, re.Pattern[str]]] = ()) -> None:
        self.whole = frozenset(whole) | NEEDED  # types some clause reads in full (neither codes nor words)
        by_kind: dict[str, list[re.Pattern[str]]] = {}
        for kind, pattern in texts:
            if pattern not in by_kind.setdefault(kind, []):
                by_kind[kind].append(pattern)
        # type -> the `text:` patterns of its clauses, as one alternation where they can be
        self.texts: dict[str, tuple[re.Pattern[str], ...]] = {k: _either(v) for k, v in by_kind.items()}
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
        self.heads = Heads(self.whole, self.codes, self.texts)

    def reads(self, resource: Resource) -> bool:
        """Whether a record with this plan could ever look at the resource: its type is read in full, it
        carries a code some clause looks up, its words match a `text:` clause on its type, or it names its
        medication by reference (whose code and words only the Medication tells). Hook calls leave the
        rest of a prefetch Bundle unparsed (planned.parse_body) and population screening leaves it out of
        each patient's call: the cards are the same (duplicate ids aside: a resource no rule reads is not
        there to stand in for another of its id), and most of a record (vital signs, routine labs) is
        never built, nor freed. The decision is made on the resource's head (planned.Heads)."""
        return self.heads.reads_resource(resource)


class PatientRecord:
    """The resources of one call, by (source, type) and by code.

    Built in two steps so the per-call cost follows what the rules ask for. `add_all` only groups
    resources by type and, for the code sets in the IndexPlan, notes which resources carry them.
    Everything else happens on first use and is cached for the call: dropping entered-in-error and
    refuted resources and duplicates (the same id from two prefetch keys or pages) from a type's list,
    the same for a code bucket's few members, dates, texts. Without a plan every (system, code) is
    indexed, for callers that do not know in advance which rules will ask."""

    __slots__ = ("_by_code", "_by_reference", "_canonical", "_clean", "_dates", "_lower", "_medications", "_plan",
                 "_pooled", "_raw", "_text", "patient_id", "settled")

    def __init__(self, plan: IndexPlan | None = None, patient_id: str | None = None) -> None:
        # the call's patient (context.patientId, "Patient/" dropped): what is about another is set aside
        self.patient_id = patient_id.removeprefix("Patient/") if isinstance(patient_id, str) and patient_id else None
        self._raw: dict[tuple[str, str], list[Resource]] = {}
        self._clean: dict[Any, list[Resource]] = {}
        self._by_code: dict[tuple[str, str, Any], list[Resource]] = {}
        self._dates: dict[int, datetime | None] = {}
        self._text: dict[int, tuple[str, ...]] = {}
        self._lower: dict[int, str | None] = {}  # the same texts lowered and joined, for the prefilter
        self._pooled: dict[tuple[str, str], str | None] = {}  # and those of a whole type's usable resources
        self._by_reference: list[tuple[str, str, Resource]] = []  # medication[x] by reference, unresolved
        self._medications: dict[str, Resource] | None = None  # the record's Medication resources by id
        self._canonical: set[int] = set()  # resources whose code systems are already canonical
        self._plan = plan
        # ("where" or "date", its text, id(resource)) -> its answer, for expressions that read only call-wide
        # names (CompiledClause.settled and .dated: engine.match and date_of)
        self.settled: dict[tuple[str, str, int], Any] = {}

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
            if not entries:  # a search that found nothing: most prefetch keys of most calls
                return
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
        self._pooled.clear()
        self._medications = None
        for patient in groups.get("Patient", ()):
            code_text_languages(patient)
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
            system = SYSTEM_ALIASES.get(system, system) if isinstance(system, str) else system
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
        if kind in MEDICATION_TYPES:
            self._note_references(kind, group, source)

    def _index_all(self, kind: str, group: list[Resource], source: str) -> None:
        for resource in group:
            for path in CODE_ELEMENTS.get(kind, ()):
                for concept in walk(resource, path):
                    self._index_concept(kind, source, resource, concept)
        if kind in MEDICATION_TYPES:
            self._note_references(kind, group, source)

    def _index_concept(self, kind: str, source: str, resource: Resource, concept: Any) -> None:
        """One CodeableConcept of a resource into the index (planned buckets, or every code)."""
        if self._plan is None:
            for key in codings(concept):
                _note(self._by_code, (source, kind, key), resource)
            return
        wanted = self._plan.codes.get(kind, {})
        for system, code in codings(concept):
            for want, bucket in wanted.get(code, ()):
                if system == want:
                    _note(self._by_code, (source, kind, bucket), resource)
                    self._clean.pop((source, kind, bucket), None)

    def _note_references(self, kind: str, group: list[Resource], source: str) -> None:
        """Orders, dispenses and administrations coded by `medicationReference`: a contained Medication is
        indexed at once; one elsewhere in the record is resolved on the first code look-up of the type,
        when every prefetch key (an `_include`d Medication among them) has been added."""
        for resource in group:
            if "medicationReference" not in resource:
                continue
            contained = referenced_medication(resource)
            if contained is not None:
                self._index_concept(kind, source, resource, contained.get("code"))
            else:
                self._by_reference.append((kind, source, resource))

    def _resolve_references(self) -> None:
        pending, self._by_reference = self._by_reference, []
        medications = self.medications()
        for kind, source, resource in pending:
            medication = referenced_medication(resource, medications)
            if medication is not None:
                self._index_concept(kind, source, resource, medication.get("code"))

    def of_type(self, source: str, kind: str) -> list[Resource]:
        key = (source, kind)
        found = self._clean.get(key)
        if found is None:
            found = self._clean[key] = _usable(self._raw.get(key, ()), self.patient_id)
        return found

    def with_codes(self, source: str, kind: str, keys: frozenset[tuple[str, str]]) -> list[Resource]:
        """Resources of a type carrying any of these codes, each once, in record order."""
        if self._by_reference and kind in MEDICATION_TYPES:
            self._resolve_references()
        if self._plan is not None:
            bucket = self._plan.buckets.get((kind, keys))
            if bucket is None:  # a programming error: the rules evaluated are not the ones planned for
                raise LookupError(f"a code set of {kind} was looked up that this record's index plan lacks")
            cache_key: Any = (source, kind, bucket)
            found = self._clean.get(cache_key)
            if found is None:
                found = self._clean[cache_key] = _usable(self._by_code.get(cache_key, ()), self.patient_id)
            return found
        hits: set[int] = set()
        for system_code in keys:
            hits.update(id(r) for r in self._by_code.get((source, kind, system_code), ()))
        return [r for r in self.of_type(source, kind) if id(r) in hits] if hits else []

    def lacks_codes(self, sources: tuple[str, ...], kind: str, keys: frozenset[tuple[str, str]]) -> bool:
        """Whether no source holds a resource of the type carrying any of these codes, before a look-up's
        clean-up (what no raw bucket holds, no clean one does): most clauses of most calls ask for codes the
        record does not have (a rule's exclusions, someone else's diagnoses), and that answer is one dict
        access per source here."""
        plan = self._plan
        pending = self._by_reference and kind in MEDICATION_TYPES  # references to resolve first
        bucket = None if plan is None or pending else plan.buckets.get((kind, keys))
        if bucket is None:  # no plan, references pending, or a set the plan lacks (with_codes says so)
            return not any(self.with_codes(source, kind, keys) for source in sources)
        by_code = self._by_code
        for source in sources:  # noqa: SIM110  # a loop: any() over a generator costs more (one source, nearly always)
            if (source, kind, bucket) in by_code:
                return False
        return True

    def is_draft(self, resource: Resource) -> bool:
        """Whether a resource came from the hook's drafts (draftOrders, appointments), not the record."""
        return any(r is resource for r in self._raw.get(("draft", str(resource.get("resourceType"))), ()))

    def set_aside(self, source: str, kind: str) -> list[tuple[Resource, str]]:
        """What `of_type` leaves out of a type's list, and why: for `nudges explain`, never the hot path."""
        kept = {id(r) for r in self.of_type(source, kind)}
        def why(r: Resource) -> str:
            if voided(r):
                return "entered in error or refuted"
            if self.patient_id is not None and elsewhere(r, self.patient_id):
                return f"about another patient (Patient/{patient_of(r)}, not the call's Patient/{self.patient_id})"
            return "an id seen before (a duplicate)"

        return [(r, why(r)) for r in self._raw.get((source, kind), ()) if id(r) not in kept]

    def inventory(self) -> dict[str, dict[str, int]]:
        """How many usable resources of each type each source holds (for `nudges explain`)."""
        found: dict[str, dict[str, int]] = {}
        for source, kind in sorted(self._raw):
            count = len(self.of_type(source, kind))
            if count:
                found.setdefault(source, {})[kind] = count
        return found

    def canonical(self, resource: Resource) -> Resource:
        """The resource with its code systems under their canonical URIs (fhir.canonicalize), before FHIRPath
        reads it; done once per resource, and only for the few a rule's FHIRPath looks at."""
        key = id(resource)
        if key not in self._canonical:
            canonicalize(resource)
            self._canonical.add(key)
        return resource

    def medications(self) -> dict[str, Resource]:
        """Medication resources of the record and the drafts, by id: what `Medication/id` references name."""
        if self._medications is None:
            self._medications = {m["id"]: m for source in ("record", "draft")
                                 for m in self.of_type(source, "Medication") if isinstance(m.get("id"), str)}
        return self._medications

    @property
    def patient(self) -> Resource | None:
        patients = self.of_type("record", "Patient")
        return patients[0] if patients else None

    def says(self, pattern: re.Pattern[str], resource: Resource) -> bool:
        """Whether any of a resource's texts (see words) matches; the texts are gathered once per call, and
        texts that hold none of the strings every match contains (prefilter.py) are not searched."""
        texts = self._texts(resource)
        found = needles(pattern)
        if found is not None and not may_match(found, self._lowered(resource, texts)):
            return False
        return any(pattern.search(text) for text in texts)

    def may_say(self, source: str, kind: str, pattern: re.Pattern[str]) -> bool:
        """Whether any usable resource of the type could match (says): false when none of the pattern's
        needles is in their texts taken together. A rule scans the same few Conditions, Procedures and
        Encounters with many patterns (the colorectal rule's exclusions and tests: over twenty), and most
        find nothing: one look at the type's texts instead of one per resource, and no dates worked out
        for a window the scan would only narrow."""
        found = needles(pattern)
        if found is None:
            return True
        key = (source, kind)
        if key in self._pooled:
            pooled = self._pooled[key]
        else:
            parts = [self._lowered(r, self._texts(r)) for r in self.of_type(source, kind)]
            pooled = self._pooled[key] = None if None in parts else "\n".join(parts)  # type: ignore[arg-type]
        return may_match(found, pooled)

    def _texts(self, resource: Resource) -> tuple[str, ...]:
        key = id(resource)
        texts = self._text.get(key)
        if texts is None:
            medications = self.medications() if "medicationReference" in resource else None
            texts = self._text[key] = tuple(words(resource, medications))
        return texts

    def _lowered(self, resource: Resource, texts: tuple[str, ...]) -> str | None:
        key = id(resource)
        return self._lower[key] if key in self._lower else self._lower.setdefault(key, lowered(texts))

    def date_current_encounters(self, encounter_id: Any, now: datetime) -> None:
        """An Encounter without a `period.start` that is under way (the call's own encounter, or one
        in progress, arrived, triaged or on leave) is dated `now`: it is happening as the call is made.
        US Core's in-progress inpatient example has no period; undated, it counted in no time window (an
        interpreter at discharge was not asked for, colorectal screening was offered during the stay)."""
        for source in ("record", "draft"):
            for encounter in self.of_type(source, "Encounter"):
                if (encounter.get("id") == encounter_id or encounter.get("status") in CURRENT_ENCOUNTER) \
                        and self.date_of(encounter) is None:
                    self._dates[id(encounter)] = now

    def date_of(self, resource: dict[str, Any]) -> datetime | None:
        key = id(resource)
        if key not in self._dates:
            self._dates[key] = resource_date(resource)
        return self._dates[key]

    @classmethod
    def from_prefetch(cls, prefetch: dict[str, Any], plan: IndexPlan | None = None,
                      patient_id: str | None = None) -> PatientRecord:
        """The record from prefetch-shaped data (key -> resource, Bundle, null or OperationOutcome), of the
        patient `patient_id` when known."""
        record = cls(plan, patient_id)
        for value in prefetch.values():
            record.add_value(value, "record")
        return record
