"""The one place errors become HTTP answers: every non-2xx is a FHIR OperationOutcome."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as QueueTimeout
from starlette.exceptions import HTTPException

from ..errors import BadRequest, NotFound, NudgesError, Unavailable
from ..fhir import operation_outcome

log = logging.getLogger("nudges.api")
FHIR_JSON = "application/fhir+json"
# The database out of reach: no connection within store.DATABASE_WAIT_SECONDS (either pool), refused or
# dropped connections (OperationalError, after Store.retrying's second try), SQLite locked past its
# busy_timeout. A 503 the EHR may retry, not a 500 that reads as a fault in the service.
DATABASE_DOWN = (PoolTimeout, QueueTimeout, OperationalError)
RETRY_AFTER_SECONDS = 5


def error_response(exc: NudgesError, request: Request | None = None) -> Response:
    """The answer, and a log line an operator can act on: diagnostics never carry PHI or tokens, and a
    refusal (401) logs its reason where it is decided (api/auth.py). Under /console the answer is a page
    for a person (the same status and message), not an OperationOutcome."""
    if exc.status >= 500 and exc.status != 503:  # 503: logged where the outage is recognised
        log.error("internal error", extra={"error": type(exc).__name__})
    elif exc.status in (412, 413):
        log.info(f"answered {exc.status}: {exc.diagnostics}", extra={"status": exc.status})
    if request is not None and is_console(request):
        from .console.render import error_page

        return error_page(exc.status, exc.diagnostics)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 503 else None
    return Response(orjson.dumps(exc.outcome()), status_code=exc.status, media_type=FHIR_JSON, headers=headers)


def unexpected_response(exc: Exception) -> Response:
    """Anything the service did not raise on purpose: a 500 OperationOutcome naming nothing but the
    exception's type (its message may hold request data); the database out of reach, a 503."""
    if isinstance(exc, DATABASE_DOWN):
        log.warning("database unavailable", extra={"error": type(exc).__name__})
        return error_response(Unavailable("the service's database is out of reach; try again shortly"))
    log.error("unhandled error", extra={"error": type(exc).__name__})
    return Response(orjson.dumps(operation_outcome("internal error", code="exception")), status_code=500,
                    media_type=FHIR_JSON)


def is_console(request: Request) -> bool:
    return request.url.path == "/console" or request.url.path.startswith("/console/")


def install(app: FastAPI) -> None:
    """Map the service's errors, Starlette's and FastAPI's, and anything unexpected."""

    @app.exception_handler(NudgesError)
    async def _nudges_error(request: Request, exc: NudgesError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound("no such endpoint"), request)
        if isinstance(exc.__cause__, NudgesError):  # FastAPI's "error parsing the body" around our own
            return error_response(exc.__cause__, request)
        err = NudgesError(str(exc.detail))
        err.status, err.code = exc.status_code, "not-supported" if exc.status_code == 405 else "processing"
        response = error_response(err, request)
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110 requires it)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(BadRequest(f"{where}: {first.get('msg', 'invalid request')}" if where
                                         else "invalid request", expression=where or None), request)

    # the database's outages too (a 503), so that they are answered inside the app, not re-raised to
    # the server as a fault
    for kind in (*DATABASE_DOWN, Exception):
        app.add_exception_handler(kind, _unexpected)


async def _unexpected(_: Request, exc: Exception) -> Response:
    return unexpected_response(exc)
