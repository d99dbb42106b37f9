"""Stored images rendered for people: the pixels a viewer would show, as JPEG, PNG or GIF.

Protocol-free: WADO-RS rendered and thumbnail resources (``dicomweb.rendered``) are built on it.
The pipeline follows the grayscale and colour transformations of PS3.3 C.11 and PS3.4 N.2:

1. decode one frame (pydicom with pylibjpeg / GDCM: every compressed transfer syntax the
   archive can decode), never the whole multi-frame instance;
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
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID
from sqlalchemy import select

from archive.db import Database
from archive.models import Instance, Series, Study
from archive.transcode import can_decode
from archive.wado import StoredInstance, find_stored

__all__ = [
    "DEFAULT_QUALITY",
    "MEDIA_TYPES",
    "THUMBNAIL_SIZE",
    "BadViewport",
    "FrameOutOfRange",
    "NotRenderable",
    "RenderError",
    "RenderOptions",
    "Viewport",
    "Window",
    "frame_count",
    "image_instances",
    "parse_quality",
    "parse_viewport",
    "parse_window",
    "read_header",
    "render_frames",
    "representative",
]

#: Rendered media types (PS3.18 8.7.4) and the Pillow format of each.
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
#: JPEG quality when none is asked for.
DEFAULT_QUALITY = 90
#: Longest side of a thumbnail when no viewport is asked for.
THUMBNAIL_SIZE = 128
#: Largest viewport side we render (a guard against requests for giant images).
MAX_VIEWPORT = 8192

WindowFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]
_FUNCTIONS: dict[str, WindowFunction] = {
    "linear": "LINEAR",
    "linear_exact": "LINEAR_EXACT",
    "linear-exact": "LINEAR_EXACT",
    "sigmoid": "SIGMOID",
}


class RenderError(Exception):
    """The frame cannot be rendered: its pixel data cannot be decoded."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotRenderable(RenderError):
    """The instance (or every instance in scope) has no pixel data to render, or is stored in a
    transfer syntax no installed decoder reads."""


