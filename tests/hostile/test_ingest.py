"""Hostile input at the three ways in (C-STORE, STOW-RS, ``pacsbridge import``): malformed,
truncated, inconsistent and forged Part-10 data sets, and malformed multipart bodies.

Each case gets the exact status and reason it should on every way in that can carry it;
nothing is written (no blob, no index row); the server still serves; and the instances stored
before are byte-identical afterwards. One `pacsbridge serve` for the module.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import struct
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from sqlalchemy import select

from archive import Archive, IngestError, IngestErrorKind, IngestOutcome, IngestResult
from archive.blobstore import instance_key
from archive.dicom import InvalidInstance, parse_header, part10_data_set_offset
from archive.models import Instance
from config import Settings
from dicomweb.multipart import MultipartError, MultipartReader, boundary_error
from tests.conftest import VENV_BIN, Backend, RunningServer, require_tool
from tests.dicom_factory import ct_slice
from tests.dicomweb_fixtures import (
    ct_study,
    module_server,
    multipart_body,
    new_uid,
    parse_multipart,
    part10,
)
from tests.test_dicom_header import private_item, with_private_sequence

#: Parts of one STOW-RS request (small, so that the many-parts case stays quick).
MAX_PARTS = 1000
DICOM_JSON = "application/dicom+json"
DICOM = 'multipart/related; type="application/dicom"'
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CANNOT_UNDERSTAND, DATASET_MISMATCH, DUPLICATE, SYNTAX = 0xC000, 0xA900, 0x0111, 0xC122


# --- the server, and what it holds before -------------------------------------------------------


@pytest.fixture(scope="module", params=[("sqlite", "file")], ids=["sqlite-file"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    yield from module_server(request, tmp_path_factory, PACSBRIDGE_STOW_MAX_PARTS=str(MAX_PARTS))


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=300) as client:
        yield client


def _blobs(data_dir: Path) -> dict[str, bytes]:
    root = data_dir / "blobs"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def _instances(archive: Archive) -> int:
    try:
        return archive.stats().instances
    finally:
        archive.close()


@dataclass
class Stored:
    """The study the module stores first, and every blob as stored."""

    datasets: list[Dataset]
    files: list[bytes]
    blobs: dict[str, bytes] = field(default_factory=dict)
    instances: int = 0

    @property
    def first(self) -> Dataset:
        return self.datasets[0]


@pytest.fixture(scope="module")
def stored(server: RunningServer, http: httpx.Client) -> Stored:
    datasets = ct_study(2, size=16, patient_id="INGEST-1")
    files = [part10(ds) for ds in datasets]
    body, content_type = multipart_body(files)
    response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    result = Stored(datasets, files, _blobs(server.backend.settings.data_dir))
    result.instances = _instances(server.archive())
    assert len(result.blobs) == result.instances == 2
    return result


def instance_path(ds: Dataset) -> str:
    return (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _ae() -> AE:
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    return ae


def echo(server: RunningServer) -> int:
    assoc = _ae().associate(
        "127.0.0.1",
        server.dimse_port,
        contexts=[build_context(Verification)],
        ae_title=server.ae_title,
    )
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def assert_intact(server: RunningServer, http: httpx.Client, stored: Stored) -> None:
    """The server answers a C-ECHO, a search and a retrieve; no blob or index row came or went,
    and the instances stored before are byte for byte as they were."""
    assert echo(server) == 0x0000
    search = http.get("/dicom-web/studies", params={"PatientID": "INGEST-1"})
    assert search.status_code == 200, search.text
    assert [s["0020000D"]["Value"][0] for s in search.json()] == [stored.first.StudyInstanceUID]
    retrieve = http.get(instance_path(stored.first), headers={"Accept": AS_STORED})
    assert retrieve.status_code == 200, retrieve.text
    assert stored.files[0] in retrieve.content
    assert _blobs(server.backend.settings.data_dir) == stored.blobs
    assert _instances(server.archive()) == stored.instances


# --- the hostile data sets ------------------------------------------------------------------------


def _bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _fresh(**changes: Any) -> Dataset:
    ds = ct_slice(study_uid=new_uid(), series_uid=new_uid(), index=0, size=16, patient_id="X-1")
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def data_set_offset(data: bytes) -> int:
    return 144 + struct.unpack_from("<L", data, 140)[0]


def element_starts(data: bytes) -> dict[int, tuple[int, int]]:
    """(element start, value start) of each top-level element of an Explicit VR Little Endian
    Part-10 stream without sequences (what ``ct_slice`` writes)."""
    out: dict[int, tuple[int, int]] = {}
    position = data_set_offset(data)
    while position < len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if data[position + 4 : position + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<L", data, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            start = position + 8
        out[group << 16 | element] = (position, start)
        position = start + length
    return out


def deflate_bomb() -> bytes:
    """A deflated CT header whose 10240 x 10240 x 16-bit pixel data (200 MiB of zeros) deflates
    to about 200 KB, built without holding the 200 MiB."""
    ds = _fresh(Rows=10240, Columns=10240)
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta_only = _bytes(ds)
    meta = meta_only[: data_set_offset(meta_only)]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    explicit = _bytes(ds)
    header = explicit[data_set_offset(explicit) :]
    size = 10240 * 10240 * 2
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [
        meta,
        deflater.compress(header + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", size)),
    ]
    zeros = bytes(2**20)
    for _ in range(size // len(zeros)):
        out.append(deflater.compress(zeros))
    out.append(deflater.flush())
    return b"".join(out)


@dataclass(frozen=True)
class Case:
    """A hostile Part-10 stream and what each way in answers: the DIMSE status (None where
    C-STORE cannot carry it: the node writes the File Meta Information itself), the STOW-RS
    FailureReason, and the reason's first words (all of them fit a DIMSE Error Comment)."""

    data: bytes
    dimse: int | None
    stow: int
    reason: str
    sop_instance: str = ""


