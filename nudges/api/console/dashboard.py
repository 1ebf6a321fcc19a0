"""GET /console/audit: the equity dashboard (tools/equity over tools/audit's cells, withheld as the audit
decides), and GET /console/audit.csv, the same table as `nudges audit --format equity-csv`."""

from __future__ import annotations

import io
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response

from ...errors import BadRequest
from ...runtime import Runtime
from ...tools import equity
from ...tools.audit import ALL_REASONS, DIMENSIONS, MIN_PATIENTS, OVERALL, override_rows
from ..deps import RuntimeDep
from . import charts
from .render import page
from .security import ViewerDep

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)


NO_WINDOW = ("the dashboard shows all cards, with the trend by month: a table for a time window would "
             "let two windows be subtracted to give the counts of a group too small to show (the trend's "
             "months are checked against that; `nudges audit --since`, for the database's operators, "
             "reads the database directly)")


def _report(runtime: Runtime, since: str) -> tuple[equity.Report, list[dict[str, Any]]]:
    """The statistics and the override reasons (tools/audit.override_rows), withheld as the audit decides,
    over every card. A `since` window is refused: each window withheld on its own, two of them (all cards
    and the cards since a date, or two dates a second apart) subtract to the cards between, a group too
    small to show among them."""
    if since.strip():
        raise BadRequest(f"since: {NO_WINDOW}")
    with runtime.store.engine.connect() as conn:
        return equity.load(conn, None), override_rows(conn, None)


def reasons_of(overrides: list[dict[str, Any]], rule: str, dimension: str) -> list[dict[str, Any]]:
    """Per group: its override rate row and its reasons, as the audit reports them (marks kept)."""
    groups: dict[str, dict[str, Any]] = {}
    for row in overrides:
        if row["rule"] != rule or row["dimension"] != dimension:
            continue
        entry = groups.setdefault(row["group"], {"group": row["group"], "total": None, "reasons": []})
        if row["reason"] == ALL_REASONS:
            entry["total"] = row
        else:
            entry["reasons"].append(row)
    return list(groups.values())


def sections(report: equity.Report, rule: str, dimension: str,
             overrides: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per rule: its overall row, and per dimension the rows, a bar chart, the trend and the missing share."""
    out = []
    for rule_id in report.rules():
        if rule and rule_id != rule:
            continue
        rows = [s for s in report.stats if s.rule == rule_id]
        overall = next((s for s in rows if s.dimension == OVERALL[0]), None)
        dims = []
        for dim in DIMENSIONS:
            if dimension and dim != dimension:
                continue
            stats = [s for s in rows if s.dimension == dim]
            points = [p for p in report.trend if p.rule == rule_id and p.dimension in (dim, OVERALL[0])]
            missing = next((m for m in report.missing if m.rule == rule_id and m.dimension == dim), None)
            dims.append({"name": dim, "stats": stats, "missing": missing,
                         "reasons": reasons_of(overrides or [], rule_id, dim),
                         "bars": charts.rate_bars(stats, overall, f"{rule_id}: acceptance by {dim}"),
                         "trend": charts.trend_lines(points, f"{rule_id}: acceptance by month and {dim}")
                         if points else None})
        out.append({"rule": rule_id, "overall": overall, "dimensions": dims,
                    "reasons": reasons_of(overrides or [], rule_id, OVERALL[0])})
    return out


@router.get("/audit")
async def audit_page(request: Request, runtime: RuntimeDep, viewer: ViewerDep, rule: str = "",
                     dimension: str = "", since: str = "") -> Response:
    report, overrides = await anyio.to_thread.run_sync(_report, runtime, since)
    return page(request, runtime, viewer, "audit.html", sections=sections(report, rule, dimension, overrides),
                rules=report.rules(), dimensions=DIMENSIONS, chosen={"rule": rule, "dimension": dimension},
                test=equity.TEST, min_patients=MIN_PATIENTS)


@router.get("/audit.csv")
async def audit_csv(runtime: RuntimeDep, viewer: ViewerDep, since: str = "") -> Response:
    report, _ = await anyio.to_thread.run_sync(_report, runtime, since)
    out = io.StringIO()
    equity.write_csv(report, out)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": 'attachment; filename="nudges-equity.csv"'})
