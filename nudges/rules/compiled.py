"""The compiled form of a rule set: plain frozen dataclasses the engine walks, built once at load."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..record import IndexPlan
from .fhirpath import Compiled
from .schema import Cases, Rule, RuleSetManifest
from .valuesets import CompiledValueSet


@dataclass(frozen=True, slots=True)
class CompiledClause:
    bind: str | None
    resource: str
    codes: frozenset[tuple[str, str]] | None
    displays: dict[tuple[str, str], str]
    where: Compiled | None
    text: re.Pattern[str] | None
    within: timedelta | None
    older_than: timedelta | None
    since: str | None
    date: Compiled | None
    sources: tuple[str, ...]
    earliest: bool = False  # a binding takes the earliest match instead of the latest


@dataclass(frozen=True, slots=True)
class CompiledGroup:
    mode: str  # all | any | none
    items: tuple[CompiledClause | CompiledGroup, ...]


CompiledItem = CompiledClause | CompiledGroup


def flat_clauses(items: tuple[CompiledItem, ...]) -> Iterator[CompiledClause]:
    for item in items:
        if isinstance(item, CompiledClause):
            yield item
        else:
            yield from flat_clauses(item.items)


def index_plan(rules: tuple[CompiledRule, ...]) -> IndexPlan:
    """Every code set some clause of these rules looks up, with the type it is looked up in, and the types
    some clause reads in full (no codes, or a `text:` pattern searched in every resource of the type)."""
    clauses = [clause for rule in rules for clause in rule.clauses()]
    return IndexPlan(((c.resource, c.codes) for c in clauses if c.codes is not None),
                     {c.resource for c in clauses if c.codes is None or c.text is not None})


@dataclass(frozen=True)
class CardTemplate:
    summary: str
    indicator: str
    detail: str | None
    selection: str
    suggestions_json: bytes | None
    links: tuple[dict[str, Any], ...]
    override_reasons: tuple[dict[str, str], ...]
    escalate: tuple[tuple[timedelta, str, str], ...] = ()  # (after, bound name, indicator), soonest first


@dataclass(frozen=True)
class CompiledRule:
    id: str
    title: str
    status: str
    version: str
    hooks: frozenset[str]
    topic: str
    age_min: int | None
    age_max: int | None
    patient: Compiled | None
    all: tuple[CompiledItem, ...]
    any: tuple[CompiledItem, ...]
    none: tuple[CompiledItem, ...]
    card: CardTemplate
    suppress: timedelta | None
    source_url: str | None
    path: str
    model: Rule = field(repr=False, compare=False)
    followup_start: str | None = None  # bound name of the `all` clause an event must match
    followup_after: timedelta | None = None  # check the rule again this long after that event

    def clauses(self) -> tuple[CompiledClause, ...]:
        """Every clause, nested ones included, in evaluation order."""
        return tuple(flat_clauses(self.all + self.any + self.none))


@dataclass(frozen=True)
class RuleSet:
    manifest: RuleSetManifest
    digest: str
    rules: tuple[CompiledRule, ...]
    cases: dict[str, tuple[Path, Cases]]
    directory: Path
    valuesets: dict[str, CompiledValueSet] = field(default_factory=dict)
    fixture_dirs: tuple[Path, ...] = ()  # where cases' `bundle:` paths are looked up after their own folder
    seeds_dir: Path | None = None

    @property
    def version(self) -> str:
        return f"{self.manifest.version}+{self.digest[:8]}"

    def select(self, hook: str, statuses: frozenset[str]) -> tuple[CompiledRule, ...]:
        return tuple(r for r in self.rules if hook in r.hooks and r.status in statuses)
