"""The index of structured reports: documents, measurements, versions and tombstones, built at
ingest from real SR documents (highdicom's TID 1500 and a TID 2000 text report) on SQLite and
PostgreSQL."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid
from pydicom.valuerep import DA, TM
from sqlalchemy import delete, func, select, update

from archive import Archive, IngestOutcome
from archive.models import (
    Instance,
    Patient,
    ReportDocument,
    ReportMeasurement,
    Series,
    Study,
    Tombstone,
)
from archive.reports import is_report
from tests.dicom_factory import ct_slice

ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
HU = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
LIVER = hd.sr.CodedConcept("10200004", "SCT", "Liver")
RIGHT_LOBE = hd.sr.CodedConcept("72481006", "SCT", "Right lobe of liver")
ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
LESION = hd.sr.CodedConcept("52988006", "SCT", "Lesion")
MEAN = hd.sr.CodedConcept("373098007", "SCT", "Mean")
RECIST = hd.sr.CodedConcept("126080", "DCM", "RECIST 1.1")
DIAGNOSTIC_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(params=["sqlite", "postgresql"])
def open_archive(
    request: pytest.FixtureRequest, make_backend: Callable[..., Any]
) -> Iterator[Callable[..., Archive]]:
    """Open an archive on the parametrised index with setting overrides."""
    opened: list[Archive] = []

    def open_(**overrides: object) -> Archive:
        arc = Archive(make_backend(request.param, "file", **overrides).settings)
        opened.append(arc)
        return arc

    yield open_
    for arc in opened:
        arc.close()


class ImagedStudy:
    """The CT series of one study and a stand-in of its segmentation (never stored)."""

    def __init__(self, patient_id: str = "PAT-1") -> None:
        self.uid = generate_uid()
        self.ct_series = generate_uid()
        self.cts = [
            ct_slice(
                study_uid=self.uid,
                series_uid=self.ct_series,
                index=k,
                size=8,
                patient_id=patient_id,
            )
            for k in range(2)
        ]
        self.seg = Dataset()
        self.seg.SOPClassUID = SegmentationStorage
        self.seg.SOPInstanceUID = generate_uid()
        self.seg.SeriesInstanceUID = generate_uid()
        self.seg.StudyInstanceUID = self.uid
        self.sr_series = generate_uid()

    def store_images(self, arc: Archive) -> None:
        for ct in self.cts:
            assert arc.ingest(_encode(ct)).outcome is IngestOutcome.STORED


def _measurement_report(study: ImagedStudy, sop_uid: str) -> hd.sr.Comprehensive3DSR:
    """TID 1500 as ai/writers.py writes it: a volumetric group (TID 1411) referencing a SEG
    segment, and a group on one image (TID 1501) with a qualitative evaluation."""
    algorithm = hd.sr.AlgorithmIdentification(name="liver-net", version="1.2")
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid="1.2.826.0.1.3680043.10.1506.77.1", identifier="liver"
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=study.seg.SOPClassUID,
            sop_instance_uid=study.seg.SOPInstanceUID,
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(study.ct_series),
        ),
        finding_type=LIVER,
        finding_category=ANATOMICAL_STRUCTURE,
        finding_sites=[hd.sr.FindingSite(LIVER, laterality=codes.SCT.Right)],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=1523.25, unit=ML, algorithm_id=algorithm
            ),
            hd.sr.Measurement(
                name=MEAN,
                value=61.5,
                unit=HU,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(RIGHT_LOBE)],
            ),
        ],
    )
    on_image = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid="1.2.826.0.1.3680043.10.1506.77.2", identifier="image 1"
        ),
        finding_type=LESION,
        method=RECIST,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(LESION, codes.SCT.Absent)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                study.cts[0].SOPClassUID, study.cts[0].SOPInstanceUID
            )
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name="Reader^Rita"
                ),
            )
        ),
        procedure_reported=hd.sr.CodedConcept("77477000", "SCT", "Computed tomography"),
        imaging_measurements=[volumetric, on_image],
    )
    # TID 1500 row 12, which highdicom does not write: evaluations of the whole document.
    overall = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type="CONTAINS",
    )
    overall.ContentSequence = DicomSequence(
        [hd.sr.CodeContentItem(LESION, codes.SCT.Present, relationship_type="CONTAINS")]
    )
    report[0].ContentSequence.append(overall)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*study.cts, study.seg],
        content=report,
        series_instance_uid=study.sr_series,
        series_number=9,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="pacsbridge",
        is_complete=True,
        is_final=False,
    )
    sr.ContentDate, sr.ContentTime = DA("20240115"), TM("101500")
    return sr


def _text_report(
    study: ImagedStudy,
    sop_uid: str,
    impression: str,
    *,
    previous: Dataset | None = None,
    verified: bool = False,
) -> hd.sr.EnhancedSR:
    """A TID 2000 Basic Diagnostic Imaging Report: findings and impressions as text, a
    diameter, its author in the observation context."""
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_REPORT, template_id="2000")
    findings = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("121070", "DCM", "Findings"), relationship_type="CONTAINS"
    )
    findings.ContentSequence = DicomSequence(
        [
            hd.sr.TextContentItem(
                name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
                value="The liver is enlarged.",
                relationship_type="CONTAINS",
            ),
            hd.sr.NumContentItem(
                name=hd.sr.CodedConcept("81827009", "SCT", "Diameter"),
                value=182,
                unit=hd.sr.CodedConcept("mm", "UCUM", "millimeter"),
                relationship_type="CONTAINS",
            ),
        ]
    )
    impressions = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("121072", "DCM", "Impressions"), relationship_type="CONTAINS"
    )
    impressions.ContentSequence = DicomSequence(
        [
            hd.sr.TextContentItem(
                name=hd.sr.CodedConcept("121073", "DCM", "Impression"),
                value=impression,
                relationship_type="CONTAINS",
            )
        ]
    )
    root.ContentSequence = DicomSequence(
        [
            hd.sr.PnameContentItem(
                name=codes.DCM.PersonObserverName,
                value="Author^Anna",
                relationship_type="HAS OBS CONTEXT",
            ),
            findings,
            impressions,
        ]
    )
    sr = hd.sr.EnhancedSR(
        evidence=study.cts,
        content=root,
        series_instance_uid=study.sr_series,
        series_number=10,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="Reporting Co",
        is_complete=True,
        is_final=verified,
        is_verified=verified,
        verifying_observer_name="Verifier^Victor" if verified else None,
        verifying_organization="Radiology" if verified else None,
        previous_versions=[previous] if previous is not None else None,
    )
    sr.ContentDate, sr.ContentTime = DA("20240116"), TM("0930")
    sr.TimezoneOffsetFromUTC = "+0100"
    if verified:
        sr.VerifyingObserverSequence[0].VerificationDateTime = "20240116094500"
    return sr


def _utc(value: datetime | None) -> datetime | None:
    """A date-time read from the index, in UTC (SQLite gives it back without an offset)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _documents(arc: Archive) -> dict[str, ReportDocument]:
    with arc.db.session() as s:
        return {d.sop_instance_uid: d for d in s.scalars(select(ReportDocument))}


