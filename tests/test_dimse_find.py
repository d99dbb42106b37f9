"""C-FIND SCP driven by DCMTK findscu (Patient Root and Study Root, every level) and pynetdicom."""

from __future__ import annotations

import io
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive import Archive
from tests.conftest import Backend, RunningServer, require_tool, start_server
from tests.dicom_factory import ct_slice

pytestmark = pytest.mark.dcmtk


@dataclass
class StudySpec:
    patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    modalities: tuple[str, ...]
    description: str
    uid: str = ""


STUDIES = [
    StudySpec("P1", "SMITH^JOHN", "20240110", "083000", ("CT", "SR"), "CT HEAD"),
    StudySpec("P1", "SMITH^JOHN", "20240220", "141500", ("MR",), "MR KNEE"),
    StudySpec("P2", "smith^anna", "20240215", "101500", ("CT",), "CT CHEST"),
    StudySpec("P3", "Müller^Jürgen", "20231231", "235959", ("US",), "US ABDOMEN"),
    StudySpec("P4", "SMYTHE^JO", "20240301", "000000", ("CT", "PT"), "PET-CT"),
    StudySpec("P5", "O'BRIEN^SEAN", "19991231", "120000", ("CR",), "CHEST 2 VIEWS"),
]


def _populate(archive: Archive) -> dict[str, StudySpec]:
    by_uid: dict[str, StudySpec] = {}
    for n, spec in enumerate(STUDIES):
        spec.uid = generate_uid()
        for s, modality in enumerate(spec.modalities):
            series = generate_uid()
            for i in range(2):
                ds = ct_slice(
                    study_uid=spec.uid,
                    series_uid=series,
                    index=i,
                    size=8,
                    patient_id=spec.patient_id,
                    patient_name=spec.patient_name,
                    study_date=spec.study_date,
                    seed=n,
                )
                ds.StudyTime = spec.study_time
                ds.Modality = modality
                ds.SeriesNumber = s + 1
                ds.StudyDescription = spec.description
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                archive.ingest(buffer.getvalue())
        by_uid[spec.uid] = spec
    return by_uid


@pytest.fixture
def qr_server(
    backend: Backend, tmp_path: Path
) -> Iterator[tuple[RunningServer, dict[str, StudySpec]]]:
    archive = Archive(backend.settings)
    studies = _populate(archive)
    archive.close()
    server = start_server(backend, tmp_path)
    yield server, studies
    server.stop()


def findscu(server: RunningServer, tmp_path: Path, model: str, keys: list[str]) -> list[Dataset]:
    tool = require_tool("findscu")
    out = tmp_path / f"rsp-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    args = [tool, model, "-X", "-od", str(out), "-aec", server.ae_title]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(server.dimse_port)]
    result = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def uids(responses: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(r.get(keyword)) for r in responses}


def expected(studies: dict[str, StudySpec], pred) -> set[str]:
    return {uid for uid, spec in studies.items() if pred(spec)}


def test_study_root_study_level_matching(qr_server, tmp_path: Path):
    server, studies = qr_server

    def study_query(*keys: str) -> list[Dataset]:
        return findscu(
            server, tmp_path, "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=", *keys]
        )

    # Wildcard, case-insensitive person names (the default setting).
    got = study_query("PatientName=smith*")
    assert uids(got) == expected(studies, lambda s: s.patient_name.upper().startswith("SMITH"))
    got = study_query("PatientName=SM?TH*")
    assert uids(got) == expected(studies, lambda s: re.match(r"SM.TH", s.patient_name.upper()))
    # Single value.
    assert uids(study_query("PatientID=P2")) == expected(studies, lambda s: s.patient_id == "P2")
    # Date ranges: a-b, a-, -b, single date.
    assert uids(study_query("StudyDate=20240101-20240229")) == expected(
        studies, lambda s: "20240101" <= s.study_date <= "20240229"
    )
    assert uids(study_query("StudyDate=20240215-")) == expected(
        studies, lambda s: s.study_date >= "20240215"
    )
    assert uids(study_query("StudyDate=-20231231")) == expected(
        studies, lambda s: s.study_date <= "20231231"
    )
    assert uids(study_query("StudyDate=20240110")) == expected(
        studies, lambda s: s.study_date == "20240110"
    )
    # Time range; a date and a time range are matched independently unless combined
    # date-time matching was negotiated (PS3.4 C.2.2.2.5.2, C.5.1.1.2: see the test below).
    assert uids(study_query("StudyTime=1000-1500")) == expected(
        studies, lambda s: "100000" <= s.study_time <= "150059"
    )
    independent = study_query("StudyDate=20240110-20240215", "StudyTime=080000-110000")
    assert uids(independent) == expected(
        studies,
        lambda s: "20240110" <= s.study_date <= "20240215" and "080000" <= s.study_time <= "110000",
    )
    # UID list.
    two = list(studies)[:2]
    assert uids(study_query("StudyInstanceUID=" + "\\".join(two))) == set(two)
    # Computed attribute as a matching key and as a return key.
    got = study_query("ModalitiesInStudy=CT", "NumberOfStudyRelatedSeries=")
    assert uids(got) == expected(studies, lambda s: "CT" in s.modalities)
    got = study_query(
        "ModalitiesInStudy=MR", "NumberOfStudyRelatedSeries=", "NumberOfStudyRelatedInstances="
    )
    (mr,) = got
    assert mr.NumberOfStudyRelatedSeries == 1 and mr.NumberOfStudyRelatedInstances == 2
    # A key that is not indexed (matched on the stored DICOM JSON).
    assert uids(study_query("PatientBirthDate=19700101", "BodyPartExamined=HEAD")) == set(studies)


