"""nudges as a subscriber (R4 Subscriptions Backport IG): which topic-based Subscriptions the rules'
follow-ups need, and making a FHIR server hold exactly those (`nudges subscriptions plan|apply|status`).

A rule's follow-up starts from a resource type (and value set); each configured server maps that to one
of its SubscriptionTopics (`subscriptions.servers[].topics`), so the plan is one Subscription per
server, topic and filter: rest-hook to the service's endpoint, `id-only` payloads (the service reads
the resource with its own token), a heartbeat, and a secret of its own in `channel.header`.

Applying is idempotent: what is already there and active is kept; a subscription the server put in
`error` or `off` is re-activated (the IG leaves that to the subscriber); one that vanished, or no
longer matches the settings, is replaced; one no rule needs any more is deleted; a subscription to the
same endpoint that the service does not know is reported, never touched.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..errors import DeliveryError
from ..fhirserver.client import Answered, FhirClient, diagnostics
from ..rules.compiled import CompiledRule
from ..rules.schema import Clause
from ..settings import Settings
from ..store import Store
from . import followups, subscriptions
from .subscriptions import Managed

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
PROFILE = f"{BACKPORT}/backport-subscription"
ACTIVE = ("active", "requested")


@dataclass(frozen=True)
class Wanted:
    """One Subscription the rules need."""

    server: str
    topic: str
    filter: str | None
    types: tuple[str, ...]
    rules: tuple[str, ...]


@dataclass
class Step:
    """What applying does about one subscription: create, keep, reactivate, replace, retire, unmanaged,
    or unreachable (nothing can be said about that server)."""

    action: str
    server: str
    topic: str | None = None
    wanted: Wanted | None = None
    managed: Managed | None = None
    remote_id: str | None = None
    remote_status: str | None = None
    note: str = ""
    result: str = ""  # after apply: ok, or what went wrong
    ok: bool = True


@dataclass
class Plan:
    endpoint: str | None
    wanted: list[Wanted] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def endpoint_of(settings: Settings) -> str | None:
    if settings.subscriptions.endpoint:
        return settings.subscriptions.endpoint
    public = settings.public_base_url
    return f"{public.rstrip('/')}/fhir/notifications" if public else None


def start_codes(rule: CompiledRule) -> str | None:
    """The value-set name of the rule's start clause (the compiled clause keeps only its codes)."""
    clause = next((c for c in rule.model.when.all if isinstance(c, Clause) and c.bind == rule.followup_start), None)
    return clause.codes if clause is not None else None


def plan(rules: tuple[CompiledRule, ...], settings: Settings) -> Plan:
    """The Subscriptions the served follow-up rules need on every configured server."""
    found = Plan(endpoint_of(settings))
    if found.endpoint is None:
        found.problems.append("set subscriptions.endpoint (or public_base_url): the URL servers post notifications to")
    groups: dict[tuple[str, str, str | None], tuple[set[str], set[str]]] = {}
    starting = followups.followup_rules(rules)
    if starting and not settings.subscriptions.servers:
        found.problems.append("no subscriptions.servers configured: follow-ups of "
                              f"{', '.join(r.id for r in starting)} are only started by notifications sent unasked")
    for i, server in enumerate(settings.subscriptions.servers):
        for rule in starting:
            clause = followups.start_clause(rule)
            if clause is None:
                continue
            codes = start_codes(rule)
            topic = server.topics.get(f"{clause.resource}:{codes}") if codes else None
            topic = topic or server.topics.get(clause.resource)
            if topic is None:
                found.problems.append(f"{server.base}: no SubscriptionTopic for {clause.resource} (rule {rule.id}): "
                                      f"add subscriptions.servers[{i}].topics.{clause.resource}")
                continue
            types, ids = groups.setdefault((server.base.rstrip("/"), topic, server.filters.get(topic)), (set(), set()))
            types.add(clause.resource)
            ids.add(rule.id)
    found.wanted = [Wanted(base, topic, filter_, tuple(sorted(types)), tuple(sorted(ids)))
                    for (base, topic, filter_), (types, ids) in sorted(groups.items(), key=lambda g: str(g[0]))]
    return found


