"""WADO-RS rendered and thumbnail resources against a real `pacsbridge serve`: the pixels of the
decoded images are checked (PNG exactly, JPEG approximately) on synthetic CT phantoms whose
window, VOI LUT, MONOCHROME1 and functional-group results are known, on pydicom's compressed
test files (JPEG 2000, JPEG-LS, RLE, JPEG baseline YBR) and colour images (RGB, palette), on
SQLite + files and PostgreSQL + S3."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.conftest import RunningServer
from tests.dicom_factory import ct_slice
from tests.dicomweb_fixtures import (
    BACKEND_IDS,
    BACKENDS,
    module_server,
    new_uid,
    parse_multipart,
    part10,
)

SIZE = 64
#: Stored values of the phantom (Rescale Intercept -1024): air, water, bone in HU.
AIR, WATER, BONE = 0, 1024, 2024
BONE_BOX = (slice(8, 24), slice(8, 24))  # top left
WATER_BOX = (slice(40, 56), slice(40, 56))  # bottom right


def phantom(**attributes: object) -> Dataset:
    """A 64x64 CT slice: air, a bone square top left, a water square bottom right."""
    study = str(attributes.pop("study_uid", new_uid()))
    series = str(attributes.pop("series_uid", new_uid()))
    ds = ct_slice(study_uid=study, series_uid=series, index=0, size=SIZE)
    pixels = np.full((SIZE, SIZE), AIR, dtype=np.int16)
    pixels[BONE_BOX] = BONE
    pixels[WATER_BOX] = WATER
    ds.PixelData = pixels.tobytes()
    ds.PixelSpacing = [0.5, 0.5]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def linear(x: float, c: float, w: float) -> int:
    """PS3.3 C.11.2.1.2.1 onto 0..255."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0
    if x > c - 0.5 + (w - 1) / 2:
        return 255
    return round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255)


def linear_exact(x: float, c: float, w: float) -> int:
    if x <= c - w / 2:
        return 0
    if x > c + w / 2:
        return 255
    return int(np.rint(((x - c) / w + 0.5) * 255))


def sigmoid(x: float, c: float, w: float) -> int:
    return int(np.rint(255 / (1 + math.exp(-4 * (x - c) / w))))


HU = {"air": AIR - 1024, "water": WATER - 1024, "bone": BONE - 1024}


@dataclass
class Loaded:
    server: RunningServer
    study: str
    ct: dict[str, Dataset]
    files: dict[str, Dataset]
    series: list[Dataset]
    enhanced: Dataset
    sr: Dataset

    def url(self, ds: Dataset, suffix: str = "rendered") -> str:
        return (
            f"{self.server.http}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/{suffix}"
        )


def _retagged(name: str) -> Dataset:
    """A pydicom test file with fresh UIDs (several share theirs), transfer syntax as is."""
    ds = pydicom.dcmread(get_testdata_file(name))  # type: ignore[arg-type]
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = ds.get("PatientID") or "RENDER"
    return ds


def _enhanced() -> Dataset:
    """Two frames with the same stored values; the functional groups give frame 1 a rescale
    intercept of 0 and frame 2 of 100, and both the window 100/50 (LINEAR)."""
    ds = phantom()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    for keyword in ("RescaleIntercept", "RescaleSlope"):
        delattr(ds, keyword)
    ds.NumberOfFrames = 2
    values = np.zeros((2, SIZE, SIZE), dtype=np.int16)
    values[:, :, :32] = 50
    values[:, :, 32:] = 150
    ds.PixelData = values.tobytes()
    voi = Dataset()
    voi.WindowCenter = 100
    voi.WindowWidth = 50
    shared = Dataset()
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for intercept in (0, 100):
        transform = Dataset()
        transform.RescaleIntercept = intercept
        transform.RescaleSlope = 1
        transform.RescaleType = "HU"
        item = Dataset()
        item.PixelValueTransformationSequence = Sequence([transform])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


