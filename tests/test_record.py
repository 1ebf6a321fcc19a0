"""The per-call index: a planned index (only the code sets the rules ask for, filtered lazily) must
answer exactly what a full index answers, for well-formed and malformed data alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from nudges import engine, pipeline
from nudges.clock import parse_instant
from nudges.record import IndexPlan, PatientRecord
from nudges.rules.compiled import CompiledClause, index_plan
from nudges.rules.compiler import load_ruleset
from nudges.rules.fhirpath import call_wide
from nudges.services import Services

ROOT = Path(__file__).resolve().parent.parent
LOINC, SNOMED, RXNORM = "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm"
TROPONIN = frozenset({(LOINC, "89579-7"), (LOINC, "6598-7")})
SICKLE = frozenset({(SNOMED, "417357006")})
OPIOID = frozenset({(RXNORM, "7052")})
DISCHARGE = frozenset({("http://terminology.hl7.org/CodeSystem/discharge-disposition", "aadvice")})
KEYSETS = [("Observation", TROPONIN), ("Condition", SICKLE), ("MedicationRequest", OPIOID),
           ("Encounter", DISCHARGE)]


def obs(rid: str, *codings: Any, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "code": {"coding": list(codings)}, **extra}


def data() -> list[dict[str, Any]]:
    return [
        {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"},
        obs("t1", {"system": LOINC, "code": "89579-7"}, {"system": LOINC, "code": "6598-7"}),  # two codes, one set
        obs("t2", {"system": "http://other", "code": "89579-7"}),  # right code, wrong system
        obs("t3", {"system": LOINC, "code": "6598-7"}, status="entered-in-error"),
        obs("t1", {"system": LOINC, "code": "6598-7"}),  # same id again (a second prefetch key): first wins
        obs("t4", {"code": "89579-7"}),  # no system
        obs("t5", "not a coding", {"system": LOINC, "code": ["89579-7"]}),  # malformed, not indexed
        {"resourceType": "Observation", "id": "t6", "code": "89579-7"},  # malformed concept
        {"resourceType": "Observation", "id": "t7", "code": {"coding": {"system": LOINC, "code": "89579-7"}}},
        obs("t8", {"system": LOINC, "code": "89579-7"}),
        {"resourceType": "Condition", "id": "c1", "code": {"coding": [{"system": SNOMED, "code": "417357006"}]},
         "verificationStatus": {"coding": [{"code": "refuted"}]}},
        {"resourceType": "Condition", "id": "c2", "code": {"coding": [{"system": SNOMED, "code": "417357006"}]}},
        {"resourceType": "MedicationRequest", "id": "m1", "medicationReference": {"reference": "#med"},
         "contained": [{"resourceType": "Medication", "id": "med",
                        "code": {"coding": [{"system": RXNORM, "code": "7052"}]}}]},
        {"resourceType": "MedicationRequest", "id": "m2", "medicationReference": {"reference": "Medication/x"}},
        {"resourceType": "Encounter", "id": "e1", "type": [{"coding": [{"system": SNOMED, "code": "1"}]}],
         "hospitalization": {"dischargeDisposition": {"coding": [
             {"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "aadvice"}]}}},
        {"resourceType": "Observation"},  # no id: kept, indexed by nothing
        {"resourceType": 7, "id": "odd"},  # no usable type: ignored
    ]


def ids(resources: list[dict[str, Any]]) -> list[str | None]:
    return [r.get("id") for r in resources]


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "full"])
def test_lookups(planned: bool) -> None:
    record = PatientRecord(IndexPlan(KEYSETS) if planned else None)
    record.add_all(data())
    assert ids(record.with_codes("record", "Observation", TROPONIN)) == ["t1", "t8"]
    assert record.with_codes("record", "Observation", TROPONIN)[0]["code"]["coding"][0]["code"] == "89579-7"
    assert ids(record.with_codes("record", "Condition", SICKLE)) == ["c2"]
    assert ids(record.with_codes("record", "MedicationRequest", OPIOID)) == ["m1"]
    assert ids(record.with_codes("record", "Encounter", DISCHARGE)) == ["e1"]
    assert ids(record.of_type("record", "Observation")) == ["t1", "t2", "t4", "t5", "t6", "t7", "t8", None]
    assert ids(record.of_type("record", "Condition")) == ["c2"]
    assert record.of_type("draft", "Observation") == []
    assert record.patient is not None and record.patient["id"] == "p1"
    kinds = ("Patient", "Observation", "Condition", "MedicationRequest", "Encounter")
    assert sum(len(record.of_type("record", kind)) for kind in kinds) == 13


def test_a_second_batch_is_seen_by_later_lookups() -> None:
    record = PatientRecord(IndexPlan(KEYSETS))
    record.add_all(data()[:2])
    assert ids(record.with_codes("record", "Observation", TROPONIN)) == ["t1"]
    record.add_all([obs("t9", {"system": LOINC, "code": "6598-7"}), obs("t1", {"system": LOINC, "code": "1"})])
    assert ids(record.with_codes("record", "Observation", TROPONIN)) == ["t1", "t9"]
    record.add_all([obs("d1", {"system": LOINC, "code": "6598-7"})], "draft")
    assert ids(record.with_codes("draft", "Observation", TROPONIN)) == ["d1"]


def test_an_unplanned_lookup_is_an_error_not_an_empty_answer() -> None:
    record = PatientRecord(IndexPlan(KEYSETS))
    record.add_all(data())
    with pytest.raises(LookupError):
        record.with_codes("record", "Observation", frozenset({(LOINC, "4548-4")}))


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "full"])
def test_lacks_codes_is_a_necessary_condition_of_a_look_up(planned: bool) -> None:
    """engine.match's short cut: true only where with_codes finds nothing in every source asked."""
    record = PatientRecord(IndexPlan(KEYSETS) if planned else None)
    record.add_all(data())
    record.add_all([obs("d1", {"system": LOINC, "code": "6598-7"})], "draft")
    for sources in (("record",), ("draft",), ("record", "draft"), ("selected",)):
        for kind, keys in KEYSETS:
            found = any(record.with_codes(source, kind, keys) for source in sources)
            assert not (record.lacks_codes(sources, kind, keys) and found), (sources, kind)
    assert not record.lacks_codes(("record",), "Observation", TROPONIN)
    assert record.lacks_codes(("selected",), "Observation", TROPONIN)
    assert not record.lacks_codes(("draft",), "Observation", TROPONIN)
    assert record.lacks_codes(("draft",), "Condition", SICKLE)
    # an order naming a Medication elsewhere in the record (another prefetch key): resolved before the answer
    order = {"resourceType": "MedicationRequest", "id": "m", "medicationReference": {"reference": "Medication/o"}}
    medication = {"resourceType": "Medication", "id": "o", "code": {"coding": [{"system": RXNORM, "code": "7052"}]}}
    for named in ([], [medication]):
        referenced = PatientRecord(IndexPlan(KEYSETS) if planned else None)
        referenced.add_all([order])
        referenced.add_all(named)
        assert referenced.lacks_codes(("record",), "MedicationRequest", OPIOID) == (not named)


