"""Rule-language features for data as EHRs record it: the earliest match as the anchor of a clock,
cards that escalate as time passes, medications coded by reference, and a site's own codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import troponin

from nudges import pipeline
from nudges.cli import main
from nudges.clock import parse_instant
from nudges.fhir import bundle
from nudges.rules.compiler import load_ruleset
from nudges.services import Services

RULE = Path("cardiology/troponin-without-cath-plan.yaml")
NOW = parse_instant("2026-03-02T12:00:00Z")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def cards(rules_dir: Path, *resources: dict[str, Any], site: Path | None = None) -> list[dict[str, Any]]:
    result = load_ruleset(rules_dir, site)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    services = Services.build(result.ruleset, frozenset({"active"}))
    everything = bundle([{"resourceType": "Patient", "id": "p"}, *resources], "searchset")
    prefetch = {key: None for key in services.for_hook("patient-view").plan.templates} | {"all": everything}
    body = {"hook": "patient-view", "hookInstance": "lang", "context": {"userId": "Practitioner/a", "patientId": "p"},
            "prefetch": prefetch}
    return pipeline.run_body(services, None, body, NOW).cards  # type: ignore[arg-type]


def lint(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["lint", str(rules_dir)]) == 1
    return capsys.readouterr().out.splitlines()


SERIAL = (troponin("trop-first", when="2026-03-01T22:00:00Z"), troponin("trop-second", when="2026-03-01T23:00:00Z"))


def test_a_binding_takes_the_latest_match_unless_it_picks_the_earliest(rules_dir: Path) -> None:
    [card] = cards(rules_dir, *SERIAL)
    assert "13 h ago" in card["summary"]  # the latest elevated result older than 12 h
    edit(rules_dir / RULE, "      within: 72h\n", "      within: 72h\n      pick: earliest\n")
    [card] = cards(rules_dir, *SERIAL)
    assert "14 h ago" in card["summary"]  # the first elevated result: the episode's clock


def test_escalate_raises_the_indicator_once_its_time_has_come(rules_dir: Path) -> None:
    edit(rules_dir / RULE, "  indicator: warning\n",
         "  indicator: warning\n  escalate:\n    - {after: 13h, since: troponin, indicator: critical}\n")
    [late] = cards(rules_dir, troponin("t", when="2026-03-01T22:00:00Z"))  # 14 h
    [early] = cards(rules_dir, troponin("t", when="2026-03-01T23:30:00Z"))  # 12.5 h
    assert (late["indicator"], early["indicator"]) == ("critical", "warning")


@pytest.mark.parametrize(("old", "new", "message"), [
    ("      within: 72h\n", "      within: 72h\n      pick: first\n", "pick"),
    ("    - resource: Procedure\n", "    - resource: Procedure\n      pick: earliest\n", "give the clause `as:` too"),
    ("  indicator: warning\n",
     "  indicator: warning\n  escalate:\n    - {after: 1h, since: trop, indicator: critical}\n",
     "'trop' is not a name bound whenever the rule fires"),
    ("  indicator: warning\n",
     "  indicator: warning\n  escalate:\n    - {after: 9h, since: troponin, indicator: critical}"
     "\n    - {after: 2h, since: troponin, indicator: warning}\n", "from the soonest to the latest"),
])
def test_lint_refuses_misused_pick_and_escalate(rules_dir: Path, capsys: pytest.CaptureFixture[str], old: str,
                                                new: str, message: str) -> None:
    edit(rules_dir / RULE, old, new)
    assert any(message in line for line in lint(rules_dir, capsys))


@pytest.mark.parametrize("name", ["now", "patient", "hook", "today", "context", "ucum"])
def test_lint_refuses_a_clause_named_for_a_call_wide_variable(rules_dir: Path, capsys: pytest.CaptureFixture[str],
                                                               name: str) -> None:
    """`as: now` would make %now the bound result in later clauses: for a reader of the rule, and for the
    engine, which shares across a call the answers of expressions reading only such names."""
    edit(rules_dir / RULE, "    - as: troponin\n", f"    - as: {name}\n")
    edit(rules_dir / RULE, "{{troponin.value}}", f"{{{{{name}.value}}}}")
    at = 1 + (rules_dir / RULE).read_text().splitlines().index(f"    - as: {name}")
    [line] = [line for line in lint(rules_dir, capsys) if "every expression reads" in line]
    assert f"troponin-without-cath-plan.yaml:{at}:7:" in line, line
    assert f"'{name}' is a name every expression reads (%{name}): give the clause another name" in line

CATH_BY_TEXT = {"resourceType": "ServiceRequest", "id": "local-cath", "status": "active", "intent": "order",
                "subject": {"reference": "Patient/p"}, "authoredOn": "2026-03-02T01:00:00Z",
                "code": {"coding": [{"system": "urn:oid:1.2.3.4.5.site-orders", "code": "CATH-LHC-01",
                                     "display": "Cath lab: left heart cath"}]}}


def test_a_sites_own_codes_join_the_shipped_value_set(rules_dir: Path, tmp_path: Path) -> None:
    """A local order code silences the card only once the site lists it (site_valuesets), rules unchanged."""
    trop = troponin("t", when="2026-03-01T22:00:00Z")
    assert cards(rules_dir, trop, CATH_BY_TEXT)  # the local code means nothing yet
    site = tmp_path / "site"
    site.mkdir()
    (site / "cardiac-catheterization-or-cardiology.yaml").write_text(
        "name: cardiac-catheterization-or-cardiology\nsource: order catalog export 2026-11-20\ncodes:\n"
        "  - {system: 'urn:oid:1.2.3.4.5.site-orders', code: CATH-LHC-01, display: Left heart catheterization}\n")
    assert cards(rules_dir, trop, CATH_BY_TEXT, site=site) == []
    loaded = load_ruleset(rules_dir, site).ruleset
    assert loaded is not None and loaded.version != load_ruleset(rules_dir).ruleset.version  # type: ignore[union-attr]


def test_a_sites_own_codes_may_come_as_a_fhir_valueset(rules_dir: Path, tmp_path: Path) -> None:
    """The same local code from a site's FHIR ValueSet JSON (an order catalog's export); a damaged one is a
    problem of that file, and the rule set is refused (the last good one is kept)."""
    import orjson

    trop = troponin("t", when="2026-03-01T22:00:00Z")
    site = tmp_path / "site"
    site.mkdir()
    path = site / "cardiac-catheterization-or-cardiology.json"
    path.write_bytes(orjson.dumps({"resourceType": "ValueSet", "name": "SiteCath", "status": "active",
                                   "expansion": {"contains": [{"system": "urn:oid:1.2.3.4.5.site-orders",
                                                               "code": "CATH-LHC-01",
                                                               "display": "Left heart catheterization"}]}}))
    assert cards(rules_dir, trop, CATH_BY_TEXT, site=site) == []
    path.write_text("{not json")
    result = load_ruleset(rules_dir, site)
    assert result.ruleset is None
    assert any("FHIR ValueSet" in str(p) and p.path.endswith("cardiac-catheterization-or-cardiology.json")
               for p in result.problems), result.problems


def test_site_codes_for_an_unknown_value_set_are_refused(rules_dir: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "cardiac-cath.yaml").write_text("name: cardiac-cath\nsource: x\ncodes: [{system: 'urn:x', code: a, "
                                            "display: a}]\n")
    result = load_ruleset(rules_dir, site)
    assert result.ruleset is None
    assert any("not a value set of the rule set" in str(p) for p in result.problems)


TROPONIN_VS = {"resourceType": "ValueSet", "url": "http://example.org/fhir/ValueSet/troponin", "version": "20250508",
               "name": "Troponin", "title": "Troponin tests", "status": "active", "date": "2025-05-08",
               "publisher": "Example eCQM steward",
               "compose": {"include": [{"system": "http://loinc.org", "concept": [{"code": "89579-7"}]}]},
               "expansion": {"timestamp": "2025-05-08T00:00:00Z", "contains": [
                   {"system": "http://loinc.org", "code": "89579-7", "display": "Troponin I hs"},
                   {"system": "http://loinc.org", "code": "0000-0", "display": "a grouper", "abstract": True,
                    "contains": [{"system": "http://loinc.org", "code": "67151-1", "display": "Troponin T hs"}]}]}}


def test_a_fhir_valueset_json_replaces_the_yaml_unchanged(rules_dir: Path) -> None:
    import orjson

    (rules_dir / "valuesets" / "troponin.yaml").unlink()
    (rules_dir / "valuesets" / "troponin.json").write_bytes(orjson.dumps(TROPONIN_VS))
    loaded = load_ruleset(rules_dir).ruleset
    assert loaded is not None
    troponin_set = loaded.valuesets["troponin"]
    assert troponin_set.keys == {("http://loinc.org", "89579-7"), ("http://loinc.org", "67151-1")}  # nested, no grouper
    assert (troponin_set.version, troponin_set.date, troponin_set.url) == (
        "20250508", "2025-05-08", "http://example.org/fhir/ValueSet/troponin")
    assert cards(rules_dir, troponin("t", when="2026-03-01T22:00:00Z"))


@pytest.mark.parametrize(("change", "message"), [
    (lambda vs: vs.pop("expansion") and vs["compose"]["include"][0].update(filter=[{"op": "is-a"}]),
     "needs a terminology server"),
    (lambda vs: vs.update(resourceType="CodeSystem"), "not a FHIR ValueSet"),
    (lambda vs: vs.pop("expansion") and vs["compose"]["include"][0].pop("concept"), "whole code system"),
])
def test_an_unexpandable_fhir_valueset_is_refused_with_advice(rules_dir: Path, change: Any, message: str) -> None:
    import copy

    import orjson

    data = copy.deepcopy(TROPONIN_VS)
    change(data)
    (rules_dir / "valuesets" / "troponin.yaml").unlink()
    (rules_dir / "valuesets" / "troponin.json").write_bytes(orjson.dumps(data))
    result = load_ruleset(rules_dir)
    assert result.ruleset is None
    assert any(message in str(p) and "troponin.json" in str(p) for p in result.problems), result.problems
    assert not any("unknown value set 'troponin'" in str(p) for p in result.problems)  # no knock-on errors


def test_valueset_import_and_export_round_trip(rules_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import orjson

    source = tmp_path / "troponin-tests.json"
    source.write_bytes(orjson.dumps(TROPONIN_VS))
    assert main(["valueset", "import", str(source), "--to", str(rules_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 code(s): 2 http://loinc.org" in out and "version 20250508" in out
    assert (rules_dir / "valuesets" / "troponin-tests.json").is_file()
    exported = tmp_path / "exported"
    assert main(["valueset", "export", str(rules_dir), "--out", str(exported)]) == 0
    again = orjson.loads((exported / "troponin-tests.json").read_bytes())
    assert again["resourceType"] == "ValueSet" and again["url"] == TROPONIN_VS["url"]
    assert {c["code"] for c in again["expansion"]["contains"]} == {"89579-7", "67151-1"}
    yaml_one = orjson.loads((exported / "troponin.json").read_bytes())
    assert yaml_one["compose"]["include"][0]["system"] == "http://loinc.org"
    # the author's description kept (it had been replaced by the provenance line), the provenance after it
    assert yaml_one["description"].startswith("Conventional and high-sensitivity troponin I and T assays;")
    assert "\n\nSource: " in yaml_one["description"]


MORPHINE = ("http://www.nlm.nih.gov/research/umls/rxnorm", "1732136")  # an SCD product code, for the test's own set


def order(oid: str, **medication: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": oid, "status": "active", "intent": "order",
            "subject": {"reference": "Patient/p"}, **medication}


@pytest.mark.parametrize("planned", [True, False])
def test_medication_reference_is_resolved_contained_or_in_the_record(planned: bool) -> None:
    from nudges.record import IndexPlan, PatientRecord

    keys = frozenset({MORPHINE})
    coded = {"coding": [{"system": MORPHINE[0], "code": MORPHINE[1], "display": "morphine sulfate 4 MG/ML injection"}]}
    inline = order("inline", medicationCodeableConcept=coded)
    contained = order("contained", medicationReference={"reference": "#med"},
                      contained=[{"resourceType": "Medication", "id": "med", "code": coded}])
    referenced = order("referenced", medicationReference={"reference": "Medication/m-1"})
    dangling = order("dangling", medicationReference={"reference": "Medication/not-here"})
    other = order("other", medicationReference={"reference": "Medication/m-2"})
    record = PatientRecord(IndexPlan([("MedicationRequest", keys)]) if planned else None)
    record.add_value(bundle([inline, contained, referenced, dangling, other], "searchset"))
    # the referenced Medications arrive in another prefetch value (an _include, or a key of their own)
    record.add_value(bundle([{"resourceType": "Medication", "id": "m-1", "code": coded},
                             {"resourceType": "Medication", "id": "m-2", "code": {"text": "acetaminophen"}}],
                            "searchset"))
    found = [r["id"] for r in record.with_codes("record", "MedicationRequest", keys)]
    assert found == ["inline", "contained", "referenced"]
    import re

    assert record.says(re.compile("morphine"), referenced) and not record.says(re.compile("morphine"), other)


def test_prefetch_never_filters_medications_by_code() -> None:
    """A server's `code` search on MedicationRequest misses orders coded by medicationReference, so the
    shipped services ask for a patient's medication resources whole, with their Medications included."""
    from conftest import ROOT

    shipped = load_ruleset(ROOT / "rules").ruleset
    assert shipped is not None
    templates = [t for hook in ("order-select", "order-sign", "encounter-start")
                 for t in Services.build(shipped, frozenset({"active"})).for_hook(hook).plan.templates.values()]
    medication = [t for t in templates if t.startswith("Medication")]
    assert medication, "the catalog reads medications"
    for template in medication:
        assert "code=" not in template and template.endswith(":medication"), template