def _sr(study: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = 99
    ds.Modality = "SR"
    ds.PatientID = "PAT-1"
    return ds


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loaded]:
    for server in module_server(request, tmp_path_factory):
        study = new_uid()
        ct = {
            "file_window": phantom(WindowCenter=40, WindowWidth=400),
            "no_window": phantom(),
            "monochrome1": phantom(
                PhotometricInterpretation="MONOCHROME1", WindowCenter=40, WindowWidth=400
            ),
            "sigmoid_file": phantom(WindowCenter=0, WindowWidth=2000, VOILUTFunction="SIGMOID"),
            "non_square": phantom(PixelSpacing=[1.0, 0.5], WindowCenter=40, WindowWidth=400),
        }
        lut_ds = phantom()
        for keyword in ("RescaleIntercept", "RescaleSlope"):
            delattr(lut_ds, keyword)
        lut_ds.PixelRepresentation = 0
        values = np.zeros((SIZE, SIZE), dtype=np.uint16)
        values[:, 16:32], values[:, 32:48], values[:, 48:] = 1, 2, 3
        lut_ds.PixelData = values.tobytes()
        item = Dataset()
        item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor
        item.add_new(0x00283006, "US", [0, 1000, 3000, 4000])  # LUT Data
        lut_ds.VOILUTSequence = Sequence([item])
        ct["voi_lut"] = lut_ds
        # A series of 5 slices whose uniform values tell which one a thumbnail shows; with a
        # second, later series, in the same study as an SR.
        series_uid = new_uid()
        series = []
        for index in range(5):
            ds = ct_slice(study_uid=study, series_uid=series_uid, index=index, size=96)
            ds.Rows, ds.Columns = 48, 96
            ds.PixelData = np.full((48, 96), 1024 + 100 * index, dtype=np.int16).tobytes()
            ds.WindowCenter, ds.WindowWidth = 200, 1000
            series.append(ds)
        later = ct_slice(study_uid=study, series_uid=new_uid(), index=0, size=32)
        later.SeriesNumber = 2
        sr = _sr(study)
        files = {
            name: _retagged(name)
            for name in (
                "MR_small.dcm",
                "MR_small_jpeg_ls_lossless.dcm",
                "MR_small_RLE.dcm",
                "MR_small_jp2klossless.dcm",
                "MR_small_bigendian.dcm",
                "JPEG2000.dcm",
                "SC_rgb_rle.dcm",
                "SC_rgb_jpeg_dcmtk.dcm",
                "examples_rgb_color.dcm",
                "examples_palette.dcm",
                "examples_ybr_color.dcm",
                "image_dfl.dcm",
            )
        }
        enhanced = _enhanced()
        archive = server.archive()
        try:
            for ds in [*ct.values(), *series, later, sr, *files.values(), enhanced]:
                result = archive.ingest(part10(ds))
                assert result.outcome.value in ("stored", "overwritten"), result
        finally:
            archive.close()
        yield Loaded(server, study, ct, files, series, enhanced, sr)


def get(url: str, media: str | None = None, **params: str) -> httpx.Response:
    """GET with ``Accept: media`` (httpx's ``*/*`` without it)."""
    headers = {"Accept": media} if media else {}
    return httpx.get(url, params=params, headers=headers, timeout=60)


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return np.asarray(image)


def image(content: bytes, kind: str = "JPEG") -> np.ndarray:
    picture = Image.open(io.BytesIO(content))
    assert picture.format == kind
    return np.asarray(picture).astype(np.int16)


def regions(pixels: np.ndarray) -> dict[str, int]:
    """The value at the centre of each phantom region (exact in PNG output)."""
    return {
        "air": int(pixels[32, 4]),
        "bone": int(pixels[16, 16]),
        "water": int(pixels[48, 48]),
    }


# --- grayscale pipeline: exact PNG values -------------------------------------------------


def test_file_window_png_exact(loaded: Loaded) -> None:
    pixels = png(get(loaded.url(loaded.ct["file_window"]), "image/png"))
    assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint8
    expected = {k: linear(v, 40, 400) for k, v in HU.items()}
    assert expected == {"air": 0, "bone": 255, "water": 102}
    assert regions(pixels) == expected


