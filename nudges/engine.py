"""Evaluate compiled rules against one indexed record.

A rule runs only when the index holds candidates for its clauses; FHIRPath runs only on those
candidates. A rule that raises is isolated: counted, logged without PHI, and skipped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from .expressions import truthy
from .record import PatientRecord, parse_fhir_date, words
from .ruleset import CompiledClause, CompiledRule

log = logging.getLogger("nudges.engine")


@dataclass
class Match:
    rule: CompiledRule
    bindings: dict[str, dict[str, Any]]
    dates: dict[str, datetime | None]


@dataclass
class Outcome:
    matches: list[Match] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _says(pattern: re.Pattern[str], resource: dict[str, Any]) -> bool:
    return any(pattern.search(text) for text in words(resource))


def age_in_years(birth: date, today: date) -> int:
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


class _Evaluation:
    """State for one rule on one record: clock, FHIRPath environment, bindings so far."""

    __slots__ = ("bindings", "dates", "env", "now", "record")

    def __init__(self, record: PatientRecord, now: datetime, env: dict[str, Any]) -> None:
        self.record, self.now = record, now
        self.env = dict(env)
        self.bindings: dict[str, dict[str, Any]] = {}
        self.dates: dict[str, datetime | None] = {}

    def date_of(self, clause: CompiledClause, resource: dict[str, Any]) -> datetime | None:
        if clause.date is None:
            return self.record.date_of(resource)
        values = clause.date(resource, self.env)
        return parse_fhir_date(values[0]) if values else None

    def matches(self, clause: CompiledClause) -> list[tuple[datetime | None, dict[str, Any]]]:
        record, now = self.record, self.now
        timed = clause.within is not None or clause.older_than is not None or clause.since is not None
        since = self.dates.get(clause.since) if clause.since else None
        if clause.since and since is None:
            return []
        found = []
        for source in clause.sources:
            if clause.codes is not None:
                candidates = record.with_codes(source, clause.resource, clause.codes)
                if clause.text is not None:
                    coded = {id(r) for r in candidates}
                    candidates = candidates + [r for r in record.of_type(source, clause.resource)
                                               if id(r) not in coded and _says(clause.text, r)]
            elif clause.text is not None:
                candidates = [r for r in record.of_type(source, clause.resource) if _says(clause.text, r)]
            else:
                candidates = record.of_type(source, clause.resource)
            for resource in candidates:
                when = self.date_of(clause, resource) if timed or clause.bind else None
                if timed:
                    if when is None:
                        continue
                    if clause.within is not None and when < now - clause.within:
                        continue
                    if clause.older_than is not None and when > now - clause.older_than:
                        continue
                    if since is not None and when < since:
                        continue
                if clause.where is not None and not truthy(clause.where(resource, self.env)):
                    continue
                found.append((when, resource))
        return found

    def bind(self, clause: CompiledClause, found: list[tuple[datetime | None, dict[str, Any]]]) -> None:
        if clause.bind:
            when, resource = max(found, key=lambda item: (item[0] is not None, item[0] or self.now,
                                                          str(item[1].get("id", ""))))
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


def evaluate_rule(rule: CompiledRule, record: PatientRecord, now: datetime,
                  env: dict[str, Any]) -> Match | None:
    if not _applies(rule, record, now, env):
        return None
    state = _Evaluation(record, now, env)
    for clause in rule.all:
        found = state.matches(clause)
        if not found:
            return None
        state.bind(clause, found)
    if rule.any:
        hit = False
        for clause in rule.any:
            found = state.matches(clause)
            if found:
                hit = True
                state.bind(clause, found)
        if not hit:
            return None
    for clause in rule.none:
        if state.matches(clause):
            return None
    return Match(rule, state.bindings, state.dates)


def evaluate(rules: tuple[CompiledRule, ...], record: PatientRecord, now: datetime,
             context: dict[str, Any] | None = None, hook: str | None = None) -> Outcome:
    """FHIRPath sees %now, %today, %hook and the hook context's ids (%patientId, %encounterId, %userId)."""
    env: dict[str, Any] = {"now": now.isoformat().replace("+00:00", "Z"), "today": now.date().isoformat()}
    for name in ("patientId", "encounterId", "userId"):
        value = (context or {}).get(name)
        env[name] = value if isinstance(value, str) else []  # absent: empty, so comparisons are empty
    env["hook"] = hook or []
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
