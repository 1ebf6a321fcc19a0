"""`nudges explain`: why each rule did or did not fire on one hook call, clause by clause.

The trace is recorded by the engine itself (engine.Tracer) while the call runs through the same
parse → complete → evaluate as a served call, with nothing suppressed and nothing stored, so what is
explained is what the service does. The console renders `Explanation.to_dict()` (its shape is a contract:
keys may be added, never removed or retyped):

    {hook, now, service, cards, record, rules: [{rule, title, fired, error, reason, served, bindings, card,
                                                 steps}]}

A step is {where (path in the rule YAML), kind (clause | group | age | patient), under (all | any | none:
the list it sits in), mode (a group's all | any | none), resource, codes (value-set name), text, fhirpath,
as, since, source, candidates (what the index and text offered), in_window (after within / older_than / since), passed
(after `where`), chosen (the matching resource), held, evaluated, notes, steps}. For an item under a
`none`, held means it matched, which blocks the rule; a step the engine never reached has evaluated false
and held false.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import pipeline
from ..clock import parse_instant
from ..engine import Match
from ..fhir import canonicalize, concepts, instant, referenced_medication
from ..record import PatientRecord
from ..rules.compiled import CompiledClause, CompiledGroup, CompiledItem, CompiledRule, RuleSet
from ..rules.fhirpath import truthy
from ..rules.resources import did_you_mean
from ..rules.schema import Case, Clause, Group
from ..services import Services
from ..settings import Settings
from .comparisons import failing_part, shorten, where_values

MAX_NOTES = 12  # per step: a 2,000-Observation record must not print 2,000 lines
MAX_CODES = 5


STEP_KEYS = ("where", "kind", "under", "mode", "resource", "codes", "text", "fhirpath", "since", "source",
             "candidates", "in_window", "passed", "chosen", "held", "evaluated")


@dataclass
class Step:
    where: str
    kind: str
    under: str | None = None
    mode: str | None = None
    resource: str | None = None
    codes: str | None = None
    text: str | None = None
    fhirpath: str | None = None
    bind: str | None = None
    since: str | None = None
    source: str | None = None  # record | draft | selected | any
    candidates: int | None = None
    in_window: int | None = None
    passed: int | None = None
    chosen: str | None = None
    held: bool = False
    evaluated: bool = True
    notes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    def note(self, text: str, *, limit: int = MAX_NOTES) -> None:
        if len(self.notes) < limit:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        data = {key: getattr(self, key) for key in STEP_KEYS}
        data["as"] = self.bind
        data["notes"] = list(self.notes)
        data["steps"] = [s.to_dict() for s in self.steps]
        return data


@dataclass
class RuleTrace:
    rule: str
    title: str
    fired: bool = False
    error: str | None = None
    reason: str = ""
    served: bool = True
    bindings: dict[str, dict[str, str | None]] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    card: dict[str, Any] | None = None  # the card this rule raised in the call

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "title": self.title, "fired": self.fired, "error": self.error,
                "reason": self.reason, "served": self.served, "bindings": self.bindings, "card": self.card,
                "steps": [s.to_dict() for s in self.steps]}


@dataclass
class Explanation:
    hook: str
    now: datetime
    service: str
    cards: list[dict[str, Any]]
    rules: list[RuleTrace]
    record: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> type -> usable resources

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "now": instant(self.now), "service": self.service, "cards": self.cards,
                "record": self.record, "rules": [r.to_dict() for r in self.rules]}


def reference(resource: dict[str, Any]) -> str:
    kind, rid = resource.get("resourceType"), resource.get("id")
    return f"{kind}/{rid}" if isinstance(rid, str) else f"{kind} (no id)"


@dataclass
class _Frame:
    """One group being evaluated: where its items' steps go and the YAML items they came from."""

    path: str
    mode: str
    items: tuple[CompiledItem, ...]
    models: list[Any]
    steps: list[Step]  # for a top-level part, the rule's own list (the parts' items side by side)
    step: Step | None  # None for the top-level parts (when.all, when.any, when.none)
    count: int = 0  # items reported so far

    def next_path(self) -> tuple[str, Any]:
        """The path and YAML model of the next item of this group."""
        index, self.count = self.count, self.count + 1
        return f"{self.path}[{index}]", _model(self.models, index)


