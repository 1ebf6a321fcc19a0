"""GET /console/rules and /console/rules/{id}: the catalog and one rule as a person reads it, with its cases
(tools/cases, the runner behind `nudges test`) and its YAML beside the lint messages of the last load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request, Response

from ...cards import WHY_PATH
from ...errors import NotFound
from ...hooks import HOOK_NAMES
from ...rules.compiled import CompiledRule, RuleSet
from ...rules.yamlfiles import Problem
from ...tools.cases import RuleReport, run_all
from ...tools.sources import citations
from ..deps import RuntimeDep
from .render import page
from .security import ViewerDep
from .state import ConsoleState, console_state

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)
StateDep = Annotated[ConsoleState, Depends(console_state)]


async def case_reports(state: ConsoleState, ruleset: RuleSet) -> dict[str, RuleReport]:
    """Every rule's cases, run once per rule-set version (in a worker thread: they run the real engine)."""
    def compute() -> dict[str, RuleReport]:
        return {report.rule: report for report in run_all(ruleset)}

    return await anyio.to_thread.run_sync(state.once, "cases", ruleset.version, compute)


@router.get("/rules")
async def rule_list(request: Request, runtime: RuntimeDep, viewer: ViewerDep, state: StateDep,
                    hook: str = "", topic: str = "", status: str = "", q: str = "") -> Response:
    ruleset = runtime.services().ruleset
    reports = await case_reports(state, ruleset)
    needle = q.strip().lower()
    shown = [r for r in ruleset.rules
             if (not hook or hook in r.hooks) and (not topic or r.topic == topic) and (not status or r.status == status)
             and (not needle or needle in f"{r.id} {r.title} {r.model.rationale} {r.model.owner}".lower())]
    return page(request, runtime, viewer, "rules.html", rules=shown, total=len(ruleset.rules), reports=reports,
                hooks=HOOK_NAMES, topics=ruleset.manifest.topics, statuses=("experimental", "test", "active",
                                                                             "deprecated"),
                served=set(runtime.settings.rule_statuses),
                chosen={"hook": hook, "topic": topic, "status": status, "q": q})


def rule_file(ruleset: RuleSet, rule: CompiledRule) -> Path | None:
    path = Path(rule.path)
    if path.is_file():
        return path.resolve()
    found = sorted(ruleset.directory.rglob(f"{rule.id}.yaml"))
    return found[0] if found else None


def _same(problem: Problem, path: Path) -> bool:
    try:
        return Path(problem.path).resolve() == path
    except OSError:
        return False


@router.get(WHY_PATH.removeprefix("/console").replace("{rule}", "{rule_id}"))
async def rule_page(rule_id: str, request: Request, runtime: RuntimeDep, viewer: ViewerDep,
                    state: StateDep) -> Response:
    reloader = runtime.reloader
    ruleset = runtime.services().ruleset
    rule = next((r for r in ruleset.rules if r.id == rule_id), None)
    if rule is None:
        raise NotFound(f"no rule '{rule_id}' in the served rule set {ruleset.version}")
    reports = await case_reports(state, ruleset)
    path = rule_file(ruleset, rule)
    lines = path.read_text(encoding="utf-8").splitlines() if path else []
    messages: dict[int, list[tuple[str, str]]] = {}
    pending = [p for p in reloader.last_problems if path is not None and _same(p, path)]
    # The file on disk is shown. The served set's warnings are about the version it loaded, so while the
    # file on disk is refused their line numbers are another file's: they are left out then (the banner says).
    warnings = [] if pending else [p for p in reloader.warnings if path is not None and _same(p, path)]
    for severity, problems in (("error", pending), ("warning", warnings)):
        for p in problems:
            messages.setdefault(p.line, []).append((severity, f"{p.line}:{p.column}: {p.message}"))
    return page(request, runtime, viewer, "rule.html", rule=rule, model=rule.model, ruleset=ruleset,
                attributes=ruleset.source_attributes(rule), sources=citations(ruleset, rule),
                report=reports.get(rule.id), lines=lines, messages=messages, file=path, pending=len(pending),
                served=rule.status in runtime.settings.rule_statuses,
                topic=ruleset.manifest.topics.get(rule.topic, rule.topic))
