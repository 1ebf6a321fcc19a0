"""Compiled FHIRPath (nudges/rules/fastpath) against fhirpathpy as nudges configures it, outcome for outcome.

An outcome is the result (compared type-exactly, see fastpath_corpus.canon) or the type of the exception
raised. Why differential: the compiled form is only worth having if it never changes what a rule means, so
every check is "same as fhirpathpy": on the shipped catalog over the fixtures, on generated variants of
them, on expressions a rule author would plausibly write next, on fhirpathpy's quirks and errors, and on
the HL7 FHIRPath R4 suite (tests/fhirpath_suite, vendored). FASTPATH_EXAMPLES raises the number of
generated variants per shipped expression for a deeper run (the default keeps this file to seconds).
"""

from __future__ import annotations

import copy
import os
import random
import re
import zlib
from collections.abc import Iterator
from typing import Any

import fastpath_corpus as corpus
import fhirpath_official as official
import pytest

from nudges.rules.fastpath import SUPPORTED_FUNCTIONS, compile_fast
from nudges.rules.fastpath.ops import Types as TypeInfo
from nudges.rules.fhirpath import SAMPLE_ENVIRONMENT, FhirPathSyntaxError, compile_expression, member_of, variables

SHIPPED = corpus.shipped()
VALUESETS = corpus.value_sets()
BY_TYPE = corpus.by_type()
EXAMPLES = int(os.environ.get("FASTPATH_EXAMPLES", "20"))


def _ids(s: corpus.Shipped) -> str:
    return f"{s.resource_type}.{s.field}:{s.expression[:50]}"


@pytest.fixture(autouse=True)
def _production_type_state() -> Iterator[None]:
    """fhirpathpy keeps the model of the last `is`/`as` in a global (TypeInfo.model) that ofType and
    equality read; nudges sets it to R4 at import (rules/fhirpath.py). Tests start there."""
    saved = TypeInfo.model
    TypeInfo.model = corpus.R4
    yield
    TypeInfo.model = saved


def same(expression: str, resource: Any, env: dict[str, Any], *, state: Any = corpus.R4) -> None:
    fast = corpus.compiled(expression, VALUESETS)
    assert fast is not None, f"outside the subset: {expression}"
    TypeInfo.model = state
    expected = corpus.outcome(corpus.reference(expression, VALUESETS), copy.deepcopy(resource), env)
    TypeInfo.model = state
    got = corpus.outcome(fast, resource, env)
    assert got == expected, f"{expression!r} on {resource.get('resourceType')}/{resource.get('id')}"


