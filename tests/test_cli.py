"""The installed `nudges` command as a user runs it: serve with defaults, refuse unsafe starts."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
from helpers import wait_ready

from nudges.logs import configure

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nudges(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "nudges", *args], cwd=cwd,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_serve_with_defaults_answers_the_readme_example(tmp_path: Path) -> None:
    port = free_port()
    proc = nudges("serve", "--port", str(port), cwd=tmp_path, env={"NUDGES_NOW": "2026-03-02T12:00:00Z"})
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=30)
        body = (ROOT / "fhir_fixtures/calls/patient-view-troponin.json").read_bytes()
        response = httpx.post(f"http://127.0.0.1:{port}/cds-services/nudges-patient-view", content=body,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        assert any("14 h ago" in card["summary"] for card in response.json()["cards"])
        assert (tmp_path / "nudges.db").exists()  # SQLite in the working directory, migrated on start
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    entries = []
    for line in err.decode().splitlines():  # JSON lines, never the patient id
        if line.startswith("{"):
            entries.append(orjson.loads(line))
        assert "pt-trop" not in line
    pinned = [e for e in entries if "THE CLOCK IS PINNED at 2026-03-02T12:00:00Z" in e["message"]]
    assert len(pinned) == 1 and pinned[0]["level"] == "warning"  # loudly, once, at start


def test_a_clock_that_is_not_an_instant_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from nudges.cli import main

    monkeypatch.setenv("NUDGES_NOW", "tomorrow")
    monkeypatch.setenv("NUDGES_DATABASE_URL", f"sqlite:///{tmp_path}/nudges.db")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["serve", "--port", str(free_port())]) == 2  # refused before anything listens
    finally:
        root.handlers[:], root.level = handlers, level
    assert "now: 'tomorrow' is not an ISO 8601 instant" in capsys.readouterr().err


def test_text_logs_for_people_keep_the_same_redaction(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure("INFO", "text")
        logging.getLogger("nudges.test").warning("rule failed", extra={"rule": "r-1", "patient_id": "pt-secret",
                                                                       "access_token": "tok"})
    finally:
        root.handlers[:], root.level = handlers, level
    line = capsys.readouterr().err.strip()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(stamp + r" WARNING nudges\.test: rule failed  rule=r-1", line), line


def test_refuses_open_bind_without_clients(tmp_path: Path) -> None:
    proc = nudges("serve", "--host", "0.0.0.0", "--port", str(free_port()), cwd=tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"auth.clients" in err


def test_refuses_a_broken_rule_set_at_start(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "ruleset.yaml").write_text("name: x\n")
    proc = nudges("serve", "--rules", str(rules), "--port", str(free_port()), cwd=tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert b"ruleset.yaml:1:1: missing required field 'version'" in err


def test_settings_problems_are_said_plainly_for_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from nudges.cli import main

    assert main(["serve", "--config", str(tmp_path / "config.yaml")]) == 2
    assert "cannot read the configuration file" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("prot: 9\nauth: {clents: []}\n")
    assert main(["serve", "--config", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'prot' (did you mean 'port'?)" in err and "'auth.clents' (did you mean 'clients'?)" in err
    monkeypatch.setenv("NUDGES_LOG_FORMAT", "xml")
    assert main(["lint"]) == 2
    assert "nudges lint: setting 'log_format': Input should be 'json' or 'text'" in capsys.readouterr().err


def test_serve_with_workers_runs_replicas_on_one_port(tmp_path: Path) -> None:
    """`--workers 2`: two processes answer on the one port, each a replica over the same database."""
    port = free_port()
    proc = nudges("serve", "--port", str(port), "--workers", "2", cwd=tmp_path,
                  env={"NUDGES_NOW": "2026-03-02T12:00:00Z", "NUDGES_FOLLOWUP_POLL_SECONDS": "0"})
    try:
        children: list[str] = []

        def two_workers() -> bool:
            children[:] = [c for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                           if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
            return len(children) >= 2

        wait_ready(f"http://127.0.0.1:{port}", proc, also=two_workers)
        fixture = orjson.loads((ROOT / "fhir_fixtures/calls/patient-view-troponin.json").read_bytes())

        def call() -> httpx.Response:
            """One hook call; a connection the kernel handed to a worker still starting up (ready is
            answered by the first worker up) may be reset: that call is made again, never counted."""
            body = orjson.dumps({**fixture, "hookInstance": str(uuid.uuid4())})  # each a call of its own
            for attempt in range(5):
                try:
                    return httpx.post(f"http://127.0.0.1:{port}/cds-services/nudges-patient-view", content=body,
                                      headers={"Content-Type": "application/json"}, timeout=30)
                except httpx.TransportError:
                    if attempt == 4:
                        raise
                    time.sleep(0.5)
            raise AssertionError("unreachable")

        answers = [call() for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6
        assert answers[0].json()["cards"] and not answers[-1].json()["cards"]  # suppression is shared
        assert len(children) == 2
        # each scrape, on a connection of its own (whichever worker takes it), counts every worker's calls
        counted = 'nudges_requests_total{service="nudges-patient-view",status="200"} 6.0'
        for _ in range(6):
            scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            assert counted in scrape, [line for line in scrape.splitlines() if "requests_total" in line]
        assert 'nudges_rules_loaded' in scrape
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_serve_takes_the_log_format_as_a_flag() -> None:
    from nudges.cli import parser
    from nudges.cli.serve import settings_from

    args = parser().parse_args(["serve", "--log-format", "text"])
    assert settings_from({"log_format": args.log_format}).log_format == "text"
    assert settings_from({}).log_format == "json"


def test_every_file_the_commands_help_names_exists() -> None:
    """A new user copies the examples of `--help`: `nudges explain`'s named a fixture that does not exist."""
    named = {match for path in (ROOT / "nudges" / "cli").glob("*.py")
             for match in re.findall(r"\b(?:fhir_fixtures|rules)/[\w./-]+\.(?:json|yaml)", path.read_text())}
    assert named and not [name for name in sorted(named) if not (ROOT / name).is_file()]


def test_an_operators_metrics_folder_is_emptied_before_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set and one worker, a run had added the last run's counts to its own."""
    from nudges.cli.serve import empty_metrics_folder

    (tmp_path / "counter_123.db").write_bytes(b"old counts")
    (tmp_path / "keep.txt").write_text("not a metrics file")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    empty_metrics_folder()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
