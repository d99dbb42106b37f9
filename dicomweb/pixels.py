"""What the WADO-RS pixel resources (frames, bulk data, rendered, thumbnail) share: the syntax of
their URLs (PS3.18 8.3.5: frame lists, ``window``, ``viewport``, ``quality``) and the HTTP status
of each error the archive raises while reading, decoding or rendering pixels.

Numbers are read strictly: ASCII digits only (Python's ``int()`` and ``str.isdigit()`` also take
other scripts' digits, superscripts, underscores and thousands of digits), a bounded length and
count, so that no URL can make the server convert a huge number or decode a frame many times.
"""

from __future__ import annotations

import re
from typing import NoReturn

from archive import BlobNotFound
from archive.frames import DecodeError
from archive.instance_io import (
    MAX_FRAME_NUMBER,
    FrameOutOfRange,
    InflateLimitExceeded,
    NoPixelData,
    StoredFileError,
)
from archive.render import BadViewport, NotRenderable, RenderError, Viewport, Window, WindowFunction
from dicomweb.common import fail

__all__ = [
    "MAX_FRAMES_PER_REQUEST",
    "fail_for_pixel_error",
    "parse_frame_list",
    "parse_quality",
    "parse_viewport",
    "parse_window",
]

#: Frame numbers one request may list (PS3.18 8.3.5 frame-list).
MAX_FRAMES_PER_REQUEST = 1000
_FRAME_NUMBER = re.compile(r"[0-9]{1,10}", re.ASCII)
_INTEGER = re.compile(r"[+-]?[0-9]{1,9}", re.ASCII)
#: A decimal number (PS3.5 DS-like): digits, one point, an exponent; 32 characters at most.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)
_MAX_DECIMAL_LENGTH = 32

_FUNCTIONS: dict[str, WindowFunction] = {
    "linear": "LINEAR",
    "linear_exact": "LINEAR_EXACT",
    "linear-exact": "LINEAR_EXACT",
    "sigmoid": "SIGMOID",
}


def _shown(text: str, limit: int = 40) -> str:
    """A parameter as quoted in an error message, cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --- frame lists ---------------------------------------------------------------------------------


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5``: frame numbers, ASCII digits from 1 to 2^31 - 1 (Number of Frames is IS, PS3.5
    6.2), at most :data:`MAX_FRAMES_PER_REQUEST` of them. Raises ValueError."""
    items = text.split(",")
    rule = (
        "frame numbers are ASCII digits from 1 to 2147483647 separated by commas, at most "
        f"{MAX_FRAMES_PER_REQUEST} per request"
    )
    if len(items) > MAX_FRAMES_PER_REQUEST:
        raise ValueError(f"{rule}: {len(items)} frame numbers were given")
    numbers: list[int] = []
    for item in items:
        item = item.strip(" ")
        if not _FRAME_NUMBER.fullmatch(item) or not 1 <= int(item) <= MAX_FRAME_NUMBER:
            raise ValueError(f"{rule}, not {_shown(item)} in {_shown(text)}")
        numbers.append(int(item))
    return numbers


# --- rendering parameters ------------------------------------------------------------------------


def _number(name: str, text: str) -> float:
    text = text.strip(" ")
    if len(text) > _MAX_DECIMAL_LENGTH or not _DECIMAL.fullmatch(text):
        raise ValueError(f"{name} must be a decimal number, not {_shown(text)}")
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, not {_shown(text)}")
    return value


def _integer(name: str, text: str) -> int:
    text = text.strip(" ")
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{name} must be an integer of at most 9 digits, not {_shown(text)}")
    return int(text)


def parse_window(text: str) -> Window:
    """``window=center,width[,function]``, function ``linear`` (default), ``linear-exact``
    (or ``linear_exact``) or ``sigmoid`` (PS3.18 8.3.5.1.4)."""
    parts = [p.strip(" ") for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(
            f"window is center,width,function (e.g. window=40,400,linear), not {_shown(text)}"
        )
    center = _number("the window center", parts[0])
    width = _number("the window width", parts[1])
    function: WindowFunction = "LINEAR"
    if len(parts) == 3 and parts[2]:
        name = parts[2].lower()
        if name not in _FUNCTIONS:
            raise ValueError(
                f"the window function is linear, linear-exact or sigmoid, not {_shown(parts[2])}"
            )
        function = _FUNCTIONS[name]
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """``viewport=vw,vh`` or ``viewport=vw,vh,sx,sy,sw,sh`` (sx…sh may be left empty;
    PS3.18 8.3.5.1.3)."""
    parts = [p.strip(" ") for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise ValueError(
            f"viewport is vw,vh or vw,vh,sx,sy,sw,sh (e.g. viewport=512,512), not {_shown(text)}"
        )
    vw = _integer("the viewport width", parts[0])
    vh = _integer("the viewport height", parts[1])
    if len(parts) == 2:
        return Viewport(vw, vh)
    sx = _integer("sx", parts[2]) if parts[2] else 0
    sy = _integer("sy", parts[3]) if parts[3] else 0
    sw = _integer("sw", parts[4]) if parts[4] else None
    sh = _integer("sh", parts[5]) if parts[5] else None
    return Viewport(vw, vh, sx, sy, sw, sh)


def parse_quality(text: str) -> int:
    """``quality=1..100`` (PS3.18 8.3.5.1.2)."""
    value = _integer("quality", text)
    if not 1 <= value <= 100:
        raise ValueError(f"quality must be 1 to 100, not {value}")
    return value


# --- errors --------------------------------------------------------------------------------------


def fail_for_pixel_error(exc: BaseException, sop_instance_uid: str) -> NoReturn:
    """Answer an error of reading, decoding or rendering pixels; re-raise anything else.

    - 404: a frame beyond the instance's frames, an instance without pixel data (frames and
      bulk data), a stored file that is missing;
    - 400: a viewport region outside the image;
    - 406: what the instance holds cannot be given in the representation asked for, though
      it can be retrieved as stored: no decoder for its transfer syntax, a bit stream or
      data set that cannot be decoded, a deflated data set beyond the inflate limit, an image
      the renderer does not present.
    """
    if isinstance(exc, FrameOutOfRange):
        fail(404, exc.message)
    if isinstance(exc, NoPixelData):
        fail(404, f"instance {sop_instance_uid} has no frames: {exc.message}")
    if isinstance(exc, BlobNotFound):
        fail(404, f"the file of instance {sop_instance_uid} is missing")
    if isinstance(exc, BadViewport):
        fail(400, exc.message)
    if isinstance(exc, (InflateLimitExceeded, DecodeError, NotRenderable, RenderError)):
        fail(406, f"instance {sop_instance_uid}: {exc.message}")
    if isinstance(exc, StoredFileError):
        fail(406, f"instance {sop_instance_uid}: {exc.message}")
    raise exc
