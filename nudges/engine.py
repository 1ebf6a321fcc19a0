"""Evaluate compiled rules against one indexed record.

A rule runs only when the index holds candidates for its clauses; FHIRPath runs only on those
candidates. A rule that raises is isolated: counted, logged without PHI, and skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from .fhir import parse_fhir_date
from .record import PatientRecord
from .rules.compiled import CompiledClause, CompiledItem, CompiledRule
from .rules.fhirpath import environment, truthy

log = logging.getLogger("nudges.engine")


@dataclass
class Match:
    rule: CompiledRule
    bindings: dict[str, dict[str, Any]]
    dates: dict[str, datetime | None]
    drafts: tuple[dict[str, Any], ...] = ()  # draft resources (orders, appointments) the clauses matched


@dataclass
class Outcome:
    matches: list[Match] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


_Saved = tuple[dict[str, dict[str, Any]], dict[str, datetime | None], dict[str, Any], tuple[dict[str, Any], ...]]


def age_in_years(birth: date, today: date) -> int:
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


class _Evaluation:
    """State for one rule on one record: clock, FHIRPath environment, bindings so far."""

    __slots__ = ("bindings", "dates", "drafts", "env", "now", "record")

    def __init__(self, record: PatientRecord, now: datetime, env: dict[str, Any]) -> None:
        self.record, self.now = record, now
        self.env = dict(env)
        self.bindings: dict[str, dict[str, Any]] = {}
        self.dates: dict[str, datetime | None] = {}
        self.drafts: tuple[dict[str, Any], ...] = ()  # what the card is about, on order and booking hooks

    def date_of(self, clause: CompiledClause, resource: dict[str, Any]) -> datetime | None:
        if clause.date is None:
            return self.record.date_of(resource)
        values = clause.date(resource, self.env)
        return parse_fhir_date(values[0]) if values else None

    def candidates(self, clause: CompiledClause, source: str) -> list[dict[str, Any]]:
        """What the index (and a clause's text pattern) leaves for FHIRPath to look at."""
        record = self.record
        if clause.codes is not None:
            found = record.with_codes(source, clause.resource, clause.codes)
            if clause.text is not None:
                coded = {id(r) for r in found}
                found = found + [r for r in record.of_type(source, clause.resource)
                                 if id(r) not in coded and record.says(clause.text, r)]
            return found
        if clause.text is not None:
            return [r for r in record.of_type(source, clause.resource) if record.says(clause.text, r)]
        return record.of_type(source, clause.resource)

    def match(self, clause: CompiledClause) -> tuple[datetime | None, dict[str, Any]] | None:
        """The resource a clause is satisfied by, or None.

        A binding clause needs the latest match (or the earliest, with `pick: earliest`; ties broken by id),
        anything else just one, so FHIRPath runs on candidates in that order and stops at the first that
        passes: most calls evaluate it once or not at all, however many candidates the index returns."""
        now = self.now
        timed = clause.within is not None or clause.older_than is not None or clause.since is not None
        since = self.dates.get(clause.since) if clause.since else None
        if clause.since and since is None:
            return None
        dated = timed or clause.bind is not None
        found: list[tuple[datetime | None, dict[str, Any]]] = []
        for source in clause.sources:
            for resource in self.candidates(clause, source):
                when = self.date_of(clause, resource) if dated else None
                if timed:
                    if when is None:
                        continue
                    if clause.within is not None and when < now - clause.within:
                        continue
                    if clause.older_than is not None and when > now - clause.older_than:
                        continue
                    if since is not None and when < since:
                        continue
                if clause.where is None and clause.bind is None:
                    return when, resource
                found.append((when, resource))
        if not found:
            return None

        def latest(item: tuple[datetime | None, dict[str, Any]]) -> tuple[bool, datetime, str]:
            return item[0] is not None, item[0] or now, str(item[1].get("id", ""))

        def earliest(item: tuple[datetime | None, dict[str, Any]]) -> tuple[bool, datetime, str]:
            return item[0] is None, item[0] or now, str(item[1].get("id", ""))

        where = clause.where
        if where is None:
            return min(found, key=earliest) if clause.earliest else max(found, key=latest)
        if clause.bind is not None and len(found) > 1:
            if clause.earliest:
                found.sort(key=earliest)
            else:
                found.sort(key=latest, reverse=True)
        return next(((when, resource) for when, resource in found if truthy(where(resource, self.env))), None)

    def save(self) -> _Saved:
        return dict(self.bindings), dict(self.dates), dict(self.env), self.drafts

    def restore(self, saved: _Saved) -> None:
        self.bindings, self.dates, self.env, self.drafts = saved

    def bind(self, clause: CompiledClause, hit: tuple[datetime | None, dict[str, Any]]) -> None:
        when, resource = hit
        if clause.sources != ("record",) and self.record.is_draft(resource):
            self.drafts += (resource,)
        if clause.bind:
            self.bindings[clause.bind] = resource
            self.dates[clause.bind] = when
            self.env[clause.bind] = resource


def _applies(rule: CompiledRule, record: PatientRecord, now: datetime, env: dict[str, Any]) -> bool:
    if rule.age_min is not None or rule.age_max is not None:
        birth = parse_fhir_date((record.patient or {}).get("birthDate"))
        if birth is None:
            return False
        age = age_in_years(birth.date(), now.date())
        if (rule.age_min is not None and age < rule.age_min) or (
                rule.age_max is not None and age > rule.age_max):
            return False
    if rule.patient is not None:
        return record.patient is not None and truthy(rule.patient(record.patient, env))
    return True


def _holds(state: _Evaluation, item: CompiledItem) -> bool:
    if isinstance(item, CompiledClause):
        hit = state.match(item)
        if hit is None:
            return False
        state.bind(item, hit)
        return True
    return _group(state, item.mode, item.items)


def _group(state: _Evaluation, mode: str, items: tuple[CompiledItem, ...]) -> bool:
    """all: every item (a failed branch leaves no bindings behind); any: at least one, every matching
    item binding; none: no item, tried without keeping its bindings."""
    if mode == "all":
        saved = state.save()
        for item in items:
            if not _holds(state, item):
                state.restore(saved)
                return False
        return True
    if mode == "any":
        hit = False
        for item in items:
            hit = _holds(state, item) or hit
        return hit
    for item in items:
        saved = state.save()
        found = _holds(state, item)
        state.restore(saved)
        if found:
            return False
    return True


def evaluate_rule(rule: CompiledRule, record: PatientRecord, now: datetime,
                  env: dict[str, Any]) -> Match | None:
    if not _applies(rule, record, now, env):
        return None
    state = _Evaluation(record, now, env)
    if not _group(state, "all", rule.all):
        return None
    if rule.any and not _group(state, "any", rule.any):
        return None
    if not _group(state, "none", rule.none):
        return None
    return Match(rule, state.bindings, state.dates, state.drafts)


def evaluate(rules: tuple[CompiledRule, ...], record: PatientRecord, now: datetime,
             context: dict[str, Any] | None = None, hook: str | None = None) -> Outcome:
    """FHIRPath sees the one environment (rules.fhirpath.environment) plus each rule's bound names."""
    env = environment(now, context, hook)
    outcome = Outcome()
    for rule in rules:
        try:
            match = evaluate_rule(rule, record, now, env)
        except Exception as exc:  # isolate: one broken rule must not take the others down
            log.warning("rule failed", extra={"rule": rule.id, "error": type(exc).__name__})
            outcome.failed.append(rule.id)
            continue
        if match is not None:
            outcome.matches.append(match)
    return outcome
