"""POST /fhir/notifications: FHIR Subscriptions (R4 Backport IG) notifications; see events/notifications."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ...events.notifications import EVENT_TYPE, parse_notification
from ..deps import BodyDep, CallerDep, RuntimeDep, json_response
from ..models import NOTIFICATION_SCHEMA, error_responses

router = APIRouter(tags=["Subscriptions"])


@router.post("/fhir/notifications", summary="FHIR Subscriptions (R4 Backport IG) notifications",
             openapi_extra={"requestBody": NOTIFICATION_SCHEMA}, responses=error_responses(400, 401, 413))
async def notifications(runtime: RuntimeDep, caller: CallerDep, body: BodyDep) -> Response:
    note = parse_notification(body)
    if note.type != EVENT_TYPE:
        return json_response({"type": note.type, "events": 0, "scheduled": 0})
    allowed = list(caller.client.fhir_servers) if caller.client else []
    scheduled = await runtime.intake.accept(note, runtime.services(), allowed)
    return json_response({"type": note.type, "events": len(note.focus), "scheduled": scheduled})
