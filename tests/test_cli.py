"""The installed `nudges` command as a user runs it: serve with defaults, refuse unsafe starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

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
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = (ROOT / "fhir_fixtures/calls/patient-view-troponin.json").read_bytes()
        response = httpx.post(f"http://127.0.0.1:{port}/cds-services/nudges-patient-view", content=body,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        assert any("14 h ago" in card["summary"] for card in response.json()["cards"])
        assert (tmp_path / "nudges.db").exists()  # SQLite in the working directory, migrated on start
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    for line in err.decode().splitlines():  # JSON lines, never the patient id
        if line.startswith("{"):
            orjson.loads(line)
        assert "pt-trop" not in line


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


def test_serve_with_workers_runs_replicas_on_one_port(tmp_path: Path) -> None:
    """`--workers 2`: two processes answer on the one port, each a replica over the same database."""
    port = free_port()
    proc = nudges("serve", "--port", str(port), "--workers", "2", cwd=tmp_path,
                  env={"NUDGES_NOW": "2026-03-02T12:00:00Z", "NUDGES_FOLLOWUP_POLL_SECONDS": "0"})
    try:
        deadline = time.monotonic() + 60
        children: list[str] = []
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the workers did not come up"
            try:
                children = [c for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                            if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
                if len(children) >= 2 and httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.2)
        body = (ROOT / "fhir_fixtures/calls/patient-view-troponin.json").read_bytes()
        answers = [httpx.post(f"http://127.0.0.1:{port}/cds-services/nudges-patient-view", content=body,
                              headers={"Content-Type": "application/json"}) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6
        assert answers[0].json()["cards"] and not answers[-1].json()["cards"]  # suppression is shared
        assert len(children) == 2
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
