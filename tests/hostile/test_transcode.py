"""One converter for both edges: big endian, palette, overlay, waveform, JPEG YBR and deflated
instances converted to uncompressed little endian by C-GET (a pynetdicom SCU that accepts only
Explicit or only Implicit VR Little Endian) and by WADO-RS (transfer-syntax=1.2.840.10008.1.2.1)
against a running `pacsbridge serve`: both give the same data set, equal to what pydicom reads
from the stored file (and to the little endian file the big endian one was made from), with the
words of palette lookup tables, overlay and waveform data in little endian order."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore

from tests.conftest import RunningServer, require_tool
from tests.dicomweb_fixtures import (
    BACKEND_IDS,
    BACKENDS,
    module_server,
    multipart_body,
    parse_multipart,
)

pytestmark = pytest.mark.dcmtk

#: pydicom's big endian files and the little endian files holding the same data set.
BIG_ENDIAN_PAIRS = {
    "MR_small_bigendian.dcm": "MR_small.dcm",  # 16-bit OW
    "liver_expb_1frame.dcm": "liver_1frame.dcm",  # 1-bit OB
    "SC_rgb_small_odd_big_endian.dcm": "SC_rgb_small_odd.dcm",  # 8-bit RGB in OW words
    "rtdose_expb_1frame.dcm": "rtdose_1frame.dcm",  # 32-bit OW
}
#: Little endian files made big endian with DCMTK (dcmconv +tb): their OW values other than
#: the pixel data are what a word swap must get right.
DCMTK_BIG_ENDIAN = (
    "examples_palette.dcm",  # OW palette lookup tables (0028,1201-1203), 8-bit OW pixels
    "examples_overlay.dcm",  # OW overlay data (6000,3000), and a palette in an icon
    "waveform_ecg.dcm",  # OW waveform data (5400,1010)
)
COMPRESSED = ("examples_ybr_color.dcm", "JPEG2000.dcm")  # JPEG YBR_FULL_422 → RGB; J2K
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass
class Stored:
    """One instance stored for the test: its file, what pydicom reads from it, and the little
    endian data set it must convert to (None: check against pydicom's decoding only)."""

    name: str
    data: bytes
    original: Dataset
    expected: Dataset | None


@dataclass
class Loaded:
    server: RunningServer
    study: str
    stored: dict[str, Stored] = field(default_factory=dict)  # by SOP Instance UID


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def _dcmtk(tool: str, *args: str) -> None:
    subprocess.run([require_tool(tool), *args], check=True, capture_output=True)


PATIENT_ID, PATIENT_NAME = "TRANSCODE-1", "TRANSCODE^TEST"


def _renamed(src: Path, work: Path, study: str) -> tuple[Path, str, str]:
    """A copy of ``src`` for one patient and study, in a new series and SOP Instance UID, its
    encoding untouched (DCMTK's dcmodify keeps the transfer syntax and updates the file meta).
    Returns the path, series and SOP Instance UIDs."""
    series, sop = generate_uid(), generate_uid()
    path = work / f"{sop}.dcm"
    shutil.copyfile(src, path)
    path.chmod(0o644)
    _dcmtk(
        "dcmodify",
        "-nb",
        "-m",
        f"(0020,000d)={study}",
        "-m",
        f"(0020,000e)={series}",
        "-m",
        f"(0008,0018)={sop}",
        "-i",
        f"(0010,0020)={PATIENT_ID}",
        "-i",
        f"(0010,0010)={PATIENT_NAME}",
        str(path),
    )
    return path, series, sop


def _with_uids(ds: Dataset, study: str, series: str, sop: str) -> Dataset:
    """``ds`` as :func:`_renamed` changes the file."""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
    return ds


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loaded]:
    work = tmp_path_factory.mktemp("transcode")
    study = generate_uid()
    files: list[tuple[str, Path, str, Dataset | None]] = []
    for big, little in BIG_ENDIAN_PAIRS.items():
        path, series, sop = _renamed(_testdata(big), work, study)
        expected = _with_uids(pydicom.dcmread(_testdata(little)), study, series, sop)
        files.append((big, path, sop, expected))
    for name in DCMTK_BIG_ENDIAN:
        big_endian = work / f"be-{name}"
        _dcmtk("dcmconv", "+tb", str(_testdata(name)), str(big_endian))
        path, series, sop = _renamed(big_endian, work, study)
        expected = _with_uids(pydicom.dcmread(_testdata(name)), study, series, sop)
        files.append((f"{name} (big endian)", path, sop, expected))
    for name in COMPRESSED:
        path, _series, sop = _renamed(_testdata(name), work, study)
        files.append((name, path, sop, None))
    # A deflated data set (PS3.5 A.5), written by pydicom.
    series, sop = generate_uid(), generate_uid()
    deflated = _with_uids(pydicom.dcmread(_testdata("MR_small.dcm")), study, series, sop)
    deflated.file_meta.MediaStorageSOPInstanceUID = sop
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = work / "deflated.dcm"
    deflated.save_as(path, enforce_file_format=True)
    inflated = _with_uids(pydicom.dcmread(_testdata("MR_small.dcm")), study, series, sop)
    files.append(("MR_small.dcm (deflated)", path, sop, inflated))

    for server in module_server(request, tmp_path_factory):
        result = Loaded(server, study)
        parts = []
        for name, path, sop, reference in files:
            data = path.read_bytes()
            parts.append(data)
            result.stored[sop] = Stored(name, data, pydicom.dcmread(io.BytesIO(data)), reference)
        syntaxes = {str(s.original.file_meta.TransferSyntaxUID) for s in result.stored.values()}
        assert syntaxes >= {ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
        body, content_type = multipart_body(parts)
        response = httpx.post(
            f"{server.http}/dicom-web/studies",
            content=body,
            headers={"Content-Type": content_type},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        yield result


# --- the two edges -------------------------------------------------------------------------------


def c_get(loaded: Loaded, transfer_syntax: str) -> dict[str, Dataset]:
    """C-GET the study proposing only ``transfer_syntax`` for every storage SOP class; the
    received data sets by SOP Instance UID."""
    received: dict[str, Dataset] = {}
    implicit = transfer_syntax == ImplicitVRLittleEndian

    def on_store(event: Any) -> int:
        assert str(event.context.transfer_syntax) == transfer_syntax
        data = event.request.DataSet.getvalue()
        received[str(event.request.AffectedSOPInstanceUID)] = read_dataset(
            io.BytesIO(data), is_implicit_VR=implicit, is_little_endian=True
        )
        return 0x0000

    ae = AE(ae_title="TRANSCODE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    classes = sorted({str(s.original.SOPClassUID) for s in loaded.stored.values()})
    for sop_class in classes:
        ae.add_requested_context(sop_class, [transfer_syntax])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = loaded.study
    assoc = ae.associate(
        "127.0.0.1",
        loaded.server.dimse_port,
        ae_title=loaded.server.ae_title,
        ext_neg=[build_role(c, scp_role=True) for c in classes],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000, final
    return received


def wado(loaded: Loaded, transfer_syntax: str) -> dict[str, tuple[Dataset, bytes]]:
    """WADO-RS retrieve of the study in ``transfer_syntax``; the parts by SOP Instance UID."""
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={transfer_syntax}'
    response = httpx.get(
        f"{loaded.server.http}/dicom-web/studies/{loaded.study}",
        headers={"Accept": accept},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    parts: dict[str, tuple[Dataset, bytes]] = {}
    for headers, content in parse_multipart(response.content, response.headers["content-type"]):
        if transfer_syntax != "*":
            assert f"transfer-syntax={transfer_syntax}" in headers["content-type"]
        ds = pydicom.dcmread(io.BytesIO(content))
        parts[str(ds.SOPInstanceUID)] = (ds, content)
    return parts


# --- comparing data sets -------------------------------------------------------------------------


def _elements(ds: Dataset, *, with_vr: bool = True) -> dict[int, Any]:
    """Every element but the file meta and trailing padding, sequences item by item."""
    out: dict[int, Any] = {}
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.tag == 0xFFFCFFFC:
            continue
        if elem.VR == "SQ":
            value: Any = [_elements(item, with_vr=with_vr) for item in elem.value]
        else:
            value = elem.value
        out[int(elem.tag)] = (str(elem.VR), value) if with_vr else value
    return out


def assert_same_elements(actual: Dataset, expected: Dataset, label: str) -> None:
    got, want = _elements(actual), _elements(expected)
    assert sorted(got) == sorted(want), label
    for tag in want:
        assert got[tag] == want[tag], f"{label}: ({tag >> 16:04X},{tag & 0xFFFF:04X}) differs"


def _public_values(ds: Dataset) -> dict[int, Any]:
    return {t: v for t, v in _elements(ds, with_vr=False).items() if not (t >> 16) % 2}


# --- the tests -----------------------------------------------------------------------------------


def test_both_edges_give_one_conversion(loaded: Loaded) -> None:
    by_get = c_get(loaded, ExplicitVRLittleEndian)
    by_wado = wado(loaded, EXPLICIT_LE)
    assert set(by_get) == set(by_wado) == set(loaded.stored)
    for sop, stored in loaded.stored.items():
        converted, _content = by_wado[sop]
        assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        # The same data set over DIMSE and over DICOMweb: same elements, VRs and values.
        assert_same_elements(by_get[sop], converted, stored.name)
        assert str(converted.SOPInstanceUID) == sop  # kept (PS3.5 8.2, 10)
        original = stored.original
        if "PixelData" in original:
            assert np.array_equal(converted.pixel_array, original.pixel_array), stored.name
        if stored.expected is not None:
            # Big endian (or deflated) → the little endian data set it was made from.
            assert_same_elements(converted, stored.expected, stored.name)


def test_palette_overlay_and_waveform_words(loaded: Loaded) -> None:
    by_wado = wado(loaded, EXPLICIT_LE)
    by_get = c_get(loaded, ExplicitVRLittleEndian)
    checked = 0
    for sop, stored in loaded.stored.items():
        converted, _ = by_wado[sop]
        for ds in (converted, by_get[sop]):
            if stored.name.startswith("examples_palette.dcm"):
                reference = pydicom.dcmread(_testdata("examples_palette.dcm"))
                red = ds.RedPaletteColorLookupTableData
                # 16-bit entries as little endian words: 0x0100 is stored 00 01, not 01 00.
                assert red == reference.RedPaletteColorLookupTableData
                assert np.frombuffer(red, "<u2")[1] == 0x0100
                # The table read from the big endian original as PS3.5 7.3 says: 16-bit words,
                # most significant byte first (pydicom's apply_color_lut reads the words of a
                # big endian file in the machine's order, so it is not the reference here).
                original = stored.original.RedPaletteColorLookupTableData
                assert np.array_equal(np.frombuffer(red, "<u2"), np.frombuffer(original, ">u2"))
                pixels = ds.pixel_array if ds is converted else _pixels(ds)
                assert np.array_equal(
                    apply_color_lut(pixels, ds),
                    apply_color_lut(reference.pixel_array, reference),
                )
                checked += 1
            if stored.name.startswith("examples_overlay.dcm"):
                reference = pydicom.dcmread(_testdata("examples_overlay.dcm"))
                assert ds[0x60003000].value == reference[0x60003000].value
                checked += 1
            if stored.name.startswith("waveform_ecg.dcm"):
                reference = pydicom.dcmread(_testdata("waveform_ecg.dcm"))
                for got, want in zip(ds.WaveformSequence, reference.WaveformSequence, strict=True):
                    assert got.WaveformData == want.WaveformData
                checked += 1
    assert checked == 6


def _word_values(json: dict[str, Any], ds: Dataset, get: Any, path: str = "") -> int:
    """Check every OW/OF/OL/OD/OV value of DICOM JSON ``json`` (pixel data aside) against the
    little endian data set ``ds``: InlineBinary and bulk data are little endian (PS3.18 F.2.7,
    8.7.3). Returns how many were checked."""
    checked = 0
    for key, element in json.items():
        tag = int(key, 16)
        if tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            continue
        if element["vr"] == "SQ":
            for index, item in enumerate(element.get("Value", [])):
                checked += _word_values(item, ds[tag].value[index], get, f"{path}{key}/{index}/")
        elif element["vr"] in ("OW", "OF", "OL", "OD", "OV"):
            if "InlineBinary" in element:
                value = base64.b64decode(element["InlineBinary"])
            elif "BulkDataURI" in element:
                value = get(element["BulkDataURI"])
            else:
                continue
            assert value == ds[tag].value, f"{path}{key}"
            checked += 1
    return checked


def test_big_endian_words_in_metadata_and_bulk_data(loaded: Loaded) -> None:
    """The words of big endian OW values reach a viewer in little endian order through WADO-RS
    metadata and bulk data too, as through the converter."""

    def bulk(url: str) -> bytes:
        response = httpx.get(url, headers={"Accept": "application/octet-stream"}, timeout=60)
        assert response.status_code == 200, (url, response.text[:300])
        return response.content

    checked = 0
    for sop, stored in loaded.stored.items():
        if stored.expected is None or stored.original.file_meta.TransferSyntaxUID != (
            ExplicitVRBigEndian
        ):
            continue
        ds = stored.original
        response = httpx.get(
            f"{loaded.server.http}/dicom-web/studies/{loaded.study}/series/"
            f"{ds.SeriesInstanceUID}/instances/{sop}/metadata",
            timeout=60,
        )
        assert response.status_code == 200, response.text[:300]
        (json,) = response.json()
        checked += _word_values(json, stored.expected, bulk)
    # The palette tables, the overlay data and the waveform data at least.
    assert checked >= 5


def _pixels(ds: Dataset) -> np.ndarray:
    """pixel_array of a data set read without file meta (as received over DIMSE)."""
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds.pixel_array


def test_jpeg_ybr_decoded_to_rgb(loaded: Loaded) -> None:
    by_wado = wado(loaded, EXPLICIT_LE)
    by_get = c_get(loaded, ExplicitVRLittleEndian)
    ybr = next(s for s in loaded.stored.values() if s.name == "examples_ybr_color.dcm")
    sop = str(ybr.original.SOPInstanceUID)
    assert ybr.original.PhotometricInterpretation == "YBR_FULL_422"
    for ds in (by_wado[sop][0], by_get[sop]):
        # PS3.5 8.2.1: decompressed YBR_FULL_422 JPEG is RGB.
        assert ds.PhotometricInterpretation == "RGB"
        assert ds.NumberOfFrames == 30
        assert ds.LossyImageCompression == "01"  # once lossy, always lossy (PS3.3 C.7.6.1.1.5)
    assert np.array_equal(by_wado[sop][0].pixel_array, ybr.original.pixel_array)


def test_implicit_vr_little_endian_over_c_get(loaded: Loaded) -> None:
    by_get = c_get(loaded, ImplicitVRLittleEndian)
    by_wado = wado(loaded, EXPLICIT_LE)
    assert set(by_get) == set(loaded.stored)
    for sop, stored in loaded.stored.items():
        implicit, explicit = by_get[sop], by_wado[sop][0]
        assert _public_values(implicit) == _public_values(explicit), stored.name
        if "PixelData" in stored.original:
            implicit.file_meta = pydicom.dataset.FileMetaDataset()
            implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            assert np.array_equal(implicit.pixel_array, stored.original.pixel_array), stored.name


def test_stored_instances_unchanged(loaded: Loaded) -> None:
    parts = wado(loaded, "*")
    for sop, stored in loaded.stored.items():
        assert parts[sop][1] == stored.data, stored.name
    health = httpx.get(f"{loaded.server.http}/health", timeout=10)
    assert health.json()["status"] == "ok"
