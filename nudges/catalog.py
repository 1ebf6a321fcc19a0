"""The rule set being served, its CDS services, and hot reload that never drops the last good set."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .prefetch import PrefetchPlan, plan_for
from .record import IndexPlan
from .rules import HOOKS
from .ruleset import CompiledRule, RuleSet, index_plan, load_ruleset
from .yamlfiles import Problem

log = logging.getLogger("nudges.catalog")

HOOK_VERSIONS = {"patient-view": "1.0", "encounter-start": "1.0", "encounter-discharge": "1.0",
                 "order-select": "1.0.2", "order-sign": "1.1.0", "appointment-book": "1.0"}
DESCRIPTIONS = {
    "patient-view": "Health-equity nudges when a chart is opened: hidden cost barriers, screening for "
                    "experiences of discrimination, trust, care gaps with navigation, person-first language.",
    "encounter-start": "Health-equity nudges as an encounter begins: interpreter needs, delays in time-"
                       "critical care, screening prompts.",
    "encounter-discharge": "Discharge nudges: cardiac rehabilitation referral with barriers asked about, "
                           "food insecurity screening, follow-up that fits the patient's circumstances.",
    "order-select": "Order nudges: race-free equations, coverage-driven de-escalation of guideline drugs, "
                    "testing without a documented indication.",
    "order-sign": "Signing nudges: race-free equations, coverage-driven de-escalation of guideline drugs, "
                  "testing without a documented indication, de-escalation before security involvement.",
    "appointment-book": "Booking nudges: professional interpreter and translated materials for patients "
                        "who need them.",
}


def service_id(hook: str) -> str:
    return f"nudges-{hook}"


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str
    rules: tuple[CompiledRule, ...]
    plan: PrefetchPlan
    index: IndexPlan

    def discovery(self, version: str) -> dict[str, object]:
        return {"hook": self.hook, "id": self.id, "title": self.title, "description": self.description,
                "prefetch": self.plan.templates, "version": version,
                "hookVersion": HOOK_VERSIONS[self.hook]}


@dataclass(frozen=True)
class Catalog:
    ruleset: RuleSet
    services: dict[str, Service]

    @classmethod
    def build(cls, ruleset: RuleSet, statuses: frozenset[str]) -> Catalog:
        services = {}
        for hook in HOOKS:
            rules = ruleset.select(hook, statuses)
            title = f"nudges: health-equity nudges on {hook}"
            services[service_id(hook)] = Service(service_id(hook), hook, title, DESCRIPTIONS[hook], rules,
                                                 plan_for(rules), index_plan(rules))
        return cls(ruleset, services)


def fingerprint(directory: Path) -> str:
    """Cheap change detector for polling: names, sizes and mtimes of the YAML files."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.yaml")):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class CatalogHolder:
    """Serves the current catalog; `reload` swaps it only when the new set loads without problems."""

    def __init__(self, directory: Path, statuses: frozenset[str]) -> None:
        self.directory = directory
        self.statuses = statuses
        self.current: Catalog | None = None
        self.last_problems: list[Problem] = []
        self.reloads = 0
        self.refused = 0
        self._seen = ""

    def reload(self) -> bool:
        self._seen = fingerprint(self.directory)
        result = load_ruleset(self.directory)
        if result.ruleset is None:
            self.refused += 1
            self.last_problems = result.problems
            log.error("rule set refused; keeping the last good set",
                      extra={"problems": [str(p) for p in result.problems[:50]],
                             "kept": self.current.ruleset.version if self.current else None})
            return False
        self.current = Catalog.build(result.ruleset, self.statuses)
        self.last_problems = []
        self.reloads += 1
        log.info("rule set loaded", extra={"version": result.ruleset.version,
                                           "rules": len(result.ruleset.rules)})
        return True

    def changed(self) -> bool:
        return fingerprint(self.directory) != self._seen
