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
    lint.add_argument("--site", type=Path, metavar="DIR", help="a site's own value-set codes (site_valuesets)")
    lint.add_argument("--config", type=Path, metavar="FILE",
                      help="the service's settings: also check follow-up deliveries against its pools and webhooks")
    lint.set_defaults(run=lint_command)
    test = sub.add_parser("test", help="run the rules' test cases",
                          description="Run each rule's cases. PATH is a rules folder, or one rule or cases file "
                                      "(its rule set is the nearest folder above it with a ruleset.yaml).")
    test.add_argument("path", type=Path, metavar="PATH")
    test.add_argument("--rule", action="append", default=[], metavar="ID", help="only this rule (repeatable)")
    test.add_argument("-v", "--verbose", action="store_true", help="list every case and its outcome")
    test.add_argument("--site", type=Path, metavar="DIR", help="a site's own value-set codes (site_valuesets)")
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
    from ..rules.delivery import Targets

    targets = None
    if args.config is not None:
        from ..settings import load_settings

        settings = load_settings(args.config)
        targets = Targets(frozenset(settings.delivery.pools), frozenset(settings.delivery.webhooks))
    result = load_ruleset(args.directory, args.site, targets)
    for warning in result.warnings:
        print(f"warning: {warning}")
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

    directory, only = rule_set_of(args.path)
    only |= set(args.rule)
    ruleset = load_or_report(directory, sys.stdout, args.site)
    if ruleset is None:
        return 1
    unknown = sorted(only - {r.id for r in ruleset.rules})
    if unknown:
        print(f"no rule {', '.join(unknown)} in {directory}", file=sys.stderr)
        return 1
    reports = run_all(ruleset, only or None)
    failed = 0
    for report in reports:
        print(report.summary())
        if args.verbose:
            for case in report.cases:
                print(f"  {'ok  ' if case.ok else 'FAIL'} {case.outcome:<7} {case.name}")
        for failure in report.failures:
            print(failure)
        failed += not report.ok
    cases = sum(len(r.cases) for r in reports)
    bad = sum(1 for r in reports for c in r.cases if not c.ok)
    print(f"{len(reports) - failed} passed, {failed} failed ({cases} case(s), {bad} failing)")
    return 1 if failed else 0


def rule_set_of(path: Path) -> tuple[Path, set[str]]:
    """A rules folder as given; for a rule or cases file, the folder above it with a ruleset.yaml and the
    rule's id."""
    if path.is_dir():
        return path, set()
    rule_id = path.name.removesuffix(".yaml").removesuffix(".cases")
    for folder in path.resolve().parents:
        if (folder / "ruleset.yaml").is_file():
            return folder, {rule_id}
    return path.parent, {rule_id}


def schema_command(args: argparse.Namespace) -> int:
    from ..rules.schema import SCHEMAS, json_schema

    schema = json_schema() if args.kind == "rule" else SCHEMAS[args.kind].model_json_schema(by_alias=True)
    sys.stdout.write(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def catalog_command(args: argparse.Namespace) -> int:
    from ..tools.catalogdoc import catalog_markdown, replace_catalog
    from ..tools.loading import load_or_report

    ruleset = load_or_report(args.directory, sys.stderr)
    if ruleset is None:
        return 1
    table = catalog_markdown(ruleset)
    if args.write is None:
        print(table)
    else:
        args.write.write_text(replace_catalog(args.write.read_text(encoding="utf-8"), table), encoding="utf-8")
    return 0
