"""`nudges replay`: golden files, the loopback FHIR server path, and NDJSON bulk exports."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from helpers import bulk_export, bundle, cath_order, coverage, for_patient, ndjson, patient, troponin

from nudges.cli import main
from nudges.clock import parse_instant
from nudges.pipeline import run_body
from nudges.rules.compiler import load_ruleset
from nudges.screening.calls import request_for
from nudges.services import Services
from nudges.settings import Settings
from nudges.tools.replay import render

ROOT = Path(__file__).resolve().parent.parent
CALLS = ROOT / "fhir_fixtures" / "calls"
NOW = "2026-03-02T12:00:00Z"
TROPONIN = "troponin-without-cath-plan"


def replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["replay", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def catalog_for(rules_dir: Path) -> tuple[Services, Settings]:
    settings = Settings(rules=rules_dir)
    ruleset = load_ruleset(rules_dir).ruleset
    assert ruleset is not None
    return Services.build(ruleset, frozenset(settings.rule_statuses)), settings


@pytest.fixture
def calls(tmp_path: Path, rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A troponin call prefetching every key the current rules ask for, with server and golden files."""
    target = tmp_path / "calls"
    target.mkdir()
    resources = [patient("pt-trop"), for_patient(troponin(), "pt-trop")]
    body = request_for(catalog_for(rules_dir)[0].by_id["nudges-patient-view"], "pt-trop", resources)
    (target / "patient-view-troponin.json").write_bytes(orjson.dumps(body))
    (target / "patient-view-troponin.server.json").write_bytes(orjson.dumps(bundle(*resources)))
    assert main(["replay", str(target), "--rules", str(rules_dir), "--now", NOW, "--update"]) == 0
    capsys.readouterr()
    return target


def test_shipped_fixtures_match_their_golden_files(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the service's default SQLite file would land here if anything wrote
    code, out, _ = replay(capsys, str(CALLS))
    assert code == 0, out
    assert "ok " in out and "(prefetch, fhir-server)" in out
    assert list(tmp_path.iterdir()) == []
    for call in CALLS.glob("*.json"):
        if not call.name.endswith((".golden.json", ".server.json")):
            golden = orjson.loads(call.with_name(call.name.removesuffix(".json") + ".golden.json").read_bytes())
            assert golden["now"] and isinstance(golden["cards"], list)


def test_changed_golden_file_prints_a_diff_and_fails(capsys: pytest.CaptureFixture[str], calls: Path,
                                                     rules_dir: Path) -> None:
    golden = calls / "patient-view-troponin.golden.json"
    data = orjson.loads(golden.read_bytes())
    next(c for c in data["cards"] if c["rule"] == TROPONIN)["summary"] = "an outdated summary"
    golden.write_bytes(orjson.dumps(data))
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir))
    assert code == 1
    # one diff (both data modes agree), the card found by its rule, only the field that changed
    assert out.count("DIFF ") == 1 and f"(prefetch, fhir-server) against {golden}" in out
    assert f"  card {TROPONIN}:\n    summary:\n" in out
    assert "      -an outdated summary\n      +Troponin above its reference range 14 h ago" in out
    assert "detail:" not in out and "suggestions:" not in out
    assert f"  why: nudges explain {calls / 'patient-view-troponin.json'} --rule {TROPONIN}\n" in out
    assert "0 of 1 call(s) match" in out


def test_text_clinicians_read_is_pinned(capsys: pytest.CaptureFixture[str], calls: Path, rules_dir: Path) -> None:
    """Rewording a card's detail or changing an override reason no longer "matches": each shows as its own
    small diff."""
    golden = calls / "patient-view-troponin.golden.json"
    data = orjson.loads(golden.read_bytes())
    card = next(c for c in data["cards"] if c["rule"] == TROPONIN)
    card["detail"] = card["detail"].replace("above the assay's reference range", "above the range")
    card["overrideReasons"][0]["display"] = "an old display"
    golden.write_bytes(orjson.dumps(data))
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir))
    assert code == 1
    lines = out.splitlines()
    assert f"  card {TROPONIN}:" in lines and "    detail:" in lines and "    overrideReasons:" in lines
    assert any(line.startswith("      -") and "above the range" in line for line in lines)
    assert any(line.startswith("      +") and "above the assay's reference range" in line for line in lines)
    assert any(line.startswith("      -") and "an old display" in line for line in lines)
    assert "    summary:" not in lines