@pytest.mark.parametrize(
    ("function", "formula"),
    [("linear", linear), ("linear-exact", linear_exact), ("sigmoid", sigmoid)],
)
def test_window_parameter_functions(loaded: Loaded, function: str, formula) -> None:
    response = get(loaded.url(loaded.ct["file_window"]), "image/png", window=f"0,2000,{function}")
    expected = {k: formula(v, 0, 2000) for k, v in HU.items()}
    assert regions(png(response)) == expected
    if function == "sigmoid":
        assert expected == {"air": 29, "bone": 225, "water": 128}


def test_narrow_window_makes_water_white_and_bone_white(loaded: Loaded) -> None:
    # A window around air: air is mid grey, everything denser is white.
    pixels = png(get(loaded.url(loaded.ct["file_window"]), "image/png", window="-1024,100"))
    assert regions(pixels) == {"air": linear(-1024, -1024, 100), "bone": 255, "water": 255}
    assert linear(-1024, -1024, 100) == 129


def test_file_voi_lut_function_sigmoid(loaded: Loaded) -> None:
    pixels = png(get(loaded.url(loaded.ct["sigmoid_file"]), "image/png"))
    assert regions(pixels) == {k: sigmoid(v, 0, 2000) for k, v in HU.items()}


def test_full_range_without_any_window(loaded: Loaded) -> None:
    pixels = png(get(loaded.url(loaded.ct["no_window"]), "image/png"))
    assert regions(pixels) == {"air": 0, "bone": 255, "water": round(1024 / 2024 * 255)}


def test_monochrome1_is_inverted(loaded: Loaded) -> None:
    pixels = png(get(loaded.url(loaded.ct["monochrome1"]), "image/png"))
    assert regions(pixels) == {k: 255 - linear(v, 40, 400) for k, v in HU.items()}
    windowed = png(get(loaded.url(loaded.ct["monochrome1"]), "image/png", window="0,2000"))
    assert regions(windowed) == {k: 255 - linear(v, 0, 2000) for k, v in HU.items()}


def test_voi_lut_sequence(loaded: Loaded) -> None:
    pixels = png(get(loaded.url(loaded.ct["voi_lut"]), "image/png"))
    row = pixels[10]
    # LUT [0, 1000, 3000, 4000] over its range 0..4000.
    assert [row[8], row[20], row[40], row[60]] == [0, 64, 191, 255]


def test_enhanced_multiframe_functional_groups(loaded: Loaded) -> None:
    url = loaded.url(loaded.enhanced, "frames/{}/rendered")
    first = png(get(url.format(1), "image/png"))
    second = png(get(url.format(2), "image/png"))
    # Window 100/50: frame 1 (50, 150) → black | white; frame 2 (150, 250) → white | white.
    assert (first[:, :32] == 0).all() and (first[:, 32:] == 255).all()
    assert (second == 255).all()


# --- JPEG, quality, media types ------------------------------------------------------------


def test_default_is_jpeg_close_to_the_png(loaded: Loaded) -> None:
    response = get(loaded.url(loaded.ct["file_window"]))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    pixels = image(response.content)
    exact = png(get(loaded.url(loaded.ct["file_window"]), "image/png")).astype(np.int16)
    assert pixels.shape == exact.shape
    for name, value in regions(exact).items():
        assert abs(regions(pixels)[name] - value) <= 4, name
    assert np.abs(pixels - exact).mean() < 3


def test_quality(loaded: Loaded) -> None:
    url = loaded.url(loaded.files["MR_small.dcm"])
    low = get(url, "image/jpeg", quality="5")
    high = get(url, "image/jpeg", quality="100")
    assert low.status_code == high.status_code == 200
    assert len(low.content) < len(high.content) / 2
    original = image(get(url, "image/png").content, "PNG")
    assert np.abs(image(high.content) - original).mean() < 2
    assert (
        np.abs(image(low.content) - original).mean() > np.abs(image(high.content) - original).mean()
    )


def test_gif_and_accept_query_parameter(loaded: Loaded) -> None:
    url = loaded.url(loaded.ct["file_window"])
    gif = get(url, "image/gif")
    assert gif.headers["content-type"] == "image/gif"
    assert regions(np.asarray(Image.open(io.BytesIO(gif.content)).convert("L"))) == {
        "air": 0,
        "bone": 255,
        "water": 102,
    }
    # PS3.18 8.3.3.1: the accept query parameter overrides the header.
    response = get(url, "image/jpeg", accept="image/png")
    assert response.headers["content-type"] == "image/png"


