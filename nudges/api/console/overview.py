"""GET /console/: what is served (rule set, services, reloads, database, clock), between visits (the outbox,
the managed subscriptions), and the console's files."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from sqlalchemy.engine import make_url

from ...clock import FixedClock
from ...errors import NotFound
from ...events import subscriptions
from ..deps import RuntimeDep
from .render import HERE, page
from .security import ViewerDep

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)
STATIC = {"htmx-2.0.11.min.js": "text/javascript", "console.css": "text/css",
          "htmx-LICENSE.txt": "text/plain; charset=utf-8", "favicon.svg": "image/svg+xml"}


@router.get("/")
async def overview(request: Request, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    services = runtime.services()
    reloader = runtime.reloader
    ruleset = services.ruleset
    statuses: dict[str, int] = {}
    for rule in ruleset.rules:
        statuses[rule.status] = statuses.get(rule.status, 0) + 1
    refusal = reloader.last_refusal
    database = {"dialect": runtime.store.dialect,
                "url": make_url(runtime.store.url).render_as_string(hide_password=True),
                "reachable": await anyio.to_thread.run_sync(runtime.store.ping)}
    clock = {"pinned": isinstance(runtime.clock, FixedClock), "now": runtime.clock.now()}
    if database["reachable"]:
        between = await anyio.to_thread.run_sync(runtime.between_visits)
        managed = await anyio.to_thread.run_sync(subscriptions.live, runtime.store)
    else:
        between, managed = None, []
    return page(request, runtime, viewer, "overview.html", ruleset=ruleset, statuses=statuses,
                served=sorted(runtime.settings.rule_statuses), services=list(services.by_id.values()),
                loaded_at=reloader.loaded_at, refused=reloader.refused, refusal=refusal,
                refusal_pending=bool(reloader.last_problems),  # the files on disk still have those problems
                warnings=reloader.warnings, database=database, clock=clock, settings=runtime.settings,
                between=between, managed=managed)


@router.get("/static/{name}")
async def static(name: str, viewer: ViewerDep) -> Response:
    """The console's own files, from a fixed list (nothing else under the package is reachable)."""
    if name not in STATIC:
        raise NotFound(f"no console file '{name}'")
    return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                    headers={"cache-control": "public, max-age=3600"})
