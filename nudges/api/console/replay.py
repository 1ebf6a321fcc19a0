"""GET /console/replay: the fixture calls replayed through tools/replay (both data modes, against their
golden files) with per-card, per-field differences. The run takes seconds, so the page loads at once and
htmx fetches /console/replay/results; results are kept per rule-set version."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
import orjson
from fastapi import APIRouter, Depends, Request, Response

from ...services import Services
from ...settings import Settings
from ...tools.loopback import BundleServer
from ...tools.replay import ReplayError, differences, discover, fixture_clock, load_golden, run_modes
from ..deps import RuntimeDep
from .render import page
from .security import ViewerDep
from .state import ConsoleState, console_state

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)
StateDep = Annotated[ConsoleState, Depends(console_state)]


@dataclass
class Row:
    name: str
    status: str  # ok | diff | missing | error
    cards: int = 0
    modes: list[str] = field(default_factory=list)
    diffs: list[tuple[list[str], list[str]]] = field(default_factory=list)
    message: str = ""


def call_folders(services: Services) -> list[Path]:
    return [d / "calls" for d in services.ruleset.fixture_dirs if (d / "calls").is_dir()]


def replay_all(services: Services, settings: Settings) -> list[Row]:
    folders = call_folders(services)
    if not folders:
        return []
    found, _, _ = discover(folders)
    settings = settings.model_copy(update={"fhir_timeout_seconds": max(settings.fhir_timeout_seconds, 30.0)})
    rows = []
    with BundleServer() as server:
        for fixture in found:
            name = fixture.path.stem
            try:
                golden = load_golden(fixture)
                now = fixture_clock(fixture, golden, None)
                results = run_modes(fixture, services, settings, now, server)
            except (ReplayError, orjson.JSONDecodeError, OSError) as exc:
                rows.append(Row(name, "error", message=str(exc)))
                continue
            if golden is None:
                rows.append(Row(name, "missing", modes=list(results), message=f"no {fixture.golden.name}"))
                continue
            found_diffs = differences(golden["cards"], results)
            rows.append(Row(name, "diff" if found_diffs else "ok", len(golden["cards"]), list(results), found_diffs))
    return rows


@router.get("/replay")
async def replay_page(request: Request, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    services = runtime.services()
    return page(request, runtime, viewer, "replay.html", folders=call_folders(services),
                version=services.ruleset.version)


@router.get("/replay/results")
async def replay_results(request: Request, runtime: RuntimeDep, viewer: ViewerDep, state: StateDep) -> Response:
    services = runtime.services()
    rows = await anyio.to_thread.run_sync(state.once, "replay", services.ruleset.version,
                                          lambda: replay_all(services, runtime.settings))
    return page(request, runtime, viewer, "replay_results.html", rows=rows, version=services.ruleset.version,
                failed=sum(r.status != "ok" for r in rows))