def test_not_acceptable(loaded: Loaded) -> None:
    response = get(loaded.url(loaded.ct["file_window"]), "image/tiff")
    assert response.status_code == 406
    assert "image/jpeg" in response.json()["detail"]


# --- viewport -------------------------------------------------------------------------------


def test_viewport_scales_keeping_aspect(loaded: Loaded) -> None:
    url = loaded.url(loaded.ct["file_window"])
    assert png(get(url, "image/png", viewport="32,32")).shape == (32, 32)
    assert png(get(url, "image/png", viewport="200,100")).shape == (100, 100)
    assert png(get(url, "image/png", viewport="128,512")).shape == (128, 128)


def test_viewport_region_and_flip(loaded: Loaded) -> None:
    url = loaded.url(loaded.ct["file_window"])
    # The top left quadrant holds the bone square (rows/columns 8..23), scaled 2x.
    quadrant = png(get(url, "image/png", viewport="64,64,0,0,32,32"))
    assert quadrant.shape == (64, 64)
    assert quadrant[32, 32] == 255 and quadrant[8, 8] == 0 and quadrant[60, 60] == 0
    # Negative sw and sh flip the whole image: bone moves to the bottom right.
    flipped = png(get(url, "image/png", viewport="64,64,0,0,-64,-64"))
    original = png(get(url, "image/png"))
    assert (flipped == original[::-1, ::-1]).all()
    mirrored = png(get(url, "image/png", viewport="64,64,0,0,-64,"))
    assert (mirrored == original[:, ::-1]).all()


def test_non_square_pixels_are_squared(loaded: Loaded) -> None:
    # Rows 1 mm apart, columns 0.5 mm: the 64x64 pixels cover 32 mm x 64 mm.
    url = loaded.url(loaded.ct["non_square"])
    pixels = png(get(url, "image/png"))
    assert pixels.shape == (128, 64)
    assert pixels[32, 16] == 255 and pixels[96, 48] == 102  # bone and water, stretched
    assert png(get(url, "image/png", viewport="32,32")).shape == (32, 16)


# --- compressed and colour sources ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_lossless_sources_render_like_the_uncompressed_file(loaded: Loaded, name: str) -> None:
    reference = png(get(loaded.url(loaded.files["MR_small.dcm"]), "image/png"))
    assert reference.shape == (64, 64) and reference.max() == 255
    assert (png(get(loaded.url(loaded.files[name]), "image/png")) == reference).all()


def test_jpeg2000_nm(loaded: Loaded) -> None:
    pixels = png(get(loaded.url(loaded.files["JPEG2000.dcm"]), "image/png"))
    assert pixels.shape == (1024, 256)
    assert pixels.max() == 255 and (pixels > 20).mean() > 0.05


def test_deflated_source(loaded: Loaded) -> None:
    pixels = png(get(loaded.url(loaded.files["image_dfl.dcm"]), "image/png"))
    assert pixels.shape == (512, 512) and pixels.std() > 10


def test_rgb_and_ybr_jpeg(loaded: Loaded) -> None:
    rle = png(get(loaded.url(loaded.files["SC_rgb_rle.dcm"]), "image/png")).astype(int)
    assert rle.shape == (100, 100, 3)
    # Colour bars: red on top, then light red, green…
    assert tuple(rle[2, 50]) == (255, 0, 0)
    assert tuple(rle[22, 50]) == (0, 255, 0)
    assert tuple(rle[42, 50]) == (0, 0, 255)
    ybr = png(get(loaded.url(loaded.files["SC_rgb_jpeg_dcmtk.dcm"]), "image/png")).astype(int)
    assert ybr.shape == (100, 100, 3)
    assert np.abs(ybr - rle).mean() < 6
    assert np.abs(ybr[2, 50] - [255, 0, 0]).max() < 20


