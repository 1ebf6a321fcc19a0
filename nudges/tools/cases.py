"""`nudges test`: run each rule's cases beside it, through the same pipeline as the service.

Each case runs against its rule alone (whatever its status), at the case's pinned "now".
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .. import pipeline
from ..clock import parse_instant
from ..engine import Tracer
from ..errors import NudgesError
from ..fhir import bundle, patient_of
from ..hooks import HOOKS
from ..planned import parse_body
from ..rules.compiled import CompiledRule, RuleSet
from ..rules.folders import find_file
from ..rules.schema import Case, CaseExpectation
from ..services import Service, Services

CASE_SERVICE = "rule-case"


@dataclass(frozen=True)
class CaseResult:
    """One case's outcome: tp/tn (as expected), fp/fn (fired when it should not, or did not when it
    should), differs (fired with other content), error (could not run: a failure too, with its reason)."""

    name: str
    outcome: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in ("tp", "tn")


@dataclass
class RuleReport:
    rule: str
    cases: list[CaseResult] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(c.outcome == outcome for c in self.cases)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    @property
    def failures(self) -> list[str]:
        return [f"  case '{c.name}': {c.message}" for c in self.cases if not c.ok]

    def summary(self) -> str:
        if not self.cases:
            return f"NO CASES {self.rule}: write {self.rule}.cases.yaml beside the rule (nudges new rule shows how)"
        counts = " ".join(f"{o}={self.count(o)}" for o in ("tp", "tn", "fp", "fn", "differs", "error"))
        return f"{'PASS' if self.ok else 'FAIL'} {self.rule}: {len(self.cases)} case(s), {counts}"


def case_request(case: Case, folder: Path, fixture_dirs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The hook request an EHR would send for this case (everything prefetched)."""
    resources: list[dict[str, Any]] = []
    if case.bundle:
        data = orjson.loads(find_file(folder, case.bundle, fixture_dirs).read_bytes())
        resources += [e["resource"] for e in data.get("entry", []) if isinstance(e.get("resource"), dict)]
    resources += case.resources
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    encounter = next((r for r in resources if r.get("resourceType") == "Encounter"), None)
    # the case's patient: its Patient, else the one its resources are about
    about = (patient or {}).get("id") or next((p for r in resources if (p := patient_of(r))), "example")
    context: dict[str, Any] = {"userId": "Practitioner/example", "patientId": about}
    if case.hook in ("encounter-start", "encounter-discharge"):
        context["encounterId"] = (encounter or {}).get("id", "example-encounter")
    if case.hook in ("order-select", "order-sign"):
        context["draftOrders"] = bundle(case.draft_orders)
        if case.hook == "order-select":
            context["selections"] = case.selections or [
                f"{r['resourceType']}/{r.get('id')}" for r in case.draft_orders]
    if case.hook == "appointment-book":
        context["appointments"] = bundle(case.appointments)
    context.update(case.context)
    instance = hashlib.sha256(case.name.encode()).hexdigest()[:32]
    return {"hook": case.hook, "hookInstance": instance, "context": context,
            "prefetch": {"record": bundle(resources, "searchset")}}


def case_result(rule: CompiledRule, ruleset: RuleSet, case: Case, folder: Path, now: str,
                trace: Tracer | None = None) -> pipeline.Result:
    """One case through the pipeline, its rule served alone on the case's hook (a tracer: nudges explain).
    The request goes as bytes through the hook path's planned parse, which leaves out what the rule
    cannot read, so every case also checks that nothing a rule needs is left out; but not for explain,
    which shows the whole record (the codes it does have, when nothing was offered)."""
    service = Service.of(HOOKS[case.hook], (rule,), service_id=CASE_SERVICE, title=rule.title)
    services = Services(ruleset, {service.id: service})
    heads = service.index.heads if trace is None else None
    body = parse_body(orjson.dumps(case_request(case, folder, ruleset.fixture_dirs)), heads)
    call = pipeline.parse_call(services, service.id, body)
    return pipeline.evaluate(call, services, parse_instant(case.now or now), patient_hash="case", trace=trace)


