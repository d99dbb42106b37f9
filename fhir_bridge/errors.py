"""OperationOutcome (FHIR R4 3.1.0.4 "OperationOutcome"): every error of the bridge is one.

One place maps an error to its HTTP status and ``issue.code`` (the IssueType value set,
http://hl7.org/fhir/R4/valueset-issue-type.html).
"""

from __future__ import annotations

from typing import Any

# The issue code an HTTP status means when the raiser names none (FHIR R4 http.html#2.21.0.6).
_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    415: "not-supported",
    422: "processing",
    500: "exception",
}


class FHIRError(Exception):
    """An error answered as an OperationOutcome with ``status``."""

    def __init__(
        self,
        status: int,
        diagnostics: str,
        *,
        code: str | None = None,
        expression: list[str] | None = None,
        headers: dict[str, str] | None = None,
        issues: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = code or _CODES.get(status, "processing")
        self.expression = expression
        self.headers = headers or {}
        self.extra_issues = issues or []

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(
            [issue("error", self.code, self.diagnostics, self.expression), *self.extra_issues]
        )


def issue(
    severity: str, code: str, diagnostics: str, expression: list[str] | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        item["expression"] = expression
    return item


def operation_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": issues}


def code_for_status(status: int) -> str:
    return _CODES.get(status, "processing" if status < 500 else "exception")


def not_found(resource_type: str, resource_id: str) -> FHIRError:
    return FHIRError(404, f"{resource_type}/{resource_id} is not known", expression=[resource_type])


def gone(resource_type: str, resource_id: str) -> FHIRError:
    return FHIRError(410, f"{resource_type}/{resource_id} was deleted", expression=[resource_type])


def validation_issues(errors: list[dict[str, Any]], resource_type: str) -> list[dict[str, Any]]:
    """Issues for pydantic validation errors of a resource body, each with its FHIRPath."""
    issues = []
    for error in errors[:50]:
        path = resource_type
        for part in error.get("loc", ()):
            if part == "__root__":
                continue
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        issues.append(issue("error", "structure", str(error.get("msg", "invalid")), [path]))
    return issues
