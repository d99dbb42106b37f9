"""A series as a volume in patient space: slices sorted along their normal, with the geometry
that maps every voxel to a position in the patient (LPS, PS3.3 C.7.6.2.1.1).

Index order is ``(slice, row, column)``. The position of voxel ``(k, i, j)`` is::

    P = P0 + k * slice_step + i * PixelSpacing[0] * column_cosine + j * PixelSpacing[1] * row_cosine

where ``row_cosine`` (Image Orientation (Patient) values 1-3) is the direction along a row
(increasing column index) and ``column_cosine`` (values 4-6) the direction down a column
(increasing row index); ``P0`` is the Image Position (Patient) of the first slice and
``slice_step`` the vector from one slice's position to the next. Slices are sorted by their
distance along the normal ``row_cosine x column_cosine``, never by Instance Number.

Pixels are read once: a first pass reads only headers (to sort and check the geometry), a
second decodes every frame straight into the volume (``archive.frames``, the archive's one
decoder), applying Rescale Slope / Intercept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from archive import Archive
from archive.frames import decode_frame
from archive.instance_io import (
    PixelLayout,
    StoredFileError,
    inflate_limit,
    open_instance,
    pixel_layout,
)
from archive.models import Instance, Series, Study

__all__ = ["Geometry", "SliceRef", "Volume", "VolumeError", "load_images", "load_volume"]

#: Image Orientation (Patient) values that differ by less than this are the same orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Positions closer than this (mm) along the normal are the same slice position.
POSITION_TOLERANCE = 1e-3


class VolumeError(Exception):
    """A series cannot be made into a volume; the message says why (shown as the run's
    error)."""


@dataclass(frozen=True, slots=True)
class SliceRef:
    """Where one slice of the volume comes from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None
    """1-based frame of a multi-frame instance; ``None`` for a single-frame instance."""
    position: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class Geometry:
    """The patient geometry of a volume (LPS, millimetres)."""

    origin: np.ndarray
    """Image Position (Patient) of the first slice."""
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    """(between rows, between columns), as Pixel Spacing (0028,0030)."""
    slice_step: np.ndarray
    """From one slice's position to the next."""
    frame_of_reference_uid: str

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)

    @property
    def slice_spacing(self) -> float:
        return float(np.linalg.norm(self.slice_step))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along (slice, row, column)."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from voxel index ``(k, i, j, 1)`` to LPS position."""
        matrix = np.eye(4)
        matrix[:3, 0] = self.slice_step
        matrix[:3, 1] = self.column_cosine * self.pixel_spacing[0]
        matrix[:3, 2] = self.row_cosine * self.pixel_spacing[1]
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def voxel_volume_ml(self) -> float:
        """One voxel's volume in millilitres (cm³)."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def position(self, k: float, i: float = 0.0, j: float = 0.0) -> np.ndarray:
        return (self.affine @ np.array([k, i, j, 1.0]))[:3]


@dataclass(slots=True)
class Volume:
    """A series' pixels as a float32 array ``(slices, rows, columns)`` with its geometry."""

    array: np.ndarray
    geometry: Geometry | None
    """``None`` for images without patient geometry (projection radiographs)."""
    slices: list[SliceRef]
    headers: dict[str, Dataset]
    """Header (no pixel data) of every source instance, by SOP Instance UID."""
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    duplicates_dropped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source_headers(self) -> list[Dataset]:
        """The source instances' headers in slice order (each once)."""
        seen: dict[str, Dataset] = {}
        for ref in self.slices:
            seen.setdefault(ref.sop_instance_uid, self.headers[ref.sop_instance_uid])
        return list(seen.values())


@dataclass(slots=True)
class _Frame:
    sop_instance_uid: str
    sop_class_uid: str
    blob_key: str
    frame_number: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    frame_of_reference_uid: str
    rows: int
    columns: int


