"""Everything one running replica shares, built once and torn down once: settings, clock, store, the
served rules and their reload, the FHIR client, client trust, the scheduler's jobs, metrics.

The composition root: the only module that wires the others together. Routes reach it through
`app.state.runtime`; tools (replay, screening, rule cases) use the pieces directly and never a Runtime.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from . import pipeline, showing, suppression
from .api.auth import Authenticator, Caller, check_startup_policy
from .cards import IssuedCard
from .clock import Clock, SystemClock, clock_for
from .errors import BadRequest, ConfigError
from .events import followups, outbox, subscriptions
from .events.delivery import Deliveries, check_settings
from .events.due import DueFollowups
from .events.notifications import Intake
from .events.recovery import Recovery
from .events.scheduler import Scheduler
from .fhirserver.client import FhirClient
from .fhirserver.tokens import BackendTokens
from .heap import settle_heap
from .metrics import Metrics
from .rules.delivery import Targets
from .services import Reloader, Services
from .settings import Settings
from .store import SUPPRESSION_RETENTION, FeedbackRecord, Store

log = logging.getLogger("nudges.runtime")
HOUSEKEEPING_SECONDS = 3600.0


@dataclass
class Runtime:
    settings: Settings
    clock: Clock
    store: Store
    reloader: Reloader
    fhir: FhirClient
    auth: Authenticator
    metrics: Metrics = field(default_factory=Metrics)
    scheduler: Scheduler = field(default_factory=Scheduler)
    due: DueFollowups = field(init=False)
    intake: Intake = field(init=False)
    deliveries: Deliveries = field(init=False)
    recovery: Recovery = field(init=False)
    loop: asyncio.AbstractEventLoop | None = None  # the app's event loop, once started

    def __post_init__(self) -> None:
        self.due = DueFollowups(self.settings, self.clock, self.store, self.reloader, self.fhir)
        self.intake = Intake(self.settings, self.clock, self.store, self.fhir)
        self.deliveries = Deliveries(self.settings, self.clock, self.store, self.fhir, self.metrics)
        self.recovery = Recovery(self.settings, self.clock, self.store, self.fhir, self.intake, self.reloader,
                                 self.metrics)

    @classmethod
    def create(cls, settings: Settings, clock: Clock | None = None) -> Runtime:
        for message in check_startup_policy(settings):
            log.warning(message) if "WARNING" in message else log.info(message)
        check_settings(settings)
        # With `now` pinned by the settings, what happens in the real world keeps the real time: the checks
        # of a client's tokens (a CDS client signs them at the real time, or a pinned service refuses every
        # real client) and when the rule set was loaded. A clock handed in by code (the tests') is used for all.
        wall: Clock | None = SystemClock() if settings.now and clock is None else None
        if clock is None:
            try:
                clock = clock_for(settings.now)
            except ValueError:
                raise ConfigError(f"now: '{settings.now}' is not an ISO 8601 instant (e.g. 2026-03-02T12:00:00Z)") \
                    from None
        if settings.now:
            log.warning(f"WARNING: THE CLOCK IS PINNED at {clock.now().isoformat().replace('+00:00', 'Z')} "
                        "(NUDGES_NOW or `now`): every time window, elapsed time and suppression uses this instant, "
                        "not the real time. Unset it unless this is a test or a demonstration.",
                        extra={"pinned_now": settings.now})
        key = settings.patient_hash_key.get_secret_value().encode() if settings.patient_hash_key else None
        store = Store(settings.database_url, clock, hash_key=key)
        names = settings.delivery  # an unconfigured name is a warning here, not a refusal: see rules/delivery.py
        targets = Targets(frozenset(names.pools), frozenset(names.webhooks), strict=False)
        reloader = Reloader(settings.rules, frozenset(settings.rule_statuses), settings.site_valuesets,
                            wall or clock, targets)
        fhir = FhirClient(settings, BackendTokens(settings.fhir_backend_clients))
        auth = Authenticator(settings.auth, store, wall or clock, fhir.http)
        return cls(settings, clock, store, reloader, fhir, auth)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.store.migrate)
        if not await asyncio.to_thread(self.reloader.reload):
            problems = "\n".join(str(p) for p in self.reloader.last_problems[:20])
            raise ConfigError(f"the rule set in {self.settings.rules} has problems:\n{problems}")
        self._count_reload(True)
        self.scheduler.every("rules-reload", self.settings.reload_interval_seconds, self.reload_if_changed)
        self.scheduler.every("due-followups", self.settings.followup_poll_seconds, self.due.run_due)
        self.scheduler.every("deliveries", self.settings.delivery.poll_seconds, self.deliveries.run_due)
        self.scheduler.every("subscriptions-check", self.settings.subscriptions.check_seconds, self.recovery.check)
        self.scheduler.every("housekeeping", HOUSEKEEPING_SECONDS, self.housekeeping)
        self.scheduler.start()

    async def housekeeping(self) -> int:
        """Suppression rows that hold nothing any more are dropped (hourly: a scan of the table)."""
        before = self.clock.now() - SUPPRESSION_RETENTION
        purged = await asyncio.to_thread(self.store.purge_suppressions, before)
        if purged:
            log.info("inert suppressions purged", extra={"count": purged})
        return purged

    async def reload_if_changed(self) -> None:
        if await asyncio.to_thread(self.reloader.changed):
            self._count_reload(await asyncio.to_thread(self.reloader.reload))

    def _count_reload(self, ok: bool) -> None:
        self.metrics.reloads.labels("loaded" if ok else "refused").inc()
        if ok:
            settle_heap()
        if self.reloader.current:
            self.metrics.rules_loaded.set(len(self.reloader.current.rules()))  # served: active, by default

    async def stop(self) -> None:
        self.scheduler.stop()
        await self.fhir.close()
        await self.store.writers.close()
        self.store.dispose()

    def services(self) -> Services:
        assert self.reloader.current is not None, "runtime not started"
        return self.reloader.current

    async def evaluate(self, call: pipeline.Call, caller: Caller) -> pipeline.Result:
        """On the event loop: the engine (CPU work, as the body's parse before it), then the call's write
        (showing.py: the cards claimed and stored, and whether follow-up cards wait; one statement awaited
        on PostgreSQL), then the waiting cards taken when there are any (Store.run); each write once more
        on a new connection when the database dropped the first."""
        services = self.services()
        now = self.clock.now()
        store = self.store
        patient_hash = store.patient_hash(call.context["patientId"])
        result = pipeline.evaluate(call, services, now, patient_hash=patient_hash, keyed=store.keyed,
                                   tenant=caller.tenant, why_base=self.settings.public_base_url)
        issued, records = result.issued, result.records
        max_age = self.settings.pending_card_max_age
        shown, waiting = await store.writers.retrying(lambda: showing.show(
            store, records, self.settings.suppression.ignored_window, patient_hash,
            followups.oldest_waiting(now, max_age)))
        chosen = {id(r) for r in shown}
        result.issued = [i for i in issued if i.record is not None and id(i.record) in chosen]
        for held in (i for i in issued if i.record is not None and id(i.record) not in chosen):
            self.metrics.suppressed.labels(held.rule_id).inc()  # raised, not shown: nudges explain says "fired"
        pending = await store.run(store.retrying, lambda: followups.take_pending(
            store, patient_hash, service_id=call.service.id, hook_instance=call.request.hookInstance,
            live_rules={i.rule_id for i in result.issued}, now=now, max_age=max_age)) if waiting else []
        result.issued += [IssuedCard(p.rule_id, followups.fill_context(p.card, call.context)) for p in pending]
        for rule_id in result.failed:
            self.metrics.rule_errors.labels(rule_id).inc()
        for card in result.issued:
            self.metrics.cards.labels(card.rule_id).inc()
        return result

    def record_feedback(self, records: list[FeedbackRecord], service_id: str) -> int:
        """Store feedback on cards this service issued, each setting its card's focus's lockout (the
        latest outcome wins). Everything is checked before anything is stored: an unknown card, another
        service's card or a reason the card does not offer is a 400."""
        store, now = self.store, self.clock.now()
        served = {r.id: r for r in self.services().ruleset.rules}
        policy = suppression.Policy(self.settings.suppression)
        entries = []
        for record in records:
            card = store.card_info(record.card_uuid)
            if card is None:
                raise BadRequest(f"unknown card '{record.card_uuid}'", expression="feedback.card")
            if card.service_id != service_id:
                raise BadRequest(f"card '{record.card_uuid}' was not issued by '{service_id}'",
                                 expression="feedback.card")
            rule = served.get(card.rule_id)
            record = suppression.check_reason(rule, record)
            focus = card.focus or store.keyed(suppression.PATIENT_FOCUS)  # cards from before focus was kept
            entries.append((rule, record, policy.of(rule, card, focus, record, now)))
        stored = store.apply_feedback([(record, lockout) for _, record, lockout in entries])
        for (rule, record, lockout), new in zip(entries, stored, strict=True):
            if new:
                self.metrics.feedback.labels(lockout.rule_id, record.outcome,
                                             suppression.reason_label(rule, record)).inc()
        return sum(stored)

    def between_visits(self) -> dict[str, Any]:
        """The outbox and the managed subscriptions, also set as gauges (dead deliveries never go unseen)."""
        waiting = outbox.counts(self.store)
        managed = subscriptions.counts(self.store)
        for status, count in waiting.items():
            self.metrics.outbox.labels(status).set(count)
        for status, count in managed.items():
            self.metrics.subscriptions.labels(status).set(count)
        warnings = []
        if waiting["dead"]:
            warnings.append(f"{waiting['dead']} dead deliveries (nudges deliveries list; nudges deliveries retry)")
        if managed["degraded"]:
            warnings.append(f"{managed['degraded']} degraded subscriptions (nudges subscriptions status)")
        return {"deliveries": waiting, "subscriptions": managed, "warnings": warnings}

    def readiness(self) -> dict[str, Any]:
        """Ready when the database answers and rules are loaded. Dead deliveries and degraded subscriptions
        are reported (warnings) but do not make a replica unready: taking it out of rotation would stop
        hook calls and fix neither."""
        current = self.reloader.current
        problems = []
        database = self.store.ping()
        if not database:
            problems.append("database unreachable")
        if current is None:
            problems.append("no rule set")
        state = {"problems": problems, "database": "ok" if database else "unreachable",
                 "rules": current.ruleset.version if current else None,
                 "rule_count": len(current.rules()) if current else 0,  # served (rule_statuses), not all loaded
                 "refused_reloads": self.reloader.refused,
                 # whether the files on disk are refused now (the count never goes down once fixed)
                 "rules_on_disk": "refused" if self.reloader.last_problems else "served",
                 "on_disk_problems": len(self.reloader.last_problems)}
        return state | (self.between_visits() if database else {})
