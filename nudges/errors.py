"""The service's one exception hierarchy. Each class carries its HTTP status and FHIR issue code, and
`api/errors.py` is the only place they become HTTP answers (a FHIR OperationOutcome, as CDS Hooks 3.0
recommends). Diagnostics never include tokens, request bodies or patient identifiers.

    NudgesError (500 exception)              anything the service raises on purpose
    ├── BadRequest (400 invalid)             the caller sent something wrong
    │   ├── MissingField (400 required)
    │   └── TooDeep (400 too-costly)
    ├── Unauthorized (401 login)             the reason is for the log only
    ├── Forbidden (403 forbidden)            known, or not asked, but not allowed here (the console off loopback)
    ├── NotFound (404 not-found)
    ├── PayloadTooLarge (413 too-long)
    ├── UnsupportedMediaType (415 not-supported)  a body that is not JSON, or compressed
    ├── PreconditionFailed (412 incomplete)  data in neither prefetch nor the FHIR server
    │   └── FhirServerError                  the FHIR server could not supply it (transient: retried)
    ├── DeliveryError (502 transient)        a push could not be delivered (retried from the outbox)
    ├── Unavailable (503 transient)          the database is out of reach: try again shortly
    └── ConfigError                          unsafe or inconsistent settings: the process must not start

Foreign exceptions are mapped where they arise, once: httpx and JSON errors of a FHIR fetch in
`fhirserver/client.py`, JWT errors in `api/auth.py`, pydantic errors in `pipeline.validation_error`,
the database out of reach (no connection within `store.DATABASE_WAIT_SECONDS`) in `api/errors.py`.
Anything else is a programming error: answered 500 and logged, never retried as if transient.
"""

from __future__ import annotations

from typing import Any

from .fhir import operation_outcome


class NudgesError(Exception):
    """Base class: `status` is the HTTP status, `code` the FHIR issue-type code."""

    status = 500
    code = "exception"
    severity = "error"

    def __init__(self, diagnostics: str, *, expression: str | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.expression = expression

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.diagnostics, code=self.code, severity=self.severity,
                                 expression=self.expression)


class BadRequest(NudgesError):
    status = 400
    code = "invalid"


class MissingField(BadRequest):
    code = "required"

    def __init__(self, field: str, detail: str = "") -> None:
        message = f"required field '{field}' is missing" + (f": {detail}" if detail else "")
        super().__init__(message, expression=field)


class TooDeep(BadRequest):
    code = "too-costly"


class Unauthorized(NudgesError):
    """Authentication failed; `reason` is for the log only, the client sees a bare message."""

    status = 401
    code = "login"

    def __init__(self, reason: str) -> None:
        super().__init__("authentication required")
        self.reason = reason


class Forbidden(NudgesError):
    """The request may not be served here, whoever sends it (the console reached off loopback with no
    sign-in configured, a header from an untrusted address); the message says what to configure."""

    status = 403
    code = "forbidden"


class NotFound(NudgesError):
    status = 404
    code = "not-found"


class PayloadTooLarge(NudgesError):
    status = 413
    code = "too-long"


class UnsupportedMediaType(NudgesError):
    status = 415
    code = "not-supported"


class PreconditionFailed(NudgesError):
    """412: data the service needs is in neither prefetch nor the FHIR server (CDS Hooks 2.0)."""

    status = 412
    code = "incomplete"


class FhirServerError(PreconditionFailed):
    """The FHIR server could not supply data (unreachable, slow, refused, forbidden by policy)."""

    def __init__(self, diagnostics: str, *, upstream_status: int | None = None) -> None:
        super().__init__(diagnostics)
        self.upstream_status = upstream_status  # what the FHIR server answered, when it answered


class DeliveryError(NudgesError):
    """A push (FHIR write, webhook) failed; `retry` says whether trying again can help (a 5xx or a
    timeout can, a 4xx other than 408/429 cannot)."""

    status = 502
    code = "transient"

    def __init__(self, diagnostics: str, *, retry: bool = True, upstream_status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(diagnostics)
        self.retry = retry
        self.upstream_status = upstream_status
        self.retry_after = retry_after  # seconds the receiver asked us to wait (Retry-After)


class Unavailable(NudgesError):
    """503: the service cannot answer now but will again (the database is out of reach). Answered at once
    rather than after a long wait: an EHR that waits for its CDS services holds the chart open meanwhile."""

    status = 503
    code = "transient"


class ConfigError(NudgesError):
    """Startup configuration is unsafe or inconsistent; the process must not start."""
