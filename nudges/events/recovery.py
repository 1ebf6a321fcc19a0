"""Missed events: the service's periodic look at every subscription it manages. A gap in event
numbers that outlasts the grace period (notifications arrive out of order), or heartbeats that stop,
marks the subscription degraded; then the server's `$status` is read, a subscription the server put in
`error` or `off` is re-activated (the IG makes that the subscriber's job), and what was missed is
recovered: by `$events` where the server offers it, else by a search for what changed since the last
event that arrived (`_lastUpdated`, bounded by the page limits). What the search finds goes through the
same intake as a notification, so a follow-up scheduled twice is still scheduled once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..clock import Clock, parse_instant
from ..errors import BadRequest, DeliveryError
from ..fhir import flatten, instant
from ..fhirserver.client import Answered, Failed, FhirClient
from ..metrics import Metrics
from ..services import Reloader
from ..settings import Settings
from ..store import Store
from . import followups, subscriptions
from .notifications import EVENT_TYPE, QUERY_TYPE, Intake, parse_notification
from .subscriber import Subscriber
from .subscriptions import Managed

log = logging.getLogger("nudges.subscriptions")

MARGIN = timedelta(minutes=1)  # a recovery search starts this much before the last event (server clock skew)


@dataclass(frozen=True)
class CheckOutcome:
    """ok; degraded (and why); recovered (how, and how many follow-ups it scheduled); failed."""

    id: int
    outcome: str
    detail: str = ""


class Recovery:
    def __init__(self, settings: Settings, clock: Clock, store: Store, fhir: FhirClient, intake: Intake,
                 reloader: Reloader, metrics: Metrics) -> None:
        self.settings, self.clock, self.store, self.fhir = settings, clock, store, fhir
        self.intake, self.reloader, self.metrics = intake, reloader, metrics
        self.subscriber = Subscriber(settings, store, fhir)

    async def check(self, now: datetime | None = None) -> list[CheckOutcome]:
        """Look at every managed subscription (each by one replica per check interval)."""
        now = now or self.clock.now()
        config = self.settings.subscriptions
        since = now - timedelta(seconds=config.check_seconds * 0.9)
        outcomes = []
        for managed in await asyncio.to_thread(subscriptions.live, self.store):
            if managed.status == "requested" or not await asyncio.to_thread(
                    subscriptions.claim_check, self.store, managed.id, now, since):
                continue
            reason = self._trouble(managed, now)
            if reason is None and managed.status != "degraded":
                outcomes.append(CheckOutcome(managed.id, "ok"))
                continue
            if reason is not None and managed.status != "degraded":
                log.warning("subscription degraded", extra={"subscription": managed.id, "reason": reason})
                self.metrics.missed_events.inc(len(managed.missing))
                await asyncio.to_thread(subscriptions.set_status, self.store, managed.id, "degraded", reason=reason)
            outcomes.append(await self._recover(managed, reason or managed.reason or "degraded"))
        return outcomes

    def _trouble(self, managed: Managed, now: datetime) -> str | None:
        config = self.settings.subscriptions
        missing = managed.missing
        if missing and managed.gap_since is not None and now - managed.gap_since >= timedelta(
                seconds=config.gap_grace_seconds):
            return f"{len(missing)} event(s) missing ({missing[0]}..{missing[-1]})"
        silence = timedelta(seconds=managed.heartbeat_seconds * config.missed_heartbeats)
        if managed.last_seen_at is not None and now - managed.last_seen_at > silence:
            return f"no notification or heartbeat for {int((now - managed.last_seen_at).total_seconds())} s"
        return None

    async def _recover(self, managed: Managed, reason: str) -> CheckOutcome:
        method = "search"
        try:
            view = await self.subscriber.status(managed)
            reactivated = view["server_status"] in ("error", "off")
            if reactivated:
                ok, said = await self.subscriber.reactivate(managed)
                if not ok:
                    raise DeliveryError(said)
                log.info("subscription re-activated", extra={"subscription": managed.id})
            server_events = view["server_events"]
            through = max(server_events or 0, managed.last_event, *managed.above)
            needed = reactivated or server_events is None or bool(managed.missing) or through > managed.last_event
            found: list[dict[str, Any]] = []
            if needed:
                events = await self._events(managed, through) if managed.missing else None
                if events is not None:
                    method, found = "$events", events
                else:
                    found = await self._search(managed)
            else:
                method = "status"
            rules = followups.followup_rules(self.reloader.current.rules()) if self.reloader.current else []
            scheduled = await asyncio.to_thread(self.intake.schedule, rules, [(r, managed.server) for r in found])
            newest = max((str((r.get("meta") or {}).get("lastUpdated")) for r in found
                          if (r.get("meta") or {}).get("lastUpdated")), default=None)
            await asyncio.to_thread(subscriptions.caught_up, self.store, managed.id, through, newest)
        except (DeliveryError, BadRequest) as exc:
            self.metrics.recoveries.labels(method, "failed").inc()
            await asyncio.to_thread(subscriptions.set_status, self.store, managed.id, "degraded",
                                    reason=f"{reason}; recovery failed: {exc.diagnostics}")
            log.warning("recovery failed", extra={"subscription": managed.id, "error": exc.diagnostics})
            return CheckOutcome(managed.id, "failed", exc.diagnostics)
        self.metrics.recoveries.labels(method, "ok").inc()
        log.info("subscription recovered", extra={"subscription": managed.id, "method": method,
                                                  "resources": len(found), "scheduled": scheduled})
        return CheckOutcome(managed.id, "recovered", f"{method}: {len(found)} resource(s), {scheduled} scheduled")

    async def _events(self, managed: Managed, through: int) -> list[dict[str, Any]] | None:
        """The missed events by number (`$events`), or None when the server does not offer it."""
        first = managed.missing[0]
        answer = await self.fhir.request_as_service(
            "GET", managed.server, f"Subscription/{managed.resource_id}/$events?eventsSinceNumber={first}"
                                   f"&eventsUntilNumber={through}&content=id-only")
        if not isinstance(answer, Answered) or answer.status != 200 or not isinstance(answer.body, dict):
            return None
        try:
            note = parse_notification(answer.body, (QUERY_TYPE, EVENT_TYPE))
        except BadRequest:
            return None
        types = set(managed.resource_types)
        return [r for r, _ in await self.intake.resolve(note, [], types, managed.server)]

    async def _search(self, managed: Managed) -> list[dict[str, Any]]:
        """What changed on the server since the last event that arrived, for the topic's resource types."""
        if managed.last_event_at:
            since = instant(parse_instant(managed.last_event_at) - MARGIN)
        else:
            since = instant(self.clock.now() - timedelta(hours=self.settings.subscriptions.recovery_window_hours))
        extra = managed.filter.split("?", 1)[1] if managed.filter and "?" in managed.filter else ""
        queries = {t: f"{t}?_lastUpdated=ge{since}&_count=100" + (f"&{extra}" if extra and managed.filter
                                                                  and managed.filter.startswith(t) else "")
                   for t in managed.resource_types}
        results = await self.fhir.fetch_as_service(managed.server, queries)
        found: list[dict[str, Any]] = []
        for kind, result in results.items():
            if isinstance(result, Failed):
                raise DeliveryError(f"search for missed {kind} failed: {result.error.diagnostics}")
            found += list(flatten(result.value))
        return found