def test_may_say_looks_at_a_whole_type_once_and_never_hides_a_match() -> None:
    import re

    ama = re.compile(r"against (medical )?advice|\bAMA\b", re.IGNORECASE)

    def stay(rid: str, text: str) -> dict[str, Any]:
        return {"resourceType": "Encounter", "id": rid, "hospitalization": {"dischargeDisposition": {"text": text}}}

    record = PatientRecord(IndexPlan(KEYSETS, texts=[("Encounter", ama)]))
    record.add_all([stay("home", "Discharged home"), stay("snf", "Skilled nursing facility")])
    assert not record.may_say("record", "Encounter", ama)
    assert not record.may_say("record", "Condition", ama)  # no resource of the type at all
    record.add_all([stay("left", "Left against medical advice")])  # a second batch: looked at again
    assert record.may_say("record", "Encounter", ama)
    assert [r["id"] for r in record.of_type("record", "Encounter") if record.says(ama, r)] == ["left"]
    accented = PatientRecord(IndexPlan(KEYSETS, texts=[("Encounter", ama)]))
    accented.add_all([stay("fr", "Sortie contre avis médical")])  # not ASCII: never ruled out by needles
    assert accented.may_say("record", "Encounter", ama)


def calls() -> list[Path]:
    return sorted(p for p in (ROOT / "fhir_fixtures/calls").glob("*.json")
                  if not p.name.endswith((".golden.json", ".server.json")))


