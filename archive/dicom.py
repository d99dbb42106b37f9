"""Reading what arrives: the header of a Part-10 byte stream, never its pixels.

``parse_header`` turns the bytes as received into a :class:`ParsedInstance` holding the index
attributes and the instance's DICOM JSON (PS3.18 F.2) with bulk data replaced by BulkDataURIs.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pydicom
import pydicom.config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from archive.dicom_json import dataset_to_json

#: Values longer than this are replaced by a BulkDataURI.
BULK_DATA_THRESHOLD = 1024
_UID_CHARS = frozenset("0123456789.")

# Values that break their VR's rules are common in real archives; read them as they are.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: Tags of the pixel data elements (PS3.3 C.7.6.3).
PIXEL_TAGS = {0x7FE00010: "OW", 0x7FE00008: "OF", 0x7FE00009: "OD"}


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
    dataset: Dataset = field(repr=False)


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


def parse_header(data: bytes) -> ParsedInstance:
    """Parse a Part-10 byte stream up to the pixel data.

    Raises :class:`InvalidInstance` when the stream is not DICOM or lacks the UIDs that identify
    the instance (PS3.4 C.6 unique keys) or the SOP Class.
    """
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
    pixel = _pixel_data_element(data, stopped_at, ds)
    if pixel is not None:
        tag, vr = pixel
        dicom_json[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"bulkdata/{tag:08X}"}

    meta = ds.file_meta
    j = dicom_json
    meta_ts = meta.get("TransferSyntaxUID") if meta is not None else None
    transfer_syntax = str(meta_ts).strip().rstrip("\x00") if meta_ts else None
    if not transfer_syntax:
        raise InvalidInstance(
            "the File Meta Information has no Transfer Syntax UID", cannot_understand=True
        )

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
        dataset=ds,
    )


def _pixel_data_element(data: bytes, offset: int, ds: Dataset) -> tuple[int, str] | None:
    """The tag and VR of the pixel data element that parsing stopped before, if any.

    Also checks that the element is complete: a stream cut inside its pixel data must be refused
    even though its header parses.
    """
    remaining = len(data) - offset
    if remaining < 8:
        return None
    little = ds.original_encoding[1] if ds.original_encoding else True
    endian = "<" if little is not False else ">"
    group, elem = struct.unpack(endian + "HH", data[offset : offset + 4])
    tag = (group << 16) | elem
    if tag not in PIXEL_TAGS:
        return None
    vr = PIXEL_TAGS[tag]
    # original_encoding is (is_implicit_VR, is_little_endian)
    implicit = ds.original_encoding[0] if ds.original_encoding else False
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
            bits = ds.get("BitsAllocated")
            vr = "OB" if isinstance(bits, int) and bits <= 8 else "OW"
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
