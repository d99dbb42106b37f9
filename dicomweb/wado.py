"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data.

- Instances stream from the blob store as ``multipart/related; type="application/dicom"``, one
  part per instance, never a whole study in memory. They go out byte for byte when the client
  accepts the stored transfer syntax (``transfer-syntax=*``, or the stored UID); otherwise they
  are converted to Explicit VR Little Endian, the default when no transfer syntax is asked
  (PS3.18 Table 8.7.3-5).
- Metadata is the DICOM JSON stored at ingest, streamed from one SQL query, with absolute
  BulkDataURIs; it carries an entity tag (``If-None-Match`` → 304).
- Frames and bulk data are cut from the stored file; compressed frames are decoded when the
  client asks for ``application/octet-stream`` and sent as stored when it accepts their media
  type (``image/jpeg``, ``image/jls``, ``image/jp2``, ``image/jphc``, ``image/dicom-rle``…).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import mmap
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from archive import Archive, BlobNotFound
from archive.frames import can_decode, frame_bytes
from archive.instance_io import (
    FrameOutOfRange,
    NoSuchElement,
    PixelLayout,
    StoredFileError,
    StoredInstance,
    check_frames,
    element_value,
    inflate_limit,
    native_frame,
    open_instance,
    pixel_layout,
    uncompressed_range,
)
from archive.transcode import can_convert, to_uncompressed
from archive.wado import (
    NotFound,
    find_stored,
    iter_metadata,
    metadata_version,
)
from dicomweb.common import (
    ERROR_RESPONSES,
    archive_of,
    base_url,
    dicom_json_response,
    etag_matches,
    fail,
    instance_url,
)
from dicomweb.media import (
    ANY_TRANSFER_SYNTAX,
    DEFAULT_TRANSFER_SYNTAX,
    DICOM,
    NATIVE_TRANSFER_SYNTAXES,
    OCTET_STREAM,
    accepts_json,
    closing,
    multipart_content_type,
    new_boundary,
    parse_accept,
    part_content_type,
    part_header,
    pixel_media_type,
)
from dicomweb.pixels import fail_for_pixel_error, parse_frame_list

log = logging.getLogger(__name__)
router = APIRouter()

CRLF = b"\r\n"
#: Stored files up to this size go out in one piece (one write, no chunking overhead).
WHOLE_FILE_LIMIT = 8 * 2**20
#: Bytes of small instances read in one go by a worker thread while streaming a retrieve.
COALESCE_BYTES = 4 * 2**20
#: Stored files from this size up to WHOLE_FILE_LIMIT are memory-mapped when sent as stored
#: (_read_passthrough); larger ones stream in chunks.
MAP_BYTES = 128 * 2**10
#: Instances per chunk of a metadata response.
METADATA_BATCH = 64
_PIXEL_TAGS = {"7FE00010", "7FE00008", "7FE00009"}


