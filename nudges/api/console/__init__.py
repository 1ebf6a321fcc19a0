"""The web console under /console/: server-rendered pages (Jinja2, one vendored htmx file) over the same
modules the command line uses: lint and cases (rules/compiler, tools/cases), replay (tools/replay), the
audit and its statistics (tools/audit, tools/equity). Module-level routers, like api/routes/."""

from __future__ import annotations

from . import dashboard, overview, playground, replay, rules

ROUTERS = (overview.router, rules.router, playground.router, replay.router, dashboard.router)