def subscription_resource(wanted: Wanted, endpoint: str, secret: str, settings: Settings) -> dict[str, Any]:
    """The Subscription as the Backport IG profiles it, with the per-subscription secret header."""
    channel_extensions = [
        {"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": settings.subscriptions.heartbeat_seconds},
        {"url": f"{BACKPORT}/backport-timeout", "valueUnsignedInt": settings.subscriptions.timeout_seconds}]
    resource: dict[str, Any] = {
        "resourceType": "Subscription", "meta": {"profile": [PROFILE]}, "status": "requested",
        "reason": f"nudges follow-ups: {', '.join(wanted.rules)}"[:500], "criteria": wanted.topic,
        "channel": {"extension": channel_extensions, "type": "rest-hook", "endpoint": endpoint,
                    "payload": "application/fhir+json",
                    "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content",
                                                "valueCode": "id-only"}]},
                    "header": [f"Authorization: Bearer {secret}"]}}
    if wanted.filter:
        resource["_criteria"] = {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                                "valueString": wanted.filter}]}
    return resource


class Subscriber:
    """Surveys and applies a plan on the servers, and reads their `$status`; shared by the CLI and the
    service (which re-activates on its own, see events/recovery.py)."""

    def __init__(self, settings: Settings, store: Store, fhir: FhirClient) -> None:
        self.settings, self.store, self.fhir = settings, store, fhir

    async def _call(self, method: str, base: str, path: str, body: Any = None) -> Answered:
        answer = await self.fhir.request_as_service(method, base, path, body=body,
                                                    timeout=self.settings.subscriptions.timeout_seconds + 5)
        if not isinstance(answer, Answered):
            raise DeliveryError(f"{base}: {answer.error.diagnostics}")
        return answer

    async def survey(self, found: Plan) -> list[Step]:
        """Compare the plan with what the database and each server hold."""
        steps: list[Step] = []
        servers = sorted({w.server for w in found.wanted} | {m.server for m in subscriptions.live(self.store)})
        for base in servers:
            try:
                steps += await self._survey_server(base, [w for w in found.wanted if w.server == base], found.endpoint)
            except DeliveryError as exc:
                steps.append(Step("unreachable", base, note=exc.diagnostics, ok=False))
        return steps

    async def _remote(self, base: str, endpoint: str | None, rows: list[Managed]) -> dict[str, dict[str, Any]]:
        """The server's Subscriptions to our endpoint (search by `url`), else each of ours read by id."""
        remote: dict[str, dict[str, Any]] = {}
        if endpoint:
            answer = await self._call("GET", base, f"Subscription?url={quote(endpoint, safe='')}&_count=100")
            if answer.status == 200 and isinstance(answer.body, dict):
                remote = {e["resource"]["id"]: e["resource"] for e in answer.body.get("entry") or ()
                          if isinstance(e.get("resource"), dict) and e["resource"].get("id")}
        for row in rows:
            if row.resource_id and row.resource_id not in remote:
                answer = await self._call("GET", base, f"Subscription/{row.resource_id}")
                if answer.status == 200 and isinstance(answer.body, dict):
                    remote[row.resource_id] = answer.body
        return remote

    async def _survey_server(self, base: str, wanted: list[Wanted], endpoint: str | None) -> list[Step]:
        rows = subscriptions.live(self.store, base)
        remote = await self._remote(base, endpoint, rows)
        heartbeat = self.settings.subscriptions.heartbeat_seconds
        steps: list[Step] = []
        used: set[int] = set()
        for want in wanted:
            row = next((r for r in rows if r.id not in used and (r.topic, r.filter, r.endpoint, r.heartbeat_seconds)
                        == (want.topic, want.filter, endpoint, heartbeat)), None)
            if row is None:
                steps.append(Step("create", base, want.topic, want))
                continue
            used.add(row.id)
            there = remote.get(row.resource_id or "")
            status = there.get("status") if there else None
            if there is None:
                why = "never confirmed by the server" if row.resource_id is None else "gone from the server"
                steps.append(Step("replace", base, want.topic, want, row, note=why))
            elif status in ACTIVE:
                steps.append(Step("keep", base, want.topic, want, row, row.resource_id, status))
            else:
                said = there.get("error") or ""
                steps.append(Step("reactivate", base, want.topic, want, row, row.resource_id, status,
                                  note=f"server says {status}" + (f": {said}" if said else "")))
        for row in rows:
            if row.id not in used:
                steps.append(Step("retire", base, row.topic, None, row, row.resource_id,
                                  (remote.get(row.resource_id or "") or {}).get("status"), note="no rule needs it"))
        ours = {r.resource_id for r in rows} | {r.resource_id for r in subscriptions.retired(self.store, base)}
        for rid, resource in sorted(remote.items()):
            if rid not in ours and resource.get("channel", {}).get("endpoint") == endpoint:
                steps.append(Step("unmanaged", base, resource.get("criteria"), remote_id=rid,
                                  remote_status=resource.get("status"),
                                  note="not created by nudges: its notifications are refused (delete it)"))
        return steps

    # -- apply ------------------------------------------------------------------------------------------
    async def apply(self, steps: list[Step], endpoint: str | None, wait: float) -> list[Step]:
        for step in steps:
            try:
                if step.action in ("create", "replace") and step.wanted is not None and endpoint:
                    await self._create(step, step.wanted, endpoint, wait)
                    if step.ok and step.action == "replace" and step.managed is not None:
                        await self._retire(step.managed)
                elif step.action == "reactivate" and step.managed is not None:
                    await self._reactivate(step, step.managed, wait)
                elif step.action == "retire" and step.managed is not None:
                    await self._retire(step.managed)
                    step.result = "deleted"
                elif step.action == "keep":
                    step.result = "active"
            except DeliveryError as exc:
                step.ok, step.result = False, f"{exc.diagnostics}; nothing more was changed there"
        return steps

    async def _create(self, step: Step, want: Wanted, endpoint: str, wait: float) -> None:
        secret = subscriptions.new_secret()
        row_id = await asyncio.to_thread(
            subscriptions.add, self.store, server=want.server, topic=want.topic, filter=want.filter, endpoint=endpoint,
            heartbeat_seconds=self.settings.subscriptions.heartbeat_seconds, resource_types=list(want.types),
            secret=secret)
        try:
            answer = await self._call("POST", want.server, "Subscription",
                                      subscription_resource(want, endpoint, secret, self.settings))
        except DeliveryError:
            await asyncio.to_thread(subscriptions.forget, self.store, row_id)
            raise
        resource_id = answer.body.get("id") if isinstance(answer.body, dict) else None
        if answer.status not in (200, 201) or not isinstance(resource_id, str):
            await asyncio.to_thread(subscriptions.forget, self.store, row_id)
            said = diagnostics(answer.body)
            step.ok, step.result = False, f"refused: the server answered {answer.status}" + (f": {said}" * bool(said))
            return
        if not await asyncio.to_thread(subscriptions.bind, self.store, row_id, resource_id):
            step.ok, step.result = False, "the handshake named another subscription than the create answered"
            return
        step.remote_id = resource_id
        await self._confirm(step, want.server, resource_id, row_id, wait)

    async def _confirm(self, step: Step, base: str, resource_id: str, row_id: int, wait: float) -> None:
        """Wait for the handshake (the server makes the subscription active once our endpoint answered it)."""
        deadline = time.monotonic() + wait
        status, error = "requested", ""
        while True:
            answer = await self._call("GET", base, f"Subscription/{resource_id}")
            body = answer.body if isinstance(answer.body, dict) else {}
            status, error = str(body.get("status") or "unknown"), str(body.get("error") or "")
            if status != "requested" or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        step.remote_status = status
        if status == "active":
            await asyncio.to_thread(subscriptions.set_status, self.store, row_id, "active", server_status="active")
            step.result = "active"
        elif status == "requested":
            step.result = f"created; no handshake within {wait:g} s yet (is the service reachable at its endpoint?)"
        else:
            step.ok = False
            step.result = f"the server put it in {status}" + (f": {error}" if error else "")
            await self._retire(await asyncio.to_thread(subscriptions.get, self.store, row_id))

    async def _reactivate(self, step: Step, managed: Managed, wait: float) -> None:
        ok, said = await self.reactivate(managed)
        if not ok:
            step.ok, step.result = False, said
            return
        await self._confirm(step, managed.server, managed.resource_id or "", managed.id, wait)

    async def reactivate(self, managed: Managed) -> tuple[bool, str]:
        """PUT the Subscription back to `requested` (the server then handshakes again with its count)."""
        answer = await self._call("GET", managed.server, f"Subscription/{managed.resource_id}")
        resource = answer.body if answer.status == 200 and isinstance(answer.body, dict) else None
        if resource is None:
            return False, f"cannot read it to re-activate (the server answered {answer.status})"
        if not any(h.startswith("Authorization: Bearer " + subscriptions.SECRET_PREFIX)
                   for h in resource.get("channel", {}).get("header") or ()):
            return False, "the server does not show its secret header: replace it instead"
        resource["status"] = "requested"
        resource.pop("error", None)
        answer = await self._call("PUT", managed.server, f"Subscription/{managed.resource_id}", resource)
        if answer.status not in (200, 201):
            said = diagnostics(answer.body)
            return False, f"re-activation refused: {answer.status}" + (f": {said}" if said else "")
        return True, "re-activated"

    async def _retire(self, managed: Managed | None) -> None:
        if managed is None:
            return
        if managed.resource_id:
            answer = await self._call("DELETE", managed.server, f"Subscription/{managed.resource_id}")
            if answer.status not in (200, 202, 204, 404, 410):
                raise DeliveryError(f"{managed.server}: deleting Subscription/{managed.resource_id} answered "
                                        f"{answer.status}")
        await asyncio.to_thread(subscriptions.set_status, self.store, managed.id, "retired", reason="retired")

    # -- status ------------------------------------------------------------------------------------------
    async def status(self, managed: Managed) -> dict[str, Any]:
        """The server's view (`$status`: status and events-since-subscription-start) beside ours."""
        view: dict[str, Any] = {"id": managed.id, "server": managed.server, "topic": managed.topic,
                                "subscription": managed.reference, "status": managed.status,
                                "events_received": managed.last_event + len(managed.above),
                                "missing": managed.missing[:20], "last_notification": managed.last_seen_at,
                                "heartbeat_seconds": managed.heartbeat_seconds, "reason": managed.reason}
        if not managed.resource_id:
            return {**view, "server_status": None, "server_events": None}
        answer = await self._call("GET", managed.server, f"Subscription/{managed.resource_id}/$status")
        parameters = status_parameters(answer.body) if answer.status == 200 else None
        if parameters is None:  # no $status: the resource's own status, no count
            answer = await self._call("GET", managed.server, f"Subscription/{managed.resource_id}")
            body = answer.body if isinstance(answer.body, dict) else {}
            return {**view, "server_status": body.get("status", f"HTTP {answer.status}"), "server_events": None}
        count = parameters.get("events-since-subscription-start")
        return {**view, "server_status": parameters.get("status"),
                "server_events": int(count) if isinstance(count, str) and count.isdigit() else None}


def status_parameters(body: Any) -> dict[str, Any] | None:
    """The first SubscriptionStatus of a `$status` searchset (or a bare Parameters): name -> value."""
    if not isinstance(body, dict):
        return None
    resource: Any = body
    if body.get("resourceType") == "Bundle":
        entries = body.get("entry") or []
        resource = entries[0].get("resource") if entries and isinstance(entries[0], dict) else None
    if not isinstance(resource, dict) or resource.get("resourceType") != "Parameters":
        return None
    return {str(p.get("name")): next((v for k, v in p.items() if k.startswith("value")), None)
            for p in resource.get("parameter") or () if isinstance(p, dict)}
