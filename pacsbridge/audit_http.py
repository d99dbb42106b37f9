"""The audit of every HTTP request that touches PHI (DICOMweb, FHIR, the administrative API), as
an ASGI middleware around the bearer-token middleware: it sees who the token spoke for
(``pacsbridge.principal``, left in the scope by ``security.http.AuthMiddleware``), the status
of the answer, refusals (401, 403) included, and the direct GET paths of DICOMweb and FHIR
(``dicomweb/direct.py`` runs the application's middleware stack).

One event per request, queued for the archive's background writer (``AuditLog.submit``): the
request itself waits for no audit write. The events follow DICOM PS3.15 A.5.3:

- QIDO-RS and FHIR searches: Query (110112), action E, the query string kept;
- WADO-RS instances, frames, bulk data: DICOM Instances Transferred (110104), action R;
  metadata, rendered and thumbnail: DICOM Instances Accessed (110103), action R;
- STOW-RS: DICOM Instances Transferred (110104), action C;
- FHIR reads and writes: Patient Record (110110), action R / C / U / D, operations E; FHIR
  AuditEvent itself: Audit Log Used (110101);
- the administrative API: peers are Security Alert / Network Configuration (110113 / 110128)
  when changed, everything else Application Activity (110100).

A change (STOW-RS, a FHIR create, update or operation) is recorded by its handler inside the
change's own transaction (issue 15 item 5), as the one event of the request: the handler sets
``recorded`` in the scope's note and this middleware writes nothing more. One event per change
is the shape both standards describe: DICOM PS3.15 A.5.3 defines the event by what happened to
the PHI (instances transferred, a patient record created), not by the transport that carried
it, and a FHIR AuditEvent records one ``action`` on its ``entity`` per interaction (FHIR R4
AuditEvent 6.4.1; the RESTful create is the event); a second "request" event would count each
write twice. A change that fails (a refusal, an error, a rollback) records nothing in its
transaction: the middleware then records the request with its HTTP outcome.

The token endpoint is audited where the login is decided (``pacsbridge.auth_api``); discovery
documents, liveness and metrics carry no PHI and are not audited.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from archive.audit import AuditEvent, AuditLog, outcome_of_status
from security.roles import PUBLIC_PATHS

log = logging.getLogger(__name__)

NOTE = "pacsbridge.audit"
"""Scope key of a dict where an endpoint may name the patient and study it served
(``patient_row``: the index row id of a FHIR Patient, ``patient_id``, ``study_uid``), give
the parameters of a search that came in the body (``search``: FHIR ``POST _search``), or say
that its change's event was committed with the change (``recorded``: True)."""

_UID = r"[0-9.]+"
_DICOMWEB_STUDY = re.compile(rf"^/dicom-web/studies/({_UID})(?:/|$)")
_QIDO_END = frozenset({"studies", "series", "instances"})
_ACCESSED = frozenset({"metadata", "rendered", "thumbnail"})
_FHIR = re.compile(r"^/fhir/([A-Za-z]+)(?:/([^/]+))?(?:/(.*))?$")
_FHIR_ACTIONS = {"POST": "C", "PUT": "U", "PATCH": "U", "DELETE": "D"}
_SECRET_PARAMS = frozenset(
    {"access_token", "token", "password", "client_secret", "client_assertion", "refresh_token"}
)


def _query(raw: bytes) -> str | None:
    """The query string as it was sent, less any parameter that could carry a secret."""
    if not raw:
        return None
    items = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    if any(name.lower() in _SECRET_PARAMS for name, _ in items):
        kept = [(n, v) for n, v in items if n.lower() not in _SECRET_PARAMS]
        return "&".join(f"{n}={v}" for n, v in kept) or None
    return unquote(raw.decode("latin-1"))


def classify(method: str, path: str, raw_query: bytes) -> AuditEvent | None:
    """The event of a request (agent, outcome and address still to be filled in); None for a
    request that touches no PHI."""
    if path in PUBLIC_PATHS or method == "OPTIONS":
        return None
    if path == "/dicom-web" or path.startswith("/dicom-web/"):
        return _dicomweb(method, path, raw_query)
    if path.startswith("/fhir/"):
        return _fhir(method, path, raw_query)
    if path.startswith("/api/"):
        area = path.split("/")[2] if path.count("/") >= 2 else ""
        changes = method not in ("GET", "HEAD")
        if area == "peers" and changes:
            type_code, subtype = "110113", "110128"
        else:
            type_code, subtype = "110100", None
        return AuditEvent(
            action="E",  # PS3.15 A.5.3.1 Application Activity, A.5.3.11 Security Alert: E only
            type_code=type_code,
            subtype_code=subtype,
            agent="anonymous",
            source="admin",
            entity=path,
            query=_query(raw_query),
        )
    return None


