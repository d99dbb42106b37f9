"""The header reader of ingest: its fast path (archive.dicom._fast_header, straight from the
bytes) against pydicom's reading of the same stream, on every file pydicom ships and on the
everyday instances modalities send."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from archive.dicom import (
    InvalidInstance,
    _fast_header,
    _pydicom_header,
    configure_pydicom,
    parse_header,
    part10_data_set_offset,
    read_file_meta,
)
from archive.instance_io import is_deflated
from tests.dicom_factory import ct_slice, iter_pydicom_test_files


@pytest.fixture(autouse=True, scope="module")
def _read_as_the_archive_reads() -> None:
    configure_pydicom()


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


# --- sequences of undefined length: items in either VR encoding ---------------------------------

_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD)
#: A private sequence (0029,1010) under the private creator (0029,0010).
_CREATOR, _PRIVATE_SQ = 0x00290010, 0x00291010


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _marker(tag: int, length: int = 0) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length)


def private_item(explicit: bool, *, undefined: bool = True) -> bytes:
    """An item holding (0029,1001) LO "HELLO" and (0029,1002) US 7, in Explicit or Implicit VR
    Little Endian, of undefined length (up to an Item Delimitation Item) or defined length."""
    if explicit:
        body = _explicit(0x00291001, b"LO", b"HELLO ") + _explicit(0x00291002, b"US", b"\x07\x00")
    else:
        body = _implicit(0x00291001, b"HELLO ") + _implicit(0x00291002, b"\x07\x00")
    if undefined:
        return _marker(_ITEM, 0xFFFFFFFF) + body + _marker(_ITEM_END)
    return _marker(_ITEM, len(body)) + body


def with_private_sequence(items: bytes, *, syntax: str, explicit: bool, vr: bytes = b"UN") -> bytes:
    """A Basic Text SR instance in ``syntax`` whose data set ends with (0029,1010) of undefined
    length holding ``items``: VR ``vr`` when the data set is written in ``explicit`` VR."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.PatientID = "SEQ-1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=not explicit)
    if explicit:
        tail = _explicit(_CREATOR, b"LO", b"ACME") + struct.pack(
            "<HH2sHL", 0x0029, 0x1010, vr, 0, 0xFFFFFFFF
        )
    else:
        tail = _implicit(_CREATOR, b"ACME") + _marker(_PRIVATE_SQ, 0xFFFFFFFF)
    return out.getvalue() + tail + items + _marker(_SEQUENCE_END)


def _item_values(dicom_json: dict[str, Any]) -> list[dict[str, Any]]:
    """(0029,1001) and (0029,1002) of each item, as values or as the UN bytes pydicom keeps
    for private elements read in Implicit VR."""
    items = dicom_json["00291010"]["Value"]
    return [
        {tag: item[tag].get("Value", item[tag].get("InlineBinary")) for tag in item}
        for item in items
    ]


EXPLICIT_VALUES = {"00291001": ["HELLO"], "00291002": [7]}
IMPLICIT_VALUES = {"00291001": "SEVMTE8g", "00291002": "BwA="}  # "HELLO ", 7 as UN bytes


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (private_item(True), [EXPLICIT_VALUES]),
        (private_item(True, undefined=False), [EXPLICIT_VALUES]),
        (private_item(False), [IMPLICIT_VALUES]),
        (private_item(False) + private_item(True), [IMPLICIT_VALUES, EXPLICIT_VALUES]),
        (
            private_item(True) + private_item(False, undefined=False),
            [EXPLICIT_VALUES, IMPLICIT_VALUES],
        ),
    ],
    ids=[
        "explicit",
        "explicit-defined-length",
        "implicit",
        "implicit-then-explicit",
        "explicit-then-implicit",
    ],
)
@pytest.mark.parametrize("vr", [b"UN", b"SQ"])
def test_items_of_an_explicit_vr_data_set_are_read_in_their_own_encoding(
    items: bytes, expected: list[dict[str, Any]], vr: bytes
):
    """Undefined-length UN (PS3.5 6.2.2) and SQ in Explicit VR Little Endian: each item in the
    VR encoding its first element shows, as pydicom reads it (a writer that relabels an SQ as
    UN leaves Explicit VR items)."""
    data = with_private_sequence(items, syntax=ExplicitVRLittleEndian, explicit=True, vr=vr)
    reference = pydicom.dcmread(io.BytesIO(data))
    assert len(reference[_PRIVATE_SQ].value) == len(expected)
    assert _item_values(parse_header(data).dicom_json) == expected