class Recorder:
    """An engine.Tracer that keeps every step as a Step tree, rule by rule."""

    def __init__(self) -> None:
        self.record: PatientRecord | None = None
        self.now: datetime | None = None
        self.traces: dict[str, RuleTrace] = {}
        self._rule: CompiledRule | None = None
        self._stack: list[_Frame] = []
        self._entered: set[str] = set()
        self._drops: list[tuple[dict[str, Any], str, datetime | None]] = []
        self._found: list[tuple[datetime | None, dict[str, Any]]] | None = None

    # -- engine.Tracer ---------------------------------------------------------------------------------
    def begin(self, record: PatientRecord, now: datetime) -> None:
        self.record, self.now = record, now

    def rule(self, rule: CompiledRule) -> None:
        self._rule, self._stack, self._entered = rule, [], set()
        self.traces[rule.id] = RuleTrace(rule.id, rule.title)

    @property
    def _trace(self) -> RuleTrace:
        assert self._rule is not None
        return self.traces[self._rule.id]

    def age(self, rule: CompiledRule, age: int | None, held: bool) -> None:
        low, high = rule.age_min if rule.age_min is not None else 0, rule.age_max
        bounds = f"{low}–{high}" if high is not None else f"{low} and over"
        step = Step("when.age", "age", held=held)
        step.note(f"no birthDate on the Patient, so the age range {bounds} cannot hold" if age is None
                  else f"age {age}, range {bounds}")
        self._trace.steps.append(step)

    def patient(self, rule: CompiledRule, patient: dict[str, Any] | None, held: bool) -> None:
        step = Step("when.patient", "patient", resource="Patient", fhirpath=rule.model.when.patient, held=held,
                    candidates=int(patient is not None), chosen=reference(patient) if patient and held else None)
        step.note("no Patient resource in the call" if patient is None
                  else f"`patient` {'held' if held else 'did not hold'} on {reference(patient)}")
        self._trace.steps.append(step)

    def deceased(self, rule: CompiledRule, patient: dict[str, Any]) -> None:
        step = Step("when", "deceased", resource="Patient", held=False, candidates=1, chosen=reference(patient))
        when = patient.get("deceasedDateTime")
        step.note(f"{reference(patient)} has died{f' ({when})' if isinstance(when, str) else ''}: "
                  "no nudge is raised for a deceased patient")
        self._trace.steps.append(step)

    def enter(self, mode: str, items: tuple[CompiledItem, ...]) -> None:
        if not self._stack:
            assert self._rule is not None
            self._entered.add(mode)
            self._stack.append(_Frame(f"when.{mode}", mode, items, list(getattr(self._rule.model.when, mode)),
                                      self._trace.steps, None))
            return
        parent = self._stack[-1]
        where, model = parent.next_path()
        step = Step(where, "group", under=parent.mode, mode=mode)
        parent.steps.append(step)
        self._stack.append(_Frame(f"{step.where}.{mode}", mode, items,
                                  list(model.items) if isinstance(model, Group) else [], step.steps, step))

    def leave(self, held: bool) -> None:
        frame = self._stack.pop()
        why = {"all": "an earlier item did not hold", "none": "an earlier item matched"}.get(frame.mode, "")
        for index in range(frame.count, len(frame.items)):
            frame.steps.append(_skipped(f"{frame.path}[{index}]", frame.mode, frame.items[index],
                                        _model(frame.models, index), why))
        if frame.step is not None:
            frame.step.held = held

    def drop(self, resource: dict[str, Any], why: str, when: datetime | None) -> None:
        self._drops.append((resource, why, when))

    def windowed(self, found: list[tuple[datetime | None, dict[str, Any]]]) -> None:
        self._found = found

    def clause(self, clause: CompiledClause, hit: tuple[datetime | None, dict[str, Any]] | None,
               env: dict[str, Any], dates: dict[str, datetime | None]) -> None:
        frame = self._stack[-1]
        where, model = frame.next_path()
        step = _clause_step(where, frame.mode, clause, model)
        step.held = hit is not None
        step.chosen = reference(hit[1]) if hit is not None else None
        drops, found = self._drops, self._found
        self._drops, self._found = [], None
        if found is None:  # the engine stopped before looking: `since` names a resource that was not bound
            step.candidates = step.in_window = step.passed = 0
            step.note(f"not looked for: '{clause.since}' was not bound, so nothing can be dated since it")
        else:
            self._counts(step, clause, model, drops, found, env, dates)
        frame.steps.append(step)

    def done(self, rule: CompiledRule, match: Match | None, error: Exception | None) -> None:
        trace = self._trace
        if error is not None:
            trace.error = f"{type(error).__name__}: {error}"
        last = trace.steps[-1] if trace.steps else None
        why = ("the age range did not hold" if last.kind == "age" else "the patient is deceased"
               if last.kind == "deceased" else "an earlier part did not hold") if last and not last.held \
            else "an earlier part did not hold"
        for mode, items in (("all", rule.all), ("any", rule.any), ("none", rule.none)):
            if items and mode not in self._entered and error is None:
                models = list(getattr(rule.model.when, mode))
                trace.steps += [_skipped(f"when.{mode}[{i}]", mode, item, _model(models, i), why)
                                for i, item in enumerate(items)]
        trace.fired = match is not None
        if match is not None:
            trace.bindings = {name: {"reference": reference(resource),
                                     "date": instant(d) if (d := match.dates.get(name)) else None}
                              for name, resource in match.bindings.items()}
        trace.reason = reason(trace)
        # a rule that raised mid-clause leaves its candidates behind: the next rule starts clean
        self._rule, self._stack, self._drops, self._found = None, [], [], None

    # -- what the counts and notes say ----------------------------------------------------------------
    def _counts(self, step: Step, clause: CompiledClause, model: Clause | None,
                drops: list[tuple[dict[str, Any], str, datetime | None]],
                found: list[tuple[datetime | None, dict[str, Any]]], env: dict[str, Any],
                dates: dict[str, datetime | None]) -> None:
        step.candidates, step.in_window = len(drops) + len(found), len(found)
        for resource, why, when in drops:
            step.note(f"excluded {reference(resource)}: {_window_reason(why, when, model, dates)}")
        passed = 0
        if clause.where is None:
            passed = len(found)
        else:
            for _, resource in found:
                try:
                    canonicalize(resource)  # as the engine does before FHIRPath reads it (record.canonical)
                    ok = truthy(clause.where(resource, env))
                except Exception as exc:  # the engine would have raised too, had it reached this one
                    step.note(f"{reference(resource)}: `where` raised {type(exc).__name__}: {exc}")
                    continue
                passed += ok
                if not ok:
                    expression = model.where if model else None
                    part = failing_part(expression, resource, env)
                    values = where_values(part or expression, resource, env)
                    step.note(f"excluded {reference(resource)}: `where` did not hold"
                              + (f": `{shorten(part)}` was not true" if part else "")
                              + (f" ({values})" if values else ""))
        step.passed = passed
        if len(step.notes) == MAX_NOTES:
            step.notes[-1] = "... (more exclusions not listed)"
        self._set_aside(step, clause)
        if step.candidates == 0:
            self._hints(step, clause, model)

    def _set_aside(self, step: Step, clause: CompiledClause) -> None:
        """Resources of the type the engine never saw: entered in error, refuted, duplicate ids."""
        if self.record is None:
            return
        for source in clause.sources:
            for resource, why in self.record.set_aside(source, clause.resource):
                if _would_offer(self.record, clause, resource):
                    step.note(f"set aside {reference(resource)}: {why}", limit=MAX_NOTES + 3)

    def _hints(self, step: Step, clause: CompiledClause, model: Clause | None) -> None:
        """Why nothing was offered: no resource of the type at all, a code under another system, or
        which codes the record does have, so a wrong system URI or a missing code is plain to see."""
        record = self.record
        if record is None:
            return
        present = [r for source in clause.sources for r in record.of_type(source, clause.resource)]
        if not present:
            step.note(f"no {clause.resource} {_place(step.source)}" + ("" if clause.required else
                      " (read when the EHR sends it, `required: false`: a call without it is answered without it)"))
            return
        if clause.codes is None:
            return
        medications = record.medications()
        for resource in present:  # coded only through a Medication the call does not hold: nothing to match
            named = resource.get("medicationReference")
            if isinstance(named, dict) and referenced_medication(resource, medications) is None:
                target = str(named.get("reference") or named.get("display") or "a Medication")
                step.note(f"{reference(resource)} names its medication by reference ({target}), which the call "
                          "does not hold: its codes cannot be read (prefetch the Medication, e.g. with "
                          "`_include=MedicationRequest:medication`)")
        by_code: dict[str, set[str]] = {}
        for system, code in clause.codes:
            by_code.setdefault(code, set()).add(system)
        seen: dict[tuple[str, str], str] = {}
        for resource in present:
            for coding in _codings(record, resource):
                system, code = str(coding.get("system")), str(coding.get("code"))
                if code in by_code and system not in by_code[code]:
                    step.note(f"{reference(resource)} has code {code} under system '{system}'; value set "
                              f"'{step.codes}' lists it under {', '.join(sorted(by_code[code]))}")
                seen.setdefault((system, code), str(coding.get("display") or ""))
        if seen:
            listed = [f"{s}|{c}" + (f" ({d})" if d else "") for (s, c), d in sorted(seen.items())[:MAX_CODES]]
            more = f" and {len(seen) - MAX_CODES} more" if len(seen) > MAX_CODES else ""
            step.note(f"{clause.resource} codes present: {', '.join(listed)}{more}; none is in '{step.codes}'")