def environments(shipped: corpus.Shipped, record: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The engine's environment, and the variants a rule can meet: bound names empty or unbound, no
    hook context."""
    env = corpus.environment(shipped, record)
    variants = [env]
    read = {name for name, _ in variables(shipped.expression)}  # a variant of names it does not read is the same
    if read & {name for name, _ in shipped.bindings}:
        variants.append({**env, **{name: [] for name, _ in shipped.bindings}})
        variants.append(dict(corpus.ENV))  # unbound: fhirpathpy raises, so must the compiled form
    if read & {"patientId", "encounterId", "hook"}:
        variants.append({**env, "patientId": [], "encounterId": [], "hook": []})
    return variants


# -- the shipped catalog ------------------------------------------------------------------------------

def test_catalog_found() -> None:
    """The walker sees the catalog (a vacuous pass would hide every check below)."""
    assert len(SHIPPED) >= 20
    assert sum(len(r) for _, r in corpus.records()) >= 200
    assert {"where", "date", "patient"} >= {s.field for s in SHIPPED} and any(s.field == "where" for s in SHIPPED)


@pytest.mark.parametrize("shipped", SHIPPED, ids=_ids)
def test_shipped_expression_is_compiled_in_service(shipped: corpus.Shipped) -> None:
    """What the service runs for a shipped expression is the compiled form, not the fallback."""
    bound = set(re.findall(r"%([A-Za-z_]\w*)", shipped.expression)) - set(SAMPLE_ENVIRONMENT)  # earlier clauses'
    fn = compile_expression(shipped.expression, shipped.resource_type or None, VALUESETS, bound)
    assert fn.__module__ == "nudges.rules.fastpath.translate", shipped.expression


@pytest.mark.parametrize("shipped", SHIPPED, ids=_ids)
def test_shipped_expression_on_every_fixture(shipped: corpus.Shipped) -> None:
    for resource, record in BY_TYPE.get(shipped.resource_type, []):
        for env in environments(shipped, record):
            same(shipped.expression, resource, env)


# -- generated variants --------------------------------------------------------------------------------

DATES = ("2026-03-02", "2026-03", "2026", "2026-03-02T09:30:00Z", "2026-03-02T09:30:00+01:00", "2026-03-02T09",
         "2025-12-31T23:59:59.123Z", "1999-01-01", "2026-02-29", "not a date", "2026-02-03")
SCALARS: tuple[Any, ...] = (None, "", "active", "completed", "draft", "cancelled", "revoked", 0, 1, 88, 96.5, 120,
                            -3.2, True, False, "96", "1.5", "en", "en-US", "es", "Y", "LA33-6", {}, [])


def _mutate(node: Any, rnd: random.Random, depth: int = 0) -> Any:
    """One random structural change somewhere below `node`: missing fields, singletons vs lists, partial
    dates, extra repetitions (several reference ranges), numbers vs strings, primitive extensions,
    another choice type for value[x]."""
    if isinstance(node, dict) and node:
        key = rnd.choice(list(node))
        choice = rnd.randrange(11)
        value = node[key]
        if choice == 0 and key != "resourceType":
            del node[key]
        elif choice == 1 and not isinstance(value, list):
            node[key] = [value]
        elif choice == 2 and isinstance(value, list) and len(value) == 1:
            node[key] = value[0]
        elif choice == 3 and isinstance(value, list) and value:
            node[key] = [*value, copy.deepcopy(rnd.choice(value))]
        elif choice == 4 and isinstance(value, str) and value[:2] in ("19", "20"):
            node[key] = rnd.choice(DATES)
        elif choice == 5 and isinstance(value, int | float) and not isinstance(value, bool):
            node[key] = str(value)
        elif choice == 6 and isinstance(value, str) and value.replace(".", "", 1).isdigit():
            node[key] = float(value) if "." in value else int(value)
        elif choice == 7 and key != "resourceType":
            node["_" + key] = {"extension": [{"url": "http://example.org/x", "valueString": "x"}]}
        elif choice == 8 and key.startswith("value") and key != "value":
            del node[key]
            node[rnd.choice(["valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean",
                             "valueInteger", "valueDateTime"])] = rnd.choice([
                {"value": rnd.choice([50, 90.5, 101]), "unit": "%", "system": "http://unitsofmeasure.org",
                 "code": "%"}, {"coding": [{"system": "http://loinc.org", "code": "LA33-6"}]}, "text", True, 3,
                "2026-01-01"])
        elif choice == 9 and key not in ("resourceType",):
            node[key] = rnd.choice(SCALARS)
        elif isinstance(value, dict | list) and depth < 6:
            _mutate(value, rnd, depth + 1)
        elif isinstance(node.setdefault("referenceRange", []), list):
            node["referenceRange"].append(
                {"low": {"value": rnd.choice([60, 4.5, "7"])}, "high": {"value": rnd.choice([90, 99.5, "x"])}})
    elif isinstance(node, list) and node:
        i = rnd.randrange(len(node))
        if isinstance(node[i], dict | list):
            _mutate(node[i], rnd, depth + 1)
        elif rnd.random() < 0.5:
            node.pop(i)
        else:
            node[i] = rnd.choice(SCALARS)
    return node


def variant(resource: dict[str, Any], seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)  # reproducible test data
    mutated = copy.deepcopy(resource)
    for _ in range(rnd.randint(1, 6)):
        _mutate(mutated, rnd)
    return mutated


TYPED = [s for s in SHIPPED if BY_TYPE.get(s.resource_type)]


@pytest.mark.parametrize("shipped", TYPED, ids=_ids)
def test_shipped_expression_on_generated_variants(shipped: corpus.Shipped) -> None:
    """A sample of structurally mutated fixtures per expression, the same sample on every run (seeded by
    the expression's text)."""
    rnd = random.Random(zlib.crc32(shipped.expression.encode()))
    candidates = BY_TYPE[shipped.resource_type]
    for _ in range(EXAMPLES):
        resource, record = rnd.choice(candidates)
        same(shipped.expression, variant(resource, rnd.randrange(2**32)), environments(shipped, record)[0])


# -- what a rule author would plausibly write next -------------------------------------------------------

PLAUSIBLE = [
    ("Observation", "value.ofType(Quantity).value > 5"),
    ("Observation", "valueQuantity.value < 100 and valueQuantity.unit = '%'"),
    ("Observation", "(value as Quantity).value < referenceRange.low.value"),
    ("Observation", "value is Quantity"),
    ("Observation", "value.is(CodeableConcept)"),
    ("Observation", "(value as CodeableConcept).coding.code"),
    ("Observation", "value.ofType(string).lower().contains('positive')"),
    ("Observation", "code.coding.where(system = 'http://loinc.org').code.first()"),
    ("Observation", "code.coding.count() > 1"),
    ("Observation", "code.coding.select(system + '|' + code)"),
    ("Observation", "interpretation.coding.code.distinct()"),
    ("Observation", "effective.ofType(dateTime) > %now.toDateTime() - 1 year"),
    ("Observation", "effectiveDateTime.toDate() >= %today.toDate() - 28 days"),
    ("Observation", "effectiveDateTime >= @2025-01-01"),
    ("Observation", "effectiveDateTime < %now"),
    ("Observation", "issued.exists() implies status = 'final'"),
    ("Observation", "status = 'final' xor status = 'amended'"),
    ("Observation", "referenceRange.high.value > 100"),
    ("Observation", "referenceRange.first().high.value > 100"),
    ("Observation", "code.coding.code in ('4548-4' | '17856-6')"),
    ("Observation", "('4548-4' | '17856-6') contains code.coding.code.first()"),
    ("Observation", "code.coding.memberOf('hba1c').anyTrue()"),
    ("Observation", "code.memberOf('hba1c')"),
    ("Observation", "code.coding.where(memberOf('hba1c')).exists()"),
    ("Observation", "component.where(code.coding.code = '8480-6').value.ofType(Quantity).value >= 140"),
    ("Observation", "iif(value.exists(), value.ofType(Quantity).value, 0) > 10"),
    ("Observation", "iif(status = 'final', issued)"),  # no otherwise: empty
    ("Observation", "code.coding.select(iif($this.system = 'http://loinc.org', code, 'other:' + code))"),
    ("Observation", "category.coding.iif(code.exists(), code.first(), 'none')"),  # the focus is a collection
    ("Encounter", "iif(period.end.exists(), period.end, iif(status = 'in-progress' or status = 'arrived', %now, "
                  "period.start))"),
    ("Condition", "iif(recordedDate.exists(), recordedDate, (onset.ofType(dateTime) | onset.ofType(Period).start)"
                  ".first())"),
    ("Observation", "value.ofType(Quantity).value * 2 > 100"),
    ("Observation", "(value.ofType(Quantity).value / 2).round(1)"),
    ("Observation", "subject.reference = 'Patient/' + %patientId"),
    ("Observation", "encounter.reference.endsWith(%encounterId)"),
    ("Observation", "%resource.id"),
    ("Observation", "%context.id = id"),
    ("Observation", "note.text.matches('(?i)refus')"),
    ("Observation", "note.text.upper().startsWith('PATIENT')"),
    ("Observation", "note.text.first().length() > 10"),
    ("Observation", "note.text.first().substring(0, 5)"),
    ("Observation", "note.text.join(' ').replaceMatches('\\\\s+', ' ')"),
    ("Observation", "category.coding.code.single()"),
    ("Observation", "category.coding.last().code"),
    ("Observation", "category.coding.tail().code"),
    ("Observation", "category.coding.take(1).code | category.coding.skip(1).code"),
    ("Observation", "category.coding[0].code"),
    ("Observation", "category.all(coding.exists())"),
    ("Observation", "category.coding.code.isDistinct()"),
    ("Observation", "code.coding.code.combine(category.coding.code).count()"),
    ("Observation", "code.coding.code.intersect(category.coding.code)"),
    ("Observation", "code.coding.code.exclude('x')"),
    ("Observation", "status.toString() = 'final'"),
    ("Observation", "valueQuantity.value.toInteger()"),
    ("Observation", "valueQuantity.value.toDecimal() >= 1.5"),
    ("Observation", "valueQuantity.value.convertsToInteger()"),
    ("Observation", "valueString.toQuantity()"),
    ("Observation", "descendants().ofType(Coding).where(code = 'LA33-6').exists()"),
    ("Observation", "children().count()"),
    ("Observation", "extension('http://example.org/x').exists()"),
    ("Observation", "code.coding.where($this.code = 'x' or $this.system.empty())"),
    ("Observation", "code.coding.where(code.startsWith('4')).system.first().endsWith('loinc.org')"),
    ("Observation", "code.coding.where(system = 'http://loinc.org').exists(code = '4548-4')"),
    ("Observation", "code.coding.code ~ '4548-4'"),
    ("Observation", "code.coding.code !~ '4548-4'"),
    ("Observation", "Observation.code.coding.code"),
    ("Observation", "Patient.name"),
    ("Observation", "-valueQuantity.value.first()"),
    ("Observation", "coalesce(valueString, valueQuantity.unit, 'none')"),
    ("Observation", "code.coding.where(code = 'x').exists().not() and value.exists()"),
    ("Patient", "name.where(use = 'official').given.first().startsWith(gender)"),
    ("Patient", "name.given.first() & ' ' & name.family.first()"),
    ("Patient", "birthDate <= %today.toDate() - 18 years"),
    ("Patient", "birthDate.toDate() < @2010-06"),
    ("Patient", "birthDate = @1990-01-01"),
    ("Patient", "birthDate > '2000-01-01'"),
    ("Patient", "(%today.toDate() - 65 years) >= birthDate.toDate()"),
    ("Patient", "communication.where(preferred = true).language.coding.code.first() != 'en'"),
    ("Patient", "address.state = 'MA' or address.postalCode.startsWith('02')"),
    ("Patient", "telecom.where(system = 'phone').count() >= 1"),
    ("Patient", "gender = 'female' and deceased.exists().not()"),
    ("Patient", "deceased.ofType(boolean) = true or deceased.ofType(dateTime).exists()"),
    ("Patient", "extension.where(url.contains('race')).exists()"),
    ("Patient", "identifier.where(type.coding.code = 'MR').value.count() = 1"),
    ("Patient", "generalPractitioner.reference.startsWith('Practitioner/')"),
    ("Patient", "id = %patientId"),
    ("Patient", "iif(name.given, 'several', 'not one true')"),  # a criterion of several items is not true
    ("Patient", "id in %patientId"),
    ("Patient", "%hook = 'patient-view'"),
    ("Condition", "onset.ofType(dateTime) > %now.toDateTime() - 6 months"),
    ("Condition", "abatement.exists().not() and clinicalStatus.coding.code = 'active'"),
    ("Condition", "code.coding.where(system = 'http://hl7.org/fhir/sid/icd-10-cm' and code.startsWith('E11'))"),
    ("Condition", "recordedDate.toDate() > (%today.toDate() - 1 year)"),
    ("Condition", "verificationStatus.coding.code != 'refuted' and verificationStatus.coding.code != 'unconfirmed'"),
    ("MedicationRequest", "medication.ofType(CodeableConcept).coding.code.intersect('18867' | '1998').exists()"),
    ("MedicationRequest", "dosageInstruction.timing.repeat.frequency > 1"),
    ("MedicationRequest", "authoredOn > %now - 30 days"),
    ("Encounter", "period.start.toDate() >= %today.toDate() - 7 days"),
    ("Encounter", "class.code in ('IMP' | 'EMER' | 'ACUTE')"),
    ("Encounter", "hospitalization.dischargeDisposition.coding.code = 'home'"),
    ("Encounter", "period.end.empty() or period.end >= %now"),
    ("QuestionnaireResponse", "item.repeat(item).answer.value.ofType(Coding).code"),
    ("QuestionnaireResponse", "repeat(item).where(linkId = '1').answer.value.first()"),
    ("QuestionnaireResponse", "item.answer.value.ofType(integer).sum() >= 10"),
    ("ServiceRequest", "authoredOn.toDate() > %today.toDate() - 2 weeks"),
    ("ServiceRequest", "occurrence.ofType(Period).start.exists()"),
]


@pytest.mark.parametrize(("resource_type", "expression"), PLAUSIBLE)
def test_plausible_expression(resource_type: str, expression: str) -> None:
    candidates = BY_TYPE.get(resource_type, [])
    assert candidates, resource_type
    env = {**corpus.ENV, "patientId": "pt-x", "encounterId": "enc-x"}
    for i, (resource, _) in enumerate(candidates[:40]):
        same(expression, resource, env)
        same(expression, variant(resource, i), env)


# -- errors, quirks and the edges of the subset ------------------------------------------------------------

PEOPLE: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1974-12-25",
     "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
              {"use": "usual", "given": ["Jim"]}],
     "telecom": [{"system": "phone", "value": "p1-555", "rank": 1}, {"system": "email", "value": "x@y", "rank": 0}],
     "contact": [{"name": {"family": "Du", "given": ["Bénédicte"]}}]},
    {"resourceType": "Patient", "id": "p2", "gender": "female", "birthDate": "2026-02-20",
     "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                   "valueDateTime": "2026-02-20T08:00:00Z"}]},
     "name": [{"use": "official", "given": ["Ann", "Fem"], "family": "Ma"}],
     "telecom": [{"system": "phone", "value": "fem"}]},
]
RAISING = [
    "name.given > 'A'",  # a comparison on several items
    "name.given = name.family and name.given.count() > 'x'",  # number against string
    "(name as HumanName).given",  # `as` on several
    "name is HumanName",
    "name.given.lower()",  # a string function on several
    "%visit.id",  # unbound
    "birthDate.toDate() + 1 'mg'",
    "name.given and true",  # `and` on several
    "'abc' or false",  # not a boolean
    "-name.given",
    "name.given.substring('a')",
    "telecom.value.toDate()",
    "iif(true, name.given.lower(), 'x')",  # the branch taken raises
]


