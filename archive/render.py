"""Stored images rendered for people: the pixels a viewer would show, as JPEG, PNG or GIF.

Protocol-free: WADO-RS rendered and thumbnail resources (``dicomweb.rendered``) are built on it,
handing it parsed values (the URL syntax of window, viewport and quality lives in ``dicomweb``).
The pipeline follows the grayscale and colour transformations of PS3.3 C.11 and PS3.4 N.2:

1. decode one frame (:mod:`archive.frames`: every transfer syntax the archive can decode),
   never the whole multi-frame instance;
2. grayscale: Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence, C.11.1), then
   VOI LUT (C.11.2): the ``window`` asked for, else the file's first Window Center/Width
   with its VOI LUT Function, else its VOI LUT Sequence, else the frame's full range;
   Enhanced multi-frame images take these from their functional groups (shared, then per
   frame); MONOCHROME1 (or Presentation LUT Shape INVERSE) is inverted;
3. colour: RGB as stored, YBR converted to RGB by the decoder, PALETTE COLOR through its
   lookup tables; samples deeper than 8 bits scaled down;
4. non-square pixels (Pixel Spacing, Pixel Aspect Ratio) stretched to square ones;
5. the viewport: a region of the source (flipped when its width/height is negative) scaled to
   fit ``vw`` x ``vh`` with its aspect ratio kept;
6. encoded at 8 bits per sample.

Memory stays bounded: a frame of more than :data:`MAX_RENDER_PIXELS` pixels is not rendered,
a viewport covers at most :data:`MAX_VIEWPORT_PIXELS`, and the rendered image is never larger
than :data:`MAX_RENDER_PIXELS` whatever the pixel aspect ratio says.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from sqlalchemy import select

from archive.db import Database
from archive.frames import decode_frame
from archive.instance_io import NoPixelData, StoredInstance, check_frames, pixel_layout
from archive.models import Instance, Series, Study
from archive.transcode import as_little_endian
from archive.wado import find_stored

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_QUALITY",
    "MAX_RENDER_PIXELS",
    "MAX_VIEWPORT",
    "MAX_VIEWPORT_PIXELS",
    "MEDIA_TYPES",
    "THUMBNAIL_SIZE",
    "BadViewport",
    "NotRenderable",
    "RenderError",
    "RenderOptions",
    "Viewport",
    "Window",
    "image_instances",
    "render_frames",
    "representative",
]

#: Rendered media types (PS3.18 8.7.4) and the Pillow format of each.
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
#: JPEG quality when none is asked for.
DEFAULT_QUALITY = 90
#: Longest side of a thumbnail when no viewport is asked for.
THUMBNAIL_SIZE = 128
#: Largest viewport side we render, and the most pixels of a viewport (4096 x 4096): guards
#: against requests for giant images.
MAX_VIEWPORT = 8192
MAX_VIEWPORT_PIXELS = 4096 * 4096
#: The most pixels of a frame rendered, and of a rendered image (8192 x 8192).
MAX_RENDER_PIXELS = 8192 * 8192

WindowFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]


class RenderError(Exception):
    """The frame cannot be rendered: its pixel data or the attributes that present it are
    broken in a way the pipeline cannot handle."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotRenderable(RenderError):
    """The instance (or every instance in scope) has no pixel data to render, or pixel data
    this pipeline does not present (too large, an unsupported number of samples)."""


class BadViewport(ValueError):
    """The viewport's source region lies outside the image."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- parameters ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center and width in modality units."""

    center: float
    width: float
    function: WindowFunction = "LINEAR"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise ValueError("window center and width must be finite numbers")
        if self.function == "LINEAR" and self.width < 1:
            raise ValueError(f"a linear window needs a width of at least 1, not {self.width:g}")
        if self.width <= 0:
            raise ValueError(f"the window width must be positive, not {self.width:g}")


