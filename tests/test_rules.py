"""Rule language: lint positions, schema, case runner, hot reload, isolation, suppression."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from conftest import ROOT, LiveServer
from helpers import patient_view, troponin

from nudges.cli import main
from nudges.rules.compiler import load_ruleset
from nudges.rules.schema import parse_duration

RULE = Path("cardiology/troponin-without-cath-plan.yaml")
URL = "/cds-services/nudges-patient-view"


def lint(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["lint", str(rules_dir)])
    return code, capsys.readouterr().out.splitlines()


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_frozen_test_rules_lint_clean(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rule set every other test edits starts clean, so a problem a test reports is the test's own."""
    code, out = lint(rules_dir, capsys)
    assert code == 0 and out[-1].startswith("ok: 3 rules")


def test_shipped_rules_lint_clean(capsys: pytest.CaptureFixture[str]) -> None:
    """Clean, and without warnings: every shipped value set says where its codes came from (source,
    version and the date they were checked), every delivery name resolves, nothing is left to fill in."""
    code, out = lint(ROOT / "rules", capsys)
    assert code == 0 and out[-1].startswith("ok: "), out
    assert [line for line in out if line.startswith("warning:")] == []


@pytest.mark.parametrize(("old", "new", "needle", "message"), [
    ("    - as: troponin\n", "    - as: troponin\n      colour: red\n", "colour: red", "unknown field 'colour'"),
    ("codes: troponin\n", "codes: trop-nope\n", "trop-nope", "unknown value set 'trop-nope'"),
    ("where: \"(value as Quantity).value > referenceRange.high.value or",
     "where: \"(value as Quantity).value >> referenceRange.high.value or", ">>", "FHIRPath syntax error"),
    ("indicator: warning", "indicator: loud", "indicator: loud", "card.indicator"),
    ("within: 72h", "within: 72 hours", "72 hours", "not a duration"),
    ("            status: draft\n", "            status: draft\n            colour: red\n", "colour: red",
     "not valid FHIR R4"),
    ("      within: 72h\n", "      within: 72h\n      date: \"extension('race').value\"\n", "extension('race')",
     "reads race or ethnicity"),
    ("      within: 72h\n", "      within: 72h\n      text: \"tropo(nin\"\n", "tropo(nin", "bad regular expression"),
    ("      within: 72h\n", "      within: 72h\n      date: \"effectiveDateTime.where(code.memberOf('trop'))\"\n",
     "memberOf('trop')", "memberOf: unknown value set 'trop'"),
    ("      within: 72h\n", "      within: 72h\n      date: \"effectiveDateTime.where(code.memberOf(code))\"\n",
     "memberOf(code)", "memberOf takes a value set name in quotes"),
])
def test_lint_reports_path_line_column(rules_dir: Path, capsys: pytest.CaptureFixture[str], old: str, new: str,
                                       needle: str, message: str) -> None:
    path = rules_dir / RULE
    edit(path, old, new)
    code, out = lint(rules_dir, capsys)
    assert code == 1
    hits = [line for line in out if message in line]
    assert hits, out
    file, line, column, _ = hits[0].split(":", 3)
    assert file.endswith(str(RULE)) and int(line) == line_of(path, needle) and int(column) >= 1