@pytest.mark.parametrize(("text", "code"), [("Spanish", "es"), ("spanish (Mexico)", "es"), ("Tiếng Việt", "vi"),
                                           ("Haitian Creole", "ht"), ("ASL", "ase"), ("Klingon", None), ("", None)])
def test_a_language_given_by_name_gets_its_code(text: str, code: str | None) -> None:
    from nudges.fhir import BCP47, code_text_languages

    patient = {"resourceType": "Patient", "communication": [{"language": {"text": text}, "preferred": True}]}
    code_text_languages(patient)
    language = patient["communication"][0]["language"]
    if code is None:
        assert "coding" not in language
    else:
        assert language["coding"] == [{"system": BCP47, "code": code, "display": text}]


def test_patient_is_a_fhirpath_variable_for_sex_specific_ranges(rules_dir: Path) -> None:
    """%patient lets a rule take the reference range for the patient's sex from a result that reports both."""
    edit(rules_dir / RULE, '''where: "(value as Quantity).value > referenceRange.high.value or''',
         '''where: "(value as Quantity).value > referenceRange.where(appliesTo.coding.code contains %patient.gender)'''
         '''.high.value or''')
    result = {**troponin("t", value=25, when="2026-03-01T22:00:00Z"), "referenceRange": [
        {"high": {"value": 16, "unit": "ng/L"}, "appliesTo": [{"coding": [{"code": "female"}]}]},
        {"high": {"value": 34, "unit": "ng/L"}, "appliesTo": [{"coding": [{"code": "male"}]}]}]}

    def fires(gender: str) -> bool:
        loaded = load_ruleset(rules_dir).ruleset
        assert loaded is not None
        services = Services.build(loaded, frozenset({"active"}))
        everything = bundle([{"resourceType": "Patient", "id": "p", "gender": gender}, result], "searchset")
        prefetch = {key: None for key in services.for_hook("patient-view").plan.templates} | {"all": everything}
        body = {"hook": "patient-view", "hookInstance": "x", "prefetch": prefetch,
                "context": {"userId": "Practitioner/a", "patientId": "p"}}
        return bool(pipeline.run_body(services, None, body, NOW).cards)  # type: ignore[arg-type]

    assert fires("female") and not fires("male")