def test_return_keys_are_exactly_the_requested_ones(qr_server, tmp_path: Path):
    server, studies = qr_server
    spec = next(s for s in studies.values() if s.patient_id == "P2")
    (rsp,) = findscu(
        server,
        tmp_path,
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={spec.uid}",
            "PatientName=",
            "StudyDescription=",
            "ModalitiesInStudy=",
            "NumberOfStudyRelatedInstances=",
            "PatientAge=",  # not in any instance: returned empty
            "RetrieveAETitle=",
        ],
    )
    keywords = {
        e.keyword for e in rsp if e.tag.group != 0x0008 or e.keyword != "SpecificCharacterSet"
    }
    assert keywords == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "PatientName",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        "PatientAge",
        "RetrieveAETitle",
    }
    assert str(rsp.PatientName) == "smith^anna"
    assert rsp.StudyDescription == "CT CHEST"
    assert rsp.ModalitiesInStudy == "CT"
    assert rsp.NumberOfStudyRelatedInstances == 2
    assert rsp.PatientAge == ""
    assert rsp.RetrieveAETitle == server.ae_title


def test_series_and_image_levels(qr_server, tmp_path: Path):
    server, studies = qr_server
    spec = next(s for s in studies.values() if s.modalities == ("CT", "SR"))
    series = findscu(
        server,
        tmp_path,
        "-S",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={spec.uid}",
            "SeriesInstanceUID=",
            "Modality=",
            "SeriesNumber=",
            "NumberOfSeriesRelatedInstances=",
        ],
    )
    assert sorted(r.Modality for r in series) == ["CT", "SR"]
    assert all(r.NumberOfSeriesRelatedInstances == 2 for r in series)
    assert all(r.StudyInstanceUID == spec.uid for r in series)
    ct = next(r for r in series if r.Modality == "CT")
    only_ct = findscu(
        server,
        tmp_path,
        "-S",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={spec.uid}",
            "Modality=CT",
            "SeriesInstanceUID=",
        ],
    )
    assert uids(only_ct, "SeriesInstanceUID") == {ct.SeriesInstanceUID}
    images = findscu(
        server,
        tmp_path,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={spec.uid}",
            f"SeriesInstanceUID={ct.SeriesInstanceUID}",
            "SOPInstanceUID=",
            "SOPClassUID=",
            "InstanceNumber=",
            "Rows=",
        ],
    )
    assert sorted(r.InstanceNumber for r in images) == [1, 2]
    assert all(r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and r.Rows == 8 for r in images)
    one = images[0].SOPInstanceUID
    picked = findscu(
        server,
        tmp_path,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={spec.uid}",
            f"SeriesInstanceUID={ct.SeriesInstanceUID}",
            f"SOPInstanceUID={one}",
            "InstanceNumber=2",
        ],
    )
    assert [r.SOPInstanceUID for r in picked] == ([one] if images[0].InstanceNumber == 2 else [])


def test_patient_root_model(qr_server, tmp_path: Path):
    server, studies = qr_server
    patients = findscu(
        server,
        tmp_path,
        "-P",
        [
            "QueryRetrieveLevel=PATIENT",
            "PatientID=",
            "PatientName=",
            "NumberOfPatientRelatedStudies=",
            "NumberOfPatientRelatedSeries=",
            "NumberOfPatientRelatedInstances=",
        ],
    )
    by_id = {r.PatientID: r for r in patients}
    assert set(by_id) == {s.patient_id for s in studies.values()}
    assert by_id["P1"].NumberOfPatientRelatedStudies == 2
    assert by_id["P1"].NumberOfPatientRelatedSeries == 3
    assert by_id["P1"].NumberOfPatientRelatedInstances == 6
    p1_studies = findscu(
        server,
        tmp_path,
        "-P",
        ["QueryRetrieveLevel=STUDY", "PatientID=P1", "StudyInstanceUID=", "StudyDate="],
    )
    assert uids(p1_studies) == expected(studies, lambda s: s.patient_id == "P1")


