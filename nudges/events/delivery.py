"""Send the outbox: claim due deliveries (exactly once across replicas), find who they are for, write
the Communication or Task (conditional create on the card's uuid) or post the signed webhook, and on
acknowledgement drop the card still waiting for the next hook call, in the transaction that marks the
row sent. What retrying can help (5xx, 408, 429, timeouts, connection errors) is retried with doubling
back-off; a refusal (other 4xx) or too many attempts makes the row dead: kept, counted, never silent.

A send interrupted by shutdown is left as a crash would leave it: `sending`, claimed again after the
lease; the conditional create and the stable webhook-id make the second attempt harmless. Logs name
the rule, the channel and the delivery id, never the patient.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx

from ..clock import Clock
from ..errors import BadRequest, DeliveryError
from ..fhir import flatten, parse_fhir_date
from ..fhirserver.client import Failed, FhirClient, NotWritten, retry_after, retryable
from ..fhirserver.guard import check_server
from ..metrics import Metrics
from ..settings import Settings
from ..store import Store
from . import channels, followups, outbox, webhooks
from .due import worker_name
from .outbox import Delivery

log = logging.getLogger("nudges.delivery")

BATCH = 50
MAX_BATCHES = 20
CONCURRENT_SENDS = 10
MAX_BACKOFF = timedelta(hours=1)


@dataclass(frozen=True)
class DeliveryOutcome:
    """sent, retry, dead, or lost (another worker took the row over after the lease)."""

    id: int
    card_uuid: str
    target: str
    outcome: str


class Deliveries:
    def __init__(self, settings: Settings, clock: Clock, store: Store, fhir: FhirClient,
                 metrics: Metrics | None = None) -> None:
        self.settings, self.clock, self.store, self.fhir = settings, clock, store, fhir
        self.metrics = metrics or Metrics()
        self.worker = worker_name()

    @property
    def console(self) -> str | None:
        """Where the rule's page is, when the console is served at a known public address."""
        return self.settings.public_base_url if self.settings.console.enabled else None

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.delivery.lease_seconds)

    async def run_due(self, now: datetime | None = None) -> list[DeliveryOutcome]:
        """Send every delivery due at `now` (default: the injected clock)."""
        now = now or self.clock.now()
        outcomes: list[DeliveryOutcome] = []
        limit = asyncio.Semaphore(CONCURRENT_SENDS)

        async def one(item: Delivery) -> DeliveryOutcome:
            try:
                async with limit:
                    location = await self._send(item, now)
                outcome = await asyncio.to_thread(self._sent, item, location, now)
            except DeliveryError as exc:
                outcome = await asyncio.to_thread(self._failed, item, exc, now)
            except Exception:  # a programming error: never retried as if it were transient
                log.exception("delivery raised", extra={"rule": item.rule_id, "delivery": item.id})
                await asyncio.to_thread(outbox.kill, self.store, item, self.worker, "internal error")
                outcome = "dead"
            self.metrics.deliveries.labels(item.channel, outcome).inc()
            return DeliveryOutcome(item.id, item.card_uuid, item.target, outcome)

        for _ in range(MAX_BATCHES):
            claimed = await asyncio.to_thread(outbox.claim_due, self.store, self.worker, BATCH, now, self.lease)
            if not claimed:
                break
            outcomes += await asyncio.gather(*(one(d) for d in claimed))
            if len(claimed) < BATCH:
                break
        return outcomes

    # -- outcomes ---------------------------------------------------------------------------------------
    def _sent(self, item: Delivery, location: str | None, now: datetime) -> str:
        with self.store.engine.begin() as conn:
            if not outbox.mark_sent(conn, item, self.worker, location, now):
                return "lost"
            followups.acknowledge(conn, item.card_uuid, now, f"delivery-{item.id}",
                                  self.settings.suppression.ignored_window,
                                  self.store.dialect)
        log.info("delivered", extra={"rule": item.rule_id, "target": item.target, "delivery": item.id,
                                     "attempt": item.attempts})
        return "sent"

    def _failed(self, item: Delivery, error: DeliveryError, now: datetime) -> str:
        settings = self.settings.delivery
        message = f"attempt {item.attempts}: {error.diagnostics}"
        if error.retry and item.attempts < settings.max_attempts:
            wait = min(timedelta(seconds=settings.retry_seconds * 2 ** (item.attempts - 1)), MAX_BACKOFF)
            if error.retry_after:
                wait = max(wait, min(timedelta(seconds=error.retry_after), MAX_BACKOFF))
            done = outbox.retry(self.store, item, self.worker, now + wait, message)
            log.info("delivery failed; will retry", extra=self._said(item, error))
            return "retry" if done else "lost"
        done = outbox.kill(self.store, item, self.worker, message)
        log.error("delivery dead", extra=self._said(item, error))
        return "dead" if done else "lost"

    @staticmethod
    def _said(item: Delivery, error: DeliveryError) -> dict[str, Any]:
        """What a log line may say: the server's own words (which could quote the resource) stay in the
        outbox row (`last_error`, `nudges deliveries list`), not in the log."""
        return {"rule": item.rule_id, "target": item.target, "delivery": item.id, "attempt": item.attempts,
                "status": error.upstream_status, "retry": error.retry}

    # -- channels ---------------------------------------------------------------------------------------
    async def _send(self, item: Delivery, now: datetime) -> str | None:
        if item.channel == "webhook":
            return await self._webhook(item)
        base = self._server(item.fhir_server)
        payload = item.payload
        recipients = await self._recipients(payload, now)
        if item.channel == "communication":
            resource = channels.communication(item.card_uuid, payload, recipients, self.settings.delivery, now,
                                              self.console)
        else:
            resource = channels.task(item.card_uuid, payload, recipients[0], self.settings.delivery, now)
        written = await self.fhir.create_as_service(base, resource, channels.if_none_exist(item.card_uuid))
        if isinstance(written, NotWritten):
            raise written.error
        return written.location

    def _server(self, base: str | None) -> str:
        if base is None:
            raise DeliveryError("no FHIR server to write to (set delivery.fhir_server)", retry=False)
        try:
            return check_server(base, self.settings, [base])
        except BadRequest as exc:
            raise DeliveryError(f"FHIR server refused by policy: {exc.diagnostics}", retry=False) from None

    async def _read(self, base: str, query: str) -> Any:
        result = (await self.fhir.fetch_as_service(base, {"q": query}))["q"]
        if isinstance(result, Failed):
            raise DeliveryError(f"cannot read who to address: {result.error.diagnostics}")
        return result.value

    async def _recipients(self, payload: dict[str, Any], now: datetime) -> list[dict[str, str]]:
        """The encounter's current participants or the patient's active care team (narrowed by `roles`),
        else the configured pool; nobody to address is a refusal (a retry would find nobody again)."""
        spec = payload["spec"]
        kind, roles, found = spec.get("recipients"), set(spec.get("roles") or ()), []
        base = payload.get("data_server")
        if kind == "encounter-participants" and payload.get("encounter") and base:
            encounter = await self._read(self._server(base), payload["encounter"])
            for participant in (encounter or {}).get("participant") or ():
                end = parse_fhir_date((participant.get("period") or {}).get("end"))
                if end is not None and end <= now:
                    continue
                if _has_code(participant.get("type"), roles):
                    found.append((participant.get("individual") or {}).get("reference"))
        elif kind == "care-team" and base:
            teams = await self._read(self._server(base), f"CareTeam?patient={payload['patient']}&status=active")
            for team in flatten(teams):
                for participant in team.get("participant") or ():
                    if _has_code(participant.get("role"), roles):
                        found.append((participant.get("member") or {}).get("reference"))
        references = [{"reference": r} for r in dict.fromkeys(r for r in found if isinstance(r, str) and r)]
        if references:
            return references
        name = spec.get("pool")
        pool = self.settings.delivery.pools.get(name) if name else None
        if name and pool is None:
            raise DeliveryError(f"pool '{name}' is not configured in delivery.pools", retry=False)
        if pool is None:
            raise DeliveryError(f"nobody to address ({kind}) and no pool to fall back on", retry=False)
        return [{"reference": pool.reference, **({"display": pool.display} if pool.display else {})}]

    async def _webhook(self, item: Delivery) -> str:
        name = item.payload["spec"].get("endpoint")
        endpoint = self.settings.delivery.webhooks.get(name or "")
        if endpoint is None:
            raise DeliveryError(f"webhook endpoint '{name}' is not configured in delivery.webhooks", retry=False)
        payload, public = item.payload, self.settings.public_base_url
        rule = payload["rule"]["id"]
        source = f"{public.rstrip('/')}/console/rules/{rule}" if public else f"urn:nudges:rule:{rule}"
        data = channels.event_data(payload, payload.get("data_server"), self.settings.delivery, self.console)
        body = webhooks.cloudevent(event_id=item.card_uuid, source=source, time_=payload["fired_at"], subject=rule,
                                   data=data)
        headers = webhooks.headers(endpoint.secret.get_secret_value(), item.card_uuid, body)
        try:
            response = await self.fhir.http.post(endpoint.url, content=body, headers=headers,
                                                 timeout=endpoint.timeout_seconds)
        except httpx.TimeoutException:
            raise DeliveryError(f"webhook '{name}' did not answer within {endpoint.timeout_seconds:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryError(f"webhook '{name}' unreachable ({type(exc).__name__})") from None
        if 200 <= response.status_code < 300:
            return str(response.status_code)
        if response.status_code == 410:
            raise DeliveryError(f"webhook '{name}' answered 410: the endpoint is gone", retry=False,
                                upstream_status=410)
        raise DeliveryError(f"webhook '{name}' answered {response.status_code}", retry=retryable(response.status_code),
                            upstream_status=response.status_code, retry_after=retry_after(response.headers))


def _has_code(concepts: Any, wanted: set[str]) -> bool:
    """True without `roles`; else when one of the concepts (a list or one CodeableConcept) has a wanted code."""
    if not wanted:
        return True
    items = concepts if isinstance(concepts, list) else [concepts]
    return any(isinstance(c, dict) and any(isinstance(k, dict) and k.get("code") in wanted
                                           for k in c.get("coding") or ()) for c in items)


def check_settings(settings: Settings) -> None:
    """Refuse at start what would only fail when a card fires: a webhook secret that is not a usable
    `whsec_` key, a webhook or FHIR target that is not https (http only on loopback)."""
    from urllib.parse import urlsplit

    from ..errors import ConfigError
    from ..fhirserver.guard import is_loopback

    def secure(url: str, what: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname or "")):
            raise ConfigError(f"{what} {url!r} must use https (http only on loopback)")

    for name, endpoint in settings.delivery.webhooks.items():
        secure(endpoint.url, f"delivery.webhooks.{name}.url")
        try:
            webhooks.secret_key(endpoint.secret.get_secret_value())
        except ConfigError as exc:
            raise ConfigError(f"delivery.webhooks.{name}.secret: {exc.diagnostics}") from None
    if settings.delivery.fhir_server:
        secure(settings.delivery.fhir_server, "delivery.fhir_server")
    for i, server in enumerate(settings.subscriptions.servers):
        secure(server.base, f"subscriptions.servers[{i}].base")
