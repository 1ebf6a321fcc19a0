"""The CDS services one rule set offers (one per hook), and hot reload that never drops the last good set."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .clock import Clock, SystemClock
from .hooks import HOOKS, Hook
from .prefetch import PrefetchPlan, plan_for
from .record import IndexPlan
from .rules.compiled import CompiledRule, RuleSet, index_plan
from .rules.compiler import load_ruleset, rule_files
from .rules.delivery import Targets
from .rules.yamlfiles import Problem

log = logging.getLogger("nudges.services")


@dataclass(frozen=True)
class Service:
    """One CDS service: the rules served on its hook, what it prefetches and how it indexes a call."""

    id: str
    hook: Hook
    title: str
    rules: tuple[CompiledRule, ...]
    plan: PrefetchPlan
    index: IndexPlan

    @classmethod
    def of(cls, hook: Hook, rules: tuple[CompiledRule, ...], service_id: str | None = None,
           title: str | None = None) -> Service:
        return cls(service_id or hook.service_id, hook, title or f"nudges: health-equity nudges on {hook.name}",
                   rules, plan_for(rules), index_plan(rules))

    def discovery(self, version: str) -> dict[str, object]:
        return {"hook": self.hook.name, "id": self.id, "title": self.title, "description": self.hook.description,
                "prefetch": self.plan.templates, "version": version, "hookVersion": self.hook.version}


@dataclass(frozen=True)
class Services:
    """A rule set and the services built from it: what one reload swaps in as a whole."""

    ruleset: RuleSet
    by_id: dict[str, Service]

    @classmethod
    def build(cls, ruleset: RuleSet, statuses: frozenset[str]) -> Services:
        return cls(ruleset, {hook.service_id: Service.of(hook, ruleset.select(hook.name, statuses))
                             for hook in HOOKS.values()})

    def for_hook(self, hook: str) -> Service:
        return self.by_id[HOOKS[hook].service_id]

    def rules(self) -> tuple[CompiledRule, ...]:
        """Every served rule once, in id order."""
        return tuple(sorted({r.id: r for s in self.by_id.values() for r in s.rules}.values(), key=lambda r: r.id))


def fingerprint(directory: Path, site: Path | None = None) -> str:
    """Cheap change detector for polling: names, sizes and mtimes of the rule set's files."""
    digest = hashlib.sha256()
    for path in rule_files(directory, site):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Refusal:
    """A reload that was refused: when, and every problem as file:line:column (what the console shows)."""

    at: datetime
    problems: list[Problem] = field(default_factory=list)


class Reloader:
    """Serves the current services; `reload` swaps them only when the new rule set loads without problems.

    It remembers when the served set was loaded (and its lint warnings) and the last refusal, which stays
    visible after a later good reload so an operator can see what was wrong."""

    def __init__(self, directory: Path, statuses: frozenset[str], site: Path | None = None,
                 clock: Clock | None = None, targets: Targets | None = None) -> None:
        self.directory = directory
        self.site = site
        self.targets = targets  # the site's delivery pools and webhook endpoints rules may name
        self.statuses = statuses
        self.clock = clock or SystemClock()
        self.current: Services | None = None
        self.last_problems: list[Problem] = []
        self.warnings: list[Problem] = []  # of the served set
        self.loaded_at: datetime | None = None
        self.last_refusal: Refusal | None = None
        self.refused = 0
        self._seen = ""

    def reload(self) -> bool:
        self._seen = fingerprint(self.directory, self.site)
        result = load_ruleset(self.directory, self.site, self.targets)
        if result.ruleset is None:
            self.refused += 1
            self.last_problems = result.problems
            self.last_refusal = Refusal(self.clock.now(), result.problems)
            log.error("rule set refused; keeping the last good set",
                      extra={"problems": [str(p) for p in result.problems[:50]],
                             "kept": self.current.ruleset.version if self.current else None})
            return False
        self.current = Services.build(result.ruleset, self.statuses)
        self.last_problems = []
        if result.unconfigured:
            log.warning("rules deliver to names this site has not configured; those pushes will go dead",
                        extra={"warnings": [str(p) for p in result.unconfigured[:50]]})
        self.warnings = result.warnings
        self.loaded_at = self.clock.now()
        log.info("rule set loaded", extra={"version": result.ruleset.version, "rules": len(result.ruleset.rules)})
        return True

    def changed(self) -> bool:
        return fingerprint(self.directory, self.site) != self._seen
