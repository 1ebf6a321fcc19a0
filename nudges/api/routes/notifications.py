"""POST /fhir/notifications: FHIR Subscriptions (R4 Backport IG) notifications; see events/notifications.

Who may notify: a subscription nudges manages, by the secret its `channel.header` carries
(`Authorization: Bearer nsub_...`: a FHIR server cannot sign a CDS client's JWT), and only for itself:
an unknown or retired secret, or one used for another subscription, is a 401 and nothing is scheduled.
Anything else is authenticated like a hook call (a CDS client's JWT, e.g. an integration engine that
relays notifications; or nothing, in loopback development), but never for a managed subscription.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from ...errors import Unauthorized
from ...events import subscriptions
from ...events.notifications import EVENT_TYPE, Notification, parse_notification
from ...events.subscriptions import SECRET_PREFIX, Managed
from ...fhir import parse_reference
from ..auth import Caller
from ..deps import BodyDep, RuntimeDep, authenticate, json_response
from ..models import NOTIFICATION_SCHEMA, error_responses

log = logging.getLogger("nudges.auth")
router = APIRouter(tags=["Subscriptions"])


@dataclass(frozen=True)
class Notifier:
    managed: Managed | None = None  # authenticated by its subscription secret
    caller: Caller | None = None  # or like a hook call


async def notifier(request: Request, runtime: RuntimeDep) -> Notifier:
    scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token.startswith(SECRET_PREFIX):
        managed = await runtime.store.run(subscriptions.by_secret, runtime.store, token)
        if managed is None or managed.status == "retired":
            reason = "unknown subscription secret" if managed is None else f"retired subscription {managed.id}"
            log.warning("rejected notification: %s", reason)
            raise Unauthorized(reason)
        return Notifier(managed=managed)
    return Notifier(caller=await authenticate(request, runtime))


NotifierDep = Annotated[Notifier, Depends(notifier)]


def _own(managed: Managed, note: Notification) -> str:
    """The server's id for the subscription the notification is about, which must be the secret's own."""
    ref = parse_reference(note.subscription)
    foreign = (ref is None or ref.type != "Subscription" or (ref.base is not None and ref.base != managed.server)
               or (managed.resource_id is not None and ref.id != managed.resource_id))
    if ref is None or foreign:
        log.warning("rejected notification: subscription %s's secret used for another subscription", managed.id)
        raise Unauthorized("the secret belongs to another subscription")
    return ref.id


@router.post("/fhir/notifications", summary="FHIR Subscriptions (R4 Backport IG) notifications",
             openapi_extra={"requestBody": NOTIFICATION_SCHEMA}, responses=error_responses(400, 401, 413, 415, 503))
async def notifications(runtime: RuntimeDep, who: NotifierDep, body: BodyDep) -> Response:
    note = parse_notification(body)
    store = runtime.store
    if who.managed is None:
        if await store.run(subscriptions.is_managed, store, note.subscription):
            log.warning("rejected notification: a managed subscription's notification without its secret")
            raise Unauthorized("managed subscription without its secret")
        if note.type != EVENT_TYPE:
            return json_response({"type": note.type, "events": 0, "scheduled": 0})
        caller = who.caller
        allowed = list(caller.client.fhir_servers) if caller and caller.client else []
        scheduled = await runtime.intake.accept(note, runtime.services(), allowed)
        return json_response({"type": note.type, "events": len(note.focus), "scheduled": scheduled})
    managed, scheduled = who.managed, 0
    resource_id = _own(managed, note)
    if note.type == EVENT_TYPE:  # scheduled first: an event counts as arrived only once it is taken care of
        scheduled = await runtime.intake.accept(note, runtime.services(), [], server=managed.server)
    await store.run(subscriptions.observe, store, managed, note.heard, resource_id)
    return json_response({"type": note.type, "events": len(note.focus), "scheduled": scheduled})
