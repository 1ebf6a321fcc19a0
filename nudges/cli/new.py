"""`nudges new rule ID`: scaffold a rule, its cases and its value set, then lint and run them."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..hooks import HOOK_NAMES
from ..rules.schema import ID_PATTERN


def kebab(text: str) -> str:
    if not re.match(ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"'{text}' is not kebab-case (lower-case words joined by '-')")
    return text


def register(sub: Any) -> None:
    new = sub.add_parser("new", help="scaffold a new rule (nudges new rule ID)")
    kinds = new.add_subparsers(dest="kind", required=True, metavar="KIND")
    rule = kinds.add_parser(
        "rule", help="a rule, its cases and its value set, that lint clean and pass",
        description="Write RULES/AREA/ID.yaml, ID.cases.yaml (a firing case and a near miss) and "
                    "RULES/valuesets/ID.yaml, commented to teach the format, then lint the rule set and run the "
                    "new cases. The rule is experimental until its REPLACE placeholders are filled in.")
    rule.add_argument("id", type=kebab, metavar="ID", help="the rule id, kebab-case (also its file name)")
    rule.add_argument("--area", type=kebab, default="local", help="folder under the rules folder (default: local)")
    rule.add_argument("--hook", choices=HOOK_NAMES, default="patient-view", help="default: patient-view")
    rule.add_argument("--topic", help="one of ruleset.yaml's topics (default: its first)")
    rule.add_argument("--rules", type=Path, default=Path(os.environ.get("NUDGES_RULES") or "rules"), metavar="DIR",
                      help="rules folder (default: NUDGES_RULES, as the other commands, else ./rules)")
    rule.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..clock import clock_for
    from ..rules.compiler import load_ruleset
    from ..settings import load_settings
    from ..tools.cases import check_rule
    from ..tools.scaffold import ScaffoldError, write

    now = clock_for(load_settings().now).now()
    try:
        made = write(args.rules, args.id, args.area, args.hook, args.topic, now, str(args.rules))
    except ScaffoldError as exc:
        print(f"nudges new rule: {exc}", file=sys.stderr)
        return 1
    for path in made.files:
        print(f"created {path}")
    result = load_ruleset(args.rules)
    if result.ruleset is None:
        ours = [p for p in result.problems if any(p.path.endswith(str(f.name)) for f in made.files)]
        for problem in ours or result.problems:
            print(problem)
        print(f"lint: {len(result.problems)} problem(s) in the rule set" + ("" if ours else ", none in the new files"))
        return 1 if ours else 0
    rule = next(r for r in result.ruleset.rules if r.id == args.id)
    report = check_rule(rule, result.ruleset)
    print(f"lint ok; {report.summary()}")
    for failure in report.failures:
        print(failure)
    print(f"next: fill in every REPLACE (nudges lint {args.rules} lists them), put the real codes in {made.valueset}, "
          f"and make the near miss the closest case where it must not fire; then\n"
          f"  nudges test {made.rule} -v\n  nudges explain {made.cases}")
    return 0 if report.ok else 1