def test_a_medication_coded_by_reference_is_named_by_its_medication() -> None:
    from nudges.cards import _display

    coded = {"coding": [{"system": MORPHINE[0], "code": MORPHINE[1], "display": "morphine 4 MG/ML injection"}]}
    referenced = order("r", medicationReference={"reference": "Medication/m-1"})
    assert _display(referenced, {}, {"m-1": {"resourceType": "Medication", "id": "m-1", "code": coded}}) \
        == "morphine 4 MG/ML injection"
    contained = order("c", medicationReference={"reference": "#m"},
                      contained=[{"resourceType": "Medication", "id": "m", "code": coded}])
    assert _display(contained, {(MORPHINE[0], MORPHINE[1]): "morphine (from the value set)"}) \
        == "morphine (from the value set)"


def test_a_code_system_sent_as_its_oid_matches_and_reads_as_its_uri(rules_dir: Path) -> None:
    """Interfaces still send HL7 OIDs (`urn:oid:2.16.840.1.113883.6.1` for LOINC): the index matches the
    value set's codes under the URI, and FHIRPath that names the system sees the URI too."""
    edit(rules_dir / RULE, '''where: "(value as Quantity).value > referenceRange.high.value or''',
         '''where: "code.coding.where(system = 'http://loinc.org').exists() and (value as Quantity).value > '''
         '''referenceRange.high.value or''')
    result = troponin("t", when="2026-03-01T22:00:00Z")
    result["code"]["coding"][0]["system"] = "urn:oid:2.16.840.1.113883.6.1"
    assert cards(rules_dir, result)