def _lookup(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except NotFound as exc:
        fail(404, exc.message)


# --- retrieve instances ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DicomChoice:
    multipart: bool
    transfer_syntax: str | None
    """The transfer syntax to send; ``None``: each instance as stored."""


def choose_dicom(accept: str | None, stored: set[str], single: bool) -> DicomChoice:
    """The first acceptable representation (PS3.18 8.7.3) that every instance can take."""
    for r in parse_accept(accept):
        if r.multipart:
            if not r.accepts(DICOM):
                continue
            multipart = True
        elif r.media_type == DICOM:
            if not single:
                continue
            multipart = False
        elif r.media_type in ("*/*", "multipart/*"):
            multipart = True
        else:
            continue
        syntax = r.transfer_syntax or DEFAULT_TRANSFER_SYNTAX
        if syntax == ANY_TRANSFER_SYNTAX:
            return DicomChoice(multipart, None)
        convertible = syntax == DEFAULT_TRANSFER_SYNTAX
        if all(s == syntax or (convertible and can_convert(s)) for s in stored):
            return DicomChoice(multipart, syntax)
    fail(
        406,
        "cannot answer with any of the accepted media types: instances are sent as "
        'multipart/related; type="application/dicom" as stored (transfer-syntax=*: '
        f"{', '.join(sorted(stored))}) or in Explicit VR Little Endian "
        f"({DEFAULT_TRANSFER_SYNTAX}, the default)",
    )


def _instance_bytes(archive: Archive, instance: StoredInstance, target: str) -> Iterator[bytes]:
    """The instance as Part-10 bytes in ``target`` (a pass-through when stored so)."""
    if target == instance.transfer_syntax_uid:
        path = archive.blobs.local_path(instance.blob_key)
        if path is not None and instance.size <= WHOLE_FILE_LIMIT:
            yield path.read_bytes()
        else:
            yield from archive.blobs.open(instance.blob_key)
        return
    yield _converted(archive, instance, target)


def _converted(archive: Archive, instance: StoredInstance, target: str) -> bytes:
    """The instance converted to ``target`` (an uncompressed transfer syntax) by the archive's
    one converter."""
    limit = inflate_limit(archive.settings)
    with open_instance(archive.blobs, instance.blob_key, max_inflated=limit) as fh:
        return to_uncompressed(fh, target, max_inflated=limit)


def _converted_first(archive: Archive, instance: StoredInstance, target: str) -> bytes:
    """The first instance of a response converted before the status line goes out, so that an
    instance that cannot be converted is a 4xx and not a broken body."""
    try:
        return _converted(archive, instance, target)
    except (StoredFileError, BlobNotFound) as exc:
        fail_for_pixel_error(exc, instance.sop_instance_uid)


@dataclass(frozen=True, slots=True)
class _Part:
    instance: StoredInstance
    target: str
    header: bytes | None
    """Known ahead for instances sent as stored (their size is in the index)."""
    converted: bytes | None = None
    """Converted ahead (the first part of a response, see :func:`_converted_first`)."""

    @property
    def passthrough(self) -> bool:
        return self.target == self.instance.transfer_syntax_uid


def _plan(
    instances: Sequence[StoredInstance], choice: DicomChoice, boundary: str, base: str
) -> list[_Part]:
    parts = []
    for instance in instances:
        target = choice.transfer_syntax or instance.transfer_syntax_uid
        header = None
        if target == instance.transfer_syntax_uid:
            header = _instance_header(boundary, base, instance, target, instance.size)
        parts.append(_Part(instance, target, header))
    return parts


def _instance_header(
    boundary: str, base: str, instance: StoredInstance, target: str, length: int
) -> bytes:
    location = instance_url(
        base, instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid
    )
    return part_header(boundary, part_content_type(DICOM, target), location=location, length=length)


def _read_group(
    archive: Archive, group: Sequence[_Part], boundary: str, base: str
) -> list[bytes | memoryview]:
    """Header, bytes and CRLF of each instance of a group, as few pieces as possible (read in
    a worker thread: the event loop then makes a few large writes instead of many small ones).
    See :func:`_read_passthrough` for a group sent as stored."""
    if all(part.passthrough for part in group):
        return _read_passthrough(archive, group)
    pieces: list[bytes] = []
    for part in group:
        if part.passthrough:
            assert part.header is not None
            pieces += (part.header, _read_stored(archive, part), CRLF)
        else:
            data = part.converted
            if data is None:
                data = _converted(archive, part.instance, part.target)
            header = _instance_header(boundary, base, part.instance, part.target, len(data))
            pieces += (header, data, CRLF)
    return [b"".join(pieces)]


def _size_mismatch(part: _Part, size: int) -> OSError:
    return OSError(
        f"blob {part.instance.blob_key} holds {size} bytes, the index says {part.instance.size}"
    )


def _read_stored(archive: Archive, part: _Part) -> bytes:
    key = part.instance.blob_key
    path = archive.blobs.local_path(key)
    data = path.read_bytes() if path is not None else archive.blobs.read(key)
    if len(data) != part.instance.size:
        raise _size_mismatch(part, len(data))
    return data


def _read_passthrough(archive: Archive, group: Sequence[_Part]) -> list[bytes | memoryview]:
    """A group sent as stored. With ``wado_mmap`` on, files of at least :data:`MAP_BYTES` in
    the blob store's folder are memory-mapped: the socket write copies them straight from the
    page cache, with no copy into this process first. Everything between them (part headers,
    CRLFs, smaller files, files that cannot be mapped) is read into one buffer per run."""
    pieces: list[bytes | memoryview] = []
    run: list[bytes | _Part] = []
    mapping = archive.settings.wado_mmap
    for part in group:
        assert part.header is not None
        run.append(part.header)
        path = archive.blobs.local_path(part.instance.blob_key) if mapping else None
        mapped = _map(path, part) if path is not None and part.instance.size >= MAP_BYTES else None
        if mapped is not None:
            pieces.append(_gather(archive, run))
            pieces.append(mapped)
            run = []
        else:
            run.append(part)
        run.append(CRLF)
    pieces.append(_gather(archive, run))
    return [piece for piece in pieces if len(piece)]


#: madvise(MADV_POPULATE_READ) (Linux 5.14): read a mapping's pages in now, and report an I/O
#: error as an error instead of a SIGBUS at the first access.
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def _map(path: Path, part: _Part) -> memoryview | None:
    """The file mapped read-only with its pages read in, or None when that cannot be done
    (the caller then reads the file; a file that cannot be read fails there, clearly).

    Blob files are never changed in place (a new version is a new file renamed over the old
    one), so a mapping always sees one whole file. The mapping goes when its last view does."""
    global _POPULATE_READ
    if _POPULATE_READ is None:
        return None
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != part.instance.size:
                return None
            mapped = mmap.mmap(fh.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        try:
            mapped.madvise(_POPULATE_READ)
        except OSError as exc:
            mapped.close()
            if exc.errno == errno.EINVAL:  # a kernel before 5.14: read files from now on
                _POPULATE_READ = None
            return None
        return memoryview(mapped)
    except (OSError, ValueError):
        return None


def _gather(archive: Archive, run: Sequence[bytes | _Part]) -> memoryview:
    """Byte strings and stored files, one after the other in one buffer."""
    total = sum(len(item) if isinstance(item, bytes) else item.instance.size for item in run)
    # numpy.empty: uninitialised memory (a bytearray would be zero-filled first, a pass over
    # the whole piece that costs a good part of the retrieve).
    buffer = numpy.empty(total, dtype=numpy.uint8).data.cast("B")
    offset = 0
    for item in run:
        if isinstance(item, bytes):
            buffer[offset : offset + len(item)] = item
            offset += len(item)
            continue
        size = item.instance.size
        path = archive.blobs.local_path(item.instance.blob_key)
        if path is None:
            buffer[offset : offset + size] = _read_stored(archive, item)
        else:
            with open(path, "rb") as fh:
                got = fh.readinto(buffer[offset : offset + size])
                if got != size or fh.read(1):
                    raise _size_mismatch(item, os.fstat(fh.fileno()).st_size)
        offset += size
    return buffer


def _groups(parts: Sequence[_Part]) -> Iterator[list[_Part]]:
    """Consecutive parts up to :data:`COALESCE_BYTES`; a large pass-through instance alone."""
    group: list[_Part] = []
    size = 0
    for part in parts:
        large = part.passthrough and part.instance.size > WHOLE_FILE_LIMIT
        if group and (large or size + part.instance.size > COALESCE_BYTES):
            yield group
            group, size = [], 0
        group.append(part)
        size += part.instance.size
        if large:
            yield group
            group, size = [], 0
    if group:
        yield group


def _large(group: Sequence[_Part]) -> bool:
    first = group[0]
    return len(group) == 1 and first.passthrough and first.instance.size > WHOLE_FILE_LIMIT


async def _stream_instances(
    archive: Archive, parts: Sequence[_Part], boundary: str, base: str
) -> AsyncIterator[bytes | memoryview]:
    """The multipart body. Small files are read in worker threads a few MiB at a time into one
    piece, the next group while the current one is being sent. Large files stream in chunks."""
    groups = list(_groups(parts))

    def read(index: int) -> asyncio.Future[list[bytes | memoryview]] | None:
        if index >= len(groups) or _large(groups[index]):
            return None
        return asyncio.ensure_future(
            run_in_threadpool(_read_group, archive, groups[index], boundary, base)
        )

    ahead = read(0)
    try:
        for index, group in enumerate(groups):
            if _large(group):
                first = group[0]
                assert first.header is not None
                yield first.header
                chunks = archive.blobs.open(first.instance.blob_key)
                while chunk := await run_in_threadpool(next, chunks, b""):
                    yield chunk
                yield CRLF
                ahead = read(index + 1)
                continue
            assert ahead is not None
            pieces = await ahead
            ahead = read(index + 1)
            for piece in pieces:
                yield piece
        yield closing(boundary)
    except (BlobNotFound, StoredFileError, OSError) as exc:
        # The status line is gone already: end the body early so the client sees an error.
        log.error("WADO-RS retrieve interrupted", extra={"err": str(exc)})
        raise
    finally:
        if ahead is not None:
            ahead.cancel()


def _retrieve(
    request: Request, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    archive = archive_of(request)
    instances: list[StoredInstance] = _lookup(lambda: find_stored(archive.db, study, series, sop))
    stored = {i.transfer_syntax_uid for i in instances}
    choice = choose_dicom(request.headers.get("accept"), stored, single=len(instances) == 1)
    base = base_url(request)
    if not choice.multipart:
        instance = instances[0]
        target = choice.transfer_syntax or instance.transfer_syntax_uid
        if target != instance.transfer_syntax_uid:
            return Response(
                _converted_first(archive, instance, target),
                media_type=part_content_type(DICOM, target),
            )
        return StreamingResponse(
            _instance_bytes(archive, instance, target),
            media_type=part_content_type(DICOM, target),
        )
    boundary = new_boundary()
    single_syntax = choice.transfer_syntax or (next(iter(stored)) if len(stored) == 1 else None)
    parts = _plan(instances, choice, boundary, base)
    if not parts[0].passthrough:
        first = parts[0]
        parts[0] = replace(first, converted=_converted_first(archive, first.instance, first.target))
    headers = {}
    if all(p.header is not None for p in parts):
        # Everything goes out as stored: the length is known, no chunked encoding needed.
        length = sum(len(p.header or b"") + p.instance.size + len(CRLF) for p in parts)
        headers["Content-Length"] = str(length + len(closing(boundary)))
    return StreamingResponse(
        _stream_instances(archive, parts, boundary, base),
        headers=headers,
        media_type=multipart_content_type(DICOM, boundary, single_syntax),
    )


_DICOM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The instances, one part each (Part-10). Accept "
        '`multipart/related; type="application/dicom"` with `transfer-syntax=*` to get them '
        "as stored; without a transfer syntax they are sent in Explicit VR Little Endian.",
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    },
    **ERROR_RESPONSES,
}


@router.get(
    "/studies/{study}",
    summary="Retrieve a study (WADO-RS)",
    response_class=Response,
    responses=_DICOM_RESPONSES,
)
def retrieve_study(request: Request, study: str) -> Response:
    return _retrieve(request, study)


@router.get(
    "/studies/{study}/series/{series}",
    summary="Retrieve a series (WADO-RS)",
    response_class=Response,
    responses=_DICOM_RESPONSES,
)
def retrieve_series(request: Request, study: str, series: str) -> Response:
    return _retrieve(request, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}",
    summary="Retrieve an instance (WADO-RS)",
    response_class=Response,
    responses=_DICOM_RESPONSES,
)
def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return _retrieve(request, study, series, sop)