def run_case(rule: CompiledRule, ruleset: RuleSet, case: Case, folder: Path, now: str) -> list[dict[str, Any]]:
    result = case_result(rule, ruleset, case, folder, now)
    if result.failed:
        caught = _Raised()  # again, to say why: a case's data is its author's, not a patient's
        case_result(rule, ruleset, case, folder, now, trace=caught)
        why = f": {type(caught.error).__name__}: {caught.error}" if caught.error is not None else ""
        raise RuntimeError(f"rule {rule.id} raised while evaluating{why}")
    return result.cards


class _Raised:
    """A tracer that hears only what made a rule raise (the service logs the exception's type alone)."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def done(self, rule: CompiledRule, match: Any, error: Exception | None) -> None:
        self.error = error or self.error

    def _ignore(self, *_: Any) -> None:
        return None

    begin = rule = age = patient = enter = leave = drop = windowed = clause = deceased = _ignore


def mismatches(expected: CaseExpectation, card: dict[str, Any]) -> list[str]:
    problems = []
    if expected.indicator and card["indicator"] != expected.indicator:
        problems.append("indicator")
    if expected.summary is not None and card["summary"] != expected.summary:
        problems.append("summary")
    if expected.summary_contains and expected.summary_contains not in card["summary"]:
        problems.append("summary_contains")
    if expected.detail_contains and expected.detail_contains not in card.get("detail", ""):
        problems.append("detail_contains")
    labels = [s["label"] for s in card.get("suggestions", [])]
    if expected.suggestions is not None and labels != expected.suggestions:
        problems.append("suggestions")
    return problems


def describe(card: dict[str, Any]) -> list[str]:
    lines = [f"indicator: {card['indicator']}", f"summary: {card['summary']}"]
    lines += [f"suggestion: {s['label']}" for s in card.get("suggestions", [])]
    return lines


def expectation_lines(expected: CaseExpectation) -> list[str]:
    data = expected.model_dump(exclude_none=True)
    lines = [f"{k}: {v}" for k, v in data.items() if k != "suggestions"]
    lines += [f"suggestion: {s}" for s in data.get("suggestions", [])]
    return lines or ["(any card)"]


def judge(case: Case, cards: list[dict[str, Any]]) -> CaseResult:
    """Every expectation against the card in its position; the numbers of cards must agree too."""
    if not case.expect:
        if not cards:
            return CaseResult(case.name, "tn")
        return CaseResult(case.name, "fp", "false positive, expected no card, got:\n"
                          + "\n".join("    + " + line for line in describe(cards[0])))
    if not cards:
        return CaseResult(case.name, "fn", "false negative, expected a card, got none:\n"
                          + "\n".join("    - " + line for line in expectation_lines(case.expect[0])))
    if len(cards) != len(case.expect):
        return CaseResult(case.name, "differs", f"expected {len(case.expect)} card(s), got {len(cards)}")
    for i, (expected, card) in enumerate(zip(case.expect, cards, strict=True)):
        wrong = mismatches(expected, card)
        if wrong:
            at = f" {i + 1}" if len(cards) > 1 else ""
            return CaseResult(case.name, "differs", f"card{at} differs ({', '.join(wrong)}):\n" + "\n".join(
                "    " + line for line in difflib.unified_diff(
                    expectation_lines(expected), describe(card), "expected", "actual", lineterm="")))
    return CaseResult(case.name, "tp")


def check_rule(rule: CompiledRule, ruleset: RuleSet) -> RuleReport:
    report = RuleReport(rule.id)
    entry = ruleset.cases.get(rule.id)
    if entry is None:
        return report
    path, cases = entry
    for case in cases.cases:
        try:
            cards = run_case(rule, ruleset, case, path.parent, cases.now)
        except (NudgesError, FileNotFoundError, RuntimeError, ValueError, orjson.JSONDecodeError) as exc:
            message = exc.diagnostics if isinstance(exc, NudgesError) else str(exc)
            report.cases.append(CaseResult(case.name, "error", f"could not run: {message}"))
            continue
        report.cases.append(judge(case, cards))
    return report


def run_all(ruleset: RuleSet, only: set[str] | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[RuleReport]:
    """Every rule's report (or only those named); `progress(done, total)` hears each rule run."""
    rules = [rule for rule in ruleset.rules if only is None or rule.id in only]
    reports = []
    for done, rule in enumerate(rules, 1):
        reports.append(check_rule(rule, ruleset))
        if progress is not None:
            progress(done, len(rules))
    finish = getattr(progress, "finish", None)
    if callable(finish):
        finish()
    return reports
