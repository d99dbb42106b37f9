"""Roles and what each may do over HTTP (the README's table is this one).

A request falls in an **area** by its path and is a **read** (GET, HEAD, a FHIR ``_search`` or
an operation that changes nothing, such as ``$apply``) or a **write**. A role is a set of
(area, action) pairs; ``admin`` may do everything. Paths outside every area (a future route)
are ``admin``'s only, so that a new route is never open by accident; so is ``/metrics``
(Prometheus: the server's activity, which no other role needs), unless authentication is off or
the ``metrics_loopback_without_auth`` setting lets a client on the same host read it.
"""

from __future__ import annotations

import re

READ, WRITE = "read", "write"

PUBLIC_PATHS = frozenset(
    {
        "/health",
        "/ready",
        "/auth/token",
        "/auth/jwks",
        "/.well-known/smart-configuration",
        "/.well-known/jwks.json",
        "/fhir/metadata",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)
"""Discovery, the token endpoint and liveness: no token needed (and no PHI)."""

BILLING_TYPES = frozenset(
    {"ChargeItemDefinition", "ChargeItem", "Account", "Invoice", "PaymentReconciliation"}
)

AREAS = ("dicomweb", "fhir-clinical", "fhir-billing", "ai", "jobs", "peers")

ROLES: dict[str, frozenset[tuple[str, str]]] = {
    "admin": frozenset((area, action) for area in AREAS for action in (READ, WRITE)),
    # Reads and reports: images, FHIR clinical resources (a report written back), AI runs.
    "radiologist": frozenset(
        {
            ("dicomweb", READ),
            ("dicomweb", WRITE),
            ("fhir-clinical", READ),
            ("fhir-clinical", WRITE),
            ("ai", READ),
            ("ai", WRITE),
        }
    ),
    # Looks at images, reports and AI findings.
    "clinician": frozenset({("dicomweb", READ), ("fhir-clinical", READ), ("ai", READ)}),
    # The billing office: billing resources, and the clinical resources they point at.
    "billing": frozenset(
        {("fhir-billing", READ), ("fhir-billing", WRITE), ("fhir-clinical", READ)}
    ),
    # A modality or gateway: stores images (STOW-RS), reads nothing.
    "modality": frozenset({("dicomweb", WRITE)}),
    # A system integration (an EHR, a RIS): images and clinical resources, read and written.
    "service": frozenset(
        {
            ("dicomweb", READ),
            ("dicomweb", WRITE),
            ("fhir-clinical", READ),
            ("fhir-clinical", WRITE),
            ("fhir-billing", READ),
        }
    ),
}

_FHIR_TYPE = re.compile(r"^/fhir/([A-Za-z]+)(?:/|$)")


def area_of(path: str) -> str | None:
    """The area of a path; None outside every area (admin only)."""
    if path == "/dicom-web" or path.startswith("/dicom-web/"):
        return "dicomweb"
    if path.startswith("/fhir/"):
        found = _FHIR_TYPE.match(path)
        if found and found.group(1) in ("AuditEvent", "Subscription"):
            return None  # the audit trail, and where the server sends events: admin only
        if found and found.group(1) in BILLING_TYPES:
            return "fhir-billing"
        return "fhir-clinical"
    for area, prefix in (("ai", "/api/ai"), ("jobs", "/api/jobs"), ("peers", "/api/peers")):
        if path == prefix or path.startswith(prefix + "/"):
            return area
    return None


def action_of(method: str, path: str) -> str:
    if method in ("GET", "HEAD", "OPTIONS"):
        return READ
    if method == "POST" and (path.endswith("/_search") or "/$" in path):
        return READ  # a FHIR search by POST, or an operation that changes nothing
    return WRITE


def allowed(role: str, method: str, path: str) -> bool:
    if role == "admin":
        return True
    area = area_of(path)
    if area is None:
        return False
    return (area, action_of(method, path)) in ROLES.get(role, frozenset())
