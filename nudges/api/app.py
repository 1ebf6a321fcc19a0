"""FastAPI application: CDS Hooks discovery, hook calls, feedback, health and metrics.

Bodies are read with a size cap and parsed once with orjson; every error leaves through the one
handler that turns a NudgesError into an OperationOutcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import hooks
from ..auth import Caller
from ..clock import Clock
from ..errors import (
    BadRequest,
    NotFound,
    NudgesError,
    PayloadTooLarge,
    TooDeep,
    operation_outcome,
)
from ..runtime import Runtime
from ..settings import Settings
from ..store import FeedbackRecord
from . import notifications
from .models import FeedbackRequest

RELEASE_SLICE = 250  # resources freed between two turns of the event loop (about 0.25 ms)
log = logging.getLogger("nudges.api")


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def error_response(exc: NudgesError) -> Response:
    """The one place errors become HTTP answers."""
    if exc.status >= 500:
        log.error("internal error", extra={"error": type(exc).__name__})
    return Response(orjson.dumps(exc.outcome()), status_code=exc.status,
                    media_type="application/fhir+json")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def release(body: dict[str, Any], *others: object) -> None:
    """Free a call's parsed request after the answer has been sent, a slice at a time.

    Dropping a large parsed request (tens of thousands of dicts for a 2 MB prefetch) takes milliseconds.
    Done before answering, the EHR waits for it; done in one go afterwards, it delays the next request
    being read. Slices of Bundle entries, with the event loop free between them, avoid both."""
    del others  # the last references to the call and its result go with this frame
    prefetch = body.get("prefetch")
    for value in prefetch.values() if isinstance(prefetch, dict) else ():
        entries = value.get("entry") if isinstance(value, dict) else None
        while isinstance(entries, list) and entries:
            del entries[-RELEASE_SLICE:]
            await asyncio.sleep(0)


def parse_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("request body is empty; a JSON object is required")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc):
            raise TooDeep("JSON nesting is too deep") from None
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


class Instrumentation:
    """Pure ASGI middleware: request counts and latency by service and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        answered: list[float] = []  # when the last body byte left: what the caller waited for

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered.append(time.perf_counter())

        runtime: Runtime | None = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        try:
            if runtime is not None and scope["method"] == "POST":  # request bodies: see heap.QuietCollector
                with runtime.quiet:
                    await self.app(scope, receive, capture)
            else:
                await self.app(scope, receive, capture)
        finally:
            parts = scope["path"].strip("/").split("/")
            service = parts[1] if len(parts) >= 2 and parts[0] == "cds-services" else parts[0] or "root"
            if runtime is not None:
                label = service if (service in runtime.holder.current.services if runtime.holder.current
                                    else False) or service in ("cds-services", "healthz", "readyz", "fhir",
                                                               "metrics") else "other"
                runtime.metrics.requests.labels(label, str(status[0])).inc()
                end = answered[0] if answered else time.perf_counter()
                runtime.metrics.latency.labels(label).observe(end - start)


def create_app(settings: Settings, clock: Clock | None = None) -> FastAPI:
    runtime = Runtime.create(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="nudges", version=settings_version(), lifespan=lifespan,
                  description="Health-equity decision support over CDS Hooks 2.0")
    app.state.runtime = runtime
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                       max_age=600)
    app.add_middleware(Instrumentation)

    @app.exception_handler(NudgesError)
    async def _nudges_error(_: Request, exc: NudgesError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound("no such endpoint"))
        err = NudgesError(str(exc.detail))
        err.status, err.code = exc.status_code, "not-supported" if exc.status_code == 405 else "processing"
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(BadRequest("invalid request"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", extra={"error": type(exc).__name__})
        return json_response(operation_outcome("internal error", code="exception"), 500)

    def audience(request: Request) -> str:
        base = settings.public_base_url.rstrip("/") if settings.public_base_url else \
            str(request.base_url).rstrip("/")
        return base + request.url.path

    async def authenticate(request: Request) -> Caller:
        return await runtime.auth.authenticate(request.headers.get("authorization"), audience(request))

    app.include_router(notifications.router(runtime, authenticate))

    @app.get("/cds-services", summary="CDS Hooks discovery")
    async def discovery(request: Request) -> Response:
        await authenticate(request)
        catalog = runtime.catalog()
        version = catalog.ruleset.version
        return json_response({"services": [s.discovery(version) for s in catalog.services.values()]})

    @app.post("/cds-services/{service_id}", summary="Call a CDS service (a hook)")
    async def call_service(service_id: str, request: Request) -> Response:
        caller = await authenticate(request)
        body = parse_object(await read_body(request, settings.max_body_bytes))
        call = hooks.parse_call(runtime.catalog(), service_id, body)
        await hooks.fill_missing(call, runtime.fhir, settings, caller.client.fhir_servers if caller.client else None)
        result = await anyio.to_thread.run_sync(runtime.evaluate, call, caller)
        response = json_response({"cards": result.cards})
        response.background = BackgroundTask(release, body, call, result)
        return response

    @app.post("/cds-services/{service_id}/feedback", summary="Feedback on cards")
    async def feedback(service_id: str, request: Request) -> Response:
        await authenticate(request)
        if service_id not in runtime.catalog().services:
            raise NotFound(f"no CDS service '{service_id}'")
        body = parse_object(await read_body(request, settings.max_body_bytes))
        try:
            parsed = FeedbackRequest.model_validate(body)
        except ValidationError as exc:
            raise hooks.validation_error(exc) from None
        records = [FeedbackRecord(
            card_uuid=f.card, service_id=service_id, outcome=f.outcome, outcome_timestamp=f.outcomeTimestamp,
            accepted_suggestions=tuple(s.id for s in f.acceptedSuggestions or ()),
            override_system=f.overrideReason.reason.system if f.overrideReason and f.overrideReason.reason
            else None,
            override_code=f.overrideReason.reason.code if f.overrideReason and f.overrideReason.reason
            else None,
            has_comment=bool(f.overrideReason and f.overrideReason.userComment)) for f in parsed.feedback]
        stored = await anyio.to_thread.run_sync(store_feedback, records, service_id)
        return json_response({"stored": stored, "duplicates": len(records) - stored})

    def store_feedback(records: list[FeedbackRecord], service_id: str) -> int:
        for record in records:
            issued_by = runtime.store.card_service(record.card_uuid)
            if issued_by is None:
                raise BadRequest(f"unknown card '{record.card_uuid}'", expression="feedback.card")
            if issued_by != service_id:
                raise BadRequest(f"card '{record.card_uuid}' was not issued by '{service_id}'",
                                 expression="feedback.card")
        return runtime.store.record_feedback(records)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> Response:
        return json_response({"status": "alive"})

    @app.get("/readyz", summary="Readiness: database reachable and rules loaded")
    async def readyz() -> Response:
        state = await anyio.to_thread.run_sync(runtime.readiness)
        ready = state["database"] and state["rules"] is not None
        if not ready:
            return Response(orjson.dumps(operation_outcome(
                "not ready: " + ("database unreachable" if not state["database"] else "no rule set"),
                code="transient")), status_code=503, media_type="application/fhir+json")
        return json_response({"status": "ready", "database": "ok", "rules": state["rules"],
                              "rule_count": state["rule_count"], "refused_reloads": state["refused_reloads"]})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def settings_version() -> str:
    from .. import __version__

    return __version__