PLACES = {"record": "in the record", "draft": "among the hook's drafts (draftOrders, appointments)",
          "selected": "among the selected orders", "any": "in the record or the hook's drafts"}


def _place(source: str | None) -> str:
    return PLACES.get(source or "record", "in the record")


def _model(models: list[Any], index: int) -> Any:
    return models[index] if index < len(models) else None


def _codings(record: PatientRecord, resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The codings that say what a resource is (a referenced Medication's included)."""
    found = []
    for concept in concepts(resource, record.medications()):
        if isinstance(concept, dict):
            found += [c for c in concept.get("coding") or () if isinstance(c, dict)]
    return found


def _would_offer(record: PatientRecord, clause: CompiledClause, resource: dict[str, Any]) -> bool:
    if clause.codes is None and clause.text is None:
        return True
    if clause.text is not None and record.says(clause.text, resource):
        return True
    codes = clause.codes or frozenset()
    return any((str(c.get("system")), str(c.get("code"))) in codes for c in _codings(record, resource))


def _window_reason(why: str, when: datetime | None, model: Clause | None, dates: dict[str, datetime | None]) -> str:
    dated = f" (dated {instant(when)})" if when else ""
    if why == "no date":
        return "no date, and the clause has a time window" + (f" (`date: {model.date}` gave none)"
                                                               if model and model.date else "")
    if why == "within":
        return f"older than {model.within if model else 'the window'}{dated}"
    if why == "older_than":
        return f"more recent than {model.older_than if model else 'the window'}{dated}"
    anchor = model.since if model else None
    at = dates.get(anchor) if anchor else None
    return f"before {anchor}{f' ({instant(at)})' if at else ''}{dated}"


def _clause_step(where: str, under: str, clause: CompiledClause, model: Clause | None) -> Step:
    return Step(where, "clause", under=under, resource=clause.resource,
                codes=model.codes if model else None, text=model.text if model else None,
                fhirpath=model.where if model else None, bind=clause.bind, since=clause.since,
                source=model.source if model else None)


def _skipped(where: str, under: str, item: CompiledItem, model: Any, why: str) -> Step:
    """A step the engine never reached (an `all` stops at its first failure, a `none` at its first match)."""
    if isinstance(item, CompiledGroup):
        step = Step(where, "group", under=under, mode=item.mode, evaluated=False)
        models = list(model.items) if isinstance(model, Group) else []
        step.steps = [_skipped(f"{where}.{item.mode}[{i}]", item.mode, child, _model(models, i), why)
                      for i, child in enumerate(item.items)]
    else:
        step = _clause_step(where, under, item, model)
        step.evaluated = False
    if why:
        step.note(f"not evaluated: {why}")
    return step


# -- one sentence per rule ------------------------------------------------------------------------------
def _what(step: Step) -> str:
    parts = [step.resource or ""]
    if step.codes:
        parts.append(f"in {step.codes}")
    if step.text:
        parts.append(f"mentioning /{step.text}/")
    return " ".join(p for p in parts if p)


def why_not(step: Step) -> str:
    """Why a clause or group did not hold (for a `none` item: that it matched)."""
    if step.kind in ("age", "patient", "deceased"):
        return step.notes[0] if step.notes else f"{step.kind} did not hold"
    if step.kind == "group":
        evaluated = [s for s in step.steps if s.evaluated]
        if step.mode == "none":
            hit = next((s for s in evaluated if s.held), None)
            return f"{hit.where} matched ({why_held(hit)})" if hit else "an item matched"
        failed = next((s for s in evaluated if not s.held), None)
        if step.mode == "any":
            return f"no item held (first: {failed.where}: {why_not(failed)})" if failed else "no item held"
        return f"{failed.where}: {why_not(failed)}" if failed else "an item did not hold"
    if step.under == "none" or step.held:
        return why_held(step)
    if step.candidates == 0:
        since = next((n for n in step.notes if n.startswith("not looked for")), None)
        return since.removeprefix("not looked for: ") if since else f"no {_what(step)} {_place(step.source)}"
    if step.in_window == 0:
        first = next((n for n in step.notes if n.startswith("excluded")), "")
        return f"{step.candidates} {_what(step)}, none in the time window ({first})"
    return f"{step.in_window} {_what(step)} in the time window, `where` held for none"


def why_held(step: Step) -> str:
    if step.kind == "group":
        return f"its {step.mode} held"
    since = f" since {step.since}" if step.since else ""
    return f"{step.chosen or 'a resource'} matches ({_what(step)}{since})"


def reason(trace: RuleTrace) -> str:
    if trace.error:
        return f"the rule raised {trace.error}; it was skipped (the other rules ran)"
    steps = [s for s in trace.steps if s.evaluated]
    if trace.fired:
        parts = []
        for under, label in (("all", "every `all` item held"), ("any", "an `any` item held"),
                             ("none", "no `none` item matched")):
            if any(s.under == under for s in steps):
                parts.append(label)
        bound = "; ".join(f"{name} = {b['reference']}" for name, b in trace.bindings.items())
        return "fired: " + (", ".join(parts) or "its conditions held") + (f" ({bound})" if bound else "")
    for step in steps:
        if step.kind in ("age", "patient", "deceased") and not step.held:
            return f"{step.where}: {why_not(step)}"
        if step.under == "all" and not step.held:
            return f"{step.where}: {why_not(step)}"
        if step.under == "none" and step.held:
            return f"{step.where}: {why_not(step)}, so the rule is blocked"
    tried = [s for s in steps if s.under == "any"]
    if tried and not any(s.held for s in tried):
        return f"no `any` item held (first: {tried[0].where}: {why_not(tried[0])})"
    return "did not fire"


# -- the entry points -----------------------------------------------------------------------------------
def explain(services: Services, body: dict[str, Any], now: datetime, settings: Settings | None = None,
            rule_ids: set[str] | None = None) -> Explanation:
    """Run one hook call body through the real pipeline with the engine's tracer and explain every rule
    served on its hook (or only `rule_ids`; a named rule the hook does not serve says why). A body the
    service would refuse raises the same NudgesError (BadRequest, NotFound, PreconditionFailed: its
    `status` and `diagnostics` are the answer the service would give)."""
    settings = settings or Settings()
    recorder = Recorder()
    result = pipeline.run_body(services, settings, body, now, trace=recorder)
    hook = str(body.get("hook"))
    service = services.for_hook(hook)
    traces = [recorder.traces[r.id] for r in service.rules if rule_ids is None or r.id in rule_ids]
    for rule_id in sorted((rule_ids or set()) - {r.id for r in service.rules}):
        traces.append(_not_served(services, rule_id, hook, settings))
    return _explanation(hook, now, service.id, result, traces, recorder)


def explain_case(ruleset: RuleSet, rule: CompiledRule, case: Case, folder: Path, now: str) -> Explanation:
    """A rule's case as `nudges test` runs it (the rule alone, whatever its status, everything prefetched)."""
    from .cases import CASE_SERVICE, case_result

    recorder = Recorder()
    result = case_result(rule, ruleset, case, folder, now, trace=recorder)
    return _explanation(case.hook, parse_instant(case.now or now), CASE_SERVICE, result, [recorder.traces[rule.id]],
                        recorder)


def _explanation(hook: str, now: datetime, service: str, result: pipeline.Result, traces: list[RuleTrace],
                 recorder: Recorder) -> Explanation:
    cards = {issued.rule_id: issued.card for issued in result.issued}
    for trace in traces:
        trace.card = cards.get(trace.rule)
    return Explanation(hook, now, service, result.cards, traces,
                       recorder.record.inventory() if recorder.record is not None else {})


def _not_served(services: Services, rule_id: str, hook: str, settings: Settings) -> RuleTrace:
    rule = next((r for r in services.ruleset.rules if r.id == rule_id), None)
    if rule is None:
        known = {r.id for r in services.ruleset.rules}
        return RuleTrace(rule_id, "", served=False, reason=f"no rule '{rule_id}' in the rule set"
                                                           f"{did_you_mean(rule_id, known)}")
    if hook not in rule.hooks:
        why = f"not served on {hook}: its hooks are {', '.join(sorted(rule.hooks))}"
    else:
        why = (f"not served: its status is {rule.status}, and the service serves "
               f"{', '.join(sorted(settings.rule_statuses))} (`rule_statuses`)")
    return RuleTrace(rule.id, rule.title, served=False, reason=why)