def _cases(stored: Stored) -> dict[str, Case]:
    base_ds = _fresh()
    base = _bytes(base_ds)
    at = element_starts(base)
    bits_stored, pixel_data, sop_class = at[0x00280101], at[0x7FE00010], at[0x00080016]
    wrong_length = bytearray(base)
    wrong_length[140:144] = struct.pack("<L", struct.unpack_from("<L", base, 140)[0] + 2)

    def pixels(size: int, **changes: Any) -> bytes:
        ds = _fresh(**changes)
        ds.PixelData = bytes(size)
        return _bytes(ds)

    forged = _fresh()
    forged.SOPInstanceUID = forged.file_meta.MediaStorageSOPInstanceUID = (
        stored.first.SOPInstanceUID
    )
    series_elsewhere = _fresh(SeriesInstanceUID=stored.first.SeriesInstanceUID)
    fragment = "the stream ends inside"
    cases = {
        "cut-inside-file-meta": Case(
            base[: data_set_offset(base) - 10], None, CANNOT_UNDERSTAND,
            f"{fragment} the File Meta Information",
        ),
        "cut-inside-an-element-header": Case(
            base[: bits_stored[0] + 3], CANNOT_UNDERSTAND, CANNOT_UNDERSTAND,
            f"{fragment} an element header at byte",
        ),
        "cut-inside-a-header-element": Case(
            base[: bits_stored[1] + 1], CANNOT_UNDERSTAND, CANNOT_UNDERSTAND,
            f"{fragment} (0028,0101): 1 of its 2 bytes",
        ),
        "cut-inside-the-pixel-data": Case(
            base[:-100], CANNOT_UNDERSTAND, CANNOT_UNDERSTAND,
            f"{fragment} the Pixel Data: 412 of its 512 bytes",
        ),
        "cut-exactly-before-the-pixel-data": Case(
            base[: pixel_data[0]], DATASET_MISMATCH, DATASET_MISMATCH,
            "no Pixel Data in an instance of CT Image Storage",
        ),
        "cut-exactly-before-the-sop-class": Case(
            base[: sop_class[0]], DATASET_MISMATCH, DATASET_MISMATCH,
            "the data set has no SOPClassUID",
        ),
        "wrong-file-meta-group-length": Case(
            bytes(wrong_length), None, CANNOT_UNDERSTAND,
            "File Meta Information Group Length (0002,0000) is "
            f"{struct.unpack_from('<L', wrong_length, 140)[0]}, but the group takes",
        ),
        "unknown-transfer-syntax": Case(
            base.replace(b"1.2.840.10008.1.2.1\x00", b"9.9.9.999.99.HOSTIL\x00", 1), None, SYNTAX,
            "unknown transfer syntax 9.9.9.999.99.HOSTIL",
        ),
        "pixel-data-shorter": Case(
            pixels(508), DATASET_MISMATCH, DATASET_MISMATCH,
            "Pixel Data has 508 bytes; its attributes need 512",
        ),
        "rows-disagree-with-pixel-data": Case(
            pixels(512, Rows=17), DATASET_MISMATCH, DATASET_MISMATCH,
            "Pixel Data has 512 bytes; its attributes need 544",
        ),
        "deflate-bomb": Case(
            deflate_bomb(), CANNOT_UNDERSTAND, CANNOT_UNDERSTAND,
            "the deflated data set inflates to more than 128 MB",
        ),
        "zero-filled": Case(
            bytes(10 * 2**20), None, CANNOT_UNDERSTAND, "not a DICOM Part-10"
        ),
        "forged-duplicate-in-another-study": Case(
            _bytes(forged), DUPLICATE, DUPLICATE,
            f"SOP Instance UID already held in another study: {stored.first.StudyInstanceUID}",
        ),
        "series-held-in-another-study": Case(
            _bytes(series_elsewhere), DATASET_MISMATCH, DATASET_MISMATCH,
            "Series Instance UID already held in another study",
        ),
    }  # fmt: skip
    # The UID each failure names: the File Meta Information's, where it can be read.
    return {
        name: replace(case, sop_instance=_media_storage_uid(case.data))
        for name, case in cases.items()
    }


def _media_storage_uid(data: bytes) -> str:
    """(0002,0003) Media Storage SOP Instance UID, when the stream holds it whole."""
    at = data.find(b"\x02\x00\x03\x00UI", 132, 400)
    if data[128:132] != b"DICM" or at < 0:
        return ""
    (length,) = struct.unpack_from("<H", data, at + 6)
    value = data[at + 8 : at + 8 + length]
    return value.rstrip(b"\x00").decode() if len(value) == length else ""


@pytest.fixture(scope="module")
def cases(stored: Stored) -> dict[str, Case]:
    return _cases(stored)


CASE_NAMES = [
    "cut-inside-file-meta",
    "cut-inside-an-element-header",
    "cut-inside-a-header-element",
    "cut-inside-the-pixel-data",
    "cut-exactly-before-the-pixel-data",
    "cut-exactly-before-the-sop-class",
    "wrong-file-meta-group-length",
    "unknown-transfer-syntax",
    "pixel-data-shorter",
    "rows-disagree-with-pixel-data",
    "deflate-bomb",
    "zero-filled",
    "forged-duplicate-in-another-study",
    "series-held-in-another-study",
]
DIMSE_CASES = [
    name
    for name in CASE_NAMES
    if name
    not in ("cut-inside-file-meta", "wrong-file-meta-group-length", "unknown-transfer-syntax")
    and name != "zero-filled"
]


def test_case_list_is_complete(cases: dict[str, Case]):
    assert sorted(cases) == sorted(CASE_NAMES)
    assert [n for n in CASE_NAMES if cases[n].dimse is not None] == DIMSE_CASES
    assert len(cases["deflate-bomb"].data) < 300_000  # ~200 KB inflating to 200 MiB


# --- STOW-RS ---------------------------------------------------------------------------------


def stow(http: httpx.Client, parts: list[bytes], boundary: str = "a-boundary") -> httpx.Response:
    body, _ = multipart_body(parts, boundary)
    return post(http, body, related(boundary))


def failures(response: httpx.Response) -> list[tuple[int, str]]:
    """(FailureReason, Referenced SOP Instance UID) of each FailedSOPSequence item."""
    items = response.json()["00081198"].get("Value", [])
    return [
        (item["00081197"]["Value"][0], (item["00081155"].get("Value") or [""])[0]) for item in items
    ]


def stored_items(response: httpx.Response) -> list[dict[str, Any]]:
    return list(response.json()["00081199"].get("Value", []))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_stow_refuses(
    server: RunningServer, http: httpx.Client, stored: Stored, cases: dict[str, Case], name: str
):
    case = cases[name]
    response = stow(http, [case.data])
    assert response.status_code == 409, response.text
    assert failures(response) == [(case.stow, case.sop_instance)]
    assert stored_items(response) == []
    assert "00081190" not in response.json()  # no RetrieveURL to nothing
    assert case.reason in response.headers["warning"], response.headers["warning"]
    assert_intact(server, http, stored)


def test_stow_refuses_every_cut(server: RunningServer, http: httpx.Client, stored: Stored):
    """A stream cut at every third byte and at every element boundary, in one request: a cut
    inside an element is 0xC000; a cut exactly between two elements of the data set leaves a
    well-formed, shorter data set, refused for what it lacks (0xA900: no UIDs, no Pixel Data)."""
    data = _bytes(_fresh())
    boundaries = {start for start, _ in element_starts(data).values()} | {data_set_offset(data)}
    cuts = sorted(set(range(0, len(data), 3)) | boundaries)
    assert len(cuts) <= MAX_PARTS
    response = stow(http, [data[:cut] for cut in cuts])
    assert response.status_code == 409, response.text
    assert stored_items(response) == []
    expected = [DATASET_MISMATCH if cut in boundaries else CANNOT_UNDERSTAND for cut in cuts]
    assert [reason for reason, _ in failures(response)] == expected
    assert_intact(server, http, stored)