# --- metadata ------------------------------------------------------------------------------------


def _absolute_bulk_uris(text: str, prefix: str) -> str:
    # The stored JSON's BulkDataURIs are relative ("bulkdata/7FE00010"); a string value can
    # never contain an unescaped quote, so only the attribute itself matches.
    return text.replace('"BulkDataURI": "bulkdata/', f'"BulkDataURI": "{prefix}/bulkdata/').replace(
        '"BulkDataURI":"bulkdata/', f'"BulkDataURI":"{prefix}/bulkdata/'
    )


def _with_transfer_syntax(text: str, transfer_syntax: str) -> str:
    """Add Available Transfer Syntax UID (0008,3002): the syntax frames come in as stored."""
    if '"00083002"' in text:
        return text
    head = f'{{"00083002":{{"vr":"UI","Value":["{transfer_syntax}"]}}'
    body = text.strip()[1:]
    return head + ("," + body if body.strip() != "}" else "}")


def _metadata_chunks(
    archive: Archive, base: str, study: str, series: str | None, sop: str | None
) -> Iterator[bytes]:
    yield b"["
    batch: list[str] = []
    first = True
    for series_uid, sop_uid, syntax, text in iter_metadata(archive.db, study, series, sop):
        prefix = instance_url(base, study, series_uid, sop_uid)
        batch.append(_with_transfer_syntax(_absolute_bulk_uris(text, prefix), syntax))
        if len(batch) >= METADATA_BATCH:
            yield (("" if first else ",") + ",".join(batch)).encode("utf-8")
            first = False
            batch = []
    if batch:
        yield (("" if first else ",") + ",".join(batch)).encode("utf-8")
    yield b"]"


