"""The planned parse (nudges/planned.py) leaves out only what no rule can read: the same cards as from the
whole body for every case of the catalog and every shipped call, served as the service serves them (all
of a hook's rules at once), and the odd shapes EHRs send kept rather than judged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import ROOT

from nudges import pipeline
from nudges.clock import parse_instant
from nudges.errors import BadRequest, TooDeep
from nudges.hooks import HOOKS
from nudges.planned import parse_body
from nudges.rules.compiled import RuleSet
from nudges.rules.compiler import load_ruleset
from nudges.services import Service, Services
from nudges.tools.cases import case_request

NOW = "2026-03-02T12:00:00Z"
LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    result = load_ruleset(ROOT / "rules")
    assert result.ruleset is not None, [str(p) for p in result.problems]
    return result.ruleset


@pytest.fixture(scope="module")
def services(shipped: RuleSet) -> Services:
    return Services.build(shipped, frozenset({"active", "test", "experimental"}))


def cards(services: Services, service: Service, body: dict[str, Any], now: str) -> list[dict[str, Any]]:
    call = pipeline.parse_call(services, service.id, body)
    result = pipeline.evaluate(call, services, parse_instant(now), patient_hash="h")
    return [without_uuids(card) for card in result.cards]


def without_uuids(value: Any) -> Any:
    """Cards and suggestions get a fresh uuid on every evaluation."""
    if isinstance(value, dict):
        return {k: without_uuids(v) for k, v in value.items() if k != "uuid"}
    return [without_uuids(v) for v in value] if isinstance(value, list) else value


def both_ways(services: Services, body: dict[str, Any], now: str = NOW) -> tuple[list[Any], list[Any], int, int]:
    """Cards from the whole body and from the planned parse, and how many prefetch entries each held."""
    service = services.for_hook(body["hook"])
    planned = parse_body(orjson.dumps(body), service.index.heads)
    whole = cards(services, service, copy.deepcopy(body), now)
    return whole, cards(services, service, planned, now), entries(body), entries(planned)


def entries(body: dict[str, Any]) -> int:
    return sum(len(v.get("entry") or ()) for v in (body.get("prefetch") or {}).values() if isinstance(v, dict))


def test_every_case_of_the_catalog_gives_the_same_cards(shipped: RuleSet, services: Services) -> None:
    checked, dropped, fired = 0, 0, 0
    for _, (path, rule_cases) in sorted(shipped.cases.items()):
        for case in rule_cases.cases:
            body = case_request(case, path.parent, shipped.fixture_dirs)
            whole, planned, before, after = both_ways(services, body, case.now or rule_cases.now)
            assert planned == whole, f"{path.name}, case '{case.name}'"
            checked, dropped, fired = checked + 1, dropped + before - after, fired + bool(whole)
    assert checked > 250 and fired > 50
    assert dropped > 100, "nothing was left out: the test would not see a resource wrongly dropped"


@pytest.mark.parametrize("call", sorted(p.name for p in (ROOT / "fhir_fixtures" / "calls").glob("*.json")
                                        if not p.name.endswith((".golden.json", ".server.json"))))  # a server's data
def test_every_shipped_call_gives_the_same_cards(services: Services, call: str) -> None:
    body = orjson.loads((ROOT / "fhir_fixtures" / "calls" / call).read_bytes())
    body.pop("fhirServer", None), body.pop("fhirAuthorization", None)
    whole, planned, _, _ = both_ways(services, body)
    assert planned == whole


def observation(oid: str, code: str, system: str = LOINC, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": system, "code": code}]}, "subject": {"reference": "Patient/p"},
            "effectiveDateTime": "2026-03-02T01:00:00Z", **extra}


def kept(services: Services, *resources: Any, key: str = "observation") -> list[Any]:
    body = {"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p", "userId": "Practitioner/1"},
            "prefetch": {key: {"resourceType": "Bundle", "type": "searchset", "total": 9,
                               "entry": [{"resource": r} if isinstance(r, dict) and "fullUrl" not in r else r
                                         for r in resources]}}}
    parsed = parse_body(orjson.dumps(body), services.for_hook("patient-view").index.heads)
    bundle = parsed["prefetch"][key]
    assert bundle["total"] == 9 and bundle["type"] == "searchset"  # a Bundle's other elements stay
    return [e.get("resource", e) if isinstance(e, dict) else e for e in bundle["entry"]]


def test_what_a_rule_reads_is_kept_and_the_rest_left_out(services: Services) -> None:
    troponin = observation("t", "89579-7")  # hs-troponin I: the troponin rule's code set
    as_oid = observation("o", "89579-7", "urn:oid:2.16.840.1.113883.6.1")  # LOINC sent as its OID
    heart_rate = observation("hr", "8867-4")  # no rule of patient-view reads a heart rate
    bullying = observation("b", "11111-1", "urn:local", note=[{"text": "reports being bullied at school"}])
    coded_text = {**observation("c", "22222-2", "urn:local"), "code": {"text": "Bullying screen", "coding": []}}
    immunization = {"resourceType": "Immunization", "id": "i", "vaccineCode": {"text": "flu"}}
    patient = {"resourceType": "Patient", "id": "p"}
    got = kept(services, heart_rate, troponin, immunization, as_oid, bullying, coded_text, patient)
    assert [r["id"] for r in got] == ["t", "o", "b", "c", "p"]
    assert got[0] == troponin  # parsed in full, as orjson parses it


def test_odd_entries_are_kept_not_judged(services: Services) -> None:
    code_as_object = observation("x", "8867-4")
    code_as_object["code"]["coding"][0]["code"] = {"not": "a string"}
    null_coding = {**observation("n", "8867-4"), "code": {"coding": None}}
    no_type = {"id": "nt"}
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "processing"}]}
    concept_as_string = {**observation("s", "8867-4"), "code": "troponin"}
    got = kept(services, code_as_object, null_coding, no_type, outcome, concept_as_string, {"fullUrl": "x"}, 7)
    # kept: what cannot be judged; left out: a null coding (no code at all), a resource without a type
    assert got == [code_as_object, outcome, concept_as_string, {"fullUrl": "x"}, 7]


def test_medication_by_reference_and_included_medications_are_kept(services: Services) -> None:
    order = {"resourceType": "MedicationRequest", "id": "m", "status": "active", "intent": "order",
             "medicationReference": {"reference": "Medication/x"}, "subject": {"reference": "Patient/p"}}
    medication = {"resourceType": "Medication", "id": "x", "code": {"coding": [{"system": "r", "code": "1"}]}}
    assert kept(services, order, medication, key="medicationRequest") == [order, medication]


def test_anything_else_in_the_body_is_parsed_whole(services: Services) -> None:
    plan = services.for_hook("order-sign").index.heads
    draft = {"resourceType": "Bundle", "entry": [{"resource": observation("d", "8867-4")}]}
    body = {"hook": "order-sign", "hookInstance": "i", "fhirServer": "https://ehr.example/fhir",
            "context": {"patientId": "p", "userId": "Practitioner/1", "draftOrders": draft},
            "prefetch": {"patient": {"resourceType": "Patient", "id": "p", "name": [{"family": "F"}]},
                         "none": None, "outcome": {"resourceType": "OperationOutcome", "issue": []},
                         "odd": {"resourceType": "Bundle", "entry": {"not": "a list"}}}, "extension": {"a": 1}}
    assert parse_body(orjson.dumps(body), plan) == body
    assert parse_body(orjson.dumps({**body, "prefetch": None}), plan)["prefetch"] is None
    unknown = {**body, "surprise": 1}  # not a request's element: parsed whole, the request model names it
    assert parse_body(orjson.dumps(unknown), plan) == unknown
    for not_an_object in (b"[1, 2]", b"null", b'"x"'):
        for either in (plan, None):
            with pytest.raises(BadRequest, match="JSON object"):
                parse_body(not_an_object, either)


@pytest.mark.parametrize("bad", [
    b'"\xff\xfe"',  # not UTF-8: msgspec skips it unchecked, the parse does not
    b"[" * 5000 + b"]" * 5000,
    b'{"a": [1, 2,]}',
    b'{"a": NaN}',
])
def test_bad_json_in_an_entry_no_rule_reads_is_still_refused(services: Services, bad: bytes) -> None:
    plan = services.for_hook("patient-view").index.heads
    entry = orjson.dumps({"resource": observation("hr", "8867-4")})[:-1] + b', "junk": ' + bad + b"}"
    body = (b'{"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p", "userId": '
            b'"Practitioner/1"}, "prefetch": {"observation": {"resourceType": "Bundle", "entry": [' + entry + b"]}}}")
    with pytest.raises(BadRequest) as raised:
        parse_body(body, plan)
    assert isinstance(raised.value, TooDeep) == (b"[" * 5000 in bad)


def test_the_decision_is_the_same_on_a_parsed_resource(services: Services, shipped: RuleSet) -> None:
    """Population screening decides on whole resources (IndexPlan.reads), hook calls on heads: one
    implementation, the same answer for every resource of every case."""
    for hook in HOOKS:
        service = services.for_hook(hook)
        for _, (path, rule_cases) in shipped.cases.items():
            for case in rule_cases.cases:
                record = case_request(case, Path(path).parent, shipped.fixture_dirs)["prefetch"]["record"]
                parsed = parse_body(orjson.dumps({"hook": hook, "hookInstance": "i", "context": {},
                                                  "prefetch": {"record": record}}), service.index.heads)
                left = [orjson.dumps(e) for e in parsed["prefetch"]["record"]["entry"]]
                for entry in record["entry"]:
                    assert service.index.reads(entry["resource"]) == (orjson.dumps(entry) in left), entry


def test_an_export_line_is_decided_as_its_parsed_resource(services: Services, shipped: RuleSet) -> None:
    """Population screening's split decides on a line's raw code elements (Heads.decode_line): for every
    resource of every case, each decided twice (the second time from memory), the same answer as
    IndexPlan.reads and the same patient elements as the parsed resource; a line it declines is read the
    slow way, to the same answer."""
    decided = declined = 0
    for hook in HOOKS:
        service = services.for_hook(hook)
        heads = service.index.heads
        for _, (path, rule_cases) in shipped.cases.items():
            for case in rule_cases.cases:
                record = case_request(case, Path(path).parent, shipped.fixture_dirs)["prefetch"]["record"]
                for entry in record["entry"]:
                    resource = entry["resource"]
                    for _ in range(2):
                        found = heads.decode_line(orjson.dumps(resource))
                        if found is None:  # the split's slow way: the same answer
                            declined += 1
                            kind = resource["resourceType"]
                            assert heads.reads_json(orjson.dumps(resource), kind) == service.index.reads(resource)
                            continue
                        decided += 1
                        kind, line, hit = found
                        assert kind == resource["resourceType"] and hit == service.index.reads(resource), resource
                        for name in ("id", "subject", "patient", "beneficiary"):
                            assert getattr(line, name) == resource.get(name)
    assert decided > 1000 and declined > 10


def test_utf8_is_checked_across_parts_and_slices() -> None:
    """The check a decoder that skips needs (is_utf8): a character cut between the parts it is given or
    between its megabyte slices is still one character; a stray or cut-off byte is not UTF-8."""
    from nudges.planned import is_utf8

    assert is_utf8(b'{"a": "plain"}') and is_utf8(b"", b"")
    assert is_utf8("café".encode()[:-1], "café".encode()[-1:])  # é cut between two parts
    long = ("x" * ((1 << 20) - 1) + "é" + "日本" * 1000).encode()  # é across the first slice's end
    assert is_utf8(long) and is_utf8(long[:5], long[5:])
    assert not is_utf8(b"\xff") and not is_utf8(long + b"\xc3")  # a stray byte; a character cut off at the end
    assert not is_utf8(b'{"a": "\xed\xa0\x80"}')  # a surrogate encoded as UTF-8 (CESU): refused by orjson too


def test_an_export_line_with_a_long_note_is_decided_but_not_remembered(services: Services) -> None:
    """decode_line remembers decisions by the raw bytes of what decides them; a free-text note's bytes
    never repeat, so lines whose raw elements are long are decided every time and kept out of the memory
    (which would otherwise hold up to its bound of notes)."""
    from nudges.planned import RAW_LIMIT

    heads = services.for_hook("patient-view").index.heads
    assert "Observation" in heads.texts  # a `text:` clause reads Observations' notes
    before = len(heads._raw_seen)
    for i in range(50):
        note = {"text": f"visit {i}: " + "patient reports feeling well. " * (RAW_LIMIT // 20)}
        line = orjson.dumps({"resourceType": "Observation", "subject": {"reference": "Patient/p"}, "note": [note],
                             "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}})
        found = heads.decode_line(line)
        assert found is not None and found[2] is False
    assert len(heads._raw_seen) == before
    short = orjson.dumps({"resourceType": "Observation", "code": {"text": "Heart rate"}})
    assert heads.decode_line(short) is not None and len(heads._raw_seen) == before + 1

