"""sekmet-fhir (pinned in the `test` extra), a FHIR R4 server the project did not write, started by the
tests on loopback in a child process: CRUD and search, conditional create, R4 Backport topic-based
Subscriptions (handshake, heartbeats, `$status`; no `$events`), SMART Backend Services tokens.

How it is started and what it gets wrong (found out before it was adopted):
- The parent binds 127.0.0.1:0 and hands the listening socket to the child (no port race). Not
  `uvicorn --fd`: uvicorn wraps that descriptor as AF_UNIX, TCP_NODELAY is never set and every answer
  waits ~40 ms for Nagle; `socket.socket(fileno=...)` keeps the real family.
- `base_url` must be the real address: it is in Location headers, notification references and the
  `aud` its token endpoint demands.
- Its simulator writes results of its own after some writes: off.
- It has no Observation SubscriptionTopic: the tests add one (`TROPONIN_TOPIC`, a `Basic`, as its
  topics are).
- Events during a subscription's `error` state are neither sent nor counted, and it never re-activates
  a subscription itself (the subscriber's job: nudges does both).
- Notifications from several threads arrive out of order; a handshake may arrive before the create's
  answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TOPIC_URL = "http://example.org/fhir/SubscriptionTopic/troponin-result"
EXT = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"
TROPONIN_TOPIC: dict[str, Any] = {
    "resourceType": "Basic", "id": "topic-troponin-result",
    "modifierExtension": [{"url": f"{EXT}.status", "valueCode": "active"}],
    "extension": [
        {"url": f"{EXT}.url", "valueUri": TOPIC_URL},
        {"url": f"{EXT}.version", "valueString": "1.0.0"},
        {"url": f"{EXT}.name", "valueString": "troponin_result"},
        {"url": f"{EXT}.title", "valueString": "Troponin result available"},
        {"url": f"{EXT}.resourceTrigger", "extension": [
            {"url": "description", "valueMarkdown": "A troponin Observation created or updated into a final state"},
            {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Observation"},
            {"url": "supportedInteraction", "valueCode": "create"},
            {"url": "supportedInteraction", "valueCode": "update"},
            {"url": "fhirPathCriteria", "valueString":
                "(%previous.empty() or %previous.status != %current.status) and %current.status in ('final' | "
                "'amended' | 'corrected') and %current.code.coding.where(system = 'http://loinc.org' and "
                "(code = '89579-7' or code = '10839-9' or code = '6598-7' or code = '67151-1')).exists()"}]},
        {"url": f"{EXT}.canFilterBy", "extension": [
            {"url": "resource", "valueUri": "Observation"}, {"url": "filterParameter", "valueString": "patient"}]}],
    "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]}}

TEST_CLIENT, TEST_SECRET = "tests", "tests-secret"  # the tests' own client (client_secret_basic), all scopes
LAUNCHER = ("import socket, sys, uvicorn\n"
            "s = socket.socket(fileno=int(sys.argv[1]))\n"
            "cfg = uvicorn.Config('sekmet.main:app_factory', factory=True, log_level='warning', access_log=False)\n"
            "uvicorn.Server(cfg).run(sockets=[s])\n")


@dataclass
class Sekmet:
    root: str
    base: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    token: str | None = None
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base, timeout=20, headers={"Accept": "application/fhir+json"})

    @property
    def token_url(self) -> str:
        return f"{self.root}/auth/token"

    def login(self) -> None:
        """A token for the tests' own reads and writes (when SMART is on)."""
        answer = httpx.post(self.token_url, data={"grant_type": "client_credentials", "scope": "system/*.*"},
                            auth=(TEST_CLIENT, TEST_SECRET), timeout=20)
        answer.raise_for_status()
        self.token = answer.json()["access_token"]
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        answer = self.http.post(f"/{resource['resourceType']}", json=resource)
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

    def search(self, query: str) -> list[dict[str, Any]]:
        answer = self.http.get(f"/{query}")
        assert answer.status_code == 200, answer.text
        return [e["resource"] for e in answer.json().get("entry") or ()]

    def pause(self) -> None:
        """Stopped, not dead: connections are accepted by the kernel and nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def wait_for(check: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_sekmet(workdir: Path, settings: dict[str, Any] | None = None) -> Iterator[Sekmet]:
    workdir.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    root = f"http://127.0.0.1:{listener.getsockname()[1]}"
    config: dict[str, Any] = {
        "base_url": f"{root}/fhir", "host": "127.0.0.1", "port": listener.getsockname()[1],
        "data_dir": str(workdir / "data"), "own_private_key_path": str(workdir / "keys" / "sekmet.pem"),
        "simulator": {"enabled": False, "delay_seconds": 0}, "subscriptions": {"retries": 1},
        "validation": {"inbound": "strict"}, **(settings or {})}
    (workdir / "settings.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    env["SEKMET_CONFIG"] = str(workdir / "settings.yaml")
    with open(workdir / "sekmet.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(listener.fileno())], cwd=workdir, env=env,
                                pass_fds=(listener.fileno(),), stdout=log, stderr=subprocess.STDOUT)
    listener.close()
    server = Sekmet(root, f"{root}/fhir", workdir, proc)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sekmet exited with {proc.returncode}: {(workdir / 'sekmet.log').read_text()}")
            try:
                return httpx.get(f"{root}/fhir/metadata", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "sekmet to start")
        yield server
    finally:
        server.http.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def smart_settings(jwks: dict[str, Any], scopes: str = "system/*.cruds",
                   extra_clients: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """SMART Backend Services on: nudges registered with its public key, the tests with a client secret."""
    return {"server_auth": {"types": ["smart"], "token_lifetime": 300, "smart_clients": [
        {"client_id": "nudges", "jwks": jwks, "scopes": scopes},
        {"client_id": TEST_CLIENT, "client_secret": TEST_SECRET, "scopes": "system/*.*"},
        *(extra_clients or [])]}}
