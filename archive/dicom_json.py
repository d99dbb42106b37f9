"""DICOM JSON (PS3.18 F.2) straight from the raw elements of a parsed header.

pydicom's ``Dataset.to_json_dict`` converts every element into a ``DataElement`` first, which
costs several milliseconds per CT slice. Ingest computes the JSON of every instance, so this
module converts the common cases (explicit VR strings, numbers, person names, short binary
values) directly from the raw bytes and hands everything else to pydicom (sequences, ambiguous
or private implicit VRs, character sets other than ASCII / ISO_IR 100 / ISO_IR 192).
A differential test holds both paths to the same output.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

#: Value Representations whose values are bulk data (PS3.18 F.2.7).
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Value Representations whose values are words of 2, 4 or 8 bytes in the data set's byte order
#: (PS3.5 6.2, 7.3); OB and UN are bytes.
WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

_TEXT_WITH_CHARSET = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_SINGLE_VALUED_TEXT = frozenset({"ST", "LT", "UT", "UR"})
_PLAIN_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
_NUMERIC = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "FL": "f",
    "FD": "d",
    "UV": "Q",
    "SV": "q",
}
# Character sets whose decoding needs no ISO 2022 code extension handling (PS3.5 6.1.2.5).
_SIMPLE_CHARSETS = {
    "": "latin-1",  # default repertoire is ASCII; latin-1 never fails and maps ASCII as ASCII
    "ISO_IR 6": "latin-1",
    "ISO_IR 100": "latin-1",
    "ISO_IR 192": "utf-8",
}


class _TopLevel:
    """The charset argument of a top-level data set: it has no parent to inherit from."""


_TOP_LEVEL = _TopLevel()

BulkHandler = Callable[[int, str, str], str]
"""Called with (tag, VR, path) for a bulk value; returns its BulkDataURI."""


def raw_elements_to_json(
    elements: dict[int, RawDataElement],
    bulk_uri: BulkHandler,
    threshold: int = 1024,
    path: str = "bulkdata",
) -> dict[str, Any] | None:
    """The DICOM JSON of top-level raw elements when every one of them converts from its raw
    bytes (what :func:`dataset_to_json` gives for the same elements); None when any needs
    pydicom."""
    charset = _charset(elements)
    if charset is None:
        return None
    out: dict[str, Any] = {}
    for tag in sorted(elements):
        if (tag & 0xFFFF) == 0 or (tag >> 16) in (0x0002, 0xFFFE):
            continue
        key = f"{tag:08X}"
        converted = _raw_to_json(elements[tag], charset, threshold, bulk_uri, f"{path}/{key}")
        if converted is None:
            return None
        out[key] = converted
    return out


def little_endian_words(value: bytes, vr: str) -> bytes:
    """A big endian OW, OF, OL, OD or OV value with its words in little endian order, as
    DICOM JSON's InlineBinary and DICOMweb's bulk data carry them (PS3.18 F.2.7, 8.7.3); any
    other value as it is."""
    size = WORD_SIZES.get(vr)
    if not size or len(value) % size:
        return value
    swapped = bytearray(value)
    for offset in range(size):
        swapped[offset::size] = value[size - 1 - offset :: size]
    return bytes(swapped)


def dataset_to_json(
    ds: Dataset,
    bulk_uri: BulkHandler,
    threshold: int = 1024,
    path: str = "bulkdata",
    *,
    big_endian: bool | None = None,
    inherited_charset: str | _TopLevel | None = _TOP_LEVEL,
) -> dict[str, Any]:
    """The DICOM JSON of a data set; ``big_endian`` (by default: as the data set was read)
    says that its OW/OF/OL/OD/OV values hold big endian words, which InlineBinary gives in
    little endian order. A sequence item without its own Specific Character Set is in its
    parent's (``inherited_charset``; PS3.5 7.5.1: an item may not change it otherwise)."""
    if big_endian is None:
        encoding = ds.original_encoding
        big_endian = encoding is not None and encoding[1] is False
    if isinstance(inherited_charset, _TopLevel) or BaseTag(0x00080005) in ds._dict:
        charset = _charset(ds._dict)
    else:
        charset = inherited_charset
    out: dict[str, Any] = {}
    for tag in sorted(ds._dict):
        raw = ds._dict[tag]
        key = f"{tag:08X}"
        if (tag & 0xFFFF) == 0 or (tag >> 16) in (0x0002, 0xFFFE):
            continue  # group lengths, file meta, item delimiters are not part of the JSON
        converted = None
        if isinstance(raw, RawDataElement) and charset is not None:
            converted = _raw_to_json(raw, charset, threshold, bulk_uri, f"{path}/{key}")
        if converted is None:
            converted = _element_to_json(ds[tag], bulk_uri, threshold, path, big_endian, charset)
        out[key] = converted
    return out


