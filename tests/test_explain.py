"""`nudges explain`: the engine's own trace of why each rule fired or not, clause by clause."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import bundle, full_prefetch, patient, patient_view, troponin

from nudges import engine, pipeline
from nudges.cli import main
from nudges.clock import parse_instant
from nudges.rules.compiled import RuleSet
from nudges.rules.compiler import load_ruleset
from nudges.services import Services
from nudges.settings import Settings
from nudges.tools.cases import case_result
from nudges.tools.comparisons import comparisons, where_values
from nudges.tools.explain import Explanation, Recorder, explain, explain_case
from nudges.tools.replay import summarize

ROOT = Path(__file__).resolve().parent.parent
NOW = parse_instant("2026-03-02T12:00:00Z")
TROPONIN = "troponin-without-cath-plan"
CATH = {"resourceType": "ServiceRequest", "id": "cath-1", "status": "active", "intent": "order",
        "subject": {"reference": "Patient/pt-1"}, "authoredOn": "2026-03-02T01:00:00Z",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "41976001"}]}}
# The contract with the console (README, nudges/tools/explain.py): these keys, these types, at least.
STEP_TYPES: dict[str, Any] = {
    "where": str, "kind": str, "mode": (str, type(None)), "resource": (str, type(None)),
    "codes": (str, type(None)), "text": (str, type(None)), "candidates": (int, type(None)),
    "in_window": (int, type(None)), "passed": (int, type(None)), "chosen": (str, type(None)), "held": bool,
    "notes": list, "steps": list}
RULE_TYPES: dict[str, Any] = {"rule": str, "title": str, "fired": bool, "error": (str, type(None)), "reason": str,
                              "steps": list}


@pytest.fixture(scope="module")
def test_rules() -> RuleSet:
    ruleset = load_ruleset(ROOT / "tests" / "rules").ruleset
    assert ruleset is not None
    return ruleset


@pytest.fixture(scope="module")
def services(test_rules: RuleSet) -> Services:
    return Services.build(test_rules, frozenset({"active"}))


def check_shape(data: dict[str, Any]) -> None:
    assert isinstance(data["hook"], str) and isinstance(data["service"], str) and isinstance(data["cards"], list)
    assert data["now"].endswith("Z")
    for rule in data["rules"]:
        for key, kind in RULE_TYPES.items():
            assert isinstance(rule[key], kind), (rule["rule"], key)
        stack = list(rule["steps"])
        while stack:
            step = stack.pop()
            for key, kind in STEP_TYPES.items():
                assert isinstance(step[key], kind), (rule["rule"], step["where"], key)
            assert step["kind"] in ("clause", "group", "age", "patient")
            assert step["where"].startswith("when.")
            stack += step["steps"]
    orjson.dumps(data)  # JSON-able as it is


def rule_of(explanation: Explanation, rule_id: str = TROPONIN) -> dict[str, Any]:
    return next(r for r in explanation.to_dict()["rules"] if r["rule"] == rule_id)


def steps_by_where(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found, stack = {}, list(rule["steps"])
    while stack:
        step = stack.pop()
        found[step["where"]] = step
        stack += step["steps"]
    return found


def test_a_firing_call_names_candidates_window_fhirpath_and_binding(services: Services) -> None:
    old = troponin("trop-old", when="2026-02-26T08:00:00Z")  # 100 h ago: outside `within: 72h`
    low = troponin("trop-low", value=20, when="2026-03-01T20:00:00Z")  # in the window, below its range
    body = patient_view("pt-1", old, low, troponin("trop-1"))
    explanation = explain(services, body, NOW)
    check_shape(explanation.to_dict())
    rule = rule_of(explanation)
    assert rule["fired"] and rule["error"] is None and rule["reason"].startswith("fired")
    assert rule["bindings"]["troponin"] == {"reference": "Observation/trop-1", "date": "2026-03-01T22:00:00Z"}
    assert rule["card"] is not None and rule["card"] in explanation.cards
    step = steps_by_where(rule)["when.all[0]"]
    assert (step["kind"], step["under"], step["resource"]) == ("clause", "all", "Observation")
    assert step["codes"] == "troponin" and step["as"] == "troponin"
    assert (step["candidates"], step["in_window"], step["passed"], step["chosen"]) == (3, 2, 1, "Observation/trop-1")
    assert "excluded Observation/trop-old: older than 72h (dated 2026-02-26T08:00:00Z)" in step["notes"]
    assert "excluded Observation/trop-low: `where` did not hold ((value as Quantity).value = [20]; " \
           "referenceRange.high.value = [34])" in step["notes"]  # the values it compared
    absent = steps_by_where(rule)["when.none[0]"]
    assert (absent["held"], absent["candidates"], absent["since"]) == (False, 0, "troponin")


def test_where_values_name_each_compared_side() -> None:
    expression = ("(value as Quantity).value > referenceRange.high.value or status = 'final' and "
                  "code.coding.where(code = 'x').exists() and (value as Quantity) >= 10 'mg'")
    assert comparisons(expression) == [("(value as Quantity).value", ">", "referenceRange.high.value"),
                                       ("status", "=", "'final'"), ("(value as Quantity)", ">=", "10 'mg'")]
    resource = {"resourceType": "Observation", "status": "preliminary", "valueQuantity": {"value": 20}}
    assert where_values(expression, resource, {}) == (
        '(value as Quantity).value = [20]; referenceRange.high.value = []; status = ["preliminary"]; '
        '(value as Quantity) = [{"value":20}]')
    assert where_values("code.memberOf('troponin')", resource, {}) == ""  # nothing compared at the top
    assert where_values(None, resource, {}) == ""


def test_an_absence_that_matches_blocks_the_rule_and_the_rest_is_not_evaluated(services: Services) -> None:
    explanation = explain(services, patient_view("pt-1", troponin("trop-1"), CATH), NOW)
    rule = rule_of(explanation)
    assert not rule["fired"] and explanation.cards == []
    assert rule["reason"].startswith("when.none[0]: ServiceRequest/cath-1 matches")
    assert rule["reason"].endswith("so the rule is blocked")
    steps = steps_by_where(rule)
    assert steps["when.none[0]"]["held"] and steps["when.none[0]"]["chosen"] == "ServiceRequest/cath-1"
    assert not steps["when.none[1]"]["evaluated"] and not steps["when.none[1]"]["held"]
    assert steps["when.none[1]"]["notes"] == ["not evaluated: an earlier item matched"]


def test_a_failed_clause_says_what_stopped_it(services: Services) -> None:
    recent = troponin("trop-new", when="2026-03-02T10:00:00Z")  # 2 h ago: not yet `older_than: 12h`
    rule = rule_of(explain(services, patient_view("pt-1", recent), NOW))
    assert not rule["fired"]
    assert rule["reason"].startswith("when.all[0]: 1 Observation in troponin, none in the time window")
    assert "more recent than 12h" in rule["reason"]
    assert all(not s["evaluated"] for s in rule["steps"] if s["under"] == "none")


def test_records_set_aside_and_codes_under_another_system(services: Services) -> None:
    voided = {**troponin("trop-void"), "status": "entered-in-error"}
    wrong = troponin("trop-wrong")
    wrong["code"] = {"coding": [{"system": "loinc.org", "code": "89579-7", "display": "Troponin I"}]}
    step = steps_by_where(rule_of(explain(services, patient_view("pt-1", voided, wrong), NOW)))["when.all[0]"]
    assert step["candidates"] == 0 and not step["held"]
    assert "set aside Observation/trop-void: entered in error or refuted" in step["notes"]
    assert any("trop-wrong has code 89579-7 under system 'loinc.org'" in n and "http://loinc.org" in n
               for n in step["notes"])


def test_rules_not_served_say_why(services: Services) -> None:
    explanation = explain(services, patient_view("pt-1"), NOW, rule_ids={"professional-interpreter", "troponin"})
    by_id = {r["rule"]: r for r in explanation.to_dict()["rules"]}
    assert set(by_id) == {"professional-interpreter", "troponin"}
    assert not by_id["professional-interpreter"]["served"]
    assert "its hooks are appointment-book, encounter-start" in by_id["professional-interpreter"]["reason"]
    assert "no rule 'troponin'" in by_id["troponin"]["reason"] and "did you mean" in by_id["troponin"]["reason"]


def test_a_rule_that_raises_is_reported_with_its_error(services: Services) -> None:
    service = services.for_hook("patient-view")
    rule = next(r for r in service.rules if r.id == TROPONIN)

    def broken(resource: Any, env: dict[str, Any]) -> list[Any]:
        raise ZeroDivisionError("division by zero")

    clause = dataclasses.replace(rule.all[0], where=broken)  # type: ignore[arg-type]
    bad = dataclasses.replace(rule, all=(clause,))
    call = pipeline.parse_call(services, service.id, patient_view("pt-1", troponin("trop-1")))
    record = pipeline.build_record(call, service.index)
    recorder = Recorder()
    outcome = engine.evaluate((bad,), record, NOW, call.context, "patient-view", recorder)
    assert outcome.failed == [TROPONIN]
    trace = recorder.traces[TROPONIN].to_dict()
    assert trace["error"] == "ZeroDivisionError: division by zero" and not trace["fired"]
    assert "raised ZeroDivisionError" in trace["reason"]
    # what the broken rule had set aside when it raised is not the next rule's
    old = troponin("trop-old", when="2020-01-01T00:00:00Z")  # out of the window: a drop of the clause
    call = pipeline.parse_call(services, service.id, patient_view("pt-1", troponin("trop-1"), old))
    record = pipeline.build_record(call, service.index)
    engine.evaluate((bad, dataclasses.replace(rule, id="after")), record, NOW, call.context, "patient-view",
                    recorder)
    after = recorder.traces["after"].to_dict()["steps"][0]
    assert after["candidates"] == 2 and after["chosen"] == "Observation/trop-1", after


def test_no_rule_fires_for_a_deceased_patient_and_explain_says_why(services: Services) -> None:
    prefetch = full_prefetch("patient-view", patient("pt-1", deceasedDateTime="2026-02-27T08:00:00Z"),
                             troponin("trop-1"))
    explanation = explain(services, patient_view("pt-1", prefetch=prefetch), NOW)
    rules = explanation.to_dict()["rules"]
    assert rules and not any(r["fired"] for r in rules)
    assert all("Patient/pt-1 has died (2026-02-27T08:00:00Z): no nudge is raised for a deceased patient"
               in r["reason"] for r in rules if r["served"]), rules


def test_nested_groups_have_their_paths_and_modes(rules_dir: Path) -> None:
    path = rules_dir / "cardiology" / f"{TROPONIN}.yaml"
    text = path.read_text()
    flat = "  none:\n    - resource: ServiceRequest\n"
    assert flat in text
    path.write_text(text.replace(flat, "    - any:\n        - {resource: Condition, text: chest pain}\n"
                                       "        - {as: visit, resource: Encounter, text: chest pain}\n" + flat))
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    pain = {"resourceType": "Encounter", "id": "enc-1", "status": "in-progress", "class": {"code": "EMER"},
            "reasonCode": [{"text": "Chest pain"}], "period": {"start": "2026-03-02T09:00:00Z"}}
    services = Services.build(ruleset, frozenset({"active"}))
    prefetch: dict[str, Any] = dict.fromkeys(services.for_hook("patient-view").plan.templates)
    prefetch.update(patient=patient("pt-1"), observation=bundle(troponin("trop-1")), encounter=bundle(pain))
    explanation = explain(services, patient_view("pt-1", prefetch=prefetch), NOW)
    rule = rule_of(explanation)
    check_shape(explanation.to_dict())
    group = steps_by_where(rule)["when.all[1]"]
    assert (group["kind"], group["mode"], group["held"]) == ("group", "any", True)
    assert [s["where"] for s in group["steps"]] == ["when.all[1].any[0]", "when.all[1].any[1]"]
    assert [s["held"] for s in group["steps"]] == [False, True]
    assert group["steps"][1]["chosen"] == "Encounter/enc-1" and rule["fired"]
    assert rule["bindings"]["visit"]["reference"] == "Encounter/enc-1"


def test_every_case_traced_gives_the_same_cards_as_untraced() -> None:
    """The tracer only listens: every shipped and test case has the same outcome with and without it."""
    checked = 0
    for directory in (ROOT / "rules", ROOT / "tests" / "rules"):
        ruleset = load_ruleset(directory).ruleset
        assert ruleset is not None
        for rule in ruleset.rules:
            path, cases = ruleset.cases[rule.id]
            for case in cases.cases:
                plain = case_result(rule, ruleset, case, path.parent, cases.now)
                recorder = Recorder()
                traced = case_result(rule, ruleset, case, path.parent, cases.now, trace=recorder)
                assert summarize(plain) == summarize(traced), case.name
                assert recorder.traces[rule.id].fired == bool(plain.cards), case.name
                checked += 1
    assert checked > 50


def test_a_case_is_explained_as_nudges_test_runs_it(test_rules: RuleSet) -> None:
    path, cases = test_rules.cases[TROPONIN]
    rule = next(r for r in test_rules.rules if r.id == TROPONIN)
    case = next(c for c in cases.cases if "catheterization ordered" in c.name)
    explanation = explain_case(test_rules, rule, case, path.parent, cases.now)
    check_shape(explanation.to_dict())
    assert [r["rule"] for r in explanation.to_dict()["rules"]] == [TROPONIN]
    assert "ServiceRequest/cath-1" in rule_of(explanation)["reason"]


def test_cli_explains_a_call_as_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    call = tmp_path / "call.json"
    call.write_bytes(orjson.dumps(patient_view("pt-1", troponin("trop-1"))))
    rules = str(ROOT / "tests" / "rules")
    assert main(["explain", str(call), "--rules", rules, "--now", "2026-03-02T12:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert f"{TROPONIN}: FIRED" in out and "✓ when.all[0] Observation in troponin as troponin" in out
    assert main(["explain", str(call), "--rules", rules, "--now", "2026-03-02T12:00:00Z", "--json",
                 "--rule", TROPONIN]) == 0
    data = orjson.loads(capsys.readouterr().out)
    check_shape(data)
    assert [r["rule"] for r in data["rules"]] == [TROPONIN] and data["now"] == "2026-03-02T12:00:00Z"


def test_cli_takes_the_clock_from_the_golden_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUDGES_NOW", raising=False)
    call = tmp_path / "call.json"
    call.write_bytes(orjson.dumps(patient_view("pt-1", troponin("trop-1"))))
    rules = str(ROOT / "tests" / "rules")
    assert main(["explain", str(call), "--rules", rules]) == 1
    assert "no clock" in capsys.readouterr().err
    (tmp_path / "call.golden.json").write_text('{"now": "2026-03-02T12:00:00Z", "cards": []}')
    assert main(["explain", str(call), "--rules", rules, "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["now"] == "2026-03-02T12:00:00Z"


def test_cli_explains_one_case_or_lists_them(capsys: pytest.CaptureFixture[str]) -> None:
    cases = str(ROOT / "tests" / "rules" / "cardiology" / f"{TROPONIN}.cases.yaml")
    assert main(["explain", cases, "--case", "2 h old", "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    check_shape(data)
    assert data["case"] == "near miss - result only 2 h old, still inside the window" and data["outcome"] == "tn"
    assert main(["explain", cases, "--case", "near miss"]) == 1
    err = capsys.readouterr().err
    assert "matches several cases" in err and "near miss - value within this assay's reference range" in err
    assert main(["explain", cases]) == 0
    out = capsys.readouterr().out
    assert out.count("case '") == 4 and "(expects a card): tp" in out


def test_explain_needs_no_settings_file(services: Services) -> None:
    explanation = explain(services, patient_view("pt-1", patient("pt-1")), NOW, Settings())
    assert {r["rule"] for r in explanation.to_dict()["rules"]} == {
        r.id for r in services.for_hook("patient-view").rules}


def test_cli_brief_is_one_line_per_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    call = tmp_path / "call.json"
    call.write_bytes(orjson.dumps(patient_view("pt-1", troponin("trop-1"), CATH)))
    assert main(["explain", str(call), "--rules", str(ROOT / "tests" / "rules"), "--now", "2026-03-02T12:00:00Z",
                 "--brief"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = [line for line in lines if line.startswith(f"{TROPONIN}: ")]
    assert len(ours) == 1 and ours[0].startswith(f"{TROPONIN}: not fired: when.none[0]: ServiceRequest/cath-1")
    assert not any("✓" in line or "✗" in line for line in lines)


def test_the_values_compared_inside_parenthesised_groups_are_shown() -> None:
    """An 8.9 % HbA1c excluded by `status != 'cancelled' and ((unit = '%' and value > 9) or ...)` was
    explained by `status = ["final"]` alone, the one comparison at the top level, which held."""


    where = ("status != 'cancelled' and (((value as Quantity).code = '%' and (value as Quantity).value > 9) "
             "or ((value as Quantity).code = 'mmol/mol' and (value as Quantity).value > 75))")
    assert [c[0] for c in comparisons(where)] == ["status", "(value as Quantity).code", "(value as Quantity).value",
                                                  "(value as Quantity).code", "(value as Quantity).value"]
    assert comparisons("(a = 1) or (b = 2)") == [("a", "=", "1"), ("b", "=", "2")]
    a1c = {"resourceType": "Observation", "status": "final", "code": {"text": "HbA1c"},
           "valueQuantity": {"value": 8.9, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}
    shown = where_values(where, a1c, {})
    assert 'status = ["final"]' in shown and '(value as Quantity).value = ["8.9"]' in shown, shown


def test_an_order_whose_medication_the_call_does_not_hold_is_named() -> None:
    """A MedicationRequest naming `Medication/met500`, which the call did not include, showed "0
    candidates" and nothing more: its codes cannot be read, and explain now says so and what to prefetch."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    services = Services.build(ruleset, frozenset({"active"}))
    order = {"resourceType": "MedicationRequest", "id": "mr-1", "status": "active", "intent": "order",
             "subject": {"reference": "Patient/pt-1"}, "authoredOn": "2026-02-01",
             "medicationReference": {"reference": "Medication/met500"}}
    prefetch: dict[str, Any] = {key: None for key in services.for_hook("order-sign").plan.templates}
    prefetch["patient"] = {"resourceType": "Patient", "id": "pt-1"}
    prefetch["medicationRequest"] = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": order}]}
    body = {"hook": "order-sign", "hookInstance": "h-1", "prefetch": prefetch, "context": {
        "userId": "Practitioner/dr-1", "patientId": "pt-1",
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": []}}}
    explanation = explain(services, body, NOW, rule_ids={"guideline-drug-deescalated-after-coverage-change"})
    rule = rule_of(explanation, "guideline-drug-deescalated-after-coverage-change")
    notes = [n for step in steps_by_where(rule).values() for n in step["notes"]]
    named = "MedicationRequest/mr-1 names its medication by reference (Medication/met500)"
    assert any(named in n for n in notes), notes


def test_an_excluded_resource_names_the_part_of_its_where_that_was_not_true() -> None:
    """A `where` of `and` parts is explained by the first part that is not true on the resource: a
    negative Hunger Vital Sign questionnaire had been explained by `status = ["completed"]`, the one
    comparison at the top level, which held."""
    from nudges.tools.comparisons import failing_part

    where = "status = 'final' and (value as Quantity).value > 10 and code.exists()"
    low = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 5}}
    assert failing_part(where, low, {}) == "(value as Quantity).value > 10"
    assert failing_part(where, {**low, "status": "preliminary"}, {}) == "status = 'final'"
    assert failing_part(where, {**low, "valueQuantity": {"value": 50}}, {}) is None  # it held
    assert failing_part("status = 'final' or code.exists()", low, {}) is None  # `or`: no one part to blame
    assert failing_part("%troponin.exists() and status = 'final'", low, {}) is None  # needs its context

    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    rule = next(r for r in ruleset.rules if r.id == "food-insecurity-referral")
    path, cases = ruleset.cases[rule.id]
    case = next(c for c in cases.cases if "answered 'Never true' to both" in c.name)
    step = steps_by_where(rule_of(explain_case(ruleset, rule, case, path.parent, cases.now),
                                  "food-insecurity-referral"))["when.any[1]"]
    note = next(n for n in step["notes"] if "hvs-qr-neg" in n)
    head = "excluded QuestionnaireResponse/hvs-qr-neg: `where` did not hold: `((questionnaire.lower()"
    assert note.startswith(head), note
    assert "was not true" in note and 'status = ["completed"]' not in note, note


def test_a_type_read_when_sent_says_so_when_it_was_not(capsys: pytest.CaptureFixture[str]) -> None:
    """colorectal's dementia-medication clause has `required: false`: a record without medication orders is
    explained as not sent, not merely empty, so an informaticist knows the EHR may not have sent them."""
    cases = str(ROOT / "rules" / "navigation" / "colorectal-screening-navigation.cases.yaml")
    assert main(["explain", cases, "--case", "wheelchair-dependent, without an advanced illness"]) == 0
    out = capsys.readouterr().out
    line = next(text for text in out.splitlines() if "no MedicationRequest in the record" in text)
    assert "required: false" in line and "answered without it" in line
    procedures = [text for text in out.splitlines() if "no Procedure in the record" in text]
    assert procedures and not any("required: false" in text for text in procedures)  # a type it demands