@dataclass(frozen=True, slots=True)
class Viewport:
    """PS3.18 8.3.5.1.3: the rendered image fits ``width`` x ``height``; the source region starts
    at column ``sx``, row ``sy`` and spans ``sw`` x ``sh`` pixels (``None``: to the image's
    edge); a negative ``sw`` / ``sh`` flips the region horizontally / vertically."""

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("width", self.width), ("height", self.height)):
            if not 1 <= value <= MAX_VIEWPORT:
                raise ValueError(f"the viewport {name} must be 1 to {MAX_VIEWPORT}, not {value}")
        if self.width * self.height > MAX_VIEWPORT_PIXELS:
            raise ValueError(
                f"the viewport {self.width}x{self.height} is larger than "
                f"{MAX_VIEWPORT_PIXELS} pixels (e.g. 4096x4096)"
            )
        if self.sx < 0 or self.sy < 0:
            raise ValueError(
                f"the region's offset sx,sy must not be negative, not {self.sx},{self.sy}"
            )
        if self.sw == 0 or self.sh == 0:
            raise ValueError("the region's width and height (sw, sh) must not be 0")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int | None = None
    """JPEG quality 1-100 (ignored by the lossless PNG and GIF)."""
    max_size: int | None = None
    """Without a viewport: shrink the image (never enlarge) so its longest side fits this."""

    def __post_init__(self) -> None:
        if self.media_type not in MEDIA_TYPES:
            raise ValueError(f"rendered images are {', '.join(MEDIA_TYPES)}, not {self.media_type}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1 to 100, not {self.quality}")


# --- which instances -----------------------------------------------------------------------


def image_instances(
    db: Database, study: str, series: str | None = None, sop: str | None = None
) -> list[StoredInstance]:
    """The instances in scope that have pixel data (Rows indexed at ingest), in the order of
    :func:`archive.wado.find_stored`. Raises :class:`archive.wado.NotFound` when the scope holds
    nothing, :class:`NotRenderable` when it holds no image."""
    stmt = (
        select(
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.blob_key,
            Instance.size_bytes,
            Instance.number_of_frames,
        )
        .select_from(Instance)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .where(Study.study_instance_uid == study, Instance.rows.is_not(None))
    )
    if series is not None:
        stmt = stmt.where(Series.series_instance_uid == series)
    if sop is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop)
    stmt = stmt.order_by(
        Series.series_number.is_(None),
        Series.series_number,
        Series.series_instance_uid,
        Instance.instance_number.is_(None),
        Instance.instance_number,
        Instance.sop_instance_uid,
    )
    with db.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    if rows:
        return [StoredInstance(*row) for row in rows]
    find_stored(db, study, series, sop)  # raises NotFound for an unknown scope
    if sop is not None:
        raise NotRenderable(f"instance {sop} has no pixel data: there is no image to render")
    scope = f"series {series}" if series is not None else f"study {study}"
    raise NotRenderable(f"{scope} holds no instance with pixel data: there is no image to render")


