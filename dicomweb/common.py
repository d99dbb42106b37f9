"""What every DICOMweb route shares: the archive and settings of the app, URLs, errors as JSON,
DICOM JSON responses (gzip-compressed when the client accepts it), Warning headers, the
check of the UIDs in request paths, and the patient a request is held to."""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

import anyio.to_thread
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from archive import Archive
from archive.dicom import valid_uid
from archive.query import study_patient
from config import Settings
from dicomweb.media import DICOM_JSON

#: Where the DICOMweb routes live, below the server's root.
PREFIX = "/dicom-web"

#: Bodies smaller than this are sent as they are.
GZIP_MINIMUM = 1024
#: zlib level: JSON shrinks ~8x already at level 1, and large metadata must stay fast.
GZIP_LEVEL = 1
#: Returned with every DICOMweb error: a JSON body with a ``detail`` message.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "The request is malformed (the message says what is wrong)."},
    404: {"description": "No such study, series, instance, frame or bulk data."},
    406: {"description": "None of the media types in Accept can be produced."},
}


#: Where the edge that authenticates a request leaves, for a request held to one patient's
#: compartment (SMART ``patient/`` scopes), that patient's FHIR Patient id: the key of the
#: archive's patient row (FHIR's Patient resources are those rows).
COMPARTMENT = "pacsbridge.compartment"
_ROW_KEY = re.compile(r"[0-9]{1,18}")


def compartment_patient(scope: Scope) -> int | None:
    """The patient row a request is held to, None when it is held to none. A Patient id that
    is no row key (FHIR ids may hold letters) names no patient: -1, which matches nothing."""
    patient = scope.get(COMPARTMENT)
    if patient is None:
        return None
    return int(patient) if _ROW_KEY.fullmatch(patient) else -1


def archive_of(request: Request) -> Archive:
    return request.app.state.archive


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> NoReturn:
    """Stop with an HTTP error whose JSON body says why: ``{"detail": message}``."""
    raise HTTPException(status_code=status, detail=message, headers=headers)


#: A Host header (RFC 9110 7.2): a host name or IPv4 address (RFC 3986 3.2.2, the names DNS
#: allows: letters, digits, "-", "_", ".") or a bracketed IPv6 literal, and an optional port.
_HOST = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}(?:%25[A-Za-z0-9._~-]+)?\])"
    r"(?::([0-9]{1,5}))?"
)


@functools.lru_cache(maxsize=1024)
def valid_host(value: str) -> bool:
    """Whether ``value`` is a syntactically valid ``host[:port]`` (RFC 9110 7.2, RFC 3986
    3.2.2 and 3.2.3)."""
    found = _HOST.fullmatch(value)
    return found is not None and (found.group(1) is None or int(found.group(1)) <= 65535)


#: The longest host[:port] (a DNS name of 253 characters, a port): longer Host headers are
#: refused before the cache of :func:`valid_host`, which must not hold junk of 64 KiB.
_MAX_HOST_LENGTH = 262


