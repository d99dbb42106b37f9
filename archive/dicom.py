"""Reading what arrives: the header of a Part-10 byte stream, never its pixels.

``parse_header`` turns the bytes as received into a :class:`ParsedInstance` holding the index
attributes and the instance's DICOM JSON (PS3.18 F.2) with bulk data replaced by BulkDataURIs.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any

import pydicom
import pydicom.config
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import VR

from archive.dicom_json import dataset_to_json, raw_elements_to_json

#: Values longer than this are replaced by a BulkDataURI.
BULK_DATA_THRESHOLD = 1024
_UID_CHARS = frozenset("0123456789.")

# Values that break their VR's rules are common in real archives; read them as they are.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: Tags of the pixel data elements (PS3.3 C.7.6.3).
PIXEL_TAGS = {0x7FE00010: "OW", 0x7FE00008: "OF", 0x7FE00009: "OD"}

#: Explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
#: Every VR of PS3.5 6.2, as it appears in an explicit VR element header.
_VRS = {vr.value.encode("ascii"): vr.value for vr in VR if len(vr.value) == 2}


class InvalidInstance(ValueError):
    """The bytes are not a storable DICOM instance. ``reason`` names what is wrong."""

    def __init__(self, reason: str, *, cannot_understand: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        #: True when the stream could not be parsed at all (DIMSE 0xC000); False when it parsed
        #: but misses or contradicts a required attribute (DIMSE 0xA900).
        self.cannot_understand = cannot_understand


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


def part10_data_set_offset(data: bytes) -> int | None:
    """Where the data set of a Part-10 stream begins (PS3.10 7.1: 128-byte preamble, "DICM",
    then the File Meta Information group in Explicit VR Little Endian, whose first element
    (0002,0000) gives its length); None when the stream does not start that way or the
    group's elements do not end exactly there."""
    found = _file_meta(data)
    return None if found is None else found[0]


def _file_meta(data: bytes) -> tuple[int, dict[int, bytes]] | None:
    """(data set offset, File Meta Information values by tag), as :func:`part10_data_set_offset`
    describes; None for anything else."""
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    # (0002,0000) UL, length 4.
    if data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    offset = 144 + int.from_bytes(data[140:144], "little")
    if offset > len(data):
        return None
    values: dict[int, bytes] = {}
    position = 144
    while position < offset:
        if data[position : position + 2] != b"\x02\x00" or position + 8 > offset:
            return None
        tag = 0x00020000 | int.from_bytes(data[position + 2 : position + 4], "little")
        if data[position + 4 : position + 6] in _LONG_VRS:
            start = position + 12
            length = int.from_bytes(data[position + 8 : position + 12], "little")
        else:
            start = position + 8
            length = int.from_bytes(data[position + 6 : position + 8], "little")
        values[tag] = data[start : start + length]
        position = start + length
    if position != offset or data[offset : offset + 2] == b"\x02\x00":
        return None
    return offset, values


@dataclass(slots=True)
class _Header:
    transfer_syntax: str
    dicom_json: dict[str, Any]
    stopped_at: int  # where the pixel data element starts, or the end of the stream
    little_endian: bool
    implicit_vr: bool


@cache
def _syntax_encoding(transfer_syntax: str) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a transfer syntax the fast reader takes; None for
    deflate, big endian and unknown syntaxes."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
        return None
    return bool(uid.is_implicit_VR), True


def _fast_header(data: bytes) -> _Header | None:
    """The header of an everyday instance read straight from its bytes: a Part-10 stream
    in (Explicit or Implicit VR) Little Endian, top-level elements of defined length up to the
    pixel data, a character set without code extensions and values that
    :mod:`archive.dicom_json` converts from the raw bytes. Anything else returns None, and
    pydicom reads the stream instead (a differential test holds both to the same result)."""
    meta = _file_meta(data)
    if meta is None:
        return None
    offset, meta_values = meta
    raw_syntax = meta_values.get(0x00020010)
    if not raw_syntax:
        return None
    transfer_syntax = raw_syntax.decode("ascii", "replace").strip().rstrip("\x00")
    encoding = _syntax_encoding(transfer_syntax)
    if encoding is None:
        return None
    implicit, _ = encoding
    elements: dict[int, RawDataElement] = {}
    position, end = offset, len(data)
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
        if length == 0xFFFFFFFF or start + length > end:
            return None
        elements[tag] = RawDataElement(
            BaseTag(tag), vr, length, data[start : start + length], start, implicit, True
        )
        position = start + length
    dicom_json = raw_elements_to_json(elements, lambda _tag, _vr, path: path, BULK_DATA_THRESHOLD)
    if dicom_json is None:
        return None
    return _Header(transfer_syntax, dicom_json, position, True, implicit)


