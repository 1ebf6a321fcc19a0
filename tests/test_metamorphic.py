"""Metamorphic checks of the shipped catalog: every case, re-expressed in other valid FHIR forms of the same
clinical fact, must give the same result.

The race swap (tests/test_catalog.py) proves no card depends on race. This does the same for coding style,
because rules and cases were first written by the same hands: a rule that only matches the way its author
coded the case misses what other EHRs send. Each transformation below keeps the clinical meaning; those
that would change it are not applied (see MEANING_CHANGES).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import ROOT

from nudges.fhir import CODE_ELEMENTS, MEDICATION_TYPES, SYSTEM_ALIASES, walk
from nudges.rules.compiled import RuleSet
from nudges.rules.compiler import load_ruleset
from nudges.rules.folders import find_file
from nudges.rules.schema import Case
from nudges.tools.cases import judge, run_case

Resources = list[dict[str, Any]]
# A local code of the kind Epic and Cerner put first in a CodeableConcept, before the standard one.
LOCAL_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.2.696580"
LANGUAGES = {"es": "Spanish", "zh": "Chinese", "vi": "Vietnamese", "ko": "Korean", "ru": "Russian", "ar": "Arabic",
             "ht": "Haitian Creole", "pt": "Portuguese", "fr": "French", "so": "Somali", "en": "English",
             "tl": "Tagalog", "pl": "Polish", "fa": "Persian", "hmn": "Hmong"}
# Re-expressions deliberately not applied, because they change what the record says:
MEANING_CHANGES = {
    "dropping the codes of a coded resource": "a rule that matches codes may rightly miss it",
    "a second reference range with other limits": "changes what 'above its range' means for this patient",
    "moving a date to another day": "every window is about time",
}


def _concepts(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for path in CODE_ELEMENTS.get(resource.get("resourceType", ""), ()) for c in walk(resource, path)
            if isinstance(c, dict)]


def medication_contained(resources: Resources, record: bool) -> bool:
    """medicationCodeableConcept as a contained Medication (how many EHRs send every order)."""
    changed = False
    for r in resources:
        if r.get("resourceType") in MEDICATION_TYPES and "medicationCodeableConcept" in r:
            concept = r.pop("medicationCodeableConcept")
            r.setdefault("contained", []).append({"resourceType": "Medication", "id": "med", "code": concept})
            r["medicationReference"] = {"reference": "#med"}
            changed = True
    return changed


def medication_referenced(resources: Resources, record: bool) -> bool:
    """medicationCodeableConcept as a reference to a Medication elsewhere in the record."""
    if not record:
        return False  # draft orders carry their Medication contained; see medication_contained
    changed = False
    for r in list(resources):
        if r.get("resourceType") in MEDICATION_TYPES and "medicationCodeableConcept" in r:
            med_id = f"med-{r.get('id', len(resources))}"
            resources.append({"resourceType": "Medication", "id": med_id, "code": r.pop("medicationCodeableConcept")})
            r["medicationReference"] = {"reference": f"Medication/{med_id}"}
            changed = True
    return changed


def local_coding_first(resources: Resources, record: bool) -> bool:
    """Every coded element gains a site-local coding in front of the standard ones (dual coding)."""
    changed = False
    for r in resources:
        for concept in _concepts(r):
            codings = concept.get("coding")
            if isinstance(codings, list) and codings:
                display = next((c.get("display") for c in codings if isinstance(c, dict) and c.get("display")),
                               None) or concept.get("text") or "local term"
                codings.insert(0, {"system": LOCAL_SYSTEM, "code": f"L{abs(hash(display)) % 100000}",
                                   "display": display})
                changed = True
    return changed


def sex_specific_ranges(resources: Resources, record: bool) -> bool:
    """One reference range as the same range given twice, for each sex (as labs with sex-specific
    99th percentiles report them); the limits are unchanged, so the meaning is too."""
    changed = False
    for r in resources:
        ranges = r.get("referenceRange") if r.get("resourceType") == "Observation" else None
        if isinstance(ranges, list) and len(ranges) == 1 and isinstance(ranges[0], dict):
            base = ranges[0]
            r["referenceRange"] = [{**base, "appliesTo": [{"coding": [{"system": "http://hl7.org/fhir/administrative-gender",
                                                                        "code": sex, "display": sex.title()}]}]}
                                   for sex in ("female", "male")]
            changed = True
    return changed


PERIODS = {"Observation": "effective", "MedicationAdministration": "effective", "MedicationStatement": "effective",
           "Procedure": "performed", "Condition": "onset", "DiagnosticReport": "effective"}


def date_as_period(resources: Resources, record: bool) -> bool:
    """A dateTime given as a Period that starts (and ends) at that instant."""
    changed = False
    for r in resources:
        stem = PERIODS.get(r.get("resourceType", ""))
        if stem and isinstance(r.get(f"{stem}DateTime"), str):
            when = r.pop(f"{stem}DateTime")
            r[f"{stem}Period"] = {"start": when, "end": when}
            changed = True
    return changed


def observation_issued_only(resources: Resources, record: bool) -> bool:
    """An Observation dated only by `issued` (some lab interfaces send no effective[x])."""
    changed = False
    for r in resources:
        if r.get("resourceType") == "Observation" and isinstance(r.get("effectiveDateTime"), str) \
                and "T" in r["effectiveDateTime"] and "issued" not in r:
            r["issued"] = r.pop("effectiveDateTime")
            changed = True
    return changed


def language_as_text(resources: Resources, record: bool) -> bool:
    """Patient.communication.language given only as text (what a registration screen often stores)."""
    changed = False
    for r in resources:
        if r.get("resourceType") != "Patient":
            continue
        for communication in r.get("communication") or ():
            language = communication.get("language") if isinstance(communication, dict) else None
            codings = language.get("coding") if isinstance(language, dict) else None
            if not codings:
                continue
            first = codings[0]
            name = first.get("display") or LANGUAGES.get(str(first.get("code", "")).split("-")[0].lower())
            if name:
                communication["language"] = {"text": name}
                changed = True
    return changed


OIDS = {uri: oid for oid, uri in SYSTEM_ALIASES.items() if oid.startswith("urn:oid:")}


def systems_as_oids(resources: Resources, record: bool) -> bool:
    """Every coding's system given as its HL7 OID (`urn:oid:2.16.840.1.113883.6.1` for LOINC), as many
    interfaces still send them."""
    changed = False
    for r in resources:
        for concept in _concepts(r):
            for coding in concept.get("coding") or ():
                if isinstance(coding, dict) and coding.get("system") in OIDS:
                    coding["system"] = OIDS[coding["system"]]
                    changed = True
    return changed


# An extension as an EHR adds beside a primitive value (FHIR JSON's `_element`: the primitive's id and
# extensions); US Core's own examples carry such twins (`_questionnaire`, `_birthDate` with a birth time).
TWIN = {"extension": [{"url": "http://example.org/fhir/StructureDefinition/source-system", "valueString": "ehr"}]}
NOT_ELEMENTS = frozenset({"resourceType", "url", "div"})  # not FHIR elements with a twin in JSON


def _twin_primitives(node: Any) -> bool:
    changed = False
    if isinstance(node, list):
        for item in node:
            changed |= _twin_primitives(item)
        return changed
    if not isinstance(node, dict):
        return False
    for key, value in list(node.items()):
        if key.startswith("_") or key in NOT_ELEMENTS or f"_{key}" in node:
            continue
        if isinstance(value, (str, bool, int, float)):
            node[f"_{key}"] = copy.deepcopy(TWIN)
            changed = True
        elif isinstance(value, list) and value and all(isinstance(v, (str, bool, int, float)) for v in value):
            node[f"_{key}"] = [copy.deepcopy(TWIN) for _ in value]
            changed = True
        else:
            changed |= _twin_primitives(value)
    return changed


def primitive_extensions(resources: Resources, record: bool) -> bool:
    """Every primitive value of every resource with an extension beside it (`_status`, `_birthDate`,
    `coding[]._code`, `valueQuantity._value`, `_given` as a list...): the same facts, one more extension."""
    return _twin_primitives(resources)


TRANSFORMS: dict[str, Callable[[Resources, bool], bool]] = {
    "primitive-extensions": primitive_extensions,
    "systems-as-oids": systems_as_oids,
    "medication-contained": medication_contained,
    "medication-referenced": medication_referenced,
    "local-coding-first": local_coding_first,
    "sex-specific-ranges": sex_specific_ranges,
    "date-as-period": date_as_period,
    "observation-issued-only": observation_issued_only,
    "language-as-text": language_as_text,
}


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    result = load_ruleset(ROOT / "rules")
    assert result.ruleset is not None, [str(p) for p in result.problems]
    return result.ruleset


def record_of(case: Case, folder: Path, ruleset: RuleSet) -> Resources:
    resources: Resources = []
    if case.bundle:
        data = orjson.loads(find_file(folder, case.bundle, ruleset.fixture_dirs).read_bytes())
        resources += [e["resource"] for e in data.get("entry", []) if isinstance(e.get("resource"), dict)]
    return copy.deepcopy(resources + case.resources)


def variant(case: Case, folder: Path, ruleset: RuleSet, transform: Callable[[Resources, bool], bool]) -> Case | None:
    """The case with every resource re-expressed, or None when the transformation does not apply to it."""
    record = record_of(case, folder, ruleset)
    drafts = copy.deepcopy(case.draft_orders)
    appointments = copy.deepcopy(case.appointments)
    changed = [transform(record, True), transform(drafts, False), transform(appointments, False)]
    if not any(changed):
        return None
    return case.model_copy(update={"bundle": None, "resources": record, "draft_orders": drafts,
                                   "appointments": appointments})


RULE_IDS = sorted(p.name.removesuffix(".cases.yaml") for p in (ROOT / "rules").rglob("*.cases.yaml"))


@pytest.mark.parametrize("rule_id", RULE_IDS)
def test_same_result_in_every_valid_form(shipped: RuleSet, rule_id: str) -> None:
    rule = next(r for r in shipped.rules if r.id == rule_id)
    path, cases = shipped.cases[rule_id]
    failures, applied = [], 0
    for case in cases.cases:
        for name, transform in TRANSFORMS.items():
            changed = variant(case, path.parent, shipped, transform)
            if changed is None:
                continue
            applied += 1
            try:
                result = judge(changed, run_case(rule, shipped, changed, path.parent, cases.now))
            except RuntimeError as exc:  # the rule raised: the form broke its expression
                failures.append(f"{name} on '{case.name}': {exc}")
                continue
            if not result.ok:
                failures.append(f"{name} on '{case.name}': {result.message.splitlines()[0]}")
    assert not failures, f"{rule_id}: {len(failures)} of {applied} re-expressed case(s) differ:\n" + "\n".join(failures)


def test_the_transformations_apply_to_the_catalog(shipped: RuleSet) -> None:
    """Each transformation re-expresses some case; one that never applies tests nothing."""
    used = {name: 0 for name in TRANSFORMS}
    for _, (path, cases) in shipped.cases.items():
        for case in cases.cases:
            for name, transform in TRANSFORMS.items():
                used[name] += variant(case, path.parent, shipped, transform) is not None
    assert all(used.values()), {k: v for k, v in used.items() if not v}
