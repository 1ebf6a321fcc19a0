"""Due follow-ups: claim the rows that are due (exactly once across replicas), fetch the patient's data
from the FHIR server that notified, evaluate the rule at the injected clock's "now", and leave a card
waiting for the patient's next hook call when it fires.

Runs on the app's event loop with the app's FHIR client (keep-alive connections and the service's cached
token are shared with hook calls); database work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .. import engine
from ..cards import build_card
from ..clock import Clock
from ..demographics import bucket
from ..errors import BadRequest, NudgesError
from ..fhir import flatten, instant, parse_reference
from ..fhirserver.client import FhirClient, Found
from ..fhirserver.guard import check_server
from ..prefetch import plan_for, render, unobtainable
from ..record import PatientRecord
from ..rules.compiled import CompiledRule
from ..services import Reloader, Services
from ..settings import Settings
from ..store import CardRecord, Store
from ..suppression import PATIENT_FOCUS
from . import followups
from .followups import Followup

log = logging.getLogger("nudges.followups")

BATCH = 50
MAX_BATCHES = 20  # per run: a backlog drains over a few ticks instead of one long one
CONCURRENT_FETCHES = 10
RETRY_AFTER = timedelta(minutes=5)  # times the attempt number


@dataclass(frozen=True)
class DueOutcome:
    """What became of one follow-up: fired, quiet (the rule no longer holds), suppressed (a card about the
    patient's chart is held back: shown minutes ago, or feedback's lockout), waiting
    (its card is already pending), withdrawn (rule no longer served), retry, failed, lost (another
    worker took it over)."""

    id: int
    rule_id: str
    outcome: str


def worker_name() -> str:
    """Who claimed a row: host, process and a random part (two processes may share a pid namespace)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class DueFollowups:
    def __init__(self, settings: Settings, clock: Clock, store: Store, reloader: Reloader, fhir: FhirClient) -> None:
        self.settings, self.clock, self.store, self.reloader, self.fhir = settings, clock, store, reloader, fhir
        self.worker = worker_name()

    async def run_due(self, now: datetime | None = None) -> list[DueOutcome]:
        """Run every follow-up due at `now` (default: the injected clock)."""
        now = now or self.clock.now()
        services = self.reloader.current
        if services is None:
            return []
        dropped = await asyncio.to_thread(followups.expire_pending, self.store,
                                          self.settings.pending_card_max_age, now)
        if dropped:
            log.info("waiting cards expired unshown", extra={"count": dropped})
        outcomes: list[DueOutcome] = []
        for _ in range(MAX_BATCHES):
            claimed = await asyncio.to_thread(followups.claim_due, self.store, self.worker, BATCH, now)
            if not claimed:
                break
            outcomes += await self._run(claimed, services, now)
            if len(claimed) < BATCH:
                break
        return outcomes

    async def _run(self, claimed: list[Followup], services: Services, now: datetime) -> list[DueOutcome]:
        served = {r.id: r for r in followups.followup_rules(services.rules())}
        limit = asyncio.Semaphore(CONCURRENT_FETCHES)

        async def one(item: Followup) -> DueOutcome:
            rule = served.get(item.rule_id)
            try:
                async with limit:
                    data = await self._fetch(item, rule)
                outcome = await asyncio.to_thread(self._finish, item, rule, data, services, now)
            except NudgesError as exc:  # expected failures: a server that is not allowed, data that cannot be had
                outcome = await asyncio.to_thread(self._failed, item, exc, now)
            except Exception:  # a programming error: never retried as if it were transient
                log.exception("follow-up raised", extra={"rule": item.rule_id})
                await asyncio.to_thread(followups.complete, self.store, item, self.worker, "failed")
                outcome = "failed"
            return DueOutcome(item.id, item.rule_id, outcome)

        return list(await asyncio.gather(*(one(f) for f in claimed)))

    async def _fetch(self, item: Followup, rule: CompiledRule | None) -> dict[str, Any] | None:
        if rule is None or item.patient_ref is None or item.fhir_server is None:
            return None
        # The server passed the caller's allow-list at intake; the rest of the policy is checked again.
        base = check_server(item.fhir_server, self.settings, [item.fhir_server])
        plan = plan_for((rule,))  # only what this rule reads, with the service's templates
        queries = {k: render(t, {"patientId": item.patient_ref}) for k, t in plan.templates.items()}
        results = await self.fhir.fetch_as_service(base, queries)
        failure = unobtainable(sorted(k for k, v in results.items() if not isinstance(v, Found)), plan,
                               "the FHIR server did not supply it")
        if failure is not None:
            raise failure
        return {k: v.value for k, v in results.items() if isinstance(v, Found)}

    def _failed(self, item: Followup, error: NudgesError, now: datetime) -> str:
        store, worker = self.store, self.worker
        if isinstance(error, BadRequest):  # the server is no longer allowed: trying again cannot help
            followups.complete(store, item, worker, "failed")
            return "failed"
        log.info("follow-up fetch failed; will retry", extra={"rule": item.rule_id, "attempt": item.attempts})
        return followups.retry(store, item, worker, now + RETRY_AFTER * item.attempts)

    def _finish(self, item: Followup, rule: CompiledRule | None, data: dict[str, Any] | None,
                services: Services, now: datetime) -> str:
        store, worker = self.store, self.worker
        if rule is None or item.patient_ref is None:
            followups.complete(store, item, worker)
            return "withdrawn"
        if data is None:  # no server to ask (never scheduled so by intake)
            followups.complete(store, item, worker, "failed")
            return "failed"
        record = PatientRecord.from_prefetch(data)
        outcome = engine.evaluate((rule,), record, now, {"patientId": item.patient_ref})
        if outcome.failed:
            followups.complete(store, item, worker, "failed")
            return "failed"
        if not outcome.matches:
            followups.complete(store, item, worker)
            return "quiet"
        focus = store.keyed(PATIENT_FOCUS)  # a follow-up card is about the chart, whichever hook shows it
        card = build_card(outcome.matches[0], services.ruleset, followups.CONTEXT_PLACEHOLDERS, record.patient, now,
                          record.medications(), why_base=self.settings.public_base_url)
        if store.suppressed(item.patient_hash, rule.id, focus, now, card["indicator"]):
            followups.complete(store, item, worker)
            return "suppressed"
        issued = CardRecord(uuid=card["uuid"], service_id=followups.FOLLOWUP_SERVICE, rule_id=rule.id,
                            rule_version=rule.version, hook=followups.FOLLOWUP_HOOK,
                            hook_instance=f"followup-{item.id}", patient_hash=item.patient_hash,
                            bucket=bucket(record.patient, list(flatten(data.get("coverage")))),
                            indicator=card["indicator"], issued_at=now, focus=focus)
        pushes = self._deliveries(item, rule, card, data, now)
        stored = followups.store_pending(store, issued, card, followup=item, worker=worker, deliveries=pushes)
        return "fired" if stored == "stored" else stored

    def _deliveries(self, item: Followup, rule: CompiledRule, card: dict[str, Any], data: dict[str, Any],
                    now: datetime) -> list[dict[str, Any]]:
        """Outbox rows for the rule's `deliver` targets: what each push says, fixed when the card fires."""
        if not rule.deliver or item.patient_ref is None:
            return []
        start = next((r for value in data.values() for r in flatten(value)
                      if f"{r.get('resourceType')}/{r.get('id')}" == item.start_ref), None)
        encounter = encounter_of(start, item.start_ref)
        context = {"patientId": item.patient_ref, "encounterId": encounter.split("/", 1)[1] if encounter else "",
                   "userId": ""}
        payload = {"card": followups.fill_context(card, context), "patient": item.patient_ref, "encounter": encounter,
                   "about": item.start_ref, "fired_at": instant(now), "data_server": item.fhir_server,
                   "rule": {"id": rule.id, "title": rule.title, "version": rule.version}}
        write_to = self.settings.delivery.fhir_server or item.fhir_server
        return [{"card_uuid": card["uuid"], "target": d.target, "channel": d.channel, "rule_id": rule.id,
                 "patient_hash": item.patient_hash, "fhir_server": None if d.channel == "webhook" else write_to,
                 "payload": {**payload, "spec": d.spec()}} for d in rule.deliver]


def encounter_of(resource: dict[str, Any] | None, start_ref: str) -> str | None:
    """The encounter a follow-up belongs to: the start resource itself when it is one, else its `encounter`."""
    if start_ref.startswith("Encounter/"):
        return start_ref
    reference = parse_reference(((resource or {}).get("encounter") or {}).get("reference"))
    return reference.relative if reference is not None and reference.type == "Encounter" else None
