"""Real scans wrapped as DICOM series for the AI tests and bench/ai.py (built at test time from
Debian packages, never committed): the T1 MRI of ``mricron-data`` with its reference brain
mask, and the head CT of ``invesalius-examples``; plus helpers that read a SEG back into
patient space by its own plane positions."""

from __future__ import annotations

import io
import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from tests.dicom_factory import IMPLEMENTATION_UID

MRICRON = Path("/usr/share/mricron/templates")
CH2 = MRICRON / "ch2.nii.gz"
CH2_BET = MRICRON / "ch2bet.nii.gz"
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Layouts of an axial series: Image Orientation (Patient) and whether slices are numbered
#: from the top down (InstanceNumber 1 at the most superior slice).
LAYOUTS = {
    "axial-head-first": ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), False),
    "axial-reversed": ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), True),
    "axial-right-to-left": ((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), False),
}


@dataclass(frozen=True)
class SeriesSpec:
    modality: str = "MR"
    patient_id: str = "AI-1"
    patient_name: str = "BRAIN^TEST"
    study_uid: str = ""
    series_uid: str = ""
    series_description: str = "T1 axial"
    body_part: str = "HEAD"
    series_number: int = 1


def grid_affine(iop, first_position, spacing) -> np.ndarray:
    """Voxel (k, i, j) to LPS for slices along the normal of ``iop``; ``spacing`` is
    (slice, row, column)."""
    row = np.array(iop[:3], dtype=float)
    col = np.array(iop[3:], dtype=float)
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, 0] = normal * spacing[0]
    affine[:3, 1] = col * spacing[1]
    affine[:3, 2] = row * spacing[2]
    affine[:3, 3] = first_position
    return affine


def resample_to_grid(
    data: np.ndarray, ras_affine: np.ndarray, lps_affine: np.ndarray, shape
) -> np.ndarray:
    """``data`` (a NIfTI array with its RAS affine) sampled (nearest) on a DICOM grid."""
    from scipy import ndimage

    matrix = np.linalg.inv(ras_affine) @ LPS_TO_RAS @ lps_affine
    return ndimage.affine_transform(
        data, matrix[:3, :3], offset=matrix[:3, 3], output_shape=shape, order=0, cval=0
    )


def nifti_as_axial(path: Path, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """A 1 mm RAS NIfTI as an axial (slice, row, column) volume in ``layout`` and its
    LPS affine."""
    import nibabel as nib

    image: Any = nib.load(str(path))
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    ras = image.affine
    iop, _reverse = LAYOUTS[layout]
    corners = np.array(
        [
            [x, y, z, 1]
            for x in (0, data.shape[0] - 1)
            for y in (0, data.shape[1] - 1)
            for z in (0, data.shape[2] - 1)
        ],
        dtype=float,
    )
    lps = (LPS_TO_RAS @ ras @ corners.T).T[:, :3]
    low, high = lps.min(axis=0), lps.max(axis=0)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    # The first voxel is the corner where every index axis starts.
    start = np.where(row > 0, low, high) * np.abs(row) + np.where(col > 0, low, high) * np.abs(col)
    start += np.where(normal > 0, low, high) * np.abs(normal)
    extent = high - low
    shape = (
        round(float(np.abs(normal) @ extent)) + 1,
        round(float(np.abs(col) @ extent)) + 1,
        round(float(np.abs(row) @ extent)) + 1,
    )
    affine = grid_affine(iop, start, (1.0, 1.0, 1.0))
    return resample_to_grid(data, ras, affine, shape), affine


def series_datasets(
    volume: np.ndarray,
    affine: np.ndarray,
    spec: SeriesSpec,
    *,
    reverse_numbering: bool = False,
    rescale: tuple[float, float] = (1.0, 0.0),
) -> list[Dataset]:
    """One single-frame instance per slice (int16, Explicit VR Little Endian) with the
    geometry of ``affine`` (voxel (k, i, j) to LPS)."""
    slope, intercept = rescale
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row = affine[:3, 2] / spacing[2]
    col = affine[:3, 1] / spacing[1]
    study = spec.study_uid or generate_uid()
    series = spec.series_uid or generate_uid()
    frame_of_reference = generate_uid()
    sop_class: str = MRImageStorage if spec.modality == "MR" else CTImageStorage
    stored = np.round((volume - intercept) / slope).astype(np.int16)
    n = volume.shape[0]
    out = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = UID(sop_class)
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = spec.modality
        ds.PatientID = spec.patient_id
        ds.PatientName = spec.patient_name
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyDate = "20250301"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC-AI"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = spec.series_number
        ds.SeriesDescription = spec.series_description
        ds.BodyPartExamined = spec.body_part
        ds.PatientPosition = "HFS"
        ds.Manufacturer = "pacsbridge-tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = n - k if reverse_numbering else k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in affine[:3] @ np.array([k, 0, 0, 1.0])]
        ds.ImageOrientationPatient = [f"{v:g}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        if spec.modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = "120"
        else:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = "4"
            ds.RepetitionTime = "10"
            ds.EchoTrainLength = "1"
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return out


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_files(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cranium_ct() -> tuple[np.ndarray, tuple[float, float, float]]:
    """InVesalius' example head CT: int16 HU (slices, rows, columns), anterior at the top
    row, and (slice, row, column) spacing."""
    with tarfile.open(CRANIUM) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        plist = plistlib.load(tar.extractfile(members["main.plist"]))  # type: ignore[arg-type]
        raw = tar.extractfile(members[plist["matrix"]["filename"]]).read()  # type: ignore[union-attr]
    shape = tuple(plist["matrix"]["shape"])
    data = np.frombuffer(raw, dtype=np.int16)
    data = data[-int(np.prod(shape)) :].reshape(shape)  # a memmap file: the array is at the end
    sx, sy, sz = plist["spacing"]
    return data.astype(np.float32), (float(sz), float(sy), float(sx))


def seg_points(seg: Dataset, segment_number: int) -> np.ndarray:
    """LPS positions (n, 3) of every pixel of one segment, placed by the SEG's own Plane
    Position (Patient), Plane Orientation and Pixel Measures (PS3.3 C.7.6.16)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    row, col = iop[:3], iop[3:]
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    points = []
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        identification = frame.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        number = identification[0].ReferencedSegmentNumber
        if number != segment_number:
            continue
        position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        i, j = np.nonzero(pixels[index])
        points.append(position + np.outer(i * spacing[0], col) + np.outer(j * spacing[1], row))
    return np.concatenate(points) if points else np.zeros((0, 3))


def points_to_mask(points: np.ndarray, ras_affine: np.ndarray, shape) -> np.ndarray:
    """Boolean volume on a NIfTI grid holding the given LPS points."""
    index = np.linalg.inv(ras_affine) @ LPS_TO_RAS @ np.c_[points, np.ones(len(points))].T
    ijk = np.round(index[:3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(shape)[:, None]), axis=0)
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(ijk[:, inside])] = True
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def read(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def stored(archive: Any, sop_instance_uid: str) -> bytes:
    """The stored bytes of an instance of an :class:`archive.Archive`."""
    from sqlalchemy import select

    from archive.models import Instance

    with archive.db.session() as s:
        key = s.scalar(
            select(Instance.blob_key).where(Instance.sop_instance_uid == sop_instance_uid)
        )
    assert key is not None, f"{sop_instance_uid} is not in the archive"
    return bytes(archive.blobs.read(key))
