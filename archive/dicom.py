"""Reading what arrives: the header of a Part-10 byte stream, never its pixels.

``parse_header`` turns the bytes as received into a :class:`ParsedInstance` holding the index
attributes and the instance's DICOM JSON (PS3.18 F.2) with bulk data replaced by BulkDataURIs.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from typing import Any

import pydicom
import pydicom.config
from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import VR

from archive.dicom_json import dataset_to_json, raw_elements_to_json

#: Values longer than this are replaced by a BulkDataURI.
BULK_DATA_THRESHOLD = 1024
_UID_CHARS = frozenset("0123456789.")

#: Tags of the pixel data elements (PS3.3 C.7.6.3).
PIXEL_TAGS = {0x7FE00010: "OW", 0x7FE00008: "OF", 0x7FE00009: "OD"}

#: Explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
#: Every VR of PS3.5 6.2, as it appears in an explicit VR element header.
_VRS = {vr.value.encode("ascii"): vr.value for vr in VR if len(vr.value) == 2}


def configure_pydicom() -> None:
    """Read values that break their VR's rules (common in real archives) as they are, without a
    warning for each: pydicom's reading validation off for the process. Called by the archive
    when it opens (:class:`archive.Archive`), never as a side effect of an import."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


class InvalidInstance(ValueError):
    """The bytes are not a storable DICOM instance. ``reason`` names what is wrong."""

    def __init__(
        self,
        reason: str,
        *,
        cannot_understand: bool = False,
        unsupported_transfer_syntax: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        #: True when the stream could not be parsed at all (DIMSE 0xC000); False when it parsed
        #: but misses or contradicts a required attribute (DIMSE 0xA900).
        self.cannot_understand = cannot_understand
        #: True when its transfer syntax is not one the archive reads (STOW-RS 0xC122).
        self.unsupported_transfer_syntax = unsupported_transfer_syntax


@dataclass(slots=True)
class ParsedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    dicom_json: dict[str, Any]
    size: int
    sha256: str
    warning: str | None = None
    """Why the data set, stored as it is, does not quite match its SOP Class (DIMSE warning
    0xB007, PS3.4 B.2.3): native pixel data longer than its attributes need."""
    report_status: str | None = None
    """For a structured report written by an edge: the status it asked for where the SR's
    flags cannot tell it (kept in the report index, ``archive.reports``)."""


@cache
def _json_key(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def _values(j: dict[str, Any], keyword: str) -> list[Any] | None:
    element = j.get(_json_key(keyword))
    return element.get("Value") if element else None


def _person_name_string(value: dict[str, str]) -> str:
    groups = [value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _text(j: dict[str, Any], keyword: str, limit: int | None = None) -> str | None:
    """An attribute's value as DICOM text (multiple values joined by backslash)."""
    values = _values(j, keyword)
    if not values:
        return None
    parts = [
        "" if v is None else _person_name_string(v) if isinstance(v, dict) else str(v)
        for v in values
    ]
    text = "\\".join(parts).strip()
    if not text:
        return None
    return text[:limit] if limit else text


def _int(j: dict[str, Any], keyword: str) -> int | None:
    values = _values(j, keyword)
    if not values or values[0] is None:
        return None
    try:
        return int(values[0])
    except (TypeError, ValueError, OverflowError):
        return None


def _uid(j: dict[str, Any], keyword: str) -> str | None:
    text = _text(j, keyword)
    return text.rstrip("\x00") if text else None


def valid_uid(value: str) -> bool:
    """At most 64 characters of digits and dots (PS3.5 9.1).

    Components with a leading zero break PS3.5 9.1 but are common in archives; they are
    accepted so that such studies are not lost.
    """
    return 0 < len(value) <= 64 and _UID_CHARS.issuperset(value) and value.strip(".") != ""


def _person_name_search(value: str | None) -> str | None:
    """The upper-cased, normalised copy of a person name that matching uses."""
    normalised = normalise_person_name(value)
    return normalised.upper() if normalised else None


def normalise_person_name(value: str | None) -> str | None:
    """A PN without the trailing empty components and their delimiters, which PS3.5 6.2.1.1
    allows to be omitted: ``SMITH^JOHN^^^`` and ``SMITH^JOHN`` are the same name."""
    if not value:
        return value
    groups = [group.rstrip("^ ") for group in value.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups) or None


# --- what ingest accepts ---------------------------------------------------------------------
#
# Every rule below runs on every instance that enters the archive (C-STORE, STOW-RS, import),
# before anything is written. Each costs a few dictionary look-ups or a walk over the element
# headers that follow the pixel data (usually none): no pixel decode and no second parse.

#: The largest data set a deflated stream may inflate to, unless the caller gives another.
DEFAULT_MAX_INFLATED_SIZE = 128 * 2**20
#: Nesting of undefined-length sequences and items the structure check follows.
MAX_SEQUENCE_DEPTH = 32

_ITEM = 0xFFFEE000
_ITEM_DELIMITATION = 0xFFFEE00D
_SEQUENCE_DELIMITATION = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Explicit VRs that may have an undefined length (PS3.5 7.1.2, 7.5, A.4; UN: 6.2.2).
_UNDEFINED_LENGTH_VRS = frozenset((b"SQ", b"UN", b"OB", b"OW"))
_INFLATE_STEP = 2**20

_IMPLICIT_LITTLE = frozenset(("1.2.840.10008.1.2", "1.2.840.10008.1.20"))
_BIG_ENDIAN = frozenset(("1.2.840.10008.1.2.2",))
#: The data set after the File Meta Information is deflated (PS3.5 A.5; the two JPIP
#: Referenced Deflate syntaxes of Annex A deflate it the same way).
_DEFLATED = frozenset(
    ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205")
)
#: Pixel data in these is native, of defined length (PS3.5 A.1, A.2, A.3, A.5; Papyrus 3).
_NATIVE = frozenset(
    (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.20",
    )
)
#: In PS3.6 Annex A, but not encodings of a binary data set.
_NOT_DATA_SET_ENCODINGS = frozenset(("1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2"))


@dataclass(frozen=True, slots=True)
class Encoding:
    """How a transfer syntax encodes the data set (PS3.5 10, Annex A)."""

    implicit_vr: bool
    little_endian: bool
    deflated: bool
    native: bool
    """Pixel Data is native (not encapsulated): its length follows from the image attributes."""


def _known_transfer_syntaxes() -> dict[str, Encoding]:
    from pydicom._uid_dict import UID_dictionary

    return {
        uid: Encoding(
            implicit_vr=uid in _IMPLICIT_LITTLE,
            little_endian=uid not in _BIG_ENDIAN,
            deflated=uid in _DEFLATED,
            native=uid in _NATIVE,
        )
        for uid, entry in UID_dictionary.items()
        if entry[1] == "Transfer Syntax" and uid not in _NOT_DATA_SET_ENCODINGS
    }


#: The transfer syntaxes the archive holds: every one of PS3.6 Annex A (retired ones too: old
#: archives hold them) whose data set it can read. Private transfer syntaxes are refused: how
#: they encode the data set is known only to their vendor, so the archive could neither check
#: nor index such an instance, and no client could read it back; the DIMSE side never
#: negotiates them either.
KNOWN_TRANSFER_SYNTAXES: dict[str, Encoding] = _known_transfer_syntaxes()


@dataclass(frozen=True, slots=True)
class _Stream:
    """A Part-10 stream ready to read: ``data`` holds the File Meta Information and the data
    set from ``offset`` on, inflated when the transfer syntax deflates it."""

    data: bytes
    offset: int
    transfer_syntax: str
    encoding: Encoding
    implicit_vr: bool
    little_endian: bool


def _cannot_understand(reason: str) -> InvalidInstance:
    return InvalidInstance(reason, cannot_understand=True)


NOT_PART10 = "not a DICOM Part-10 stream: no DICM prefix after the 128-byte preamble (PS3.10 7.1)"


def looks_like_part10(head: bytes) -> bool:
    """Whether the first 132 bytes of a stream may begin a Part-10 instance: ``DICM`` after the
    preamble, or (a stream written without preamble) the File Meta Information group at once.
    Lets an edge refuse what is not DICOM before reading it whole."""
    return head[128:132] == b"DICM" or head[:2] == b"\x02\x00"


def _file_meta_elements(data: bytes) -> tuple[int, dict[int, bytes], str | None]:
    """Group 0002 of a Part-10 stream (PS3.10 7.1: a 128-byte preamble, ``DICM``, then the File
    Meta Information in Explicit VR Little Endian), read element by element while the group
    number is 0002: (where it ends, its values by tag, why it is cut short or None when whole).
    The one reader of the File Meta Information: ingest, the readers of stored files and the
    DIMSE sender all see the same group, as pydicom reads it."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise _cannot_understand(NOT_PART10)
    values: dict[int, bytes] = {}
    position, end = 132, len(data)
    unpack = struct.unpack_from
    while position + 8 <= end:
        group, element, raw_vr, length = unpack("<HH2sH", data, position)
        if group != 0x0002:
            break
        tag = 0x00020000 | element
        if raw_vr not in _VRS:
            raise _cannot_understand(
                f"File Meta Information element ({_tag(tag)}) is not Explicit VR Little "
                "Endian (PS3.10 7.1)"
            )
        start = position + 8
        if raw_vr in _LONG_VRS:
            if position + 12 > end:
                return position, values, f"the stream ends inside the header of ({_tag(tag)})"
            (length,) = unpack("<L", data, start)
            start += 4
        if start + length > end:
            return (
                position,
                values,
                f"the stream ends inside ({_tag(tag)}): {end - start} of its {length} bytes",
            )
        position = start + length
        values[tag] = data[start:position]
    if position + 8 > end and data[position : position + 2] == b"\x02\x00":
        return position, values, f"the stream ends inside an element header at byte {position}"
    return position, values, None


def _group_length_error(data: bytes, position: int, values: dict[int, bytes]) -> str | None:
    """Why the File Meta Information Group Length (0002,0000), when present, is not the
    group's length: readers that trust it and readers that follow the group number would
    otherwise see different data sets in one stream."""
    group_length = values.get(0x00020000)
    if group_length is None:
        return None
    actual = position - 144
    declared = int.from_bytes(group_length, "little") if len(group_length) == 4 else -1
    if len(group_length) != 4 or data[132:136] != b"\x02\x00\x00\x00" or declared != actual:
        return (
            f"File Meta Information Group Length (0002,0000) is {declared}, but the group "
            f"takes {actual} bytes (PS3.10 7.1)"
        )
    return None


def _read_file_meta(data: bytes) -> tuple[int, dict[int, bytes]]:
    """(data set offset, File Meta Information values by tag) of a stream ingest may take:
    the group whole, with at least one element, and its Group Length (0002,0000), when
    present, equal to its length. Raises :class:`InvalidInstance` otherwise."""
    if data[132:140] == b"\x02\x00\x00\x00UL\x04\x00" and len(data) >= 144:
        (declared,) = struct.unpack_from("<L", data, 140)
        if 144 + declared > len(data):
            raise _cannot_understand(
                f"the stream ends inside the File Meta Information: {len(data) - 144} of its "
                f"{declared} bytes"
            )
    position, values, cut = _file_meta_elements(data)
    if cut is not None:
        raise _cannot_understand(cut)
    if not values:
        raise _cannot_understand("no File Meta Information after the DICM prefix (PS3.10 7.1)")
    error = _group_length_error(data, position, values)
    if error is not None:
        raise _cannot_understand(error)
    return position, values


@dataclass(frozen=True, slots=True)
class FileMeta:
    """The File Meta Information of a stored Part-10 file (PS3.10 7.1), as ingest read it."""

    data_set_offset: int
    """Where the data set starts: the end of group 0002."""
    transfer_syntax: str
    """Transfer Syntax UID (0002,0010); empty when there is none."""
    group_length_agrees: bool
    """(0002,0000) is absent, or gives the group's real length."""

    @property
    def encoding(self) -> Encoding | None:
        """How the transfer syntax encodes the data set; None for one the archive does not
        know."""
        return KNOWN_TRANSFER_SYNTAXES.get(self.transfer_syntax)

    @property
    def deflated(self) -> bool:
        """The data set after the File Meta Information is deflated (PS3.5 A.5)."""
        encoding = self.encoding
        return encoding is not None and encoding.deflated


def read_file_meta(data: bytes) -> FileMeta | None:
    """The File Meta Information at the start of ``data`` (a stored file, or its first bytes),
    read as ingest reads it (:func:`_file_meta_elements`, with or without a Group Length);
    None when ``data`` does not hold a whole one. Never raises."""
    try:
        position, values, cut = _file_meta_elements(data)
    except InvalidInstance:
        return None
    if cut is not None or not values:
        return None
    raw = values.get(0x00020010, b"")
    return FileMeta(
        data_set_offset=position,
        transfer_syntax=raw.decode("latin-1").strip(" \x00"),
        group_length_agrees=_group_length_error(data, position, values) is None,
    )


def part10_data_set_offset(data: bytes) -> int | None:
    """Where the data set of a stored Part-10 file begins (:func:`read_file_meta`); None when
    the stream holds no whole File Meta Information, or a Group Length (0002,0000) that
    disagrees with it."""
    meta = read_file_meta(data)
    if meta is None or not meta.group_length_agrees:
        return None
    return meta.data_set_offset


def _tag(tag: int) -> str:
    return f"{tag >> 16:04X},{tag & 0xFFFF:04X}"


def _syntax_of(meta: dict[int, bytes]) -> str:
    raw = meta.get(0x00020010)
    syntax = raw.decode("latin-1").strip(" \x00") if raw else ""
    if not syntax:
        raise _cannot_understand("the File Meta Information has no Transfer Syntax UID")
    return syntax


def identify(data: bytes) -> tuple[str, str]:
    """Best-effort (SOP Class UID, SOP Instance UID) of a stream that could not be stored, from
    its File Meta Information (Media Storage SOP Class/Instance UID, PS3.10 7.1); never reads
    the data set, so junk costs nothing. Empty strings when unknown."""
    try:
        _, meta, _cut = _file_meta_elements(data)
    except InvalidInstance:
        return "", ""
    found = []
    for tag in (0x00020002, 0x00020003):
        value = meta.get(tag, b"").decode("latin-1").strip(" \x00")
        found.append(value if valid_uid(value) else "")
    return found[0], found[1]


def _inflate(deflated: memoryview, limit: int) -> bytes:
    """A deflated data set (PS3.5 A.5) inflated step by step, refused once it grows past
    ``limit`` bytes: a small stream that inflates to gigabytes never fills memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: bytes | memoryview = deflated
    try:
        while True:
            piece = inflater.decompress(pending, min(_INFLATE_STEP, limit + 1 - len(out)))
            out += piece
            if len(out) > limit:
                raise _cannot_understand(
                    f"the deflated data set inflates to more than {limit // 2**20} MB "
                    "(max_inflated_size_mb)"
                )
            if inflater.eof:
                break
            pending = inflater.unconsumed_tail
            if not pending and not piece:
                raise _cannot_understand("the stream ends inside the deflated data set")
    except zlib.error as exc:
        raise _cannot_understand(f"the deflated data set cannot be inflated: {exc}") from exc
    # Bytes after the end of the deflate stream (some writers leave a gzip trailer) are no
    # part of the data set: every reader stops where the stream ends.
    return bytes(out)


def _prepare(data: bytes, max_inflated_size: int) -> _Stream:
    """The stream's File Meta Information checked and its data set ready to read; raises
    :class:`InvalidInstance` for a stream that is not Part-10, a wrong group length, an
    unknown transfer syntax or a deflated data set that does not inflate within the limit."""
    offset, meta = _read_file_meta(data)
    syntax = _syntax_of(meta)
    encoding = KNOWN_TRANSFER_SYNTAXES.get(syntax)
    if encoding is None:
        shown = ascii(syntax[:64])[1:-1]
        raise InvalidInstance(
            f"unknown transfer syntax {shown}: not one of PS3.6 Annex A this archive reads",
            cannot_understand=True,
            unsupported_transfer_syntax=True,
        )
    if encoding.deflated:
        inflated = _inflate(memoryview(data)[offset:], max_inflated_size)
        return _Stream(data[:offset] + inflated, offset, syntax, encoding, False, True)
    return _Stream(data, offset, syntax, encoding, encoding.implicit_vr, encoding.little_endian)


def _walk(
    data: bytes,
    position: int,
    little_endian: bool,
    implicit_vr: bool,
    *,
    stop_at_pixels: bool,
) -> int:
    """Follow the data set's top-level elements from ``position`` to the end of the stream,
    through undefined-length sequences and encapsulated pixel data; return the end, or where
    the first pixel data element starts when ``stop_at_pixels``. A stream whose last element
    is cut short (PS3.5 7.1: each value is exactly as long as its Value Length says) raises
    :class:`InvalidInstance`, and so does one that is not encoded as its transfer syntax says.
    Values of defined length are skipped, never read."""
    end = len(data)
    u16, u32, tag_format = ("<H", "<L", "<HH") if little_endian else (">H", ">L", ">HH")
    unpack = struct.unpack_from
    while position < end:
        if stop_at_pixels and position + 4 <= end:
            group, element = unpack(tag_format, data, position)
            if (group << 16 | element) in PIXEL_TAGS:
                return position
        position = _element(data, position, end, little_endian, implicit_vr, 0, u16, u32)
    return position


def _element(
    data: bytes,
    position: int,
    end: int,
    little_endian: bool,
    implicit_vr: bool,
    depth: int,
    u16: str,
    u32: str,
) -> int:
    """Where the element at ``position`` ends (see :func:`_walk`)."""
    unpack = struct.unpack_from
    if position + 8 > end:
        raise _cannot_understand(f"the stream ends inside an element header at byte {position}")
    (group,) = unpack(u16, data, position)
    (elem,) = unpack(u16, data, position + 2)
    tag = group << 16 | elem
    if group == 0xFFFE:
        raise _cannot_understand(f"item tag ({_tag(tag)}) outside a sequence at byte {position}")
    raw_vr = b""
    if implicit_vr:
        (length,) = unpack(u32, data, position + 4)
        start = position + 8
    else:
        raw_vr = data[position + 4 : position + 6]
        if raw_vr not in _VRS:
            raise _cannot_understand(
                f"({_tag(tag)}) has no valid VR: the data set is not encoded in the explicit "
                "VR its transfer syntax names"
            )
        if raw_vr in _LONG_VRS:
            if position + 12 > end:
                raise _cannot_understand(f"the stream ends inside the header of ({_tag(tag)})")
            (length,) = unpack(u32, data, position + 8)
            start = position + 12
        else:
            (length,) = unpack(u16, data, position + 6)
            start = position + 8
    if length == _UNDEFINED_LENGTH:
        if not implicit_vr and raw_vr not in _UNDEFINED_LENGTH_VRS:
            raise _cannot_understand(
                f"({_tag(tag)}) has an undefined length, which VR {raw_vr.decode()} cannot "
                "have (PS3.5 7.1.2)"
            )
        # A sequence (PS3.5 7.5), or encapsulated pixel data (A.4). UN of undefined length is
        # a sequence too (PS3.5 6.2.2), read as pydicom reads it: in the data set's encoding,
        # each item in the VR encoding its first element shows (6.2.2 asks for Implicit VR
        # Little Endian; writers that relabel an SQ as UN leave Explicit VR items).
        return _items(data, start, end, little_endian, implicit_vr, tag, depth + 1)
    if start + length > end:
        where = "the Pixel Data" if tag == 0x7FE00010 else f"({_tag(tag)})"
        raise _cannot_understand(
            f"the stream ends inside {where}: {end - start} of its {length} bytes"
        )
    return start + length


def _items(
    data: bytes,
    position: int,
    end: int,
    little_endian: bool,
    implicit_vr: bool,
    parent: int,
    depth: int,
) -> int:
    """Where an undefined-length value (items up to a Sequence Delimitation Item, PS3.5 7.5.2
    and A.4) starting at ``position`` ends."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise _cannot_understand(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    u16, u32, item_header = ("<H", "<L", "<HHL") if little_endian else (">H", ">L", ">HHL")
    unpack = struct.unpack_from
    while True:
        if position + 8 > end:
            raise _cannot_understand(
                f"the stream ends inside ({_tag(parent)}): no Sequence Delimitation Item"
            )
        group, elem, length = unpack(item_header, data, position)
        tag = group << 16 | elem
        if tag == _SEQUENCE_DELIMITATION:
            return position + 8
        if tag != _ITEM:
            raise _cannot_understand(
                f"({_tag(parent)}) holds ({_tag(tag)}) where an item must be (PS3.5 7.5)"
            )
        position += 8
        if length != _UNDEFINED_LENGTH:
            if position + length > end:
                raise _cannot_understand(
                    f"the stream ends inside an item of ({_tag(parent)}): "
                    f"{end - position} of its {length} bytes"
                )
            position += length
            continue
        # An item of undefined length: its elements, up to an Item Delimitation Item. Each
        # item of an Explicit VR data set is read in the VR encoding its first element shows
        # (Implicit VR items are common); items of an Implicit VR data set are Implicit VR, as
        # pydicom reads them: it never switches a sequence from Implicit to Explicit VR.
        item_implicit = implicit_vr or _looks_implicit(data, position, end)
        item_start = position
        try:
            while True:
                if position + 8 > end:
                    raise _cannot_understand(
                        f"the stream ends inside an item of ({_tag(parent)}): no Item "
                        "Delimitation Item"
                    )
                (group,) = unpack(u16, data, position)
                (elem,) = unpack(u16, data, position + 2)
                if (group << 16 | elem) == _ITEM_DELIMITATION:
                    position += 8
                    break
                position = _element(
                    data, position, end, little_endian, item_implicit, depth, u16, u32
                )
        except InvalidInstance:
            if implicit_vr and not _looks_implicit(data, item_start, end):
                # Read in Implicit VR, an Explicit VR item gives nonsense lengths: say so.
                raise _cannot_understand(
                    f"({_tag(parent)}) holds an item in Explicit VR in an Implicit VR data set "
                    "(PS3.5 7.5): it cannot be read"
                ) from None
            raise


def _looks_implicit(data: bytes, position: int, end: int) -> bool:
    """Whether the element at ``position`` is in Implicit VR: its VR bytes are not two
    upper-case letters. Writers that label an Implicit VR data set as Explicit (or the other
    way round) exist; pydicom and DCMTK read such data sets by this test, and so does the
    archive."""
    if position + 6 > end:
        return False
    first, second = data[position + 4], data[position + 5]
    return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)


def _detected_implicit(stream: _Stream) -> bool:
    """The VR encoding of the data set's top level: its transfer syntax's, unless the first
    element says otherwise (as pydicom decides)."""
    data, offset = stream.data, stream.offset
    found = _looks_implicit(data, offset, len(data))
    if found == stream.implicit_vr or offset + 6 > len(data):
        return stream.implicit_vr
    group, element = struct.unpack_from("<HH" if stream.little_endian else ">HH", data, offset)
    if (group << 16 | element) in PIXEL_TAGS:
        return stream.implicit_vr
    return found


@dataclass(slots=True)
class _Header:
    transfer_syntax: str
    dicom_json: dict[str, Any]
    stopped_at: int  # where the pixel data element starts, or the end of the stream
    little_endian: bool
    implicit_vr: bool


def _fast_header(data: bytes, max_inflated_size: int = DEFAULT_MAX_INFLATED_SIZE) -> _Header | None:
    """The fast reader's header of a Part-10 stream (see :func:`_fast_read`), None when it
    leaves the stream to pydicom or the stream is refused before reading."""
    try:
        stream = _prepare(data, max_inflated_size)
    except InvalidInstance:
        return None
    return _fast_read(stream)


def _fast_read(stream: _Stream) -> _Header | None:
    """The header of an everyday instance read straight from its bytes: (Explicit or Implicit
    VR) Little Endian (deflated ones inflated), top-level elements of defined length up to the
    pixel data, a character set without code extensions and values that
    :mod:`archive.dicom_json` converts from the raw bytes. Anything else returns None, and
    pydicom reads the stream instead (a differential test holds both to the same result)."""
    if not stream.little_endian:
        return None
    data, implicit = stream.data, stream.implicit_vr
    elements: dict[int, RawDataElement] = {}
    position, end = stream.offset, len(data)
    unpack = struct.unpack_from
    while position < end:
        if position + 8 > end:
            return None
        group, element = unpack("<HH", data, position)
        tag = group << 16 | element
        if tag in PIXEL_TAGS:
            break
        if group in (0x0002, 0xFFFE):
            return None
        vr: str | None
        if implicit:
            vr = None
            (length,) = unpack("<L", data, position + 4)
            start = position + 8
            if dictionary_has_tag(tag) and dictionary_VR(tag) == "SQ":
                return None
        else:
            vr = _VRS.get(data[position + 4 : position + 6])
            if vr is None or vr == "SQ":
                return None
            if data[position + 4 : position + 6] in _LONG_VRS:
                if position + 12 > end:
                    return None
                (length,) = unpack("<L", data, position + 8)
                start = position + 12
            else:
                (length,) = unpack("<H", data, position + 6)
                start = position + 8
        if length == _UNDEFINED_LENGTH or start + length > end:
            return None
        elements[tag] = RawDataElement(
            BaseTag(tag), vr, length, data[start : start + length], start, implicit, True
        )
        position = start + length
    dicom_json = raw_elements_to_json(elements, lambda _tag, _vr, path: path, BULK_DATA_THRESHOLD)
    if dicom_json is None:
        return None
    return _Header(stream.transfer_syntax, dicom_json, position, True, implicit)


def _at_pixel_data(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag in PIXEL_TAGS


def _pydicom_header(data: bytes, max_inflated_size: int = DEFAULT_MAX_INFLATED_SIZE) -> _Header:
    """The header as pydicom reads it (see :func:`_pydicom_read`)."""
    return _pydicom_read(_prepare(data, max_inflated_size))


def _pydicom_read(stream: _Stream) -> _Header:
    """The header as pydicom reads it: every stream the fast reader leaves alone. The element
    structure is checked first, so that pydicom, which reads a value cut short as a shorter
    value, is only given streams whose every element is whole."""
    implicit_vr = _detected_implicit(stream)
    stopped_at = _walk(
        stream.data, stream.offset, stream.little_endian, implicit_vr, stop_at_pixels=True
    )
    fp = io.BytesIO(stream.data)
    fp.seek(stream.offset)
    try:
        ds = read_dataset(fp, implicit_vr, stream.little_endian, stop_when=_at_pixel_data)
        # Elements are read lazily: force every header element now, so that a corrupt value
        # is refused here and not found later by a viewer.
        dicom_json = _dicom_json(ds)
    except Exception as exc:  # pydicom raises many kinds on corrupt values
        raise _cannot_understand(f"cannot parse the data set: {exc}") from exc
    implicit, _little = ds.original_encoding
    if fp.tell() != stopped_at or implicit is not implicit_vr:
        raise _cannot_understand(
            f"the data set is not encoded as its transfer syntax {stream.transfer_syntax} says"
        )
    return _Header(stream.transfer_syntax, dicom_json, stopped_at, stream.little_endian, implicit)


def parse_header(
    data: bytes, *, max_inflated_size: int = DEFAULT_MAX_INFLATED_SIZE
) -> ParsedInstance:
    """Parse a Part-10 byte stream up to the pixel data, and check what ingest accepts.

    Raises :class:`InvalidInstance` when the stream is not a whole Part-10 instance the archive
    can hold: not Part-10, a wrong File Meta Information Group Length, an unknown transfer
    syntax, a deflated data set larger than ``max_inflated_size`` inflated, an element cut
    short (header or pixel data), native pixel data whose length disagrees with the image
    attributes, an image without pixel data, or no UIDs to identify the instance (PS3.4 C.6
    unique keys) and its SOP Class.
    """
    stream = _prepare(data, max_inflated_size)
    try:
        fast = _fast_read(stream)
    except Exception:  # a value it cannot decode: pydicom's reading gives the verdict
        fast = None
    header = fast or _pydicom_read(stream)
    j = dicom_json = header.dicom_json
    transfer_syntax = header.transfer_syntax
    pixel = _pixel_data_element(stream, header)
    warning = None
    if pixel is not None:
        tag, vr, warning = pixel
        dicom_json[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"bulkdata/{tag:08X}"}

    sop_class = _uid(j, "SOPClassUID")
    sop_instance = _uid(j, "SOPInstanceUID")
    study_uid = _uid(j, "StudyInstanceUID")
    series_uid = _uid(j, "SeriesInstanceUID")
    for keyword, value in (
        ("SOPClassUID", sop_class),
        ("SOPInstanceUID", sop_instance),
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
    ):
        if not value:
            raise InvalidInstance(f"the data set has no {keyword}")
        if not valid_uid(value):
            raise InvalidInstance(f"{keyword} {value!r} is not a valid UID (PS3.5 9.1)")
    assert sop_class and sop_instance and study_uid and series_uid
    if pixel is None and _is_image(sop_class) and _PIXEL_DATA_PROVIDER_URL not in j:
        raise InvalidInstance(
            f"no Pixel Data in an instance of {sop_class_name(sop_class)} (PS3.3 C.7.6.3): "
            "the data set may be cut short"
        )

    patient_name = _text(j, "PatientName", 324)
    referring = _text(j, "ReferringPhysicianName", 324)
    return ParsedInstance(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=transfer_syntax,
        patient={
            "patient_id": _text(j, "PatientID", 64) or "",
            "issuer_of_patient_id": _text(j, "IssuerOfPatientID", 64) or "",
            "patient_name": patient_name,
            "patient_name_search": _person_name_search(patient_name),
            "patient_birth_date": _text(j, "PatientBirthDate", 8),
            "patient_sex": _text(j, "PatientSex", 16),
        },
        study={
            "study_date": _text(j, "StudyDate", 8),
            "study_time": _text(j, "StudyTime", 16),
            "accession_number": _text(j, "AccessionNumber", 16),
            "study_id": _text(j, "StudyID", 16),
            "study_description": _text(j, "StudyDescription", 64),
            "referring_physician_name": referring,
            "referring_physician_name_search": _person_name_search(referring),
            "institution_name": _text(j, "InstitutionName", 64),
            "specific_character_set": _text(j, "SpecificCharacterSet", 64),
        },
        series={
            "modality": _text(j, "Modality", 16),
            "series_number": _int(j, "SeriesNumber"),
            "series_description": _text(j, "SeriesDescription", 64),
            "body_part_examined": _text(j, "BodyPartExamined", 16),
            "series_date": _text(j, "SeriesDate", 8),
            "series_time": _text(j, "SeriesTime", 16),
            "protocol_name": _text(j, "ProtocolName", 64),
            "station_name": _text(j, "StationName", 16),
            "manufacturer": _text(j, "Manufacturer", 64),
            "performed_procedure_step_start_date": _text(
                dicom_json, "PerformedProcedureStepStartDate", 8
            ),
            "performed_procedure_step_start_time": _text(j, "PerformedProcedureStepStartTime", 16),
        },
        instance={
            "instance_number": _int(j, "InstanceNumber"),
            "number_of_frames": _int(j, "NumberOfFrames"),
            "rows": _int(j, "Rows"),
            "columns": _int(j, "Columns"),
            "content_date": _text(j, "ContentDate", 8),
            "content_time": _text(j, "ContentTime", 16),
        },
        dicom_json=dicom_json,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        warning=warning,
    )


_PIXEL_DATA_PROVIDER_URL = "00287FE0"  # instead of Pixel Data in JPIP syntaxes (PS3.3 C.7.6.3)
#: Photometric interpretations whose native pixels hold two samples' worth per pixel: Y Y Cb Cr
#: for each pair of pixels (PS3.3 C.7.6.3.1.2).
HALF_CHROMA = frozenset(("YBR_FULL_422", "YBR_PARTIAL_422"))
#: VRs of pixel data elements: OB or OW, OF, OD (PS3.5 8), UN where the sender did not know.
_PIXEL_VRS = frozenset((b"OB", b"OW", b"OF", b"OD", b"UN"))
#: Bytes per sample of Float and Double Float Pixel Data (PS3.3 C.7.6.24).
_FLOAT_SAMPLE = {0x7FE00008: 4, 0x7FE00009: 8}


@cache
def _is_image(sop_class: str) -> bool:
    """An image SOP Class: its IOD has the Image Pixel Module, so Pixel Data (or Float or
    Double Float Pixel Data, or a Pixel Data Provider URL) is required (PS3.3 C.7.6.3)."""
    return "Image Storage" in UID(sop_class).name


def _pixel_data_element(stream: _Stream, header: _Header) -> tuple[int, str, str | None] | None:
    """The tag and VR of the pixel data element that reading stopped before, if any, and a
    warning when its native pixel data is longer than the image attributes need.

    Also checks that it and every element after it are whole, that encapsulated pixel data
    appears only in an encapsulated transfer syntax, and that native pixel data is at least as
    long as the image attributes say.
    """
    data, offset = stream.data, header.stopped_at
    _walk(data, offset, stream.little_endian, header.implicit_vr, stop_at_pixels=False)
    if offset >= len(data):
        return None
    endian = "<" if stream.little_endian else ">"
    group, elem = struct.unpack_from(endian + "HH", data, offset)
    tag = (group << 16) | elem
    if tag not in PIXEL_TAGS:
        return None
    vr = PIXEL_TAGS[tag]
    raw_vr = data[offset + 4 : offset + 6]
    if not header.implicit_vr:
        if raw_vr not in _PIXEL_VRS:
            raise _cannot_understand(
                f"({_tag(tag)}) has VR {raw_vr.decode()}, not one pixel data can have (PS3.5 8)"
            )
        vr = raw_vr.decode("ascii")
        (length,) = struct.unpack_from(endian + "L", data, offset + 8)
    else:
        if tag == 0x7FE00010:
            # Implicit VR: OW unless BitsAllocated <= 8 (PS3.5 A.1 c).
            bits = _int(header.dicom_json, "BitsAllocated")
            vr = "OB" if bits is not None and bits <= 8 else "OW"
        (length,) = struct.unpack_from(endian + "L", data, offset + 4)
    warning = None
    if length == _UNDEFINED_LENGTH:
        if stream.encoding.native or tag != 0x7FE00010:
            raise _cannot_understand(
                f"encapsulated ({_tag(tag)}) in the native transfer syntax "
                f"{stream.transfer_syntax} (PS3.5 A.4)"
            )
    elif stream.encoding.native or tag != 0x7FE00010:
        warning = _check_pixel_length(header.dicom_json, tag, length)
    return tag, vr, warning


def _check_pixel_length(j: dict[str, Any], tag: int, length: int) -> str | None:
    """Native pixel data holds Rows x Columns x Samples per Pixel x Bits Allocated x Number of
    Frames bits, packed when Bits Allocated is 1 (PS3.5 8.1.1), padded to an even length
    (PS3.5 7.1.1); YBR_FULL_422 holds two samples' worth per pixel (PS3.3 C.7.6.3.1.2).

    Shorter pixel data is refused: the instance is cut or corrupt, and its last frames cannot
    be read. Longer pixel data is stored as sent, and the returned warning says by how much:
    real modalities write it (padding after the last frame, a byte per frame of 1-bit
    segmentations, full chroma under a 4:2:2 label), and every frame the attributes describe
    is there; pydicom reads such data too."""
    rows, columns = _int(j, "Rows"), _int(j, "Columns")
    bits = 8 * _FLOAT_SAMPLE[tag] if tag in _FLOAT_SAMPLE else _int(j, "BitsAllocated")
    if rows is None or columns is None or bits is None:
        raise InvalidInstance(
            f"({_tag(tag)}) without Rows, Columns and Bits Allocated to size it (PS3.3 C.7.6.3)"
        )
    samples = _int(j, "SamplesPerPixel") or 1
    frames = _int(j, "NumberOfFrames") or 1
    effective = samples
    if samples == 3 and _text(j, "PhotometricInterpretation") in HALF_CHROMA:
        effective = 2
    expected = (rows * columns * effective * bits * frames + 7) // 8
    if length == expected or (length == expected + 1 and expected % 2):
        return None
    name = "Pixel Data" if tag == 0x7FE00010 else dictionary_keyword(tag)
    attributes = (
        f"Rows {rows} x Columns {columns} x Samples per Pixel {samples} x Bits Allocated "
        f"{bits} x Number of Frames {frames} (PS3.5 8.1.1)"
    )
    if length > expected and min(rows, columns, samples, bits, frames) > 0:
        return (
            f"{name} is {length - expected} bytes longer than its attributes need "
            f"({expected}): {attributes}; stored as sent"
        )
    raise InvalidInstance(
        f"{name} has {length} bytes; its attributes need {expected}: {attributes}"
    )


def _dicom_json(ds: Dataset) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) with every bulk value replaced by a relative BulkDataURI.

    URIs are relative to the instance's URL: ``bulkdata/{tag}`` for top-level elements and
    ``bulkdata/{seq tag}/{item index}/{tag}`` inside sequences. The DICOMweb layer makes them
    absolute.
    """
    return dataset_to_json(ds, lambda _tag, _vr, path: path, BULK_DATA_THRESHOLD)


def sop_class_name(uid: str) -> str:
    return UID(uid).name
