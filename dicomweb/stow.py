"""STOW-RS (PS3.18 10.5): store instances sent as ``multipart/related; type="application/dicom"``.

The body is read as a stream: each part is handed to the archive's ingest (the same one C-STORE
uses) as soon as it is complete, a few parts at a time in worker threads, so an upload of any
size is stored with memory bounded by the parts in flight. Each part succeeds or fails alone;
the response (PS3.18 10.5.3) lists what was stored (ReferencedSOPSequence, with RetrieveURL and,
for an instance stored with a warning, WarningReason) and what failed (FailedSOPSequence, with a
FailureReason from the archive's error kind). 200 means every part sent was read and stored
without warning; 202 that some were stored, and others failed, were not read, or were stored
with a warning; 409 that none was stored.

The audit (DICOM PS3.15 A.5.3.4 "DICOM Instances Transferred", action C): one event per study
per request, written in the index transaction of the request's first instance of that study
(``archive.ingest``'s ``audit``), so the instances and their record commit together. The
request's own event (the application's audit middleware) is then not written a second time:
the handler marks the request recorded. A request that stored nothing is left to the
middleware (its refusal, with the HTTP status); parts that failed beside stored ones add one
minor-failure event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from archive import Archive, IngestError, IngestErrorKind
from archive.audit import MINOR_FAILURE, AuditEvent, StudyEvents
from archive.dicom import NOT_PART10, identify, looks_like_part10
from dicomweb.common import (
    archive_of,
    base_url,
    dicom_json_response,
    fail,
    instance_url,
    json_body,
    settings_of,
    study_url,
    warning_value,
)
from dicomweb.media import DICOM, MULTIPART, accepts_json, parse_media_type
from dicomweb.multipart import MultipartError, MultipartReader, Part, boundary_error

log = logging.getLogger(__name__)
router = APIRouter()

#: Parts ingested at the same time (each in a worker thread).
PARTS_IN_FLIGHT = 4

# PS3.18 I.2.2 (Table I.2-2) / PS3.4 B.2.3 failure reasons; PS3.7 Annex C general statuses.
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
REFUSED_SOP_CLASS = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: WarningReason of an instance stored as sent although it does not quite match its SOP Class
#: (PS3.4 B.2.3 "Data Set does not match SOP Class", PS3.18 Table I.2-1).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
FAILURE_REASONS = {
    IngestErrorKind.CANNOT_UNDERSTAND: CANNOT_UNDERSTAND,
    IngestErrorKind.UNSUPPORTED_TRANSFER_SYNTAX: TRANSFER_SYNTAX_NOT_SUPPORTED,
    IngestErrorKind.DATASET_MISMATCH: DATASET_MISMATCH,
    IngestErrorKind.CONFLICT: DUPLICATE_SOP_INSTANCE,
    IngestErrorKind.REFUSED: REFUSED_SOP_CLASS,
    IngestErrorKind.OUT_OF_RESOURCES: OUT_OF_RESOURCES,
}


@dataclass(frozen=True, slots=True)
class PartOutcome:
    index: int
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    failure: int | None = None
    reason: str = ""
    warning: str = ""
    """Stored, with this warning (WarningReason 0xB007)."""


def with_preamble(data: bytes) -> bytes:
    """A part that starts with its File Meta Information but lacks the 128-byte preamble and
    ``DICM`` prefix (what ``pydicom.dcmwrite`` writes for a data set built in memory, and so
    what dicomweb-client sends for one) gets them; nothing else is changed."""
    if data[128:132] == b"DICM" or data[:2] != b"\x02\x00":
        return data
    return b"\x00" * 128 + b"DICM" + data


AUDIT_NOTE = "pacsbridge.audit"
"""Scope key of the request's audit note (left by the application's audit middleware)."""


class StowAudit(StudyEvents):
    """The audit events of one STOW-RS request: the first instance of each study carries its
    study's event into its ingest transaction."""

    def __init__(self, request: Request) -> None:
        principal = request.scope.get("pacsbridge.principal")
        subject = getattr(principal, "subject", None)
        client = request.scope.get("client")
        self.agent = str(subject) if subject else "anonymous"
        self.address = str(client[0]) if client else None
        self.entity = request.url.path
        super().__init__(self.event)

    def event(
        self, study_uid: str, patient_id: str | None = None, outcome: int = 0, text: str = ""
    ) -> AuditEvent:
        return AuditEvent(
            action="C",
            type_code="110104",
            agent=self.agent,
            agent_address=self.address,
            source="dicomweb",
            outcome=outcome,
            outcome_text=text or None,
            study_uid=study_uid or None,
            patient_id=patient_id or None,
            entity=self.entity,
        )