def _charset(elements: Any) -> str | None:
    raw = elements.get(BaseTag(0x00080005))
    if raw is None:
        return _SIMPLE_CHARSETS[""]
    if isinstance(raw, RawDataElement):
        value = raw.value.decode("ascii", "replace").strip(" \x00") if raw.value else ""
    else:
        v = raw.value
        value = v if isinstance(v, str) else "\\".join(v)
    return _SIMPLE_CHARSETS.get(value.strip())


def _vr_of(raw: RawDataElement) -> str | None:
    if raw.VR is not None:
        return str(raw.VR)
    if not dictionary_has_tag(raw.tag):
        return None
    vr = dictionary_VR(raw.tag)
    return None if " or " in vr else vr


def _raw_to_json(
    raw: RawDataElement, charset: str, threshold: int, bulk_uri: BulkHandler, path: str
) -> dict[str, Any] | None:
    vr = _vr_of(raw)
    if vr is None or vr == "SQ" or raw.is_little_endian is False:
        return None
    if vr == "UN" and dictionary_has_tag(raw.tag):
        return None  # pydicom reads UN of a known tag with its dictionary VR (PS3.5 6.2.2)
    if raw.value is None:
        return {"vr": vr}
    value: bytes = raw.value
    if not value:
        return {"vr": vr}
    if vr in BULK_VRS:
        if len(value) > threshold:
            return {"vr": vr, "BulkDataURI": bulk_uri(raw.tag, vr, path)}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    if vr in _NUMERIC:
        code = _NUMERIC[vr]
        size = struct.calcsize("<" + code)
        if len(value) % size:
            return None
        return {"vr": vr, "Value": list(struct.unpack(f"<{len(value) // size}{code}", value))}
    if vr == "AT":
        if len(value) % 4:
            return None
        words = struct.unpack(f"<{len(value) // 2}H", value)
        return {
            "vr": vr,
            "Value": [f"{words[i]:04X}{words[i + 1]:04X}" for i in range(0, len(words), 2)],
        }
    if vr in _TEXT_WITH_CHARSET:
        text = value.decode(charset)
    elif vr in _PLAIN_TEXT or vr in ("IS", "DS"):
        text = value.decode("ascii", "replace")
    else:
        return None
    if vr in _SINGLE_VALUED_TEXT:
        text = text.rstrip(" \x00") if vr != "UR" else text.strip(" \x00")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    parts = text.split("\\")
    values: list[Any] = []
    for part in parts:
        item = part.strip(" \x00")
        if vr in ("IS", "DS"):
            if not item:
                values.append(None)
                continue
            try:
                values.append(int(item) if vr == "IS" else float(item))
            except ValueError:
                return None  # leave odd values to pydicom, which reports them
        elif vr == "PN":
            values.append(_person_name(part.rstrip(" \x00")))
        else:
            values.append(item if item else None)
    if all(v is None for v in values):
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _person_name(text: str) -> dict[str, str] | None:
    # PS3.18 F.2.2: up to three component groups, alphabetic=ideographic=phonetic.
    if not text:
        return None
    groups = text.split("=")
    result: dict[str, str] = {}
    for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False):
        if group:
            result[name] = group
    return result


def _element_to_json(
    elem: DataElement,
    bulk_uri: BulkHandler,
    threshold: int,
    path: str,
    big_endian: bool,
    charset: str | None,
) -> dict[str, Any]:
    key = f"{elem.tag:08X}"
    if elem.VR == "SQ":
        items = [
            dataset_to_json(
                item,
                bulk_uri,
                threshold,
                f"{path}/{key}/{index}",
                big_endian=big_endian,
                inherited_charset=charset,
            )
            for index, item in enumerate(elem.value or [])
        ]
        return {"vr": "SQ", "Value": items}
    vr = str(elem.VR)
    if big_endian and vr in WORD_SIZES and isinstance(elem.value, bytes) and elem.value:
        if len(elem.value) > threshold:
            return {"vr": vr, "BulkDataURI": bulk_uri(int(elem.tag), vr, f"{path}/{key}")}
        inline = little_endian_words(elem.value, vr)
        return {"vr": vr, "InlineBinary": base64.b64encode(inline).decode("ascii")}

    def handler(e: DataElement) -> str:
        return bulk_uri(int(e.tag), str(e.VR), f"{path}/{key}")

    try:
        return elem.to_json_dict(bulk_data_element_handler=handler, bulk_data_threshold=threshold)
    except Exception:
        # A value that breaks its VR: keep the attribute, leave out the value.
        return {"vr": str(elem.VR)}