def test_non_ascii_names_and_character_sets(qr_server, tmp_path: Path):
    server, _studies = qr_server
    (utf8,) = findscu(
        server,
        tmp_path,
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            "SpecificCharacterSet=ISO_IR 192",
            "PatientName=MÜLLER*",
            "StudyInstanceUID=",
        ],
    )
    assert str(utf8.PatientName) == "Müller^Jürgen"
    assert utf8.SpecificCharacterSet == "ISO_IR 192"
    # The same query in ISO 8859-1: the answer comes back in ISO 8859-1 too.
    tool = require_tool("findscu")
    out = tmp_path / "latin1"
    out.mkdir()
    args = [
        tool.encode(),
        b"-S",
        b"-X",
        b"-od",
        str(out).encode(),
        b"-aec",
        server.ae_title.encode(),
        b"-k",
        b"QueryRetrieveLevel=STUDY",
        b"-k",
        b"SpecificCharacterSet=ISO_IR 100",
        b"-k",
        "PatientName=müller*".encode("latin-1"),
        b"-k",
        b"StudyInstanceUID=",
        b"127.0.0.1",
        str(server.dimse_port).encode(),
    ]
    assert subprocess.run(args, capture_output=True, timeout=60, check=False).returncode == 0
    (path,) = out.glob("rsp*.dcm")
    latin = pydicom.dcmread(path)
    assert latin.SpecificCharacterSet == "ISO_IR 100"
    assert str(latin.PatientName) == "Müller^Jürgen"
    assert "Müller^Jürgen".encode("latin-1") in path.read_bytes()  # encoded in ISO 8859-1


def _scu_find(server: RunningServer, model):
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    return ae, assoc


def test_hierarchical_rules_and_bad_identifiers(qr_server):
    server, _studies = qr_server
    _ae, assoc = _scu_find(server, StudyRootQueryRetrieveInformationModelFind)
    try:
        # SERIES level without the study's unique key (PS3.4 C.4.1.2.2.1).
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.SeriesInstanceUID = ""
        responses = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
        status, _ = responses[-1]
        assert status.Status == 0xA900
        assert "StudyInstanceUID" in status.ErrorComment
        # PATIENT level does not exist in the Study Root model.
        ds.QueryRetrieveLevel = "PATIENT"
        status, _ = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))[-1]
        assert status.Status == 0xA900
        # A level that does not exist.
        ds.QueryRetrieveLevel = "FRAME"
        status, _ = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))[-1]
        assert status.Status == 0xA900
        # An invalid date range.
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyDate = "2024-01-01"
        status, _ = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))[-1]
        assert status.Status == 0xA900
        # The association still works.
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        statuses = [
            s.Status for s, _ in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind)
        ]
        assert statuses == [0xFF00] * len(STUDIES) + [0x0000]
    finally:
        assoc.release()


def test_c_cancel_stops_the_responses(make_backend, tmp_path: Path):
    backend = make_backend()
    archive = Archive(backend.settings)
    study = generate_uid()
    series = generate_uid()
    # Enough matches that the server is still sending when the C-CANCEL arrives: identifiers
    # encoded from the index rows go out fast enough that 600 could all be sent before it.
    matches = 4000
    for i in range(matches):
        ds = ct_slice(study_uid=study, series_uid=series, index=i, size=4)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        archive.ingest(buffer.getvalue())
    archive.close()
    server = start_server(backend, tmp_path)
    try:
        _ae, assoc = _scu_find(server, StudyRootQueryRetrieveInformationModelFind)
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ""
        responses = assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind, msg_id=7)
        statuses = []
        for status, _identifier in responses:
            statuses.append(status.Status)
            if len(statuses) == 1:
                context_id = assoc.accepted_contexts[0].context_id
                assoc.send_c_cancel(7, context_id)
        assoc.release()
        assert statuses[-1] == 0xFE00
        assert len(statuses) < matches
    finally:
        server.stop()


def test_patient_root_study_level_needs_patient_id(qr_server):
    server, _ = qr_server
    _ae, assoc = _scu_find(server, PatientRootQueryRetrieveInformationModelFind)
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        status, _ = list(assoc.send_c_find(ds, PatientRootQueryRetrieveInformationModelFind))[-1]
        assert status.Status == 0xA900
        assert "PatientID" in status.ErrorComment
    finally:
        assoc.release()


def test_combined_date_time_matching_when_negotiated(qr_server):
    """With SOP Class Extended Negotiation byte 2 = 1 (PS3.4 C.5.1.1.2) a StudyDate range and a
    StudyTime range form one date-time range (C.2.2.2.5.2)."""
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    server, studies = qr_server
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    item.service_class_application_information = b"\x00\x01"
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title, ext_neg=[item])
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.StudyDate = "20240110-20240215"
        ds.StudyTime = "120000-110000"
        found = {
            str(identifier.StudyInstanceUID)
            for status, identifier in assoc.send_c_find(
                ds, StudyRootQueryRetrieveInformationModelFind
            )
            if status.Status == 0xFF00 and identifier is not None
        }
    finally:
        assoc.release()
    assert found == expected(
        studies,
        lambda s: ("20240110", "120000") <= (s.study_date, s.study_time) <= ("20240215", "110000"),
    )
    assert found  # the combined range holds studies the independent ranges would not
