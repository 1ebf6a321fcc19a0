"""`nudges audit`: the equity audit of cards shown and acted on, per group."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="equity audit of cards shown and acted on, per group")
    audit.add_argument("--database-url", dest="database_url")
    audit.add_argument("--since", help="only cards issued at or after this date or instant")
    audit.add_argument("--format", choices=["table", "csv", "json", "equity", "equity-csv", "equity-json"],
                       default="table", help="equity*: with 95%% Wilson intervals, ratio and difference to the "
                                             "overall rate and the disparity flag (equity-json adds the monthly "
                                             "trend and unknown-demographics shares): the console's table")
    audit.add_argument("--overrides", action="store_true",
                       help="override rates and reasons per rule and group (for governance review)")
    audit.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tools import audit

    if args.format.startswith("equity"):
        from ..tools import equity

        return equity.main(args.database_url, args.since, args.format, sys.stdout, sys.stderr)
    return audit.main(args.database_url, args.since, args.format, sys.stdout, sys.stderr, overrides=args.overrides)
