"""The REST conventions of FHIR R4 (http.html): media types, ``_format``/``_pretty``,
versions as ETags, preconditions, ``Prefer``, and the absolute base URL of the server."""

from __future__ import annotations

import functools
import json
import logging
import secrets
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from archive import Archive
from config import Settings
from fhir_bridge.errors import FHIRError, validation_issues

log = logging.getLogger(__name__)

PREFIX = "/fhir"
FHIR_JSON = "application/fhir+json"
_JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "json"}
_XML_TYPES = {"application/fhir+xml", "application/xml", "application/xml+fhir", "xml", "text/xml"}


def archive_of(request: Request) -> Archive:
    return request.app.state.archive


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def base_url(request: Request) -> str:
    """The FHIR base as clients reach it: every ``fullUrl``, link and ``Location`` starts with
    it (clients reject relative ones)."""
    settings = settings_of(request)
    if settings.fhir.base_url:
        return settings.fhir.base_url
    if settings.public_url:
        return settings.public_url.rstrip("/") + PREFIX
    return str(request.base_url).rstrip("/") + PREFIX


def dicomweb_url(request: Request) -> str:
    """The DICOMweb root (``Endpoint.address``), as the DICOMweb edge builds it."""
    settings = settings_of(request)
    if settings.dicomweb_base_url:
        return settings.dicomweb_base_url.rstrip("/")
    if settings.public_url:
        return settings.public_url.rstrip("/") + "/dicom-web"
    return str(request.base_url).rstrip("/") + "/dicom-web"


# --- media types ------------------------------------------------------------------------------


def check_request(request: Request) -> None:
    """400 for control characters in the path or a parameter (a NUL cannot reach the index:
    PostgreSQL refuses it in text), and 406 for a format this server cannot write."""
    texts = [request.url.path, *(k + v for k, v in request.query_params.multi_items())]
    if any(ch < " " or ch == "\x7f" for text in texts for ch in text):
        raise FHIRError(400, "control characters in the URL", code="invalid")
    response_media_type(request)