def _pydicom_header(data: bytes) -> _Header:
    """The header as pydicom reads it: every stream the fast reader leaves alone."""
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
    except InvalidDicomError as exc:
        raise InvalidInstance(f"not a DICOM Part-10 stream: {exc}", cannot_understand=True) from exc
    except (
        EOFError,
        struct.error,
        ValueError,
        TypeError,
        KeyError,
        OSError,
        NotImplementedError,
    ) as exc:
        raise InvalidInstance(f"cannot parse the data set: {exc}", cannot_understand=True) from exc
    stopped_at = fp.tell()
    try:
        # Elements are read lazily: force every header element now, so that a truncated or
        # corrupt stream is refused here and not found later by a viewer.
        dicom_json = _dicom_json(ds)
    except Exception as exc:
        raise InvalidInstance(f"cannot parse the data set: {exc}", cannot_understand=True) from exc
    meta = ds.file_meta
    meta_ts = meta.get("TransferSyntaxUID") if meta is not None else None
    transfer_syntax = str(meta_ts).strip().rstrip("\x00") if meta_ts else None
    if not transfer_syntax:
        raise InvalidInstance(
            "the File Meta Information has no Transfer Syntax UID", cannot_understand=True
        )
    implicit, little = ds.original_encoding if ds.original_encoding else (False, True)
    return _Header(transfer_syntax, dicom_json, stopped_at, little is not False, implicit is True)


def parse_header(data: bytes) -> ParsedInstance:
    """Parse a Part-10 byte stream up to the pixel data.

    Raises :class:`InvalidInstance` when the stream is not DICOM or lacks the UIDs that identify
    the instance (PS3.4 C.6 unique keys) or the SOP Class.
    """
    try:
        fast = _fast_header(data)
    except Exception:  # a value it cannot decode: pydicom's reading gives the verdict
        fast = None
    header = fast or _pydicom_header(data)
    j = dicom_json = header.dicom_json
    transfer_syntax = header.transfer_syntax
    pixel = _pixel_data_element(data, header)
    if pixel is not None:
        tag, vr = pixel
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
    )


def _pixel_data_element(data: bytes, header: _Header) -> tuple[int, str] | None:
    """The tag and VR of the pixel data element that parsing stopped before, if any.

    Also checks that the element is complete: a stream cut inside its pixel data must be refused
    even though its header parses.
    """
    offset = header.stopped_at
    remaining = len(data) - offset
    if remaining < 8:
        return None
    endian = "<" if header.little_endian else ">"
    group, elem = struct.unpack(endian + "HH", data[offset : offset + 4])
    tag = (group << 16) | elem
    if tag not in PIXEL_TAGS:
        return None
    vr = PIXEL_TAGS[tag]
    implicit = header.implicit_vr
    raw_vr = data[offset + 4 : offset + 6]
    if not implicit and raw_vr.isalpha():
        vr = raw_vr.decode("ascii")
        if remaining < 12:
            raise InvalidInstance(
                "the stream ends inside the Pixel Data element header", cannot_understand=True
            )
        (length,) = struct.unpack(endian + "L", data[offset + 8 : offset + 12])
        value_start = offset + 12
    else:
        if tag == 0x7FE00010:
            # Implicit VR: OW unless BitsAllocated <= 8 (PS3.5 A.1 c).
            bits = _int(header.dicom_json, "BitsAllocated")
            vr = "OB" if bits is not None and bits <= 8 else "OW"
        (length,) = struct.unpack(endian + "L", data[offset + 4 : offset + 8])
        value_start = offset + 8
    if length == 0xFFFFFFFF:
        # Encapsulated (PS3.5 A.4): items end with a Sequence Delimitation Item.
        delimiter = b"\xfe\xff\xdd\xe0" if endian == "<" else b"\xff\xfe\xe0\xdd"
        if data.rfind(delimiter, value_start) < 0:
            raise InvalidInstance(
                "the encapsulated Pixel Data has no Sequence Delimitation Item: the stream is "
                "truncated",
                cannot_understand=True,
            )
    elif value_start + length > len(data):
        raise InvalidInstance(
            f"the stream ends inside the Pixel Data: {len(data) - value_start} of {length} bytes",
            cannot_understand=True,
        )
    return tag, vr


def _dicom_json(ds: Dataset) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) with every bulk value replaced by a relative BulkDataURI.

    URIs are relative to the instance's URL: ``bulkdata/{tag}`` for top-level elements and
    ``bulkdata/{seq tag}/{item index}/{tag}`` inside sequences. The DICOMweb layer makes them
    absolute.
    """
    return dataset_to_json(ds, lambda _tag, _vr, path: path, BULK_DATA_THRESHOLD)


def sop_class_name(uid: str) -> str:
    return UID(uid).name