def _metadata(
    request: Request, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    if not accepts_json(request.headers.get("accept")):
        fail(406, "metadata is available as application/dicom+json (or application/json) only")
    archive = archive_of(request)
    base = base_url(request)
    version: str = _lookup(lambda: metadata_version(archive.db, study, series, sop))
    salt = hashlib.blake2b(base.encode(), digest_size=4).hexdigest()
    etag = f'W/"{version}-{salt}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    return dicom_json_response(
        request, _metadata_chunks(archive, base, study, series, sop), headers=headers
    )


_METADATA_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A DICOM JSON array (PS3.18 F.2), one object per instance, with absolute "
        "BulkDataURIs. Carries an ETag; `If-None-Match` gives 304 while nothing changed.",
        "content": {
            "application/dicom+json": {"schema": {"type": "array", "items": {"type": "object"}}}
        },
    },
    304: {"description": "Not modified since the entity tag given in If-None-Match."},
    **ERROR_RESPONSES,
}


@router.get(
    "/studies/{study}/metadata",
    summary="Retrieve study metadata (WADO-RS)",
    response_class=Response,
    responses=_METADATA_RESPONSES,
)
def study_metadata(request: Request, study: str) -> Response:
    return _metadata(request, study)


@router.get(
    "/studies/{study}/series/{series}/metadata",
    summary="Retrieve series metadata (WADO-RS)",
    response_class=Response,
    responses=_METADATA_RESPONSES,
)
def series_metadata(request: Request, study: str, series: str) -> Response:
    return _metadata(request, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/metadata",
    summary="Retrieve instance metadata (WADO-RS)",
    response_class=Response,
    responses=_METADATA_RESPONSES,
)
def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
    return _metadata(request, study, series, sop)


