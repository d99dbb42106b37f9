"""A radiologist's report as an Enhanced SR document with TID 2000 content
(fhir_bridge.report_sr): written, encoded, read back with pydicom and checked by dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from fhir_bridge.report_sr import (
    DIAGNOSTIC_IMAGING_REPORT,
    PriorDocument,
    ReportDraft,
    encode,
    write_report,
)
from tests.dicom_factory import IMPLEMENTATION_UID, ct_slice

ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
CET = timezone(timedelta(hours=1))
AUTHOR = "Müller^Jürgen"
IMPRESSION = "Keine Blutung — unauffällig"
FINDINGS = "Kein Nachweis einer intrakraniellen Blutung.\r\nMittellinie nicht verlagert."


def _uid() -> str:
    # Short enough that the factory's FrameOfReferenceUID (study UID + ".1") stays a valid UI.
    return f"{IMPLEMENTATION_UID}.77.{uuid.uuid4().int % 10**20 + 1}"


@pytest.fixture
def study() -> Dataset:
    study_uid, series_uid = _uid(), _uid()
    ds = ct_slice(study_uid=study_uid, series_uid=series_uid, index=0, patient_name=AUTHOR)
    ds.IssuerOfPatientID = "KLINIKUM"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Scanner 64"
    return ds


def _draft(**changes: object) -> ReportDraft:
    fields: dict[str, object] = {
        "title": DIAGNOSTIC_IMAGING_REPORT,
        "conclusion": IMPRESSION,
        "findings": FINDINGS,
        "complete": True,
        "verified": False,
        "author": AUTHOR,
        "verifier": None,
        "verifying_organization": "Klinikum Süd",
        "observed_at": datetime(2024, 1, 15, 11, 42, 5, tzinfo=CET),
        "predecessor": None,
    }
    fields.update(changes)
    return ReportDraft(**fields)  # type: ignore[arg-type]


def _write(study: Dataset, draft: ReportDraft) -> Dataset:
    return write_report(
        study,
        draft,
        series_instance_uid=_uid(),
        series_number=900,
        sop_instance_uid=_uid(),
        instance_number=1,
        manufacturer="pacsbridge",
        institution_name="Klinikum Süd",
    )


def _round_trip(ds: Dataset, path: Path) -> Dataset:
    data = encode(ds)
    assert data[128:132] == b"DICM"
    path.write_bytes(data)
    return dcmread(BytesIO(data))


def _items(node: Dataset) -> Iterator[Dataset]:
    for item in node.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodingSchemeDesignator, code.CodeValue)


def _text_under(root: Dataset, section: tuple[str, str], element: tuple[str, str]) -> list[str]:
    """The TEXT values named ``element`` inside the section CONTAINER named ``section``
    directly under the root (TID 2000)."""
    return [
        text.TextValue
        for item in root.ContentSequence
        if item.ValueType == "CONTAINER" and _concept(item) == section
        for text in item.ContentSequence
        if text.ValueType == "TEXT" and _concept(text) == element
    ]


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's report on ``path``: fails on any Error line, returns the warnings."""
    program = shutil.which("dciodvfy")
    if program is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run(
        [program, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(lines)
    return [line for line in lines if line.startswith("Warning")]


def _assert_study_copied(sr: Dataset, study: Dataset) -> None:
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
    ):
        assert sr[keyword].value == study[keyword].value, keyword


def test_preliminary_report(study: Dataset, tmp_path: Path) -> None:
    ds = _write(study, _draft())
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    sr = _round_trip(ds, tmp_path / "preliminary.dcm")

    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.file_meta.MediaStorageSOPClassUID == ENHANCED_SR
    assert sr.SOPClassUID == ENHANCED_SR
    assert sr.SOPInstanceUID == ds.SOPInstanceUID == sr.file_meta.MediaStorageSOPInstanceUID
    assert sr.Modality == "SR"
    assert sr.SeriesNumber == 900 and sr.InstanceNumber == 1
    assert sr.SeriesInstanceUID != study.SeriesInstanceUID
    assert sr.Manufacturer == "pacsbridge"
    assert sr.InstitutionName == "Klinikum Süd"
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    _assert_study_copied(sr, study)
    assert str(sr.PatientName) == AUTHOR

    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert "VerifyingObserverSequence" not in sr
    assert "PredecessorDocumentsSequence" not in sr
    # No evidence given: the study header is no evidence of its own, nothing is listed.
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert "PertinentOtherEvidenceSequence" not in sr

    assert (sr.ContentDate, sr.ContentTime, sr.TimezoneOffsetFromUTC) == (
        "20240115",
        "114205",
        "+0100",
    )

    # TID 2000: root CONTAINER titled by the draft, template 2000 of DCMR.
    assert sr.ValueType == "CONTAINER"
    assert _concept(sr) == ("LN", "18748-4")
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "Diagnostic imaging report"
    template = sr.ContentTemplateSequence[0]
    assert (template.TemplateIdentifier, template.MappingResource) == ("2000", "DCMR")
    first, second, third = sr.ContentSequence[:3]
    # TID 1204 language, then TID 1001/1002 observer context with the author.
    assert first.RelationshipType == "HAS CONCEPT MOD"
    assert _concept(first) == ("DCM", "121049")
    assert first.ConceptCodeSequence[0].CodeValue == "en-US"
    assert second.RelationshipType == "HAS OBS CONTEXT"
    assert _concept(second) == ("DCM", "121005")
    assert second.ConceptCodeSequence[0].CodeValue == "121006"  # Person
    assert third.RelationshipType == "HAS OBS CONTEXT"
    assert _concept(third) == ("DCM", "121008")
    assert str(third.PersonName) == AUTHOR
    sections = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"]
    assert [_concept(item) for item in sections] == [("DCM", "121070"), ("DCM", "121072")]
    assert all(item.RelationshipType == "CONTAINS" for item in sections)
    assert _text_under(sr, ("DCM", "121070"), ("DCM", "121071")) == [FINDINGS]
    assert _text_under(sr, ("DCM", "121072"), ("DCM", "121073")) == [IMPRESSION]

    _dciodvfy(tmp_path / "preliminary.dcm")


def test_verified_amendment_with_predecessor(study: Dataset, tmp_path: Path) -> None:
    preliminary = _write(study, _draft())
    prior = PriorDocument(
        study_instance_uid=preliminary.StudyInstanceUID,
        series_instance_uid=preliminary.SeriesInstanceUID,
        sop_class_uid=preliminary.SOPClassUID,
        sop_instance_uid=preliminary.SOPInstanceUID,
    )
    images = [
        ct_slice(study_uid=study.StudyInstanceUID, series_uid=study.SeriesInstanceUID, index=k)
        for k in range(3)
    ]
    other_study_uid = _uid()
    older = ct_slice(study_uid=other_study_uid, series_uid=_uid(), index=0)
    amended = "Nachtrag: " + IMPRESSION
    draft = _draft(
        conclusion=amended,
        findings=None,
        verified=True,
        verifier=None,  # the author verifies
        observed_at=datetime(2024, 1, 16, 8, 5, tzinfo=CET),
        predecessor=prior,
        evidence=[*images, older],
    )
    sr = _round_trip(_write(study, draft), tmp_path / "amendment.dcm")

    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "VERIFIED"
    assert sr.PreliminaryFlag == "FINAL"
    (verifier,) = sr.VerifyingObserverSequence
    assert str(verifier.VerifyingObserverName) == AUTHOR
    assert verifier.VerifyingOrganization == "Klinikum Süd"
    assert verifier.VerificationDateTime == "20240116080500+0100"
    assert (sr.ContentDate, sr.ContentTime) == ("20240116", "080500")

    (predecessor,) = sr.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == prior.study_instance_uid
    (series,) = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == prior.series_instance_uid
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPClassUID == ENHANCED_SR == prior.sop_class_uid
    assert instance.ReferencedSOPInstanceUID == prior.sop_instance_uid

    (current,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert current.StudyInstanceUID == study.StudyInstanceUID
    (current_series,) = current.ReferencedSeriesSequence
    assert {i.ReferencedSOPInstanceUID for i in current_series.ReferencedSOPSequence} == {
        image.SOPInstanceUID for image in images
    }
    (other,) = sr.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == other_study_uid

    assert _text_under(sr, ("DCM", "121072"), ("DCM", "121073")) == [amended]
    assert not [item for item in _items(sr) if _concept(item) == ("DCM", "121070")]
    _assert_study_copied(sr, study)

    _dciodvfy(tmp_path / "amendment.dcm")


def test_named_verifier_without_author(study: Dataset, tmp_path: Path) -> None:
    draft = _draft(author=None, verifier="Schmidt^Anna", verified=True, findings=None)
    sr = _round_trip(_write(study, draft), tmp_path / "verifier.dcm")
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Schmidt^Anna"
    assert not [item for item in _items(sr) if item.RelationshipType == "HAS OBS CONTEXT"]
    _dciodvfy(tmp_path / "verifier.dcm")


def test_latin1_study_header_and_long_text(tmp_path: Path) -> None:
    """A header in ISO 8859-1 is decoded on reading and written again as UTF-8; long text
    is stored whole in one UT TextValue."""
    header = ct_slice(study_uid=_uid(), series_uid=_uid(), index=0, patient_name="Müller^Jürgen")
    header.SpecificCharacterSet = "ISO_IR 100"
    header.StudyDescription = "Schädel nativ"
    buffer = BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    assert "Müller".encode("latin-1") in buffer.getvalue()
    study = dcmread(BytesIO(buffer.getvalue()), stop_before_pixels=True)

    long_text = ("Befund ohne pathologischen Nachweis. " * 3000).strip()
    assert len(long_text.encode()) > 65536
    sr = _round_trip(_write(study, _draft(findings=long_text)), tmp_path / "latin1.dcm")

    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Müller^Jürgen"
    assert sr.StudyDescription == "Schädel nativ"
    assert _text_under(sr, ("DCM", "121070"), ("DCM", "121071")) == [long_text]
    _dciodvfy(tmp_path / "latin1.dcm")


def test_times_follow_the_study_offset(study: Dataset, tmp_path: Path) -> None:
    """TimezoneOffsetFromUTC applies to StudyDate/StudyTime too (PS3.3 Table C.12-1): when
    the study has one, the report's times are given in it."""
    study.TimezoneOffsetFromUTC = "-0500"
    draft = _draft(observed_at=datetime(2024, 1, 15, 3, 0, tzinfo=CET), verified=True)
    sr = _round_trip(_write(study, draft), tmp_path / "offset.dcm")
    assert (sr.ContentDate, sr.ContentTime, sr.TimezoneOffsetFromUTC) == (
        "20240114",
        "210000",
        "-0500",
    )
    assert sr.VerifyingObserverSequence[0].VerificationDateTime == "20240114210000-0500"


def test_partial_draft_by_a_family_name(study: Dataset, tmp_path: Path) -> None:
    draft = _draft(author="Hausarzt", complete=False, conclusion=None)
    sr = _round_trip(_write(study, draft), tmp_path / "partial.dcm")
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    (name,) = [item.PersonName for item in _items(sr) if item.ValueType == "PNAME"]
    # "Hausarzt" and "Hausarzt^" are the same PN value (PS3.5 6.2): family name only.
    assert (name.family_name, name.given_name) == ("Hausarzt", "")
    _dciodvfy(tmp_path / "partial.dcm")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"conclusion": None, "findings": None}, "neither a conclusion"),
        ({"conclusion": "  ", "findings": ""}, "neither a conclusion"),
        ({"complete": False, "verified": True}, "must be complete"),
        ({"verified": True, "author": None, "verifier": None}, "needs a verifier"),
        ({"observed_at": datetime(2024, 1, 15, 10, 0)}, "timezone-aware"),
    ],
)
def test_invalid_drafts(study: Dataset, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _write(study, _draft(**changes))


def test_study_header_must_be_an_instance(study: Dataset) -> None:
    del study.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        _write(study, _draft())