class BadViewport(ValueError):
    """The viewport's source region lies outside the image."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FrameOutOfRange(LookupError):
    def __init__(self, number: int, count: int) -> None:
        super().__init__(f"frame {number} does not exist: the instance has {count} frame(s)")
        self.message = str(self)


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


@dataclass(frozen=True, slots=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int | None = None
    """JPEG quality 1-100 (ignored by the lossless PNG and GIF)."""
    max_size: int | None = None
    """Without a viewport: shrink the image (never enlarge) so its longest side fits this."""


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {text!r}")
    return value


def _integer(name: str, text: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {text!r}") from None


def parse_window(text: str) -> Window:
    """``window=center,width[,function]``, function ``linear`` (default), ``linear-exact``
    (or ``linear_exact``) or ``sigmoid`` (PS3.18 8.3.5.1.4)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(
            f"window is center,width,function (e.g. window=40,400,linear), not {text!r}"
        )
    center = _number("the window center", parts[0])
    width = _number("the window width", parts[1])
    function: WindowFunction = "LINEAR"
    if len(parts) == 3 and parts[2]:
        name = parts[2].lower()
        if name not in _FUNCTIONS:
            raise ValueError(
                f"the window function is linear, linear-exact or sigmoid, not {parts[2]!r}"
            )
        function = _FUNCTIONS[name]
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """``viewport=vw,vh`` or ``viewport=vw,vh,sx,sy,sw,sh`` (sx…sh may be left empty)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise ValueError(
            f"viewport is vw,vh or vw,vh,sx,sy,sw,sh (e.g. viewport=512,512), not {text!r}"
        )
    vw = _integer("the viewport width", parts[0])
    vh = _integer("the viewport height", parts[1])
    for name, value in (("width", vw), ("height", vh)):
        if not 1 <= value <= MAX_VIEWPORT:
            raise ValueError(f"the viewport {name} must be 1 to {MAX_VIEWPORT}, not {value}")
    if len(parts) == 2:
        return Viewport(vw, vh)
    sx = _integer("sx", parts[2]) if parts[2] else 0
    sy = _integer("sy", parts[3]) if parts[3] else 0
    sw = _integer("sw", parts[4]) if parts[4] else None
    sh = _integer("sh", parts[5]) if parts[5] else None
    if sx < 0 or sy < 0:
        raise ValueError(f"the region's offset sx,sy must not be negative, not {sx},{sy}")
    if sw == 0 or sh == 0:
        raise ValueError("the region's width and height (sw, sh) must not be 0")
    return Viewport(vw, vh, sx, sy, sw, sh)


def parse_quality(text: str) -> int:
    """``quality=1..100`` (PS3.18 8.3.5.1.2)."""
    value = _integer("quality", text)
    if not 1 <= value <= 100:
        raise ValueError(f"quality must be 1 to 100, not {value}")
    return value


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


# --- decoding ------------------------------------------------------------------------------


def read_header(fh: BinaryIO) -> Dataset:
    """Every attribute but the pixel data."""
    fh.seek(0)
    try:
        return pydicom.dcmread(fh, stop_before_pixels=True)
    except Exception as exc:
        raise RenderError(f"the stored file cannot be read: {exc}") from exc


def frame_count(header: Dataset) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _transfer_syntax(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def decode_frame(fh: BinaryIO, header: Dataset, number: int) -> np.ndarray:
    """Frame ``number`` (1-based) as decoded samples: (rows, columns) or (rows, columns, 3),
    YBR converted to RGB."""
    count = frame_count(header)
    if not 1 <= number <= count:
        raise FrameOutOfRange(number, count)
    if "Rows" not in header or "Columns" not in header:
        raise NotRenderable("the instance has no pixel data: there is no image to render")
    syntax = _transfer_syntax(header)
    if syntax and not can_decode(syntax):
        raise NotRenderable(
            f"no decoder is installed for {UID(syntax).name} ({syntax}): the image cannot be "
            "rendered"
        )
    fh.seek(0)
    try:
        array = pixel_array(fh, index=number - 1)
    except Exception:
        # Deflated files and other odd encodings: read the whole data set instead.
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh)
            if not any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009)):
                raise NotRenderable(
                    "the instance has no pixel data: there is no image to render"
                ) from None
            array = ds.pixel_array
        except NotRenderable:
            raise
        except Exception as exc:
            raise RenderError(f"frame {number} cannot be decoded: {exc}") from exc
        if count > 1:
            array = array[number - 1]
    return np.asarray(array)


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
    if window.function == "LINEAR":
        y = (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else np.where(x > c - 0.5, 1.0, 0.0)
    elif window.function == "LINEAR_EXACT":
        y = (x - c) / w + 0.5
    else:
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    return np.clip(y, 0.0, 1.0)


def _full_range(values: np.ndarray) -> np.ndarray:
    x = values.astype(np.float64, copy=False)
    low, high = float(np.min(x)), float(np.max(x))
    if high <= low:
        return np.zeros_like(x)
    return (x - low) / (high - low)


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
    if photometric == "PALETTE COLOR":
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
    """One decoded frame → encoded image bytes."""
    display = to_display(header, array, number, options.window)
    ds = frame_attributes(header, number)
    picture = place(display, _pixel_aspect(ds), options.viewport, options.max_size)
    return encode(picture, options.media_type, options.quality)


def render_frames(
    fh: BinaryIO,
    numbers: Sequence[int] | None,
    options: RenderOptions,
    *,
    pick: Literal["all", "first", "middle"] = "all",
) -> Iterator[tuple[int, bytes]]:
    """(frame number, image bytes) for frames ``numbers`` of a stored file (``None``: every
    frame). ``pick="first"`` renders only the first of them, ``"middle"`` only the middle one.
    Every number is checked before anything is decoded (:class:`FrameOutOfRange`)."""
    header = read_header(fh)
    count = frame_count(header)
    if numbers is None:
        numbers = list(range(1, count + 1))
    for number in numbers:
        if not 1 <= number <= count:
            raise FrameOutOfRange(number, count)
    if pick == "first":
        numbers = numbers[:1]
    elif pick == "middle":
        numbers = [numbers[(len(numbers) - 1) // 2]]
    for number in numbers:
        array = decode_frame(fh, header, number)
        yield number, render(header, array, number, options)