def representative(
    db: Database, study: str, series: str | None = None, sop: str | None = None
) -> StoredInstance:
    """The instance a thumbnail shows: the middle instance of the series, or of the study's
    first series that has images (its middle frame: :func:`render_frames` with ``middle``).
    Raises like :func:`image_instances`."""
    if series is None:
        series = image_instances(db, study)[0].series_instance_uid
    instances = image_instances(db, study, series, sop)
    return instances[(len(instances) - 1) // 2]


# --- grayscale and colour transformations --------------------------------------------------

_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def frame_attributes(header: Dataset, number: int) -> Dataset:
    """The attributes that render frame ``number``: the top level, overridden by the Pixel
    Value Transformation and Frame VOI LUT macros of the shared and then per-frame functional
    groups (Enhanced CT/MR/PET… multi-frame images)."""
    shared = header.get("SharedFunctionalGroupsSequence")
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        return header
    view = Dataset()
    for elem in header:
        if elem.keyword not in (
            "SharedFunctionalGroupsSequence",
            "PerFrameFunctionalGroupsSequence",
        ):
            view.add(elem)
    groups = [shared[0] if shared else None]
    if per_frame and number - 1 < len(per_frame):
        groups.append(per_frame[number - 1])
    for group in groups:
        if group is None:
            continue
        for macro in _FRAME_MACROS:
            items = group.get(macro)
            if items:
                for elem in items[0]:
                    view.add(elem)
    return view


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def file_window(ds: Dataset) -> Window | None:
    """The first window the file carries (Window Center/Width with its VOI LUT Function)."""
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    name = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    function: WindowFunction = "LINEAR"
    if name in ("LINEAR_EXACT", "SIGMOID"):
        function = name  # type: ignore[assignment]
    try:
        return Window(center, width, function)
    except ValueError:
        return None  # a broken window in the file: fall back to the next choice


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (and .3.1/.3.2 for LINEAR_EXACT and SIGMOID) onto 0..1."""
    x = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    # Extreme (finite) centers and widths overflow to ±inf, which clips to 0 or 1.
    with np.errstate(over="ignore", invalid="ignore"):
        if window.function == "LINEAR":
            y = (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else np.where(x > c - 0.5, 1.0, 0.0)
        elif window.function == "LINEAR_EXACT":
            y = (x - c) / w + 0.5
        else:
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    return np.clip(np.nan_to_num(y, nan=0.0), 0.0, 1.0)


def _full_range(values: np.ndarray) -> np.ndarray:
    x = values.astype(np.float64, copy=False)
    finite = x[np.isfinite(x)] if x.dtype.kind == "f" else x
    if finite.size == 0:
        return np.zeros_like(x)
    low, high = float(np.min(finite)), float(np.max(finite))
    if high <= low:
        return np.zeros_like(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.nan_to_num((x - low) / (high - low), nan=0.0, posinf=1.0, neginf=0.0)


def _has_voi_lut(ds: Dataset) -> bool:
    items = ds.get("VOILUTSequence")
    return bool(items) and "LUTData" in items[0] and "LUTDescriptor" in items[0]


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The VOI LUT Sequence's first LUT, its output range mapped onto 0..1."""
    out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
    item = ds.VOILUTSequence[0]
    data = item.LUTData
    if isinstance(data, bytes):
        wide = int(item.LUTDescriptor[2]) > 8
        lut = np.frombuffer(data[: len(data) // 2 * 2] if wide else data, "<u2" if wide else "u1")
    elif isinstance(data, (int, float)):
        lut = np.asarray([data])
    else:
        lut = np.asarray(list(data))
    low, high = float(np.min(lut)), float(np.max(lut))
    if high <= low:
        return np.zeros_like(out)
    return np.clip((out - low) / (high - low), 0.0, 1.0)


def to_display(
    header: Dataset, array: np.ndarray, number: int, window: Window | None
) -> np.ndarray:
    """Decoded samples of frame ``number`` → 8-bit display values: (rows, columns) grayscale
    or (rows, columns, 3) RGB. ``window`` overrides the file's VOI for grayscale images."""
    ds = frame_attributes(header, number)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise NotRenderable(
            f"frame {number} has samples of shape {array.shape}: only grayscale and three-sample "
            "colour images are rendered"
        )
    if photometric == "PALETTE COLOR" and array.ndim == 2:
        rgb = apply_color_lut(array, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor else (16 if rgb.dtype.itemsize > 1 else 8)
        return _to_uint8(rgb.astype(np.float64) / (2**bits - 1))
    if array.ndim == 3:
        samples = array.astype(np.float64)
        bits = int(ds.get("BitsStored") or 8)
        if array.dtype.kind == "f":
            return _to_uint8(_full_range(samples))
        return _to_uint8(samples / (2 ** min(bits, 32) - 1))
    values = apply_modality_lut(array, ds) if array.dtype.kind != "f" else array
    if window is not None:
        unit = apply_window(values, window)
    else:
        chosen = file_window(ds)
        if chosen is not None:
            unit = apply_window(values, chosen)
        elif _has_voi_lut(ds):
            try:
                unit = _voi_lut(np.asarray(values), ds)
            except Exception:
                unit = _full_range(values)
        else:
            unit = _full_range(values)
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        unit = 1.0 - unit
    return _to_uint8(unit)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    unit = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


# --- geometry and encoding -----------------------------------------------------------------


def _pixel_aspect(ds: Dataset) -> float:
    """Height of a pixel over its width (1.0 for square pixels)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        if spacing and len(spacing) == 2 and float(spacing[1]) > 0:
            return float(spacing[0]) / float(spacing[1])
        ratio = ds.get("PixelAspectRatio")
        if ratio and len(ratio) == 2 and float(ratio[1]) > 0:
            return float(ratio[0]) / float(ratio[1])
    except (TypeError, ValueError):
        pass
    return 1.0


def _region(image: np.ndarray, viewport: Viewport) -> np.ndarray:
    rows, columns = image.shape[:2]
    if viewport.sx >= columns or viewport.sy >= rows:
        raise BadViewport(
            f"the viewport region starts at column {viewport.sx}, row {viewport.sy}, outside "
            f"the {columns}x{rows} image"
        )
    sw = viewport.sw if viewport.sw is not None else columns - viewport.sx
    sh = viewport.sh if viewport.sh is not None else rows - viewport.sy
    right = min(columns, viewport.sx + abs(sw))
    bottom = min(rows, viewport.sy + abs(sh))
    region = image[viewport.sy : bottom, viewport.sx : right]
    if sw < 0:
        region = region[:, ::-1]
    if sh < 0:
        region = region[::-1]
    return np.ascontiguousarray(region)


def place(
    image: np.ndarray, aspect: float, viewport: Viewport | None, max_size: int | None
) -> Image.Image:
    """Crop, square the pixels and scale (see the module's steps 4 and 5)."""
    if viewport is not None:
        image = _region(image, viewport)
    rows, columns = image.shape[:2]
    width, height = float(columns), rows * aspect if abs(aspect - 1.0) > 0.01 else float(rows)
    if viewport is not None:
        scale = min(viewport.width / width, viewport.height / height)
    elif max_size is not None and max(width, height) > max_size:
        scale = max_size / max(width, height)
    else:
        scale = 1.0
    if width * scale * height * scale > MAX_RENDER_PIXELS:
        # A pixel aspect ratio that would stretch the image beyond the limit.
        scale = math.sqrt(MAX_RENDER_PIXELS / (width * height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(image, mode="RGB" if image.ndim == 3 else "L")
    if size != (columns, rows):
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return picture


def encode(picture: Image.Image, media_type: str, quality: int | None) -> bytes:
    out = io.BytesIO()
    kind = MEDIA_TYPES[media_type]
    if kind == "JPEG":
        picture.save(out, "JPEG", quality=quality or DEFAULT_QUALITY)
    elif kind == "PNG":
        picture.save(out, "PNG", compress_level=4)
    else:
        if picture.mode == "RGB":
            picture = picture.quantize(256)
        picture.save(out, "GIF")
    return out.getvalue()


def render(header: Dataset, array: np.ndarray, number: int, options: RenderOptions) -> bytes:
    """One decoded frame → encoded image bytes. Raises :class:`BadViewport`,
    :class:`NotRenderable`, and :class:`RenderError` for attributes the pipeline cannot apply
    (a broken lookup table, say)."""
    try:
        display = to_display(header, array, number, options.window)
        ds = frame_attributes(header, number)
        picture = place(display, _pixel_aspect(ds), options.viewport, options.max_size)
        return encode(picture, options.media_type, options.quality)
    except (RenderError, BadViewport):
        raise
    except Exception as exc:
        log.warning("frame %d cannot be rendered", number, exc_info=True)
        raise RenderError(f"frame {number} cannot be rendered: {exc}") from exc


def render_frames(
    fh: BinaryIO,
    numbers: Sequence[int] | None,
    options: RenderOptions,
    *,
    pick: Literal["all", "first", "middle"] = "all",
) -> Iterator[tuple[int, bytes]]:
    """(frame number, image bytes) for frames ``numbers`` of a stored file opened with
    :func:`archive.instance_io.open_instance` (``None``: every frame). ``pick="first"`` renders
    only the first of them, ``"middle"`` only the middle one. Every number is checked before
    anything is decoded (:class:`~archive.instance_io.FrameOutOfRange`); a frame that cannot
    be decoded raises :class:`~archive.frames.DecodeError`."""
    try:
        header, layout = pixel_layout(fh)
    except NoPixelData:
        raise NotRenderable("the instance has no pixel data: there is no image to render") from None
    if not layout.little_endian:
        # Lookup tables (palette, modality, VOI) as the pipeline reads them: OW words in the
        # machine's (little endian) order.
        header = as_little_endian(header)
    if layout.rows * layout.columns > MAX_RENDER_PIXELS:
        raise NotRenderable(
            f"the {layout.columns}x{layout.rows} image is larger than the {MAX_RENDER_PIXELS} "
            "pixels rendered: retrieve its frames instead"
        )
    chosen: Sequence[int]
    if numbers is None:
        chosen = range(1, layout.number_of_frames + 1)
    else:
        check_frames(layout, numbers)
        chosen = numbers
    if pick == "first":
        chosen = chosen[:1]
    elif pick == "middle":
        chosen = chosen[(len(chosen) - 1) // 2 :][:1]
    for number in chosen:
        array = decode_frame(fh, layout, number)
        yield number, render(header, array, number, options)
