"""CDS Hooks feedback: what became of each card (accepted, overridden with a reason)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import ValidationError

from ...errors import NotFound
from ...pipeline import validation_error
from ...store import FeedbackRecord
from ..deps import BodyDep, CallerDep, RuntimeDep, json_response
from ..models import FEEDBACK_SCHEMA, FeedbackRequest, error_responses

router = APIRouter(tags=["CDS Hooks"])


@router.post("/cds-services/{service_id}/feedback", summary="Feedback on cards",
             openapi_extra={"requestBody": FEEDBACK_SCHEMA}, responses=error_responses(400, 401, 404, 413, 415, 503))
@router.post("/cds-services/{service_id}/feedback/", include_in_schema=False)  # answered, not redirected: a
# redirected request's token is addressed to the first URL (as discovery and hook calls, routes/services.py)
async def feedback(service_id: str, runtime: RuntimeDep, caller: CallerDep, body: BodyDep) -> Response:
    if service_id not in runtime.services().by_id:
        raise NotFound(f"no CDS service '{service_id}'")
    try:
        parsed = FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    records = []
    for f in parsed.feedback:
        reason = f.overrideReason.reason if f.overrideReason else None
        records.append(FeedbackRecord(
            card_uuid=f.card, service_id=service_id, outcome=f.outcome, outcome_timestamp=f.outcomeTimestamp,
            accepted_suggestions=tuple(s.id for s in f.acceptedSuggestions or ()),
            override_system=reason.system if reason else None, override_code=reason.code if reason else None,
            has_comment=bool(f.overrideReason and f.overrideReason.userComment)))
    stored = await runtime.store.run(runtime.record_feedback, records, service_id)
    return json_response({"stored": stored, "duplicates": len(records) - stored})