def test_a_bare_m_is_minutes_and_lint_says_so(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`within: 6m` reads like six months to many authors and is six minutes: a warning at its place
    (the set still loads); `min` and `mo` say which, and parse as such."""
    path = rules_dir / RULE
    edit(path, "within: 72h", "within: 6m  # months?")
    code, out = lint(rules_dir, capsys)
    assert code == 0
    [warned] = [line for line in out if "is 6 minutes" in line]
    assert warned.startswith("warning:") and f"{RULE}:{line_of(path, 'within: 6m')}:" in warned
    assert "'6m' is 6 minutes" in warned and "'6mo'" in warned
    for written in ("6min", "6mo"):
        edit(path, "within: 6m  # months?" if written == "6min" else "within: 6min", f"within: {written}")
        code, out = lint(rules_dir, capsys)
        assert code == 0 and not [line for line in out if "is 6 minutes" in line], out
    assert (parse_duration("6min"), parse_duration("6m"), parse_duration("6mo")) == (
        timedelta(minutes=6), timedelta(minutes=6), timedelta(days=180))


def test_lint_summary_too_long_and_yaml_syntax(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rules_dir / RULE
    edit(path, 'summary: "Troponin above', 'summary: "' + "x" * 140 + ' Troponin above')
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("at most 139 characters" in line and f":{line_of(path, 'xxxx')}:" in line
                             for line in out)
    path.write_text("id: [unclosed\n")
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("YAML: an unclosed [ list" in line for line in out)


@pytest.mark.parametrize(("text", "advice"), [
    ("id: a\nid: b\n", "this key appears twice"),
    ("title: Troponin: elevated\n", "put the value in quotes"),
    ("id: x\n\ttitle: y\n", "YAML indents with spaces only"),
    ("summary: \"never closed\n", "a quote or bracket opened and never closed"),
])
def test_yaml_errors_read_as_plain_advice(rules_dir: Path, capsys: pytest.CaptureFixture[str], text: str,
                                          advice: str) -> None:
    (rules_dir / RULE).write_text(text)
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any(advice in line for line in out), out


def test_root_causes_come_without_their_knock_on_errors(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A value set whose file is broken is reported once, not again at every clause that names it."""
    edit(rules_dir / "valuesets" / "troponin.yaml", "title:", "titel:")
    code, out = lint(rules_dir, capsys)
    assert code == 1
    assert any("troponin.yaml" in line and "unknown field 'titel'" in line for line in out), out
    assert not any("unknown value set 'troponin'" in line for line in out), out


def test_did_you_mean(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(rules_dir / RULE, "codes: troponin\n", "codes: troponine\n")
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("unknown value set 'troponine' (did you mean 'troponin'?)" in line for line in out)


def test_active_rule_needs_firing_and_quiet_cases(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = rules_dir / "cardiology/troponin-without-cath-plan.cases.yaml"
    text = cases.read_text()
    cases.write_text(text[: text.index("  - name: near miss")])  # keep only the firing case
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("firing and one non-firing case" in line and ":3:" in line for line in out)


def test_schema_is_json_schema_of_the_rule_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = orjson.loads(capsys.readouterr().out)
    assert schema["title"] == "nudges rule" and schema["additionalProperties"] is False
    assert {"id", "status", "when", "card", "citations", "falsepositives"} <= set(schema["required"])
    durations = re.compile(schema["$defs"]["Clause"]["properties"]["within"]["anyOf"][0]["pattern"])
    assert all(durations.match(d) for d in ("72h", "30min", "6mo", "10y", "5 d"))  # what lint takes, an editor takes
    assert not any(durations.match(d) for d in ("1 year", "30 days", "12", "h"))  # and what lint refuses it refuses


def test_rule_tests_pass_and_catch_a_wrong_expectation(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(rules_dir)]) == 0
    capsys.readouterr()
    cases = rules_dir / "cardiology/troponin-without-cath-plan.cases.yaml"
    edit(cases, "      - indicator: warning\n", "      - indicator: critical\n")
    edit(cases, "  - name: near miss - value within this assay's reference range\n",
         "  - name: near miss - value within this assay's reference range\n    now: \"2026-03-01T12:00:00Z\"\n")
    edit(cases, "        valueQuantity: {value: 20, unit: ng/L}", "        valueQuantity: {value: 200, unit: ng/L}")
    assert main(["test", str(rules_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAIL troponin-without-cath-plan" in out
    assert "-indicator: critical" in out and "+indicator: warning" in out  # readable diff


def test_hot_reload_refuses_broken_rules_and_keeps_last_good(make_client, rules_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client: LiveServer = make_client(reload_interval_seconds=0.1)
    before = client.get("/readyz").json()["rules"]
    path = rules_dir / RULE
    edit(path, "codes: troponin\n", "codes: no-such-set\n")
    deadline = time.monotonic() + 10
    while client.runtime.reloader.refused == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.runtime.reloader.refused >= 1
    ready = client.get("/readyz").json()
    assert ready["rules"] == before and ready["rules_on_disk"] == "refused" and ready["on_disk_problems"] >= 1
    assert len(client.post(URL, json=patient_view("pt-hr", troponin())).json()["cards"]) == 1  # still served
    edit(path, "codes: no-such-set\n", "codes: troponin\n")
    edit(path, 'summary: "Troponin above', 'summary: "Reloaded: troponin above')
    while client.get("/readyz").json()["rules"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = client.get("/readyz").json()
    assert ready["rules"] != before and ready["rules_on_disk"] == "served" and ready["refused_reloads"] >= 1
    card = client.post(URL, json=patient_view("pt-hr2", troponin())).json()["cards"][0]
    assert card["summary"].startswith("Reloaded")
    services = client.get("/cds-services").json()["services"]
    assert services[0]["version"] == client.get("/readyz").json()["rules"]


def test_a_failing_rule_is_isolated(make_client, rules_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # Passes lint (valid on an empty resource) but raises on real data: string + number.
    edit(rules_dir / "equations/race-free-egfr.yaml", "      within: 1y\n  none:",
         "      within: 1y\n      where: \"(value as Quantity).value + 'x' > 1\"\n  none:")
    client: LiveServer = make_client()
    egfr = {"resourceType": "Observation", "id": "egfr", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "48643-1"}]},
            "effectiveDateTime": "2026-02-01T00:00:00Z", "valueQuantity": {"value": 50}}
    response = client.post(URL, json=patient_view("pt-iso", troponin(), egfr))
    assert response.status_code == 200
    assert [c["summary"][:8] for c in response.json()["cards"]] == ["Troponin"]
    assert 'nudges_rule_errors_total{rule="race-free-egfr"} 1.0' in client.get("/metrics").text


def test_suppression_per_hashed_patient(client: LiveServer) -> None:
    assert len(client.post(URL, json=patient_view("pt-s1", troponin())).json()["cards"]) == 1
    assert client.post(URL, json=patient_view("pt-s1", troponin())).json()["cards"] == []  # within 12 h
    assert len(client.post(URL, json=patient_view("pt-s2", troponin())).json()["cards"]) == 1
    client.runtime.clock.advance(hours=13)
    later = troponin(when="2026-03-02T10:00:00Z")
    assert len(client.post(URL, json=patient_view("pt-s1", later)).json()["cards"]) == 1


def test_load_is_all_or_nothing(rules_dir: Path) -> None:
    (rules_dir / "valuesets/broken.yaml").write_text("name: broken\ntitle: x\ncodes:\n  - code: '1'\n    display: y\n")
    result = load_ruleset(rules_dir)
    assert result.ruleset is None
    assert any("system" in p.message and p.line == 4 for p in result.problems)


def test_text_narrows_candidates_before_fhirpath(rules_dir: Path) -> None:
    from nudges.clock import parse_instant
    from nudges.engine import evaluate
    from nudges.record import PatientRecord
    from nudges.services import Services

    path = rules_dir / "equations/race-free-egfr.yaml"
    clause = "    - as: result\n      resource: Observation\n      codes: race-based-egfr\n"
    edit(path, clause, clause + "      text: \"african american\"\n")
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    rules = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"].rules
    now = parse_instant("2026-03-02T12:00:00Z")

    def fires(*resources: dict) -> bool:  # type: ignore[type-arg]
        record = PatientRecord()
        record.add_all(resources)
        return "race-free-egfr" in [m.rule.id for m in evaluate(rules, record, now).matches]

    coded = {"resourceType": "Observation", "id": "a", "effectiveDateTime": "2026-02-01",
             "code": {"coding": [{"system": "http://loinc.org", "code": "48643-1"}]}}
    worded = {"resourceType": "Observation", "id": "b", "effectiveDateTime": "2026-02-01",
              "code": {"text": "eGFR if African American"}}
    other = {"resourceType": "Observation", "id": "c", "effectiveDateTime": "2026-02-01",
             "code": {"text": "eGFR"}, "note": [{"text": "no race coefficient"}]}
    assert fires(coded) and fires(worded) and not fires(other)


def test_fhirpath_sees_hook_and_context_ids(rules_dir: Path) -> None:
    from nudges.clock import parse_instant
    from nudges.engine import evaluate
    from nudges.record import PatientRecord
    from nudges.services import Services

    path = rules_dir / "equations/race-free-egfr.yaml"
    clause = "    - as: result\n      resource: Observation\n      codes: race-based-egfr\n"
    where = "%hook = 'patient-view' and %patientId = 'pt-ctx' and %encounterId.empty()"
    edit(path, clause, clause + f"      where: \"{where}\"\n")
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    rules = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"].rules
    record = PatientRecord.from_prefetch({"observation": {"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Observation", "id": "a", "effectiveDateTime": "2026-02-01",
        "code": {"coding": [{"system": "http://loinc.org", "code": "48643-1"}]}}}]}, "procedure": None})
    now = parse_instant("2026-03-02T12:00:00Z")

    def fired(context: dict[str, str], hook: str) -> bool:
        outcome = evaluate(rules, record, now, context, hook)
        assert not outcome.failed
        return "race-free-egfr" in [m.rule.id for m in outcome.matches]

    assert fired({"patientId": "pt-ctx"}, "patient-view")
    assert not fired({"patientId": "other"}, "patient-view")
    assert not fired({"patientId": "pt-ctx"}, "order-sign")
    assert not fired({"patientId": "pt-ctx", "encounterId": "e1"}, "patient-view")


def test_member_of_tests_codings_against_a_named_value_set(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nudges.clock import parse_instant
    from nudges.engine import evaluate
    from nudges.record import PatientRecord
    from nudges.services import Services

    path = rules_dir / "equations/race-free-egfr.yaml"
    clause = "    - as: result\n      resource: Observation\n      codes: race-based-egfr\n"
    where = "code.memberOf('race-based-egfr') and code.coding.memberOf('race-free-egfr').not()"
    edit(path, clause, clause + f"      where: \"{where}\"\n")
    code, out = lint(rules_dir, capsys)
    assert code == 0, out
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    rules = Services.build(ruleset, frozenset({"active"})).by_id["nudges-patient-view"].rules
    now = parse_instant("2026-03-02T12:00:00Z")

    def fires(*codings: dict[str, str]) -> bool:
        record = PatientRecord()
        record.add_all([{"resourceType": "Observation", "id": "a", "effectiveDateTime": "2026-02-01",
                         "code": {"coding": list(codings)}}])
        outcome = evaluate(rules, record, now)
        assert outcome.failed == []
        return "race-free-egfr" in [m.rule.id for m in outcome.matches]

    race_based = {"system": "http://loinc.org", "code": "48643-1"}
    assert fires(race_based)
    # two codings: code.coding.memberOf(...) has more than one input, so it is empty and .not() is empty
    assert not fires(race_based, {"system": "http://loinc.org", "code": "4548-4"})
    assert not fires({"system": "http://example.org", "code": "48643-1"})  # the system matters


def test_member_of_a_race_value_set_is_a_race_read(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (rules_dir / "valuesets/omb-race.yaml").write_text(
        "name: omb-race\ntitle: OMB race categories\ncodes:\n"
        "  - system: urn:oid:2.16.840.1.113883.6.238\n    code: 2054-5\n    display: Black or African American\n")
    path = rules_dir / RULE
    date = "effectiveDateTime.where(%context.code.memberOf('omb-race'))"
    edit(path, "      within: 72h\n", f"      within: 72h\n      date: \"{date}\"\n")
    code, out = lint(rules_dir, capsys)
    assert code == 1 and any("memberOf('omb-race')" in line and "race" in line for line in out), out
