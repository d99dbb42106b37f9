"""The header reader of ingest: its fast path (archive.dicom._fast_header, straight from the
bytes) against pydicom's reading of the same stream, on every file pydicom ships and on the
everyday instances modalities send."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from archive.dicom import InvalidInstance, _fast_header, _pydicom_header, parse_header
from tests.dicom_factory import ct_slice, iter_pydicom_test_files


def _same_header(data: bytes) -> bool:
    """True when the fast path reads ``data``; it then must agree with pydicom in full."""
    fast = _fast_header(data)
    if fast is None:
        return False
    reference = _pydicom_header(data)
    assert fast.transfer_syntax == reference.transfer_syntax
    assert fast.stopped_at == reference.stopped_at
    assert (fast.little_endian, fast.implicit_vr) == (
        reference.little_endian,
        reference.implicit_vr,
    )
    assert fast.dicom_json == reference.dicom_json
    return True


@pytest.mark.parametrize("path", list(iter_pydicom_test_files()), ids=lambda p: p.name)
def test_fast_header_agrees_with_pydicom(path: Path):
    data = path.read_bytes()
    try:
        _pydicom_header(data)
    except InvalidInstance:
        assert _fast_header(data) is None or pytest.fail("fast path read what pydicom refuses")
        return
    _same_header(data)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192", None])
def test_everyday_instances_take_the_fast_path(tmp_path: Path, syntax: str, charset: str | None):
    ds = ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", index=3, size=16)
    ds.PatientName = "Müller^Jürgen" if charset else "MULLER^JURGEN"
    if charset:
        ds.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert _same_header(data)
    parsed = parse_header(data)
    assert parsed.patient["patient_name"] == str(ds.PatientName)
    assert parsed.dicom_json["7FE00010"]["BulkDataURI"] == "bulkdata/7FE00010"


def test_the_rest_is_left_to_pydicom(tmp_path: Path):
    """Sequences, code extensions and truncation: pydicom's reading, pydicom's verdict."""
    ds = ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", index=0, size=8)
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = "T-D0050"
    ds.AnatomicRegionSequence = [item]
    path = tmp_path / "sq.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert _fast_header(data) is None
    assert parse_header(data).dicom_json["00082218"]["Value"][0]["00080100"]["Value"] == ["T-D0050"]

    del ds.AnatomicRegionSequence
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.save_as(path, enforce_file_format=True)
    assert _fast_header(path.read_bytes()) is None

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert _fast_header(data) is not None
    for cut in (400, 200):  # inside the header
        assert _fast_header(data[:cut]) is None
        with pytest.raises(InvalidInstance):
            parse_header(data[:cut])
    with pytest.raises(InvalidInstance, match="inside the Pixel Data"):
        parse_header(data[:-10])


def test_undecodable_values_are_refused_as_not_understood(tmp_path: Path):
    """Invalid UTF-8 in a UTF-8 data set: InvalidInstance (DIMSE 0xC000, STOW failure), not a
    decoding error escaping from the fast path."""
    ds = ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", index=0, size=8)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "ZZZZZZ^QQQQ"
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes().replace(b"ZZZZZZ", b"\xff\xfe\xff\xfe\xff\xfe")
    with pytest.raises(InvalidInstance):
        parse_header(data)
