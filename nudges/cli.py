"""The `nudges` command: serve, lint, test, schema, catalog, replay, audit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from .rules.compiled import RuleSet


def _lint(directory: Path) -> int:
    from .rules.compiler import load_ruleset

    result = load_ruleset(directory)
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


def _load(directory: Path) -> RuleSet | None:
    """The rule set, or None after printing every problem as path:line:column."""
    from .tools.loading import load_or_report

    return load_or_report(directory, sys.stdout)


def _test(directory: Path) -> int:
    from .tools.cases import run_all

    ruleset = _load(directory)
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


def _catalog(directory: Path, write: Path | None) -> int:
    from .tools.catalogdoc import catalog_markdown, replace_catalog

    ruleset = _load(directory)
    if ruleset is None:
        return 1
    table = catalog_markdown(ruleset)
    if write is None:
        print(table)
    else:
        write.write_text(replace_catalog(write.read_text(encoding="utf-8"), table), encoding="utf-8")
    return 0


def _schema(kind: str) -> int:
    from .rules.schema import SCHEMAS, json_schema

    schema = json_schema() if kind == "rule" else SCHEMAS[kind].model_json_schema(by_alias=True)
    sys.stdout.write(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .errors import ConfigError
    from .logs import configure
    from .rules.compiler import load_ruleset
    from .settings import load_settings

    try:
        settings = load_settings(args.config, host=args.host, port=args.port, rules=args.rules,
                                 database_url=args.database_url)
        configure(settings.log_level)
        result = load_ruleset(settings.rules)
        if result.ruleset is None:
            for problem in result.problems:
                print(problem, file=sys.stderr)
            print(f"refusing to start: the rule set in {settings.rules} has problems", file=sys.stderr)
            return 1
        app = create_app(settings)
    except ConfigError as exc:
        print(f"refusing to start: {exc.diagnostics}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                proxy_headers=False, server_header=False,
                ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
                ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nudges", description="health-equity CDS Hooks service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the CDS Hooks service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--config", type=Path, help="YAML settings file")
    serve.add_argument("--rules", type=Path, help="rules directory (default: bundled rules/)")
    serve.add_argument("--database-url", dest="database_url")
    lint = sub.add_parser("lint", help="check rule files; problems as path:line:column")
    lint.add_argument("directory", type=Path)
    test = sub.add_parser("test", help="run every rule's test cases")
    test.add_argument("directory", type=Path)
    schema = sub.add_parser("schema", help="print the JSON Schema of rule files")
    schema.add_argument("--kind", choices=["rule", "cases", "valueset", "ruleset"], default="rule")
    replay = sub.add_parser("replay", help="replay hook calls against golden files; NDJSON exports")
    replay.add_argument("paths", type=Path, nargs="+", metavar="DIR", help="folders or files")
    replay.add_argument("--rules", type=Path, help="rules directory (default: the service's)")
    replay.add_argument("--now", help="pin the clock (default: \"now\" in each golden file)")
    replay.add_argument("--update", action="store_true", help="rewrite the golden files")
    replay.add_argument("--hook", default="patient-view", help="hook for NDJSON patients",
                        choices=["patient-view", "encounter-start", "encounter-discharge"])
    audit = sub.add_parser("audit", help="equity audit of cards shown and acted on, per group")
    audit.add_argument("--database-url", dest="database_url")
    audit.add_argument("--since", help="only cards issued at or after this date or instant")
    audit.add_argument("--format", choices=["table", "csv", "json"], default="table")
    catalog = sub.add_parser("catalog", help="print the rule catalog as a markdown table")
    catalog.add_argument("directory", type=Path, nargs="?", default=Path("rules"))
    catalog.add_argument("--write", type=Path, metavar="README", help="replace the table in this file")
    args = parser.parse_args(argv)
    if args.command == "catalog":
        return _catalog(args.directory, args.write)
    if args.command == "replay":
        from .tools import replay as replaying

        return replaying.main(args.paths, rules=args.rules, now=args.now, update=args.update, hook=args.hook,
                              out=sys.stdout, err=sys.stderr)
    if args.command == "audit":
        from .tools import audit as auditing

        return auditing.main(args.database_url, args.since, args.format, sys.stdout, sys.stderr)
    if args.command == "serve":
        return _serve(args)
    if args.command == "lint":
        return _lint(args.directory)
    if args.command == "test":
        return _test(args.directory)
    return _schema(args.kind)


if __name__ == "__main__":
    sys.exit(main())