def test_stow_true_duplicate_is_answered_with_the_instance_held(
    server: RunningServer, http: httpx.Client, stored: Stored
):
    """The same instance again, even with other bytes (policy ``keep``): success, and the
    RetrieveURL serves the copy held."""
    again = copy.deepcopy(stored.datasets[1])
    again.PatientName = "CHANGED^NAME"
    response = stow(http, [_bytes(again)])
    assert response.status_code == 200, response.text
    [item] = stored_items(response)
    url = item["00081190"]["Value"][0]
    retrieve = http.get(url, headers={"Accept": AS_STORED})
    assert retrieve.status_code == 200
    assert stored.files[1] in retrieve.content
    assert_intact(server, http, stored)


def test_stow_forged_duplicate_next_to_a_good_part(
    server: RunningServer, http: httpx.Client, stored: Stored, cases: dict[str, Case]
):
    """202: the good part is stored with a RetrieveURL that works; the forged one is listed as
    failed, with no URL."""
    good = _fresh()
    forged = cases["forged-duplicate-in-another-study"]
    response = stow(http, [_bytes(good), forged.data])
    assert response.status_code == 202, response.text
    assert failures(response) == [(DUPLICATE, forged.sop_instance)]
    [item] = stored_items(response)
    assert item["00081155"]["Value"] == [good.SOPInstanceUID]
    assert http.get(item["00081190"]["Value"][0]).status_code == 200
    assert forged.reason in response.headers["warning"]
    # The module's other tests compare against what it holds now.
    stored.blobs = _blobs(server.backend.settings.data_dir)
    stored.instances += 1
    assert_intact(server, http, stored)


# --- STOW-RS: multipart bodies --------------------------------------------------------------------


def post(http: httpx.Client, body: bytes, content_type: str) -> httpx.Response:
    return http.post(
        "/dicom-web/studies",
        content=body,
        headers={"Content-Type": content_type, "Accept": DICOM_JSON},
    )


