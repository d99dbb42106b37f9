"""Media types of DICOMweb (PS3.18 8.7): parsing Accept, transfer syntaxes of media types, and
writing multipart/related bodies."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"

#: Pixel data media types of the compressed transfer syntaxes (PS3.18 Table 8.7.3-2/-3).
TRANSFER_SYNTAX_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg2",
    "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
#: Older names clients still send.
MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
#: Transfer syntaxes whose pixel data is native (uncompressed).
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    }
)
#: The transfer syntax of a request that names none (PS3.18 Table 8.7.3-5).
DEFAULT_TRANSFER_SYNTAX = str(ExplicitVRLittleEndian)
ANY_TRANSFER_SYNTAX = "*"


def pixel_media_type(transfer_syntax_uid: str) -> str:
    """The media type of a frame in this transfer syntax, as stored."""
    if transfer_syntax_uid in NATIVE_TRANSFER_SYNTAXES:
        return OCTET_STREAM
    return TRANSFER_SYNTAX_MEDIA_TYPES.get(transfer_syntax_uid, OCTET_STREAM)


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _parameters(items: Iterable[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        params[name.strip().lower()] = value.strip()
    return params


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One entry of an Accept header (or a Content-Type)."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        return self.media_type == MULTIPART

    @property
    def part_type(self) -> str:
        """The media type of the payload: the ``type`` of multipart/related, else itself."""
        if self.multipart:
            inner = self.params.get("type", "")
            inner = inner.split(";", 1)[0].strip().lower()
            return MEDIA_TYPE_ALIASES.get(inner, inner) or "*/*"
        return MEDIA_TYPE_ALIASES.get(self.media_type, self.media_type)

    @property
    def transfer_syntax(self) -> str | None:
        """``transfer-syntax`` given as a parameter, or inside a quoted ``type``."""
        if "transfer-syntax" in self.params:
            return self.params["transfer-syntax"].strip() or None
        inner = self.params.get("type", "")
        if ";" in inner:
            nested = _parameters(inner.split(";")[1:])
            return nested.get("transfer-syntax") or None
        return None

    def accepts(self, media_type: str) -> bool:
        """Whether this range's payload type covers ``media_type`` (wildcards included)."""
        wanted = self.part_type
        if wanted in ("*/*", "*"):
            return True
        if wanted.endswith("/*"):
            return media_type.split("/", 1)[0] == wanted[:-2]
        return wanted == media_type


def parse_media_type(text: str) -> MediaRange:
    pieces = _split(text, ";")
    media_type = pieces[0].strip().lower()
    params = _parameters(pieces[1:])
    q = 1.0
    if "q" in params:
        try:
            q = max(0.0, min(1.0, float(params.pop("q"))))
        except ValueError:
            q = 0.0
    return MediaRange(media_type, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """Acceptable media ranges, most preferred first (stable for equal q); ``*/*`` when the
    header is missing or empty. Ranges with q=0 are dropped."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [parse_media_type(item) for item in _split(header, ",") if item.strip()]
    ranges = [r for r in ranges if r.q > 0 and r.media_type]
    return sorted(ranges, key=lambda r: -r.q)


def _accepts_json(header: str | None) -> bool:
    for r in parse_accept(header):
        if r.multipart:
            continue
        if r.media_type in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return True
    return False


_accepts_json_cached = functools.lru_cache(maxsize=256)(_accepts_json)
#: Accept headers longer than this are parsed each time rather than remembered.
_CACHED_HEADER_LENGTH = 1024


def accepts_json(header: str | None) -> bool:
    """Whether a response in application/dicom+json is acceptable."""
    if header is not None and len(header) > _CACHED_HEADER_LENGTH:
        return _accepts_json(header)
    return _accepts_json_cached(header)


# --- multipart/related bodies --------------------------------------------------------------


def new_boundary() -> str:
    return f"pacsbridge-{uuid.uuid4().hex}"


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str | None) -> str:
    value = f'{MULTIPART}; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def part_header(
    boundary: str,
    content_type: str,
    *,
    location: str | None = None,
    length: int | None = None,
    extra: dict[str, str] | None = None,
) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if location:
        lines.append(f"Content-Location: {location}")
    for name, value in (extra or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def part_content_type(part_type: str, transfer_syntax: str | None) -> str:
    if transfer_syntax:
        return f"{part_type}; transfer-syntax={transfer_syntax}"
    return part_type