@pytest.mark.parametrize("expression", RAISING)
def test_errors_raise_alike(expression: str) -> None:
    patients = [PEOPLE[0], PEOPLE[1]]
    for resource in patients + [r for r, _ in BY_TYPE["Patient"]]:
        same(expression, resource, dict(corpus.ENV))
    fast = corpus.compiled(expression, VALUESETS)
    assert fast is not None
    assert corpus.outcome(fast, patients[0], dict(corpus.ENV))[0] == "raises"


QUIRKS = [
    # fhirpathpy evaluates a function's argument from the $this a previous `where` left behind
    "name.where(use = 'official').given.first().startsWith(gender)",
    "telecom.where(system = 'phone').value.first().startsWith(id)",
    # criteria kept by Python truthiness of their first value
    "name.where(given).given",
    "name.where(0).given",
    "telecom.where(rank).value",
    # `=` compares first items only, when the lengths match
    "name.given = name.given.first() | 'x' | 'y'",
    # `|` rebuilds nodes untyped: ofType after a union sees no type
    "(name | contact.name).ofType(HumanName).count()",
    "(name | {}).ofType(HumanName).count()",
    # primitive extensions travel with their value
    "birthDate.count()",
    "_birthDate.extension.url",
    # `length` is a member of strings
    "id.length",
    "(1 | 2).select(-$this + $this)",
    "(1 | 2 | 3).aggregate($this + $total, 0)",
    "gender.trace('g') = 'male'",
    "now() > @2000-01-01",
    "today().toString().length()",
    "%ucum",
    "%context.id",
    # where() keeps an item by a second run of its criteria, which sees the $index a nested where left
    "(1 | 2 | 3).where($index = 0 and (4 | 5).where(true).exists())",
    "name.where(given.where($index = 0).exists() and $index = 0).given",
    # fhirpathpy's parser recovers from this lexer error; so does the compiled form, from the same tree
    "name.`given",
]