def related(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary="{boundary}"'


@pytest.mark.parametrize(
    ("boundary", "message"),
    [
        ("B" * 201, "the multipart boundary has 201 characters; RFC 2046 5.1.1 allows at most 70"),
        ("B" * 71, "the multipart boundary has 71 characters; RFC 2046 5.1.1 allows at most 70"),
        ("a@b", "the multipart boundary holds characters RFC 2046 5.1.1 does not allow: '@'"),
    ],
    ids=["201-characters", "71-characters", "forbidden-character"],
)
def test_stow_boundary_rfc_2046(
    server: RunningServer, http: httpx.Client, stored: Stored, boundary: str, message: str
):
    body = f"--{boundary}\r\n\r\nx\r\n--{boundary}--".encode()
    response = post(http, body, related(boundary))
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(message), response.text
    assert_intact(server, http, stored)


def test_boundary_rules_of_rfc_2046():
    assert boundary_error(b"a" * 70) is None
    assert boundary_error(b"'()+_,-./:=? x") is None
    assert boundary_error(b"") == "the multipart boundary is empty"
    assert boundary_error(b"ab ") == (
        "the multipart boundary ends in a space, which RFC 2046 5.1.1 does not allow"
    )
    assert boundary_error(b"a\r\nb") == (
        "the multipart boundary holds characters RFC 2046 5.1.1 does not allow: '\\n\\r'"
    )
    with pytest.raises(MultipartError, match="at most 70"):
        MultipartReader(b"b" * 71)


def test_parts_before_a_malformed_delimiter_are_kept():
    """A chunk that completes a part and then breaks the framing: the part comes with the
    error, whole, and nothing after it is read."""
    reader = MultipartReader(b"xyz")
    with pytest.raises(MultipartError) as info:
        reader.feed(b"--xyz\r\n\r\nfirst\r\n--xyzGARBAGE\r\n\r\nsecond\r\n--xyz--")
    [part] = info.value.parts
    assert (part.index, part.complete, part.body.getvalue()) == (1, True, b"first")
    assert reader.finished and reader.close() is None
    assert reader.feed(b"more") == []


@pytest.mark.parametrize("split", [1, 5, 12, 13, 14, 15, 16])
def test_only_a_delimiter_after_crlf_ends_the_preamble(split: int):
    """``--b`` inside the preamble but not after a CRLF does not start the body (RFC 2046
    5.1.1), however the body is cut into chunks."""
    body = b"0123456789xx--b\r\n\r\nbad\r\n--b\r\n\r\ngood\r\n--b--"
    reader = MultipartReader(b"b")
    parts = reader.feed(body[:split]) + reader.feed(body[split:])
    assert [(p.index, p.body.getvalue()) for p in parts] == [(1, b"good")]
    assert reader.finished


def test_stow_70_character_boundary_is_fine(
    server: RunningServer, http: httpx.Client, stored: Stored
):
    ds = _fresh()
    response = stow(http, [_bytes(ds)], boundary="'()+_,-./:=? 0123456789" + "b" * 47)
    assert response.status_code == 200, response.text
    stored.blobs = _blobs(server.backend.settings.data_dir)
    stored.instances += 1
    assert_intact(server, http, stored)


def _part(data: bytes, content_type: str | None = "application/dicom") -> bytes:
    head = f"Content-Type: {content_type}\r\n" if content_type else ""
    return f"{head}\r\n".encode() + data


def _body(parts: list[bytes], boundary: str = "xyz", close: bool = True) -> bytes:
    out = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


@dataclass(frozen=True)
class BodyCase:
    body: Callable[[bytes], bytes]
    status: int
    message: str  # in the 400's detail, or in the Warning header
    failed: list[int] = field(default_factory=list)


BODY_CASES: dict[str, BodyCase] = {
    "no-closing-delimiter-after-the-last-part": BodyCase(
        lambda good: _body([_part(good)], close=False) + b"--xyz",
        200,
        "the body has no closing boundary delimiter (RFC 2046 5.1.1)",
    ),
    "body-ends-inside-a-part": BodyCase(
        lambda good: b"--xyz\r\n" + _part(good)[:-5],
        409,
        "the request body ended inside part 1",
        [CANNOT_UNDERSTAND],
    ),
    "body-ends-inside-part-headers": BodyCase(
        lambda good: b"--xyz\r\nContent-Type: application/dicom\r\n--xyz--",
        409,
        "the request body ended inside part 1",
        [CANNOT_UNDERSTAND],
    ),
    "headers-over-64-KiB": BodyCase(
        lambda good: b"--xyz\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n" + good + b"\r\n--xyz--",
        400,
        "the body is not valid multipart/related: the headers of part 1 are longer than 64 KiB",
    ),
    "no-crlf-after-the-boundary": BodyCase(
        lambda good: b"--xyzContent-Type: application/dicom\r\n\r\n" + good + b"\r\n--xyz--",
        400,
        "the body is not valid multipart/related: a boundary delimiter is not followed by CRLF "
        "(RFC 2046 5.1.1)",
    ),
    "empty-part": BodyCase(
        lambda good: _body([_part(b"")]),
        409,
        "not a DICOM Part-10 stream: no DICM prefix",
        [CANNOT_UNDERSTAND],
    ),
    "part-not-application-dicom": BodyCase(
        lambda good: _body([_part(good, "text/plain")]),
        409,
        "part 1 is text/plain, not application/dicom",
        [CANNOT_UNDERSTAND],
    ),
    "nested-multipart": BodyCase(
        lambda good: _body(
            [_part(_body([_part(good)], "inner"), "multipart/related; boundary=inner")]
        ),
        409,
        "part 1 is multipart/related; boundary=inner, not application/dicom",
        [CANNOT_UNDERSTAND],
    ),
    "boundary-never-appears": BodyCase(
        lambda good: b"no multipart here",
        400,
        "the body holds no part: the boundary of the Content-Type never appears",
    ),
    "empty-body": BodyCase(
        lambda good: b"",
        400,
        "the body holds no part: the boundary of the Content-Type never appears",
    ),
    "more-parts-than-allowed": BodyCase(
        lambda good: _body([_part(b"")] * (MAX_PARTS + 200)),
        409,
        f"the body holds more than {MAX_PARTS} parts: those after part {MAX_PARTS} were not read",
        [CANNOT_UNDERSTAND] * (MAX_PARTS + 1),  # and the first part not read
    ),
    # Content not read is never a 200 (PS3.18 10.5.3: 200 means every instance was stored).
    "good-parts-and-more-than-allowed": BodyCase(
        lambda good: _body([_part(good)] * (MAX_PARTS + 1)),
        202,
        f"the body holds more than {MAX_PARTS} parts: those after part {MAX_PARTS} were not read",
        [CANNOT_UNDERSTAND],
    ),
    "a-good-part-then-a-delimiter-without-crlf": BodyCase(
        lambda good: b"--xyz\r\n" + _part(good) + b"\r\n--xyzGARBAGE\r\n\r\nx\r\n--xyz--",
        202,
        "the body is not valid multipart/related: a boundary delimiter is not followed by CRLF "
        "(RFC 2046 5.1.1)",
        [CANNOT_UNDERSTAND],
    ),
    "a-good-part-then-headers-over-64-KiB": BodyCase(
        lambda good: _body([_part(good)], close=False)
        + b"--xyz\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n" + good + b"\r\n--xyz--",
        202,
        "the body is not valid multipart/related: the headers of part 2 are longer than 64 KiB",
        [CANNOT_UNDERSTAND],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BODY_CASES))
def test_stow_malformed_body(server: RunningServer, http: httpx.Client, stored: Stored, name: str):
    case = BODY_CASES[name]
    good = stored.files[0]  # already held: a success that stores nothing new
    response = post(http, case.body(good), related("xyz"))
    assert response.status_code == case.status, response.text
    if case.status == 400:
        assert response.json()["detail"] == case.message
    else:
        assert case.message in response.headers["warning"], response.headers.get("warning")
        assert [reason for reason, _ in failures(response)] == case.failed
    assert_intact(server, http, stored)


def test_stow_framing_error_after_a_good_part(
    server: RunningServer, http: httpx.Client, stored: Stored
):
    """A good part, then a delimiter not followed by CRLF: the good part is stored (with its
    RetrieveURL), and the part whose framing broke is listed as failed (0xC000, no UIDs: none
    were read), so the answer is 202, not 200."""
    good = _fresh()
    body = b"--xyz\r\n" + _part(_bytes(good)) + b"\r\n--xyzGARBAGE\r\n\r\n"
    body += _part(_bytes(_fresh())) + b"\r\n--xyz--\r\n"
    response = post(http, body, related("xyz"))
    assert response.status_code == 202, response.text
    [item] = stored_items(response)
    assert item["00081155"]["Value"] == [good.SOPInstanceUID]
    assert http.get(item["00081190"]["Value"][0]).status_code == 200
    [failed] = response.json()["00081198"]["Value"]
    assert failed == {
        "00081150": {"vr": "UI"},
        "00081155": {"vr": "UI"},
        "00081197": {"vr": "US", "Value": [CANNOT_UNDERSTAND]},
    }
    assert response.headers["warning"].count("a boundary delimiter is not followed by CRLF") == 1
    stored.blobs = _blobs(server.backend.settings.data_dir)
    stored.instances += 1
    assert_intact(server, http, stored)


def test_stow_part_without_content_type_is_taken_as_dicom(
    server: RunningServer, http: httpx.Client, stored: Stored
):
    """The ``type`` parameter of multipart/related names what the parts are (RFC 2387)."""
    response = post(http, _body([_part(stored.files[1], None)]), related("xyz"))
    assert response.status_code == 200, response.text
    assert stored_items(response)[0]["00081155"]["Value"] == [stored.datasets[1].SOPInstanceUID]
    assert_intact(server, http, stored)


# --- C-STORE ---------------------------------------------------------------------------------


@pytest.fixture
def store_assoc(server: RunningServer, chunked_send: None) -> Iterator[Any]:
    """An association that sends files' data sets byte for byte as they are on disk."""
    ae = _ae()
    for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, syntax)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    yield assoc
    assoc.release()


@pytest.mark.parametrize("name", DIMSE_CASES)
def test_cstore_refuses(
    server: RunningServer,
    http: httpx.Client,
    stored: Stored,
    cases: dict[str, Case],
    store_assoc: Any,
    tmp_path: Path,
    name: str,
):
    case = cases[name]
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(case.data)
    status = store_assoc.send_c_store(path)
    assert status.Status == case.dimse
    assert status.ErrorComment == case.reason[:64] or status.ErrorComment.startswith(case.reason)
    assert store_assoc.send_c_echo().Status == 0x0000  # the association goes on
    assert_intact(server, http, stored)


def test_cstore_refuses_a_sample_of_cuts(
    server: RunningServer, http: httpx.Client, stored: Stored, store_assoc: Any, tmp_path: Path
):
    """Cuts of the data set at every 16th byte and at every element boundary, one association."""
    data = _bytes(_fresh())
    starts = element_starts(data)
    boundaries = {start for start, _ in starts.values()}
    offset = data_set_offset(data)
    cuts = sorted(set(range(offset + 8, len(data), 16)) | boundaries - {offset})
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.dcm"
        path.write_bytes(data[:cut])
        status = store_assoc.send_c_store(path)
        expected = DATASET_MISMATCH if cut in boundaries else CANNOT_UNDERSTAND
        assert (cut, status.Status) == (cut, expected), status.ErrorComment
    assert_intact(server, http, stored)


