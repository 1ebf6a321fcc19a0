"""One exception hierarchy for the service; `to_response` is the only place errors become HTTP.

Every non-2xx answer carries a FHIR OperationOutcome (CDS Hooks 3.0 recommendation), and the
diagnostics never include tokens, request bodies or patient identifiers.
"""

from __future__ import annotations

from typing import Any


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


class NotFound(NudgesError):
    status = 404
    code = "not-found"


class PayloadTooLarge(NudgesError):
    status = 413
    code = "too-long"


class PreconditionFailed(NudgesError):
    """412: data the service needs is in neither prefetch nor the FHIR server (CDS Hooks 2.0)."""

    status = 412
    code = "incomplete"


class FhirServerError(PreconditionFailed):
    """The FHIR server could not supply data (unreachable, slow, refused, forbidden by policy)."""

    def __init__(self, diagnostics: str, *, upstream_status: int | None = None) -> None:
        super().__init__(diagnostics)
        self.upstream_status = upstream_status  # what the FHIR server answered, when it answered


class RuleError(NudgesError):
    """A rule file or rule set is invalid; carries lint problems with positions."""

    status = 500
    code = "invalid"

    def __init__(self, problems: list[Any]) -> None:
        super().__init__(f"{len(problems)} rule problem(s)")
        self.problems = problems


class ConfigError(NudgesError):
    """Startup configuration is unsafe or inconsistent; the process must not start."""


def operation_outcome(diagnostics: str, *, code: str = "exception", severity: str = "error",
                      expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}
