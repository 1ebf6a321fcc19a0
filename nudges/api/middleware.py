"""Pure ASGI middleware: request metrics, one cap on request bodies, a cap on requests per connection."""

from __future__ import annotations

import logging
import time

import orjson
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge
from ..fhir import operation_outcome
from ..hooks import service_hook

ACCESS = logging.getLogger("nudges.access")
MAX_TRACKED = 10_000  # client connections KeepAliveLimit counts at once

# Path heads reported by name in metrics; anything else is "other" (no unbounded label values).
KNOWN_PATHS = ("cds-services", "healthz", "readyz", "fhir", "metrics", "console", "docs")


def path_label(path: str) -> str:
    parts = path.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "cds-services":
        return parts[1] if service_hook(parts[1]) is not None else "other"
    head = parts[0] or "root"
    return head if head in KNOWN_PATHS or head == "root" else "other"


class Instrumentation:
    """Request counts and latency by service and status; latency ends when the last body byte is sent
    (what the caller waited for), not when background work after the answer finishes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        answered: list[float] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered.append(time.perf_counter())

        try:
            await self.app(scope, receive, capture)
        finally:
            runtime = scope["app"].state.runtime
            label = path_label(scope["path"])
            took = (answered[0] if answered else time.perf_counter()) - start
            runtime.metrics.requests.labels(label, str(status[0])).inc()
            runtime.metrics.latency.labels(label).observe(took)
            if runtime.settings.access_log:  # the path only: a query string may carry what a log must not
                client = scope.get("client")
                ACCESS.info("%s %s %d", scope["method"], scope["path"], status[0],
                            extra={"method": scope["method"], "path": scope["path"], "status": status[0],
                                   "ms": round(took * 1000, 2), "client": client[0] if client else None})


class BodyLimit:
    """`max_body_bytes` for every request body, counted as it arrives: hook calls, feedback and
    notifications (read by `deps.read_body`) and the console's forms (parsed by Starlette, which sets no
    limit on a URL-encoded form), chunked bodies without a Content-Length included. Raised inside the
    route's read, so the answer is the usual 413 OperationOutcome."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = scope["app"].state.runtime.settings.max_body_bytes
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counted, send)


class KeepAliveLimit:
    """After `keepalive_requests` requests on one connection, the answer says `Connection: close` (as
    nginx's keepalive_requests and Apache's MaxKeepAliveRequests do). A keep-alive connection stays with
    the worker process that accepted it, and EHR clients open theirs in bursts, so one worker of
    `nudges serve --workers N` could hold most of them for good; a client that re-connects now and then
    is accepted by whichever worker is free to accept, which spreads the load (README "Performance")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.served: dict[tuple[str, int], int] = {}  # requests answered per client connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = scope["app"].state.runtime.settings.keepalive_requests if scope["type"] == "http" else 0
        client = scope.get("client")
        if not limit or not client:
            await self.app(scope, receive, send)
            return
        key = (client[0], client[1])
        count = self.served.get(key, 0) + 1
        if count >= limit:
            self.served.pop(key, None)
        else:
            if len(self.served) >= MAX_TRACKED:  # connections that closed on their own leave no trace
                self.served.clear()
            self.served[key] = count

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing if count >= limit else send)


class Cors(CORSMiddleware):
    """Starlette's CORS, but a refused preflight (an origin, method or header not allowed) is answered as
    every other 4xx is, an OperationOutcome that says what was refused, not a line of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        said = bytes(answer.body).decode(errors="replace")  # "Disallowed CORS origin, headers"
        outcome = operation_outcome(f"{said}: the service's cors_origins and its allowed methods and headers "
                                    "decide what a browser page may call", code="forbidden")
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
        return Response(orjson.dumps(outcome), status_code=answer.status_code, headers=headers,
                        media_type="application/fhir+json")
