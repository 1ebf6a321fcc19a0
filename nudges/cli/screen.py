"""`nudges screen`: population screening of a Bulk Data export (a folder, or a FHIR server's $export) on Dask."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..hooks import RECORD_HOOKS


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def register(sub: Any) -> None:
    screen = sub.add_parser("screen", help="screen a whole population (Bulk Data export) with the rules, on Dask",
                            description="Evaluate every patient of a FHIR Bulk Data export as a hook call: per-rule "
                                        "counts, worklists per rule, the equity view.")
    screen.add_argument("source", metavar="SOURCE", help="an export folder (*.ndjson) or a FHIR base URL ($export)")
    screen.add_argument("--now", required=True, help="the instant to screen at (ISO 8601): deterministic output")
    screen.add_argument("--hook", default="patient-view", choices=RECORD_HOOKS, help="the hook each patient's call is")
    where = screen.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive, help="worker processes of a local Dask cluster (default: cores)")
    where.add_argument("--scheduler", metavar="ADDR", help="an existing Dask cluster, e.g. tcp://scheduler:8786")
    screen.add_argument("--out", type=Path, metavar="DIR",
                        help="where worklists (with patient ids) and the equity view are written; nothing with ids "
                             "is written without it")
    screen.add_argument("--rules", type=Path, help="rules directory (default: the service's)")
    screen.add_argument("--config", type=Path, help="YAML settings (fhir_backend_clients for a FHIR server)")
    export = screen.add_argument_group("a FHIR server as SOURCE")
    export.add_argument("--download", type=Path, metavar="DIR", help="where the export is downloaded and resumed "
                                                                      "(default: OUT/export)")
    export.add_argument("--export", dest="level", choices=["patient", "system"], default="patient",
                        help="Patient/$export (default) or the system-level $export")
    export.add_argument("--group", metavar="ID", help="Group/ID/$export: only that group's members")
    export.add_argument("--type", dest="types", help="_type: comma-separated resource types (default: what the "
                                                      "hook's rules read)")
    export.add_argument("--since", help="_since: only resources changed since this instant (sent in UTC)")
    export.add_argument("--export-timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="give up waiting for the server after this long (run again to keep waiting)")
    export.add_argument("--fresh", action="store_true", help="start a new export instead of resuming the one in DIR")
    export.add_argument("--lists", action="store_true", help="also write a FHIR List per rule to the server")
    screen.add_argument("--work", type=Path, metavar="DIR", help="shards' folder (default: inside OUT, else a "
                                                                  "temporary one); on a cluster, shared by every node")
    screen.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..screening.command import Options
    from ..screening.command import run as screen

    types = tuple(t.strip() for t in args.types.split(",") if t.strip()) if args.types else ()
    options = Options(args.source, args.now, args.hook, args.workers, args.scheduler, args.out, args.rules,
                      args.config, args.download, args.level, args.group, types, args.since, args.fresh,
                      args.export_timeout, args.lists, args.work)
    return screen(options, sys.stdout, sys.stderr)
