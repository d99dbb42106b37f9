"""DICOMweb over plain HTTP (httpx): QIDO-RS parameters and defaults, content negotiation,
transfer syntaxes, frames, bulk data ranges, metadata caching, STOW-RS failures, CORS, OpenAPI."""

from __future__ import annotations

import gzip
import io
import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from tests.conftest import RunningServer
from tests.dicomweb_fixtures import (
    BACKEND_IDS,
    BACKENDS,
    ct_study,
    module_server,
    multipart_body,
    parse_multipart,
    part10,
)

DICOM_JSON = "application/dicom+json"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
VIEWER = "http://viewer.example"
REFUSED = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage


@dataclass
class Catalog:
    """What the module stores once, by name."""

    studies: dict[str, list[Dataset]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def dw_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    yield from module_server(
        request,
        tmp_path_factory,
        PACSBRIDGE_QIDO_DEFAULT_LIMIT="4",
        PACSBRIDGE_QIDO_MAX_LIMIT="50",
        PACSBRIDGE_CORS_ORIGINS=json.dumps([VIEWER]),
        PACSBRIDGE_REFUSED_SOP_CLASSES=json.dumps([REFUSED]),
    )


@pytest.fixture(scope="module")
def http(dw_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{dw_server.http}/dicom-web", timeout=120) as client:
        yield client


def stow(
    http: httpx.Client,
    parts: list[bytes],
    path: str = "/studies",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body, content_type = multipart_body(parts)
    return http.post(path, content=body, headers={"Content-Type": content_type, **(headers or {})})


@pytest.fixture(scope="module")
def catalog(http: httpx.Client) -> Catalog:
    cat = Catalog()
    cat.studies["smith"] = ct_study(
        3, size=16, patient_id="H-1", patient_name="SMITH^JOHN", study_date="20240110"
    )
    cat.studies["muller"] = ct_study(
        2, size=16, patient_id="H-2", patient_name="Müller^Jürgen", study_date="20240215"
    )
    for ds in cat.studies["muller"]:
        ds.Modality = "MR"
    cat.studies["smythe"] = ct_study(
        1, size=16, series=2, patient_id="H-3", patient_name="SMYTHE^ANNA", study_date="20240301"
    )
    # Bulk data inside a sequence and at the top level besides the pixels.
    bulky = cat.studies["smythe"][0]
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated = 32, 64, 8
    icon.PixelData = bytes(range(256)) * 8  # above the 1 KiB bulk data threshold
    bulky.IconImageSequence = DicomSequence([icon])
    bulky.add_new(0x60003000, "OW", bytes(4096))  # OverlayData
    parts = [part10(ds) for datasets in cat.studies.values() for ds in datasets]
    for name in ("JPEG2000.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_implicit.dcm", "image_dfl.dcm"):
        path = get_testdata_file(name)
        assert path is not None
        with open(path, "rb") as fh:
            cat.files[name] = fh.read()
        parts.append(cat.files[name])
    response = stow(http, parts)
    assert response.status_code == 200, response.text
    return cat


def uid(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


def file_ds(catalog: Catalog, name: str) -> Dataset:
    return pydicom.dcmread(io.BytesIO(catalog.files[name]))


def instance_path(ds: Dataset) -> str:
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


# --- QIDO-RS ---------------------------------------------------------------------------------


def test_qido_study_defaults_and_retrieve_url(
    http: httpx.Client, catalog: Catalog, dw_server: RunningServer
) -> None:
    response = http.get("/studies", params={"PatientID": "H-1"})
    assert response.status_code == 200
    assert response.headers["content-type"] == DICOM_JSON
    [study] = response.json()
    for tag in (
        "00080020", "00080030", "00080050", "00080056", "00080061", "00080090", "00081190",
        "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010", "00201206",
        "00201208",
    ):  # fmt: skip
        assert tag in study, tag
    uid_ = str(catalog.studies["smith"][0].StudyInstanceUID)
    assert study["00081190"]["Value"] == [f"{dw_server.http}/dicom-web/studies/{uid_}"]
    assert study["00201208"]["Value"] == [3]
    assert study["00080056"]["Value"] == ["ONLINE"]
    assert list(study) == sorted(study)


def test_qido_series_and_instance_defaults(http: httpx.Client, catalog: Catalog) -> None:
    ds = catalog.studies["smythe"][0]
    series = http.get(f"/studies/{ds.StudyInstanceUID}/series").json()
    assert len(series) == 2
    for tag in ("00080060", "0008103E", "00081190", "0020000E", "00200011", "00201209"):
        assert tag in series[0], tag
    assert "00100010" not in series[0]  # the URL fixes the study: no study attributes
    everywhere = http.get("/series", params={"StudyInstanceUID": str(ds.StudyInstanceUID)})
    assert "00100010" in everywhere.json()[0]  # across studies they are included
    instances = http.get(f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances")
    [instance] = instances.json()
    for tag in ("00080016", "00080018", "00081190", "00200013", "00280010", "00280011", "00280100"):
        assert tag in instance, tag
    assert instance["00280100"]["Value"] == [16]
    assert uid(instance, "00081190").endswith(instance_path(ds))


def test_qido_matching_url_encoding_and_uid_lists(http: httpx.Client, catalog: Catalog) -> None:
    smith = str(catalog.studies["smith"][0].StudyInstanceUID)
    muller = str(catalog.studies["muller"][0].StudyInstanceUID)

    def studies(query: str) -> list[str]:
        response = http.get(f"/studies?{query}")
        assert response.status_code == 200, response.text
        return sorted(uid(s, "0020000D") for s in response.json())

    assert studies("PatientName=M%C3%BCller%5EJ%2A") == [muller]  # Müller^J*
    assert studies("PatientName=smith%2A") == [smith]  # case-insensitive, %2A = *
    assert studies("00100020=H-2") == [muller]
    assert studies(f"StudyInstanceUID={smith}%2C{muller}") == sorted([smith, muller])
    assert studies(f"StudyInstanceUID={smith}%5C{muller}") == sorted([smith, muller])
    assert studies(f"StudyInstanceUID={smith}&StudyInstanceUID={muller}") == sorted([smith, muller])
    assert studies("StudyDate=20240201-20240229&PatientID=H-*") == [muller]
    assert studies("ModalitiesInStudy=MR%2CUS&PatientID=H-%2A") == [muller]
    assert studies("PatientID=nobody") == []


def test_qido_fuzzy_matching(http: httpx.Client, catalog: Catalog) -> None:
    muller = str(catalog.studies["muller"][0].StudyInstanceUID)
    smith = str(catalog.studies["smith"][0].StudyInstanceUID)

    def fuzzy(name: str) -> set[str]:
        response = http.get("/studies", params={"PatientName": name, "fuzzymatching": "true"})
        assert response.status_code == 200
        return {uid(s, "0020000D") for s in response.json()}

    assert muller in fuzzy("muller")  # accents and case ignored
    assert muller in fuzzy("jurg mul")  # each word a prefix of a name component
    assert smith in fuzzy("JOHN")
    assert smith not in fuzzy("muller")
    # Without fuzzy matching the literal rules apply.
    plain = http.get("/studies", params={"PatientName": "muller"}).json()
    assert muller not in {uid(s, "0020000D") for s in plain}


def test_qido_includefield(http: httpx.Client, catalog: Catalog) -> None:
    ds = catalog.studies["smith"][0]
    base = f"/studies/{ds.StudyInstanceUID}/instances"
    [one] = http.get(base, params={"includefield": "00200032,PixelSpacing"}).json()[:1]
    assert one["00200032"]["Value"] and one["00280030"]["Value"] == [0.5, 0.5]
    repeated = http.get(f"{base}?includefield=SliceThickness&includefield=00180050").json()
    assert repeated[0]["00180050"]["Value"] == [1.0]
    everything = http.get(base, params={"includefield": "all"}).json()
    assert everything[0]["00280030"]["Value"] == [0.5, 0.5]
    assert everything[0]["7FE00010"]["BulkDataURI"].startswith("http")


def test_qido_limit_offset_and_warnings(http: httpx.Client, catalog: Catalog) -> None:
    everything = http.get("/studies", params={"limit": 50}).json()
    assert len(everything) >= 6
    assert "warning" not in http.get("/studies", params={"limit": 50}).headers
    pages = [
        uid(s, "0020000D")
        for offset in range(0, len(everything), 2)
        for s in http.get("/studies", params={"limit": 2, "offset": offset}).json()
    ]
    assert pages == [uid(s, "0020000D") for s in everything]  # deterministic order
    default = http.get("/studies")  # the default limit of this server is 4
    assert len(default.json()) == 4
    assert default.headers["warning"].startswith("299 pacsbridge")
    assert "offset=4" in default.headers["warning"]
    too_many = http.get("/studies", params={"limit": 500})
    assert "maximum of 50" in too_many.headers["warning"]
    unsupported = http.get("/studies", params={"PatientID": "H-1", "emptyvaluematching": "true"})
    assert unsupported.status_code == 200 and len(unsupported.json()) == 1
    assert "emptyvaluematching" in unsupported.headers["warning"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("PatientNam=x", "unknown query parameter"),
        ("StudyDate=20240101-2024", "not a DICOM date"),
        ("StudyDate=yesterday", "not a DICOM date"),
        ("limit=-1", "limit"),
        ("offset=abc", "offset"),
        ("includefield=NotAKeyword", "includefield"),
        ("fuzzymatching=maybe", "fuzzymatching"),
        ("Modality=CT", "ModalitiesInStudy"),
        ("StudyInstanceUID=1.2.*", "wildcards"),
    ],
)
def test_qido_bad_requests(http: httpx.Client, query: str, message: str) -> None:
    response = http.get(f"/studies?{query}")
    assert response.status_code == 400
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (None, 200),
        (DICOM_JSON, 200),
        ("application/json", 200),
        ("*/*", 200),
        ("text/html, application/dicom+json;q=0.5", 200),
        ("application/dicom+xml", 406),
        ('multipart/related; type="application/dicom+xml"', 406),
    ],
)
def test_qido_accept(http: httpx.Client, accept: str | None, status: int) -> None:
    headers = {"Accept": accept} if accept else {}
    request = http.build_request("GET", "/studies", headers=headers)
    if accept is None:
        del request.headers["accept"]
    response = http.send(request)
    assert response.status_code == status
    if status == 406:
        assert "application/dicom+json" in response.json()["detail"]


# --- WADO-RS instances -------------------------------------------------------------------------


def test_retrieve_as_stored_and_transcoded(http: httpx.Client, catalog: Catalog) -> None:
    original = catalog.files["JPEG2000.dcm"]
    ds = file_ds(catalog, "JPEG2000.dcm")
    path = instance_path(ds)
    as_stored = http.get(path, headers={"Accept": AS_STORED})
    assert as_stored.status_code == 200
    [(headers, content)] = parse_multipart(as_stored.content, as_stored.headers["content-type"])
    assert content == original  # byte for byte
    assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.91"
    syntax = ds.file_meta.TransferSyntaxUID
    explicit = f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
    assert parse_multipart(*_body(http.get(path, headers={"Accept": explicit})))[0][1] == original

    # No transfer syntax asked: Explicit VR Little Endian (PS3.18 Table 8.7.3-5), decompressed.
    default = http.get(path, headers={"Accept": 'multipart/related; type="application/dicom"'})
    [(headers, content)] = parse_multipart(default.content, default.headers["content-type"])
    converted = pydicom.dcmread(io.BytesIO(content))
    assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(converted.pixel_array, ds.pixel_array)
    assert converted.SOPInstanceUID == ds.SOPInstanceUID

    implicit = file_ds(catalog, "MR_small_implicit.dcm")
    study = http.get(f"/studies/{implicit.StudyInstanceUID}")  # Accept missing: the default
    [(_h, content)] = parse_multipart(study.content, study.headers["content-type"])
    assert (
        pydicom.dcmread(io.BytesIO(content)).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    )

    single = http.get(path, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert single.headers["content-type"].startswith("application/dicom")
    assert single.content == original


def _body(response: httpx.Response) -> tuple[bytes, str]:
    assert response.status_code == 200, response.text
    return response.content, response.headers["content-type"]


@pytest.mark.parametrize(
    "accept",
    [
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
        'multipart/related; type="application/dicom+xml"',
        "image/png",
        "application/dicom",  # a single part cannot carry a whole study
    ],
)
def test_retrieve_not_acceptable(http: httpx.Client, catalog: Catalog, accept: str) -> None:
    study = catalog.studies["smith"][0].StudyInstanceUID
    response = http.get(f"/studies/{study}", headers={"Accept": accept})
    assert response.status_code == 406
    assert "transfer-syntax" in response.json()["detail"]


def test_retrieve_study_and_series_stream_every_instance(
    http: httpx.Client, catalog: Catalog
) -> None:
    datasets = catalog.studies["smythe"]
    study = datasets[0].StudyInstanceUID
    parts = parse_multipart(*_body(http.get(f"/studies/{study}", headers={"Accept": AS_STORED})))
    assert sorted(pydicom.dcmread(io.BytesIO(c)).SOPInstanceUID for _h, c in parts) == sorted(
        d.SOPInstanceUID for d in datasets
    )
    assert all(
        h["content-location"].endswith(
            f"/instances/{pydicom.dcmread(io.BytesIO(c)).SOPInstanceUID}"
        )
        for h, c in parts
    )
    series = parse_multipart(
        *_body(http.get(f"/studies/{study}/series/{datasets[1].SeriesInstanceUID}"))
    )
    assert len(series) == 1


def test_retrieve_large_and_small_files_byte_for_byte(http: httpx.Client) -> None:
    """512² slices (memory-mapped on the file store, read on S3) between 16² ones (read into
    one buffer with the part headers), as stored: every part is the stored file."""
    big = ct_study(3, size=512, patient_id="H-WADO-MAP")
    study = big[0].StudyInstanceUID
    small = ct_study(2, size=16, patient_id="H-WADO-MAP", study_uid=study)
    files = {ds.SOPInstanceUID: part10(ds) for ds in [big[0], *small, big[1], big[2]]}
    assert stow(http, list(files.values())).status_code == 200
    assert min(len(files[ds.SOPInstanceUID]) for ds in big) > 128 * 1024
    response = http.get(f"/studies/{study}", headers={"Accept": AS_STORED})
    assert int(response.headers["content-length"]) == len(response.content)
    parts = parse_multipart(*_body(response))
    assert len(parts) == 5
    for headers, content in parts:
        sop = headers["content-location"].rsplit("/", 1)[1]
        assert content == files[sop]
    series = big[0].SeriesInstanceUID
    one = http.get(f"/studies/{study}/series/{series}", headers={"Accept": AS_STORED})
    assert sorted(c for _h, c in parse_multipart(*_body(one))) == sorted(
        files[ds.SOPInstanceUID] for ds in big
    )


@pytest.mark.parametrize(
    "path",
    [
        "/studies/1.2.3.4",
        "/studies/1.2.3.4/metadata",
        "/studies/{study}/series/1.2.3.4",
        "/studies/{study}/series/{series}/instances/1.2.3.4",
        "/studies/{study}/series/{series}/instances/1.2.3.4/metadata",
        "/studies/{study}/series/{series}/instances/1.2.3.4/frames/1",
        "/studies/{study}/series/{series}/instances/{sop}/frames/9",
        "/studies/{study}/series/{series}/instances/{sop}/bulkdata/00091010",
    ],
)
def test_unknown_uids_are_404(http: httpx.Client, catalog: Catalog, path: str) -> None:
    ds = catalog.studies["smith"][0]
    url = path.format(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID, sop=ds.SOPInstanceUID)
    response = http.get(url)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]


# --- metadata ---------------------------------------------------------------------------------


def test_metadata_bulk_uris_etag_and_gzip(
    http: httpx.Client, catalog: Catalog, dw_server: RunningServer
) -> None:
    ds = catalog.studies["smythe"][0]
    path = f"/studies/{ds.StudyInstanceUID}/metadata"
    first = http.get(path, headers={"Accept-Encoding": "gzip"})
    assert first.status_code == 200
    assert first.headers["content-encoding"] == "gzip"
    metadata = first.json()
    assert len(metadata) == 2
    mine = next(m for m in metadata if uid(m, "00080018") == ds.SOPInstanceUID)
    prefix = f"{dw_server.http}/dicom-web{instance_path(ds)}"
    assert mine["7FE00010"]["BulkDataURI"] == f"{prefix}/bulkdata/7FE00010"
    assert mine["60003000"]["BulkDataURI"] == f"{prefix}/bulkdata/60003000"
    icon = mine["00880200"]["Value"][0]["7FE00010"]
    assert icon["BulkDataURI"] == f"{prefix}/bulkdata/00880200/0/7FE00010"
    assert mine["00083002"]["Value"] == [ExplicitVRLittleEndian]

    with http.stream("GET", path, headers={"Accept-Encoding": "gzip"}) as raw:
        compressed = b"".join(raw.iter_raw())
    assert json.loads(gzip.decompress(compressed)) == metadata
    assert len(compressed) < len(first.content) / 3
    plain = http.get(path, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.json() == metadata

    etag = first.headers["etag"]
    assert http.get(path, headers={"If-None-Match": etag}).status_code == 304
    more = ct_study(1, study_uid=str(ds.StudyInstanceUID), patient_id="H-3")
    assert stow(http, [part10(more[0])]).status_code == 200
    changed = http.get(path, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and len(changed.json()) == 3
    assert changed.headers["etag"] != etag

    xml = http.get(path, headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert xml.status_code == 406


# --- frames and bulk data -------------------------------------------------------------------


def test_frames_decoded_and_as_stored(http: httpx.Client, catalog: Catalog) -> None:
    ds = file_ds(catalog, "JPEG2000.dcm")
    path = f"{instance_path(ds)}/frames/1"
    stored_frame = next(generate_frames(ds.PixelData, number_of_frames=1))

    octet = http.get(path, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    [(headers, content)] = parse_multipart(*_body(octet))
    assert (
        headers["content-type"]
        == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    )
    assert (
        content == ds.pixel_array.astype("<u2" if ds.PixelRepresentation == 0 else "<i2").tobytes()
    )

    for accept in (
        'multipart/related; type="image/jp2"',
        'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.91',
    ):
        [(headers, content)] = parse_multipart(*_body(http.get(path, headers={"Accept": accept})))
        assert content == stored_frame, accept
        assert "transfer-syntax=1.2.840.10008.1.2.4.91" in headers["content-type"]

    assert (
        http.get(path, headers={"Accept": 'multipart/related; type="image/jpeg"'}).status_code
        == 406
    )
    [(_h, default)] = parse_multipart(*_body(http.get(path)))  # no Accept: uncompressed
    assert len(default) == ds.Rows * ds.Columns * 2


def test_frames_and_pixel_bulk_data_of_a_deflated_instance(
    http: httpx.Client, catalog: Catalog
) -> None:
    """Deflated Explicit VR Little Endian (PS3.5 A.5): the data set is inflated to find the
    pixels; they go out uncompressed, as for any native transfer syntax."""
    ds = file_ds(catalog, "image_dfl.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    pixels = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()
    for accept in (
        "application/octet-stream",
        "application/octet-stream; transfer-syntax=*",
        'multipart/related; type="application/octet-stream"',
    ):
        response = http.get(f"{instance_path(ds)}/frames/1", headers={"Accept": accept})
        assert response.status_code == 200, (accept, response.text)
        if accept.startswith("multipart"):
            [(headers, content)] = parse_multipart(*_body(response))
            assert ExplicitVRLittleEndian in headers["content-type"]
        else:
            content = response.content
        assert content == pixels, accept
    assert http.get(f"{instance_path(ds)}/frames/2").status_code == 404
    bulk = http.get(
        f"{instance_path(ds)}/bulkdata/7FE00010", headers={"Accept": "application/octet-stream"}
    )
    assert bulk.status_code == 200 and bulk.content == pixels
    ranged = http.get(
        f"{instance_path(ds)}/bulkdata/7FE00010",
        headers={"Accept": "application/octet-stream", "Range": "bytes=100-199"},
    )
    assert ranged.status_code == 206 and ranged.content == pixels[100:200]


def test_multiframe_frames(http: httpx.Client, catalog: Catalog) -> None:
    ds = file_ds(catalog, "SC_rgb_rle_2frame.dcm")
    frames = parse_multipart(*_body(http.get(f"{instance_path(ds)}/frames/2,1")))
    assert [c for _h, c in frames] == [ds.pixel_array[1].tobytes(), ds.pixel_array[0].tobytes()]
    rle = http.get(
        f"{instance_path(ds)}/frames/1,2",
        headers={"Accept": 'multipart/related; type="image/dicom-rle"'},
    )
    assert [c for _h, c in parse_multipart(*_body(rle))] == list(
        generate_frames(ds.PixelData, number_of_frames=2)
    )
    single = http.get(
        f"{instance_path(ds)}/frames/2", headers={"Accept": "application/octet-stream"}
    )
    assert single.headers["content-type"].startswith("application/octet-stream")
    assert single.content == ds.pixel_array[1].tobytes()
    assert http.get(f"{instance_path(ds)}/frames/3").status_code == 404
    for bad in ("0", "1,x", "", "-1"):
        response = http.get(f"{instance_path(ds)}/frames/{bad}")
        assert response.status_code in (400, 404), bad


def test_bulkdata_ranges(http: httpx.Client, catalog: Catalog) -> None:
    ds = catalog.studies["smythe"][0]
    base = f"{instance_path(ds)}/bulkdata"
    pixels = ds.PixelData
    whole = http.get(f"{base}/7FE00010", headers={"Accept": "application/octet-stream"})
    assert whole.status_code == 200 and whole.content == pixels
    assert whole.headers["accept-ranges"] == "bytes"
    ranged = http.get(
        f"{base}/7FE00010", headers={"Accept": "application/octet-stream", "Range": "bytes=10-19"}
    )
    assert ranged.status_code == 206
    assert ranged.content == pixels[10:20]
    assert ranged.headers["content-range"] == f"bytes 10-19/{len(pixels)}"
    suffix = http.get(
        f"{base}/7FE00010", headers={"Accept": "application/octet-stream", "Range": "bytes=-5"}
    )
    assert suffix.content == pixels[-5:]
    outside = http.get(f"{base}/7FE00010", headers={"Range": f"bytes={len(pixels)}-"})
    assert outside.status_code == 416
    assert outside.headers["content-range"] == f"bytes */{len(pixels)}"
    multi = http.get(f"{base}/7FE00010", headers={"Range": "bytes=0-3"})
    assert multi.status_code == 206
    [(headers, content)] = parse_multipart(multi.content, multi.headers["content-type"])
    assert content == pixels[:4] and headers["content-range"] == f"bytes 0-3/{len(pixels)}"

    icon = http.get(f"{base}/00880200/0/7FE00010", headers={"Accept": "application/octet-stream"})
    assert icon.content == ds.IconImageSequence[0].PixelData
    overlay = parse_multipart(*_body(http.get(f"{base}/60003000")))
    assert overlay[0][1] == bytes(4096)
    assert http.get(f"{base}/00880200/5/7FE00010").status_code == 404
    assert http.get(f"{base}/7FE00010", headers={"Accept": "image/png"}).status_code == 406


def test_compressed_pixel_bulkdata(http: httpx.Client, catalog: Catalog) -> None:
    ds = file_ds(catalog, "SC_rgb_rle_2frame.dcm")
    base = f"{instance_path(ds)}/bulkdata/7FE00010"
    decoded = http.get(base, headers={"Accept": "application/octet-stream"})
    assert decoded.content == ds.pixel_array.tobytes()
    native = http.get(base, headers={"Accept": 'multipart/related; type="image/dicom-rle"'})
    assert len(parse_multipart(*_body(native))) == 2


# --- STOW-RS ----------------------------------------------------------------------------------


def test_stow_content_type_errors(http: httpx.Client) -> None:
    part = part10(ct_study(1)[0])
    response = http.post("/studies", content=part, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 415
    assert "multipart/related" in response.json()["detail"]
    body, _ = multipart_body([part], boundary="b0undary")
    response = http.post(
        "/studies",
        content=body,
        headers={
            "Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b0undary'
        },
    )
    assert response.status_code == 415
    response = http.post(
        "/studies",
        content=body,
        headers={"Content-Type": "multipart/related; type=application/dicom"},
    )
    assert response.status_code == 400 and "boundary" in response.json()["detail"]
    xml = stow(http, [part], headers={"Accept": "application/dicom+xml"})
    assert xml.status_code == 406


def test_stow_partial_failures(http: httpx.Client, dw_server: RunningServer) -> None:
    good = ct_study(3, patient_id="H-STOW-1")
    study = str(good[0].StudyInstanceUID)
    truncated = part10(good[1])[:-100]  # cut inside the pixel data
    other_study = ct_study(1)[0]
    pdf = ct_study(1)[0]
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = UID(REFUSED)
    response = stow(
        http,
        [
            part10(good[0]),
            truncated,
            part10(good[2]),
            part10(other_study),
            b"not dicom",
            part10(pdf),
        ],
        path=f"/studies/{study}",
    )
    assert response.status_code == 202, response.text
    assert "part 2: 0xC000" in response.headers["warning"]
    body = response.json()
    stored = [uid(i, "00081155") for i in body["00081199"]["Value"]]
    assert stored == [good[0].SOPInstanceUID, good[2].SOPInstanceUID]
    failures = {
        i.get("00081155", {}).get("Value", [""])[0]: i["00081197"]["Value"][0]
        for i in body["00081198"]["Value"]
    }
    assert failures == {
        good[1].SOPInstanceUID: 0xC000,  # truncated
        other_study.SOPInstanceUID: 0xA900,  # another study than the URL's
        "": 0xC000,  # not DICOM: no UIDs to name
        pdf.SOPInstanceUID: 0x0122,  # refused SOP class
    }
    assert uid(body, "00081190") == f"{dw_server.http}/dicom-web/studies/{study}"
    assert len(http.get(f"/studies/{study}/instances").json()) == 2
    assert http.get(f"/studies/{other_study.StudyInstanceUID}/metadata").status_code == 404

    nothing = stow(http, [b"junk", truncated])
    assert nothing.status_code == 409
    assert len(nothing.json()["00081198"]["Value"]) == 2


def test_stow_body_cut_short(http: httpx.Client) -> None:
    datasets = ct_study(3, size=32, patient_id="H-STOW-2")
    body, content_type = multipart_body([part10(ds) for ds in datasets])
    cut = body[: len(body) - 300]  # inside the last part, no closing delimiter
    response = http.post("/studies", content=cut, headers={"Content-Type": content_type})
    assert response.status_code == 202
    result = response.json()
    assert [uid(i, "00081155") for i in result["00081199"]["Value"]] == [
        datasets[0].SOPInstanceUID,
        datasets[1].SOPInstanceUID,
    ]
    [failed] = result["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert "ended inside part 3" in response.headers["warning"]


def test_stow_without_preamble_and_odd_chunks(http: httpx.Client) -> None:
    ds = ct_study(2, patient_id="H-STOW-3")
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds[0])  # no preamble, no DICM: what dicomweb-client sends
    assert buffer.getvalue()[128:132] != b"DICM"
    body, content_type = multipart_body([buffer.getvalue(), part10(ds[1])])

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 7):  # boundaries straddle chunks
            yield body[start : start + 7]

    response = http.post("/studies", content=chunks(), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == 2


# --- CORS, OpenAPI ---------------------------------------------------------------------------


def test_cors(http: httpx.Client, dw_server: RunningServer) -> None:
    preflight = httpx.options(
        f"{dw_server.http}/dicom-web/studies",
        headers={"Origin": VIEWER, "Access-Control-Request-Method": "GET"},
    )
    assert preflight.headers["access-control-allow-origin"] == VIEWER
    response = http.get("/studies?limit=1", headers={"Origin": VIEWER})
    assert response.headers["access-control-allow-origin"] == VIEWER
    assert "warning" in response.headers["access-control-expose-headers"].lower()
    other = http.get("/studies?limit=1", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


def test_openapi_describes_media_types(dw_server: RunningServer) -> None:
    spec = httpx.get(f"{dw_server.http}/openapi.json").json()
    paths = spec["paths"]
    assert (
        "application/dicom+json"
        in paths["/dicom-web/studies"]["get"]["responses"]["200"]["content"]
    )
    retrieve = paths["/dicom-web/studies/{study}"]["get"]["responses"]["200"]["content"]
    assert 'multipart/related; type="application/dicom"' in retrieve
    store = paths["/dicom-web/studies"]["post"]["requestBody"]["content"]
    assert 'multipart/related; type="application/dicom"' in store
    frames = paths["/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/{frames}"]
    assert (
        'multipart/related; type="application/octet-stream"'
        in frames["get"]["responses"]["200"]["content"]
    )


@pytest.mark.parametrize("mapping", [True, False], ids=["mmap", "read"])
def test_passthrough_pieces_are_the_stored_files(tmp_path, mapping: bool) -> None:
    """The pieces of a retrieve sent as stored: large files as memory maps when
    ``wado_mmap`` is on, everything else read; the same bytes either way."""
    from archive import Archive
    from archive.wado import find_stored
    from config import Settings
    from dicomweb.wado import DicomChoice, _plan, _read_passthrough

    archive = Archive(Settings(data_dir=tmp_path / "data", wado_mmap=mapping))
    try:
        big = ct_study(2, size=512)
        study = big[0].StudyInstanceUID
        small = ct_study(2, size=16, study_uid=study)
        files = {ds.SOPInstanceUID: part10(ds) for ds in [*big, *small]}
        for data in files.values():
            archive.ingest(data)
        instances = find_stored(archive.db, study)
        parts = _plan(instances, DicomChoice(True, None), "b", "http://x/dicom-web")
        pieces = _read_passthrough(archive, parts)
        mapped = [p for p in pieces if isinstance(p, memoryview) and isinstance(p.obj, mmap.mmap)]
        assert len(mapped) == (2 if mapping else 0)
        body = b"".join(bytes(p) for p in pieces)
        expected = b"".join(
            (p.header or b"") + files[p.instance.sop_instance_uid] + b"\r\n" for p in parts
        )
        assert body == expected
        del pieces, mapped
    finally:
        archive.close()


def test_deflate_check_takes_any_bytes() -> None:
    """The file meta walk that spots a deflated instance answers for any file, cut short or
    with lengths that point anywhere, and never fails."""
    from archive.instance_io import is_deflated

    path = get_testdata_file("image_dfl.dcm")
    assert path is not None
    with open(path, "rb") as fh:
        data = fh.read(1024)
    assert is_deflated(io.BytesIO(data))
    assert not is_deflated(io.BytesIO(part10(ct_study(1)[0])))
    for cut in range(len(data)):
        assert is_deflated(io.BytesIO(data[:cut])) in (True, False)
    for offset in range(144, 400):
        for value in (0x00, 0xFF):
            broken = bytearray(data)
            broken[offset] = value
            assert is_deflated(io.BytesIO(bytes(broken))) in (True, False)