@pytest.mark.parametrize(("expression", "culprit"), [
    ("authoredOn > %now - 2 'days'", "2 'days'"),
    # a string ending in a digit is not a quantity's number, nor a valid UCUM quantity the culprit
    ("code.coding.where(code = '88122-7').exists() and authoredOn > %now - 2 'days'", "2 'days'"),
    ("note.where(text = 'take 2 ').exists() and authoredOn > %now - 2 'days'", "2 'days'"),
    ("(extension.value as Quantity) > 2 'mg' and authoredOn > %now - 2 'months'", "2 'months'"),
    # where the dry run on an empty resource never evaluates it
    ("extension.where(value.ofType(dateTime) > %now - 2 'days').exists()", "2 'days'"),
    ("iif(status = 'active', authoredOn > %now - 1 'year', false)", "1 'year'"),
])
def test_date_arithmetic_with_a_quoted_calendar_word_is_refused_where_it_is(expression: str, culprit: str) -> None:
    """A quoted unit is UCUM's, and fhirpathpy refuses date arithmetic in any other: the rule raised on
    every call. The error is at the quantity (its column) and says what to write."""
    from nudges.rules.fhirpath import FhirPathSyntaxError, compile_expression

    with pytest.raises(FhirPathSyntaxError) as refused:
        compile_expression(expression, "ServiceRequest")
    number = culprit.split()[0]
    assert refused.value.column == expression.index(f"- {culprit}") + 2
    assert str(refused.value).startswith(f"{culprit} cannot be added to or taken from a date")
    assert f"`{number} {culprit.split(chr(39))[1].removesuffix('s')}" in str(refused.value)


