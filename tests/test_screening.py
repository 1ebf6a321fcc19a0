"""`nudges screen` on exports generated here, on a local Dask cluster (one for the module, two workers):
the same output whatever the number of workers, the same cards as each patient's hook call, medications
named by reference, every line and patient accounted for, patient ids only where `--out` says."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from helpers import bulk_export, coverage, for_patient, ndjson

from nudges.cli import main
from nudges.clock import parse_instant
from nudges.pipeline import run_body
from nudges.rules.compiler import load_ruleset
from nudges.screening.calls import request_for
from nudges.screening.shards import plan_chunks, split_chunk
from nudges.screening.tasks import Job, ScreenError, services_for
from nudges.services import Services
from nudges.settings import Settings
from nudges.tools.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-03-02T12:00:00Z"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ARNI = {"system": RXNORM, "code": "1656339", "display": "sacubitril 24 MG / valsartan 26 MG Oral Tablet"}
ARNI_RULE = """id: arni-order
title: An ARNI order (a rule of this test)
status: experimental
version: 1.0.0
hooks: [patient-view]
topic: cost-barriers
owner: tests
when:
  all:
    - as: order
      resource: MedicationRequest
      codes: sacubitril-valsartan
card:
  summary: "ARNI ordered {{order.elapsed}} ago"
  indicator: info
rationale: a test of medications named by reference
citations: [{title: A test, publisher: nudges, year: 2026, url: "https://example.org/test"}]
falsepositives: ["none: a test rule"]
"""
ARNI_SET = """name: sacubitril-valsartan
title: Sacubitril/valsartan products
source: a test
version: "1"
date: "2026-01-01"
codes:
  - system: http://www.nlm.nih.gov/research/umls/rxnorm
    code: "1656339"
    display: "sacubitril 24 MG / valsartan 26 MG Oral Tablet"
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local Dask cluster of two worker processes for the module; its scheduler's address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The frozen test rules plus one that reads medication orders (experimental: served only where the
    rule statuses say so)."""
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "tests" / "rules", project / "rules")
    for folder in ("seeds", "fhir_fixtures"):
        shutil.copytree(ROOT / folder, project / folder)
    (project / "rules" / "cost").mkdir()
    (project / "rules" / "cost" / "arni-order.yaml").write_text(ARNI_RULE)
    (project / "rules" / "valuesets" / "sacubitril-valsartan.yaml").write_text(ARNI_SET)
    return project / "rules"


def order(oid: str, pid: str, **medication: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": oid, "status": "active", "intent": "order",
            "subject": {"reference": f"Patient/{pid}"}, "authoredOn": "2026-02-20T10:00:00Z", **medication}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 patients (troponin cards for 50, see helpers.bulk_export), an invalid line, and ARNI orders
    coded inline, by a contained Medication, by Medication/id (two patients share one), and one naming a
    Medication the export does not have; a few encounters."""
    folder = tmp_path_factory.mktemp("screen") / "export"
    bulk_export(folder, 300)
    orders = [order("o-inline", "bulk-0001", medicationCodeableConcept={"coding": [ARNI]}),
              order("o-contained", "bulk-0002", contained=[{"resourceType": "Medication", "id": "m",
                                                            "code": {"coding": [ARNI]}}],
                    medicationReference={"reference": "#m"}),
              order("o-ref-a", "bulk-0004", medicationReference={"reference": "Medication/arni"}),
              order("o-ref-b", "bulk-0005", medicationReference={"reference": "Medication/arni"}),
              order("o-missing", "bulk-0007", medicationReference={"reference": "Medication/gone"}),
              order("o-other", "bulk-0008", medicationCodeableConcept={"coding": [{"system": RXNORM, "code": "1"}]})]
    (folder / "MedicationRequest.ndjson").write_bytes(ndjson(*orders))
    (folder / "Medication.ndjson").write_bytes(ndjson(
        {"resourceType": "Medication", "id": "arni", "code": {"coding": [ARNI]}},
        {"resourceType": "Medication", "id": "unused", "code": {"text": "something else"}}))
    encounters = [{"resourceType": "Encounter", "id": f"enc-{i}", "status": "in-progress", "class": {"code": "AMB"},
                   "subject": {"reference": f"Patient/bulk-{i:04d}"}, "period": {"start": "2026-03-02T11:00:00Z"}}
                  for i in (3, 9, 10)]
    (folder / "Encounter.ndjson").write_bytes(ndjson(*encounters) + b'{"no": "resourceType"}\n')
    return folder


