"""WADO-RS rendered and thumbnail resources (PS3.18 8.3.5, 9.5, 10.4.1.1.3).

Images as a person would see them, in a consumer format (``image/jpeg``, the default;
``image/png``; ``image/gif``), built by :mod:`archive.render`.

- ``…/instances/{i}/rendered`` of a single-frame instance and ``…/frames/{f}/rendered`` with one
  frame number answer one image. Resources that hold several images (a study, a series, a
  multi-frame instance, several frame numbers) answer ``multipart/related`` with one rendered
  image per frame, in series / instance / frame order, each with the ``Content-Location`` of its
  frame; instances without pixel data (SR, KO…) are left out. Such a resource accepts
  ``multipart/related; type="image/…"`` (or ``*/*``); a single-part ``image/jpeg`` alone is
  answered 406, since no single image is that resource (ask for its thumbnail instead).
- ``…/thumbnail`` at every level answers one small image: the middle frame of the middle
  instance of the series (of the study's first series with images), of the instance, or the
  first frame asked for; at most 128 pixels on its longest side unless a ``viewport`` says
  otherwise.

Query parameters: ``window=center,width[,linear|linear-exact|sigmoid]``,
``viewport=vw,vh[,sx,sy,sw,sh]``, ``quality=1..100`` (JPEG), ``accept`` (overrides the Accept
header, PS3.18 8.3.3.1) and ``charset`` (no effect on images). ``annotation`` and
``iccprofile`` are not supported: they are ignored with a ``Warning: 299`` header. Any other
parameter is a 400.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from archive import Archive
from archive.instance_io import StoredInstance, inflate_limit, open_instance
from archive.query import shown
from archive.render import (
    MEDIA_TYPES,
    THUMBNAIL_SIZE,
    NotRenderable,
    RenderOptions,
    image_instances,
    render_frames,
    representative,
)
from archive.wado import NotFound
from dicomweb.common import (
    ERROR_RESPONSES,
    archive_of,
    base_url,
    fail,
    instance_url,
    warning_value,
)
from dicomweb.media import closing, multipart_content_type, new_boundary, parse_accept, part_header
from dicomweb.pixels import (
    fail_for_pixel_error,
    parse_frame_list,
    parse_quality,
    parse_viewport,
    parse_window,
)

log = logging.getLogger(__name__)
router = APIRouter()

DEFAULT_TYPE = "image/jpeg"
CRLF = b"\r\n"
_RENDER_PARAMETERS = {"window", "viewport", "quality", "accept", "charset"}
_IGNORED_PARAMETERS = {"annotation", "iccprofile"}
Pick = Literal["all", "first", "middle"]


# --- request parsing -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rendering:
    options: RenderOptions
    multipart: bool
    warnings: list[str]


def _accept(request: Request) -> str | None:
    return request.query_params.get("accept") or request.headers.get("accept")


def choose_media_type(accept: str | None, several: bool) -> tuple[str, bool]:
    """(image media type, multipart) for the first acceptable range (PS3.18 8.7.4)."""
    for r in parse_accept(accept):
        wanted = r.part_type
        if r.multipart:
            if wanted in ("*/*", "*", "image/*"):
                return DEFAULT_TYPE, True
            if wanted in MEDIA_TYPES:
                return wanted, True
            continue
        if r.media_type in ("*/*", "multipart/*"):
            return DEFAULT_TYPE, several or r.media_type == "multipart/*"
        if several:
            continue
        if wanted == "image/*":
            return DEFAULT_TYPE, False
        if wanted in MEDIA_TYPES:
            return wanted, False
    if several:
        fail(
            406,
            "this resource holds several images: it is sent as multipart/related with "
            'type="image/jpeg", "image/png" or "image/gif" (or ask for its /thumbnail, a '
            "single image)",
        )
    fail(406, "rendered images are available as image/jpeg (default), image/png or image/gif")


def _parameters(request: Request, *, thumbnail: bool) -> tuple[RenderOptions, list[str], str]:
    """Options from the query string (400 on anything malformed), warnings, Accept value."""
    warnings: list[str] = []
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        key = name.strip().lower()
        if key in _IGNORED_PARAMETERS:
            warnings.append(f"the {name} parameter is not supported and was ignored")
            continue
        if key not in _RENDER_PARAMETERS:
            fail(
                400,
                f"unknown query parameter {shown(name)}: rendered resources take window, viewport, "
                "quality, accept (and annotation and iccprofile, which are ignored)",
            )
        if key in values:
            fail(400, f"{name} is given more than once")
        values[key] = value
    try:
        window = parse_window(values["window"]) if "window" in values else None
        viewport = parse_viewport(values["viewport"]) if "viewport" in values else None
        quality = parse_quality(values["quality"]) if "quality" in values else None
    except ValueError as exc:
        fail(400, str(exc))
    options = RenderOptions(
        window=window,
        viewport=viewport,
        quality=quality,
        max_size=THUMBNAIL_SIZE if thumbnail else None,
    )
    return options, warnings, _accept(request) or ""


def _frame_numbers(text: str) -> list[int]:
    try:
        return parse_frame_list(text)
    except ValueError as exc:
        fail(400, str(exc))


def _lookup(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except NotFound as exc:
        fail(404, exc.message)
    except NotRenderable as exc:
        fail(406, exc.message)


class _Failed(Exception):
    """An error while rendering the frames of one instance."""

    def __init__(self, instance: StoredInstance, error: Exception) -> None:
        super().__init__(str(error))
        self.instance = instance
        self.error = error


def _render_failed(exc: Exception) -> NoReturn:
    if isinstance(exc, _Failed):
        fail_for_pixel_error(exc.error, exc.instance.sop_instance_uid)
    raise exc


# --- responses -----------------------------------------------------------------------------

#: What one instance contributes: its frames (``None``: all) and which of them (``all``,
#: ``first``, ``middle``; see :func:`archive.render.render_frames`).
Selection = tuple[StoredInstance, Sequence[int] | None, Pick]


def _images(
    archive: Archive, selection: Sequence[Selection], options: RenderOptions
) -> Iterator[tuple[StoredInstance, int, bytes]]:
    limit = inflate_limit(archive.settings)
    for instance, numbers, pick in selection:
        try:
            with open_instance(archive.blobs, instance.blob_key, max_inflated=limit) as fh:
                for number, data in render_frames(fh, numbers, options, pick=pick):
                    yield instance, number, data
        except Exception as exc:
            raise _Failed(instance, exc) from exc


def _first_then_rest(images: Iterator[Any]) -> tuple[Any, Iterator[Any]]:
    """Render the first image before the status line goes out, so that a failure is a 4xx or
    5xx and not a broken body."""
    try:
        first = next(images)
    except StopIteration:
        fail(406, "there is no image to render")
    except Exception as exc:
        _render_failed(exc)
    return first, images


def _respond(
    request: Request,
    selection: Sequence[Selection],
    options: RenderOptions,
    multipart: bool,
    warnings: list[str],
    suffix: str,
) -> Response:
    archive = archive_of(request)
    headers = {"Warning": warning_value(warnings)} if warnings else {}
    first, rest = _first_then_rest(_images(archive, selection, options))
    media_type = options.media_type
    if not multipart:
        return Response(first[2], media_type=media_type, headers=headers)
    base = base_url(request)
    boundary = new_boundary()

    def parts() -> Iterator[bytes]:
        try:
            for instance, number, data in _chain(first, rest):
                location = (
                    instance_url(
                        base,
                        instance.study_instance_uid,
                        instance.series_instance_uid,
                        instance.sop_instance_uid,
                    )
                    + f"/frames/{number}/{suffix}"
                )
                yield (
                    part_header(boundary, media_type, location=location, length=len(data))
                    + data
                    + CRLF
                )
            yield closing(boundary)
        except Exception as exc:
            # The status line is gone: end the body early so the client sees an error.
            log.error("rendering interrupted", extra={"err": str(exc)})
            raise

    return StreamingResponse(
        parts(),
        media_type=multipart_content_type(media_type, boundary, None),
        headers=headers,
    )


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _rendered(
    request: Request,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    frames: str | None = None,
) -> Response:
    options, warnings, accept = _parameters(request, thumbnail=False)
    numbers = _frame_numbers(frames) if frames is not None else None
    archive = archive_of(request)
    instances: list[StoredInstance] = _lookup(
        lambda: image_instances(archive.db, study, series, sop)
    )
    if numbers is not None:
        several = len(numbers) > 1
    elif sop is not None:
        several = (instances[0].number_of_frames or 1) > 1
    else:
        several = True
    media_type, multipart = choose_media_type(accept, several)
    options = RenderOptions(
        media_type=media_type,
        window=options.window,
        viewport=options.viewport,
        quality=options.quality,
    )
    selection: list[Selection] = [(i, numbers, "all") for i in instances]
    return _respond(request, selection, options, multipart, warnings, "rendered")


def _thumbnail(
    request: Request,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    frames: str | None = None,
) -> Response:
    options, warnings, accept = _parameters(request, thumbnail=True)
    numbers = _frame_numbers(frames) if frames is not None else None
    archive = archive_of(request)
    instance: StoredInstance = _lookup(lambda: representative(archive.db, study, series, sop))
    media_type, _multipart = choose_media_type(accept, several=False)
    options = RenderOptions(
        media_type=media_type,
        window=options.window,
        viewport=options.viewport,
        quality=options.quality,
        max_size=options.max_size,
    )
    pick: Pick = "first" if numbers is not None else "middle"
    return _respond(request, [(instance, numbers, pick)], options, False, warnings, "thumbnail")


# --- routes --------------------------------------------------------------------------------

_PARAMS_DOC = (
    "Query parameters: `window=center,width[,linear|linear-exact|sigmoid]` (grayscale; "
    "default: the file's window, else its VOI LUT, else the full range), "
    "`viewport=vw,vh[,sx,sy,sw,sh]` (fit into vw x vh, keeping the aspect ratio; a source "
    "region, flipped when sw/sh are negative), `quality=1..100` (JPEG), `accept`. "
    "Media types: image/jpeg (default), image/png, image/gif."
)
_IMAGE_CONTENT = {
    t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png")
}
_RENDERED_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One image, or multipart/related with one image per frame when the "
        "resource holds several.",
        "content": {
            **_IMAGE_CONTENT,
            'multipart/related; type="image/jpeg"': {
                "schema": {"type": "string", "format": "binary"}
            },
        },
    },
    **ERROR_RESPONSES,
}
_THUMBNAIL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "One small image.", "content": _IMAGE_CONTENT},
    **ERROR_RESPONSES,
}


@router.get(
    "/studies/{study}/rendered",
    summary="Retrieve a rendered study (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_RENDERED_RESPONSES,
)
def rendered_study(request: Request, study: str) -> Response:
    return _rendered(request, study)


@router.get(
    "/studies/{study}/series/{series}/rendered",
    summary="Retrieve a rendered series (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_RENDERED_RESPONSES,
)
def rendered_series(request: Request, study: str, series: str) -> Response:
    return _rendered(request, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/rendered",
    summary="Retrieve a rendered instance (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_RENDERED_RESPONSES,
)
def rendered_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return _rendered(request, study, series, sop)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered",
    summary="Retrieve rendered frames (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_RENDERED_RESPONSES,
)
def rendered_frames(request: Request, study: str, series: str, sop: str, frames: str) -> Response:
    return _rendered(request, study, series, sop, frames)


@router.get(
    "/studies/{study}/thumbnail",
    summary="Retrieve a study thumbnail (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_THUMBNAIL_RESPONSES,
)
def thumbnail_study(request: Request, study: str) -> Response:
    return _thumbnail(request, study)


@router.get(
    "/studies/{study}/series/{series}/thumbnail",
    summary="Retrieve a series thumbnail (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_THUMBNAIL_RESPONSES,
)
def thumbnail_series(request: Request, study: str, series: str) -> Response:
    return _thumbnail(request, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/thumbnail",
    summary="Retrieve an instance thumbnail (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_THUMBNAIL_RESPONSES,
)
def thumbnail_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return _thumbnail(request, study, series, sop)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/thumbnail",
    summary="Retrieve a frame thumbnail (WADO-RS)",
    description=_PARAMS_DOC,
    response_class=Response,
    responses=_THUMBNAIL_RESPONSES,
)
def thumbnail_frames(request: Request, study: str, series: str, sop: str, frames: str) -> Response:
    return _thumbnail(request, study, series, sop, frames)
