"""Evaluate compiled rules against one indexed record.

A rule runs only when the index holds candidates for its clauses; FHIRPath runs only on those
candidates. A rule that raises is isolated: counted, logged without PHI, and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

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


class Tracer(Protocol):
    """What the engine tells an observer about one evaluation (`nudges explain`). None on the hot path:
    every call below sits behind an `is not None` test, so tracing costs a serving call nothing."""

    def begin(self, record: PatientRecord, now: datetime) -> None: ...
    def rule(self, rule: CompiledRule) -> None: ...
    def age(self, rule: CompiledRule, age: int | None, held: bool) -> None: ...
    def patient(self, rule: CompiledRule, patient: dict[str, Any] | None, held: bool) -> None: ...
    def enter(self, mode: str, items: tuple[CompiledItem, ...]) -> None: ...
    def leave(self, held: bool) -> None: ...
    def drop(self, resource: dict[str, Any], why: str, when: datetime | None) -> None: ...
    def windowed(self, found: list[tuple[datetime | None, dict[str, Any]]]) -> None: ...
    def clause(self, clause: CompiledClause, hit: tuple[datetime | None, dict[str, Any]] | None,
               env: dict[str, Any], dates: dict[str, datetime | None]) -> None: ...
    def done(self, rule: CompiledRule, match: Match | None, error: Exception | None) -> None: ...
    def deceased(self, rule: CompiledRule, patient: dict[str, Any]) -> None: ...


def age_in_years(birth: date, today: date) -> int:
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


class _Evaluation:
    """State for one rule on one record: clock, FHIRPath environment, bindings so far."""

    __slots__ = ("bindings", "dates", "drafts", "env", "now", "record")
    shares = True  # answers that hold for the whole call are kept in record.settled (a traced run: each its own)

    def __init__(self, record: PatientRecord, now: datetime, env: dict[str, Any],
                 unbound: dict[str, Any] | None = None) -> None:
        self.record, self.now = record, now
        self.env = {**unbound, **env} if unbound else dict(env)  # the rule's names, empty until bound
        self.bindings: dict[str, dict[str, Any]] = {}
        self.dates: dict[str, datetime | None] = {}
        self.drafts: tuple[dict[str, Any], ...] = ()  # what the card is about, on order and booking hooks

    def date_of(self, clause: CompiledClause, resource: dict[str, Any]) -> datetime | None:
        if clause.date is None:
            return self.record.date_of(resource)
        if clause.dated is None or not self.shares:
            return self.dated(clause, resource)
        key, settled = ("date", clause.dated, id(resource)), self.record.settled  # CompiledClause.dated
        if key not in settled:
            settled[key] = self.dated(clause, resource)
        return settled[key]

    def dated(self, clause: CompiledClause, resource: dict[str, Any]) -> datetime | None:
        assert clause.date is not None
        values = clause.date(resource, self.env)
        return parse_fhir_date(values[0]) if values else None

    def candidates(self, clause: CompiledClause, source: str, since: datetime | None = None,
                   window: bool = False) -> list[dict[str, Any]]:
        """What the index (and a clause's text pattern) leaves for FHIRPath to look at. With `window`, a
        text pattern is searched only in resources inside the clause's time window (match drops the others
        anyway): gathering a resource's words is the costly part of a `text:` clause, and a type read by
        words (Observation) holds years of results. A clause dated by a FHIRPath `date:` (dearer than a
        search behind the prefilter) searches first and narrows what it found to the window."""
        record = self.record
        if clause.text is None:
            return record.of_type(source, clause.resource) if clause.codes is None else \
                record.with_codes(source, clause.resource, clause.codes)
        if not record.may_say(source, clause.resource, clause.text):  # no resource of the type can say it
            return record.with_codes(source, clause.resource, clause.codes) if clause.codes is not None else []
        pool = record.of_type(source, clause.resource)
        dear = clause.date is not None  # a FHIRPath date costs more than a resource's words: searched first
        if window and not dear:
            pool = [r for r in pool if self.in_window(clause, r, since)]
        found = [] if clause.codes is None else record.with_codes(source, clause.resource, clause.codes)
        coded = {id(r) for r in found}
        said = [r for r in pool if id(r) not in coded and record.says(clause.text, r)]
        if window and dear:
            said = [r for r in said if self.in_window(clause, r, since)]
        return found + said

    def in_window(self, clause: CompiledClause, resource: dict[str, Any], since: datetime | None) -> bool:
        return self.outside(clause, self.date_of(clause, resource), since) is None

    def outside(self, clause: CompiledClause, when: datetime | None, since: datetime | None) -> str | None:
        """Which of a timed clause's bounds a date misses ("no date", "within", "older_than", "since"), or
        None when it lies inside all of them: one test for the text scan's narrowing and for match."""
        if when is None:
            return "no date"
        if clause.within is not None and when < self.now - clause.within:
            return "within"
        if clause.older_than is not None and when > self.now - clause.older_than:
            return "older_than"
        if since is not None and when < since:
            return "since"
        return None

    def match(self, clause: CompiledClause,
              trace: Tracer | None = None) -> tuple[datetime | None, dict[str, Any]] | None:
        """The resource a clause is satisfied by, or None.

        A binding clause needs the latest match (or the earliest, with `pick: earliest`; ties broken by id),
        anything else just one, so FHIRPath runs on candidates in that order and stops at the first that
        passes: most calls evaluate it once or not at all, however many candidates the index returns."""
        if trace is None and clause.text is None and clause.codes is not None and \
                self.record.lacks_codes(clause.sources, clause.resource, clause.codes):
            return None  # the common case, in short
        now = self.now
        timed = clause.within is not None or clause.older_than is not None or clause.since is not None
        since = self.dates.get(clause.since) if clause.since else None
        if clause.since and since is None:
            return None
        dated = timed or clause.bind is not None
        found: list[tuple[datetime | None, dict[str, Any]]] = []
        window = timed and trace is None  # a trace reports every resource a window drops (nudges explain)
        for source in clause.sources:
            for resource in self.candidates(clause, source, since, window):
                when = self.date_of(clause, resource) if dated else None
                if timed and (missed := self.outside(clause, when, since)) is not None:
                    if trace is not None:
                        trace.drop(resource, missed, when)
                    continue
                if clause.where is None and clause.bind is None and trace is None:
                    return when, resource
                found.append((when, resource))
        if trace is not None:
            trace.windowed(found)
        if not found:
            return None
        if trace is not None and clause.where is None and clause.bind is None:
            return found[0]  # what the early return above takes when not tracing

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
        canonical = self.record.canonical
        if clause.settled is None or not self.shares:
            return next(((when, resource) for when, resource in found
                         if truthy(where(canonical(resource), self.env))), None)
        settled, text, memo = self.record.settled, clause.settled, clause.memo  # CompiledClause.settled, .memo
        for when, resource in found:
            key = ("where", text, id(resource))
            held = settled.get(key)
            if held is None:
                held = settled[key] = truthy(where(canonical(resource), self.env)) if memo is None else \
                    memo.held(canonical(resource), self.env)
            if held:
                return when, resource
        return None

    def save(self) -> _Saved:
        return dict(self.bindings), dict(self.dates), dict(self.env), self.drafts

    def restore(self, saved: _Saved) -> None:
        self.bindings, self.dates, self.env, self.drafts = saved

    def bind(self, clause: CompiledClause, hit: tuple[datetime | None, dict[str, Any]]) -> None:
        when, resource = hit
        if clause.sources != ("record",) and self.record.is_draft(resource):
            self.drafts += (resource,)
        if clause.bind:
            if clause.bind in self.bindings and not _preferred(clause, when, self.dates.get(clause.bind)):
                return  # the branches of an `any` bind one name (schema.alternatives): the latest match wins
            self.bindings[clause.bind] = resource
            self.dates[clause.bind] = when
            self.env[clause.bind] = resource


