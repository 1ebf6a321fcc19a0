"""`nudges deliveries list|retry`: the outbox of pushed follow-up cards, and dead deliveries put back."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    group = sub.add_parser("deliveries", help="the outbox of pushed follow-up cards")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="counts per status and the dead deliveries with their last error")
    retry = actions.add_parser("retry", help="put dead deliveries back in the outbox (all, or --id)")
    retry.add_argument("--id", type=int, action="append", default=[], help="only this delivery (repeatable)")
    for action in (listing, retry):
        action.add_argument("--config", type=Path, help="YAML settings file (as for nudges serve)")
        action.add_argument("--database-url", dest="database_url")
        action.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..clock import clock_for
    from ..events import outbox
    from ..settings import load_settings
    from ..store import Store

    settings = load_settings(args.config, database_url=args.database_url)
    store = Store(settings.database_url, clock_for(settings.now))
    try:
        store.migrate()
        if args.action == "retry":
            statuses = outbox.statuses(store, args.id) if args.id else {}
            print(f"{outbox.requeue_dead(store, store.clock.now(), args.id)} dead deliveries back in the outbox")
            refused = [f"#{i} ({statuses[i]})" if i in statuses else f"#{i} (no such delivery)"
                       for i in dict.fromkeys(args.id) if statuses.get(i) != "dead"]
            if refused:  # a typed id that did nothing must not look like success to a script or an operator
                print(f"not retried, as only dead deliveries are: {', '.join(refused)} "
                      "(`nudges deliveries list` shows the dead ones)", file=sys.stderr)
                return 1
            return 0
        counts = outbox.counts(store)
        print(", ".join(f"{status} {n}" for status, n in counts.items()))
        for row in outbox.dead(store):
            print(f"  dead #{row['id']}  {row['rule']} -> {row['target']}  after {row['attempts']} attempt(s): "
                  f"{row['error']}")
        return 1 if counts["dead"] else 0
    finally:
        store.dispose()
