"""Hostile requests to the WADO-RS pixel resources (frames, rendered, thumbnail) of a running
`pacsbridge serve`: frame numbers in other scripts' digits or thousands of digits long, too many
frames, window / viewport / quality values that are not numbers, not finite or huge, media types
nobody renders, and stored instances that cannot be shown (no pixel data, a corrupt JPEG bit
stream, a deflated data set that inflates to 200 MiB). Each gets its exact 4xx and message; the
server keeps serving; stored instances stay byte for byte as they were."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from archive import Archive
from dicomweb.pixels import MAX_FRAMES_PER_REQUEST
from tests.conftest import RunningServer, require_tool
from tests.dicomweb_fixtures import (
    BACKEND_IDS,
    BACKENDS,
    ct_study,
    module_server,
    multipart_body,
    parse_multipart,
    part10,
)

#: Rows x Columns x frames of the deflated instance: 200 MiB of 8-bit zeros inflated.
BOMB_SIZE, BOMB_FRAMES = 512, 800


@dataclass
class Loaded:
    server: RunningServer
    http: httpx.Client
    stored: dict[str, bytes] = field(default_factory=dict)  # Part-10 bytes by SOP UID
    paths: dict[str, str] = field(default_factory=dict)  # instance paths by name

    def instance(self, name: str) -> str:
        return self.paths[name]


def _instance_path(ds: Dataset) -> str:
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def _new_uids(ds: Dataset) -> Dataset:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if hasattr(ds, "file_meta"):
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def multiframe() -> Dataset:
    """Three native 16-bit frames of 8 x 8."""
    ds = ct_study(1, size=8)[0]
    ds.NumberOfFrames = 3
    ds.PixelData = np.arange(3 * 64, dtype=np.uint16).tobytes()
    return ds


def structured_report() -> Dataset:
    """A Basic Text SR: an instance without pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.PatientID, ds.PatientName, ds.Modality = "HOSTILE-SR", "REPORT^ONLY", "SR"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    return _new_uids(ds)


def corrupt_jpeg() -> Dataset:
    """JPEG baseline whose one frame is random bytes (the encapsulation itself is sound)."""
    ds = _new_uids(pydicom.dcmread(_testdata("SC_rgb_jpeg_dcmtk.dcm")))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    noise = random.Random(11).randbytes(len(frame) + len(frame) % 2)
    ds.PixelData = encapsulate([noise])
    return ds


def big_endian_palette(tmp: Path) -> bytes:
    dcmconv = require_tool("dcmconv")
    ds = _new_uids(pydicom.dcmread(_testdata("examples_palette.dcm")))
    little = tmp / "palette-le.dcm"
    ds.save_as(little, enforce_file_format=True)
    big = tmp / "palette-be.dcm"
    subprocess.run([dcmconv, "+tb", str(little), str(big)], check=True, capture_output=True)
    return big.read_bytes()