def series_instances(archive: Archive, series_instance_uid: str) -> list[tuple[str, str, str]]:
    """(SOP Instance UID, SOP Class UID, blob key) of every instance of a series."""
    with archive.db.session() as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.blob_key)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.series_instance_uid == series_instance_uid)
            .order_by(Instance.sop_instance_uid)
        ).all()
    return [(r.sop_instance_uid, r.sop_class_uid, r.blob_key) for r in rows]


def input_fingerprint(sop_instance_uids: Sequence[str]) -> str:
    """What identifies a series' content for re-runs: its SOP Instance UIDs."""
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()


def _floats(value: Any, count: int) -> np.ndarray | None:
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        return None
    return numbers


def _item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _frames_of(
    ds: Dataset, layout: PixelLayout, sop: str, sop_class: str, key: str
) -> list[_Frame]:
    """One entry per frame, with its geometry and rescale (PS3.3 C.7.6.16 functional groups
    for enhanced multi-frame instances, the image plane module otherwise)."""
    frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    if per_frame is not None or shared is not None:
        frames = []
        for index in range(layout.number_of_frames):
            own = per_frame[index] if per_frame is not None and index < len(per_frame) else None

            def group(keyword: str, own: Dataset | None = own) -> Dataset | None:
                return _item(own, keyword) or _item(shared, keyword)

            plane_position = group("PlanePositionSequence")
            plane_orientation = group("PlaneOrientationSequence")
            measures = group("PixelMeasuresSequence")
            transform = group("PixelValueTransformationSequence")
            spacing = _floats(measures.get("PixelSpacing"), 2) if measures else None
            frames.append(
                _Frame(
                    sop,
                    sop_class,
                    key,
                    index + 1,
                    _floats(plane_position.get("ImagePositionPatient"), 3)
                    if plane_position
                    else None,
                    _floats(plane_orientation.get("ImageOrientationPatient"), 6)
                    if plane_orientation
                    else None,
                    (float(spacing[0]), float(spacing[1])) if spacing is not None else None,
                    float(transform.get("RescaleSlope", 1) or 1) if transform else 1.0,
                    float(transform.get("RescaleIntercept", 0) or 0) if transform else 0.0,
                    frame_of_reference,
                    layout.rows,
                    layout.columns,
                )
            )
        return frames
    spacing = _floats(ds.get("PixelSpacing"), 2)
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    count = layout.number_of_frames
    if count > 1:
        # A multi-frame instance without functional groups (NM, US, legacy converted): frames
        # follow each other along the normal by Spacing Between Slices, if it says so.
        between = ds.get("SpacingBetweenSlices")
        if position is None or orientation is None or between in (None, ""):
            position = None
        step = (
            np.cross(orientation[:3], orientation[3:]) * float(between)
            if position is not None and orientation is not None
            else None
        )
        return [
            _Frame(
                sop,
                sop_class,
                key,
                n + 1,
                position + n * step if position is not None and step is not None else None,
                orientation,
                (float(spacing[0]), float(spacing[1])) if spacing is not None else None,
                slope,
                intercept,
                frame_of_reference,
                layout.rows,
                layout.columns,
            )
            for n in range(count)
        ]
    return [
        _Frame(
            sop,
            sop_class,
            key,
            None,
            position,
            orientation,
            (float(spacing[0]), float(spacing[1])) if spacing is not None else None,
            slope,
            intercept,
            frame_of_reference,
            layout.rows,
            layout.columns,
        )
    ]


def _read_headers(
    archive: Archive, series_instance_uid: str
) -> tuple[list[_Frame], dict[str, Dataset], str, str]:
    instances = series_instances(archive, series_instance_uid)
    if not instances:
        raise VolumeError(f"series {series_instance_uid} has no instances")
    limit = inflate_limit(archive.settings)
    frames: list[_Frame] = []
    headers: dict[str, Dataset] = {}
    study = modality = ""
    for sop, sop_class, key in instances:
        try:
            with open_instance(archive.blobs, key, max_inflated=limit) as fh:
                ds, layout = pixel_layout(fh)
        except StoredFileError as exc:
            raise VolumeError(f"instance {sop} cannot be read: {exc.message}") from exc
        if layout.samples_per_pixel != 1:
            raise VolumeError(
                f"instance {sop} is colour ({layout.photometric_interpretation}): the models "
                "read greyscale images only"
            )
        headers[sop] = ds
        study = study or str(ds.get("StudyInstanceUID", ""))
        modality = modality or str(ds.get("Modality", ""))
        frames.extend(_frames_of(ds, layout, sop, sop_class, key))
    return frames, headers, study, modality


