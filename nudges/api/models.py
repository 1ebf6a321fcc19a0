"""CDS Hooks 2.0 request/feedback bodies as pydantic models, named after the spec. Every object takes the
spec's `extension` member (CDS Hooks 2.0 "Extensions": any object of the spec may carry one); other
unknown members are refused, so a misspelt field is a 400 that names it, not silently ignored.

Prefetch values and context Bundles stay plain dicts: validating every FHIR resource with models on
each call would dominate latency.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FhirAuthorization(BaseModel):
    model_config = ConfigDict(extra="allow")

    access_token: str = Field(min_length=1)
    token_type: Literal["Bearer", "bearer"]
    expires_in: int
    scope: str
    subject: str
    patient: str | None = None


class CdsServiceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hook: str = Field(min_length=1)
    hookInstance: str = Field(min_length=1, max_length=64)
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _server_with_token(self) -> CdsServiceRequest:
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirServer is required when fhirAuthorization is present (cds-r-1)")
        return self


class Coding(BaseModel):
    model_config = ConfigDict(extra="allow")

    system: str | None = None
    code: str = Field(min_length=1)
    display: str | None = None


class OverrideReason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Coding | None = None
    userComment: str | None = None
    extension: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> OverrideReason:
        if self.reason is None and not self.userComment:
            raise ValueError("overrideReason needs a reason or a userComment (cds-fb-3)")
        return self


class AcceptedSuggestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    extension: dict[str, Any] | None = None


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    card: str = Field(min_length=1, max_length=64)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime
    extension: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _outcome_fields(self) -> Feedback:
        if self.outcome == "accepted" and not self.acceptedSuggestions:
            raise ValueError("acceptedSuggestions is required when the outcome is accepted (cds-fb-2)")
        if self.outcome == "overridden" and self.acceptedSuggestions:
            raise ValueError("acceptedSuggestions is only allowed when the outcome is accepted")
        if self.outcome == "accepted" and self.overrideReason is not None:
            raise ValueError("overrideReason is only allowed when the outcome is overridden")
        if self.outcomeTimestamp.tzinfo is None:
            raise ValueError("outcomeTimestamp must carry a UTC offset (RFC 3339)")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feedback: list[Feedback] = Field(min_length=1, max_length=500)
    extension: dict[str, Any] | None = None


class NotificationParameter(BaseModel):
    name: str
    valueReference: dict[str, Any] | None = None
    valueCode: str | None = None
    valueString: str | None = None
    part: list[dict[str, Any]] | None = None


class NotificationBundle(BaseModel):
    """R4 Subscriptions Backport IG notification: a `history` Bundle whose first entry is the
    SubscriptionStatus (a Parameters resource); documentation only, the route reads the JSON itself."""

    resourceType: Literal["Bundle"]
    type: Literal["history"]
    entry: list[dict[str, Any]] = Field(min_length=1, description="first: the SubscriptionStatus Parameters; "
                                                                  "then the focus resources (full-resource)")


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema with its $defs inlined, to stand inside an OpenAPI operation on its own."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def request_body(model: type[BaseModel], *media: str) -> dict[str, Any]:
    """An OpenAPI requestBody for routes that parse their body themselves (once, with orjson)."""
    schema = _inline(model.model_json_schema())
    return {"required": True, "content": {m: {"schema": schema} for m in media or ("application/json",)}}


CALL_SCHEMA = request_body(CdsServiceRequest)
FEEDBACK_SCHEMA = request_body(FeedbackRequest)
NOTIFICATION_SCHEMA = request_body(NotificationBundle, "application/fhir+json", "application/json")


_OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["resourceType", "issue"],
    "properties": {"resourceType": {"const": "OperationOutcome"}, "issue": {"type": "array", "items": {
        "type": "object", "properties": {"severity": {"type": "string"}, "code": {"type": "string"},
                                         "diagnostics": {"type": "string"},
                                         "expression": {"type": "array", "items": {"type": "string"}}}}}}}
_WHY = {400: "malformed JSON, a body that is not an object, a missing or invalid field (named), the wrong hook",
        401: "a missing or refused bearer token (when auth.clients are configured)",
        404: "no such CDS service",
        412: "data the rules need is in neither prefetch nor the FHIR server",
        413: "the body is larger than max_body_bytes",
        415: "a body sent as something other than JSON (a form, text/plain) or compressed",
        503: "the service's database is out of reach; try again (Retry-After)"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for the errors a route answers: every one a FHIR OperationOutcome."""
    return {status: {"description": _WHY[status], "content": {"application/fhir+json": {"schema": _OUTCOME_SCHEMA}}}
            for status in statuses}