def _preferred(clause: CompiledClause, when: datetime | None, held: datetime | None) -> bool:
    """Whether a second branch's match replaces the one an earlier branch bound: it is later (earlier, with
    `pick: earliest`); an undated match never displaces a dated one, and on a tie the first stays."""
    if when is None:
        return False
    if held is None:
        return True
    return when < held if clause.earliest else when > held


def deceased(patient: dict[str, Any] | None, now: datetime) -> bool:
    """Whether the Patient has died by `now` (deceasedBoolean true, or a deceasedDateTime not after now).
    Every nudge is about the care of a living patient: a screening offer, a navigator's list or a
    discharge leaflet for someone who has died hurts the family and the clinician's trust in the tool,
    and US Core charts carry the fact. Read once per evaluation, before any rule."""
    if not patient:
        return False
    if patient.get("deceasedBoolean") is True:
        return True
    when = parse_fhir_date(patient.get("deceasedDateTime"))
    return when is not None and when <= now


_AGE = ("age", "", 0)  # the patient's age in record.settled


def _applies(rule: CompiledRule, record: PatientRecord, now: datetime, env: dict[str, Any],
             trace: Tracer | None = None) -> bool:
    if rule.age_min is not None or rule.age_max is not None:
        settled = record.settled
        if _AGE in settled:  # one call's patient and clock: worked out once, whatever the number of rules
            age = settled[_AGE]
        else:
            birth = parse_fhir_date((record.patient or {}).get("birthDate"))
            age = settled[_AGE] = None if birth is None else age_in_years(birth.date(), now.date())
        held = age is not None and not ((rule.age_min is not None and age < rule.age_min) or (
            rule.age_max is not None and age > rule.age_max))
        if trace is not None:
            trace.age(rule, age, held)
        if not held:
            return False
    if rule.patient is not None:
        held = record.patient is not None and truthy(rule.patient(record.canonical(record.patient), env))
        if trace is not None:
            trace.patient(rule, record.patient, held)
        return held
    return True


