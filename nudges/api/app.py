"""The FastAPI application: middleware, error mapping and the module-level routers, over one Runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .. import __version__
from ..clock import Clock
from ..runtime import Runtime
from ..settings import Settings
from . import errors
from .console import ROUTERS as CONSOLE
from .console.security import ConsoleHeaders
from .middleware import BodyLimit, Cors, Instrumentation, KeepAliveLimit
from .routes import docs, feedback, health, notifications, services


def create_app(settings: Settings, clock: Clock | None = None) -> FastAPI:
    runtime = Runtime.create(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="nudges", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Health-equity decision support over CDS Hooks 2.0")
    app.state.runtime = runtime
    app.add_middleware(services.HookLane)  # the innermost: inside every middleware below
    app.add_middleware(BodyLimit)
    app.add_middleware(KeepAliveLimit)
    app.add_middleware(Cors, allow_origins=settings.cors_origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                       max_age=600)
    app.add_middleware(ConsoleHeaders)
    app.add_middleware(Instrumentation)
    errors.install(app)
    for module in (services, feedback, notifications, health, docs):
        app.include_router(module.router)
    for router in CONSOLE:
        app.include_router(router)
    document_errors_as_answered(app)
    return app


def document_errors_as_answered(app: FastAPI) -> None:
    """FastAPI documents a 422 validation error on every route with a parameter; these routes read their
    bodies themselves and answer 400 OperationOutcomes (routes' `responses`), so the 422s are dropped."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema or {}

    setattr(app, "openapi", openapi)  # noqa: B010  # FastAPI's documented way to customise its schema
