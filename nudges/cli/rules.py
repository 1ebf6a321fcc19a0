"""The informaticist's commands: lint, test, schema, catalog."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson


def register(sub: Any) -> None:
    lint = sub.add_parser("lint", help="check rule files; problems as path:line:column")
    lint.add_argument("directory", type=Path)
    lint.set_defaults(run=lint_command)
    test = sub.add_parser("test", help="run every rule's test cases")
    test.add_argument("directory", type=Path)
    test.set_defaults(run=test_command)
    schema = sub.add_parser("schema", help="print the JSON Schema of rule files")
    schema.add_argument("--kind", choices=["rule", "cases", "valueset", "sitecodes", "ruleset"], default="rule")
    schema.set_defaults(run=schema_command)
    catalog = sub.add_parser("catalog", help="print the rule catalog as a markdown table")
    catalog.add_argument("directory", type=Path, nargs="?", default=Path("rules"))
    catalog.add_argument("--write", type=Path, metavar="README", help="replace the table in this file")
    catalog.set_defaults(run=catalog_command)


def lint_command(args: argparse.Namespace) -> int:
    from ..rules.compiler import load_ruleset

    result = load_ruleset(args.directory)
    if result.ruleset is None:
        for problem in result.problems:
            print(problem)
        print(f"{len(result.problems)} problem(s) in {result.files} file(s)", file=sys.stderr)
        return 1
    rs = result.ruleset
    statuses: dict[str, int] = {}
    for rule in rs.rules:
        statuses[rule.status] = statuses.get(rule.status, 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    print(f"ok: {len(rs.rules)} rules ({counts}), {len(rs.cases)} case files, "
          f"{result.files} files, rule set {rs.version}")
    return 0


def test_command(args: argparse.Namespace) -> int:
    from ..tools.cases import run_all
    from ..tools.loading import load_or_report

    ruleset = load_or_report(args.directory, sys.stdout)
    if ruleset is None:
        return 1
    reports = run_all(ruleset)
    failed = 0
    for report in reports:
        print(report.summary())
        for failure in report.failures:
            print(failure)
        failed += not report.ok
    print(f"{len(reports) - failed} passed, {failed} failed")
    return 1 if failed else 0


def schema_command(args: argparse.Namespace) -> int:
    from ..rules.schema import SCHEMAS, json_schema

    schema = json_schema() if args.kind == "rule" else SCHEMAS[args.kind].model_json_schema(by_alias=True)
    sys.stdout.write(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def catalog_command(args: argparse.Namespace) -> int:
    from ..tools.catalogdoc import catalog_markdown, replace_catalog
    from ..tools.loading import load_or_report

    ruleset = load_or_report(args.directory, sys.stdout)
    if ruleset is None:
        return 1
    table = catalog_markdown(ruleset)
    if args.write is None:
        print(table)
    else:
        args.write.write_text(replace_catalog(args.write.read_text(encoding="utf-8"), table), encoding="utf-8")
    return 0