@pytest.mark.parametrize("expression", QUIRKS)
def test_fhirpathpy_quirks_kept(expression: str) -> None:
    for resource in PEOPLE + [r for r, _ in BY_TYPE["Patient"]]:
        same(expression, resource, dict(corpus.ENV))


def test_primitive_extensions_and_nulls() -> None:
    resource = {"resourceType": "Patient", "id": "p", "birthDate": "1990-01-01",
                "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                              "valueDateTime": "1990-01-01T08:00:00Z"}]},
                "name": [{"given": ["A", "B"], "_given": [None, {"extension": [{"url": "u", "valueString": "v"}]}]}]}
    for expression in ("birthDate", "birthDate.toDate() < @2000", "birthDate < '2000'", "name.given",
                       "name.given.count()", "name.given = 'A'", "name.given.where($this = 'B')",
                       "name.given.select($this)", "name.given | name.given", "name.given.first().extension.url",
                       "birthDate.extension('http://hl7.org/fhir/StructureDefinition/patient-birthTime').value"):
        same(expression, resource, dict(corpus.ENV))


def test_model_state_without_is_or_as() -> None:
    """Before any `is`/`as` has run, fhirpathpy types nodes without the model: the compiled form reads
    the same global, so it agrees in that state too."""
    for shipped in SHIPPED:
        for resource, record in BY_TYPE.get(shipped.resource_type, [])[:5]:
            same(shipped.expression, resource, corpus.environment(shipped, record), state=None)


