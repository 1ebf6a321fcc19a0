"""CDS Hooks discovery and hook calls."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Receive, Scope, Send

from ... import pipeline, planned
from ...errors import NudgesError
from ...runtime import Runtime
from ..deps import CallerDep, RuntimeDep, authenticate, json_response, read_body
from ..errors import error_response, unexpected_response
from ..models import CALL_SCHEMA, error_responses

router = APIRouter(tags=["CDS Hooks"])
RELEASE_SLICE = 250  # resources freed between two turns of the event loop (about 0.25 ms)


@router.get("/cds-services", summary="CDS Hooks discovery")
@router.get("/cds-services/", include_in_schema=False)  # as many a client is configured: answered, not
# redirected (a redirect's second request carries the same token, addressed to the URL with the slash: 401)
async def discovery(runtime: RuntimeDep, caller: CallerDep) -> Response:
    services = runtime.services()
    version = services.ruleset.version
    return json_response({"services": [s.discovery(version) for s in services.by_id.values()]})


@router.post("/cds-services/{service_id}", summary="Call a CDS service (a hook)",
             openapi_extra={"requestBody": CALL_SCHEMA}, responses=error_responses(400, 401, 404, 412, 413, 415, 503))
async def call_service(service_id: str, request: Request, runtime: RuntimeDep) -> Response:
    """The operation as OpenAPI (/docs) documents it. HookLane answers every such call before routing,
    through the same function, so this endpoint runs only in an app assembled without the lane."""
    return await answer_call(runtime, request, service_id)


async def answer_call(runtime: Runtime, request: Request, service_id: str) -> Response:
    caller = await authenticate(request, runtime)
    services = runtime.services()
    service = services.by_id.get(service_id)
    raw = await read_body(request, runtime.settings.max_body_bytes)
    body = planned.parse_body(raw, service.index.heads if service is not None else None)
    call = pipeline.parse_call(services, service_id, body)
    await pipeline.complete(call, runtime.fhir, runtime.settings,
                            caller.client.fhir_servers if caller.client else None)
    result = await runtime.evaluate(call, caller)
    response = json_response({"cards": result.cards})
    response.background = BackgroundTask(release, body, call, result)
    return response


class HookLane:
    """Pure ASGI middleware, the innermost: a hook call (POST /cds-services/{id}) goes straight to
    answer_call, past FastAPI's routing, dependency solving and exception layers (0.13 ms of a
    50-resource call's 1.73 ms of server CPU, README "Performance"). The middleware outside it (metrics,
    CORS, the body and keep-alive limits) applies as to every route; errors become answers through the
    same mapping (api/errors.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root + "/"):
            path = path[len(root):]
        service_id = path[len(PREFIX):] if path.startswith(PREFIX) else ""
        service_id = service_id[:-1] if service_id.endswith("/") else service_id  # as configured, not redirected
        if not service_id or "/" in service_id:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await answer_call(scope["app"].state.runtime, request, service_id)
        except NudgesError as exc:
            response = error_response(exc)
        except Exception as exc:  # what ServerErrorMiddleware would answer, but as an OperationOutcome
            response = unexpected_response(exc)
        await response(scope, receive, send)


PREFIX = "/cds-services/"


async def release(body: dict[str, Any], *others: object) -> None:
    """Free a call's parsed request after the answer has been sent, a slice at a time.

    Dropping a large parsed request (tens of thousands of dicts, when the rules read most of a 2 MB
    prefetch; the planned parse leaves out what they do not) takes milliseconds.
    Done before answering, the EHR waits for it; done in one go afterwards, it delays the next request
    being read. Slices of Bundle entries, with the event loop free between them, avoid both. The loop is
    given a turn only once a slice's worth has been freed, over however many Bundles: a typical visit
    fills a dozen prefetch keys with a few resources each, and a turn per Bundle (an epoll call each) had
    cost more than freeing them."""
    del others  # the last references to the call and its result go with this frame
    prefetch = body.get("prefetch")
    freed = 0
    for value in prefetch.values() if isinstance(prefetch, dict) else ():
        entries = value.get("entry") if isinstance(value, dict) else None
        while isinstance(entries, list) and entries:
            freed += min(len(entries), RELEASE_SLICE)
            del entries[-RELEASE_SLICE:]
            if freed >= RELEASE_SLICE:
                freed = 0
                await asyncio.sleep(0)
