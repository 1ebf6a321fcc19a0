"""`nudges screen` against a FHIR server's `$export` (sekmet-fhir on loopback, with SMART Backend Services
on): kick-off, polling, download with the service's own token, resuming, `_since` in UTC, a Group, clear
errors, FHIR List worklists written once. In this process (no cluster: the Dask path is
tests/test_screening.py's)."""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from helpers import cath_order, coverage, for_patient, patient, troponin
from sekmet_fhir import Sekmet, running_sekmet, smart_settings

from nudges.screening.command import Options, run
from nudges.screening.source import STATE, Exporter, ExportFailed, ExportRequest
from nudges.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-03-02T12:00:00Z"
TROPONIN = "troponin-without-cath-plan"
PATIENTS = 24  # every third with a raised troponin, every sixth of those also with a cath order


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("keys") / "backend.pem"
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return path, {**public, "kid": "k1", "alg": "RS384", "use": "sig"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, key: tuple[Path, dict[str, Any]]) -> Iterator[Sekmet]:
    with running_sekmet(tmp_path_factory.mktemp("sekmet"), smart_settings({"keys": [key[1]]})) as srv:
        srv.login()  # the tests' own client, for loading and reading back
        load(srv)
        yield srv


def load(srv: Sekmet) -> None:
    """Patients with troponins, cath orders and coverage, written with client ids (PUT), and a Group."""
    entries = []
    for i in range(PATIENTS):
        pid = f"scr-{i:03d}"
        resources = [patient(pid), for_patient(troponin(f"trop-{i}", value=212 if i % 3 == 0 else 12), pid),
                     coverage(f"cov-{i}", pid, "2" if i % 2 else "5")]
        if i % 6 == 0:
            resources.append(cath_order(f"cath-{i}", pid))
        entries += [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                    for r in resources]
    entries.append({"resource": {"resourceType": "Group", "id": "navigated", "type": "person", "actual": True,
                                 "member": [{"entity": {"reference": f"Patient/scr-{i:03d}"}} for i in (3, 4, 9)]},
                    "request": {"method": "PUT", "url": "Group/navigated"}})
    answer = srv.http.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, timeout=60)
    assert answer.status_code == 200, answer.text


@pytest.fixture
def config(tmp_path: Path, server: Sekmet, key: tuple[Path, dict[str, Any]]) -> Path:
    path = tmp_path / "nudges.yaml"
    path.write_text(json.dumps({"fhir_backend_clients": [{
        "base": server.base, "token_url": server.token_url, "client_id": "nudges", "private_key_file": str(key[0]),
        "key_id": "k1", "algorithm": "RS384", "scope": "system/*.rs system/List.cu"}]}))
    return path


