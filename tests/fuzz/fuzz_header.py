"""Fuzz the header reader of ingest (``archive.dicom.parse_header``) with atheris.

Every input either parses or is refused with ``InvalidInstance``; any other exception is a crash.
A parsed input must also satisfy what ingest relies on: four valid UIDs, a known transfer
syntax, and a pixel data BulkDataURI only when the stream holds that pixel data element (and
for an image SOP Class, one unless a Pixel Data Provider URL stands in for it).

    .venv/bin/python tests/fuzz/fuzz_header.py WORK_DIR tests/fuzz/corpus/header -max_total_time=600

(``WORK_DIR`` receives the new inputs libFuzzer finds; the committed seeds stay as they are.)
"""

from __future__ import annotations

import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

#: Coverage guides the fuzzer through these (instrumenting everything the archive imports,
#: SQLAlchemy included, would take minutes at each start).
INSTRUMENTED = [
    "archive.dicom",
    "archive.dicom_json",
    "pydicom.filereader",
    "pydicom.values",
    "pydicom.valuerep",
    "pydicom.charset",
    "pydicom.dataelem",
    "pydicom.dataset",
    "pydicom.sequence",
]

with atheris.instrument_imports(include=INSTRUMENTED):
    from archive.dicom import (
        KNOWN_TRANSFER_SYNTAXES,
        PIXEL_TAGS,
        InvalidInstance,
        _is_image,
        _prepare,
        configure_pydicom,
        parse_header,
        valid_uid,
    )

#: Small, so that deflate bombs are refused quickly.
MAX_INFLATED_SIZE = 1 << 20


def test_one_input(data: bytes) -> None:
    try:
        parsed = parse_header(data, max_inflated_size=MAX_INFLATED_SIZE)
    except InvalidInstance as exc:
        if not exc.reason:
            raise AssertionError("InvalidInstance without a reason") from exc
        return
    for uid in (
        parsed.sop_class_uid,
        parsed.sop_instance_uid,
        parsed.study_instance_uid,
        parsed.series_instance_uid,
    ):
        if not valid_uid(uid):
            raise AssertionError(f"accepted an invalid UID {uid!r}")
    if parsed.transfer_syntax_uid not in KNOWN_TRANSFER_SYNTAXES:
        raise AssertionError(f"accepted transfer syntax {parsed.transfer_syntax_uid!r}")
    if parsed.size != len(data):
        raise AssertionError("size differs from the stream's")
    _check_pixel_data(data, parsed.sop_class_uid, parsed.dicom_json)


def _check_pixel_data(data: bytes, sop_class: str, dicom_json: dict[str, Any]) -> None:
    """At most one pixel data element, as a BulkDataURI, whose tag is in the data set (its
    inflated bytes, for a deflated one); an image SOP Class without one has a Pixel Data
    Provider URL (0028,7FE0)."""
    found = [f"{tag:08X}" for tag in PIXEL_TAGS if f"{tag:08X}" in dicom_json]
    if len(found) > 1:
        raise AssertionError(f"several pixel data elements: {found}")
    if not found:
        if _is_image(sop_class) and "00287FE0" not in dicom_json:
            raise AssertionError(f"an image of {sop_class} accepted without pixel data")
        return
    [key] = found
    element = dicom_json[key]
    if element.get("BulkDataURI") != f"bulkdata/{key}" or "Value" in element:
        raise AssertionError(f"pixel data {key} is not a BulkDataURI: {element!r}")
    if element.get("vr") not in ("OB", "OW", "OF", "OD", "UN"):
        raise AssertionError(f"pixel data {key} has VR {element.get('vr')!r}")
    stream = _prepare(data, MAX_INFLATED_SIZE)
    tag = int(key, 16)
    encoded = struct.pack("<HH" if stream.little_endian else ">HH", tag >> 16, tag & 0xFFFF)
    if encoded not in stream.data[stream.offset :]:
        raise AssertionError(f"a BulkDataURI for {key}, which the data set does not hold")


def main() -> None:
    configure_pydicom()  # as the archive reads
    warnings.simplefilter("ignore")  # pydicom warns about odd values it reads anyway
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
