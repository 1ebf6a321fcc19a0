"""sekmet-fhir (a FHIR R4 server the project did not write, pinned in the test extra) on loopback, in a
child process of the test interpreter, for the tests that need a real server's `$export`, SMART Backend
Services and conditional updates.

The parent binds 127.0.0.1:0 and hands the listening socket to the child (no port race); the child runs
uvicorn on it with sekmet's app factory. Not `uvicorn --fd`: uvicorn would wrap that descriptor as a Unix
socket and every answer would wait for Nagle's algorithm (40 ms per request). Settings are a JSON file
(valid YAML) named by SEKMET_CONFIG; `base_url` must be the real address, since sekmet builds bulk file
URLs and token audiences from it. Its simulator (which writes resources of its own after some writes) is
off.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

LAUNCHER = (
    "import socket, sys, uvicorn\n"
    "s = socket.socket(fileno=int(sys.argv[1]))\n"
    "cfg = uvicorn.Config('sekmet.main:app_factory', factory=True, log_level='warning', access_log=False)\n"
    "uvicorn.Server(cfg).run(sockets=[s])\n")


@dataclass
class Sekmet:
    root: str  # http://127.0.0.1:PORT
    base: str  # http://127.0.0.1:PORT/fhir
    workdir: Path

    @property
    def token_url(self) -> str:
        return f"{self.root}/auth/token"


@contextlib.contextmanager
def running_sekmet(workdir: Path, settings: dict[str, Any] | None = None, timeout: float = 60.0) -> Iterator[Sekmet]:
    workdir.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    root = f"http://127.0.0.1:{port}"
    config: dict[str, Any] = {
        "base_url": f"{root}/fhir", "host": "127.0.0.1", "port": port, "data_dir": str(workdir / "data"),
        "own_private_key_path": str(workdir / "keys" / "sekmet_private.pem"),
        "simulator": {"enabled": False, "delay_seconds": 0},
        "subscriptions": {"retries": 1}}
    for key, value in (settings or {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) \
            else value
    (workdir / "settings.yaml").write_text(json.dumps(config, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    env["SEKMET_CONFIG"] = str(workdir / "settings.yaml")
    log = open(workdir / "sekmet.log", "ab")  # noqa: SIM115 - closed below, after the child
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(sock.fileno())], cwd=workdir, env=env,
                            pass_fds=(sock.fileno(),), stdout=log, stderr=subprocess.STDOUT)
    sock.close()
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sekmet exited with {proc.returncode}; see {workdir / 'sekmet.log'}")
            try:
                if httpx.get(f"{root}/fhir/metadata", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sekmet did not answer within {timeout} s; see {workdir / 'sekmet.log'}")
            time.sleep(0.05)
        yield Sekmet(root, f"{root}/fhir", workdir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
