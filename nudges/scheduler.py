"""Runs due follow-ups: an APScheduler 3 background job every `followup_poll_seconds` calls
`run_due`, which claims due rows (exactly once across replicas), fetches the patient's data from
the FHIR server that notified, evaluates the rule at the injected clock's "now", and leaves a pending
card when it fires.

The periodic job lives in APScheduler's in-memory job store on purpose: APScheduler 3 job stores
must never be shared between schedulers, and every replica runs the same job against the same
database. What must survive a restart, the follow-ups themselves, is in the `followups` table, and
`claim_due` (SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL) is what makes replicas safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from . import engine, followups
from .cards import build_card
from .catalog import Catalog, CatalogHolder
from .clock import Clock
from .demographics import bucket
from .errors import NudgesError, PreconditionFailed
from .fhirauth import BackendTokens
from .fhirclient import FhirClient, check_server
from .followups import Followup
from .prefetch import plan_for, render
from .record import PatientRecord, flatten
from .ruleset import CompiledRule
from .settings import Settings
from .store import CardRecord, Store

log = logging.getLogger("nudges.scheduler")

BATCH = 50
MAX_BATCHES = 20  # per run: a backlog drains over a few ticks instead of one long one
CONCURRENT_FETCHES = 10
RETRY_AFTER = timedelta(minutes=5)  # times the attempt number


@dataclass(frozen=True)
class DueOutcome:
    """What became of one follow-up: fired, quiet (the rule no longer holds), suppressed, waiting
    (its card is already pending), withdrawn (rule no longer served), retry, failed, lost (another
    worker took it over)."""

    id: int
    rule_id: str
    outcome: str


class FollowupScheduler:
    def __init__(self, settings: Settings, clock: Clock, store: Store, holder: CatalogHolder,
                 tokens: BackendTokens | None = None) -> None:
        self.settings, self.clock, self.store, self.holder = settings, clock, store, holder
        self.tokens = tokens
        self.worker = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        if self.settings.followup_poll_seconds <= 0 or self._scheduler is not None:
            return
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # not a line per run every few seconds
        scheduler = BackgroundScheduler(timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1})
        scheduler.add_job(self._tick, "interval", seconds=self.settings.followup_poll_seconds,
                          id="nudges-followups", replace_existing=True)
        scheduler.start()
        self._scheduler = scheduler

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def _tick(self) -> None:
        try:
            self.run_due(self.clock.now())
        except Exception:  # the job must keep running; the rows stay claimable after their lease
            log.exception("follow-up run failed")

    def run_due(self, now: datetime | None = None) -> list[DueOutcome]:
        """Run every follow-up due at `now` (default: the injected clock). Call from a thread, not
        from a running event loop: FHIR fetches run on a private loop."""
        now = now or self.clock.now()
        catalog = self.holder.current
        if catalog is None:
            return []
        dropped = followups.expire_pending(self.store, self.settings.pending_card_max_age, now)
        if dropped:
            log.info("waiting cards expired unshown", extra={"count": dropped})
        outcomes: list[DueOutcome] = []
        for _ in range(MAX_BATCHES):
            claimed = followups.claim_due(self.store, self.worker, BATCH, now)
            if not claimed:
                break
            outcomes += self._run(claimed, catalog, now)
            if len(claimed) < BATCH:
                break
        return outcomes

    def _run(self, claimed: list[Followup], catalog: Catalog, now: datetime) -> list[DueOutcome]:
        served = {r.id: r for s in catalog.services.values() for r in followups.followup_rules(s.rules)}
        fetched = asyncio.run(self._fetch_all(claimed, served))
        outcomes = []
        for item, data in zip(claimed, fetched, strict=True):
            try:
                outcome = self._finish(item, served.get(item.rule_id), data, catalog, now)
            except Exception as exc:  # one bad follow-up must not stop the others
                log.warning("follow-up failed", extra={"rule": item.rule_id, "error": type(exc).__name__})
                outcome = followups.retry(self.store, item, self.worker, now + RETRY_AFTER * item.attempts)
            outcomes.append(DueOutcome(item.id, item.rule_id, outcome))
        return outcomes

    async def _fetch_all(self, claimed: list[Followup],
                         served: dict[str, CompiledRule]) -> list[dict[str, Any] | BaseException | None]:
        client = FhirClient(self.settings, self.tokens)
        limit = asyncio.Semaphore(CONCURRENT_FETCHES)
        try:
            async def one(item: Followup) -> dict[str, Any] | None:
                rule = served.get(item.rule_id)
                if rule is None or item.patient_ref is None or item.fhir_server is None:
                    return None
                # The server passed the caller's allow-list at intake; the rest of the policy is re-checked.
                base = check_server(item.fhir_server, self.settings, [item.fhir_server])
                plan = plan_for((rule,))  # only what this rule reads, with the service's templates
                queries = {k: render(t, {"patientId": item.patient_ref}) for k, t in plan.templates.items()}
                async with limit:
                    results = await client.fetch_as_service(base, queries)
                failed = sorted(k for k, v in results.items() if isinstance(v, Exception) and k in plan.required)
                if failed:
                    raise PreconditionFailed(f"required data unavailable ({', '.join(failed)})")
                return {k: v for k, v in results.items() if not isinstance(v, Exception)}

            return list(await asyncio.gather(*(one(f) for f in claimed), return_exceptions=True))
        finally:
            await client.close()

    def _finish(self, item: Followup, rule: CompiledRule | None, data: dict[str, Any] | BaseException | None,
                catalog: Catalog, now: datetime) -> str:
        store, worker = self.store, self.worker
        if rule is None or item.patient_ref is None:
            followups.complete(store, item, worker)
            return "withdrawn"
        if isinstance(data, NudgesError) and data.status == 400:  # the server is no longer allowed
            followups.complete(store, item, worker, "failed")
            return "failed"
        if data is None:  # no server to ask (never scheduled so by intake)
            followups.complete(store, item, worker, "failed")
            return "failed"
        if isinstance(data, BaseException):
            log.info("follow-up fetch failed; will retry", extra={"rule": item.rule_id, "attempt": item.attempts})
            return followups.retry(store, item, worker, now + RETRY_AFTER * item.attempts)
        record = PatientRecord.from_prefetch(data)
        outcome = engine.evaluate((rule,), record, now, {"patientId": item.patient_ref})
        if outcome.failed:
            followups.complete(store, item, worker, "failed")
            return "failed"
        if not outcome.matches:
            followups.complete(store, item, worker)
            return "quiet"
        if rule.suppress and store.recently_shown(item.patient_hash, {rule.id: rule.suppress}):
            followups.complete(store, item, worker)
            return "suppressed"
        card = build_card(outcome.matches[0], catalog.ruleset, followups.CONTEXT_PLACEHOLDERS, record.patient, now)
        issued = CardRecord(uuid=card["uuid"], service_id=followups.FOLLOWUP_SERVICE, rule_id=rule.id,
                            rule_version=rule.version, hook=followups.FOLLOWUP_HOOK,
                            hook_instance=f"followup-{item.id}", patient_hash=item.patient_hash,
                            bucket=bucket(record.patient, list(flatten(data.get("coverage")))),
                            indicator=card["indicator"], issued_at=now)
        stored = followups.store_pending(store, issued, card, followup=item, worker=worker)
        return "fired" if stored == "stored" else stored
