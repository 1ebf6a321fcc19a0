"""`nudges explain`: why each rule did or did not fire, for a recorded hook call or a rule's case."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import orjson

USAGE = """examples:
  nudges explain fhir_fixtures/calls/patient-view-troponin.json
  nudges explain fhir_fixtures/calls/patient-view-troponin.json --rule troponin-without-cath-plan
  nudges explain rules/cardiology/troponin-without-cath-plan.cases.yaml --case "2 h old"
  nudges explain rules/cardiology/troponin-without-cath-plan.yaml --json
"""


def register(sub: Any) -> None:
    explain = sub.add_parser(
        "explain", help="why each rule did or did not fire, clause by clause", epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a hook call (a JSON file) or a rule's cases (its .cases.yaml or rule .yaml) through the "
                    "service's pipeline and show, for each rule, why it fired or what stopped it: the candidates "
                    "each clause found, what the time windows excluded, whether its FHIRPath held, what it bound.")
    explain.add_argument("path", type=Path, metavar="PATH", help="a hook call .json, or a rule or cases .yaml")
    explain.add_argument("--case", metavar="NAME", help="only this case (its name, or a unique part of it)")
    explain.add_argument("--rule", action="append", default=[], metavar="ID", help="only this rule (repeatable)")
    explain.add_argument("--rules", type=Path, metavar="DIR", help="rules folder for a call (default: the service's)")
    explain.add_argument("--now", help="pin the clock for a call (default: its golden file's, else NUDGES_NOW)")
    explain.add_argument("--json", action="store_true", help="the trace as JSON (what the console renders)")
    explain.add_argument("--brief", action="store_true", help="one line per rule: fired or not, and why")
    explain.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.path.is_file():
        print(f"nudges explain: {args.path}: no such file", file=sys.stderr)
        return 1
    if args.path.suffix in (".yaml", ".yml"):
        return explain_cases(args, sys.stdout, sys.stderr)
    return explain_call(args, sys.stdout, sys.stderr)


def explain_call(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ..clock import parse_instant
    from ..errors import NudgesError
    from ..settings import load_settings
    from ..tools.explain import explain
    from ..tools.loading import load_services

    try:
        body = orjson.loads(args.path.read_bytes())
    except orjson.JSONDecodeError as exc:
        print(f"nudges explain: {args.path}: not JSON ({exc})", file=err)
        return 1
    if not (isinstance(body, dict) and isinstance(body.get("hook"), str) and isinstance(body.get("context"), dict)):
        print(f"nudges explain: {args.path}: not a hook call (an object with hook and context)", file=err)
        return 1
    settings = load_settings(rules=args.rules)
    when = args.now or golden_now(args.path) or settings.now
    if when is None:
        print("nudges explain: no clock: pass --now, set NUDGES_NOW, or keep a golden file with \"now\" beside "
              "the call", file=err)
        return 1
    services = load_services(settings.rules, settings.rule_statuses, err, settings.site_valuesets)
    if services is None:
        return 1
    body = {k: v for k, v in body.items() if k not in ("fhirServer", "fhirAuthorization")} if body.get("prefetch") \
        else body
    try:
        explanation = explain(services, body, parse_instant(when), settings, set(args.rule) or None)
    except NudgesError as exc:
        print(f"nudges explain: the service would answer {exc.status}: {exc.diagnostics}", file=err)
        return 1
    if args.json:
        out.write(orjson.dumps(explanation.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(render(explanation.to_dict(), brief=args.brief))
    return 0


def golden_now(path: Path) -> str | None:
    golden = path.with_name(path.name.removesuffix(".json") + ".golden.json")
    try:
        data = orjson.loads(golden.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data.get("now") if isinstance(data, dict) and isinstance(data.get("now"), str) else None


def explain_cases(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ..errors import NudgesError
    from ..rules.resources import did_you_mean
    from ..tools.cases import judge
    from ..tools.explain import explain_case
    from ..tools.loading import load_or_report
    from .rules import rule_set_of

    directory, ids = rule_set_of(args.path)
    ruleset = load_or_report(directory, err, focus=ids)
    if ruleset is None:
        return 1
    rule_id = next(iter(ids))
    rule = next((r for r in ruleset.rules if r.id == rule_id), None)
    entry = ruleset.cases.get(rule_id)
    if rule is None or entry is None:
        print(f"nudges explain: no rule '{rule_id}' with cases in {directory}", file=err)
        return 1
    path, cases = entry
    chosen = cases.cases
    if args.case is not None:
        exact = [c for c in chosen if c.name == args.case]
        chosen = exact or [c for c in chosen if args.case.lower() in c.name.lower()]
        if len(chosen) != 1:
            names = [c.name for c in cases.cases]
            what = "matches several cases" if chosen else f"is not a case{did_you_mean(args.case, set(names))}"
            print(f"nudges explain: '{args.case}' {what}; the cases of {path.name}:", file=err)
            for name in names:
                print(f"  {name}", file=err)
            return 1
    documents = []
    for case in chosen:
        try:
            explanation = explain_case(ruleset, rule, case, path.parent, cases.now)
        except (NudgesError, FileNotFoundError, ValueError) as exc:
            message = exc.diagnostics if isinstance(exc, NudgesError) else str(exc)
            print(f"nudges explain: case '{case.name}' could not run: {message}", file=err)
            return 1
        document = {"case": case.name, "outcome": judge(case, explanation.cards).outcome, **explanation.to_dict()}
        documents.append(document)
    if args.json:
        data: Any = documents[0] if len(documents) == 1 else documents
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for i, document in enumerate(documents):
        expected = "a card" if next(c for c in chosen if c.name == document["case"]).expect else "no card"
        out.write(("\n" if i else "") + f"case '{document['case']}' (expects {expected}): {document['outcome']}\n")
        out.write(render(document, brief=args.brief))
    return 0


# -- the readable form ------------------------------------------------------------------------------------
MARK = {True: "✓", False: "✗", None: "·"}


def render(data: dict[str, Any], *, brief: bool = False) -> str:
    """The trace for people: the call's cards, then per rule its verdict, reason and (unless brief) steps."""
    lines = [f"{data['hook']} at {data['now']} ({data['service']}): {len(data['cards'])} card(s)"
             + (" as the rules raise them (the service may hold some back: suppression is not applied here)"
                if data["cards"] else "")]
    raised = {r["card"]["uuid"]: r["rule"] for r in data["rules"] if r.get("card")}
    for card in data["cards"]:
        rule = raised.get(card.get("uuid"), "")
        lines.append(f"  [{card['indicator']}] {card['summary']}" + (f"  ({rule})" if rule else ""))
    record = data.get("record") or {}
    for source, kinds in record.items():
        lines.append(f"{source}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    if brief:
        lines.append("")
    for rule in data["rules"]:
        verdict = "FIRED" if rule["fired"] else "ERROR" if rule["error"] else "not fired" if rule["served"] \
            else "not served"
        if brief:
            lines.append(f"{rule['rule']}: {verdict}: {rule['reason'].removeprefix('fired: ')}")
            continue
        lines.append("")
        lines.append(f"{rule['rule']}: {verdict}" + (f"  ({rule['title']})" if rule["title"] else ""))
        lines.append(f"  {rule['reason']}")
        lines += steps_lines(rule["steps"], 1)
    return "\n".join(lines) + "\n"


def satisfied(step: dict[str, Any]) -> bool | None:
    """Whether a step is as the rule needs it: an item held, or (under none) did not match."""
    if not step["evaluated"]:
        return None
    return not step["held"] if step["under"] == "none" else step["held"]


def steps_lines(steps: list[dict[str, Any]], depth: int) -> list[str]:
    """Steps in order; a run of steps the engine never reached is one line."""
    lines: list[str] = []
    i = 0
    while i < len(steps):
        j = i
        while j < len(steps) and not steps[j]["evaluated"]:
            j += 1
        if j - i > 1:
            why = steps[i]["notes"][0] if steps[i]["notes"] else "not evaluated"
            lines.append(f"{'  ' * depth}{MARK[None]} {steps[i]['where']} … {steps[j - 1]['where']}: {why}")
            i = j
            continue
        lines += step_lines(steps[i], depth)
        i += 1
    return lines


def step_lines(step: dict[str, Any], depth: int) -> list[str]:
    pad = "  " * depth
    head = f"{pad}{MARK[satisfied(step)]} {step['where']}"
    notes = list(step["notes"])
    if step["kind"] in ("age", "patient"):
        return [f"{head}: {'; '.join(notes)}"]
    if step["kind"] == "group":
        head += f" {step['mode']}: {'held' if step['held'] else 'did not hold'}" if step["evaluated"] else \
            f" {step['mode']}"
    else:
        head += f" {step['resource']}"
        for key, label in (("codes", "in"), ("text", "text"), ("as", "as"), ("since", "since")):
            if step[key]:
                head += f" {label} {'/' + step[key] + '/' if key == 'text' else step[key]}"
        if step["source"] and step["source"] != "record":
            head += f" from {step['source']}"
        if step["evaluated"]:
            counts = f"{step['candidates']} candidate(s)"
            if step["candidates"]:
                counts += f" → {step['in_window']} in window"
            if step["fhirpath"] and step["in_window"]:
                counts += f" → {step['passed']} passed `where`"
            outcome = step["chosen"] or ("no match" if step["under"] == "none" else "nothing")
            head += f": {counts} → {outcome}"
        elif len(notes) == 1:
            return [f"{head}: {notes[0]}"]
    lines = [head] + [f"{pad}    {note}" for note in notes]
    return lines + steps_lines(step["steps"], depth + 1)