@pytest.fixture(autouse=True)
def _experimental_rules_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUDGES_RULE_STATUSES", '["active", "experimental"]')


def screen(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["screen", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def two_workers(cluster: str, export: Path, rules: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NUDGES_RULE_STATUSES", '["active", "experimental"]')
        assert main(["screen", str(export), "--now", NOW, "--rules", str(rules), "--scheduler", cluster,
                     "--out", str(out)]) == 0
    return out


def test_one_worker_and_two_give_byte_identical_outputs(capsys: pytest.CaptureFixture[str], two_workers: Path,
                                                        export: Path, rules: Path, tmp_path: Path) -> None:
    code, out, err = screen(capsys, str(export), "--now", NOW, "--rules", str(rules), "--workers", "1",
                            "--out", str(tmp_path / "one"))
    assert code == 0, err
    assert "on 1 worker(s)" in err
    one, two = files_under(tmp_path / "one"), files_under(two_workers)
    assert sorted(one) == sorted(two) == ["equity.csv", "skipped.csv", "summary.json",
                                          *sorted(f"worklists/{r}.{kind}" for r in
                                                  ("arni-order", "race-free-egfr", "troponin-without-cath-plan")
                                                  for kind in ("csv", "parquet"))]
    assert one == two
    assert "297 patient(s) screened, 3 skipped" in out  # 3 appear only through references (no Patient)
    assert ".nudges-screen-" not in str(list((tmp_path / "one").iterdir()))


def test_worklists_hold_the_cards_each_patients_hook_call_gives(two_workers: Path, export: Path,
                                                                rules: Path) -> None:
    """Every row is a card the patient's own call (all of their resources, run_body) returns, and every
    such card is a row: leaving unread resources out, sharding and rendering only the card's head
    (cards.card_head) changed nothing."""
    settings = Settings(rules=rules, rule_statuses=["active", "experimental"])
    ruleset = load_ruleset(rules).ruleset
    assert ruleset is not None
    services = Services.build(ruleset, frozenset(settings.rule_statuses))
    service = services.for_hook("patient-view")
    per_patient: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(export.glob("*.ndjson")):
        for line in path.read_bytes().splitlines():
            try:
                resource = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if resource.get("resourceType") == "Medication":
                continue
            from nudges.fhir import patient_of

            pid = patient_of(resource)
            if pid:
                per_patient.setdefault(pid, []).append(resource)
    medications = [orjson.loads(line) for line in (export / "Medication.ndjson").read_bytes().splitlines()]
    expected = set()
    for pid, resources in per_patient.items():
        if not any(r["resourceType"] == "Patient" for r in resources):
            continue  # no EHR calls for a patient it does not have: skipped (NO_PATIENT)
        body = request_for(service, pid, resources + medications)  # as an EHR that _includes Medications
        assert body is not None
        for issued in run_body(services, settings, body, parse_instant(NOW)).issued:
            expected.add((issued.rule_id, pid, issued.card["summary"], issued.card["indicator"]))
    found = set()
    for path in sorted((two_workers / "worklists").glob("*.csv")):
        rows = csv_rows(path)
        assert [r["patient_id"] for r in rows] == sorted(r["patient_id"] for r in rows)  # sorted by patient
        found |= {(r["rule"], r["patient_id"], r["summary"], r["indicator"]) for r in rows}  # as the full card
        table = pq.read_table(path.with_suffix(".parquet")).to_pylist()
        assert [(t["patient_id"], t["rule"], t["summary"]) for t in table] == \
            [(r["patient_id"], r["rule"], r["summary"]) for r in rows]
    assert found == expected and len(found) == 49 + 4  # bulk-0099 (no Patient) skipped
    trop = csv_rows(two_workers / "worklists" / "troponin-without-cath-plan.csv")
    assert trop[0]["patient_id"] == "bulk-0003" and trop[0]["indicator"] == "warning"
    assert trop[0]["evidence"].startswith("troponin = Observation/trop-3 (2026-03-01T22:00:00Z;")
    assert "212 ng/L" in trop[0]["evidence"]
    evidence = pq.read_table(two_workers / "worklists" / "troponin-without-cath-plan.parquet").to_pylist()[0]
    assert evidence["evidence"] == [{"name": "troponin", "reference": "Observation/trop-3",
                                     "date": "2026-03-01T22:00:00Z", "display": evidence["evidence"][0]["display"],
                                     "value": "212 ng/L"}]


def test_medications_named_by_reference_reach_the_orders_that_name_them(two_workers: Path) -> None:
    arni = csv_rows(two_workers / "worklists" / "arni-order.csv")
    assert [r["patient_id"] for r in arni] == ["bulk-0001", "bulk-0002", "bulk-0004", "bulk-0005"]
    summary = orjson.loads((two_workers / "summary.json").read_bytes())
    assert summary["medications"] == {"resources": 2, "joined": 2, "unresolved": 1}
    assert summary["rules"]["arni-order"] == {"cards": 4, "errors": 0}


def test_every_line_and_patient_is_accounted_for(two_workers: Path, capsys: pytest.CaptureFixture[str],
                                                 cluster: str, export: Path, rules: Path, tmp_path: Path) -> None:
    summary = orjson.loads((two_workers / "summary.json").read_bytes())
    assert summary["invalid_lines"] == [
        f"{export / 'Encounter.ndjson'}:4: not a FHIR resource (no resourceType)",
        f"{export / 'Observation.002.ndjson'}:151: not JSON (unexpected character, expected a string key: "
        "line 1 column 2 (char 1))"]
    assert summary["without_patient"] == 4 and summary["patients"] == 300 and summary["screened"] == 297
    # the three that appear only through their references are not people the export knows: skipped
    no_patient = [r for r in csv_rows(two_workers / "skipped.csv") if r["reason"].startswith("no Patient resource")]
    assert [r["patient_id"] for r in no_patient] == ["bulk-0099", "bulk-0199", "bulk-0299"]
    code, out, err = screen(capsys, str(export), "--now", NOW, "--rules", str(rules), "--scheduler", cluster,
                            "--hook", "encounter-start", "--out", str(tmp_path / "enc"))
    assert code == 0, err
    assert "3 patient(s) screened, 297 skipped" in out and "skipped 294: no Encounter (the hook needs one)" in out
    skipped = csv_rows(tmp_path / "enc" / "skipped.csv")
    assert len(skipped) == 297 and skipped[0] == {"patient_id": "bulk-0000", "reason": "no Encounter (the hook "
                                                                                       "needs one)"}
    assert "invalid " in out and "Observation.002.ndjson:151" in out


def test_without_out_nothing_with_patient_ids_is_written(capsys: pytest.CaptureFixture[str], cluster: str,
                                                         export: Path, rules: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    code, out, err = screen(capsys, str(export), "--now", NOW, "--rules", str(rules), "--scheduler", cluster)
    assert code == 0, err
    assert "bulk-0" not in out + err
    assert "equity view (no --out: no worklists written)" in out and "payer_class" in out
    assert list(tmp_path.iterdir()) == []  # the shards were in a temporary folder here, and are gone


def test_equity_view_suppresses_small_cells_and_their_complements(two_workers: Path) -> None:
    rows = csv_rows(two_workers / "equity.csv")
    text = (two_workers / "equity.csv").read_text()
    assert "bulk-" not in text
    trop = {(r["dimension"], r["group"]): r for r in rows if r["rule"] == "troponin-without-cath-plan"}
    # every third patient has a raised troponin, every sixth also a cath order: the 50 are all odd (medicaid)
    assert trop[("overall", "all")] == {**trop[("overall", "all")], "screened": "297", "fired": "49",
                                        "rate": "0.165"}  # bulk-0099 has no Patient: skipped
    assert trop[("payer_class", "medicaid")]["fired"] == "49" and trop[("payer_class", "private")]["fired"] == "0"
    arni = {(r["dimension"], r["group"]): r for r in rows if r["rule"] == "arni-order"}
    assert arni[("overall", "all")]["fired"] == "<11"  # 4 patients
    payer = [arni[("payer_class", g)]["fired"] for g in ("medicaid", "private")]
    assert payer.count("<11") >= 1 and set(payer) <= {"<11", "hidden"}  # the other one may not be shown


def test_chunks_split_at_line_ends_and_count_lines_per_file(tmp_path: Path) -> None:
    """Every line is read by exactly one chunk wherever the byte ranges fall, and an invalid line is
    reported by its number in the file."""
    lines = [orjson.dumps(for_patient(coverage(f"c{i}", f"p{i % 7}"), f"p{i % 7}")) for i in range(40)]
    lines[17] = b"{broken"
    path = tmp_path / "Coverage.ndjson"
    path.write_bytes(b"\r\n".join(lines))  # CRLF, and no newline at the end
    from nudges.screening.run import Tally

    for size in (1, 7, 64, 333, 10_000):
        work = tmp_path / f"work-{size}"
        tallies = [split_chunk(chunk, 3, work) for chunk in plan_chunks([path], chunk_bytes=size)]
        tally = Tally()
        tally.add_chunks(tallies)
        assert (tally.lines, tally.resources, len(tally.invalid)) == (40, 39, 1)
        assert tally.invalid[0].startswith(f"{path}:18: not JSON (")
        written = sorted(line for part in work.rglob("*.part") for line in part.read_bytes().splitlines())
        assert len(written) == 39
    bom = tmp_path / "bom" / "Coverage.ndjson"  # as a Windows editor saves it: the first line is a resource too
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:3]))
    tally = Tally()
    tally.add_chunks([split_chunk(chunk, 3, tmp_path / "work-bom") for chunk in plan_chunks([bom])])
    assert (tally.resources, tally.invalid) == (3, [])


def test_a_line_left_out_is_still_checked_and_a_line_kept_is_parsed(tmp_path: Path) -> None:
    """The split reads each line's head (msgspec) and parses in full only what it keeps: a line it leaves
    out unparsed is still checked as UTF-8, a kept one is parsed by orjson (as screening will), and each
    fault is reported by its line, as when every line was parsed."""
    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    heads = Services.build(ruleset, frozenset({"active"})).for_hook("patient-view").index.heads
    local = b'{"resourceType":"Observation","subject":{"reference":"Patient/p1"},' \
            b'"code":{"coding":[{"system":"http://hospital.example.org/vitals","code":"HR"}]}'
    lines = [
        orjson.dumps(for_patient(coverage("c1", "p1"), "p1")),  # Coverage: every call reads it
        local + b',"effectiveDateTime":"\xff"}',  # a vital sign no rule reads, not UTF-8
        local + b',"valueQuantity":{"value":1}}',
        b'{"resourceType":"Coverage","id":"c2","beneficiary":{"reference":"Patient/p1"},"extra":1e999}',
        b"[1]",
        b'{"resourceType":"Observation","subject":"Patient/p1"}',  # a subject that is not a Reference: no patient
        b'{"resourceType":"Coverage","id":"c3","beneficiary":{"reference":"Patient/p1"}',  # cut short
        b'{"resourceType":"Observation","subject":{"reference":"Patient/p1"},"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"resourceType":"Coverage","beneficiary":{"reference":"Patient/p1"},"x":' + b"[" * 1010 + b"]" * 1010 + b"}",
    ]
    path = tmp_path / "mixed.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    work = tmp_path / "work"
    [tally] = [split_chunk(chunk, 3, work, heads) for chunk in plan_chunks([path])]
    faults = dict(tally.invalid)
    assert sorted(faults) == [2, 4, 5, 7, 8] and "depth limit exceeded" in faults[8]  # too deep for orjson too
    assert faults[2].startswith("not JSON (str is not valid UTF-8")
    assert faults[4].startswith("not JSON (number is infinity")
    assert faults[5] == "not a FHIR resource (no resourceType)" and faults[7].startswith("not JSON (")
    assert (tally.resources, tally.unread, tally.unlinked) == (3, 1, 1)
    written = [line for part in work.rglob("*.part") for line in part.read_bytes().splitlines()]
    assert written == [b"p1\t" + lines[0], b"p1\t" + lines[8]]  # too deep for msgspec, not for orjson: kept


def test_a_worker_refuses_a_rule_set_that_changed(rules: Path) -> None:
    job = Job(str(rules), None, ("active",), "not-the-digest", "patient-view", NOW, "")
    with pytest.raises(ScreenError, match="not the one this run started with"):
        services_for(job)


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, plain = Terminal(), io.StringIO()
    for stream in (tty, plain):
        progress = Progress(200, "bytes", stream, plain=True, delay=0, prefix="screen: screening ", counts=False)
        for done in range(0, 201, 20):
            progress.step(done, f"{done} patients")
        progress.finish()
    assert "\r" in tty.getvalue() and "[#########################] 100% 200 patients" in tty.getvalue()
    assert plain.getvalue().splitlines()[-1] == "screen: screening 100% 200 patients" and "\r" not in plain.getvalue()


def test_bad_arguments_are_explained(capsys: pytest.CaptureFixture[str], export: Path, rules: Path,
                                     tmp_path: Path) -> None:
    assert screen(capsys, str(export), "--now", "yesterday", "--rules", str(rules))[2].startswith(
        "nudges screen: --now 'yesterday' is not an ISO 8601 instant")
    code, _, err = screen(capsys, str(tmp_path / "nothing"), "--now", NOW, "--rules", str(rules), "--workers", "1")
    assert code == 1 and "no such file or folder" in err
    code, _, err = screen(capsys, str(export), "--now", NOW, "--rules", str(rules), "--lists")
    assert code == 2 and "--lists writes to the FHIR server" in err
    code, _, err = screen(capsys, "http://127.0.0.1:9/fhir", "--now", NOW, "--rules", str(rules))
    assert code == 1 and "name the folder with --download DIR" in err


def test_a_record_that_cannot_be_evaluated_is_skipped_with_its_reason(
        capsys: pytest.CaptureFixture[str], rules: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process (replay runs the same code): a failure inside one patient's call is counted, the
    others are screened."""
    from nudges import pipeline

    folder = tmp_path / "export"
    bulk_export(folder, 12)
    original = pipeline.build_record

    def fragile(call: Any, index: Any = None) -> Any:
        if call.context["patientId"] == "bulk-0003":
            raise TypeError("a record this code cannot handle")
        return original(call, index)

    monkeypatch.setattr(pipeline, "build_record", fragile)
    assert main(["replay", str(folder), "--rules", str(rules), "--now", NOW]) == 0
    out = capsys.readouterr().out
    assert "11 patient(s) screened, 1 skipped" in out
    assert "skipped 1: could not be evaluated (TypeError: malformed data?)" in out


def test_leaving_out_what_no_rule_reads_changes_no_card_of_the_shipped_catalog() -> None:
    """IndexPlan.reads on the shipped rules and fixture records, every hook a screen can run: each
    patient's cards from the whole record and from what the screen keeps of it are the same."""
    from nudges.hooks import RECORD_HOOKS
    from nudges.screening.calls import screen_patient

    ruleset = load_ruleset(ROOT / "rules").ruleset
    assert ruleset is not None
    services = Services.build(ruleset, frozenset({"active"}))
    now = parse_instant(NOW)
    compared = fired = left_out = 0
    for path in sorted((ROOT / "fhir_fixtures" / "patients").glob("*.json")):
        resources = [e["resource"] for e in orjson.loads(path.read_bytes()).get("entry", [])]
        pid = next((r["id"] for r in resources if r["resourceType"] == "Patient"), None)
        if pid is None:
            continue
        for hook in RECORD_HOOKS:
            service = services.for_hook(hook)
            kept = [r for r in resources if service.index.reads(r) or r["resourceType"] == "Encounter"]
            whole, part = (screen_patient(services, service, pid, rs, now) for rs in (resources, kept))
            assert (whole.fired, whole.skipped, whole.bucket) == (part.fired, part.skipped, part.bucket), path.name
            compared += 1
            fired += len(whole.fired)
            left_out += len(resources) - len(kept)
    assert compared >= 90 and fired >= 20 and left_out >= 20  # the check is not vacuous


def test_a_stopped_screen_leaves_no_patient_data_behind(rules: Path, tmp_path: Path) -> None:
    """SIGTERM (a batch scheduler's or a container's stop) mid-run: the shards, which hold the whole
    export, are removed, and the exit status says it was stopped (143, as the shell reports a SIGTERM)."""
    export = tmp_path / "export"
    bulk_export(export, 300)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "nudges.cli", "screen", str(export), "--now", NOW, "--rules",
                                str(rules), "--workers", "1", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out.exists() and any(p.name.startswith(".nudges-screen-") for p in out.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err.decode()
    assert b"stopped (SIGTERM)" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".nudges-screen-")]


def test_a_small_groups_size_is_withheld_alike_under_every_rule() -> None:
    """A group's size (`screened`) is the same under every rule: its complements chosen per rule, one rule
    hid a group's size that another showed, and the overall count less the shown sizes gave the small
    group's (a patient with unknown ethnicity, alone). Chosen once per dimension now."""
    from nudges.screening.outputs import Firing, equity_rows

    sizes = {"hispanic-latino": 120, "not-hispanic-latino": 169, "unknown": 1}
    fired = {"a": {"hispanic-latino": 3, "not-hispanic-latino": 40, "unknown": 0},
             "b": {"hispanic-latino": 60, "not-hispanic-latino": 0, "unknown": 1},
             "c": {"hispanic-latino": 20, "not-hispanic-latino": 30, "unknown": 0}}
    cells = []
    for rule, counts in fired.items():
        cells.append(Firing(rule, "overall", "all", sum(sizes.values()), sum(counts.values())))
        cells += [Firing(rule, "ethnicity", g, n, counts[g]) for g, n in sizes.items()]
    rows = equity_rows(cells)
    shown = {rule: {r["group"]: r["screened"] for r in rows if r["rule"] == rule and r["dimension"] == "ethnicity"
                    and isinstance(r["screened"], int)} for rule in fired}
    assert shown["a"] == shown["b"] == shown["c"]  # the same sizes under every rule
    withheld = set(sizes) - set(shown["a"])
    assert "unknown" in withheld and len(withheld) >= 2 and sum(sizes[g] for g in withheld) >= 11
    everyone = {r["screened"] for r in rows if r["dimension"] == "overall"}
    assert everyone == {290}  # the population, as summary.json says it