def load_volume(
    archive: Archive,
    series_instance_uid: str,
    *,
    spacing_tolerance: float = 0.1,
    max_voxels: int | None = None,
) -> Volume:
    """The series as one volume with its patient geometry.

    Refused (:class:`VolumeError`) when the geometry is missing or not one volume: mixed
    orientations, sizes or frames of reference, two different slices at one position, gaps
    between slices that differ from their median by more than ``spacing_tolerance`` (a
    fraction), fewer than two slices, more than ``max_voxels`` voxels, or pixel data that
    cannot be decoded. Exact duplicates (same position and same pixels) are dropped."""
    frames, headers, study, modality = _read_headers(archive, series_instance_uid)
    missing = [
        name
        for name, absent in (
            ("Image Position (Patient)", any(f.position is None for f in frames)),
            ("Image Orientation (Patient)", any(f.orientation is None for f in frames)),
            ("Pixel Spacing", any(f.pixel_spacing is None for f in frames)),
        )
        if absent
    ]
    if missing:
        raise VolumeError(f"the series has no patient geometry: {', '.join(missing)} missing")
    reference = frames[0]
    assert reference.orientation is not None and reference.pixel_spacing is not None
    for f in frames:
        assert f.orientation is not None and f.pixel_spacing is not None
        if np.max(np.abs(f.orientation - reference.orientation)) > ORIENTATION_TOLERANCE:
            raise VolumeError(
                "the series mixes image orientations (Image Orientation (Patient) "
                f"{_fmt(reference.orientation)} and {_fmt(f.orientation)})"
            )
        if (f.rows, f.columns) != (reference.rows, reference.columns):
            raise VolumeError(
                f"the series mixes image sizes ({reference.rows}x{reference.columns} and "
                f"{f.rows}x{f.columns})"
            )
        if not np.allclose(f.pixel_spacing, reference.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise VolumeError(
                f"the series mixes pixel spacings ({reference.pixel_spacing} and {f.pixel_spacing})"
            )
        if f.frame_of_reference_uid != reference.frame_of_reference_uid:
            raise VolumeError("the series mixes frames of reference")
    orientation = reference.orientation
    row_cosine = orientation[:3] / np.linalg.norm(orientation[:3])
    column_cosine = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_cosine, column_cosine)
    distance = np.array([float(np.dot(f.position, normal)) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(distance, kind="stable")
    frames = [frames[k] for k in order]
    distance = distance[order]
    if max_voxels is not None and len(frames) * reference.rows * reference.columns > max_voxels:
        raise VolumeError(
            f"the series has {len(frames)} slices of {reference.rows}x{reference.columns}, "
            f"more than the {max_voxels} voxels a model is run on (ai.max_voxels)"
        )
    array = np.empty((len(frames), reference.rows, reference.columns), dtype=np.float32)
    _decode_into(archive, frames, array)
    keep = [0]
    for k in range(1, len(frames)):
        if distance[k] - distance[keep[-1]] > POSITION_TOLERANCE:
            keep.append(k)
        elif not np.array_equal(array[k], array[keep[-1]]):
            raise VolumeError(
                f"two different slices at one position ({frames[k].sop_instance_uid} and "
                f"{frames[keep[-1]].sop_instance_uid}, {distance[k]:.3f} mm along the normal): "
                "the series holds more than one volume"
            )
    dropped = len(frames) - len(keep)
    if dropped:
        array = array[keep]
        frames = [frames[k] for k in keep]
        distance = distance[keep]
    if len(frames) < 2:
        raise VolumeError("the series has fewer than two slices: it is not a volume")
    gaps = np.diff(distance)
    median = float(np.median(gaps))
    worst = float(np.max(np.abs(gaps - median)))
    if worst > spacing_tolerance * median:
        raise VolumeError(
            f"the slices are not evenly spaced: gaps from {gaps.min():.3f} to {gaps.max():.3f} "
            f"mm (median {median:.3f} mm, tolerance {spacing_tolerance:.0%})"
        )
    first = np.asarray(frames[0].position)
    last = np.asarray(frames[-1].position)
    geometry = Geometry(
        origin=first,
        row_cosine=row_cosine,
        column_cosine=column_cosine,
        pixel_spacing=reference.pixel_spacing,
        slice_step=(last - first) / (len(frames) - 1),
        frame_of_reference_uid=reference.frame_of_reference_uid,
    )
    return Volume(
        array=array,
        geometry=geometry,
        slices=[_ref(f) for f in frames],
        headers=headers,
        study_instance_uid=study,
        series_instance_uid=series_instance_uid,
        modality=modality,
        duplicates_dropped=dropped,
    )


def load_images(
    archive: Archive,
    series_instance_uid: str,
    *,
    max_images: int = 64,
    max_voxels: int | None = None,
) -> Volume:
    """Every frame of a series as a stack of 2D images, without patient geometry (projection
    radiographs for classifiers). All frames must have one size; at most ``max_images`` of
    them and ``max_voxels`` pixels in all."""
    frames, headers, study, modality = _read_headers(archive, series_instance_uid)
    if len(frames) > max_images:
        raise VolumeError(f"the series has {len(frames)} images, more than {max_images}")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        raise VolumeError(f"the series mixes image sizes ({sorted(sizes)})")
    rows, columns = sizes.pop()
    if max_voxels is not None and len(frames) * rows * columns > max_voxels:
        raise VolumeError(
            f"the series has {len(frames)} images of {rows}x{columns}, more than the "
            f"{max_voxels} pixels a model is run on (ai.max_voxels)"
        )
    array = np.empty((len(frames), rows, columns), dtype=np.float32)
    _decode_into(archive, frames, array)
    return Volume(
        array=array,
        geometry=None,
        slices=[_ref(f) for f in frames],
        headers=headers,
        study_instance_uid=study,
        series_instance_uid=series_instance_uid,
        modality=modality,
    )


def _ref(f: _Frame) -> SliceRef:
    position = tuple(float(v) for v in f.position) if f.position is not None else (0.0, 0.0, 0.0)
    return SliceRef(f.sop_instance_uid, f.sop_class_uid, f.frame_number, position)  # type: ignore[arg-type]


def _decode_into(archive: Archive, frames: list[_Frame], array: np.ndarray) -> None:
    """Decode every frame into its slot of ``array``, rescaled; each file opened once."""
    slots: dict[str, list[tuple[int, _Frame]]] = {}
    for k, f in enumerate(frames):
        slots.setdefault(f.blob_key, []).append((k, f))
    limit = inflate_limit(archive.settings)
    for key, items in slots.items():
        sop = items[0][1].sop_instance_uid
        try:
            with open_instance(archive.blobs, key, max_inflated=limit) as fh:
                _ds, layout = pixel_layout(fh)
                for k, f in items:
                    pixels = decode_frame(fh, layout, f.frame_number or 1, as_rgb=False)
                    if pixels.shape != array.shape[1:]:
                        raise VolumeError(
                            f"instance {sop} decodes to {pixels.shape}, not {array.shape[1:]}"
                        )
                    slot = array[k]
                    slot[...] = pixels
                    if f.slope != 1.0:
                        slot *= np.float32(f.slope)
                    if f.intercept != 0.0:
                        slot += np.float32(f.intercept)
        except StoredFileError as exc:
            raise VolumeError(f"instance {sop} cannot be decoded: {exc.message}") from exc


def _fmt(values: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in values)


def study_of_series(archive: Archive, series_instance_uid: str) -> str | None:
    with archive.db.session() as s:
        return s.scalar(
            select(Study.study_instance_uid)
            .join(Series, Series.study_fk == Study.id)
            .where(Series.series_instance_uid == series_instance_uid)
        )