class _Traced(_Evaluation):
    """The same evaluation, telling a tracer every step (nudges explain)."""

    __slots__ = ("trace",)

    def __init__(self, record: PatientRecord, now: datetime, env: dict[str, Any], trace: Tracer,
                 unbound: dict[str, Any] | None = None) -> None:
        super().__init__(record, now, env, unbound)
        self.trace = trace

    shares = False  # every clause works out its own `where` and `date` answers: the trace reports each


Holds = Callable[["_Evaluation", CompiledItem], bool]


def _holds(state: _Evaluation, item: CompiledItem) -> bool:
    if isinstance(item, CompiledClause):
        hit = state.match(item)
        if hit is None:
            return False
        state.bind(item, hit)
        return True
    return _group(state, item.mode, item.items)


def _traced_holds(state: _Evaluation, item: CompiledItem) -> bool:
    """_holds, telling the tracer each clause's outcome and each nested group's start and end."""
    assert isinstance(state, _Traced)
    trace = state.trace
    if isinstance(item, CompiledClause):
        hit = state.match(item, trace)
        trace.clause(item, hit, state.env, state.dates)
        if hit is None:
            return False
        state.bind(item, hit)
        return True
    return _traced_group(state, trace, item.mode, item.items)


def _traced_group(state: _Evaluation, trace: Tracer, mode: str, items: tuple[CompiledItem, ...]) -> bool:
    trace.enter(mode, items)
    held = _group(state, mode, items, _traced_holds)
    trace.leave(held)
    return held


def _group(state: _Evaluation, mode: str, items: tuple[CompiledItem, ...], holds: Holds = _holds) -> bool:
    """all: every item (a failed branch leaves no bindings behind); any: at least one, every matching
    item binding; none: no item, tried without keeping its bindings."""
    if mode == "all":
        saved = state.save()
        for item in items:
            if not holds(state, item):
                state.restore(saved)
                return False
        return True
    if mode == "any":
        hit = False
        for item in items:
            hit = holds(state, item) or hit
        return hit
    for item in items:
        saved = state.save()
        found = holds(state, item)
        state.restore(saved)
        if found:
            return False
    return True


def evaluate_rule(rule: CompiledRule, record: PatientRecord, now: datetime,
                  env: dict[str, Any]) -> Match | None:
    if not _applies(rule, record, now, env):
        return None
    state = _Evaluation(record, now, env, rule.unbound)
    # _group without its snapshots: an item that fails leaves the state as it found it (a clause binds only
    # when it matches; a group that fails restores itself), and a failure here ends the rule
    for item in rule.all:
        if not _holds(state, item):
            return None
    if rule.any and not _group(state, "any", rule.any):
        return None
    for item in rule.none:
        if _holds(state, item):
            return None
    return Match(rule, state.bindings, state.dates, state.drafts)


def _traced_rule(rule: CompiledRule, record: PatientRecord, now: datetime, env: dict[str, Any],
                 trace: Tracer) -> Match | None:
    """evaluate_rule, step for step, each part reported as a group."""
    if not _applies(rule, record, now, env, trace):
        return None
    state = _Traced(record, now, env, trace, rule.unbound)
    if not _traced_group(state, trace, "all", rule.all):
        return None
    if rule.any and not _traced_group(state, trace, "any", rule.any):
        return None
    if rule.none and not _traced_group(state, trace, "none", rule.none):
        return None
    return Match(rule, state.bindings, state.dates, state.drafts)


def evaluate(rules: tuple[CompiledRule, ...], record: PatientRecord, now: datetime,
             context: dict[str, Any] | None = None, hook: str | None = None,
             trace: Tracer | None = None) -> Outcome:
    """FHIRPath sees the one environment (rules.fhirpath.environment) plus each rule's bound names.
    With a tracer, every step of every rule is reported to it (nudges explain); without, nothing is."""
    patient = record.patient
    if deceased(patient, now):  # no rule for a patient who has died (see deceased)
        if trace is not None:
            trace.begin(record, now)
            for rule in rules:
                trace.rule(rule)
                trace.deceased(rule, patient or {})
                trace.done(rule, None, None)
        return Outcome()
    env = environment(now, context, hook, patient)
    record.settled = {}  # what one call's clock, context and patient settle (CompiledClause.settled, .dated)
    if trace is not None:
        return _traced(rules, record, now, env, trace)
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


def _traced(rules: tuple[CompiledRule, ...], record: PatientRecord, now: datetime, env: dict[str, Any],
            trace: Tracer) -> Outcome:
    """evaluate's loop with a tracer told of every rule, its steps and its outcome."""
    outcome = Outcome()
    trace.begin(record, now)
    for rule in rules:
        trace.rule(rule)
        try:
            match = _traced_rule(rule, record, now, env, trace)
        except Exception as exc:  # isolated as in evaluate
            log.warning("rule failed", extra={"rule": rule.id, "error": type(exc).__name__})
            outcome.failed.append(rule.id)
            trace.done(rule, None, exc)
            continue
        trace.done(rule, match, None)
        if match is not None:
            outcome.matches.append(match)
    return outcome