# --- frames and bulk data ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PixelChoice:
    multipart: bool
    decode: bool
    """True: native little endian pixels (decoded if stored compressed); False: as stored."""
    part_type: str
    """Media type of each part (``application/octet-stream``, ``image/jpeg``…)."""
    transfer_syntax: str


def choose_pixels(accept: str | None, stored: str, parts: int) -> PixelChoice:
    """How to send pixel data stored in ``stored`` (PS3.18 8.7.3.3/8.7.4)."""
    native = stored in NATIVE_TRANSFER_SYNTAXES
    stored_type = pixel_media_type(stored)
    decodable = can_decode(stored)

    def decoded(multipart: bool) -> PixelChoice:
        return PixelChoice(multipart, True, OCTET_STREAM, DEFAULT_TRANSFER_SYNTAX)

    def as_stored(multipart: bool, label: str) -> PixelChoice:
        if native:
            return decoded(multipart)
        return PixelChoice(multipart, False, label, stored)

    for r in parse_accept(accept):
        if r.multipart:
            wanted = r.part_type
            multipart = True
        elif r.media_type == "*/*":
            wanted, multipart = "*/*", True
        else:
            if parts > 1:
                continue
            wanted, multipart = r.part_type, False
        syntax = r.transfer_syntax
        if wanted == OCTET_STREAM:
            if syntax in (ANY_TRANSFER_SYNTAX, stored):
                return as_stored(multipart, OCTET_STREAM)
            if syntax in (None, DEFAULT_TRANSFER_SYNTAX) and decodable:
                return decoded(multipart)
        elif wanted in ("*/*", "*"):
            if syntax == ANY_TRANSFER_SYNTAX or (syntax == stored and not native):
                return as_stored(multipart, stored_type)
            if syntax in (None, DEFAULT_TRANSFER_SYNTAX) and decodable:
                return decoded(multipart)
        elif (
            not native and r.accepts(stored_type) and syntax in (None, ANY_TRANSFER_SYNTAX, stored)
        ):
            return as_stored(multipart, stored_type)
    fail(
        406,
        f"cannot send this pixel data as any accepted media type: it is stored as {stored_type} "
        f"(transfer syntax {stored}); application/octet-stream gives it "
        + ("uncompressed" if decodable else "as stored only with transfer-syntax=*"),
    )