def host_error(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why the Host header of a request cannot make the server's URLs; None when it can (or
    there is none: HTTP/1.0, the server's own address then)."""
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1:
        return "the request has several Host headers (RFC 9110 7.2 allows one)"
    host = hosts[0].decode("latin-1") if hosts else ""
    if host and (len(host) > _MAX_HOST_LENGTH or not valid_host(host)):
        return (
            f"the Host header {host[:100]!r} is not a valid host[:port] (RFC 9110 7.2); "
            "the server's URLs are built from it unless PACSBRIDGE_PUBLIC_URL is set"
        )
    return None


def base_url(request: Request) -> str:
    """The DICOMweb root as clients reach it, for RetrieveURLs and BulkDataURIs:
    ``dicomweb_base_url`` when set, else ``public_url`` + ``/dicom-web``, else from the
    request's Host header, which must then be a valid ``host[:port]`` (400 otherwise: the
    header is copied into every URL of the response)."""
    settings = settings_of(request)
    if settings.dicomweb_base_url:
        return settings.dicomweb_base_url.rstrip("/")
    if settings.public_url:
        return settings.public_url.rstrip("/") + PREFIX
    error = host_error(request.scope["headers"])
    if error is not None:
        fail(400, error)
    host = request.headers.get("host", "")
    url = request.base_url
    server = request.scope.get("server")
    forwarded = any(
        name in request.headers
        for name in ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto")
    )
    default_port = 443 if url.scheme == "https" else 80
    if (
        host
        and not host.rsplit("]", 1)[-1].count(":")
        and not forwarded
        and server
        and server[1] not in (None, default_port)
    ):
        # A direct client that sent Host without the port it connected to (dicomweb-client
        # does): the URLs we hand out must still reach this port.
        url = url.replace(netloc=f"{host}:{server[1]}")
    return f"{str(url).rstrip('/')}{PREFIX}"


def study_url(base: str, study: str) -> str:
    return f"{base}/studies/{study}"


def series_url(base: str, study: str, series: str) -> str:
    return f"{base}/studies/{study}/series/{series}"


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


#: A Warning header holds at most this many messages (the others are counted in one more),
#: each cut to this many characters: it stays well under the 4 to 8 KiB that proxies allow
#: a header.
MAX_WARNINGS = 5
MAX_WARNING_LENGTH = 200
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _warning_text(message: str) -> str:
    """A message as printable ASCII (other characters as escapes) in a quoted-string."""
    text = message.encode("ascii", "backslashreplace").decode("ascii")
    text = _NOT_PRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(text) > MAX_WARNING_LENGTH:
        text = text[: MAX_WARNING_LENGTH - 3] + "..."
    return text.replace("\\", "\\\\").replace('"', '\\"')


def warning_value(messages: Iterable[str]) -> str:
    """A Warning header (RFC 7234 5.5, PS3.18 8.4): code 299, agent ``pacsbridge``; the same
    message once, at most :data:`MAX_WARNINGS` of them and a count of the rest."""
    unique = list(dict.fromkeys(messages))
    kept = unique[:MAX_WARNINGS]
    if len(unique) > MAX_WARNINGS:
        kept.append(f"and {len(unique) - MAX_WARNINGS} more warnings")
    return ", ".join(f'299 pacsbridge "{_warning_text(m)}"' for m in kept)


def _wants_gzip(request: Request) -> bool:
    for item in request.headers.get("accept-encoding", "").split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().removeprefix("q=")
            try:
                return not params or float(q) > 0
            except ValueError:
                return True
    return False


def json_body(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def dicom_json_response(
    request: Request,
    body: bytes | Iterator[bytes],
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    media_type: str = DICOM_JSON,
) -> Response:
    """A JSON response, gzip-compressed (``Content-Encoding: gzip``) when the client accepts it
    and the body is worth it. Iterators are compressed as they stream."""
    headers = dict(headers or {})
    headers["Vary"] = "Accept-Encoding"
    gzip = _wants_gzip(request)
    if isinstance(body, bytes):
        if gzip and len(body) >= GZIP_MINIMUM:
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            body = compressor.compress(body) + compressor.flush()
            headers["Content-Encoding"] = "gzip"
        return Response(body, status_code=status_code, headers=headers, media_type=media_type)
    if gzip:
        headers["Content-Encoding"] = "gzip"
        body = _gzip_stream(body)
    return StreamingResponse(body, status_code=status_code, headers=headers, media_type=media_type)


def _gzip_stream(chunks: Iterator[bytes]) -> Iterator[bytes]:
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    try:
        for chunk in chunks:
            out = compressor.compress(chunk)
            if out:
                yield out
        yield compressor.flush()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def etag_matches(request: Request, etag: str) -> bool:
    """If-None-Match against a (weak) entity tag (RFC 9110 13.1.2: weak comparison)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


#: The path segment before a UID in DICOMweb paths, and the UID's name.
_UID_SEGMENTS = {
    "studies": "Study Instance UID",
    "series": "Series Instance UID",
    "instances": "SOP Instance UID",
}


def path_uid_error(path: str) -> str | None:
    """Why a DICOMweb path (below :data:`PREFIX`) names something that is not a UID where its
    study, series or instance UID belongs; None when it does not. PS3.5 9.1: digits and dots,
    at most 64 characters (components with a leading zero are accepted, as at ingest).
    ``path`` is already percent-decoded: ``%2A``, ``%2e%2e`` and ``%00`` are refused too."""
    segments = path.split("/")
    index = 1
    while index + 1 < len(segments):
        name = _UID_SEGMENTS.get(segments[index])
        uid = segments[index + 1]
        if name is None or not uid:
            return None
        if not valid_uid(uid):
            shown = repr(uid) if len(uid) <= 80 else f"{uid[:80]!r}… ({len(uid)} characters)"
            return f"{shown} is not a valid {name}: a UID is at most 64 digits and dots (PS3.5 9.1)"
        index += 2
    return None


class RequestCheck:
    """ASGI middleware that answers 400 with a message, before any route sees the request
    (direct routes and FastAPI's alike), to a DICOMweb request

    - whose path holds anything but a UID where a study, series or instance UID belongs, so
      that no UID in a path is ever matched as a pattern;
    - when ``check_host`` (no public URL configured: URLs are built from the Host header),
      whose Host header is not a valid ``host[:port]``, so that a STOW-RS request is refused
      before it stores anything rather than when its answer is written;

    and 404 to a retrieval (WADO-RS, rendered, thumbnail) held to one patient's compartment
    (:func:`compartment_patient`) of a study of another patient, as if it did not exist (FHIR
    answers the same for another patient's resource): one lookup of the study's patient. The
    routes below the study check that its series and instances are its own. Searches
    (QIDO-RS) are held to the patient by their SQL instead, and answer nothing of another
    patient's study (as of one that does not exist). Requests held to no patient pay nothing
    for this."""

    def __init__(self, app: ASGIApp, prefix: str = PREFIX, check_host: bool = True) -> None:
        self.app = app
        self.prefix = prefix
        self.check_host = check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(self.prefix):
                error = path_uid_error(path[len(self.prefix) :])
                if error is None and self.check_host:
                    error = host_error(scope["headers"])
                if error is not None:
                    await JSONResponse({"detail": error}, status_code=400)(scope, receive, send)
                    return
                if scope.get(COMPARTMENT) is not None and not await _in_compartment(
                    scope, path[len(self.prefix) :]
                ):
                    await JSONResponse({"detail": "no such study"}, status_code=404)(
                        scope, receive, send
                    )
                    return
        await self.app(scope, receive, send)


def _nested_search(segments: list[str]) -> bool:
    """A QIDO-RS search below a study (PS3.18 10.6: ``/studies/{uid}/series``,
    ``/studies/{uid}/instances``, ``/studies/{uid}/series/{uid}/instances``), by its exact
    shape: a bulk data path may end in any word."""
    if len(segments) == 4:
        return segments[3] in ("series", "instances")
    return len(segments) == 6 and segments[3] == "series" and segments[5] == "instances"


async def _in_compartment(scope: Scope, path: str) -> bool:
    """Whether a DICOMweb request held to a patient (its path below the prefix, UIDs already
    checked) may go on: a search always (its SQL holds it), a retrieval only of a study of
    that patient."""
    segments = path.split("/")
    if len(segments) < 3 or segments[1] != "studies" or _nested_search(segments):
        return True  # a search (or a path no route serves): nothing named to look up
    patient = compartment_patient(scope)
    archive: Archive = scope["app"].state.archive
    # Off the event loop: the index may be a database server.
    owner = await anyio.to_thread.run_sync(study_patient, archive.db, segments[2])
    return owner is not None and owner == patient
