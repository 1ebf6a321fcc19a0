"""A FHIR server on 127.0.0.1 serving a list of resources: read `Type/id`, search `Type?patient=id` with
`code` filters and `_include` of a medication. Replay runs every call through it as well as from prefetch,
so the service's fetch path is exercised on exactly the same data.

One server serves a whole replay run (its resources swapped per call): starting and stopping one per call
cost half a second each in socketserver's shutdown poll.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from ..fhir import CODE_ELEMENTS, codings, operation_outcome, parse_reference, patient_of, walk

NOT_FOUND = operation_outcome("not found", code="not-found")


class _Listener(ThreadingHTTPServer):
    # The service fetches every prefetch key at once; the default backlog of 5 drops connections.
    request_queue_size = 128
    daemon_threads = True


class BundleServer:
    def __init__(self, resources: list[dict[str, Any]] | None = None) -> None:
        self.resources = resources or []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, body = owner.answer(self.path)
                payload = orjson.dumps(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = _Listener(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> BundleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(path)
        segments = [s for s in parts.path.removeprefix("/fhir").split("/") if s]
        if len(segments) == 2:
            found = next((r for r in self.resources
                          if r.get("resourceType") == segments[0] and r.get("id") == segments[1]), None)
            return (200, found) if found else (404, NOT_FOUND)
        if len(segments) != 1:
            return 404, NOT_FOUND
        kind, query = segments[0], parse_qs(parts.query)
        matches = [r for r in self.resources if r.get("resourceType") == kind]
        if "patient" in query:
            pid = query["patient"][0].removeprefix("Patient/")
            matches = [r for r in matches if patient_of(r) == pid]
        for name in ("code", "vaccine-code"):
            if name in query:
                tokens = query[name][0].split(",")
                matches = [r for r in matches if _has_token(r, tokens)]
        entries = [{"resource": r, "search": {"mode": "match"}} for r in matches]
        if any(value.endswith(":medication") for value in query.get("_include", ())):
            entries += [{"resource": m, "search": {"mode": "include"}} for m in self._medications(matches)]
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(matches), "entry": entries}

    def _medications(self, matches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = {ref.id for r in matches
                  if (ref := parse_reference((r.get("medicationReference") or {}).get("reference")))
                  and ref.type == "Medication"}
        return [r for r in self.resources if r.get("resourceType") == "Medication" and r.get("id") in wanted]


def _has_token(resource: dict[str, Any], tokens: list[str]) -> bool:
    found = {key for element in CODE_ELEMENTS.get(resource.get("resourceType", ""), ())
             for concept in walk(resource, element) for key in codings(concept)}
    return any((tuple(t.split("|", 1)) in found) if "|" in t else any(c == t for _, c in found) for t in tokens)