OUTSIDE = ["conformsTo('http://hl7.org/fhir/StructureDefinition/Patient')", "'<a>'.escape('html')", "1.round()",
           "memberOf(code)", "code.memberOf('no-such-value-set')", "name.given.foo()", "exists(1, 2)"]


@pytest.mark.parametrize("expression", OUTSIDE)
def test_outside_the_subset(expression: str) -> None:
    """fhirpathpy raises on each of these too: the fallback only keeps its error message."""
    assert corpus.compiled(expression, VALUESETS) is None


@pytest.mark.parametrize("expression", ["'unterminated", "\"double\".x", "name.`given"])
def test_text_fhirpathpy_cannot_read_never_reaches_either_form(expression: str) -> None:
    """Lexer errors (which fhirpathpy sometimes silently recovers from) stop at the strict parse."""
    with pytest.raises(FhirPathSyntaxError):
        compile_expression(expression, "Patient", VALUESETS)


def test_member_of_is_the_services() -> None:
    """memberOf is passed in, so both forms call the service's own function: the same answers."""
    name = next(iter(VALUESETS))
    system, code = sorted(VALUESETS[name])[0]
    member = member_of(VALUESETS)
    fast = compile_fast(corpus.tree(f"code.memberOf('{name}')"), VALUESETS, member)
    assert fast is not None
    hit = {"resourceType": "Observation", "code": {"coding": [{"system": "x", "code": code},
                                                             {"system": system, "code": code}]}}
    miss = {"resourceType": "Observation", "code": {"coding": [{"system": "x", "code": code}]}}
    assert fast(hit, {}) == [True] and fast(miss, {}) == [False]
    for resource in (hit, miss, {"resourceType": "Observation"}):
        same(f"code.memberOf('{name}')", resource, {})