def _instance(request: Request, study: str, series: str, sop: str) -> StoredInstance:
    archive = archive_of(request)
    instances: list[StoredInstance] = _lookup(lambda: find_stored(archive.db, study, series, sop))
    return instances[0]


def _parse_frames(text: str) -> list[int]:
    try:
        return parse_frame_list(text)
    except ValueError as exc:
        fail(400, str(exc))


def _pixel_parts(
    archive: Archive,
    instance: StoredInstance,
    numbers: Sequence[int],
    choice: PixelChoice,
    boundary: str,
) -> Iterator[bytes]:
    limit = inflate_limit(archive.settings)
    with open_instance(archive.blobs, instance.blob_key, max_inflated=limit) as fh:
        _ds, layout = pixel_layout(fh)
        for number in numbers:
            data = _frame(fh, layout, number, choice)
            if choice.multipart:
                yield (
                    part_header(
                        boundary,
                        part_content_type(choice.part_type, choice.transfer_syntax),
                        length=len(data),
                    )
                    + data
                    + CRLF
                )
            else:
                yield data
    if choice.multipart:
        yield closing(boundary)


def _frame(fh: BinaryIO, layout: PixelLayout, number: int, choice: PixelChoice) -> bytes:
    if choice.decode:
        return frame_bytes(fh, layout, number)
    return native_frame(fh, layout, number)


def _decoded_value(
    archive: Archive, instance: StoredInstance, layout: PixelLayout, multipart: bool
) -> Response:
    """The whole pixel data value, uncompressed: every frame decoded, in one part."""
    boundary = new_boundary()

    def body() -> Iterator[bytes]:
        header = part_header(boundary, part_content_type(OCTET_STREAM, DEFAULT_TRANSFER_SYNTAX))
        limit = inflate_limit(archive.settings)
        with open_instance(archive.blobs, instance.blob_key, max_inflated=limit) as fh:
            for number in range(1, layout.number_of_frames + 1):
                data = frame_bytes(fh, layout, number)
                yield header + data if multipart and number == 1 else data
        if multipart:
            yield CRLF + closing(boundary)

    chunks = _checked(body(), instance)
    if multipart:
        media_type = multipart_content_type(OCTET_STREAM, boundary, DEFAULT_TRANSFER_SYNTAX)
    else:
        media_type = part_content_type(OCTET_STREAM, DEFAULT_TRANSFER_SYNTAX)
    return StreamingResponse(chunks, media_type=media_type)