@pytest.mark.parametrize("expression", [
    "authoredOn > %now - 2 days", "authoredOn > %now - 2 'd'", "authoredOn > %now - 3 'wk'",
    "note.where(text = 'it is 2 \\'days\\'').exists()", "(extension.value as Quantity) > 18 'a'"])
def test_date_arithmetic_in_calendar_durations_or_ucum_times_lints_clean(expression: str) -> None:
    from nudges.rules.fhirpath import compile_expression

    compile_expression(expression, "ServiceRequest")


@pytest.mark.parametrize(("expression", "undefined"), [
    ("identifier.where(value = %resource.id).exists()", "%resource"),  # inside where(): never dry-run
    ("iif(status = 'final', %finalStatus, status) = 'final'", "%finalStatus"),
    ("code.coding.select(%`vs-local`).exists()", "%`vs-local`"),
    ("code.text = '%not-a-variable' and %context.id.exists() and %ucum.exists()", None),  # a string; fhirpathpy's own
    ("code.coding.where(system = %`ucum`).exists() and %lab.status = 'final'", None),  # delimited; a bound name
])
def test_every_variable_is_checked_where_the_dry_run_cannot_reach(expression: str, undefined: str | None) -> None:
    from nudges.rules.fhirpath import FhirPathSyntaxError, compile_expression

    if undefined is None:
        compile_expression(expression, "Observation", bound={"lab": "Observation"})
        return
    with pytest.raises(FhirPathSyntaxError, match=f"%{undefined.strip('%`')} is not defined here") as raised:
        compile_expression(expression, "Observation", bound={"lab": "Observation"})
    assert raised.value.column == expression.index(undefined)