def test_iif_runs_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """iif is evaluated by the compiled form itself (rules date every Encounter by it), not handed to
    fhirpathpy's macro: with that macro broken the compiled form still answers, and as fhirpathpy did."""
    from fhirpathpy.engine.invocations import invocation_registry

    def broken(*args: Any) -> Any:
        raise AssertionError("fhirpathpy's iif was called")

    monkeypatch.setitem(invocation_registry, "iif", {**invocation_registry["iif"], "fn": broken})
    fast = compile_fast(corpus.tree("iif(period.end.exists(), period.end, period.start)"), {}, member_of({}))
    assert fast is not None
    assert fast({"resourceType": "Encounter", "period": {"start": "2026-01-01"}}, {}) == ["2026-01-01"]
    assert fast({"resourceType": "Encounter", "period": {"start": "2026-01-01", "end": "2026-01-03"}}, {}) == \
        ["2026-01-03"]


def test_declines_another_fhirpathpy(monkeypatch: pytest.MonkeyPatch) -> None:
    import fhirpathpy

    monkeypatch.setattr(fhirpathpy, "__version__", "2.3.0")
    assert compile_fast(corpus.tree("status = 'active'"), {}, member_of({})) is None


def test_supported_functions_listed() -> None:
    assert {"where", "exists", "ofType", "iif", "memberOf", "matches", "toDate", "repeat", "select"} <= \
        SUPPORTED_FUNCTIONS


