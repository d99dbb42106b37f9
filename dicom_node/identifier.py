"""C-FIND response identifiers encoded straight from DICOM JSON.

A C-FIND match comes out of the query matcher as DICOM JSON (PS3.18 F.2). Building a pydicom
``Dataset`` from it and letting pynetdicom encode that costs far more than the query: most of
a large C-FIND. The identifiers are flat (the requested keys), so they are encoded here
directly into Implicit or Explicit VR Little Endian (PS3.5 7.1). Whatever this encoder does
not handle (sequences with items, bulk data, DS values, AT, ISO 2022 character sets) raises
:class:`Unencodable` and takes the pydicom path; a differential test holds both to the same
bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from pydicom.charset import convert_encodings

from archive.query import FROM_COLUMN, FROM_COUNT, FROM_LIST

#: Explicit VR elements with a 4-byte length after two reserved bytes (PS3.5 Table 7.1-1).
_LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
#: Values that the Specific Character Set applies to (PS3.5 6.1.2.3).
CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
_NUMERIC = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
#: Python codecs of the character sets encoded here (single-byte or UTF-8, no code extensions).
_SIMPLE_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}


class Unencodable(Exception):
    """An identifier this encoder leaves to pydicom."""


def codec_for(charset: str | None) -> str:
    """The Python codec of a Specific Character Set value this encoder can write."""
    value = (charset or "").strip()
    codec = _SIMPLE_CODECS.get(value)
    if codec is not None:
        return codec
    if "\\" in value or "2022" in value:
        raise Unencodable(f"character set {value!r} needs code extensions")
    try:
        codecs = convert_encodings([value])
    except (LookupError, ValueError) as exc:
        raise Unencodable(str(exc)) from exc
    if len(codecs) != 1:
        raise Unencodable(f"character set {value!r}")
    return str(codecs[0])


def _person_name(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    groups = [str(value.get(name) or "") for name in _PN_GROUPS]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _strings(vr: str, values: list[Any]) -> list[str]:
    if vr == "PN":
        return [_person_name(v) for v in values]
    out: list[str] = []
    for v in values:
        if v is None:
            out.append("")
        elif isinstance(v, str):
            out.append(v)
        elif vr == "IS" and isinstance(v, int) and not isinstance(v, bool):
            out.append(str(v))
        else:
            raise Unencodable(f"{vr} value {v!r}")
    return out


def texts(result: dict[str, Any]) -> Iterable[str]:
    """The values of a JSON identifier that the Specific Character Set applies to."""
    for element in result.values():
        vr = element.get("vr")
        if vr not in CHARSET_VRS:
            continue
        for v in element.get("Value") or ():
            text = _person_name(v) if vr == "PN" else (v if isinstance(v, str) else "")
            if text:
                yield text


_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "SH", "LO", "ST", "LT", "UT", "UC", "IS"}
)
#: (key, VR, implicit) -> the element's tag (and VR) bytes, without the value length
_HEADERS: dict[tuple[str, str, bool], bytes] = {}


def _header(key: str, vr: str, implicit_vr: bool) -> bytes:
    header = _HEADERS.get((key, vr, implicit_vr))
    if header is None:
        if len(vr) != 2 or not vr.isalpha():
            raise Unencodable(f"element {key} has no VR")
        tag = int(key, 16)
        header = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if not implicit_vr:
            header += vr.encode("ascii") + (b"\x00\x00" if vr in _LONG_LENGTH_VRS else b"")
        if len(_HEADERS) < 65536:
            _HEADERS[(key, vr, implicit_vr)] = header
    return header


def _value(vr: str, element: dict[str, Any], codec: str) -> bytes:
    values = element.get("Value")
    if not values:
        if "InlineBinary" in element or "BulkDataURI" in element:
            raise Unencodable("binary value")
        return b""
    if vr in _STRING_VRS:
        first = values[0]
        text = first if len(values) == 1 and type(first) is str else "\\".join(_strings(vr, values))
    elif vr == "PN":
        text = "\\".join(_person_name(v) for v in values)
    elif vr in _NUMERIC:
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
            raise Unencodable(f"{vr} values {values!r}")
        return struct.pack(f"<{len(values)}{_NUMERIC[vr]}", *values)
    else:  # DS (kept as pydicom formats it), SQ, AT, binary VRs
        raise Unencodable(vr)
    try:
        raw = text.encode(codec if vr in CHARSET_VRS else "ascii")
    except UnicodeError as exc:
        raise Unencodable(str(exc)) from exc
    return _padded(raw, vr)


def encode_identifier(result: dict[str, Any], *, implicit_vr: bool, codec: str) -> bytes:
    """The identifier in Implicit (``implicit_vr``) or Explicit VR Little Endian, text values
    in ``codec``. Raises :class:`Unencodable` for what it leaves to pydicom."""
    parts: list[bytes] = []
    for key in sorted(result):  # eight upper-case hex digits sort as the tags do
        element = result[key]
        vr = element.get("vr")
        if not isinstance(vr, str):
            raise Unencodable(f"element {key} has no VR")
        value = _value(vr, element, codec)
        parts.append(_header(key, vr, implicit_vr))
        if implicit_vr or vr in _LONG_LENGTH_VRS:
            parts.append(struct.pack("<L", len(value)))
        elif len(value) > 0xFFFF:
            raise Unencodable(f"{vr} value of {len(value)} bytes")
        else:
            parts.append(struct.pack("<H", len(value)))
        parts.append(value)
    return b"".join(parts)


# --- identifiers straight from index rows --------------------------------------------------

_TEXT, _PERSON_NAME, _INTEGER_STRING, _LIST, _COUNT, _FIXED = range(6)


class RowEncoder:
    """Encodes a C-FIND query's matches straight from their index rows and computed
    attributes: what :func:`encode_identifier` gives for the match's DICOM JSON, without
    building it. Made once per query from its plan (:func:`archive.query.find_matches`);
    :meth:`build` returns None for a plan it does not cover (an attribute from the stored
    JSON, a binary or DS value), and :meth:`encode` None for a match it leaves to the JSON
    path (a value that is not ASCII, a person name with several groups)."""

    def __init__(self, slots: list[tuple[bytes, bool, int, int, str, str, bytes]]) -> None:
        # (element header, 4-byte length, kind, row position, keyword, VR, fixed value), in
        # tag order
        self._slots = slots

    @classmethod
    def build(
        cls,
        plan: Iterable[tuple[int, str, str, str, int]],
        level: str,
        *,
        implicit_vr: bool,
        fixed: dict[str, tuple[str, str]],
    ) -> RowEncoder | None:
        """``fixed``: the elements every match gets, {tag: (VR, value)} (Query/Retrieve
        Level is added here)."""
        entries: dict[str, tuple[int, int, str, str, bytes]] = {}
        for source, tag, keyword, vr, position in plan:
            if source == FROM_COLUMN:
                if vr == "PN":
                    kind = _PERSON_NAME
                elif vr == "IS":
                    kind = _INTEGER_STRING
                elif vr in _STRING_VRS:
                    kind = _TEXT
                else:
                    return None
            elif source == FROM_LIST and vr in _STRING_VRS:
                kind = _LIST
            elif source == FROM_COUNT and vr == "IS":
                kind = _COUNT
            else:
                return None
            entries[tag] = (kind, position, keyword, vr, b"")
        for tag, (vr, text) in {**fixed, "00080052": ("CS", level)}.items():
            try:
                value = _padded(text.encode("ascii"), vr)
            except UnicodeError:
                return None
            entries[tag] = (_FIXED, -1, "", vr, value)
        slots = []
        for tag in sorted(entries):
            kind, position, keyword, vr, value = entries[tag]
            long_length = implicit_vr or vr in _LONG_LENGTH_VRS
            slots.append(
                (_header(tag, vr, implicit_vr), long_length, kind, position, keyword, vr, value)
            )
        return cls(slots)

    def encode(self, match: tuple[Any, dict[str, Any], dict[str, Any]]) -> bytes | None:
        row, computed, _document = match
        parts: list[bytes] = []
        append = parts.append
        try:
            for header, long_length, kind, position, keyword, vr, value in self._slots:
                if kind == _FIXED:
                    raw = value
                else:
                    if kind == _LIST:
                        text = "\\".join(computed.get(keyword) or ())
                    elif kind == _COUNT:
                        text = str(int(computed.get(keyword) or 0))
                    else:
                        column = row[position]
                        if column is None or column == "":
                            text = ""
                        elif kind == _INTEGER_STRING:
                            text = str(int(column))
                        elif type(column) is not str or (kind == _PERSON_NAME and "=" in column):
                            return None
                        else:
                            text = column
                    raw = _padded(text.encode("ascii"), vr)
                append(header)
                if long_length:
                    append(_LENGTH_4(len(raw)))
                elif len(raw) > 0xFFFF:
                    return None
                else:
                    append(_LENGTH_2(len(raw)))
                append(raw)
        except (UnicodeError, ValueError, TypeError):
            return None
        return b"".join(parts)


_LENGTH_4 = struct.Struct("<L").pack
_LENGTH_2 = struct.Struct("<H").pack


def _padded(raw: bytes, vr: str) -> bytes:
    """An even length (PS3.5 7.1.1): UIs padded with NUL, other text with a space."""
    if len(raw) % 2:
        return raw + (b"\x00" if vr == "UI" else b" ")
    return raw
