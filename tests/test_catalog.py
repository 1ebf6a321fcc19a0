"""The shipped catalog: lint and cases pass, every seed scenario's call gives the same cards whatever
the patient's race, and the README's catalog table is generated from the rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from nudges.clock import parse_instant
from nudges.demographics import US_CORE_ETHNICITY, US_CORE_RACE
from nudges.hooks import HOOK_NAMES
from nudges.pipeline import run_body
from nudges.rules.compiled import RuleSet
from nudges.rules.compiler import load_ruleset
from nudges.services import Services
from nudges.settings import Settings
from nudges.tools.cases import run_all
from nudges.tools.catalogdoc import BEGIN, END, catalog_markdown, label
from nudges.tools.replay import summarize

ROOT = Path(__file__).resolve().parent.parent
CALLS = sorted(p for p in (ROOT / "fhir_fixtures/calls").glob("*.json")
               if not p.name.endswith((".golden.json", ".server.json")))
RACES = [None, ("2054-5", "Black or African American"), ("2106-3", "White"), ("2028-9", "Asian"),
         ("1002-5", "American Indian or Alaska Native")]


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    result = load_ruleset(ROOT / "rules")
    assert result.ruleset is not None, [str(p) for p in result.problems]
    return result.ruleset


@pytest.fixture(scope="module")
def catalog(shipped: RuleSet) -> Services:
    return Services.build(shipped, frozenset({"active"}))


def test_shipped_rules_cases_pass(shipped: RuleSet) -> None:
    reports = run_all(shipped)
    assert [r.rule for r in reports if not r.ok] == []
    active = [r for r in shipped.rules if r.status == "active"]
    assert len(active) >= 16
    for report in reports:
        assert report.count("tp") >= 1 and report.count("tn") >= 1, report.rule


def with_race(body: dict[str, Any], race: tuple[str, str] | None) -> dict[str, Any]:
    body = copy.deepcopy(body)
    patient = (body.get("prefetch") or {}).get("patient")
    if not isinstance(patient, dict):
        return body
    patient["extension"] = [e for e in patient.get("extension", []) if e.get("url") not in
                            (US_CORE_RACE, US_CORE_ETHNICITY)]
    if race:
        patient["extension"].append({"url": US_CORE_RACE, "extension": [
            {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race[0],
                                                   "display": race[1]}},
            {"url": "text", "valueString": race[1]}]})
    return body


@pytest.mark.parametrize("call", CALLS, ids=[p.stem for p in CALLS])
def test_same_cards_whatever_the_race(catalog: Services, call: Path) -> None:
    body = orjson.loads(call.read_bytes())
    now = parse_instant(orjson.loads(call.with_suffix(".golden.json").read_bytes())["now"])
    outcomes = [summarize(run_body(catalog, Settings(), with_race(body, race), now)) for race in RACES]
    assert outcomes[0], f"{call.name} should produce at least one card"
    assert all(outcome == outcomes[0] for outcome in outcomes)


def test_every_hook_fires_in_a_replayed_call(shipped: RuleSet) -> None:
    """Each of the six services raises at least one card on some shipped call: no hook goes untested."""
    services = Services.build(shipped, frozenset({"active"}))
    fired: set[str] = set()
    for call in CALLS:
        body = orjson.loads(call.read_bytes())
        now = parse_instant(orjson.loads(call.with_suffix(".golden.json").read_bytes())["now"])
        if run_body(services, Settings(), body, now).issued:
            fired.add(body["hook"])
    assert fired == set(HOOK_NAMES)


def test_readme_catalog_is_generated_from_the_rules(shipped: RuleSet) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index(BEGIN) + len(BEGIN): readme.index(END)].strip()
    assert table == catalog_markdown(shipped), "run: nudges catalog --write README.md"
    assert "None" not in table


@pytest.mark.parametrize(("publisher", "year", "title", "shown"), [
    ("Circulation", 2019, None, "Circulation 2019"),
    ("Massachusetts General Hospital", None, "Annual report", "Massachusetts General Hospital, n.d."),
    (None, None, "Annual report", "Annual report (n.d.)"),
    ("", "", None, "n.d."),
])
def test_an_undated_source_reads_n_d_never_none(publisher: object, year: object, title: object, shown: str) -> None:
    assert label(publisher, year, title) == shown


@pytest.mark.parametrize("call", CALLS, ids=[p.stem for p in CALLS])
def test_no_card_for_a_patient_who_has_died(catalog: Services, call: Path) -> None:
    """Every shipped call raises cards; the same call for a patient recorded as deceased raises none (a
    screening offer or a navigator's call to a family in mourning), and a death after `now` changes nothing."""
    body = orjson.loads(call.read_bytes())
    now = parse_instant(orjson.loads(call.with_suffix(".golden.json").read_bytes())["now"])
    patient = (body.get("prefetch") or {}).get("patient")
    assert isinstance(patient, dict), call.name

    def with_patient(**changes: Any) -> dict[str, Any]:
        return {**body, "prefetch": {**body["prefetch"], "patient": {**patient, **changes}}}

    alive = summarize(run_body(catalog, Settings(), body, now))
    assert alive
    for deceased in ({"deceasedBoolean": True}, {"deceasedDateTime": "2026-02-27"}):
        assert not run_body(catalog, Settings(), with_patient(**deceased), now).issued, deceased
    assert summarize(run_body(catalog, Settings(), with_patient(deceasedDateTime="2099-01-01"), now)) == alive


def test_the_payer_class_is_the_primary_coverages_whatever_the_order_they_came_in() -> None:
    """A patient with Medicaid and a private plan was classed by whichever Coverage came first: the
    equity view of a screen moved with the export's file order."""
    from nudges.demographics import payer_class

    def plan(cid: str, code: str, **extra: Any) -> dict[str, Any]:
        return {"resourceType": "Coverage", "id": cid, "status": "active",
                "type": {"coding": [{"system": "urn:oid:2.16.840.1.113883.3.221.5", "code": code}]}, **extra}

    medicaid, private = plan("cov-b", "2"), plan("cov-a", "5")
    assert payer_class([medicaid, private]) == payer_class([private, medicaid])
    primary = [plan("cov-b", "2", order=1), plan("cov-a", "5", order=2)]
    assert payer_class(primary) == payer_class(primary[::-1]) == payer_class([medicaid, private, *primary][::-1]) \
        == "medicaid"


def test_data_read_only_when_sent_is_asked_for_but_not_demanded(catalog: Services) -> None:
    """colorectal-screening-navigation reads dementia medication and frailty device orders with `required:
    false`: patient-view's discovery asks for them, a call without them is answered as before (no 412),
    and when they come they count."""
    from nudges.errors import PreconditionFailed
    from nudges.prefetch import fill

    plan = catalog.by_id["nudges-patient-view"].plan
    for key in ("medicationRequest", "deviceRequest"):
        assert key in plan.templates and key not in plan.required
    assert {"patient", "condition", "observation", "procedure"} <= plan.required
    patient = {"resourceType": "Patient", "id": "pt-opt", "birthDate": "1956-11-11", "gender": "female"}
    weak = {"resourceType": "Condition", "id": "c-weak", "subject": {"reference": "Patient/pt-opt"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "R53.1"}]},
            "onsetDateTime": "2026-01-05"}
    donepezil = {"resourceType": "MedicationRequest", "id": "m-dpz", "status": "active", "intent": "order",
                 "subject": {"reference": "Patient/pt-opt"}, "authoredOn": "2025-05-20",
                 "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                           "code": "997223"}]}}
    now = parse_instant("2026-03-02T12:00:00Z")

    def fired(prefetch: dict[str, Any]) -> list[str]:
        body = {"hook": "patient-view", "hookInstance": "d7d5a1f8-0000-4000-8000-000000000001",
                "context": {"userId": "Practitioner/1", "patientId": "pt-opt"}, "prefetch": prefetch}
        return [i.rule_id for i in run_body(catalog, Settings(), body, now).issued]

    full = fill(plan, [patient, weak, donepezil])
    assert "colorectal-screening-navigation" not in fired(full)  # frailty with a dementia medication
    without = {k: v for k, v in full.items() if k not in ("medicationRequest", "deviceRequest")}
    assert "colorectal-screening-navigation" in fired(without)  # not sent: answered, the order unseen
    with pytest.raises(PreconditionFailed, match="condition"):
        fired({k: v for k, v in without.items() if k != "condition"})