def _ingest(
    archive: Archive, part: Part, study: str | None, audit: StowAudit | None = None
) -> PartOutcome:
    data = b""
    event, done = audit.for_ingest() if audit is not None else (None, None)
    audited = False
    try:
        if not part.complete:
            raise IngestError(
                IngestErrorKind.CANNOT_UNDERSTAND,
                f"the request body ended inside part {part.index}",
            )
        content_type = part.content_type
        if content_type and parse_media_type(content_type).media_type != DICOM:
            shown = ascii(content_type[:100])[1:-1]
            raise IngestError(
                IngestErrorKind.CANNOT_UNDERSTAND,
                f"part {part.index} is {shown}, not application/dicom",
            )
        # What is not DICOM fails on its first bytes, before the part is read into memory.
        if not looks_like_part10(part.body.head(132)):
            raise IngestError(IngestErrorKind.CANNOT_UNDERSTAND, NOT_PART10)
        data = with_preamble(part.body.getvalue())
        result = archive.ingest(data, expected_study_instance_uid=study, audit=event)
        audited = result.audited
    except IngestError as exc:
        sop_class, sop_instance = (
            (exc.sop_class_uid, exc.sop_instance_uid) if exc.sop_instance_uid else identify(data)
        )
        return PartOutcome(
            part.index,
            sop_class,
            sop_instance,
            failure=FAILURE_REASONS[exc.kind],
            reason=exc.reason,
        )
    except Exception as exc:
        log.exception("STOW-RS part failed", extra={"part": part.index})
        sop_class, sop_instance = identify(data)
        return PartOutcome(
            part.index,
            sop_class,
            sop_instance,
            failure=PROCESSING_FAILURE,
            reason=f"{type(exc).__name__}: {exc}",
        )
    finally:
        part.body.close()
        if done is not None:
            done(audited)
    return PartOutcome(
        part.index,
        result.sop_class_uid,
        result.sop_instance_uid,
        result.study_instance_uid,
        result.series_instance_uid,
        warning=result.warning or "",
    )


def _boundary(request: Request) -> bytes:
    header = request.headers.get("content-type", "")
    content_type = parse_media_type(header) if header else None
    if content_type is None or content_type.media_type != MULTIPART:
        fail(
            415,
            'STOW-RS takes multipart/related; type="application/dicom", '
            f"not {header or 'no Content-Type'}",
        )
    part_type = content_type.params.get("type", DICOM).split(";", 1)[0].strip().lower()
    if part_type != DICOM:
        fail(
            415,
            f"parts of type {part_type} are not supported: send Part-10 instances as "
            'multipart/related; type="application/dicom"',
        )
    boundary = content_type.params.get("boundary", "")
    if not boundary:
        fail(400, "the multipart/related Content-Type has no boundary parameter")
    raw = boundary.encode("latin-1", "replace")
    error = boundary_error(raw)
    if error:
        fail(400, error)
    return raw


async def _store(request: Request, study: str | None) -> Response:
    if not accepts_json(request.headers.get("accept")):
        fail(406, "the STOW-RS response is available as application/dicom+json only")
    boundary = _boundary(request)
    archive = archive_of(request)
    max_parts = settings_of(request).stow_max_parts
    reader = MultipartReader(boundary)
    audit = StowAudit(request)
    pending: list[asyncio.Task[PartOutcome]] = []
    outcomes: list[PartOutcome] = []

    async def submit(part: Part) -> None:
        if part.index > max_parts:
            part.body.close()
            return
        pending.append(asyncio.create_task(run_in_threadpool(_ingest, archive, part, study, audit)))
        while len(pending) >= PARTS_IN_FLIGHT:
            outcomes.append(await pending.pop(0))

    notes: list[str] = []
    # The part at which reading stopped before the body's end: it and the rest are not stored.
    stopped: PartOutcome | None = None
    gone = False
    try:
        async for chunk in request.stream():
            for part in reader.feed(chunk):
                await submit(part)
            if reader.finished or reader.parts_seen > max_parts:
                break
    except MultipartError as exc:
        # The parts before the error are stored; reading stops there.
        for part in exc.parts:
            await submit(part)
        note = f"the body is not valid multipart/related: {exc}"
        notes.append(note)
        stopped = PartOutcome(exc.part_index, "", "", failure=CANNOT_UNDERSTAND, reason=note)
    except ClientDisconnect:
        gone = True
        log.warning("STOW-RS client went away", extra={"parts": reader.parts_seen})
    cut = reader.close()
    if cut is not None:
        await submit(cut)
    for task in pending:
        outcomes.append(await task)
    if reader.parts_seen > max_parts:
        note = (
            f"the body holds more than {max_parts} parts: those after part {max_parts} were "
            "not read (stow_max_parts)"
        )
        notes.append(note)
        stopped = PartOutcome(max_parts + 1, "", "", failure=CANNOT_UNDERSTAND, reason=note)
    elif not notes and not gone and not reader.finished:
        notes.append(
            "the body has no closing boundary delimiter (RFC 2046 5.1.1)"
            if reader.parts_seen
            else "the body holds no part: the boundary of the Content-Type never appears"
        )
    if not outcomes:
        fail(400, notes[0] if notes else "the body holds no parts")
    if stopped is not None:
        # Not stored, and not silently: a failure with no UIDs (none were read).
        outcomes.append(stopped)
    _audit_rest(request, archive, audit, outcomes)
    return _response(request, study, outcomes, notes)