def _dicomweb(method: str, path: str, raw_query: bytes) -> AuditEvent:
    found = _DICOMWEB_STUDY.match(path)
    study = found.group(1) if found else None
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if method == "POST":
        action, type_code = "C", "110104"  # STOW-RS: instances transferred to us
    elif method == "DELETE":
        action, type_code = "D", "110105"
    elif last in _QIDO_END:
        query = _query(raw_query)
        params = dict(parse_qsl(raw_query.decode("latin-1")))
        patient = params.get("PatientID") or params.get("00100020")
        return AuditEvent(
            action="E",
            type_code="110112",
            agent="anonymous",
            source="dicomweb",
            study_uid=study,
            patient_id=patient if patient and not {"*", "?"} & set(patient) else None,
            entity=path,
            query=query,
        )
    elif _ACCESSED & set(path.split("/")):
        action, type_code = "R", "110103"
    else:
        action, type_code = "R", "110104"
    return AuditEvent(
        action=action,
        type_code=type_code,
        agent="anonymous",
        source="dicomweb",
        study_uid=study,
        entity=path,
    )


def _fhir(method: str, path: str, raw_query: bytes) -> AuditEvent | None:
    found = _FHIR.match(path)
    if found is None:
        return None
    kind, resource_id, rest = found.groups()
    type_code = "110101" if kind == "AuditEvent" else "110110"
    search = (method == "GET" and resource_id is None) or resource_id == "_search"
    patient_row = None
    if search:
        action, type_code = "E", "110112" if type_code == "110110" else type_code
        if type_code == "110101":
            action = "R"  # PS3.15 A.5.3.2 Audit Log Used: R
        patient_row = _search_patient(kind, parse_qsl(raw_query.decode("latin-1")))
        entity = kind
    else:
        if (rest and rest.startswith("$")) or (resource_id or "").startswith("$"):
            # PS3.15 A.5.3.9 Patient Record takes C, R, U or D: an operation that changes
            # nothing reads (a change is recorded by its handler, fhir_bridge/change_audit.py).
            action = "R"
        elif method in ("GET", "HEAD"):
            action = "R"
        else:
            action = _FHIR_ACTIONS.get(method, "E")
        entity = f"{kind}/{resource_id}" if resource_id and resource_id != "_history" else kind
        if kind == "Patient" and resource_id:
            patient_row = _patient_row(resource_id)
    event = AuditEvent(
        action=action,
        type_code=type_code,
        agent="anonymous",
        source="fhir",
        entity=entity,
        query=_query(raw_query) if search else None,
        study_uid=resource_id if kind == "ImagingStudy" and resource_id and not search else None,
        patient_row=patient_row,
    )
    return event


def _search_patient(kind: str, items: list[tuple[str, str]]) -> int | None:
    """The Patient a FHIR search is limited to (``patient`` / ``subject``), if one is named."""
    found = None
    for name, value in items:
        if name in ("patient", "subject") and kind != "AuditEvent":
            found = _patient_row(value)
    return found


def _patient_row(value: str) -> int | None:
    value = value.rsplit("Patient/", 1)[-1]
    # ASCII digits only: str.isdigit() also holds for "²" and other digits int() refuses.
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


class AuditMiddleware:
    def __init__(self, app: ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            event = classify(scope["method"], scope["path"], scope.get("query_string", b""))
        except Exception:  # never fail a request over its audit: record it plainly
            log.exception("request not classified for the audit", extra={"path": scope["path"]})
            event = AuditEvent(
                action="E",
                type_code="110100",
                agent="anonymous",
                source="admin",
                entity=scope["path"],
            )
        if event is None:
            await self.app(scope, receive, send)
            return
        note: dict[str, Any] = {}
        scope[NOTE] = note
        status = 500  # an exception that escapes the application is answered 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            # A change whose event is in the change's transaction: nothing more to write.
            if not (note.get("recorded") and status < 400):
                if self.audit.full():  # it is written now: off the event loop
                    await run_in_threadpool(self._finish, scope, event, note, status)
                else:
                    self._finish(scope, event, note, status)

    def _finish(self, scope: Scope, event: AuditEvent, note: dict[str, Any], status: int) -> None:
        principal = scope.get("pacsbridge.principal")
        subject = getattr(principal, "subject", None)
        if subject:
            event.agent = str(subject)
        client = scope.get("client")
        if client:
            event.agent_address = str(client[0])
        event.outcome = outcome_of_status(status)
        if status >= 400:
            event.outcome_text = f"HTTP {status}"
        searched = note.get("search")
        if searched is not None and event.entity:  # POST _search: the body's parameters too
            event.query = _query(urlencode(searched, quote_via=quote).encode("ascii"))
            event.patient_row = _search_patient(event.entity, searched) or event.patient_row
        event.patient_id = note.get("patient_id") or event.patient_id
        event.study_uid = note.get("study_uid") or event.study_uid
        event.patient_row = note.get("patient_row") or event.patient_row
        self.audit.submit(event)
