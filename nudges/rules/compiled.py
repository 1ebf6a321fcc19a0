"""The compiled form of a rule set: plain frozen dataclasses the engine walks, built once at load."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..record import IndexPlan
from .delivery import CompiledDelivery
from .fastpath.memo import Memo
from .fhirpath import Compiled
from .schema import Cases, Rule, RuleSetManifest, SourceAttributes
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
    # The `where` text, when it reads no rule-bound name: its answer for a resource then holds for the whole
    # call, and clauses with the same text (a YAML anchor: the troponin rule's "elevated", twice) share it.
    settled: str | None = None
    # The `date` text, on the same terms: worked out once per resource per call, however many clauses and
    # rules date that type by it (an Encounter by its departure: three rules, and each clause twice, for
    # its window and its order).
    dated: str | None = None
    # The settled `where`'s answers by the content it reads, across calls (fastpath.memo), when that can be named.
    memo: Memo | None = None
    required: bool = True  # its type's prefetch key must be had (else 412); false: read when sent (prefetch.plan_for)


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
    """Every code set some clause of these rules looks up, with the type it is looked up in; the types some
    clause reads in full (neither codes nor words); and the `text:` patterns searched in a type's words."""
    clauses = [clause for rule in rules for clause in rule.clauses()]
    return IndexPlan(((c.resource, c.codes) for c in clauses if c.codes is not None),
                     {c.resource for c in clauses if c.codes is None and c.text is None},
                     [(c.resource, c.text) for c in clauses if c.text is not None])


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
    override_lockouts: tuple[timedelta | None, ...] = ()  # one per override reason: its own lockout, if any


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
    deliver: tuple[CompiledDelivery, ...] = ()  # where the follow-up card is pushed when it fires
    # Every name the rule binds, empty until its clause matches (engine._Evaluation): a name bound under
    # `any`, or in a branch that failed, is then empty where a later expression reads it, as a value a
    # record lacks is in FHIRPath, instead of an undefined variable that made the whole rule raise.
    unbound: dict[str, list[Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unbound", {c.bind: [] for c in self.clauses() if c.bind})

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

    def source_attributes(self, rule: CompiledRule) -> SourceAttributes:
        """Every attribute filled: the rule's own, else the rule set's, else a default that says what is
        known (an unnamed developer is said to be unstated, never invented)."""
        own = rule.model.source_attributes or SourceAttributes()
        shared = self.manifest.source_attributes
        hooks = ", ".join(sorted(rule.hooks))
        race = ("It reads race data only to remove a race correction from an equation; the card is the same "
                "whatever the patient's race." if rule.model.race_correction_removal else
                "It never depends on race or ethnicity; demographics are recorded only for the equity audit.")
        defaults = SourceAttributes(
            developer="not stated", funding="not stated",
            intended_use=f"Shown to clinicians on {hooks} when the record suggests: {rule.title}. A prompt to "
                         "check the record and act where it fits; not a diagnosis and not an order.",
            cautions=["It does not replace clinical judgment: check the record before acting.", race],
            last_review=None)
        picked = {name: next((getattr(a, name) for a in (own, shared, defaults) if getattr(a, name) is not None),
                             None) for name in SourceAttributes.model_fields}
        return SourceAttributes(**picked)
