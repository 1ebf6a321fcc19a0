"""`nudges valueset`: bring a FHIR ValueSet (a VSAC or eCQM expansion) into a rule set, or export the
rule set's own lists as FHIR ValueSets."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson


def register(sub: Any) -> None:
    group = sub.add_parser("valueset", help="import a FHIR ValueSet, or export the rule set's value sets")
    commands = group.add_subparsers(dest="valueset_command", required=True, metavar="ACTION")
    check = commands.add_parser("import", help="check a FHIR R4 ValueSet JSON file and report what it holds")
    check.add_argument("file", type=Path)
    check.add_argument("--name", help="the name rules will use (default: the file name)")
    check.add_argument("--to", type=Path, metavar="RULES", help="copy it into RULES/valuesets/<name>.json")
    check.set_defaults(run=import_command)
    export = commands.add_parser("export", help="write every value set of a rule set as FHIR R4 ValueSet JSON")
    export.add_argument("directory", type=Path, nargs="?", default=None, help="rules folder (default: bundled)")
    export.add_argument("--out", type=Path, required=True, metavar="DIR")
    export.add_argument("--site", type=Path, metavar="DIR", help="include a site's own codes")
    export.set_defaults(run=export_command)


def import_command(args: argparse.Namespace) -> int:
    import re

    from ..rules.schema import ID_PATTERN
    from ..rules.valuesets import FhirValueSetError, from_fhir

    name = args.name or args.file.name.removesuffix(".json")
    if not re.match(ID_PATTERN, name):
        print(f"'{name}' is not a usable value set name (kebab-case: lower-case words and digits joined by -); "
              "give one with --name", file=sys.stderr)
        return 1
    try:
        valueset = from_fhir(name, orjson.loads(args.file.read_bytes()))
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"{args.file}: cannot read: {exc}", file=sys.stderr)
        return 1
    except FhirValueSetError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    systems = Counter(system for system, _ in valueset.keys)
    print(f"{args.file}: value set '{name}': {valueset.title}")
    print(f"  url {valueset.url or '-'}, version {valueset.version or '-'}, date {valueset.date or '-'}")
    print(f"  source: {valueset.source}")
    print(f"  {len(valueset.keys)} code(s): " + ", ".join(f"{n} {s}" for s, n in sorted(systems.items())))
    if valueset.reads_race():
        print("  warning: it holds race/ethnicity codes; only rules that remove a race correction may use it")
    if args.to is not None:
        target = args.to / "valuesets" / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(args.file.read_bytes())
        print(f"  copied to {target}; rules name it as `codes: {name}`")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from ..rules.valuesets import to_fhir
    from ..settings import BUNDLED_RULES
    from ..tools.loading import load_or_report

    ruleset = load_or_report(args.directory or BUNDLED_RULES, sys.stderr, args.site)
    if ruleset is None:
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, valueset in sorted(ruleset.valuesets.items()):
        resource = to_fhir(valueset)
        (args.out / f"{name}.json").write_bytes(orjson.dumps(resource, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {len(ruleset.valuesets)} FHIR ValueSet(s) to {args.out} (rule set {ruleset.version})")
    return 0
