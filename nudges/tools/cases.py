"""`nudges test`: run each rule's cases beside it, through the same pipeline as the service.

Each case runs against its rule alone (whatever its status), at the case's pinned "now".
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .. import pipeline
from ..clock import parse_instant
from ..errors import NudgesError
from ..fhir import bundle
from ..hooks import HOOKS
from ..rules.compiled import CompiledRule, RuleSet
from ..rules.schema import Case, CaseExpectation
from ..services import Service, Services


@dataclass
class RuleReport:
    rule: str
    tp: int = 0
    tn: int = 0
    fp: int = 0
    fn: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def find_file(start: Path, relative: str) -> Path:
    """A fixture path is looked up relative to the cases file's folder, then each parent folder."""
    for folder in (start, *start.parents):
        candidate = folder / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(relative)


def case_request(case: Case, folder: Path) -> dict[str, Any]:
    """The hook request an EHR would send for this case (everything prefetched)."""
    resources: list[dict[str, Any]] = []
    if case.bundle:
        data = orjson.loads(find_file(folder, case.bundle).read_bytes())
        resources += [e["resource"] for e in data.get("entry", []) if isinstance(e.get("resource"), dict)]
    resources += case.resources
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    encounter = next((r for r in resources if r.get("resourceType") == "Encounter"), None)
    context: dict[str, Any] = {"userId": "Practitioner/example",
                               "patientId": (patient or {}).get("id", "example")}
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


def run_case(rule: CompiledRule, ruleset: RuleSet, case: Case, folder: Path, now: str) -> list[dict[str, Any]]:
    service = Service.of(HOOKS[case.hook], (rule,), service_id="rule-case", title=rule.title)
    services = Services(ruleset, {service.id: service})
    call = pipeline.parse_call(services, service.id, case_request(case, folder))
    result = pipeline.evaluate(call, services, parse_instant(case.now or now), patient_hash="case")
    if result.failed:
        raise RuntimeError(f"rule {rule.id} raised while evaluating")
    return result.cards


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


def check_rule(rule: CompiledRule, ruleset: RuleSet) -> RuleReport:
    report = RuleReport(rule.id)
    entry = ruleset.cases.get(rule.id)
    if entry is None:
        return report
    path, cases = entry
    for case in cases.cases:
        try:
            cards = run_case(rule, ruleset, case, path.parent, cases.now)
        except (NudgesError, FileNotFoundError, RuntimeError, ValueError) as exc:
            report.failures.append(f"  case '{case.name}': could not run: {exc}")
            continue
        if not case.expect:
            if cards:
                report.fp += 1
                report.failures.append(f"  case '{case.name}': false positive, expected no card, got:\n"
                                       + "\n".join("    + " + line for line in describe(cards[0])))
            else:
                report.tn += 1
            continue
        if not cards:
            report.fn += 1
            report.failures.append(f"  case '{case.name}': false negative, expected a card, got none:\n"
                                   + "\n".join("    - " + line for line in expectation_lines(case.expect[0])))
            continue
        wrong = mismatches(case.expect[0], cards[0])
        if wrong:
            report.failures.append(f"  case '{case.name}': card differs ({', '.join(wrong)}):\n" + "\n".join(
                "    " + line for line in difflib.unified_diff(
                    expectation_lines(case.expect[0]), describe(cards[0]), "expected", "actual", lineterm="")))
        else:
            report.tp += 1
    return report


def run_all(ruleset: RuleSet) -> list[RuleReport]:
    return [check_rule(rule, ruleset) for rule in ruleset.rules]
