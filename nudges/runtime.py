"""Everything one running service shares: settings, clock, store, rules, FHIR client, auth, metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from . import followups, hooks
from .auth import Authenticator, Caller, check_startup_policy
from .catalog import Catalog, CatalogHolder
from .clock import Clock, clock_for
from .errors import ConfigError
from .fhirauth import BackendTokens
from .fhirclient import FhirClient
from .heap import QuietCollector, settle_heap
from .metrics import Metrics
from .scheduler import FollowupScheduler
from .settings import Settings
from .store import Store

log = logging.getLogger("nudges.runtime")


@dataclass
class Runtime:
    settings: Settings
    clock: Clock
    store: Store
    holder: CatalogHolder
    fhir: FhirClient
    auth: Authenticator
    metrics: Metrics = field(default_factory=Metrics)
    quiet: QuietCollector = field(default_factory=QuietCollector)
    _watcher: asyncio.Task[None] | None = None
    scheduler: FollowupScheduler = field(init=False)

    def __post_init__(self) -> None:
        self.scheduler = FollowupScheduler(self.settings, self.clock, self.store, self.holder, self.fhir.tokens)

    @classmethod
    def create(cls, settings: Settings, clock: Clock | None = None) -> Runtime:
        for message in check_startup_policy(settings):
            log.warning(message) if "WARNING" in message else log.info(message)
        clock = clock or clock_for(settings.now)
        key = settings.patient_hash_key.get_secret_value().encode() if settings.patient_hash_key else None
        store = Store(settings.database_url, clock, hash_key=key)
        holder = CatalogHolder(settings.rules, frozenset(settings.rule_statuses))
        fhir = FhirClient(settings, BackendTokens(settings.fhir_backend_clients))
        auth = Authenticator(settings.auth, store, clock, fhir.http)
        return cls(settings, clock, store, holder, fhir, auth)

    async def start(self) -> None:
        await asyncio.to_thread(self.store.migrate)
        if not await asyncio.to_thread(self.holder.reload):
            problems = "\n".join(str(p) for p in self.holder.last_problems[:20])
            raise ConfigError(f"the rule set in {self.settings.rules} has problems:\n{problems}")
        self._count_reload(True)
        if self.settings.reload_interval_seconds > 0:
            self._watcher = asyncio.create_task(self._watch())
        self.scheduler.start()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_seconds)
            try:
                if self.holder.changed():
                    self._count_reload(await asyncio.to_thread(self.holder.reload))
            except Exception:  # a watcher that dies silently would freeze the rule set
                log.exception("rule watcher error")

    def _count_reload(self, ok: bool) -> None:
        self.metrics.reloads.labels("loaded" if ok else "refused").inc()
        if ok:
            settle_heap()
        if self.holder.current:
            self.metrics.rules_loaded.set(len(self.holder.current.ruleset.rules))

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
        await asyncio.to_thread(self.scheduler.stop)
        await self.fhir.close()
        self.store.dispose()

    def catalog(self) -> Catalog:
        assert self.holder.current is not None, "runtime not started"
        return self.holder.current

    def evaluate(self, call: hooks.Call, caller: Caller) -> hooks.Result:
        """Runs in a worker thread: engine, suppression look-up and card records in one go."""
        catalog = self.catalog()
        now = self.clock.now()
        patient_hash = self.store.patient_hash(call.context["patientId"])
        result = hooks.evaluate(call, catalog, now, patient_hash=patient_hash,
                                recently_shown=lambda w: self.store.recently_shown(patient_hash, w),
                                tenant=caller.tenant)
        self.store.record_cards(result.records)
        live = [r.rule_id for r in result.records]
        pending = followups.take_pending(self.store, patient_hash, service_id=call.service.id,
                                         hook_instance=call.request.hookInstance, live_rules=set(live), now=now,
                                         max_age=self.settings.pending_card_max_age)
        result.cards = followups.merge_pending(result.cards, live, pending, call.context)
        for rule_id in result.failed:
            self.metrics.rule_errors.labels(rule_id).inc()
        for record in result.records:
            self.metrics.cards.labels(record.rule_id).inc()
        for card in pending:
            self.metrics.cards.labels(card.rule_id).inc()
        return result

    def readiness(self) -> dict[str, Any]:
        current = self.holder.current
        return {"database": self.store.ping(), "rules": current.ruleset.version if current else None,
                "rule_count": len(current.ruleset.rules) if current else 0,
                "refused_reloads": self.holder.refused}