def _media(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def response_media_type(request: Request) -> str:
    """``application/fhir+json`` or ``application/json`` as the client asked (``_format``
    wins over ``Accept``); 406 for XML or anything else this server cannot write."""
    fmt = request.query_params.get("_format")
    if fmt:
        media = _media(fmt)
        if media in _JSON_TYPES:
            return "application/json" if media == "application/json" else FHIR_JSON
        raise FHIRError(
            406,
            f"_format={fmt!r}: this server writes JSON only (application/fhir+json)",
            expression=["_format"],
        )
    accept = request.headers.get("accept", "")
    if not accept:
        return FHIR_JSON
    media_types = [_media(part) for part in accept.split(",")]
    if any(m in ("application/fhir+json", "application/json+fhir", "*/*") for m in media_types):
        return FHIR_JSON
    if "application/json" in media_types or "application/*" in media_types:
        return "application/json"
    if any(m in _XML_TYPES for m in media_types):
        raise FHIRError(406, "this server writes JSON only (application/fhir+json), not XML")
    return FHIR_JSON


def fhir_response(
    request: Request,
    body: dict[str, Any] | None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    try:
        media_type = response_media_type(request)
    except FHIRError:
        media_type = FHIR_JSON  # an error about the format itself is still answered in JSON
    if body is None:
        return Response(status_code=status, headers=headers, media_type=None)
    if request.query_params.get("_pretty", "").lower() == "true":
        content = json.dumps(body, ensure_ascii=False, indent=2)
    else:
        content = compact_json(body)
    return Response(
        content.encode(),
        status_code=status,
        headers=headers,
        media_type=f"{media_type}; charset=utf-8",
    )


class RenderedJSON(list[Any]):
    """A JSON array made together with its compact JSON text (``text``, as
    :func:`compact_json` would write the items): a response writes the text as it is instead
    of encoding the items again (an Invoice's hundreds of lines). In-process readers see the
    items; neither is changed once made."""

    __slots__ = ("text",)

    def __init__(self, items: Iterable[Any], text: str) -> None:
        super().__init__(items)
        self.text = text


class _Slot:
    """Where the text of a :class:`RenderedJSON` goes in the encoded body."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _slotted(resource: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """The resource with its :class:`RenderedJSON` members (top level) replaced by slots,
    their texts appended to ``texts``; the resource itself when it has none."""
    rendered = [k for k, v in resource.items() if type(v) is RenderedJSON]
    if not rendered:
        return resource
    copy = dict(resource)
    for key in rendered:
        copy[key] = _Slot(len(texts))
        texts.append(resource[key].text)
    return copy


def compact_json(body: dict[str, Any]) -> str:
    """``body`` as compact JSON (UTF-8 text, no insignificant whitespace). The text of a
    :class:`RenderedJSON` member of the resource, or of the resources of a Bundle's entries,
    is written as it is."""
    texts: list[str] = []
    body = _slotted(body, texts)
    entries = body.get("entry")
    if isinstance(entries, list):
        slotted = []
        for entry in entries:
            inner = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(inner, dict):
                replaced = _slotted(inner, texts)
                if replaced is not inner:
                    entry = {**entry, "resource": replaced}
            slotted.append(entry)
        if texts:
            body = {**body, "entry": slotted}
    if not texts:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    # Each slot is written as a string no data can hold (a NUL, then a random marker), then
    # replaced by its text.
    marker = f"\x00{secrets.token_hex(8)}:"

    def slot(value: Any) -> str:
        if isinstance(value, _Slot):
            return f"{marker}{value.index}"
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=slot)
    quoted = json.dumps(marker, ensure_ascii=False)[:-1]
    # One pass over the document (a Bundle of many invoices holds many slots): each piece
    # after a marker starts with its slot's number and the closing quote.
    pieces = content.split(quoted)
    out = [pieces[0]]
    for piece in pieces[1:]:
        number, _, rest = piece.partition('"')
        out.append(texts[int(number)])
        out.append(rest)
    return "".join(out)


def outcome_response(request: Request, error: FHIRError) -> Response:
    return fhir_response(request, error.outcome(), error.status, error.headers)


async def read_resource_body(request: Request, resource_type: str) -> dict[str, Any]:
    """The request's resource: JSON of ``resource_type``, validated with the R4B model (400
    with one issue per error and its FHIRPath); 415 for other media types."""
    content_type = request.headers.get("content-type", "")
    if _media(content_type) not in _JSON_TYPES:
        raise FHIRError(
            415,
            f"Content-Type {content_type or '(none)'!r}: send application/fhir+json",
        )
    raw = await request.body()
    if b"\x00" in raw or b"\\u0000" in raw:
        raise FHIRError(400, "the body holds a NUL character", code="invalid")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FHIRError(400, f"the body is not JSON: {exc}", code="structure") from exc
    except RecursionError as exc:
        raise FHIRError(400, "the body is nested too deeply", code="structure") from exc
    return validate_resource(body, resource_type)


def validate_resource(body: Any, resource_type: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise FHIRError(400, "the body is not a JSON object (a FHIR resource)", code="structure")
    found = body.get("resourceType")
    if found != resource_type:
        raise FHIRError(
            400,
            f"resourceType is {found!r}, this endpoint takes {resource_type}",
            code="invalid",
            expression=["resourceType"],
        )
    try:
        get_fhir_model_class(resource_type).model_validate(body)
    except ValidationError as exc:
        issues = validation_issues([dict(e) for e in exc.errors()], resource_type)
        first = issues[0]
        raise FHIRError(
            400,
            f"the {resource_type} is not valid FHIR R4: {first['diagnostics']}",
            code="structure",
            expression=first.get("expression"),
            issues=issues[1:],
        ) from exc
    except (TypeError, ValueError, RecursionError) as exc:
        raise FHIRError(400, f"the {resource_type} is not valid FHIR R4: {exc}") from exc
    return body


# --- versions and preconditions -----------------------------------------------------------


def instant(value: datetime) -> str:
    """A FHIR instant (UTC, millisecond precision)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def version_headers(resource: dict[str, Any]) -> dict[str, str]:
    meta = resource.get("meta") or {}
    headers = {}
    if "versionId" in meta:
        headers["ETag"] = f'W/"{meta["versionId"]}"'
    if "lastUpdated" in meta:
        updated = datetime.fromisoformat(meta["lastUpdated"].replace("Z", "+00:00"))
        headers["Last-Modified"] = format_datetime(updated.astimezone(UTC), usegmt=True)
    return headers


def parse_etag(value: str) -> str:
    """The version of ``W/"n"``, ``"n"`` or bare ``n``."""
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def check_if_match(request: Request, current_version: str | None) -> None:
    """412 when ``If-Match`` names another version than the current one."""
    wanted = request.headers.get("if-match")
    if wanted is None:
        return
    versions = {parse_etag(part) for part in wanted.split(",")}
    if "*" in versions and current_version is not None:
        return
    if current_version not in versions:
        raise FHIRError(
            412,
            f"If-Match {wanted!r}: the current version is {current_version!r}",
            expression=["If-Match"],
        )


def not_modified(request: Request, resource: dict[str, Any]) -> bool:
    """Whether ``If-None-Match`` / ``If-Modified-Since`` say the client's copy is current."""
    meta = resource.get("meta") or {}
    wanted = request.headers.get("if-none-match")
    if wanted is not None:
        versions = {parse_etag(part) for part in wanted.split(",")}
        return "*" in versions or str(meta.get("versionId")) in versions
    since = request.headers.get("if-modified-since")
    if since and "lastUpdated" in meta:
        try:
            client = parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
        updated = datetime.fromisoformat(meta["lastUpdated"].replace("Z", "+00:00"))
        return updated.replace(microsecond=0) <= client
    return False


def write_response(
    request: Request, resource: dict[str, Any], status: int, location: str | None
) -> Response:
    """The answer to a create or update as ``Prefer: return=`` asks (FHIR R4 http.html#ops)."""
    headers = version_headers(resource)
    if location:
        headers["Location"] = location
        headers["Content-Location"] = location
    prefer = request.headers.get("prefer", "")
    wanted = "representation"
    for part in prefer.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "return":
            wanted = value.strip().strip('"').lower()
    if wanted == "minimal":
        return fhir_response(request, None, status, headers)
    if wanted == "operationoutcome":
        body = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"{resource['resourceType']}/{resource['id']} version "
                    f"{resource['meta']['versionId']} stored",
                }
            ],
        }
        return fhir_response(request, body, status, headers)
    return fhir_response(request, resource, status, headers)


