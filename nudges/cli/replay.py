"""`nudges replay`: recorded hook calls against golden files; NDJSON exports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..hooks import RECORD_HOOKS


def register(sub: Any) -> None:
    replay = sub.add_parser("replay", help="replay hook calls against golden files; NDJSON exports")
    replay.add_argument("paths", type=Path, nargs="+", metavar="DIR", help="folders or files")
    replay.add_argument("--rules", type=Path, help="rules directory (default: the service's)")
    replay.add_argument("--now", help="pin the clock (default: \"now\" in each golden file)")
    replay.add_argument("--update", action="store_true", help="rewrite the golden files")
    replay.add_argument("--hook", default="patient-view", help="hook for NDJSON patients", choices=RECORD_HOOKS)
    replay.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tools import replay

    return replay.main(args.paths, rules=args.rules, now=args.now, update=args.update, hook=args.hook,
                       out=sys.stdout, err=sys.stderr)