def test_update_rewrites_the_golden_file(capsys: pytest.CaptureFixture[str], calls: Path, rules_dir: Path) -> None:
    golden = calls / "patient-view-troponin.golden.json"
    original = orjson.loads(golden.read_bytes())
    changed = {**original, "cards": []}
    golden.write_bytes(orjson.dumps(changed))
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir), "--update")
    assert code == 0, out
    assert "updated " in out
    assert golden.read_text() == render(original)  # the clock came from the golden file's "now"
    assert replay(capsys, str(calls), "--rules", str(rules_dir))[0] == 0


def test_golden_ignores_uuids_and_formatting(capsys: pytest.CaptureFixture[str], calls: Path, rules_dir: Path) -> None:
    golden = calls / "patient-view-troponin.golden.json"
    golden.write_bytes(orjson.dumps(orjson.loads(golden.read_bytes())))  # compact, one line
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir))
    assert code == 0, out
    assert "uuid" not in golden.read_text()


def test_a_clock_is_mandatory(capsys: pytest.CaptureFixture[str], calls: Path, rules_dir: Path) -> None:
    golden = calls / "patient-view-troponin.golden.json"
    golden.unlink()
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir))
    assert code == 1 and "no golden file yet: `nudges replay" in out and "--now INSTANT --update` creates it" in out
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir), "--now", NOW, "--update")
    assert code == 0, out
    assert orjson.loads(golden.read_bytes())["now"] == NOW
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir), "--now", "2026-03-05T12:00:00Z")
    assert code == 1  # three days later the troponin is out of the 72 h window
    assert f"  card {TROPONIN}: expected, not returned" in out


def test_server_mode_fetches_everything_from_the_loopback_server(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, rules_dir: Path) -> None:
    folder = tmp_path / "server-only"
    folder.mkdir()
    body = {"hook": "patient-view", "hookInstance": "replay-server-1",
            "context": {"userId": "Practitioner/example", "patientId": "pt-srv"}}
    (folder / "served.json").write_bytes(orjson.dumps(body))
    served = [patient("pt-srv"), for_patient(troponin("trop-srv"), "pt-srv"), coverage("cov-srv", "pt-srv"),
              for_patient(troponin("trop-other", value=900), "someone-else")]
    server = folder / "served.server.json"
    server.write_bytes(orjson.dumps(bundle(*served)))
    code, out, _ = replay(capsys, str(folder), "--rules", str(rules_dir), "--now", NOW, "--update")
    assert code == 0, out
    assert "(fhir-server)" in out
    cards = orjson.loads((folder / "served.golden.json").read_bytes())["cards"]
    assert [c["rule"] for c in cards].count(TROPONIN) == 1
    trop = next(c for c in cards if c["rule"] == TROPONIN)
    resource = trop["suggestions"][0]["actions"][0]["resource"]
    assert resource["reasonReference"] == [{"reference": "Observation/trop-srv"}]

    # The served data decides: a normal troponin on the server and the card is gone.
    server.write_bytes(orjson.dumps(bundle(patient("pt-srv"), for_patient(troponin("trop-srv", value=5), "pt-srv"))))
    code, out, _ = replay(capsys, str(folder), "--rules", str(rules_dir))
    assert code == 1
    assert "DIFF " in out and "(fhir-server)" in out and f"  card {TROPONIN}: expected, not returned" in out


def test_server_data_that_disagrees_with_prefetch_is_reported(
        capsys: pytest.CaptureFixture[str], calls: Path, rules_dir: Path) -> None:
    server = calls / "patient-view-troponin.server.json"
    server.write_bytes(orjson.dumps(bundle(patient("pt-trop"), for_patient(cath_order("cath", "pt-trop"), "pt-trop"),
                                           for_patient(troponin(), "pt-trop"))))
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir))
    assert code == 1
    assert "DIFF " in out and "patient-view-troponin.json (fhir-server)" in out
    assert "(prefetch)" not in out.split("DIFF")[1].splitlines()[0]