def _open_pixels(archive: Archive, instance: StoredInstance) -> PixelLayout:
    limit = inflate_limit(archive.settings)
    try:
        with open_instance(archive.blobs, instance.blob_key, max_inflated=limit) as fh:
            return pixel_layout(fh)[1]
    except (StoredFileError, BlobNotFound) as exc:
        fail_for_pixel_error(exc, instance.sop_instance_uid)


def _pixel_response(
    archive: Archive, instance: StoredInstance, numbers: list[int], choice: PixelChoice
) -> Response:
    boundary = new_boundary()
    body = _checked(_pixel_parts(archive, instance, numbers, choice, boundary), instance)
    if choice.multipart:
        media_type = multipart_content_type(choice.part_type, boundary, choice.transfer_syntax)
    else:
        media_type = part_content_type(choice.part_type, choice.transfer_syntax)
    return StreamingResponse(body, media_type=media_type)


def _checked(chunks: Iterator[bytes], instance: StoredInstance) -> Iterator[bytes]:
    """Decode the first part before the status line goes out, so that a frame that cannot be
    decoded is a 4xx and not a broken body."""
    try:
        first = next(chunks)
    except StopIteration:
        return iter(())
    except (StoredFileError, BlobNotFound) as exc:
        fail_for_pixel_error(exc, instance.sop_instance_uid)

    def rest() -> Iterator[bytes]:
        yield first
        yield from chunks

    return rest()


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    summary="Retrieve frames (WADO-RS)",
    description="Frame numbers start at 1 and are separated by commas (`/frames/1,3,5`).",
    response_class=Response,
    responses={
        200: {
            "description": "One part per frame: `application/octet-stream` uncompressed "
            "(decoded when stored compressed), or the stored bit stream (`image/jpeg`, "
            "`image/jls`, `image/jp2`, `image/jphc`, `image/dicom-rle`…) when that type or "
            "`transfer-syntax=*` is accepted.",
            "content": {
                'multipart/related; type="application/octet-stream"': {
                    "schema": {"type": "string", "format": "binary"}
                },
                'multipart/related; type="image/jpeg"': {
                    "schema": {"type": "string", "format": "binary"}
                },
            },
        },
        **ERROR_RESPONSES,
    },
)
def retrieve_frames(request: Request, study: str, series: str, sop: str, frames: str) -> Response:
    numbers = _parse_frames(frames)
    archive = archive_of(request)
    instance = _instance(request, study, series, sop)
    layout = _open_pixels(archive, instance)
    try:
        check_frames(layout, numbers)
    except FrameOutOfRange as exc:
        fail(404, exc.message)
    choice = choose_pixels(request.headers.get("accept"), layout.transfer_syntax_uid, len(numbers))
    return _pixel_response(archive, instance, numbers, choice)


_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.ASCII | re.IGNORECASE)
#: Positions with more digits than this lie beyond any value (a petabyte has 16).
_MAX_POSITION_DIGITS = 18


