"""`followup.deliver`: where a follow-up card is pushed when it fires, checked and compiled once at load.

Pools and webhook endpoints are named in rules and configured per site (`delivery.pools`,
`delivery.webhooks`): a rule says "the on-call cardiology pool", the site says which PractitionerRole
that is. When the site's names are known, a rule naming one that is not configured is reported at its
file and line before a card fires: an error for `nudges lint --config` (`strict`), a warning when the
service loads (a shared catalog must not stop a site that has not set up every pool; a push that needs
the missing name goes dead, counted, and its card still waits for the next hook call).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .resources import did_you_mean
from .schema import CommunicationDelivery, Rule, TaskDelivery, WebhookDelivery, parse_duration

Location = tuple[Any, ...]


@dataclass(frozen=True)
class Targets:
    """The names a site configures; rules may only use these."""

    pools: frozenset[str]
    webhooks: frozenset[str]
    strict: bool = True  # unknown names are problems (lint); else warnings (the service)


@dataclass(frozen=True, slots=True)
class CompiledDelivery:
    channel: str  # communication | task | webhook
    recipients: str | None = None  # encounter-participants | care-team | pool (to: / owner:)
    roles: tuple[str, ...] = ()
    pool: str | None = None
    due: timedelta | None = None
    code: dict[str, str] | None = None
    endpoint: str | None = None

    @property
    def target(self) -> str:
        """What distinguishes two deliveries of one card: its channel, and for webhooks the endpoint."""
        return f"webhook:{self.endpoint}" if self.channel == "webhook" else self.channel

    def spec(self) -> dict[str, Any]:
        """The delivery as the outbox keeps it (plain JSON: a queued push does not change with a reload)."""
        spec: dict[str, Any] = {"channel": self.channel}
        for key in ("recipients", "pool", "endpoint", "code"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        if self.roles:
            spec["roles"] = list(self.roles)
        if self.due is not None:
            spec["due_seconds"] = int(self.due.total_seconds())
        return spec


Found = list[tuple[Location, str]]


def compile_deliveries(rule: Rule, targets: Targets | None) -> tuple[Found, Found, tuple[CompiledDelivery, ...]]:
    """Problems and warnings (location under the rule, message), and the compiled deliveries."""
    if rule.followup is None:
        return [], [], ()
    problems: Found = []
    warnings: Found = []
    compiled: list[CompiledDelivery] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(rule.followup.deliver):
        at: Location = ("followup", "deliver", i)
        for loc, message, unconfigured in _check(item, targets):
            lenient = unconfigured and targets is not None and not targets.strict
            (warnings if lenient else problems).append(((*at, *loc), message))
        if isinstance(item, WebhookDelivery):
            one = CompiledDelivery("webhook", endpoint=item.endpoint)
        else:
            recipients = item.to if isinstance(item, CommunicationDelivery) else item.owner
            due = parse_duration(item.due) if isinstance(item, TaskDelivery) and item.due else None
            code = item.code.model_dump() if isinstance(item, TaskDelivery) and item.code else None
            one = CompiledDelivery(item.channel, recipients, tuple(item.roles), item.pool, due, code)
        if one.target in seen:
            again = (f"endpoint '{one.endpoint}' is listed twice" if one.channel == "webhook" else
                     f"channel '{one.channel}' is listed twice: one {one.channel.capitalize()} per card goes to "
                     "every recipient, so give it once")
            problems.append(((*at, "channel"), f"{again} (first at deliver[{seen[one.target]}])"))
        seen.setdefault(one.target, i)
        compiled.append(one)
    return problems, warnings, tuple(compiled)


def _check(item: CommunicationDelivery | TaskDelivery | WebhookDelivery,
           targets: Targets | None) -> Iterator[tuple[Location, str, bool]]:
    """(location, message, whether it is only a name the site has not configured)."""
    if isinstance(item, WebhookDelivery):
        if targets is not None and item.endpoint not in targets.webhooks:
            yield ("endpoint",), _unknown("webhook endpoint", item.endpoint, targets.webhooks,
                                          "delivery.webhooks"), True
        return
    key = "to" if isinstance(item, CommunicationDelivery) else "owner"
    recipients = item.to if isinstance(item, CommunicationDelivery) else item.owner
    if recipients == "pool" and item.pool is None:
        yield (key,), f"{key}: pool needs `pool:` naming a pool configured in delivery.pools", False
    if recipients == "pool" and item.roles:
        yield ("roles",), "`roles` narrows encounter-participants or care-team; a pool is addressed whole", False
    if item.pool is not None and targets is not None and item.pool not in targets.pools:
        yield ("pool",), _unknown("pool", item.pool, targets.pools, "delivery.pools"), True


def _unknown(kind: str, name: str, known: frozenset[str], setting: str) -> str:
    have = ", ".join(sorted(known)) or "none"
    hint = did_you_mean(name, set(known))
    return f"{kind} '{name}' is not configured{hint}: add it to {setting} (configured: {have})"