def strict_handling(request: Request) -> bool:
    """``Prefer: handling=strict`` (FHIR R4 search.html#errors)."""
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "handling":
            return value.strip().strip('"').lower() == "strict"
    return False


def answers_errors(endpoint: Callable[..., Response]) -> Callable[..., Response]:
    """A synchronous endpoint that answers its own errors as OperationOutcomes (as
    :class:`FHIRRoute` does for the others): GET endpoints run also past FastAPI's routing
    (``DirectApp.serve_directly``), where no route class wraps them."""

    @functools.wraps(endpoint)
    def answer(request: Request, **path: Any) -> Response:
        try:
            check_request(request)
            return endpoint(request, **path)
        except FHIRError as error:
            return outcome_response(request, error)
        except Exception as exc:
            log.exception("FHIR request failed", extra={"path": request.url.path})
            return outcome_response(
                request, FHIRError(500, f"the server failed: {type(exc).__name__}")
            )

    return answer


class FHIRRoute(APIRoute):
    """Routes whose every failure is an OperationOutcome: a :class:`FHIRError` with its status,
    anything unexpected as 500 (logged once, the server keeps serving)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                check_request(request)
                return await handler(request)
            except FHIRError as error:
                return outcome_response(request, error)
            except Exception as exc:
                if type(exc).__name__ in ("HTTPException", "RequestValidationError"):
                    raise
                log.exception("FHIR request failed", extra={"path": request.url.path})
                return outcome_response(
                    request, FHIRError(500, f"the server failed: {type(exc).__name__}")
                )

        return route