def test_rgb_native_is_exact(loaded: Loaded) -> None:
    ds = loaded.files["examples_rgb_color.dcm"]
    pixels = png(get(loaded.url(ds), "image/png"))
    assert (pixels == ds.pixel_array).all()


def test_palette_color(loaded: Loaded) -> None:
    ds = loaded.files["examples_palette.dcm"]
    pixels = png(get(loaded.url(ds), "image/png"))
    assert pixels.shape == (ds.Rows, ds.Columns, 3)
    indices = ds.pixel_array
    assert ds.RedPaletteColorLookupTableDescriptor[2] == 16
    expected = pydicom.pixels.apply_color_lut(indices, ds)  # 16-bit entries, shown in 8 bits
    assert np.abs(pixels.astype(int) - np.rint(expected / 257).astype(int)).max() <= 1
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::97]}) > 10  # not grey


# --- multi-frame and multipart --------------------------------------------------------------


def test_multiframe_instance_and_frames(loaded: Loaded) -> None:
    ds = loaded.files["examples_ybr_color.dcm"]
    whole = get(loaded.url(ds), 'multipart/related; type="image/jpeg"')
    assert whole.status_code == 200, whole.text
    parts = parse_multipart(whole.content, whole.headers["content-type"])
    assert len(parts) == ds.NumberOfFrames == 30
    assert parts[4][0]["content-location"].endswith(f"/{ds.SOPInstanceUID}/frames/5/rendered")
    assert all(h["content-type"] == "image/jpeg" for h, _ in parts)
    frame5 = get(loaded.url(ds, "frames/5/rendered"), "image/jpeg")
    assert frame5.headers["content-type"] == "image/jpeg"
    assert np.abs(image(frame5.content) - image(parts[4][1])).max() <= 1
    assert image(frame5.content).shape == (240, 320, 3)
    two = get(loaded.url(ds, "frames/1,30/rendered"), 'multipart/related; type="image/png"')
    two_parts = parse_multipart(two.content, two.headers["content-type"])
    assert [h["content-type"] for h, _ in two_parts] == ["image/png"] * 2
    # Several images cannot be one image/jpeg.
    assert get(loaded.url(ds), "image/jpeg").status_code == 406
    assert get(loaded.url(ds, "frames/1,2/rendered"), "image/jpeg").status_code == 406


def test_frame_errors(loaded: Loaded) -> None:
    ds = loaded.files["examples_ybr_color.dcm"]
    out_of_range = get(loaded.url(ds, "frames/31/rendered"))
    assert out_of_range.status_code == 404
    assert "30 frame" in out_of_range.json()["detail"]
    assert get(loaded.url(ds, "frames/0/rendered")).status_code == 400
    assert get(loaded.url(ds, "frames/x/rendered")).status_code == 400
    assert get(loaded.url(ds, "frames/2/thumbnail")).status_code == 200
    assert get(loaded.url(ds, "frames/1,99/thumbnail")).status_code == 404


def test_series_and_study_rendered(loaded: Loaded) -> None:
    first = loaded.series[0]
    base = f"{loaded.server.http}/dicom-web/studies/{loaded.study}"
    series = get(f"{base}/series/{first.SeriesInstanceUID}/rendered", "*/*", window="200,500")
    assert series.status_code == 200, series.text
    assert series.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    parts = parse_multipart(series.content, series.headers["content-type"])
    assert len(parts) == 5
    locations = [h["content-location"] for h, _ in parts]
    assert [loc.split("/instances/")[1] for loc in locations] == [
        f"{ds.SOPInstanceUID}/frames/1/rendered" for ds in loaded.series
    ]
    means = [image(content).mean() for _, content in parts]
    assert means == sorted(means) and means[-1] - means[0] > 50  # brighter slice by slice
    study = get(f"{base}/rendered", 'multipart/related; type="image/png"')
    parts = parse_multipart(study.content, study.headers["content-type"])
    assert len(parts) == 6  # five slices and the later series; the SR is left out
    assert all(h["content-type"] == "image/png" for h, _ in parts)
    assert get(f"{base}/rendered", "image/jpeg").status_code == 406


# --- thumbnails -----------------------------------------------------------------------------


