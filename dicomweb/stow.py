"""STOW-RS (PS3.18 10.5): store instances sent as ``multipart/related; type="application/dicom"``.

The body is read as a stream: each part is handed to the archive's ingest (the same one C-STORE
uses) as soon as it is complete, a few parts at a time in worker threads, so an upload of any
size is stored with memory bounded by the parts in flight. Each part succeeds or fails alone;
the response (PS3.18 10.5.3) lists what was stored (ReferencedSOPSequence, with RetrieveURL) and
what failed (FailedSOPSequence, with a FailureReason from the archive's error kind).
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from typing import Any

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from archive import Archive, IngestError, IngestErrorKind
from dicomweb.common import (
    archive_of,
    base_url,
    dicom_json_response,
    fail,
    instance_url,
    json_body,
    study_url,
    warning_value,
)
from dicomweb.media import DICOM, MULTIPART, accepts_json, parse_media_type
from dicomweb.multipart import MultipartError, MultipartReader, Part

log = logging.getLogger(__name__)
router = APIRouter()

#: Parts ingested at the same time (each in a worker thread).
PARTS_IN_FLIGHT = 4

# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 failure reasons.
PROCESSING_FAILURE = 0x0110
REFUSED_SOP_CLASS = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
FAILURE_REASONS = {
    IngestErrorKind.CANNOT_UNDERSTAND: CANNOT_UNDERSTAND,
    IngestErrorKind.DATASET_MISMATCH: DATASET_MISMATCH,
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


def _identify(data: bytes) -> tuple[str, str]:
    """Best-effort SOP Class and Instance UIDs of a part that could not be stored."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
            force=True,
        )
        return str(ds.get("SOPClassUID", "")).strip(), str(ds.get("SOPInstanceUID", "")).strip()
    except Exception:
        return "", ""


def with_preamble(data: bytes) -> bytes:
    """A part that starts with its File Meta Information but lacks the 128-byte preamble and
    ``DICM`` prefix (what ``pydicom.dcmwrite`` writes for a data set built in memory, and so
    what dicomweb-client sends for one) gets them; nothing else is changed."""
    if data[128:132] == b"DICM" or data[:2] != b"\x02\x00":
        return data
    return b"\x00" * 128 + b"DICM" + data


def _ingest(archive: Archive, part: Part, study: str | None) -> PartOutcome:
    data = part.body.getvalue()
    part.body.close()
    try:
        if not part.complete:
            raise IngestError(
                IngestErrorKind.CANNOT_UNDERSTAND,
                f"the request body ended inside part {part.index}",
            )
        content_type = part.content_type
        if content_type and parse_media_type(content_type).media_type != DICOM:
            raise IngestError(
                IngestErrorKind.CANNOT_UNDERSTAND,
                f"part {part.index} is {content_type}, not application/dicom",
            )
        data = with_preamble(data)
        result = archive.ingest(data, expected_study_instance_uid=study)
    except IngestError as exc:
        sop_class, sop_instance = _identify(data)
        return PartOutcome(
            part.index,
            sop_class,
            sop_instance,
            failure=FAILURE_REASONS[exc.kind],
            reason=exc.reason,
        )
    except Exception as exc:
        log.exception("STOW-RS part failed", extra={"part": part.index})
        sop_class, sop_instance = _identify(data)
        return PartOutcome(
            part.index,
            sop_class,
            sop_instance,
            failure=PROCESSING_FAILURE,
            reason=f"{type(exc).__name__}: {exc}",
        )
    return PartOutcome(
        part.index,
        result.sop_class_uid,
        result.sop_instance_uid,
        result.study_instance_uid,
        result.series_instance_uid,
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
    return boundary.encode("latin-1")


async def _store(request: Request, study: str | None) -> Response:
    if not accepts_json(request.headers.get("accept")):
        fail(406, "the STOW-RS response is available as application/dicom+json only")
    boundary = _boundary(request)
    archive = archive_of(request)
    reader = MultipartReader(boundary)
    pending: list[asyncio.Task[PartOutcome]] = []
    outcomes: list[PartOutcome] = []

    async def submit(part: Part) -> None:
        pending.append(asyncio.create_task(run_in_threadpool(_ingest, archive, part, study)))
        while len(pending) >= PARTS_IN_FLIGHT:
            outcomes.append(await pending.pop(0))

    malformed = ""
    try:
        async for chunk in request.stream():
            for part in reader.feed(chunk):
                await submit(part)
            if reader.finished:
                break
    except MultipartError as exc:
        # What came before is stored; the part being read fails as cut short.
        malformed = f"the body is not valid multipart/related: {exc}"
    except ClientDisconnect:
        log.warning("STOW-RS client went away", extra={"parts": reader.parts_seen})
    cut = reader.close()
    if cut is not None:
        await submit(cut)
    for task in pending:
        outcomes.append(await task)
    if not outcomes:
        fail(400, malformed or "the body holds no parts")
    return _response(request, study, outcomes, [malformed] if malformed else [])


def _response(
    request: Request, study: str | None, outcomes: list[PartOutcome], notes: list[str]
) -> Response:
    base = base_url(request)
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    body: dict[str, Any] = {}
    studies = {o.study_instance_uid for o in stored}
    target = study or (next(iter(studies)) if len(studies) == 1 else None)
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
        body["00081199"]["Value"] = [
            {
                "00081150": _uid(o.sop_class_uid),
                "00081155": _uid(o.sop_instance_uid),
                "00081190": {
                    "vr": "UR",
                    "Value": [
                        instance_url(
                            base, o.study_instance_uid, o.series_instance_uid, o.sop_instance_uid
                        )
                    ],
                },
            }
            for o in stored
        ]
    status = 200 if not failed else (202 if stored else 409)
    headers = None
    messages = notes + [f"part {o.index}: 0x{o.failure:04X} {o.reason}" for o in failed[:20]]
    if messages:
        headers = {"Warning": warning_value(messages)}
    if failed:
        log.warning(
            "STOW-RS parts failed",
            extra={"failed": len(failed), "stored": len(stored), "first": messages[0]},
        )
    return dicom_json_response(request, json_body(body), status_code=status, headers=headers)


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
        "description": "Every instance was stored. DICOM JSON with ReferencedSOPSequence "
        "(each with its RetrieveURL).",
        "content": {"application/dicom+json": {"schema": {"type": "object"}}},
    },
    202: {"description": "Some instances were stored, some failed (FailedSOPSequence)."},
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