def _audit_rest(
    request: Request, archive: Archive, audit: StowAudit, outcomes: list[PartOutcome]
) -> None:
    """What the ingest transactions did not record: a stored study whose event was not
    committed with an instance (only copies of held instances came, or a part that carried it
    failed while another part of the study was stored), and the failed parts of a request
    that stored something. Then the request is marked recorded for the middleware."""
    stored = {o.study_instance_uid for o in outcomes if o.failure is None}
    if not stored:
        return  # the middleware records the refused request
    for study_uid in audit.unrecorded(stored):
        archive.audit.submit(audit.event(study_uid))
    failed = [o for o in outcomes if o.failure is not None]
    if failed:
        archive.audit.submit(
            audit.event(
                failed[0].study_instance_uid,
                outcome=MINOR_FAILURE,
                text=f"{len(failed)} of {len(outcomes)} parts not stored",
            )
        )
    note = request.scope.get(AUDIT_NOTE)
    if isinstance(note, dict):
        note["recorded"] = True


def _response(
    request: Request, study: str | None, outcomes: list[PartOutcome], notes: list[str]
) -> Response:
    base = base_url(request)
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    body: dict[str, Any] = {}
    studies = {o.study_instance_uid for o in stored}
    target = study or (next(iter(studies)) if len(studies) == 1 else None)
    note = request.scope.get("pacsbridge.audit")  # the request's audit event (pacsbridge)
    if isinstance(note, dict) and target:
        note["study_uid"] = target
    if target:
        body["00081190"] = {"vr": "UR", "Value": [study_url(base, target)]}
    body["00081198"] = {"vr": "SQ"}
    if failed:
        body["00081198"]["Value"] = [
            {
                "00081150": _uid(o.sop_class_uid),
                "00081155": _uid(o.sop_instance_uid),
                "00081197": {"vr": "US", "Value": [o.failure]},
            }
            for o in failed
        ]
    body["00081199"] = {"vr": "SQ"}
    if stored:
        body["00081199"]["Value"] = [_referenced(base, o) for o in stored]
    warned = [o for o in stored if o.warning]
    # PS3.18 10.5.3: 200 only when every instance was stored without warning.
    status = 200 if not failed and not warned else (202 if stored else 409)
    headers = None
    messages = notes + [
        f"part {o.index}: 0x{o.failure:04X} {o.reason}"
        for o in failed[:20]
        if o.reason not in notes
    ]
    messages += [
        f"part {o.index}: 0x{DATASET_DOES_NOT_MATCH_SOP_CLASS:04X} {o.warning}" for o in warned[:20]
    ]
    if messages:
        headers = {"Warning": warning_value(messages)}
    if failed:
        log.warning(
            "STOW-RS parts failed",
            extra={"failed": len(failed), "stored": len(stored), "first": messages[0]},
        )
    return dicom_json_response(request, json_body(body), status_code=status, headers=headers)


def _referenced(base: str, o: PartOutcome) -> dict[str, Any]:
    """A ReferencedSOPSequence item (PS3.18 Table I.2-2): the instance, its RetrieveURL, and
    its WarningReason when it was stored with a warning."""
    item: dict[str, Any] = {
        "00081150": _uid(o.sop_class_uid),
        "00081155": _uid(o.sop_instance_uid),
        "00081190": {
            "vr": "UR",
            "Value": [
                instance_url(base, o.study_instance_uid, o.series_instance_uid, o.sop_instance_uid)
            ],
        },
    }
    if o.warning:
        item["00081196"] = {"vr": "US", "Value": [DATASET_DOES_NOT_MATCH_SOP_CLASS]}
    return item


def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


_STOW_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": 'Part-10 instances as multipart/related; type="application/dicom".',
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }
}
_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Every instance was stored, without warning. DICOM JSON with "
        "ReferencedSOPSequence (each with its RetrieveURL).",
        "content": {"application/dicom+json": {"schema": {"type": "object"}}},
    },
    202: {
        "description": "Some instances were stored; others failed or were not read "
        "(FailedSOPSequence), or were stored with a warning (WarningReason)."
    },
    400: {"description": "The body is not multipart/related, or holds no parts."},
    406: {"description": "The client does not accept application/dicom+json."},
    409: {"description": "No instance could be stored (FailedSOPSequence says why)."},
    415: {"description": "The Content-Type is not multipart/related; type=application/dicom."},
}


@router.post(
    "/studies",
    summary="Store instances (STOW-RS)",
    response_class=Response,
    openapi_extra=_STOW_OPENAPI,
    responses=_STOW_RESPONSES,
)
async def store_instances(request: Request) -> Response:
    return await _store(request, None)


@router.post(
    "/studies/{study}",
    summary="Store instances of one study (STOW-RS)",
    description="Instances whose Study Instance UID differs from the URL's fail with 0xA900.",
    response_class=Response,
    openapi_extra=_STOW_OPENAPI,
    responses=_STOW_RESPONSES,
)
async def store_study_instances(request: Request, study: str) -> Response:
    return await _store(request, study)