# -- the HL7 FHIRPath R4 suite ----------------------------------------------------------------------

def test_official_suite() -> None:
    stats = official.run()
    assert stats["disagree"] == []
    assert stats["compiled_off_only"] == []
    assert stats["cases"] >= 700
    assert stats["agree"] == stats["in_subset"] >= 690
    assert stats["compiled_expected"] == stats["fhirpathpy_expected"] >= 650


# -- primitive extensions (`_element`) ---------------------------------------------------------------

TWINNED = {
    "resourceType": "Patient", "id": "twins", "birthDate": "2026-02-20",
    "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                  "valueDateTime": "2026-02-20T10:00:00Z"}]},
    "name": [{"given": ["Ana", "Luz"], "_given": [None, {"extension": [{"url": "http://example.org/x",
                                                                         "valueString": "x"}]}]}],
    "_gender": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                               "valueCode": "asked-declined"}]},
    "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "es",
                                                "_code": {"extension": [{"url": "http://example.org/x",
                                                                         "valueString": "x"}]}}]}}],
}


@pytest.mark.parametrize(("expression", "expected"), [
    ("birthDate.toDate() = @2026-02-20", [True]),  # one item, not the value and its extensions
    ("birthDate.count()", [1]),
    ("name.given.count()", [2]),
    ("name.given.first().startsWith('An')", [True]),
    ("communication.language.coding.code = 'es'", [True]),
    ("birthDate.extension('http://hl7.org/fhir/StructureDefinition/patient-birthTime').exists()", [True]),
    ("birthDate.extension.value.ofType(dateTime).exists()", [True]),
    ("name.given.extension.url", ["http://example.org/x"]),
    ("gender.exists()", [True]),  # only extensions (data-absent-reason): an item of its own, as before
    ("gender.extension.value", ["asked-declined"]),
])
def test_a_primitive_and_its_twin_are_one_element(expression: str, expected: list[Any]) -> None:
    """US Core sends `_questionnaire`, `_birthDate` (a birth time), `coding._code`: fhirpathpy 2.2.4 made
    each twin a second item, so `birthDate.toDate()` or `.contains()` raised and the rule failed. Both
    forms now read one element, and its extensions in the twin (rules/fastpath/ops.py add_element)."""
    for fn in (corpus.reference(expression, VALUESETS), corpus.compiled(expression, VALUESETS)):
        assert fn is not None
        assert corpus.outcome(fn, copy.deepcopy(TWINNED), dict(corpus.ENV)) == ("ok", corpus.canon(expected)), \
            (expression, fn)
