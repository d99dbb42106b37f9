"""Synthetic DICOM instances for tests and benchmarks (no third-party image data)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1506.1"  # pacsbridge test data root


def ct_slice(
    *,
    study_uid: str,
    series_uid: str,
    index: int,
    size: int = 64,
    patient_id: str = "PAT-1",
    patient_name: str = "DOE^JANE",
    study_date: str = "20240115",
    sop_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    """One slice of a CT series, Explicit VR Little Endian, int16 pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid) if sop_uid else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + study_uid[-6:]
    ds.StudyID = "1"
    ds.StudyDescription = "CT HEAD"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "AXIAL 1mm"
    ds.BodyPartExamined = "HEAD"
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.FrameOfReferenceUID = study_uid + ".1"
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(seed + index)
    ds.PixelData = rng.integers(-1024, 3000, size=(size, size), dtype=np.int16).tobytes()
    return ds


def write_series(
    directory: Path,
    count: int,
    *,
    size: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    **kwargs: object,
) -> list[Path]:
    """Write ``count`` slices of one new series as Part-10 files; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for index in range(count):
        ds = ct_slice(study_uid=study_uid, series_uid=series_uid, index=index, size=size, **kwargs)  # type: ignore[arg-type]
        path = directory / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def iter_pydicom_test_files() -> Iterator[Path]:
    from pydicom.data import get_testdata_file

    root = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
    yield from sorted(root.glob("*.dcm"))
