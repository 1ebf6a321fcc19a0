"""`nudges subscriptions plan|apply|status`: the FHIR Subscriptions (R4 Backport IG) the rules' follow-ups
need, made to exist on each configured server, and how they are doing. `plan` changes nothing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ACTIONS = {"plan": "show what apply would do (changes nothing)",
           "apply": "create, re-activate, replace or delete Subscriptions so the servers hold exactly the plan",
           "status": "each managed subscription: the server's $status beside what arrived"}


def register(sub: Any) -> None:
    group = sub.add_parser("subscriptions", help="manage the FHIR Subscriptions the rules' follow-ups need")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in ACTIONS.items():
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--config", type=Path, help="YAML settings file (as for nudges serve)")
        action.add_argument("--rules", type=Path, help="rules directory (default: the configured one)")
        action.add_argument("--database-url", dest="database_url")
        if name == "apply":
            action.add_argument("--wait", type=float, default=15.0, metavar="SECONDS",
                                help="how long to wait for each new subscription's handshake (default 15)")
            action.add_argument("--dry-run", action="store_true", help="same as plan")
        action.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..errors import ConfigError
    from ..settings import load_settings

    try:
        settings = load_settings(args.config, rules=args.rules, database_url=args.database_url)
        return asyncio.run(_run(args, settings))
    except ConfigError as exc:
        print(f"refusing: {exc.diagnostics}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, settings: Any) -> int:
    from ..clock import clock_for
    from ..events import subscriptions
    from ..events.subscriber import Subscriber, plan
    from ..fhirserver.client import FhirClient
    from ..fhirserver.tokens import BackendTokens
    from ..rules.delivery import Targets
    from ..services import Reloader
    from ..store import Store

    key = settings.patient_hash_key.get_secret_value().encode() if settings.patient_hash_key else None
    store = Store(settings.database_url, clock_for(settings.now), hash_key=key)
    fhir = FhirClient(settings, BackendTokens(settings.fhir_backend_clients))
    try:
        store.migrate()
        subscriber = Subscriber(settings, store, fhir)
        if args.action == "status":
            return await _status(subscriber, subscriptions.live(store))
        targets = Targets(frozenset(settings.delivery.pools), frozenset(settings.delivery.webhooks), strict=False)
        reloader = Reloader(settings.rules, frozenset(settings.rule_statuses), settings.site_valuesets,
                            targets=targets)
        if not reloader.reload() or reloader.current is None:
            for refused in reloader.last_problems:
                print(refused, file=sys.stderr)
            print(f"the rule set in {settings.rules} has problems", file=sys.stderr)
            return 1
        wanted = plan(reloader.current.rules(), settings)
        for text in wanted.problems:
            print(f"problem: {text}", file=sys.stderr)
        if wanted.endpoint is None:
            return 1
        steps = await subscriber.survey(wanted)
        applying = args.action == "apply" and not args.dry_run
        if applying:
            steps = await subscriber.apply(steps, wanted.endpoint, args.wait)
        _print_steps(steps, applying)
        if any(s.action == "unreachable" for s in steps):
            return 2
        return 1 if wanted.problems or (applying and not all(s.ok for s in steps)) else 0
    finally:
        await fhir.close()
        store.dispose()


def _print_steps(steps: list[Any], applied: bool) -> None:
    if not steps:
        print("nothing to do: no rule has a follow-up to subscribe for")
    server = None
    for step in steps:
        if step.server != server:
            server = step.server
            print(f"{server}")
        what = step.topic or ""
        if step.wanted is not None:
            what += f"  ({', '.join(step.wanted.types)}; rules: {', '.join(step.wanted.rules)})"
        line = f"  {step.action:<11} {what}"
        if step.remote_id:
            line += f"  Subscription/{step.remote_id}" + (f" [{step.remote_status}]" if step.remote_status else "")
        if step.note:
            line += f"  - {step.note}"
        if applied and step.result:
            line += f"  => {step.result}"
        print(line)


async def _status(subscriber: Any, managed: list[Any]) -> int:
    from ..errors import DeliveryError

    if not managed:
        print("no managed subscriptions (run nudges subscriptions apply)")
        return 0
    healthy = True
    for item in managed:
        try:
            view = await subscriber.status(item)
        except DeliveryError as exc:
            print(f"{item.server}  {item.topic}  unreachable: {exc.diagnostics}")
            healthy = False
            continue
        seen = view["last_notification"].isoformat() if view["last_notification"] else "never"
        counts = f"events: server {view['server_events'] if view['server_events'] is not None else '?'}, " \
                 f"received {view['events_received']}"
        missing = f", missing {view['missing']}" if view["missing"] else ""
        reason = f"  - {view['reason']}" if view["reason"] else ""
        print(f"{view['subscription'] or item.server}  {item.topic}\n  status {view['status']} (server: "
              f"{view['server_status']}), {counts}{missing}; last notification {seen}, heartbeat every "
              f"{view['heartbeat_seconds']} s{reason}")
        healthy &= view["status"] == "active" and view["server_status"] == "active"
    return 0 if healthy else 1
