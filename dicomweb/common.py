"""What every DICOMweb route shares: the archive and settings of the app, URLs, errors as JSON,
DICOM JSON responses (gzip-compressed when the client accepts it) and Warning headers."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from fastapi import HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from archive import Archive
from config import Settings
from dicomweb.media import DICOM_JSON

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


def archive_of(request: Request) -> Archive:
    return request.app.state.archive


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> NoReturn:
    """Stop with an HTTP error whose JSON body says why: ``{"detail": message}``."""
    raise HTTPException(status_code=status, detail=message, headers=headers)


def base_url(request: Request) -> str:
    """The DICOMweb root as the client reaches it (``dicomweb_base_url`` overrides)."""
    configured = settings_of(request).dicomweb_base_url
    if configured:
        return configured.rstrip("/")
    url = request.base_url
    server = request.scope.get("server")
    host = request.headers.get("host", "")
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
    return f"{str(url).rstrip('/')}/dicom-web"


def study_url(base: str, study: str) -> str:
    return f"{base}/studies/{study}"


def series_url(base: str, study: str, series: str) -> str:
    return f"{base}/studies/{study}/series/{series}"


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def warning_value(messages: Iterable[str]) -> str:
    """A Warning header (RFC 7234 5.5, PS3.18 8.4): code 299, agent ``pacsbridge``."""
    return ", ".join(
        '299 pacsbridge "{}"'.format(m.replace("\\", "\\\\").replace('"', '\\"')) for m in messages
    )


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