def _position(digits: str) -> int:
    """A byte position; one too long to mean anything counts as beyond every value."""
    return int(digits) if len(digits) <= _MAX_POSITION_DIGITS else 10**_MAX_POSITION_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range ``[start, end)`` from a Range header (RFC 9110 14.1.2); ``None`` to send
    the whole value: no header, several ranges, another unit, or a header that is not a valid
    ``bytes=first-last`` / ``bytes=first-`` / ``bytes=-suffix`` (RFC 9110 14.2 lets a server
    ignore such a Range). Raises 416 when the range cannot be satisfied: it starts at or
    beyond the end, or asks for the last 0 bytes (RFC 9110 15.5.17)."""
    if not header or "," in header:
        return None
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        # A suffix longer than the value is the whole value (RFC 9110 14.1.2).
        start, end = max(0, size - _position(last)), size
        satisfiable = _position(last) > 0 and size > 0
    else:
        start = _position(first)
        if last and _position(last) < start:
            return None  # an invalid range-spec (RFC 9110 14.1.1): ignored
        end = min(size, _position(last) + 1) if last else size
        satisfiable = start < size
    if not satisfiable:
        fail(
            416,
            f"range {header.strip()[:60]} is outside the {size} bytes",
            {"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _bulk_choice(accept: str | None) -> bool:
    """Multipart (True) or single part (False) for bulk data other than pixel data."""
    for r in parse_accept(accept):
        if r.multipart and r.accepts(OCTET_STREAM):
            return True
        if r.media_type in ("*/*", "multipart/*"):
            return True
        if not r.multipart and r.media_type in (OCTET_STREAM, "application/*"):
            return False
    fail(406, "bulk data is available as application/octet-stream (single or multipart) only")


def _ranged(
    request: Request,
    multipart: bool,
    size: int,
    body: Callable[[int, int], Iterator[bytes]],
) -> Response:
    span = parse_range(request.headers.get("range"), size)
    start, end = span or (0, size)
    headers = {"Accept-Ranges": "bytes"}
    status = 200
    extra: dict[str, str] = {}
    if span is not None:
        status = 206
        extra["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if not multipart:
        headers |= extra
        headers["Content-Length"] = str(end - start)
        return StreamingResponse(
            body(start, end), status_code=status, headers=headers, media_type=OCTET_STREAM
        )
    boundary = new_boundary()

    def parts() -> Iterator[bytes]:
        yield part_header(boundary, OCTET_STREAM, length=end - start, extra=extra)
        yield from body(start, end)
        yield CRLF
        yield closing(boundary)

    return StreamingResponse(
        parts(),
        status_code=status,
        headers=headers,
        media_type=multipart_content_type(OCTET_STREAM, boundary, None),
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/bulkdata/{path:path}",
    summary="Retrieve bulk data (WADO-RS)",
    description="The targets of the BulkDataURIs in metadata. Range requests are honoured "
    "(206, or 416 when outside the value).",
    response_class=Response,
    responses={
        200: {
            "description": "The value as `application/octet-stream` (single part, or "
            "multipart/related when asked); compressed pixel data as its frames.",
            "content": {
                'multipart/related; type="application/octet-stream"': {
                    "schema": {"type": "string", "format": "binary"}
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        206: {"description": "The byte range asked for."},
        416: {"description": "The range lies outside the value."},
        **ERROR_RESPONSES,
    },
)
def retrieve_bulkdata(request: Request, study: str, series: str, sop: str, path: str) -> Response:
    archive = archive_of(request)
    instance = _instance(request, study, series, sop)
    steps = [p for p in path.strip("/").split("/") if p]
    accept = request.headers.get("accept")
    if len(steps) == 1 and steps[0].upper() in _PIXEL_TAGS:
        layout = _open_pixels(archive, instance)
        numbers = list(range(1, layout.number_of_frames + 1))
        choice = choose_pixels(accept, layout.transfer_syntax_uid, 1)
        if not choice.decode:
            # Compressed pixel data as stored: one part per frame, as the frames resource does.
            return _pixel_response(archive, instance, numbers, replace(choice, multipart=True))
        if not layout.encapsulated and layout.little_endian and layout.bits_allocated % 8 == 0:

            def pixels(start: int, end: int) -> Iterator[bytes]:
                limit = inflate_limit(archive.settings)
                with open_instance(archive.blobs, instance.blob_key, max_inflated=limit) as fh:
                    yield from uncompressed_range(fh, layout, start, end)

            assert layout.length is not None
            return _ranged(request, choice.multipart, layout.length, pixels)
        return _decoded_value(archive, instance, layout, choice.multipart)
    multipart = _bulk_choice(accept)
    try:
        limit = inflate_limit(archive.settings)
        with open_instance(archive.blobs, instance.blob_key, max_inflated=limit) as fh:
            value, _vr = element_value(fh, steps)
    except NoSuchElement as exc:
        fail(404, exc.message)
    except (StoredFileError, BlobNotFound) as exc:
        fail_for_pixel_error(exc, instance.sop_instance_uid)

    def element(start: int, end: int) -> Iterator[bytes]:
        yield value[start:end]

    return _ranged(request, multipart, len(value), element)