def screen(source: str, **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    values = {"rules": ROOT / "tests" / "rules", "in_process": True, **options}
    code = run(Options(source, NOW, **values), out, err)
    return code, out.getvalue(), err.getvalue()


def counts(out: str) -> dict[str, tuple[int, int]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rule "))
    table = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) != 5 or not parts[1].isdigit():
            break
        table[parts[0]] = (int(parts[1]), int(parts[2]))
    return table


def test_export_is_kicked_off_polled_downloaded_with_the_services_token_and_screened(
        server: Sekmet, config: Path, tmp_path: Path) -> None:
    code, out, err = screen(server.base, config=config, out=tmp_path / "out")
    assert code == 0, err
    assert "export: kicked off" in err
    assert counts(out)[TROPONIN] == (PATIENTS, 4)  # i = 3, 9, 15, 21
    state = orjson.loads((tmp_path / "out" / "export" / STATE).read_bytes())
    assert state["complete"] and state["manifest"]["requiresAccessToken"] is True
    assert set(state["request"]["types"]) >= {"Patient", "Observation", "ServiceRequest", "Coverage"}
    assert sorted(p.name for p in (tmp_path / "out" / "export").glob("*.ndjson")) == [
        "0001.Coverage.ndjson", "0002.Observation.ndjson", "0003.Patient.ndjson", "0004.ServiceRequest.ndjson"]
    rows = (tmp_path / "out" / "worklists" / f"{TROPONIN}.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["scr-003", "scr-009", "scr-015", "scr-021"]

    # Run again: the complete download is used as it is, nothing is asked of the server.
    code, again, err = screen(server.base, config=config, out=tmp_path / "out")
    assert code == 0, err
    assert "using the one already downloaded" in err and "kicked off" not in err
    assert counts(again) == counts(out)


def test_an_interrupted_export_resumes_where_it_stopped(server: Sekmet, config: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(config)
    request = ExportRequest(server.base, types=("Patient", "Observation", "ServiceRequest", "Coverage"))
    folder = tmp_path / "download"

    async def stopped(self: Exporter, http: Any, request: ExportRequest) -> dict[str, Any]:
        raise ExportFailed("interrupted")  # as if the command were stopped right after the kick-off

    monkeypatch.setattr(Exporter, "_poll", stopped)
    with pytest.raises(ExportFailed, match="interrupted"):
        Exporter(settings, folder, io.StringIO()).run(request)
    monkeypatch.undo()
    status = orjson.loads((folder / STATE).read_bytes())["status_url"]

    # The same job is polled again (not a second export); the connection drops in the second file.
    whole = Exporter._download
    calls = []

    async def dropped(self: Exporter, http: Any, name: str, entry: dict[str, Any], token_ok: bool) -> None:
        calls.append(name)
        if len(calls) == 2:
            (self.folder / f"{name}.part").write_bytes(b'{"resourceType": "Obse')
            raise ExportFailed("connection dropped")
        await whole(self, http, name, entry, token_ok)

    monkeypatch.setattr(Exporter, "_download", dropped)
    err = io.StringIO()
    with pytest.raises(ExportFailed, match="connection dropped"):
        Exporter(settings, folder, err).run(request)
    assert f"resuming the job at {status}" in err.getvalue() and "kicked off" not in err.getvalue()
    monkeypatch.undo()

    err = io.StringIO()
    files = Exporter(settings, folder, err).run(request)  # the first file is kept, the cut one fetched again
    assert "downloading 1/3" in err.getvalue() and calls[0] not in err.getvalue()
    assert [p.name for p in files] == ["0001.Coverage.ndjson", "0002.Observation.ndjson", "0003.Patient.ndjson",
                                       "0004.ServiceRequest.ndjson"]
    observations = [orjson.loads(line) for line in files[1].read_bytes().splitlines()]
    assert len(observations) == PATIENTS and not list(folder.glob("*.part"))

    with pytest.raises(ExportFailed, match="holds another export"):
        Exporter(settings, folder, io.StringIO()).run(ExportRequest(server.base, level="system"))


def test_since_is_sent_in_utc_and_a_group_exports_its_members(server: Sekmet, config: Path, tmp_path: Path) -> None:
    future = "2999-01-01T01:00:00+01:00"  # the same instant as 00:00Z: sekmet compares text, so only Z works
    code, out, err = screen(server.base, config=config, download=tmp_path / "later", since=future)
    assert code == 0, err
    assert orjson.loads((tmp_path / "later" / STATE).read_bytes())["request"]["since"] == "2999-01-01T00:00:00Z"
    assert "0 patient(s) screened" in out
    code, out, err = screen(server.base, config=config, download=tmp_path / "group", group="navigated")
    assert code == 0, err
    assert "3 patient(s) screened" in out and counts(out)[TROPONIN] == (3, 2)  # scr-003 and scr-009
    code, out, err = screen(server.base, config=config, download=tmp_path / "system", level="system")
    assert code == 0, err
    assert f"{PATIENTS} patient(s) screened" in out and "$export; status at" in err and "/Patient/$export" not in err


def test_refusals_and_failures_are_explained(server: Sekmet, config: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from nudges.screening import source

    monkeypatch.setattr(source, "BACKOFF", 0.01)
    code, _, err = screen(server.base, download=tmp_path / "anonymous")  # no credentials for this server
    assert code == 1 and "nudges screen: the server refused the export" in err and "HTTP 401" in err
    code, _, err = screen(server.base, config=config, download=tmp_path / "nogroup", group="nope")
    assert code == 1 and "HTTP 404: Group/nope not found" in err
    code, _, err = screen("http://127.0.0.1:9/fhir", download=tmp_path / "nowhere")
    assert code == 1 and "unreachable after 5 attempts" in err


@contextmanager
def fake_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A FHIR base URL served by `handler` on a free loopback port, for the length of the block."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/fhir"
    finally:
        httpd.shutdown()
        httpd.server_close()


class NeverDone(BaseHTTPRequestHandler):
    """A server whose export never completes: what a timeout looks like."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(202)
        self.send_header("Content-Location", "/fhir/bulk-status/forever")
        self.send_header("Retry-After", "1")
        self.send_header("X-Progress", "still collecting")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_an_export_that_does_not_finish_in_time_says_how_to_go_on(tmp_path: Path) -> None:
    with fake_server(NeverDone) as base:
        code, _, err = screen(base, download=tmp_path / "slow", export_timeout=0.5)
    assert code == 1 and "export: still collecting" in err
    assert f"did not complete within 0.5 s; it may still be running at {base}/bulk-status/forever: run the same " \
           "command again to keep waiting for it" in err


def test_worklists_are_written_as_fhir_lists_once(server: Sekmet, config: Path, tmp_path: Path) -> None:
    from fhir.resources.R4B.list import List as FhirList

    for _ in range(2):  # a second run replaces the Lists rather than adding more
        code, out, err = screen(server.base, config=config, out=tmp_path / "out", lists=True)
        assert code == 0, err
        assert "FHIR List resources written: 2" in out
    found = server.http.get("/List", params={"_count": 100}).json()
    lists = {r["resource"]["code"]["coding"][0]["code"]: r["resource"] for r in found.get("entry", [])}
    assert sorted(lists) == ["race-free-egfr", TROPONIN] and found["total"] == 2
    trop = lists[TROPONIN]
    FhirList.model_validate({k: v for k, v in trop.items() if k != "meta"})
    assert [e["item"]["reference"] for e in trop["entry"]] == [f"Patient/scr-{i:03d}" for i in (3, 9, 15, 21)]
    assert trop["identifier"][0]["value"] == f"{TROPONIN}/patient-view/{NOW}/patient" and trop["mode"] == "working"
    assert "entry" not in lists["race-free-egfr"] and lists["race-free-egfr"]["emptyReason"]["coding"][0]["code"] \
        == "nilknown"
    shutil.rmtree(tmp_path / "out")


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def answer(self, status: int, body: bytes, kind: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class JunkStatus(Quiet):
    """A kick-off answered, then a status URL that answers 200 with a web page (a wrong base URL, a portal)."""

    def do_GET(self) -> None:
        if "bulk-status" in self.path:
            self.answer(200, b"<html>Sign in</html>", "text/html")
        else:
            self.answer(202, b"", "application/json", Content_Location="/fhir/bulk-status/1")


def test_bad_answers_and_unwritable_folders_are_explained_not_tracebacks(tmp_path: Path) -> None:
    with fake_server(JunkStatus) as base:
        code, _, err = screen(base, download=tmp_path / "junk")
    assert code == 1 and "answered 200 with something that is not a JSON manifest (text/html)" in err, err
    afile = tmp_path / "afile"
    afile.write_text("")
    code, _, err = screen(str(tmp_path), out=afile)
    assert code == 1 and "cannot write the work folder" in err and "Traceback" not in err, err


def test_a_screens_lists_are_those_of_its_population() -> None:
    """A Group's screen must replace that Group's List, never the population's (same rule, hook, now)."""
    from nudges.screening.command import partial_notes
    from nudges.screening.lists import export_scope, list_id

    scopes = {export_scope("system", None, None, ()), export_scope("group", "navigated", None, ()),
              export_scope("patient", None, None, ()), export_scope("patient", None, "2026-02-01T00:00:00Z", ()),
              export_scope("patient", None, None, ("Patient", "Observation"))}
    assert len(scopes) == 5 and "group=navigated" in scopes
    assert len({list_id(f"{TROPONIN}/patient-view/{NOW}/{scope}") for scope in scopes}) == 5
    request = ExportRequest("https://ehr.example/fhir", "group", "navigated", ("Patient", "Observation"),
                            "2026-02-01T00:00:00Z")
    notes = partial_notes(request, ("Coverage", "Observation", "Patient", "Procedure"))
    assert notes[0].startswith("--type leaves out Coverage, Procedure, which the rules read")
    assert notes[1].startswith("--since 2026-02-01T00:00:00Z: only what changed since then")
    medication = ExportRequest("https://ehr.example/fhir", "patient", None, ("Medication", "Patient"))
    assert "holds no Medication" in partial_notes(medication, ("Medication", "Patient"))[0]
    assert partial_notes(ExportRequest("https://ehr.example/fhir", "system", None, ("Medication", "Patient")),
                         ("Medication", "Patient")) == []


class TwiceListed(Quiet):
    """An export whose manifest names the same file twice."""

    def do_GET(self) -> None:
        base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        if self.path.startswith("/fhir/status"):
            output = [{"type": "Patient", "url": f"{base}/files/p.ndjson"}] * 2
            self.answer(200, orjson.dumps({"transactionTime": "2026-03-02T12:00:00Z", "request": base,
                                          "requiresAccessToken": False, "output": output, "error": []}),
                       "application/json")
        elif self.path.startswith("/fhir/files/"):
            self.answer(200, b"".join(orjson.dumps(patient(f"tw-{i}")) + b"\n" for i in range(2)),
                       "application/fhir+ndjson")
        else:
            self.answer(202, b"", "application/json", Content_Location=f"{base}/status")


def test_a_file_the_manifest_lists_twice_is_read_once(tmp_path: Path) -> None:
    with fake_server(TwiceListed) as base:
        code, _, err = screen(base, out=tmp_path / "out")
    assert code == 0, err
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    assert summary["patients"] == 2 and any("more than once" in note for note in summary["notes"]), summary