def _gray(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    return float(image(response.content, "JPEG").mean())


def test_thumbnails(loaded: Loaded) -> None:
    first = loaded.series[0]
    base = f"{loaded.server.http}/dicom-web/studies/{loaded.study}"
    series = get(f"{base}/series/{first.SeriesInstanceUID}/thumbnail")
    assert series.headers["content-type"] == "image/jpeg"
    middle = loaded.series[2]
    expected = linear(100 * 2, 200, 1000)
    assert abs(_gray(series) - expected) < 3
    # The 48x96 slices are shown at most 128 pixels wide; OHIF asks for viewport=256,256.
    assert image(series.content).shape == (48, 96)
    big = get(f"{base}/series/{first.SeriesInstanceUID}/thumbnail", viewport="256,256")
    assert image(big.content).shape == (128, 256)
    study = get(f"{base}/thumbnail", "image/png")
    assert study.headers["content-type"] == "image/png"
    assert abs(float(png(study).mean()) - expected) < 1
    instance = get(loaded.url(loaded.series[4], "thumbnail"))
    assert abs(_gray(instance) - linear(400, 200, 1000)) < 3
    assert abs(_gray(get(loaded.url(middle, "frames/1/thumbnail"))) - expected) < 3
    large = get(loaded.url(loaded.files["JPEG2000.dcm"], "thumbnail"))
    assert image(large.content).shape == (128, 32)


def test_thumbnail_of_multiframe_is_its_middle_frame(loaded: Loaded) -> None:
    ds = loaded.files["examples_ybr_color.dcm"]
    thumbnail = image(get(loaded.url(ds, "thumbnail"), "image/png").content, "PNG")
    frame = image(
        get(loaded.url(ds, "frames/15/rendered"), "image/png", viewport="128,128").content, "PNG"
    )
    assert thumbnail.shape == frame.shape == (96, 128, 3)
    assert (thumbnail == frame).all()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window": "abc"}, "window"),
        ({"window": "40"}, "window is center,width"),
        ({"window": "40,0,linear"}, "width"),
        ({"window": "40,400,cubic"}, "linear, linear-exact or sigmoid"),
        ({"viewport": "0,10"}, "viewport width"),
        ({"viewport": "10"}, "viewport is vw,vh"),
        ({"viewport": "64,64,100,100,10,10"}, "outside"),
        ({"quality": "0"}, "quality"),
        ({"quality": "high"}, "quality"),
        ({"frobnicate": "1"}, "unknown query parameter"),
    ],
)
def test_bad_parameters(loaded: Loaded, params: dict[str, str], message: str) -> None:
    response = get(loaded.url(loaded.ct["file_window"]), **params)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]


def test_unknown_uids_and_non_images(loaded: Loaded) -> None:
    base = f"{loaded.server.http}/dicom-web/studies"
    assert get(f"{base}/1.2.3.999/rendered").status_code == 404
    assert get(f"{base}/1.2.3.999/thumbnail").status_code == 404
    ds = loaded.ct["file_window"]
    assert get(loaded.url(ds).replace(ds.SOPInstanceUID, "1.2.3.4")).status_code == 404
    sr = get(loaded.url(loaded.sr))
    assert sr.status_code == 406
    assert "no pixel data" in sr.json()["detail"]


def test_unsupported_parameters_are_ignored_with_a_warning(loaded: Loaded) -> None:
    response = get(loaded.url(loaded.ct["file_window"]), annotation="patient")
    assert response.status_code == 200
    assert "annotation" in response.headers["warning"]


def test_dicomweb_client(loaded: Loaded) -> None:
    client = DICOMwebClient(url=f"{loaded.server.http}/dicom-web")
    ds = loaded.ct["file_window"]
    data = client.retrieve_instance_rendered(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, media_types=("image/png",)
    )
    assert regions(image(data, "PNG")) == {"air": 0, "bone": 255, "water": 102}
    frame = client.retrieve_instance_frames_rendered(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        frame_numbers=[1],
        media_types=("image/jpeg",),
        params={"window": "0,2000,linear", "viewport": "32,32"},
    )
    assert image(frame).shape == (32, 32)