def test_a_call_without_prefetch_or_server_data_is_an_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, rules_dir: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    body = {"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/a", "patientId": "p"}}
    (folder / "bare.json").write_bytes(orjson.dumps(body))
    (folder / "not-a-call.json").write_bytes(orjson.dumps(bundle(patient("p"))))
    code, out, _ = replay(capsys, str(folder), "--rules", str(rules_dir), "--now", NOW)
    assert code == 1
    assert "ERROR" in out and "bare.server.json" in out and "1 call(s)" in out


# -- NDJSON -----------------------------------------------------------------------------------------
def counts(out: str) -> dict[str, tuple[int, int]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rule "))
    return {parts[0]: (int(parts[1]), int(parts[2])) for parts in (line.split() for line in lines[start + 1:])}


def test_ndjson_export_counts_cards_per_rule(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              rules_dir: Path) -> None:
    data = bulk_export(tmp_path / "export", 300)
    code, out, err = replay(capsys, str(tmp_path / "export"), "--rules", str(rules_dir), "--now", NOW)
    assert code == 0, out + err
    assert "6 file(s)" in out and "for 300 patient(s), 4 without a patient, 1 invalid line(s)" in out
    invalid = next(line for line in out.splitlines() if line.startswith("  invalid "))
    where = re.escape(str(tmp_path / "export" / "Observation.002.ndjson"))
    assert re.match(rf"  invalid {where}:\d+: not JSON", invalid), invalid  # the file and line of each
    assert "297 patient(s) screened, 3 skipped" in out  # 3 named only by references: no Patient resource
    table = counts(out)
    assert table[TROPONIN] == (297, 49)  # raised troponin and no cath order: i % 3 == 0 and i % 6 != 0
    assert "replay: screening 100% 300 patients" in err and "replay: reading the export 100%" in err  # no TTY

    # Every rule's count equals evaluating each patient's data as one call: the grouping lost nothing.
    catalog, settings = catalog_for(rules_dir)
    service = catalog.by_id["nudges-patient-view"]
    expected = dict.fromkeys(table, 0)
    for pid, resources in data.items():
        if not any(r["resourceType"] == "Patient" for r in resources):
            continue  # skipped (screening.calls.NO_PATIENT)
        body = request_for(service, pid, resources)
        assert body is not None
        for record in run_body(catalog, settings, body, parse_instant(NOW)).records:
            expected[record.rule_id] += 1
    assert {rule: cards for rule, (_, cards) in table.items()} == expected

    # Deterministic: the same report again, and a single file works as the argument too.
    assert replay(capsys, str(tmp_path / "export"), "--rules", str(rules_dir), "--now", NOW)[1] == out
    code, out, _ = replay(capsys, str(tmp_path / "export" / "Patient.ndjson"), "--rules", str(rules_dir),
                          "--now", NOW)
    assert code == 0 and "297 patient(s) screened" in out and counts(out)[TROPONIN] == (297, 0)


def test_ndjson_encounter_hook_and_clock(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         rules_dir: Path) -> None:
    folder = tmp_path / "export"
    bulk_export(folder, 12)
    encounter = {"resourceType": "Encounter", "id": "enc-0", "status": "in-progress", "class": {"code": "AMB"},
                 "subject": {"reference": "Patient/bulk-0003"}, "period": {"start": "2026-03-02T11:00:00Z"}}
    (folder / "Encounter.ndjson").write_bytes(ndjson(encounter))
    code, _, err = replay(capsys, str(folder), "--rules", str(rules_dir))
    assert code == 1 and "needs --now" in err
    code, out, _ = replay(capsys, str(folder), "--rules", str(rules_dir), "--now", NOW, "--hook", "encounter-start")
    assert code == 0, out
    assert "1 patient(s) screened, 11 skipped" in out and "skipped 11: no Encounter" in out
    assert counts(out)[TROPONIN] == (1, 1)


def test_replay_never_calls_a_recorded_fhir_server(capsys: pytest.CaptureFixture[str], calls: Path,
                                                   rules_dir: Path) -> None:
    call = calls / "patient-view-troponin.json"
    body = orjson.loads(call.read_bytes())
    del body["prefetch"]["observation"]
    body["fhirServer"] = "https://ehr.invalid/fhir"
    call.write_bytes(orjson.dumps(body))
    (calls / "patient-view-troponin.server.json").unlink()
    code, out, _ = replay(capsys, str(calls), "--rules", str(rules_dir))
    assert code == 1
    assert "would answer 412" in out and "no fhirServer given" in out