def test_storescu_gets_the_failure(
    server: RunningServer,
    http: httpx.Client,
    stored: Stored,
    cases: dict[str, Case],
    tmp_path: Path,
):
    """DCMTK's storescu sends what it can read whole (not the truncated files): the pixel data
    that disagrees with Rows, and the forged duplicate."""
    storescu = require_tool("storescu")
    for name, status in (
        ("rows-disagree-with-pixel-data", "0xa900: Error: Data Set does not match SOP Class"),
        ("forged-duplicate-in-another-study", "0x0111: Failure"),
    ):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(cases[name].data)
        proc = subprocess.run(
            [
                storescu,
                "-d",
                "-aec",
                server.ae_title,
                "127.0.0.1",
                str(server.dimse_port),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = proc.stdout + proc.stderr
        assert f"DIMSE Status                  : {status}" in output, output
        assert "ErrorComment" in output and cases[name].reason[:40] in output, output
    assert_intact(server, http, stored)


# --- pacsbridge import -----------------------------------------------------------------------


def test_import_rejects_each(stored: Stored, cases: dict[str, Case], tmp_path: Path):
    """One import of every hostile file into an archive holding the module's study: a rejected
    line per file with its reason, exit code 1, nothing written."""
    data_dir = tmp_path / "data"
    env = {**os.environ, "PACSBRIDGE_DATA_DIR": str(data_dir), "COLUMNS": "1000", "NO_COLOR": "1"}
    env["PACSBRIDGE_WORKER_IN_SERVE"] = "false"
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    for n, data in enumerate(stored.files):
        (good_dir / f"{n}.dcm").write_bytes(data)
    first = subprocess.run(
        [str(VENV_BIN / "pacsbridge"), "import", str(good_dir)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = _blobs(data_dir)
    assert len(before) == 2

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    paths = {name: bad_dir / f"{name}.dcm" for name in CASE_NAMES}
    for name, path in paths.items():
        path.write_bytes(cases[name].data)
    proc = subprocess.run(
        [str(VENV_BIN / "pacsbridge"), "import", "--show-rejected=100", *map(str, paths.values())],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["stored"], summary["rejected"]) == (0, len(CASE_NAMES))
    lines = proc.stderr.splitlines()
    for name, path in paths.items():
        [line] = [line for line in lines if line.strip().startswith(f"{path}: ")]
        assert cases[name].reason in line, line
    assert _blobs(data_dir) == before
    assert _instances(Archive(Settings(data_dir=data_dir), migrate=False)) == 2


# --- the archive: duplicate policies and the race between check and insert ----------------------


def test_forged_duplicate_on_both_indexes(archive: Archive, tmp_path: Path):
    original = _fresh()
    assert archive.ingest(_bytes(original)).outcome is IngestOutcome.STORED
    key = instance_key(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    )
    held = archive.blobs.read(key)
    for changes, kind, reason in (
        ({"StudyInstanceUID": new_uid()}, IngestErrorKind.CONFLICT, "in another study"),
        ({"SeriesInstanceUID": new_uid()}, IngestErrorKind.CONFLICT, "in another series"),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"},
            IngestErrorKind.CONFLICT,
            "as another SOP Class: 1.2.840.10008.5.1.4.1.1.2",
        ),
    ):
        forged = copy.deepcopy(original)
        for keyword, value in changes.items():
            setattr(forged, keyword, value)
        with pytest.raises(IngestError) as info:
            archive.ingest(_bytes(forged))
        assert info.value.kind is kind
        assert reason in info.value.reason
        assert info.value.sop_instance_uid == original.SOPInstanceUID
    assert archive.stats().instances == 1
    assert list(archive.blobs.keys()) == [key]
    assert archive.blobs.read(key) == held


def test_forged_duplicate_stored_between_check_and_insert(archive: Archive):
    """Another process stores the UID in another study after the check: the insert finds it,
    the blob just written is removed, and the held instance is untouched."""
    original = _fresh()
    forged = copy.deepcopy(original)
    forged.StudyInstanceUID, forged.SeriesInstanceUID = new_uid(), new_uid()
    ingestor = archive.ingestor
    real_held = ingestor._held

    class NotYet:
        """The check before the blob write finds nothing; the insert's look-up finds it."""

        calls = 0

        def execute(self, conn: Any, params: dict[str, Any]) -> Any:
            NotYet.calls += 1
            return None if NotYet.calls == 1 else real_held.execute(conn, params)

    archive.ingest(_bytes(original))
    ingestor._held = NotYet()  # type: ignore[assignment]
    try:
        with pytest.raises(IngestError) as info:
            archive.ingest(_bytes(forged))
    finally:
        ingestor._held = real_held
    assert info.value.kind is IngestErrorKind.CONFLICT
    assert NotYet.calls == 2
    assert list(archive.blobs.keys()) == [
        instance_key(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    ]
    assert archive.stats().instances == 1


def test_overwrite_moves_an_instance_and_prunes_what_it_leaves(make_backend):
    """Policy ``overwrite``: the last copy wins, also in another study; the study it leaves
    empty is removed. A series held in another study is still refused."""
    archive = Archive(make_backend(duplicate_policy="overwrite").settings)
    try:
        original = _fresh(PatientID="OLD-PATIENT")
        archive.ingest(_bytes(original))
        moved = copy.deepcopy(original)
        moved.StudyInstanceUID, moved.SeriesInstanceUID = new_uid(), new_uid()
        moved.PatientID = "NEW-PATIENT"
        assert archive.ingest(_bytes(moved)).outcome is IngestOutcome.OVERWRITTEN
        archive.flush_pending_deletions()
        assert list(archive.blobs.keys()) == [
            instance_key(moved.StudyInstanceUID, moved.SeriesInstanceUID, moved.SOPInstanceUID)
        ]
        stats = archive.stats()
        assert (stats.patients, stats.studies, stats.series, stats.instances) == (1, 1, 1, 1)

        intruder = _fresh(SeriesInstanceUID=moved.SeriesInstanceUID)
        with pytest.raises(IngestError) as info:
            archive.ingest(_bytes(intruder))
        assert info.value.kind is IngestErrorKind.DATASET_MISMATCH
        assert info.value.reason == (
            f"Series Instance UID already held in another study: {moved.StudyInstanceUID}"
        )
        assert archive.stats().instances == 1
    finally:
        archive.close()


# --- the rules themselves, on the data sets they must accept -----------------------------------


def _image(size: int, **changes: Any) -> Dataset:
    ds = _fresh(**changes)
    ds.PixelData = bytes(size)
    return ds


@pytest.mark.parametrize(
    ("changes", "size"),
    [
        ({}, 512),
        ({"NumberOfFrames": 3}, 1536),
        ({"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "Rows": 3, "Columns": 5}, 16),
        ({"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0, "Rows": 3, "Columns": 5}, 2),
        ({"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0, "NumberOfFrames": 3}, 96),
        (
            {
                "SamplesPerPixel": 3,
                "PhotometricInterpretation": "YBR_FULL_422",
                "BitsAllocated": 8,
                "BitsStored": 8,
                "HighBit": 7,
                "PlanarConfiguration": 0,
            },
            16 * 16 * 2,
        ),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "BitsAllocated": 8}, 768),
    ],
    ids=["ct", "frames", "odd-padded", "1-bit-packed", "1-bit-frames", "ybr-full-422", "rgb"],
)
def test_native_pixel_data_of_the_right_length_is_accepted(changes: dict[str, Any], size: int):
    """The right length is stored without a warning; a longer one with a warning; a shorter
    one is refused."""
    assert parse_header(_bytes(_image(size, **changes))).warning is None
    longer = parse_header(_bytes(_image(size + 2, **changes))).warning
    assert longer is not None and "bytes longer than its attributes need" in longer
    with pytest.raises(InvalidInstance, match=f"Pixel Data has {size - 2} bytes"):
        parse_header(_bytes(_image(size - 2, **changes)))


@pytest.mark.parametrize(
    ("tag_keyword", "sample"), [("FloatPixelData", 4), ("DoubleFloatPixelData", 8)]
)
def test_float_pixel_data_is_sized_by_its_own_sample(tag_keyword: str, sample: int):
    ds = _fresh(SOPClassUID="1.2.840.10008.5.1.4.1.1.30")
    del ds.PixelData
    setattr(ds, tag_keyword, bytes(16 * 16 * sample))
    parse_header(_bytes(ds))
    setattr(ds, tag_keyword, bytes(16 * 16 * sample - 8))
    with pytest.raises(InvalidInstance, match=f"{tag_keyword} has {16 * 16 * sample - 8} bytes"):
        parse_header(_bytes(ds))


def test_deflated_instance_within_the_limit_is_accepted_and_indexed():
    ds = _fresh()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    parsed = parse_header(_bytes(ds))
    assert parsed.dicom_json["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}
    with pytest.raises(InvalidInstance, match="the deflated data set inflates to more than"):
        parse_header(_bytes(ds), max_inflated_size=100)


def test_retired_standard_syntaxes_are_known_and_private_ones_are_not():
    from archive.dicom import KNOWN_TRANSFER_SYNTAXES

    assert "1.2.840.10008.1.2.4.52" in KNOWN_TRANSFER_SYNTAXES  # JPEG Extended 3 & 5, retired
    assert "1.2.840.10008.1.2.2" in KNOWN_TRANSFER_SYNTAXES  # Explicit VR Big Endian, retired
    assert "1.2.840.10008.1.2.6.2" not in KNOWN_TRANSFER_SYNTAXES  # XML Encoding
    assert "1.2.840.113619.5.2" not in KNOWN_TRANSFER_SYNTAXES  # GE private
    ds = _fresh()
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.10.1506.9.1")  # private
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    with pytest.raises(InvalidInstance) as info:
        parse_header(out.getvalue())
    assert info.value.unsupported_transfer_syntax


def test_junk_is_refused_on_its_first_bytes():
    """Zeros, random-looking bytes and a DICM stream with no File Meta Information: refused
    without reading the rest (the reason names the first thing wrong)."""
    assert_reason = {
        bytes(100 * 2**20): "not a DICOM Part-10 stream",
        bytes(128) + b"DICM" + b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100": "no File Meta Information",
    }
    for data, reason in assert_reason.items():
        with pytest.raises(InvalidInstance, match=reason):
            parse_header(data)


# --- native pixel data longer than its attributes need: stored, with a warning -------------------

WARNING = 0xB007  # PS3.4 B.2.3 "Data Set does not match SOP Class", a warning
#: pydicom's MR_small_padded.dcm: 64 x 64 x 16 bits need 8192 bytes; it holds 8320.
MR_PADDED_WARNING = (
    "Pixel Data is 128 bytes longer than its attributes need (8192): Rows 64 x Columns 64 x "
    "Samples per Pixel 1 x Bits Allocated 16 x Number of Frames 1 (PS3.5 8.1.1); stored as sent"
)
#: A 16 x 16 CT slice whose 16-bit Pixel Data has 516 bytes instead of 512.
LONGER_WARNING = (
    "Pixel Data is 4 bytes longer than its attributes need (512): Rows 16 x Columns 16 x "
    "Samples per Pixel 1 x Bits Allocated 16 x Number of Frames 1 (PS3.5 8.1.1); stored as sent"
)


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def _with_new_uids(ds: Dataset) -> Dataset:
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def retrieve_as_stored(http: httpx.Client, ds: Dataset) -> bytes:
    response = http.get(instance_path(ds), headers={"Accept": AS_STORED})
    assert response.status_code == 200, response.text
    ((_, data),) = parse_multipart(response.content, response.headers["content-type"])
    return data


def first_frame(http: httpx.Client, ds: Dataset) -> bytes:
    response = http.get(f"{instance_path(ds)}/frames/1")
    assert response.status_code == 200, response.text
    ((_, frame),) = parse_multipart(response.content, response.headers["content-type"])
    return frame


def test_cstore_stores_longer_pixel_data_with_a_warning(
    server: RunningServer, http: httpx.Client, stored: Stored, chunked_send: None, tmp_path: Path
):
    """0xB007 with an Error Comment saying what does not match; the data set is stored as sent
    and its frame served."""
    mr_path = _testdata("MR_small_padded.dcm")
    longer = _image(516)
    longer_path = tmp_path / "longer.dcm"
    longer_path.write_bytes(_bytes(longer))
    ae = _ae()
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        for path, warning in ((mr_path, MR_PADDED_WARNING), (longer_path, LONGER_WARNING)):
            status = assoc.send_c_store(path)
            assert (status.Status, status.ErrorComment) == (WARNING, warning[:64].rstrip())
    finally:
        assoc.release()
    for path, size in ((mr_path, 8192), (longer_path, 512)):
        sent = path.read_bytes()
        ds = pydicom.dcmread(path)
        held = retrieve_as_stored(http, ds)
        sent_offset, held_offset = part10_data_set_offset(sent), part10_data_set_offset(held)
        assert sent_offset and held_offset
        assert held[held_offset:] == sent[sent_offset:]  # the data set as sent, byte for byte
        assert first_frame(http, ds) == ds.PixelData[:size]
    stored.blobs = _blobs(server.backend.settings.data_dir)
    stored.instances += 2
    assert_intact(server, http, stored)


def test_stow_stores_longer_pixel_data_with_a_warning(
    server: RunningServer, http: httpx.Client, stored: Stored
):
    """202 (PS3.18 10.5.3: warnings), each such instance in the ReferencedSOPSequence with
    WarningReason 0xB007 and a RetrieveURL that serves it; the others as usual."""
    mr = _with_new_uids(pydicom.dcmread(_testdata("MR_small_padded.dcm")))
    longer, plain = _image(516), _fresh()
    files = [_bytes(mr), _bytes(longer), _bytes(plain)]
    response = stow(http, files)
    assert response.status_code == 202, response.text
    assert failures(response) == []
    items = stored_items(response)
    assert [item["00081155"]["Value"][0] for item in items] == [
        mr.SOPInstanceUID,
        longer.SOPInstanceUID,
        plain.SOPInstanceUID,
    ]
    reasons = [item.get("00081196") for item in items]
    assert reasons == [{"vr": "US", "Value": [WARNING]}] * 2 + [None]
    for item, data in zip(items, files, strict=True):
        retrieve = http.get(item["00081190"]["Value"][0], headers={"Accept": AS_STORED})
        assert retrieve.status_code == 200
        assert data in retrieve.content
    warning = response.headers["warning"]
    assert f"part 1: 0xB007 {MR_PADDED_WARNING}" in warning, warning
    assert f"part 2: 0xB007 {LONGER_WARNING}" in warning, warning
    assert "part 3" not in warning
    stored.blobs = _blobs(server.backend.settings.data_dir)
    stored.instances += 3
    assert_intact(server, http, stored)


def test_import_stores_longer_pixel_data_with_a_warning(tmp_path: Path):
    """Counted as stored, exit code 0, a warning line per file."""
    data_dir = tmp_path / "data"
    env = {**os.environ, "PACSBRIDGE_DATA_DIR": str(data_dir), "COLUMNS": "1000", "NO_COLOR": "1"}
    env["PACSBRIDGE_WORKER_IN_SERVE"] = "false"
    longer = tmp_path / "longer.dcm"
    longer.write_bytes(_bytes(_image(516)))
    mr = _testdata("MR_small_padded.dcm")
    proc = subprocess.run(
        [str(VENV_BIN / "pacsbridge"), "import", str(mr), str(longer)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["stored"], summary["rejected"]) == (2, 0)
    lines = [line.strip() for line in proc.stderr.splitlines()]
    assert "stored with a warning: 2" in lines
    assert f"{mr}: warning: {MR_PADDED_WARNING}" in lines
    assert f"{longer}: warning: {LONGER_WARNING}" in lines
    held = {data for data in _blobs(data_dir).values()}
    assert held == {mr.read_bytes(), longer.read_bytes()}


# --- Error Comments ---------------------------------------------------------------------------


def test_error_comment_is_one_value(
    server: RunningServer, http: httpx.Client, stored: Stored, store_assoc: Any, tmp_path: Path
):
    """A reason that quotes a backslash (here a Study Instance UID with two values) gives an
    Error Comment without one: a backslash would make the LO two values (PS3.5 6.2)."""
    ds = _fresh()
    ds.StudyInstanceUID = ["1.2.3", "4"]
    path = tmp_path / "two-study-uids.dcm"
    path.write_bytes(_bytes(ds))
    status = store_assoc.send_c_store(path)
    assert status.Status == DATASET_MISMATCH
    assert status.ErrorComment == "StudyInstanceUID '1.2.3//4' is not a valid UID (PS3.5 9.1)"
    assert_intact(server, http, stored)


# --- sequences: Explicit VR items inside UN ----------------------------------------------------


def test_stow_un_sequence_with_explicit_vr_items(
    server: RunningServer, http: httpx.Client, stored: Stored
):
    """(0029,1010) UN of undefined length holding an Explicit VR item (an SQ relabelled UN):
    stored, and its metadata holds the item as pydicom reads it."""
    data = with_private_sequence(
        private_item(True) + private_item(False), syntax=ExplicitVRLittleEndian, explicit=True
    )
    ds = pydicom.dcmread(io.BytesIO(data))
    response = stow(http, [data])
    assert response.status_code == 200, response.text
    metadata = http.get(f"{instance_path(ds)}/metadata")
    assert metadata.status_code == 200, metadata.text
    [item_explicit, item_implicit] = metadata.json()[0]["00291010"]["Value"]
    assert item_explicit["00291001"] == {"vr": "LO", "Value": ["HELLO"]}
    assert item_explicit["00291002"] == {"vr": "US", "Value": [7]}
    assert item_implicit["00291002"] == {"vr": "UN", "InlineBinary": "BwA="}
    assert retrieve_as_stored(http, ds) == data
    stored.blobs = _blobs(server.backend.settings.data_dir)
    stored.instances += 1
    assert_intact(server, http, stored)


# --- a deflated instance without File Meta Information Group Length ----------------------------


def _without_group_length(data: bytes) -> bytes:
    """The stream without its (0002,0000): the File Meta Information is read by group number
    (PS3.10 7.1 makes the element Type 1, but readers take files without it)."""
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    return data[:132] + data[144:]


def c_get_instance(server: RunningServer, ds: Dataset, transfer_syntax: str) -> bytes:
    """The data set a C-GET of ``ds`` delivers when only ``transfer_syntax`` is proposed."""
    received: list[tuple[str, bytes]] = []

    def on_store(event: Any) -> int:
        received.append((str(event.context.transfer_syntax), event.request.DataSet.getvalue()))
        return 0x0000

    ae = _ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [transfer_syntax])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    identifier.SeriesInstanceUID = ds.SeriesInstanceUID
    identifier.SOPInstanceUID = ds.SOPInstanceUID
    assoc = ae.associate(
        "127.0.0.1",
        server.dimse_port,
        ae_title=server.ae_title,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert responses[-1][0].Status == 0x0000, responses[-1][0]
    [(syntax, data)] = received
    assert syntax == transfer_syntax
    return data


def test_deflated_instance_without_group_length_is_read_like_any(
    server: RunningServer, http: httpx.Client, stored: Stored
):
    """Ingest takes a deflated instance without (0002,0000); every reader of stored files
    then sees it as deflated (one File Meta Information reader): its frame, its rendering and
    its conversion to Explicit VR Little Endian over WADO-RS and C-GET, and C-GET as stored."""
    ds = _fresh()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = _without_group_length(_bytes(ds))
    pixels = pydicom.dcmread(io.BytesIO(data)).pixel_array
    response = stow(http, [data])
    assert response.status_code == 200, response.text
    assert first_frame(http, ds) == ds.PixelData
    png = http.get(f"{instance_path(ds)}/rendered", headers={"Accept": "image/png"})
    assert png.status_code == 200, png.text
    assert Image.open(io.BytesIO(png.content)).size == (16, 16)
    converted = http.get(instance_path(ds), headers={"Accept": DICOM})
    assert converted.status_code == 200, converted.text
    ((_, part),) = parse_multipart(converted.content, converted.headers["content-type"])
    as_explicit = pydicom.dcmread(io.BytesIO(part))
    assert as_explicit.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(as_explicit.pixel_array, pixels)
    by_get = read_dataset(
        io.BytesIO(c_get_instance(server, ds, ExplicitVRLittleEndian)),
        is_implicit_VR=False,
        is_little_endian=True,
    )
    assert by_get.PixelData == ds.PixelData
    offset = part10_data_set_offset(data)
    assert offset is not None
    assert c_get_instance(server, ds, DeflatedExplicitVRLittleEndian) == data[offset:]
    assert retrieve_as_stored(http, ds) == data
    stored.blobs = _blobs(server.backend.settings.data_dir)
    stored.instances += 1
    assert_intact(server, http, stored)


# --- races between processes: a blob under keep is never replaced ------------------------------


class _HeldOnlyAtInsert:
    """The check of ``_held`` before the blob write finds nothing (another process stores the
    instance just after it); the look-up after the insert finds what is there."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def execute(self, conn: Any, params: dict[str, Any]) -> Any:
        self.calls += 1
        return None if self.calls == 1 else self.real.execute(conn, params)


def _ingest_racing(archive: Archive, data: bytes) -> IngestResult:
    ingestor = archive.ingestor
    real = ingestor._held
    ingestor._held = _HeldOnlyAtInsert(real)  # type: ignore[assignment]
    try:
        return archive.ingest(data)
    finally:
        ingestor._held = real


def _row(archive: Archive, sop: str) -> tuple[str, str, int]:
    """(SOP Class UID, SHA-256, size) of the instance's index row."""
    with archive.db.session() as s:
        row = s.execute(
            select(Instance.sop_class_uid, Instance.sha256, Instance.size_bytes).where(
                Instance.sop_instance_uid == sop
            )
        ).one()
    return str(row[0]), str(row[1]), int(row[2])


def _key(ds: Dataset) -> str:
    return instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_copy_of_another_sop_class_stored_between_check_and_insert(archive: Archive):
    """The same UID, study and series, another SOP Class, stored by another process after the
    check: refused (0x0111), and the file of the instance held (same key) stays as it was."""
    original = _fresh()
    held = _bytes(original)
    archive.ingest(held)
    forged = copy.deepcopy(original)
    forged.SOPClassUID = forged.file_meta.MediaStorageSOPClassUID = MRImageStorage
    with pytest.raises(IngestError) as info:
        _ingest_racing(archive, _bytes(forged))
    assert info.value.kind is IngestErrorKind.CONFLICT
    assert info.value.reason == (
        f"SOP Instance UID already held as another SOP Class: {CTImageStorage}"
    )
    assert list(archive.blobs.keys()) == [_key(original)]
    assert archive.blobs.read(_key(original)) == held
    assert _row(archive, original.SOPInstanceUID) == (
        CTImageStorage,
        hashlib.sha256(held).hexdigest(),
        len(held),
    )


def test_true_duplicate_stored_between_check_and_insert_keeps_the_first_bytes(archive: Archive):
    """A second copy with other bytes, stored by another process after the check: answered as
    a duplicate; the file keeps the first copy's bytes, which its index row describes."""
    original = _fresh()
    held = _bytes(original)
    archive.ingest(held)
    again = copy.deepcopy(original)
    again.PatientName = "OTHER^BYTES"
    assert _ingest_racing(archive, _bytes(again)).outcome is IngestOutcome.DUPLICATE
    assert archive.blobs.read(_key(original)) == held
    assert _row(archive, original.SOPInstanceUID)[1:] == (
        hashlib.sha256(held).hexdigest(),
        len(held),
    )


def test_blob_written_by_another_process_not_yet_indexed(archive: Archive):
    """Another process has written its blob and not yet committed its row (or died in between):
    a copy of another SOP Class under the same key is refused, and the blob there is indexed as
    what it holds; its own writer then finds it held."""
    original = _fresh()
    first = _bytes(original)
    archive.blobs.put(_key(original), first)
    forged = copy.deepcopy(original)
    forged.SOPClassUID = forged.file_meta.MediaStorageSOPClassUID = MRImageStorage
    with pytest.raises(IngestError) as info:
        archive.ingest(_bytes(forged))
    assert info.value.kind is IngestErrorKind.CONFLICT
    assert "as another SOP Class" in info.value.reason
    assert archive.blobs.read(_key(original)) == first
    assert _row(archive, original.SOPInstanceUID) == (
        CTImageStorage,
        hashlib.sha256(first).hexdigest(),
        len(first),
    )
    assert archive.ingest(first).outcome is IngestOutcome.DUPLICATE
    assert archive.stats().instances == 1


class _WaitAfterFirst:
    """A statement of one ingest service that, after its first run, waits until the other
    ingest has run its own: both pass the check before either indexes."""

    def __init__(self, real: Any, barrier: threading.Barrier) -> None:
        self.real, self.barrier, self.waited = real, barrier, False

    def execute(self, conn: Any, params: dict[str, Any]) -> Any:
        result = self.real.execute(conn, params)
        if not self.waited:
            self.waited = True
            self.barrier.wait(timeout=60)
        return result


def test_first_instances_of_a_series_in_two_studies_at_once(archive: Archive, backend: Backend):
    """Two processes (two archives on one index and store) receive the first instance of one
    series at once, each in another study: one is stored, the other refused (0xA900) with the
    study that holds the series; no empty study is left; the loser's process then knows where
    the series is."""
    other = Archive(backend.settings, migrate=False)
    series = new_uid()
    first, second = _fresh(SeriesInstanceUID=series), _fresh(SeriesInstanceUID=series)
    pairs = [(archive, first), (other, second)]
    barrier = threading.Barrier(2)
    results: list[IngestResult | IngestError | None] = [None, None]

    def run(index: int) -> None:
        arc, ds = pairs[index]
        try:
            results[index] = arc.ingest(_bytes(ds))
        except IngestError as exc:
            results[index] = exc

    for arc, _ in pairs:
        arc.ingestor._series_study = _WaitAfterFirst(arc.ingestor._series_study, barrier)  # type: ignore[assignment]
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        kinds = sorted(type(result).__name__ for result in results)
        assert kinds == ["IngestError", "IngestResult"], results
        [won] = [i for i in (0, 1) if isinstance(results[i], IngestResult)]
        lost = 1 - won
        winner, loser = pairs[won][1], pairs[lost][1]
        error = results[lost]
        assert isinstance(error, IngestError)
        assert error.kind is IngestErrorKind.DATASET_MISMATCH
        assert error.reason == (
            f"Series Instance UID already held in another study: {winner.StudyInstanceUID}"
        )
        stats = archive.stats()
        assert (stats.studies, stats.series, stats.instances) == (1, 1, 1)
        assert list(archive.blobs.keys()) == [_key(winner)]
        # The loser's process caches the series with the study the index holds.
        loser_archive = pairs[lost][0]
        more = _fresh(StudyInstanceUID=winner.StudyInstanceUID, SeriesInstanceUID=series)
        assert loser_archive.ingest(_bytes(more)).outcome is IngestOutcome.STORED
        again = _fresh(StudyInstanceUID=loser.StudyInstanceUID, SeriesInstanceUID=series)
        with pytest.raises(IngestError) as info:
            loser_archive.ingest(_bytes(again))
        assert info.value.kind is IngestErrorKind.DATASET_MISMATCH
        assert archive.stats().studies == 1
    finally:
        other.close()
