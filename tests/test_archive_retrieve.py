"""archive.retrieve: retrieve identifiers (PS3.4 C.4.2.2.1, C.4.3.2.1) and what they name."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from archive import Archive
from archive.blobstore import instance_key
from archive.retrieve import (
    InvalidRetrieveIdentifier,
    RetrieveKeys,
    RetrieveLevel,
    RetrieveModel,
    find_instances,
)
from tests.dicom_factory import ct_slice

PATIENT_ROOT = RetrieveModel.PATIENT_ROOT
STUDY_ROOT = RetrieveModel.STUDY_ROOT


def identifier(level: str | None, **keys: object) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_keys_per_level_and_model():
    keys = RetrieveKeys.from_identifier(
        identifier("STUDY", StudyInstanceUID="1.2\\1.3"), STUDY_ROOT
    )
    assert keys == RetrieveKeys(STUDY_ROOT, RetrieveLevel.STUDY, study_uids=("1.2", "1.3"))
    keys = RetrieveKeys.from_identifier(
        identifier(
            "IMAGE",
            StudyInstanceUID="1.2",
            SeriesInstanceUID="1.2.3",
            SOPInstanceUID=["4.5", "4.6"],
        ),
        STUDY_ROOT,
    )
    assert keys.series_uids == ("1.2.3",)
    assert keys.sop_instance_uids == ("4.5", "4.6")
    assert keys.patient_id is None
    keys = RetrieveKeys.from_identifier(
        identifier("patient ", PatientID=" P1 ", IssuerOfPatientID="HOSP"), PATIENT_ROOT
    )
    assert (keys.level, keys.patient_id, keys.issuer_of_patient_id) == (
        RetrieveLevel.PATIENT,
        "P1",
        "HOSP",
    )
    keys = RetrieveKeys.from_identifier(
        identifier("SERIES", PatientID="P1", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3"),
        PATIENT_ROOT,
    )
    assert (keys.patient_id, keys.study_uids, keys.series_uids) == ("P1", ("1.2",), ("1.2.3",))
    # Keys below the level are not part of a retrieve at that level; they are ignored.
    keys = RetrieveKeys.from_identifier(
        identifier("STUDY", StudyInstanceUID="1.2", SeriesInstanceUID="9.9"), STUDY_ROOT
    )
    assert keys.series_uids == ()


@pytest.mark.parametrize(
    ("model", "ds", "keyword"),
    [
        (STUDY_ROOT, identifier(None, StudyInstanceUID="1.2"), "QueryRetrieveLevel"),
        (STUDY_ROOT, identifier("FRAME", StudyInstanceUID="1.2"), "QueryRetrieveLevel"),
        (STUDY_ROOT, identifier("PATIENT", PatientID="P1"), "QueryRetrieveLevel"),
        (STUDY_ROOT, identifier("STUDY"), "StudyInstanceUID"),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID=""), "StudyInstanceUID"),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.2.abc"), "StudyInstanceUID"),
        (STUDY_ROOT, identifier("SERIES", StudyInstanceUID="1.2"), "SeriesInstanceUID"),
        (
            STUDY_ROOT,
            identifier("SERIES", StudyInstanceUID="1.2\\1.3", SeriesInstanceUID="1.4"),
            "StudyInstanceUID",
        ),
        (
            STUDY_ROOT,
            identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.4"),
            "SOPInstanceUID",
        ),
        (PATIENT_ROOT, identifier("PATIENT"), "PatientID"),
        (PATIENT_ROOT, identifier("PATIENT", PatientID="A\\B"), "PatientID"),
        (PATIENT_ROOT, identifier("STUDY", StudyInstanceUID="1.2"), "PatientID"),
    ],
)
def test_invalid_identifiers(model: RetrieveModel, ds: Dataset, keyword: str):
    with pytest.raises(InvalidRetrieveIdentifier) as raised:
        RetrieveKeys.from_identifier(ds, model)
    assert raised.value.keyword == keyword
    assert raised.value.reason


def _store(archive: Archive, **kwargs) -> str:
    series_number = kwargs.pop("series_number", 1)
    ds = ct_slice(**kwargs)
    ds.SeriesNumber = series_number
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return archive.ingest(buffer.getvalue()).sop_instance_uid


def test_find_instances_in_order(archive: Archive):
    study, other_study = generate_uid(), generate_uid()
    series_2, series_1 = generate_uid(), generate_uid()
    # Stored out of order: series number 2 first, instances backwards.
    stored: dict[str, list[tuple[int, str]]] = {series_1: [], series_2: []}
    for series, number in ((series_2, 2), (series_1, 1)):
        for index in (2, 0, 1):
            sop = _store(
                archive,
                study_uid=study,
                series_uid=series,
                index=index,
                series_number=number,
                patient_id="P1",
            )
            stored[series].append((index, sop))
    other = _store(
        archive, study_uid=other_study, series_uid=generate_uid(), index=0, patient_id="P2"
    )
    ordered = [sop for series in (series_1, series_2) for _index, sop in sorted(stored[series])]

    items = find_instances(
        archive.db, RetrieveKeys(STUDY_ROOT, RetrieveLevel.STUDY, study_uids=(study,))
    )
    assert [i.sop_instance_uid for i in items] == ordered
    first = items[0]
    assert first.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert first.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert first.blob_key == instance_key(study, series_1, first.sop_instance_uid)
    assert first.size == len(archive.blobs.read(first.blob_key))

    both = RetrieveKeys(STUDY_ROOT, RetrieveLevel.STUDY, study_uids=(study, other_study))
    assert {i.sop_instance_uid for i in find_instances(archive.db, both)} == {*ordered, other}
    one_series = RetrieveKeys(
        STUDY_ROOT, RetrieveLevel.SERIES, study_uids=(study,), series_uids=(series_2,)
    )
    assert [i.sop_instance_uid for i in find_instances(archive.db, one_series)] == ordered[3:]
    patient = RetrieveKeys(PATIENT_ROOT, RetrieveLevel.PATIENT, patient_id="P2")
    assert [i.sop_instance_uid for i in find_instances(archive.db, patient)] == [other]
    wrong_patient = RetrieveKeys(
        PATIENT_ROOT, RetrieveLevel.STUDY, patient_id="P2", study_uids=(study,)
    )
    assert find_instances(archive.db, wrong_patient) == []
    issuer = RetrieveKeys(
        PATIENT_ROOT, RetrieveLevel.PATIENT, patient_id="P2", issuer_of_patient_id="ELSEWHERE"
    )
    assert find_instances(archive.db, issuer) == []
    image = RetrieveKeys(
        STUDY_ROOT,
        RetrieveLevel.IMAGE,
        study_uids=(study,),
        series_uids=(series_1,),
        sop_instance_uids=(ordered[2], ordered[0]),
    )
    assert [i.sop_instance_uid for i in find_instances(archive.db, image)] == [
        ordered[0],
        ordered[2],
    ]


@pytest.mark.parametrize(("rows", "columns"), [(15, 17), (8, 8), (3, 5)])
def test_frames_of_bit_packed_pixel_data_that_start_inside_a_byte(rows: int, columns: int):
    """1-bit frames follow each other bit by bit (PS3.5 8.1.1): a frame of 15 x 17 pixels
    starts at bit 255 of the value. Each frame decodes to its own pixels (a SEG's frames)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.uid import UID, ExplicitVRLittleEndian

    from archive.frames import decode_frame, frame_bytes
    from archive.instance_io import pixel_layout

    rng = np.random.default_rng(5)
    frames = rng.integers(0, 2, size=(7, rows, columns), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.66.4")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(frames)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    _ds, layout = pixel_layout(buffer)
    for number, expected in enumerate(frames, start=1):
        assert np.array_equal(decode_frame(buffer, layout, number), expected)
        assert frame_bytes(buffer, layout, number) == pack_bits(expected)