def _measurements(arc: Archive, sop_uid: str) -> list[dict[str, Any]]:
    with arc.db.session() as s:
        rows = s.scalars(
            select(ReportMeasurement)
            .join(ReportDocument, ReportMeasurement.document_fk == ReportDocument.id)
            .where(ReportDocument.sop_instance_uid == sop_uid)
            .order_by(ReportMeasurement.position)
        ).all()
        return [
            {
                c.name: getattr(row, c.name)
                for c in ReportMeasurement.__table__.columns
                if c.name not in ("id", "document_fk")
            }
            for row in rows
        ]


def _tombstones(arc: Archive) -> set[tuple[str, str]]:
    with arc.db.session() as s:
        return {(t.kind, t.key) for t in s.scalars(select(Tombstone))}


def _count(arc: Archive, model: type) -> int:
    with arc.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_report_sop_classes() -> None:
    assert is_report("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    assert is_report("1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    assert is_report("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR
    assert is_report("1.2.840.10008.5.1.4.1.1.88.34")  # Comprehensive 3D SR
    assert is_report("1.2.840.10008.5.1.4.1.1.88.35")  # Extensible SR
    assert not is_report("1.2.840.10008.5.1.4.1.1.88.59")  # Key Object Selection
    assert not is_report("1.2.840.10008.5.1.4.1.1.2")  # CT Image
    assert not is_report(SegmentationStorage)


def test_tid1500_measurement_report_is_indexed(open_archive: Callable[..., Archive]) -> None:
    arc = open_archive()
    study = ImagedStudy()
    study.store_images(arc)
    assert _count(arc, ReportDocument) == 0  # images are no reports
    sop = generate_uid()
    assert arc.ingest(_encode(_measurement_report(study, sop))).outcome is IngestOutcome.STORED

    doc = _documents(arc)[sop]
    with arc.db.session() as s:
        instance_id, study_fk = s.execute(
            select(Instance.id, Study.id)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Instance.sop_instance_uid == sop)
        ).one()
    assert (doc.instance_fk, doc.study_fk) == (instance_id, study_fk)
    assert doc.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.34"
    assert (doc.root_uid, doc.predecessor_uid, doc.version, doc.superseded) == (
        sop,
        None,
        1,
        False,
    )
    assert doc.template_id == "1500"
    assert (doc.title_scheme, doc.title_code, doc.title_meaning) == (
        "DCM",
        "126000",
        "Imaging Measurement Report",
    )
    assert (doc.completion_flag, doc.verification_flag) == ("COMPLETE", "UNVERIFIED")
    assert _utc(doc.content_datetime) == datetime(2024, 1, 15, 10, 15, tzinfo=UTC)
    assert (doc.verification_datetime, doc.verifying_observer) == (None, None)
    assert doc.author == "Reader^Rita"
    assert doc.status is None
    # Tracking identifiers and algorithm names qualify items: they are no narrative.
    assert (doc.conclusion, doc.narrative) == (None, None)
    assert (doc.algorithm_name, doc.algorithm_version, doc.manufacturer) == (
        "liver-net",
        "1.2",
        "pacsbridge",
    )
    assert doc.device_key == hashlib.blake2b(b"pacsbridge|liver-net|1.2", digest_size=8).hexdigest()

    empty = {
        "numeric_value": None,
        "unit_code": None,
        "unit_meaning": None,
        "value_scheme": None,
        "value_code": None,
        "value_meaning": None,
        "text_value": None,
        "method_meaning": None,
    }
    volumetric = {
        "finding_scheme": "SCT",
        "finding_code": "10200004",
        "finding_meaning": "Liver",
        "site_scheme": "SCT",
        "site_code": "10200004",
        "site_meaning": "Liver",
        "laterality_code": "24028007",
        "tracking_identifier": "liver",
        "tracking_uid": "1.2.826.0.1.3680043.10.1506.77.1",
        "referenced": {
            "series": study.ct_series,
            "instances": [],
            "segments": [{"sop": study.seg.SOPInstanceUID, "segment": 1}],
        },
    }
    assert _measurements(arc, sop) == [
        {
            **empty,
            **volumetric,
            "position": 0,
            "concept_scheme": "SCT",
            "concept_code": "118565006",
            "concept_meaning": "Volume",
            "value_type": "NUM",
            "numeric_value": 1523.25,
            "unit_code": "ml",
            "unit_meaning": "milliliter",
        },
        {
            # The measurement's own finding site (no laterality) overrides the group's.
            **empty,
            **volumetric,
            "position": 1,
            "concept_scheme": "SCT",
            "concept_code": "373098007",
            "concept_meaning": "Mean",
            "value_type": "NUM",
            "numeric_value": 61.5,
            "unit_code": "[hnsf'U]",
            "unit_meaning": "Hounsfield unit",
            "site_code": "72481006",
            "site_meaning": "Right lobe of liver",
            "laterality_code": None,
        },
        {
            **empty,
            "position": 2,
            "concept_scheme": "SCT",
            "concept_code": "52988006",
            "concept_meaning": "Lesion",
            "value_type": "CODE",
            "value_scheme": "SCT",
            "value_code": "272519000",
            "value_meaning": "Absent",
            "finding_scheme": "SCT",
            "finding_code": "52988006",
            "finding_meaning": "Lesion",
            "site_scheme": None,
            "site_code": None,
            "site_meaning": None,
            "laterality_code": None,
            "method_meaning": "RECIST 1.1",
            "tracking_identifier": "image 1",
            "tracking_uid": "1.2.826.0.1.3680043.10.1506.77.2",
            "referenced": {
                "series": None,
                "instances": [study.cts[0].SOPInstanceUID],
                "segments": [],
            },
        },
        {
            **empty,
            "position": 3,
            "concept_scheme": "SCT",
            "concept_code": "52988006",
            "concept_meaning": "Lesion",
            "value_type": "CODE",
            "value_scheme": "SCT",
            "value_code": "52101004",
            "value_meaning": "Present",
            "finding_scheme": None,
            "finding_code": None,
            "finding_meaning": None,
            "site_scheme": None,
            "site_code": None,
            "site_meaning": None,
            "laterality_code": None,
            "tracking_identifier": None,
            "tracking_uid": None,
            "referenced": None,
        },
    ]
    # A measurement that references nothing holds SQL NULL (not JSON null).
    with arc.db.session() as s:
        assert s.scalar(select(func.count()).where(ReportMeasurement.referenced.is_(None))) == 1


def test_text_report_versions(open_archive: Callable[..., Archive]) -> None:
    arc = open_archive()
    study = ImagedStudy()
    study.store_images(arc)
    first_uid, second_uid = generate_uid(), generate_uid()
    first = _text_report(study, first_uid, "Hepatomegaly.")
    arc.ingest(_encode(first))
    doc = _documents(arc)[first_uid]
    assert doc.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.22"
    assert (doc.template_id, doc.title_scheme, doc.title_code, doc.title_meaning) == (
        "2000",
        "LN",
        "18748-4",
        "Diagnostic imaging report",
    )
    assert (doc.root_uid, doc.version, doc.superseded, doc.predecessor_uid) == (
        first_uid,
        1,
        False,
        None,
    )
    assert doc.author == "Author^Anna"
    assert doc.conclusion == "Hepatomegaly."
    assert doc.narrative == "The liver is enlarged.\n\nHepatomegaly."
    assert _utc(doc.content_datetime) == datetime(
        2024, 1, 16, 9, 30, tzinfo=timezone(timedelta(hours=1))
    )
    assert _utc(doc.content_datetime) == datetime(2024, 1, 16, 8, 30, tzinfo=UTC)
    assert (doc.verification_flag, doc.verifying_observer, doc.verification_datetime) == (
        "UNVERIFIED",
        None,
        None,
    )
    assert (doc.algorithm_name, doc.device_key, doc.manufacturer) == (None, None, "Reporting Co")
    # A NUM outside any measurement group is a measurement with no context.
    [diameter] = _measurements(arc, first_uid)
    assert diameter["concept_code"] == "81827009" and diameter["value_type"] == "NUM"
    assert (diameter["numeric_value"], diameter["unit_code"]) == (182.0, "mm")
    assert diameter["finding_code"] is None and diameter["referenced"] is None

    second = _text_report(
        study, second_uid, "Hepatomegaly, no focal lesion.", previous=first, verified=True
    )
    arc.ingest(_encode(second))
    docs = _documents(arc)
    assert docs[first_uid].superseded is True
    new = docs[second_uid]
    assert (new.root_uid, new.version, new.superseded, new.predecessor_uid) == (
        first_uid,
        2,
        False,
        first_uid,
    )
    assert (new.verification_flag, new.verifying_observer) == ("VERIFIED", "Verifier^Victor")
    # No offset in the DT value: the document's Timezone Offset From UTC.
    assert _utc(new.verification_datetime) == datetime(2024, 1, 16, 8, 45, tzinfo=UTC)
    assert new.conclusion == "Hepatomegaly, no focal lesion."


def test_two_amendments_of_one_version_keep_one_current_version(
    open_archive: Callable[..., Archive],
) -> None:
    """Two documents that both name the same predecessor (two writers amending one version)
    stay one chain, numbered on, and only the newest is current: a report never has two."""
    arc = open_archive()
    study = ImagedStudy()
    study.store_images(arc)
    first_uid, a_uid, b_uid = generate_uid(), generate_uid(), generate_uid()
    first = _text_report(study, first_uid, "Hepatomegaly.")
    arc.ingest(_encode(first))
    arc.ingest(_encode(_text_report(study, a_uid, "A.", previous=first, verified=True)))
    arc.ingest(_encode(_text_report(study, b_uid, "B.", previous=first, verified=True)))
    docs = _documents(arc)
    assert {(d.sop_instance_uid, d.root_uid, d.version, d.superseded) for d in docs.values()} == {
        (first_uid, first_uid, 1, True),
        (a_uid, first_uid, 2, True),
        (b_uid, first_uid, 3, False),
    }


def test_versions_arriving_out_of_order_join_one_chain(
    open_archive: Callable[..., Archive],
) -> None:
    arc = open_archive()
    study = ImagedStudy()
    uids = [generate_uid() for _ in range(3)]
    v1 = _text_report(study, uids[0], "One.")
    v2 = _text_report(study, uids[1], "Two.", previous=v1)
    v3 = _text_report(study, uids[2], "Three.", previous=v2, verified=True)

    arc.ingest(_encode(v3))
    arc.ingest(_encode(v2))
    docs = _documents(arc)
    assert {u: (d.root_uid, d.version, d.superseded) for u, d in docs.items()} == {
        uids[1]: (uids[1], 1, True),
        uids[2]: (uids[1], 2, False),
    }
    arc.ingest(_encode(v1))
    docs = _documents(arc)
    assert {u: (d.root_uid, d.version, d.superseded) for u, d in docs.items()} == {
        uids[0]: (uids[0], 1, True),
        uids[1]: (uids[0], 2, True),
        uids[2]: (uids[0], 3, False),
    }


def test_overwrite_indexes_the_new_copy(open_archive: Callable[..., Archive]) -> None:
    arc = open_archive(duplicate_policy="overwrite")
    study = ImagedStudy()
    sop = generate_uid()
    arc.ingest(_encode(_text_report(study, sop, "Draft.")))
    assert _documents(arc)[sop].conclusion == "Draft."
    assert len(_measurements(arc, sop)) == 1
    result = arc.ingest(_encode(_text_report(study, sop, "Final.", verified=True)))
    assert result.outcome is IngestOutcome.OVERWRITTEN
    docs = _documents(arc)
    assert list(docs) == [sop]
    assert (docs[sop].conclusion, docs[sop].verification_flag) == ("Final.", "VERIFIED")
    assert (docs[sop].root_uid, docs[sop].version) == (sop, 1)
    assert len(_measurements(arc, sop)) == 1
    assert _count(arc, ReportMeasurement) == 1


def test_a_duplicate_kept_leaves_the_index_as_it_was(
    open_archive: Callable[..., Archive],
) -> None:
    arc = open_archive(duplicate_policy="keep")
    study = ImagedStudy()
    sop = generate_uid()
    arc.ingest(_encode(_text_report(study, sop, "Draft.")))
    before = _documents(arc)[sop]
    again = arc.ingest(_encode(_text_report(study, sop, "Final.", verified=True)))
    assert again.outcome is IngestOutcome.DUPLICATE
    after = _documents(arc)[sop]
    assert (after.id, after.conclusion, after.created_at) == (
        before.id,
        "Draft.",
        before.created_at,
    )


def test_reindex_reports_rebuilds_the_index_and_keeps_the_asked_status(
    open_archive: Callable[..., Archive],
) -> None:
    """Reports stored before the index existed (or by an older version) are indexed from
    their files, each version in its place; a status an edge asked for survives."""
    arc = open_archive()
    study = ImagedStudy()
    study.store_images(arc)
    uids = [generate_uid() for _ in range(3)]
    first = _text_report(study, uids[0], "One.")
    second = _text_report(study, uids[1], "Two.", previous=first, verified=True)
    third = _text_report(study, uids[2], "Three.", previous=second, verified=True)
    for ds in (first, second):
        arc.ingest(_encode(ds))
    arc.ingest(_encode(third), report_status="corrected")
    before = {
        uid: (d.root_uid, d.version, d.superseded, d.status) for uid, d in _documents(arc).items()
    }
    assert before[uids[2]] == (uids[0], 3, False, "corrected")
    with arc.db.write_session() as s:
        s.execute(delete(ReportDocument).where(ReportDocument.sop_instance_uid == uids[0]))
    assert arc.reindex_reports() == 3
    after = {
        uid: (d.root_uid, d.version, d.superseded, d.status) for uid, d in _documents(arc).items()
    }
    assert after == before
    assert _documents(arc)[uids[0]].conclusion == "One."


def test_deleting_a_study_leaves_tombstones(open_archive: Callable[..., Archive]) -> None:
    arc = open_archive()
    study, other = ImagedStudy(), ImagedStudy()
    study.store_images(arc)
    other.store_images(arc)
    measurements_uid, first_uid, second_uid = generate_uid(), generate_uid(), generate_uid()
    first = _text_report(study, first_uid, "One.")
    arc.ingest(_encode(_measurement_report(study, measurements_uid)))
    arc.ingest(_encode(first))
    arc.ingest(_encode(_text_report(study, second_uid, "Two.", previous=first)))
    kept_uid = generate_uid()
    arc.ingest(_encode(_text_report(other, kept_uid, "Other.")))
    assert _count(arc, ReportDocument) == 4

    assert arc.delete_study(study.uid) == 5
    assert _tombstones(arc) == {
        ("study", study.uid),
        ("report", measurements_uid),
        ("report", first_uid),
    }
    assert list(_documents(arc)) == [kept_uid]
    assert len(_measurements(arc, kept_uid)) == _count(arc, ReportMeasurement) == 1

    # Stored again and deleted again: one tombstone, with the later date.
    with arc.db.session() as s:
        first_deleted = s.scalar(select(Tombstone.deleted_at).where(Tombstone.key == study.uid))
    study.store_images(arc)
    arc.delete_study(study.uid)
    with arc.db.session() as s:
        rows = s.execute(select(Tombstone.deleted_at).where(Tombstone.key == study.uid)).all()
    assert len(rows) == 1 and first_deleted is not None and rows[0][0] > first_deleted


def test_deleting_versions_of_a_report(open_archive: Callable[..., Archive]) -> None:
    arc = open_archive()
    study = ImagedStudy()
    study.store_images(arc)
    first_uid, second_uid = generate_uid(), generate_uid()
    first = _text_report(study, first_uid, "One.")
    arc.ingest(_encode(first))
    arc.ingest(_encode(_text_report(study, second_uid, "Two.", previous=first)))

    # The newest version goes: the first one is current again, and the report is not gone.
    assert arc.delete_instance(second_uid) == 1
    assert _tombstones(arc) == set()
    docs = _documents(arc)
    assert list(docs) == [first_uid] and docs[first_uid].superseded is False

    # The last version goes: the report is gone, the study (its images) is not.
    assert arc.delete_instance(first_uid) == 1
    assert _tombstones(arc) == {("report", first_uid)}
    assert _count(arc, ReportDocument) == _count(arc, ReportMeasurement) == 0


def test_deleting_the_first_version_keeps_the_report(
    open_archive: Callable[..., Archive],
) -> None:
    arc = open_archive()
    study = ImagedStudy()
    study.store_images(arc)
    uids = [generate_uid() for _ in range(3)]
    v1 = _text_report(study, uids[0], "One.")
    v2 = _text_report(study, uids[1], "Two.", previous=v1)
    for version in (v1, v2, _text_report(study, uids[2], "Three.", previous=v2)):
        arc.ingest(_encode(version))
    arc.delete_instance(uids[1])
    docs = _documents(arc)
    # The first version is still followed by a later one of its chain.
    assert {u: (d.root_uid, d.version, d.superseded) for u, d in docs.items()} == {
        uids[0]: (uids[0], 1, True),
        uids[2]: (uids[0], 3, False),
    }
    arc.delete_instance(uids[0])
    assert _tombstones(arc) == set()
    arc.delete_series(study.sr_series)
    assert _tombstones(arc) == {("report", uids[0])}


def test_a_patient_with_an_ehr_record_outlives_its_images(
    open_archive: Callable[..., Archive],
) -> None:
    arc = open_archive()
    study = ImagedStudy(patient_id="EHR-1")
    study.store_images(arc)
    with arc.db.write_session() as s:
        s.execute(
            update(Patient)
            .where(Patient.patient_id == "EHR-1")
            .values(record_version=1, record_updated_at=datetime.now(UTC))
        )
    arc.delete_study(study.uid)
    assert _tombstones(arc) == {("study", study.uid)}
    assert arc.delete_patient("EHR-1") == 0
    with arc.db.session() as s:
        assert s.scalars(select(Patient.patient_id)).all() == ["EHR-1"]
        assert s.scalar(select(func.count()).select_from(Study)) == 0

    # A patient without a record still goes with its last study.
    plain = ImagedStudy(patient_id="PLAIN-1")
    plain.store_images(arc)
    arc.delete_study(plain.uid)
    with arc.db.session() as s:
        assert s.scalars(select(Patient.patient_id)).all() == ["EHR-1"]


def test_an_overwrite_that_empties_a_study_prunes_it_with_a_tombstone(
    open_archive: Callable[..., Archive],
) -> None:
    arc = open_archive(duplicate_policy="overwrite")
    study = ImagedStudy(patient_id="EHR-2")
    ct = study.cts[0]
    arc.ingest(_encode(ct))
    with arc.db.write_session() as s:
        s.execute(update(Patient).where(Patient.patient_id == "EHR-2").values(record_version=3))
    moved = ct_slice(
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        index=0,
        size=8,
        patient_id="OTHER",
        sop_uid=ct.SOPInstanceUID,
    )
    assert arc.ingest(_encode(moved)).outcome is IngestOutcome.OVERWRITTEN
    assert _tombstones(arc) == {("study", study.uid)}
    with arc.db.session() as s:
        assert sorted(s.scalars(select(Patient.patient_id))) == ["EHR-2", "OTHER"]


def test_an_overwrite_that_moves_a_report_keeps_it_indexed(
    open_archive: Callable[..., Archive],
) -> None:
    arc = open_archive(duplicate_policy="overwrite")
    study, elsewhere = ImagedStudy(), ImagedStudy()
    sop = generate_uid()
    arc.ingest(_encode(_text_report(study, sop, "Here.")))
    arc.ingest(_encode(_text_report(elsewhere, sop, "There.")))
    docs = _documents(arc)
    with arc.db.session() as s:
        study_fk = s.scalar(select(Study.id).where(Study.study_instance_uid == elsewhere.uid))
    assert (docs[sop].study_fk, docs[sop].conclusion) == (study_fk, "There.")
    assert _tombstones(arc) == {("study", study.uid)}