def test_a_data_set_labelled_implicit_but_written_explicit_reads_its_items():
    """Implicit VR Little Endian on the label, Explicit VR in the stream (read by its first
    element's VR bytes, as pydicom and DCMTK do): Explicit VR items inside UN are read too."""
    data = with_private_sequence(private_item(True), syntax=ExplicitVRLittleEndian, explicit=True)
    data = data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00\x00\x00", 1)
    assert parse_header(data).transfer_syntax_uid == ImplicitVRLittleEndian
    assert _item_values(parse_header(data).dicom_json) == [EXPLICIT_VALUES]


def test_items_of_an_implicit_vr_data_set():
    """Implicit VR Little Endian: items are read in Implicit VR, as pydicom reads them (it never
    switches a sequence from Implicit to Explicit VR). An Explicit VR item there cannot be read
    by pydicom either, which the archive's readers use: refused, and the reason says why rather
    than quoting the nonsense length the VR bytes make."""
    implicit = with_private_sequence(
        private_item(False), syntax=ImplicitVRLittleEndian, explicit=False
    )
    assert _item_values(parse_header(implicit).dicom_json) == [IMPLICIT_VALUES]

    explicit_item = with_private_sequence(
        private_item(True), syntax=ImplicitVRLittleEndian, explicit=False
    )
    with pytest.raises(OSError):
        pydicom.dcmread(io.BytesIO(explicit_item))
    with pytest.raises(InvalidInstance) as info:
        parse_header(explicit_item)
    assert info.value.reason == (
        "(0029,1010) holds an item in Explicit VR in an Implicit VR data set (PS3.5 7.5): "
        "it cannot be read"
    )
    assert info.value.cannot_understand


# --- the File Meta Information: one reader -----------------------------------------------------


def test_file_meta_without_group_length_is_read_alike_everywhere():
    """A Part-10 stream without (0002,0000): ingest takes it, and the readers of stored files
    (the deflate check, the DIMSE sender's data set offset) find the same group end, as
    pynetdicom's own reading does."""
    from pynetdicom.dsutils import split_dataset

    ds = ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", index=0, size=8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    full = io.BytesIO()
    ds.save_as(full, enforce_file_format=True)
    with_length = full.getvalue()
    assert with_length[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    data = with_length[:132] + with_length[144:]
    parsed = parse_header(data)
    meta = read_file_meta(data)
    assert meta is not None and meta.deflated and meta.group_length_agrees
    full_meta = read_file_meta(with_length)
    assert full_meta is not None
    assert part10_data_set_offset(data) == meta.data_set_offset == full_meta.data_set_offset - 12
    assert is_deflated(io.BytesIO(data))
    assert parsed.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        fh.write(data)
        fh.flush()
        assert split_dataset(Path(fh.name))[1] == meta.data_set_offset


def test_file_meta_reader_finds_a_long_group_end():
    """A File Meta Information longer than the first read of a stored file (a large private
    (0002,0102)): the group's end is found all the same."""
    ds = ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", index=0, size=8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.PrivateInformationCreatorUID = UID("1.2.3.4.5")
    ds.file_meta.PrivateInformation = b"x" * 20_000
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    meta = read_file_meta(data)
    assert meta is not None and meta.data_set_offset > 20_000
    assert is_deflated(io.BytesIO(data))
    assert not is_deflated(io.BytesIO(data[:10_000]))  # a file cut inside it


def test_pydicom_reading_is_configured_explicitly():
    """Importing the header reader changes nothing in pydicom; the archive configures it."""
    code = (
        "import pydicom.config as c; default = c.settings.reading_validation_mode; "
        "import archive.dicom as d; assert c.settings.reading_validation_mode == default; "
        "d.configure_pydicom(); assert c.settings.reading_validation_mode == c.IGNORE"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