def test_a_compiled_expression_is_given_again_only_for_the_same_inputs() -> None:
    """A reload compiles only what changed (fhirpath._COMPILED): a value set's edited codes, another
    resource type or other bound names compile afresh; a change to a set the expression does not name
    does not; what is refused is refused every time."""
    from nudges.rules.fhirpath import FhirPathSyntaxError, compile_expression

    a1c = {"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}}
    text = "code.memberOf('hba1c-test') and %lab.exists().not()"
    shipped = {"hba1c-test": frozenset({("http://loinc.org", "4548-4")}), "other-test": frozenset()}
    unrelated = {"hba1c-test": frozenset({("http://loinc.org", "4548-4")}), "other-test": frozenset({("urn:x", "y")})}
    edited = {"hba1c-test": frozenset({("http://loinc.org", "17856-6")}), "other-test": frozenset()}
    bound = {"lab": "Observation"}
    first = compile_expression(text, "Observation", shipped, bound)
    assert first(a1c, {"lab": []}) == [True]
    assert compile_expression(text, "Observation", unrelated, dict(bound)) is first
    again = compile_expression(text, "Observation", edited, bound)
    assert again is not first and again(a1c, {"lab": []}) == [False]  # the edited codes, not the cached ones
    assert compile_expression(text, "Observation", shipped, {"lab": "Condition"}) is not first
    assert compile_expression(text, "DiagnosticReport", shipped, bound) is not first
    for _ in range(2):
        with pytest.raises(FhirPathSyntaxError, match="lab is not defined here"):
            compile_expression(text, "Observation", shipped)
        with pytest.raises(FhirPathSyntaxError, match="unknown value set 'hba1c-test'"):
            compile_expression(text, "Observation", {"other-test": frozenset()}, bound)


def test_compiled_expressions_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from nudges.rules import fhirpath

    monkeypatch.setattr(fhirpath, "COMPILED_LIMIT", 3)
    monkeypatch.setattr(fhirpath, "_COMPILED", {})
    for n in range(10):
        fhirpath.compile_expression(f"status = 'final-{n}'", "Observation")
        assert len(fhirpath._COMPILED) <= 3
    assert (f"status = 'final-{n}'", "Observation", False, (), ()) in fhirpath._COMPILED  # the latest is kept