def test_planned_index_matches_full_index_on_every_fixture_call() -> None:
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    catalog = Services.build(ruleset, frozenset({"active"}))
    now = parse_instant("2026-03-02T12:00:00Z")
    fired = 0
    for path in calls():
        body = orjson.loads(path.read_bytes())
        call = pipeline.parse_call(catalog, f"nudges-{body['hook']}", body)
        assert call.service.index.buckets.keys() == index_plan(call.service.rules).buckets.keys()
        results = []
        for record in (pipeline.build_record(call, call.service.index), pipeline.build_record(call)):
            outcome = engine.evaluate(call.service.rules, record, now, call.context, call.service.hook)
            assert outcome.failed == []
            results.append([(m.rule.id, {k: r.get("id") for k, r in m.bindings.items()}) for m in outcome.matches])
        assert results[0] == results[1], path.name
        fired += len(results[0])
    assert fired >= len(calls())


def test_a_binding_is_the_latest_candidate_that_passes_its_condition() -> None:
    """FHIRPath runs newest first and stops at the first pass; the bound resource must be the one a full
    scan would pick (latest date, then highest id)."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]
    rule = next(r for r in service.rules if r.id == "troponin-without-cath-plan")
    now = parse_instant("2026-03-02T12:00:00Z")

    def troponin(rid: str, when: str, value: float) -> dict[str, Any]:
        return obs(rid, {"system": LOINC, "code": "89579-7"}, status="final", effectiveDateTime=when,
                   valueQuantity={"value": value, "unit": "ng/L"}, referenceRange=[{"high": {"value": 34}}])

    def bound(*resources: dict[str, Any]) -> str | None:
        record = PatientRecord(service.index)
        record.add_all(resources)
        match = engine.evaluate_rule(rule, record, now, {"now": "2026-03-02T12:00:00Z"})
        return match.bindings["troponin"]["id"] if match else None

    assert bound(troponin("a", "2026-03-01T08:00:00Z", 90), troponin("b", "2026-03-01T20:00:00Z", 10)) == "a"
    assert bound(troponin("a", "2026-03-01T08:00:00Z", 90), troponin("b", "2026-03-01T20:00:00Z", 80)) == "b"
    assert bound(troponin("b", "2026-03-01T08:00:00Z", 90), troponin("a", "2026-03-01T08:00:00Z", 80)) == "b"
    assert bound(troponin("a", "2026-03-01T08:00:00Z", 10), troponin("b", "2026-02-01T08:00:00Z", 90)) is None


def test_a_where_that_reads_only_call_wide_names_is_worked_out_once_per_resource_in_a_call() -> None:
    """The troponin rule's two clauses share one "elevated" condition (a YAML anchor): its answer for a
    result is worked out once per call and reused by the other clause (CompiledClause.settled). A condition
    that reads a name a clause binds (%first) is never shared; nothing is carried into the next call."""
    assert call_wide("%now - 3 days < effective and %patient.gender = 'female' and %context.id.exists()")
    assert not call_wide("value > %first.value") and not call_wide("'%first' = 'x' and %lab.exists()")
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]
    rule = next(r for r in service.rules if r.id == "troponin-without-cath-plan")
    first, latest = rule.all[0], rule.all[1]
    assert isinstance(first, CompiledClause) and isinstance(latest, CompiledClause)
    assert first.settled is not None and first.settled == latest.settled
    assert first.where is not latest.where  # compiled twice: shared by text, not by object
    text = first.settled
    now = parse_instant("2026-03-02T12:00:00Z")
    results = [obs(f"t{i}", {"system": LOINC, "code": "89579-7"}, status="final",
                   effectiveDateTime=f"2026-03-01T0{i}:00:00Z", valueQuantity={"value": value, "unit": "ng/L"},
                   referenceRange=[{"high": {"value": 34}}]) for i, value in enumerate((10, 90, 10))]
    record = PatientRecord(service.index)
    record.add_all(results)
    outcome = engine.evaluate((rule,), record, now, {"patientId": "p1"}, "patient-view")
    assert [(m.bindings["first"]["id"], m.bindings["troponin"]["id"]) for m in outcome.matches] == [("t1", "t1")]
    # first (earliest on): t0 no, t1 yes; troponin (latest on): t2 no, t1 from the first clause's answer
    assert {k: v for k, v in record.settled.items() if k[0] == "where"} == {
        ("where", text, id(results[0])): False, ("where", text, id(results[1])): True,
        ("where", text, id(results[2])): False}
    env = {"now": "2026-03-02T12:00:00Z", "patientId": "p1"}
    record.settled[("where", text, id(results[1]))] = False  # a recorded answer is what the clause goes by
    assert engine.evaluate_rule(rule, record, now, env) is None
    again = engine.evaluate((rule,), record, now, {"patientId": "p1"}, "patient-view")
    assert len(again.matches) == 1  # a new call works it out again


def test_a_date_that_reads_only_call_wide_names_is_worked_out_once_per_resource_in_a_call() -> None:
    """An Encounter is dated by its departure in three rules' clauses, and each clause dates a candidate
    twice (its window, then its order): the answer is worked out once per resource per call and shared
    (CompiledClause.dated); a recorded date is what the window goes by; a new call starts afresh."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]
    rule = next(r for r in service.rules if r.id == "trust-prior-ama-discharge")
    clause = next(c for c in rule.clauses() if c.bind == "left_stay")
    assert clause.date is not None and clause.dated == "iif(period.end.exists(), period.end, period.start)"
    sharing = [c for r in service.rules for c in r.clauses() if c.dated == clause.dated]
    assert len({id(c) for c in sharing}) >= 2  # compiled per clause, shared by text
    now = parse_instant("2026-03-02T12:00:00Z")
    stay = {"resourceType": "Encounter", "id": "e1", "status": "finished",
            "period": {"start": "2025-02-01T00:00:00Z", "end": "2025-04-01T00:00:00Z"},  # left within the year
            "hospitalization": {"dischargeDisposition": {"coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "aadvice"}]}}}
    record = PatientRecord(service.index)
    record.add_all([{"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"}, stay])
    calls: list[str] = []
    original = clause.date

    def counted(resource: dict[str, Any], env: dict[str, Any]) -> list[Any]:
        calls.append(resource["id"])
        return original(resource, env)

    object.__setattr__(clause, "date", counted)
    try:
        outcome = engine.evaluate((rule,), record, now, {"patientId": "p1"}, "patient-view")
        assert [m.rule.id for m in outcome.matches] == [rule.id] and calls == ["e1"]  # window and order: once
        assert {k: v for k, v in record.settled.items() if k[0] == "date"} == {
            ("date", clause.dated, id(stay)): parse_instant("2025-04-01T00:00:00Z")}
        record.settled[("date", clause.dated, id(stay))] = parse_instant("2024-01-01T00:00:00Z")  # the window reads it
        env = {"now": "2026-03-02T12:00:00Z", "patientId": "p1"}
        assert engine.evaluate_rule(rule, record, now, env) is None
        assert len(engine.evaluate((rule,), record, now, {"patientId": "p1"}, "patient-view").matches) == 1
        assert calls == ["e1", "e1"]  # the new call worked it out again
    finally:
        object.__setattr__(clause, "date", original)


def test_a_text_clause_with_a_fhirpath_date_dates_only_what_its_words_or_codes_find() -> None:
    """Searching a resource's words (behind the prefilter) is cheaper than a FHIRPath date, so a `text:`
    clause dated by one searches first and dates only what it found: the routine visit is never dated,
    and the card is the same."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    service = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"]
    rule = next(r for r in service.rules if r.id == "trust-prior-ama-discharge")
    clause = next(c for c in rule.clauses() if c.bind == "left_stay")
    assert clause.text is not None and clause.date is not None

    def stay(rid: str, disposition: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Encounter", "id": rid, "status": "finished",
                "period": {"start": "2025-12-01T00:00:00Z", "end": "2025-12-03T00:00:00Z"},
                "hospitalization": {"dischargeDisposition": disposition}}

    record = PatientRecord(service.index)
    record.add_all([{"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"},
                    stay("routine", {"text": "Discharged home"}), stay("worded", {"text": "Left AMA"})])
    calls: list[str] = []
    original = clause.date
    object.__setattr__(clause, "date", lambda resource, env: calls.append(resource["id"]) or original(resource, env))
    try:
        outcome = engine.evaluate((rule,), record, parse_instant("2026-03-02T12:00:00Z"), {"patientId": "p1"},
                                  "patient-view")
    finally:
        object.__setattr__(clause, "date", original)
    assert [m.bindings["left_stay"]["id"] for m in outcome.matches] == ["worded"]
    assert calls == ["worded"]


@pytest.mark.parametrize("value", [
    None,
    {"resourceType": "OperationOutcome", "issue": []},
    {"resourceType": "Patient", "id": "p"},
    {"resourceType": "Bundle", "entry": [{"resource": r} for r in data()[1:10]]},  # one type: the fast path
    {"resourceType": "Bundle", "entry": [{"resource": r} for r in data()]},  # mixed types, odd ones
    {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "OperationOutcome"}}]},
    {"resourceType": "Bundle", "entry": [{"resource": data()[1]}, {"search": {"mode": "outcome"}}, "x", None]},
    {"resourceType": "Bundle", "entry": [{"resource": [1]}, {"resource": {"resourceType": ["Observation"]}}]},
    {"resourceType": "Bundle", "entry": "not a list"},
    {"resourceType": "Bundle"},
], ids=lambda v: str(v)[:40])
def test_a_prefetch_value_is_read_like_its_flattened_resources(value: Any) -> None:
    from nudges.fhir import flatten

    whole, flat = PatientRecord(IndexPlan(KEYSETS)), PatientRecord(IndexPlan(KEYSETS))
    whole.add_value(value)
    flat.add_all(flatten(value))
    for kind in ("Observation", "Patient", "Condition", "OperationOutcome"):
        assert whole.of_type("record", kind) == flat.of_type("record", kind)
    assert whole.with_codes("record", "Observation", TROPONIN) == flat.with_codes("record", "Observation", TROPONIN)


@pytest.mark.parametrize("planned", [True, False])
def test_what_is_about_another_patient_is_set_aside(planned: bool) -> None:
    """A prefetch search that lost its patient filter, or a merged chart: another patient's troponin must
    not raise this patient's card, nor another Patient give this one an age. What names no Patient (a
    contained or urn:uuid subject, none at all) is kept, not judged."""
    code = {"system": LOINC, "code": "89579-7"}
    resources = [
        {"resourceType": "Patient", "id": "someone-else", "birthDate": "1940-01-01"},
        {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"},
        obs("mine", code, subject={"reference": "Patient/p1"}),
        obs("absolute", code, subject={"reference": "https://ehr.example.org/fhir/Patient/p1/_history/2"}),
        obs("theirs", code, subject={"reference": "Patient/someone-else"}),
        obs("theirs-absolute", code, subject={"reference": "https://ehr.example.org/fhir/Patient/p2"}),
        obs("unnamed", code, subject={"reference": "urn:uuid:0f4c"}),
        obs("nobody", code),
    ]
    plan = IndexPlan(KEYSETS) if planned else None
    record = PatientRecord(plan, "Patient/p1")  # context.patientId, with or without "Patient/"
    record.add_all(resources)
    assert [r["id"] for r in record.with_codes("record", "Observation", TROPONIN)] == [
        "mine", "absolute", "unnamed", "nobody"]
    assert record.patient is not None and record.patient["id"] == "p1"
    reasons = dict((r["id"], why) for r, why in record.set_aside("record", "Observation"))
    assert reasons == {"theirs": "about another patient (Patient/someone-else, not the call's Patient/p1)",
                       "theirs-absolute": "about another patient (Patient/p2, not the call's Patient/p1)"}
    unknown = PatientRecord(plan)  # no patient known (a tool's record): nothing judged
    unknown.add_all(resources)
    assert len(unknown.with_codes("record", "Observation", TROPONIN)) == 6


def test_a_call_does_not_read_another_patients_data() -> None:
    """Through the pipeline, as a hook call: the troponin of the patient in the next bed gives no card."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    services = Services.build(ruleset, frozenset({"active"}))
    now = parse_instant("2026-03-02T12:00:00Z")

    def cards(subject: str) -> list[str]:
        troponin = {"resourceType": "Observation", "id": "t1", "status": "final",
                    "code": {"coding": [{"system": LOINC, "code": "89579-7"}]}, "subject": {"reference": subject},
                    "effectiveDateTime": "2026-03-01T22:00:00Z", "valueQuantity": {"value": 212, "unit": "ng/L"},
                    "referenceRange": [{"high": {"value": 34, "unit": "ng/L"}}]}
        body = {"hook": "patient-view", "hookInstance": "d1c1a5b0-8a3e-4c47-9d7e-1f2a3b4c5d6e",
                "context": {"userId": "Practitioner/1", "patientId": "p1"},
                "prefetch": {key: {"resourceType": "Bundle", "type": "searchset", "entry": []}
                             for key in services.by_id["nudges-patient-view"].plan.templates}}
        body["prefetch"]["patient"] = {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"}
        body["prefetch"]["observation"] = {"resourceType": "Bundle", "type": "searchset",
                                           "entry": [{"resource": troponin}]}
        call = pipeline.parse_call(services, "nudges-patient-view", body)
        result = pipeline.evaluate(call, services, now, patient_hash="h")
        return [i.rule_id for i in result.issued]

    assert "troponin-without-cath-plan" in cards("Patient/p1")
    assert "troponin-without-cath-plan" not in cards("Patient/p2")
