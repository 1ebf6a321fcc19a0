"""The FastAPI application: middleware, error mapping and the module-level routers, over one Runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..clock import Clock
from ..runtime import Runtime
from ..settings import Settings
from . import errors
from .console import ROUTERS as CONSOLE
from .console.security import ConsoleHeaders
from .middleware import Instrumentation, QuietCollectorMiddleware
from .routes import feedback, health, notifications, services


def create_app(settings: Settings, clock: Clock | None = None) -> FastAPI:
    runtime = Runtime.create(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="nudges", version=__version__, lifespan=lifespan,
                  description="Health-equity decision support over CDS Hooks 2.0")
    app.state.runtime = runtime
    app.add_middleware(QuietCollectorMiddleware)
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"],
                       max_age=600)
    app.add_middleware(ConsoleHeaders)
    app.add_middleware(Instrumentation)
    errors.install(app)
    for module in (services, feedback, notifications, health):
        app.include_router(module.router)
    for router in CONSOLE:
        app.include_router(router)
    return app
