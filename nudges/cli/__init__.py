"""The `nudges` command. Each command group is a module here that registers its subcommands; a command
imports what it needs only when it runs, so `nudges --help` stays instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import audit, deliveries, explain, new, replay, rules, screen, serve, subscriptions, valuesets

Command = Callable[[argparse.Namespace], int]
GROUPS = (serve, rules, explain, new, valuesets, replay, screen, audit, subscriptions, deliveries)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="nudges", description="health-equity decision support over CDS Hooks")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    from ..errors import ConfigError

    args = parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except ConfigError as exc:  # settings that cannot be read, for any command: said plainly, not a traceback
        print(f"nudges {args.command}: {exc.diagnostics}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