def deflated_bomb() -> bytes:
    """A Part-10 file in Deflated Explicit VR Little Endian of about 200 KiB whose data set
    inflates to 200 MiB (800 frames of 512 x 512 8-bit zeros), deflated piece by piece."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    _new_uids(ds)
    ds.PatientID, ds.PatientName, ds.Modality = "HOSTILE-BOMB", "DEFLATE^BOMB", "OT"
    ds.Rows = ds.Columns = BOMB_SIZE
    ds.NumberOfFrames = BOMB_FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    length = BOMB_SIZE * BOMB_SIZE * BOMB_FRAMES
    pixel_header = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", length)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [deflater.compress(header.getvalue() + pixel_header)]
    zeros = bytes(1 << 20)
    for _ in range(length >> 20):
        body.append(deflater.compress(zeros))
    body.append(deflater.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + b"".join(body)


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loaded]:
    tmp = tmp_path_factory.mktemp("pixels")
    datasets = {
        "ct": ct_study(1, size=16)[0],
        "multiframe": multiframe(),
        "sr": structured_report(),
        "corrupt": corrupt_jpeg(),
        "liver": _new_uids(pydicom.dcmread(_testdata("liver_1frame.dcm"))),  # 1-bit
        "palette": _new_uids(pydicom.dcmread(_testdata("examples_palette.dcm"))),
        "ybr422": _new_uids(pydicom.dcmread(_testdata("SC_ybr_full_422_uncompressed.dcm"))),
    }
    files = {name: part10(ds) for name, ds in datasets.items()}
    files["palette-be"] = big_endian_palette(tmp)
    for server in module_server(request, tmp_path_factory):
        with httpx.Client(base_url=f"{server.http}/dicom-web", timeout=120) as http:
            result = Loaded(server, http)
            body, content_type = multipart_body(list(files.values()))
            response = http.post("/studies", content=body, headers={"Content-Type": content_type})
            assert response.status_code == 200, response.text
            for name, data in files.items():
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                result.stored[str(ds.SOPInstanceUID)] = data
                result.paths[name] = _instance_path(ds)
            # The deflated instance goes straight into the archive with a larger inflate
            # limit than the server's (ingest refuses it by default).
            bomb = deflated_bomb()
            settings = server.backend.settings.model_copy(update={"max_inflated_size_mb": 300})
            archive = Archive(settings, migrate=False)
            try:
                archive.ingest(bomb)
            finally:
                archive.close()
            ds = pydicom.dcmread(io.BytesIO(bomb), stop_before_pixels=True, defer_size=64)
            result.stored[str(ds.SOPInstanceUID)] = bomb
            result.paths["bomb"] = _instance_path(ds)
            yield result


def _levels(path: str) -> list[str]:
    """The study, series and instance paths above an instance path."""
    parts = path.split("/")
    return ["/".join(parts[:3]), "/".join(parts[:5]), path]


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, (response.request.url, response.text[:500])
    assert fragment in response.json()["detail"], (response.request.url, response.text[:500])


def assert_still_serving(loaded: Loaded) -> None:
    assert httpx.get(f"{loaded.server.http}/health", timeout=10).json()["status"] == "ok"
    response = loaded.http.get(f"{loaded.instance('ct')}/rendered", headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (16, 16)


# --- frame numbers -------------------------------------------------------------------------------

DICOM = 'multipart/related; type="application/dicom"'
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_RULE = "frame numbers are ASCII digits from 1 to 2147483647 separated by commas"


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ("%C2%B2", FRAME_RULE),  # U+00B2: str.isdigit() accepts it, int() refuses it
        ("%D9%A1", FRAME_RULE),  # U+0661 ARABIC-INDIC DIGIT ONE, which int() reads as 1
        ("%EF%BC%91", FRAME_RULE),  # U+FF11 FULLWIDTH DIGIT ONE
        ("1" * 5000, FRAME_RULE),  # beyond Python's int-string conversion limit
        ("2147483648", FRAME_RULE),  # 2^31: beyond any Number of Frames (IS)
        ("0", FRAME_RULE),
        ("-1", FRAME_RULE),
        ("1_0", FRAME_RULE),
        ("1,", FRAME_RULE),
        ("1,,2", FRAME_RULE),
        ("+1", FRAME_RULE),
        ("0x1", FRAME_RULE),
        (",".join(["1"] * (MAX_FRAMES_PER_REQUEST + 1)), f"at most {MAX_FRAMES_PER_REQUEST}"),
    ],
)
@pytest.mark.parametrize("suffix", ["", "/rendered", "/thumbnail"])
def test_malformed_frame_lists(loaded: Loaded, frames: str, fragment: str, suffix: str) -> None:
    path = f"{loaded.instance('multiframe')}/frames/{frames}{suffix}"
    assert_error(loaded.http.get(path), 400, fragment)


@pytest.mark.parametrize("suffix", ["", "/rendered", "/thumbnail"])
def test_frame_numbers_beyond_the_instance(loaded: Loaded, suffix: str) -> None:
    base = f"{loaded.instance('multiframe')}/frames"
    for frames in ("2147483647", "4", "1,2,4"):
        response = loaded.http.get(f"{base}/{frames}{suffix}")
        assert_error(response, 404, "does not exist: the instance has 3 frame(s)")
    ok = loaded.http.get(f"{base}/3,1{suffix}", headers={"Accept": "*/*"})
    assert ok.status_code == 200
    many = ",".join(["2"] * MAX_FRAMES_PER_REQUEST)
    response = loaded.http.get(f"{base}/{many}", headers={"Accept": "*/*"})
    assert response.status_code == 200
    parts = parse_multipart(response.content, response.headers["content-type"])
    assert len(parts) == MAX_FRAMES_PER_REQUEST
    assert parts[0][1] == np.arange(64, 128, dtype=np.uint16).tobytes()


# --- rendering parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("window=nan,400", "the window center must be a decimal number, not 'nan'"),
        ("window=40,inf", "the window width must be a decimal number, not 'inf'"),
        ("window=1e400,400", "the window center must be a finite number, not '1e400'"),
        ("window=40," + "9" * 5000, "the window width must be a decimal number"),
        ("window=%C2%B2,400", "the window center must be a decimal number"),
        ("window=40,0", "a linear window needs a width of at least 1"),
        ("window=40,-5,sigmoid", "the window width must be positive"),
        ("window=40,400,cubic", "the window function is linear, linear-exact or sigmoid"),
        ("window=40", "window is center,width,function"),
        ("viewport=0,0", "the viewport width must be 1 to 8192, not 0"),
        ("viewport=-1,5", "the viewport width must be 1 to 8192, not -1"),
        ("viewport=100000,100000", "the viewport width must be 1 to 8192, not 100000"),
        ("viewport=8192,8192", "is larger than 16777216 pixels"),
        ("viewport=" + "9" * 5000 + ",1", "the viewport width must be an integer of at most 9"),
        ("viewport=%C2%B2,2", "the viewport width must be an integer"),
        ("viewport=64,64,0,0,0,5", "must not be 0"),
        ("viewport=64,64,-1,0,,", "the region's offset sx,sy must not be negative"),
        ("viewport=64,64,1000,0,,", "outside the 16x16 image"),
        ("viewport=64", "viewport is vw,vh or vw,vh,sx,sy,sw,sh"),
        ("quality=0", "quality must be 1 to 100, not 0"),
        ("quality=101", "quality must be 1 to 100, not 101"),
        ("quality=1e2", "quality must be an integer"),
        ("quality=%C2%B2", "quality must be an integer"),
        ("quality=" + "9" * 5000, "quality must be an integer of at most 9 digits"),
    ],
)
def test_malformed_rendering_parameters(loaded: Loaded, query: str, fragment: str) -> None:
    instance = loaded.instance("ct")
    for level in _levels(instance):
        for resource in ("rendered", "thumbnail"):
            response = loaded.http.get(f"{level}/{resource}?{query}", headers={"Accept": "*/*"})
            assert_error(response, 400, fragment)
    response = loaded.http.get(f"{instance}/frames/1/rendered?{query}")
    assert_error(response, 400, fragment)


@pytest.mark.parametrize(
    "query",
    [
        "window=40,1e308",
        "window=-1e308,1e308,sigmoid",
        "window=1e300,1,linear-exact",
        "viewport=4096,4096",
        "viewport=1,8192",
        "viewport=16,16,0,0,999999999,-999999999",
        "quality=1",
    ],
)
def test_extreme_but_valid_parameters(loaded: Loaded, query: str) -> None:
    response = loaded.http.get(
        f"{loaded.instance('ct')}/rendered?{query}", headers={"Accept": "image/png"}
    )
    assert response.status_code == 200, response.text
    Image.open(io.BytesIO(response.content)).load()


@pytest.mark.parametrize(
    ("accept", "query"),
    [
        ("image/webp", ""),
        ("application/dicom", ""),
        ("image/png;q=0", ""),
        ("*/*", "accept=" + "x" * 5000),
        ("*/*", "accept=image/svg%2Bxml"),
    ],
)
def test_unsupported_media_types(loaded: Loaded, accept: str, query: str) -> None:
    for resource in ("rendered", "thumbnail"):
        response = loaded.http.get(
            f"{loaded.instance('ct')}/{resource}?{query}", headers={"Accept": accept}
        )
        assert_error(response, 406, "image/jpeg")


# --- instances that cannot be shown --------------------------------------------------------------


def test_instance_without_pixel_data(loaded: Loaded) -> None:
    sr = loaded.instance("sr")
    assert_error(loaded.http.get(f"{sr}/frames/1"), 404, "has no frames: no pixel data element")
    assert_error(loaded.http.get(f"{sr}/rendered"), 406, "has no pixel data")
    assert_error(loaded.http.get(f"{sr}/thumbnail"), 406, "has no pixel data")
    assert_error(loaded.http.get(f"{sr}/frames/1/rendered"), 406, "has no pixel data")
    assert_error(loaded.http.get(f"{sr}/bulkdata/7FE00010"), 404, "has no frames")


def test_corrupt_compressed_frame(loaded: Loaded) -> None:
    path = loaded.instance("corrupt")
    decoded = loaded.http.get(f"{path}/frames/1", headers={"Accept": "application/octet-stream"})
    assert_error(decoded, 406, "frame 1 cannot be decoded (JPEG Baseline (Process 1))")
    for resource in ("rendered", "thumbnail", "frames/1/rendered"):
        assert_error(loaded.http.get(f"{path}/{resource}"), 406, "frame 1 cannot be decoded")
    converted = loaded.http.get(path, headers={"Accept": DICOM})
    assert_error(converted, 406, "cannot be converted from JPEG Baseline")
    # As stored it is still there, unchanged.
    as_stored = loaded.http.get(
        f"{path}/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'}
    )
    assert as_stored.status_code == 200
    stored = pydicom.dcmread(io.BytesIO(loaded.stored[path.rsplit("/", 1)[1]]))
    ((_, frame),) = parse_multipart(as_stored.content, as_stored.headers["content-type"])
    assert frame == next(generate_frames(stored.PixelData, number_of_frames=1))


def test_one_bit_image(loaded: Loaded) -> None:
    path = loaded.instance("liver")
    stored = pydicom.dcmread(io.BytesIO(loaded.stored[path.rsplit("/", 1)[1]]))
    frames = loaded.http.get(f"{path}/frames/1")
    assert frames.status_code == 200
    ((_, packed),) = parse_multipart(frames.content, frames.headers["content-type"])
    assert packed == stored.PixelData[: 512 * 512 // 8]
    png = loaded.http.get(f"{path}/rendered", headers={"Accept": "image/png"})
    assert png.status_code == 200
    shown = np.asarray(Image.open(io.BytesIO(png.content)))
    assert np.array_equal(shown > 127, stored.pixel_array.astype(bool))


def test_native_ybr_full_422(loaded: Loaded) -> None:
    """Native YBR_FULL_422 holds two samples' worth per pixel (PS3.3 C.7.6.3.1.2): its frame
    is served as stored, and rendered as pydicom decodes it (RGB)."""
    path = loaded.instance("ybr422")
    stored = pydicom.dcmread(io.BytesIO(loaded.stored[path.rsplit("/", 1)[1]]))
    assert len(stored.PixelData) == 100 * 100 * 2
    frames = loaded.http.get(f"{path}/frames/1")
    assert frames.status_code == 200, frames.text[:300]
    ((_, frame),) = parse_multipart(frames.content, frames.headers["content-type"])
    assert frame == stored.PixelData
    png = loaded.http.get(f"{path}/rendered", headers={"Accept": "image/png"})
    assert png.status_code == 200, png.text[:300]
    shown = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert np.array_equal(shown, stored.pixel_array)  # pydicom gives RGB


def test_palette_colour_little_and_big_endian(loaded: Loaded) -> None:
    images = []
    for name in ("palette", "palette-be"):
        response = loaded.http.get(
            f"{loaded.instance(name)}/rendered", headers={"Accept": "image/png"}
        )
        assert response.status_code == 200
        images.append(np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")))
    # The big endian copy shows the same colours: its OW tables are read as big endian words.
    assert np.array_equal(images[0], images[1])
    ds = pydicom.dcmread(_testdata("examples_palette.dcm"))
    rgb = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    assert np.array_equal(images[0], np.rint(rgb / 65535 * 255).astype(np.uint8))


def _peak_memory(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_deflated_instance_beyond_the_inflate_limit(loaded: Loaded) -> None:
    path = loaded.instance("bomb")
    before = _peak_memory(loaded.server.proc.pid)
    limit = "inflates to more than 128 MiB, the limit (max_inflated_size_mb)"
    for resource in ("rendered", "thumbnail", "frames/1/rendered", "frames/400/thumbnail"):
        for level in _levels(path) if "/" not in resource else [path]:
            assert_error(loaded.http.get(f"{level}/{resource}"), 406, limit)
    assert_error(loaded.http.get(f"{path}/frames/1"), 406, limit)
    assert_error(loaded.http.get(f"{path}/bulkdata/7FE00010"), 406, limit)
    default = loaded.http.get(path, headers={"Accept": DICOM})
    assert_error(default, 406, limit)
    # The server inflated no more than the limit, spilling to disk past 64 MiB.
    assert _peak_memory(loaded.server.proc.pid) - before < 160 * 2**20
    # As stored, it is there, byte for byte.
    as_stored = loaded.http.get(path, headers={"Accept": AS_STORED})
    assert as_stored.status_code == 200
    ((_, data),) = parse_multipart(as_stored.content, as_stored.headers["content-type"])
    assert data == loaded.stored[path.rsplit("/", 1)[1]]


# --- afterwards ----------------------------------------------------------------------------------


def test_zz_still_serving_and_nothing_altered(loaded: Loaded) -> None:
    assert_still_serving(loaded)
    for name, path in loaded.paths.items():
        response = loaded.http.get(path, headers={"Accept": AS_STORED})
        assert response.status_code == 200, name
        ((_, data),) = parse_multipart(response.content, response.headers["content-type"])
        assert data == loaded.stored[path.rsplit("/", 1)[1]], name
