"""The fast DICOM JSON encoder against pydicom's own, on every file pydicom ships."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest

from archive.dicom_json import dataset_to_json
from tests.dicom_factory import iter_pydicom_test_files


def _normalise(value: Any) -> Any:
    """Differences that are not differences in PS3.18 F.2 terms.

    - Group Length elements (gggg,0000): pydicom keeps them, we leave them out.
    - 120 and 120.0 are the same JSON number for DS; "CS " and "CS" are the same value
      (trailing spaces are padding, PS3.5 6.2); an empty value in a multi-valued attribute is
      null (PS3.18 F.2.5) where pydicom writes "".
    - BulkDataURIs: pydicom's handler does not know an element's place inside sequences.
    """
    if isinstance(value, dict):
        if "BulkDataURI" in value:  # where bulk data lives is ours to name
            return {**value, "BulkDataURI": "bulk"}
        return {
            k: _normalise(v) for k, v in value.items() if not (len(k) == 8 and k.endswith("0000"))
        }
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# pydicom drops these elements (it cannot convert a value); we keep them, so they differ.
PYDICOM_DROPS = {"badVR.dcm", "rtdose.dcm", "rtdose_1frame.dcm", "rtdose_expb.dcm"}
PYDICOM_DROPS |= {"rtdose_expb_1frame.dcm", "rtdose_rle.dcm", "rtdose_rle_1frame.dcm"}


@pytest.mark.parametrize("path", list(iter_pydicom_test_files()), ids=lambda p: p.name)
def test_same_json_as_pydicom(path):
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        pytest.skip("pydicom cannot read this file without force")
    ours = dataset_to_json(ds, lambda _tag, _vr, uri: uri)
    reference = pydicom.dcmread(path, stop_before_pixels=True).to_json_dict(
        1024, lambda elem: f"bulkdata/{elem.tag:08X}", suppress_invalid_tags=True
    )
    a, b = _normalise(ours), _normalise(reference)
    if path.name in PYDICOM_DROPS:
        assert set(b) <= set(a)
        assert {k: a[k] for k in b} == b
    else:
        assert a == b


def test_bulk_data_uris_name_their_place_in_nested_sequences():
    ds = pydicom.Dataset()
    item = pydicom.Dataset()
    item.add_new(0x00420011, "OB", b"\x01" * 2000)  # Encapsulated Document, in an item
    ds.add_new(0x00400275, "SQ", pydicom.Sequence([pydicom.Dataset(), item]))
    ds.add_new(0x00420011, "OB", b"\x02" * 2000)
    ds.add_new(0x00091010, "OB", b"\x03" * 10)  # small: inline
    out = dataset_to_json(ds, lambda _tag, _vr, uri: uri)
    assert out["00420011"] == {"vr": "OB", "BulkDataURI": "bulkdata/00420011"}
    nested = out["00400275"]["Value"][1]["00420011"]
    assert nested == {"vr": "OB", "BulkDataURI": "bulkdata/00400275/1/00420011"}
    assert out["00091010"] == {"vr": "OB", "InlineBinary": "AwMDAwMDAwMDAw=="}


@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100"])
def test_sequence_items_are_decoded_in_the_character_set_of_their_parent(charset: str) -> None:
    """PS3.5 7.5.1: an item without its own Specific Character Set is in its parent's. A
    report's text lives in nested Content Sequence items (an SR's narrative, names)."""
    from io import BytesIO

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    text = "Keine Blutung, unauffällig" + (" — ok" if charset == "ISO_IR 192" else "")
    inner = Dataset()
    inner.TextValue = text
    inner.PersonName = "Müller^Jürgen"
    outer = Dataset()
    outer.ContentSequence = Sequence([inner])
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.ContentSequence = Sequence([outer])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    read = pydicom.dcmread(BytesIO(buffer.getvalue()), force=True)

    json = dataset_to_json(read, lambda tag, vr, path: path)
    item = json["0040A730"]["Value"][0]["0040A730"]["Value"][0]
    assert item["0040A160"]["Value"] == [text]
    assert item["0040A123"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
