"""Relational queries (PS3.4 C.4.1.2.2.2) for the Query/Retrieve FIND models, when the
requestor negotiates them (SOP Class Extended Negotiation byte 1, C.5.1.1.1), and the
``query_lenient`` setting that accepts SERIES and IMAGE queries without the unique keys of
the levels above; against pynetdicom and DCMTK ``findscu``."""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive import Archive
from config import Settings
from dicom_node.server import DimseServer
from tests.conftest import Backend, require_tool
from tests.dicom_factory import ct_slice

pytestmark = pytest.mark.dcmtk

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind


@dataclass
class Archived:
    """What the node holds: per study, (patient id, name, {series uid: (modality, [sops])})."""

    studies: dict[str, tuple[str, str, dict[str, tuple[str, list[str]]]]] = field(
        default_factory=dict
    )

    def series(self, pred: Any = lambda pid, name, modality: True) -> set[str]:
        return {
            uid
            for pid, name, series in self.studies.values()
            for uid, (modality, _) in series.items()
            if pred(pid, name, modality)
        }

    def sops(self, series_uid: str) -> list[str]:
        for _, _, series in self.studies.values():
            if series_uid in series:
                return series[series_uid][1]
        raise KeyError(series_uid)


def _populate(archive: Archive) -> Archived:
    held = Archived()
    for n, (pid, name, modalities) in enumerate(
        [
            ("P1", "SMITH^JOHN", ("CT", "MR")),
            ("P2", "SMITH^ANNA", ("CT",)),
            ("P3", "JONES^BOB", ("MR",)),
        ]
    ):
        study = generate_uid()
        series_of: dict[str, tuple[str, list[str]]] = {}
        for s, modality in enumerate(modalities):
            series = generate_uid()
            sops = []
            for i in range(2):
                ds = ct_slice(
                    study_uid=study,
                    series_uid=series,
                    index=i,
                    size=8,
                    patient_id=pid,
                    patient_name=name,
                    seed=n,
                )
                ds.Modality = modality
                ds.SeriesNumber = s + 1
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                archive.ingest(buffer.getvalue())
                sops.append(str(ds.SOPInstanceUID))
            series_of[series] = (modality, sops)
        held.studies[study] = (pid, name, series_of)
    return held


@dataclass
class Node:
    port: int
    held: Archived


@contextlib.contextmanager
def running_node(backend: Backend, **overrides: Any) -> Iterator[Node]:
    settings = Settings(
        **{
            **backend.settings.model_dump(),
            "dimse_host": "127.0.0.1",
            "dimse_port": 0,
            **overrides,
        }
    )
    archive = Archive(settings)
    server = DimseServer(archive, settings)
    try:
        held = _populate(archive)
        _, port = server.start()
        yield Node(port, held)
    finally:
        server.stop()
        archive.close()


@pytest.fixture
def strict(make_backend: Any, pynetdicom_patched: None, tmp_path: Path) -> Iterator[Node]:
    backend = make_backend("sqlite", "file", data_dir=str(tmp_path / "strict"))
    with running_node(backend) as node:
        yield node


@pytest.fixture
def lenient(make_backend: Any, pynetdicom_patched: None, tmp_path: Path) -> Iterator[Node]:
    backend = make_backend("sqlite", "file", data_dir=str(tmp_path / "lenient"))
    with running_node(backend, query_lenient=True) as node:
        yield node


def _extended(sop_class: str, info: bytes) -> SOPClassExtendedNegotiation:
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = sop_class
    item.service_class_application_information = info
    return item


@dataclass
class Answer:
    status: int
    found: list[Dataset]
    comment: str
    reply: bytes | None
    """The acceptor's SOP Class Extended Negotiation reply for the SOP class (None: none)."""


def c_find(port: int, model: str, identifier: Dataset, info: bytes | None = None) -> Answer:
    ae = AE(ae_title="RELSCU")
    ae.add_requested_context(model)
    ext_neg: list[Any] | None = [_extended(model, info)] if info is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE", ext_neg=ext_neg)
    assert assoc.is_established
    try:
        replies = [
            i.service_class_application_information
            for i in assoc.acceptor.user_information
            if isinstance(i, SOPClassExtendedNegotiation) and i.sop_class_uid == model
        ]
        responses = list(assoc.send_c_find(identifier, model))
    finally:
        assoc.release()
    status, _ = responses[-1]
    return Answer(
        int(status.Status),
        [found for _, found in responses[:-1] if found is not None],
        str(status.get("ErrorComment", "")),
        replies[0] if replies else None,
    )


def identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def series_uids(found: list[Dataset]) -> set[str]:
    return {str(ds.SeriesInstanceUID) for ds in found}


RELATIONAL = b"\x01"


def test_relational_queries_when_negotiated(strict: Node):
    held = strict.held
    mr = identifier("SERIES", SeriesInstanceUID="", Modality="MR")
    # Negotiated: accepted (byte 1 = 1 in the reply) and the upper unique keys may be absent.
    answer = c_find(strict.port, STUDY_ROOT, mr, RELATIONAL)
    assert answer.reply is not None and answer.reply[0] == 1
    assert answer.status == 0x0000
    assert series_uids(answer.found) == held.series(lambda p, n, m: m == "MR")
    assert len(answer.found) == 2
    # Keys of the levels above with any matching: a person name wildcard at SERIES level.
    keyed = identifier("SERIES", SeriesInstanceUID="", PatientName="SMITH*", Modality="CT")
    answer = c_find(strict.port, STUDY_ROOT, keyed, RELATIONAL)
    assert series_uids(answer.found) == held.series(
        lambda p, n, m: n.startswith("SMITH") and m == "CT"
    )
    # A list of studies above the query level.
    first, _, third = held.studies
    listed = identifier("SERIES", SeriesInstanceUID="", StudyInstanceUID=f"{first}\\{third}")
    answer = c_find(strict.port, STUDY_ROOT, listed, RELATIONAL)
    assert series_uids(answer.found) == set(held.studies[first][2]) | set(held.studies[third][2])
    # Patient Root, IMAGE level, by SOP Instance UID alone.
    sop = held.sops(next(iter(held.series(lambda p, n, m: p == "P2"))))[1]
    image = identifier("IMAGE", SOPInstanceUID=sop)
    answer = c_find(strict.port, PATIENT_ROOT, image, RELATIONAL + b"\x00")
    assert answer.reply is not None and answer.reply[:2] == b"\x01\x00"
    assert [str(ds.SOPInstanceUID) for ds in answer.found] == [sop]
    assert str(answer.found[0].PatientID) == "P2"
    # Patient Root, STUDY level without Patient ID.
    studies = identifier("STUDY", StudyInstanceUID="", PatientName="SMITH*")
    answer = c_find(strict.port, PATIENT_ROOT, studies, RELATIONAL)
    assert {str(ds.StudyInstanceUID) for ds in answer.found} == {
        uid for uid, (_, name, _) in held.studies.items() if name.startswith("SMITH")
    }


def test_without_negotiation_queries_stay_hierarchical(strict: Node):
    mr = identifier("SERIES", SeriesInstanceUID="", Modality="MR")
    for info in (None, b"\x00\x01"):  # not proposed; proposed without byte 1
        answer = c_find(strict.port, STUDY_ROOT, mr, info)
        assert answer.status == 0xA900, info
        assert "StudyInstanceUID" in answer.comment
        assert answer.found == []
        if info is not None:
            assert answer.reply == b"\x00\x01"  # combined date-time only
    # Relational negotiated for the Study Root model only: Patient Root stays hierarchical.
    studies = identifier("STUDY", StudyInstanceUID="", PatientName="SMITH*")
    ae = AE(ae_title="RELSCU")
    ae.add_requested_context(STUDY_ROOT)
    ae.add_requested_context(PATIENT_ROOT)
    assoc = ae.associate(
        "127.0.0.1",
        strict.port,
        ae_title="PACSBRIDGE",
        ext_neg=[_extended(STUDY_ROOT, RELATIONAL)],
    )
    try:
        status, _ = list(assoc.send_c_find(studies, PATIENT_ROOT))[-1]
        assert status.Status == 0xA900
        responses = list(assoc.send_c_find(studies, STUDY_ROOT))
        assert responses[-1][0].Status == 0x0000
        assert len(responses) == 3  # the two SMITH studies
    finally:
        assoc.release()


def test_lenient_setting_with_pynetdicom(strict: Node, lenient: Node):
    mr = identifier("SERIES", SeriesInstanceUID="", Modality="MR")
    assert c_find(strict.port, STUDY_ROOT, mr).status == 0xA900
    answer = c_find(lenient.port, STUDY_ROOT, mr)
    assert answer.status == 0x0000
    assert answer.reply is None  # nothing negotiated
    assert series_uids(answer.found) == lenient.held.series(lambda p, n, m: m == "MR")
    sop = lenient.held.sops(next(iter(lenient.held.series())))[0]
    image = identifier("IMAGE", SOPInstanceUID=sop)
    assert c_find(strict.port, PATIENT_ROOT, image).status == 0xA900
    assert [str(ds.SOPInstanceUID) for ds in c_find(lenient.port, PATIENT_ROOT, image).found] == [
        sop
    ]
    # Only SERIES and IMAGE: a Patient Root STUDY query still needs its Patient ID.
    studies = identifier("STUDY", StudyInstanceUID="", PatientName="SMITH*")
    answer = c_find(lenient.port, PATIENT_ROOT, studies)
    assert answer.status == 0xA900
    assert "PatientID" in answer.comment


def findscu(port: int, out: Path, model: str, keys: list[str]) -> tuple[list[Dataset], str]:
    tool = require_tool("findscu")
    out.mkdir()
    args = [tool, model, "-v", "-X", "-od", str(out), "-aec", "PACSBRIDGE"]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(port)]
    result = subprocess.run(args, capture_output=True, timeout=60, check=False, text=True)
    found: list[Dataset] = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return found, result.stdout + result.stderr


def test_lenient_setting_with_findscu(strict: Node, lenient: Node, tmp_path: Path):
    keys = ["QueryRetrieveLevel=SERIES", "SeriesInstanceUID", "Modality=CT", "PatientName=SMITH*"]
    found, log = findscu(strict.port, tmp_path / "rsp-strict", "-S", keys)
    assert found == []
    assert "DataSetDoesNotMatchSOPClass" in log
    found, log = findscu(lenient.port, tmp_path / "rsp-lenient", "-S", keys)
    assert series_uids(found) == lenient.held.series(
        lambda p, n, m: n.startswith("SMITH") and m == "CT"
    )
    assert len(found) == 2
    # IMAGE level in the Patient Root model with neither Patient ID nor the UIDs above.
    series = next(iter(lenient.held.series(lambda p, n, m: p == "P3")))
    keys = ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID", "PatientName=JONES*"]
    found, log = findscu(lenient.port, tmp_path / "image", "-P", keys)
    assert sorted(str(ds.SOPInstanceUID) for ds in found) == sorted(lenient.held.sops(series))
    found, log = findscu(strict.port, tmp_path / "image-strict", "-P", keys)
    assert found == [] and "DataSetDoesNotMatchSOPClass" in log


def test_a_query_over_the_match_limit_is_refused(
    make_backend: Any, pynetdicom_patched: None, tmp_path: Path
):
    """``query_max_matches``: a C-FIND that matches more records than the limit is answered
    0xA700 (Out of Resources) with no match sent; one at the limit gets every match."""
    backend = make_backend("sqlite", "file", data_dir=str(tmp_path / "capped"))
    with running_node(backend, query_lenient=True, query_max_matches=3) as node:
        everything = c_find(node.port, STUDY_ROOT, identifier("IMAGE", SOPInstanceUID=""))
        assert (everything.status, everything.found) == (0xA700, [])
        assert "more than 3 matches" in everything.comment
        every_series = c_find(node.port, STUDY_ROOT, identifier("SERIES", SeriesInstanceUID=""))
        assert every_series.status == 0xA700
        studies = c_find(node.port, STUDY_ROOT, identifier("STUDY", StudyInstanceUID=""))
        assert studies.status == 0x0000 and len(studies.found) == 3  # at the limit
        ct = c_find(
            node.port, STUDY_ROOT, identifier("SERIES", SeriesInstanceUID="", Modality="CT")
        )
        assert ct.status == 0x0000
        assert series_uids(ct.found) == node.held.series(lambda p, n, m: m == "CT")


def test_lenient_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PACSBRIDGE_DATA_DIR", str(tmp_path))
    assert Settings().query_lenient is False
    monkeypatch.setenv("PACSBRIDGE_QUERY_LENIENT", "true")
    assert Settings().query_lenient is True
