"""Modality Worklist C-FIND (PS3.4 K.4, K.6.1) with real peers.

Orders are written to the index directly (the FHIR ServiceRequest edge writes the same rows);
the node is queried with DCMTK ``findscu -W`` and a pynetdicom MWL SCU. The differential: the
same items written as worklist files for DCMTK's ``wlmscpfs`` answer the same ``findscu -W``
queries with the same items.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from sqlalchemy import select

from archive import Archive
from archive.audit import AuditEventRow
from archive.models import Patient
from archive.orders import ImagingOrder
from archive.query import Key, QueryError, find
from archive.worklist import STEP_SEQUENCE, find_worklist, worklist_query
from config import Settings
from dicom_node.server import DimseServer
from tests.conftest import Backend, free_port, require_tool, start_server, wait_for_port

pytestmark = pytest.mark.dcmtk

WL_AE = "WORKLIST"
PENDING = 0xFF00
PENDING_UNSUPPORTED = 0xFF01


@dataclass(frozen=True)
class Order:
    accession: str
    patient_id: str
    name: str
    birth: str
    sex: str
    modality: str
    station: str
    date: str
    time: str
    status: str = "active"
    priority: str = "routine"
    record_name: str | None = None
    """The EHR record's name of the patient (wins over the DICOM name)."""


ORDERS = [
    Order("ACC1", "P1", "DOE^JOHN", "19700101", "M", "CT", "CT1", "20260110", "083000"),
    Order("ACC2", "P2", "SMITH^ANNA", "19800202", "F", "MR", "MR1", "20260110", "140000"),
    Order("ACC3", "P3", "OLD^NAME", "19900303", "O", "CT", "CT1", "20260111", "101500",
          priority="stat", record_name="NEWMAN^PAUL"),
    Order("ACC4", "P1", "DOE^JOHN", "19700101", "M", "CT", "CT2", "20260111", "090000",
          status="on-hold"),
    Order("ACC5", "P4", "SMYTHE^JO", "19550505", "M", "US", "US1", "20260112", "233000",
          priority="urgent"),
    Order("ACC6", "P2", "SMITH^ANNA", "19800202", "F", "CT", "CT1", "20260110", "100000",
          status="revoked"),
    Order("ACC7", "P4", "SMYTHE^JO", "19550505", "M", "US", "US1", "20260109", "120000",
          status="completed"),
]  # fmt: skip
ON_LIST = [o for o in ORDERS if o.status in ("active", "on-hold")]


def _shown_name(order: Order) -> str:
    return order.record_name or order.name


def insert_orders(archive: Archive, orders: list[Order]) -> dict[str, str]:
    """The orders as the index holds them (with their patients); accession -> Study UID."""
    uids: dict[str, str] = {}
    with archive.db.session() as session:
        patients: dict[str, Patient] = {}
        for order in orders:
            patient = patients.get(order.patient_id)
            if patient is None:
                patient = Patient(
                    patient_id=order.patient_id,
                    issuer_of_patient_id="",
                    patient_name=order.name,
                    patient_name_search=order.name.upper(),
                    patient_birth_date=order.birth,
                    patient_sex=order.sex,
                )
                if order.record_name:
                    patient.record_version = 1
                    patient.record_name = order.record_name
                    patient.record_name_search = order.record_name.upper()
                    patient.record_birth_date = order.birth
                    patient.record_sex = order.sex
                session.add(patient)
                session.flush()
                patients[order.patient_id] = patient
            uid = generate_uid()
            uids[order.accession] = uid
            number = order.accession[3:]
            session.add(
                ImagingOrder(
                    resource_id=f"sr-{order.accession.lower()}",
                    version=1,
                    status=order.status,
                    intent="order",
                    priority=order.priority,
                    patient_fk=patient.id,
                    accession_number=order.accession,
                    requested_procedure_id=f"RP{number}",
                    scheduled_procedure_step_id=f"SPS{number}",
                    study_instance_uid=uid,
                    procedure_scheme="http://loinc.org",
                    procedure_code="24627-2",
                    procedure_display=f"{order.modality} CHEST",
                    modality=order.modality,
                    scheduled_station_ae_title=order.station,
                    scheduled_station_name=f"ROOM {order.station}",
                    scheduled_start_date=order.date,
                    scheduled_start_time=order.time,
                    step_status="SCHEDULED",
                    requester="Practitioner/ref-1",
                    requesting_physician="HOUSE^GREGORY",
                    reason="cough",
                    document={
                        "resourceType": "ServiceRequest",
                        "id": f"sr-{order.accession.lower()}",
                        "status": order.status,
                        "intent": "order",
                        "subject": {"reference": f"Patient/{order.patient_id}"},
                        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]},
                    },
                )
            )
        session.commit()
    return uids


# --- the node ---------------------------------------------------------------------------------


@dataclass
class Node:
    archive: Archive
    server: DimseServer
    port: int
    uids: dict[str, str]


@contextlib.contextmanager
def running_node(backend: Backend, orders: list[Order], **overrides: Any) -> Iterator[Node]:
    settings = Settings(
        **{
            **backend.settings.model_dump(),
            "dimse_host": "127.0.0.1",
            "dimse_port": 0,
            "worker_in_serve": False,
            **overrides,
        }
    )
    archive = Archive(settings)
    server = DimseServer(archive, settings)
    try:
        uids = insert_orders(archive, orders)
        _, port = server.start()
        yield Node(archive, server, port, uids)
    finally:
        server.stop()
        archive.close()


@pytest.fixture
def node(make_backend: Any, pynetdicom_patched: None) -> Iterator[Node]:
    with running_node(make_backend("sqlite", "file"), ORDERS) as running:
        yield running


# --- DCMTK ------------------------------------------------------------------------------------

#: The return keys of DCMTK's example worklist query (wlistqry.dump) and what modalities ask.
RETURN_KEYS = [
    "SpecificCharacterSet",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
    "RequestedProcedurePriority",
    "ScheduledProcedureStepSequence[0].Modality",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
    "ScheduledProcedureStepSequence[0].ScheduledStationName",
]
SPS = "ScheduledProcedureStepSequence[0]"


def findscu_w(port: int, out: Path, keys: list[str], called: str = WL_AE) -> list[Dataset]:
    """``findscu -W`` with the return keys and ``keys`` (a key given twice: the last wins)."""
    tool = require_tool("findscu")
    out.mkdir(parents=True)
    wanted: dict[str, str] = {k: "" for k in RETURN_KEYS}
    for key in keys:
        name, _, value = key.partition("=")
        wanted[name] = value
    args = [tool, "-W", "-X", "-od", str(out), "-aet", "FINDSCU", "-aec", called]
    for name, value in wanted.items():
        args += ["-k", f"{name}={value}" if value else name]
    args += ["127.0.0.1", str(port)]
    result = subprocess.run(args, capture_output=True, timeout=60, check=False, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


_TOP = (
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
    "RequestedProcedurePriority",
    "ReferringPhysicianName",
)
_STEP = (
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ScheduledStationName",
    "ScheduledPerformingPhysicianName",
)


def normalised(responses: list[Dataset]) -> set[tuple[tuple[str, str], ...]]:
    """Each item as the values of its return keys (step keys from its step item)."""
    items = set()
    for ds in responses:
        values = [(k, str(ds.get(k, "") or "")) for k in _TOP]
        steps = ds.get("ScheduledProcedureStepSequence") or [Dataset()]
        assert len(steps) == 1
        values += [(k, str(steps[0].get(k, "") or "")) for k in _STEP]
        items.add(tuple(values))
    return items


def accessions(responses: list[Dataset]) -> set[str]:
    return {str(r.AccessionNumber) for r in responses}


def write_worklist_files(folder: Path, orders: list[Order], uids: dict[str, str]) -> None:
    """The orders as ``wlmscpfs`` worklist files (``*.wl`` in the AE-titled folder, with the
    ``lockfile`` it wants there)."""
    folder.mkdir(parents=True)
    (folder / "lockfile").touch()
    for order in orders:
        number = order.accession[3:]
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.AccessionNumber = order.accession
        ds.ReferringPhysicianName = "HOUSE^GREGORY"
        ds.PatientName = _shown_name(order)
        ds.PatientID = order.patient_id
        ds.PatientBirthDate = order.birth
        ds.PatientSex = order.sex
        ds.StudyInstanceUID = uids[order.accession]
        ds.RequestedProcedureDescription = f"{order.modality} CHEST"
        ds.RequestedProcedureID = f"RP{number}"
        ds.RequestedProcedurePriority = {"stat": "STAT", "urgent": "HIGH"}.get(
            order.priority, "ROUTINE"
        )
        step = Dataset()
        step.Modality = order.modality
        step.ScheduledStationAETitle = order.station
        step.ScheduledProcedureStepStartDate = order.date
        step.ScheduledProcedureStepStartTime = order.time
        step.ScheduledPerformingPhysicianName = ""
        step.ScheduledProcedureStepDescription = f"{order.modality} CHEST"
        step.ScheduledProcedureStepID = f"SPS{number}"
        step.ScheduledStationName = f"ROOM {order.station}"
        ds.ScheduledProcedureStepSequence = Sequence([step])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(folder / f"{order.accession}.wl", enforce_file_format=False)


@contextlib.contextmanager
def wlmscpfs(root: Path) -> Iterator[int]:
    tool = require_tool("wlmscpfs")
    port = free_port()
    log = (root / "wlmscpfs.log").open("w")
    proc = subprocess.Popen(
        [tool, "-s", "-dfp", str(root), str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, timeout=20, proc=proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


#: The same queries for both nodes (keys beyond the return keys).
DIFFERENTIAL_QUERIES: dict[str, list[str]] = {
    "universal": [],
    "station AE": [f"{SPS}.ScheduledStationAETitle=CT1"],
    "modality": [f"{SPS}.Modality=MR"],
    "date range": [f"{SPS}.ScheduledProcedureStepStartDate=20260110-20260111"],
    "open date range": [f"{SPS}.ScheduledProcedureStepStartDate=20260111-"],
    "single date": [f"{SPS}.ScheduledProcedureStepStartDate=20260112"],
    "time range": [f"{SPS}.ScheduledProcedureStepStartTime=1000-1500"],
    "date and time ranges": [
        f"{SPS}.ScheduledProcedureStepStartDate=20260110-20260111",
        f"{SPS}.ScheduledProcedureStepStartTime=1000-1500",
    ],
    "date and time, one date-time": [
        f"{SPS}.ScheduledProcedureStepStartDate=20260110-20260111",
        f"{SPS}.ScheduledProcedureStepStartTime=1000-0930",
    ],
    "date and open time range": [
        f"{SPS}.ScheduledProcedureStepStartDate=20260111-",
        f"{SPS}.ScheduledProcedureStepStartTime=1000-",
    ],
    "single date, time range": [
        f"{SPS}.ScheduledProcedureStepStartDate=20260110",
        f"{SPS}.ScheduledProcedureStepStartTime=0800-0900",
    ],
    "AE and date": [
        f"{SPS}.ScheduledStationAETitle=CT1",
        f"{SPS}.ScheduledProcedureStepStartDate=20260110",
    ],
    "patient name wildcard": ["PatientName=SMI*"],
    "patient name ?": ["PatientName=DOE^J?HN"],
    "record name": ["PatientName=NEWMAN*"],
    "accession": ["AccessionNumber=ACC4"],
    "patient id": ["PatientID=P1"],
    "requested procedure id": ["RequestedProcedureID=RP2"],
    "no match": ["PatientID=NOBODY"],
}


def test_findscu_worklist_answers_as_wlmscpfs(node: Node, tmp_path: Path):
    root = tmp_path / "wlmscpfs"
    write_worklist_files(root / WL_AE, ON_LIST, node.uids)
    with wlmscpfs(root) as reference_port:
        for n, (name, keys) in enumerate(DIFFERENTIAL_QUERIES.items()):
            ours = findscu_w(node.port, tmp_path / f"ours-{n}", keys, called="PACSBRIDGE")
            theirs = findscu_w(reference_port, tmp_path / f"theirs-{n}", keys)
            assert normalised(ours) == normalised(theirs), name
            assert len(ours) == len(theirs), name
    # And the answers are the orders the queries name (not two nodes agreeing on nothing).
    got = {
        name: accessions(findscu_w(node.port, tmp_path / f"check-{n}", keys, called="PACSBRIDGE"))
        for n, (name, keys) in enumerate(DIFFERENTIAL_QUERIES.items())
    }
    assert got["universal"] == {"ACC1", "ACC2", "ACC3", "ACC4", "ACC5"}  # not revoked, completed
    assert got["station AE"] == {"ACC1", "ACC3"}
    assert got["modality"] == {"ACC2"}
    assert got["date range"] == {"ACC1", "ACC2", "ACC3", "ACC4"}
    assert got["open date range"] == {"ACC3", "ACC4", "ACC5"}
    assert got["single date"] == {"ACC5"}
    assert got["time range"] == {"ACC2", "ACC3"}
    # Start date and time together: one date-time range, 2026-01-10 10:00 to 2026-01-11 15:00.
    assert got["date and time ranges"] == {"ACC2", "ACC3", "ACC4"}
    assert got["date and time, one date-time"] == {"ACC2", "ACC4"}
    assert got["date and open time range"] == {"ACC3", "ACC5"}
    assert got["single date, time range"] == {"ACC1"}
    assert got["AE and date"] == {"ACC1"}
    assert got["patient name wildcard"] == {"ACC2"}
    assert got["patient name ?"] == {"ACC1", "ACC4"}
    assert got["record name"] == {"ACC3"}
    assert got["accession"] == {"ACC4"}
    assert got["patient id"] == {"ACC1", "ACC4"}
    assert got["requested procedure id"] == {"ACC2"}
    assert got["no match"] == set()


def test_findscu_worklist_item_content(node: Node, tmp_path: Path):
    (item,) = findscu_w(
        node.port,
        tmp_path / "rsp",
        ["AccessionNumber=ACC3", "RequestedProcedureCodeSequence", "PatientWeight"],
        called="PACSBRIDGE",
    )
    assert str(item.PatientName) == "NEWMAN^PAUL"  # the EHR record's name, not the header's
    assert (item.PatientID, item.PatientBirthDate, item.PatientSex) == ("P3", "19900303", "O")
    assert item.StudyInstanceUID == node.uids["ACC3"]
    assert item.RequestedProcedurePriority == "STAT"
    assert item.RequestedProcedureID == "RP3"
    assert str(item.ReferringPhysicianName) == "HOUSE^GREGORY"
    (code,) = item.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "24627-2",
        "LN",
        "CT CHEST",
    )
    (step,) = item.ScheduledProcedureStepSequence
    assert (step.Modality, step.ScheduledStationAETitle) == ("CT", "CT1")
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == (
        "20260111",
        "101500",
    )
    assert step.ScheduledProcedureStepID == "SPS3"
    assert step.ScheduledStationName == "ROOM CT1"
    # Required return keys without a value, and a key the index does not hold: zero length.
    assert "ScheduledPerformingPhysicianName" in step
    assert step.ScheduledPerformingPhysicianName in ("", None)
    assert "PatientWeight" in item and item["PatientWeight"].is_empty


def test_pacsbridge_serve_answers_findscu_w(make_backend: Any, tmp_path: Path):
    """The node as ``pacsbridge serve`` runs it, its connections served by acceptor processes."""
    backend = make_backend("sqlite", "file", worker_in_serve=False)
    archive = Archive(backend.settings)
    try:
        uids = insert_orders(archive, ORDERS)
    finally:
        archive.close()
    server = start_server(backend, tmp_path, PACSBRIDGE_DIMSE_PROCESSES="2")
    try:
        for n in range(3):  # over more than one acceptor process
            found = findscu_w(
                server.dimse_port,
                tmp_path / f"rsp-{n}",
                [f"{SPS}.ScheduledStationAETitle=CT1", f"{SPS}.Modality=CT"],
                called=server.ae_title,
            )
            assert {(str(r.AccessionNumber), str(r.StudyInstanceUID)) for r in found} == {
                ("ACC1", uids["ACC1"]),
                ("ACC3", uids["ACC3"]),
            }
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# --- pynetdicom -------------------------------------------------------------------------------


def mwl_find(
    port: int, identifier: Dataset, ext_neg: list[Any] | None = None, calling: str = "MWLSCU"
) -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE", ext_neg=ext_neg)
    assert assoc.is_established
    try:
        return [
            (int(status.Status), found)
            for status, found in assoc.send_c_find(identifier, ModalityWorklistInformationFind)
        ]
    finally:
        assoc.release()


def step_query(**step_keys: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AccessionNumber = ""
    step = Dataset()
    step.Modality = ""
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = ""
    step.ScheduledProcedureStepStartTime = ""
    for keyword, value in step_keys.items():
        setattr(step, keyword, value)
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def pending(responses: list[tuple[int, Dataset | None]]) -> list[Dataset]:
    assert responses[-1][0] == 0x0000, hex(responses[-1][0])
    return [found for status, found in responses[:-1] if found is not None]


def test_pynetdicom_worklist_scu(node: Node):
    found = pending(mwl_find(node.port, step_query(Modality="CT", ScheduledStationAETitle="CT*")))
    assert accessions(found) == {"ACC1", "ACC3", "ACC4"}
    assert all(r.ScheduledProcedureStepSequence[0].Modality == "CT" for r in found)
    # In the order of their scheduled start.
    assert [r.AccessionNumber for r in found] == ["ACC1", "ACC4", "ACC3"]
    # Person names match case-insensitively by default; a step time range.
    query = step_query(ScheduledProcedureStepStartTime="0800-1030")
    query.PatientName = "doe^*"
    assert accessions(pending(mwl_find(node.port, query))) == {"ACC1", "ACC4"}
    # A list of modalities (CS value list).
    assert accessions(pending(mwl_find(node.port, step_query(Modality="MR\\US")))) == {
        "ACC2",
        "ACC5",
    }
    # Start date and time: one date-time range (2026-01-10 10:00 to 2026-01-11 15:00).
    ranges = {"ScheduledProcedureStepStartDate": "20260110-20260111"}
    ranges["ScheduledProcedureStepStartTime"] = "1000-1500"
    assert accessions(pending(mwl_find(node.port, step_query(**ranges)))) == {
        "ACC2",
        "ACC3",
        "ACC4",
    }


def test_extended_negotiation(node: Node):
    """SOP Class Extended Negotiation (PS3.4 K.5): relational queries do not apply; combined
    date-time matching is what the worklist does anyway (1); the rest is not supported."""
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = ModalityWorklistInformationFind
    item.service_class_application_information = b"\x01\x01\x01"
    ae = AE(ae_title="MWLSCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSBRIDGE", ext_neg=[item])
    assert assoc.is_established
    try:
        (reply,) = [
            i for i in assoc.acceptor.user_information if isinstance(i, SOPClassExtendedNegotiation)
        ]
        assert reply.service_class_application_information == b"\x00\x01\x00"
        query = step_query(
            ScheduledProcedureStepStartDate="20260110-20260111",
            ScheduledProcedureStepStartTime="1000-0930",
        )
        responses = [
            (int(s.Status), f) for s, f in assoc.send_c_find(query, ModalityWorklistInformationFind)
        ]
    finally:
        assoc.release()
    # 2026-01-10 10:00 to 2026-01-11 09:30: ACC2 (10th 14:00), ACC4 (11th 09:00).
    assert accessions(pending(responses)) == {"ACC2", "ACC4"}


def test_worklist_statuses(node: Node):
    # A matching value on a key whose matching is not supported: 0xFF01, the key ignored.
    query = step_query(Modality="US")
    query.PatientWeight = "70"
    responses = mwl_find(node.port, query)
    assert {status for status, _ in responses[:-1]} == {PENDING_UNSUPPORTED}
    assert accessions(pending(responses)) == {"ACC5"}
    # A sequence key with two items: 0xA900 (PS3.4 C.2.2.2.6).
    query = step_query(Modality="US")
    query.ScheduledProcedureStepSequence.append(Dataset())
    ((status, _),) = mwl_find(node.port, query)
    assert status == 0xA900
    # A value its VR cannot hold: 0xA900, naming the attribute.
    query = step_query(ScheduledProcedureStepStartDate="20261345")
    ae = AE(ae_title="MWLSCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSBRIDGE")
    try:
        ((failure, _),) = list(assoc.send_c_find(query, ModalityWorklistInformationFind))
        assert failure.Status == 0xA900
        assert "ScheduledProcedureStepStartDate" in failure.ErrorComment
    finally:
        assoc.release()


def test_worklist_over_the_match_limit_is_refused(make_backend: Any, pynetdicom_patched: None):
    """``query_max_matches`` holds for the worklist too: 0xA700 with no item sent."""
    with running_node(make_backend("sqlite", "file"), ORDERS, query_max_matches=2) as capped:
        ((status, _),) = mwl_find(capped.port, step_query())
        assert status == 0xA700
        assert accessions(pending(mwl_find(capped.port, step_query(Modality="MR")))) == {"ACC2"}


def test_non_ascii_names_and_character_sets(make_backend: Any, pynetdicom_patched: None):
    orders = [
        Order("ACC1", "P1", "MULLER^J", "19700101", "M", "CT", "CT1", "20260110", "083000",
              record_name="Müller^Jürgen"),
        Order("ACC2", "P2", "山田^太郎", "19800202", "M", "CT", "CT1", "20260110", "090000"),
    ]  # fmt: skip
    with running_node(make_backend("sqlite", "file"), orders) as running:
        # No character set asked: UTF-8 where a value needs it.
        found = pending(mwl_find(running.port, step_query()))
        names = {
            str(r.AccessionNumber): (str(r.PatientName), r.SpecificCharacterSet) for r in found
        }
        assert names == {
            "ACC1": ("Müller^Jürgen", "ISO_IR 192"),
            "ACC2": ("山田^太郎", "ISO_IR 192"),
        }
        # Latin-1 asked: kept where it holds the values, else UTF-8.
        query = step_query()
        query.SpecificCharacterSet = "ISO_IR 100"
        query.PatientName = "müller*"  # case-insensitive, beyond ASCII too
        (item,) = pending(mwl_find(running.port, query))
        assert (str(item.PatientName), item.SpecificCharacterSet) == ("Müller^Jürgen", "ISO_IR 100")
        query.PatientName = ""
        query.PatientID = "P2"
        (item,) = pending(mwl_find(running.port, query))
        assert (str(item.PatientName), item.SpecificCharacterSet) == ("山田^太郎", "ISO_IR 192")


def test_worklist_c_cancel(make_backend: Any, tmp_path: Path):
    """A C-CANCEL ends the responses with 0xFE00. The node runs as `pacsbridge serve` (its
    own process): in this process it would share the test's interpreter, and could send every
    response before the SCU's thread sends the cancel."""
    # Enough items that the server is still sending when the C-CANCEL arrives (the Q/R test
    # of tests/test_dimse_find.py counts the same way).
    many = [
        Order(f"ACC{100 + n}", f"P{n}", f"PATIENT^{n}", "19700101", "M", "CT", "CT1",
              "20260110", f"{n % 24:02d}0000")
        for n in range(4000)
    ]  # fmt: skip
    backend = make_backend("sqlite", "file")
    with contextlib.closing(Archive(backend.settings)) as archive:
        insert_orders(archive, many)
    server = start_server(backend, tmp_path)
    try:
        ae = AE(ae_title="MWLSCU")
        ae.add_requested_context(ModalityWorklistInformationFind)
        assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
        assert assoc.is_established
        try:
            statuses = []
            for status, _ in assoc.send_c_find(step_query(), ModalityWorklistInformationFind,
                                               msg_id=7):  # fmt: skip
                statuses.append(int(status.Status))
                if len(statuses) == 1:
                    assoc.send_c_cancel(7, query_model=ModalityWorklistInformationFind)
        finally:
            assoc.release()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert statuses[-1] == 0xFE00  # Matching terminated due to Cancel
    assert len(statuses) - 1 < 4000


def test_worklist_needs_the_find_permission_and_is_audited(
    make_backend: Any, pynetdicom_patched: None
):
    peers = {
        "modality": {
            "ae_title": "CTSCANNER",
            "host": "127.0.0.1",
            "port": 104,
            "permissions": ["echo", "store", "find"],
        },
        "storeonly": {
            "ae_title": "STOREONLY",
            "host": "127.0.0.1",
            "port": 104,
            "permissions": ["echo", "store"],
        },
    }
    backend = make_backend("sqlite", "file", dimse_query_from_any_ae=False, peers=peers)
    with running_node(backend, ORDERS) as running:
        query = step_query(Modality="CT", ScheduledStationAETitle="CT1")
        found = pending(mwl_find(running.port, query, calling="CTSCANNER"))
        assert accessions(found) == {"ACC1", "ACC3"}
        ((status, _),) = mwl_find(running.port, query, calling="STOREONLY")
        assert status == 0x0124  # Refused: Not Authorized
        ((status, _),) = mwl_find(running.port, query, calling="STRANGER")
        assert status == 0x0124
        assert running.archive.audit.flush()
        with running.archive.db.session() as session:
            rows = session.scalars(
                select(AuditEventRow).where(AuditEventRow.type_code == "110112")
            ).all()
            events = [(r.agent, r.entity, r.outcome, r.query or "") for r in rows]
    (event,) = events  # the refused requests never reached the service
    agent, entity, outcome, text = event
    assert (agent, entity, outcome) == ("ae:CTSCANNER", "C-FIND", 0)
    assert text.startswith(str(ModalityWorklistInformationFind))
    assert "ScheduledProcedureStepSequence.Modality=CT" in text
    assert "ScheduledProcedureStepSequence.ScheduledStationAETitle=CT1" in text


# --- the matcher, on both index backends ------------------------------------------------------


def _key(keyword: str, value: str | None = None, parent: int | None = None) -> Key:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None
    return Key(int(tag), str(dictionary_VR(tag)), value, parent)


def test_matcher_on_both_index_backends(index_backend: Backend):
    archive = Archive(index_backend.settings)
    try:
        insert_orders(archive, ORDERS)

        def search(*keys: Key, **kwargs: Any) -> list[str]:
            query = worklist_query([_key("AccessionNumber"), *keys], **kwargs)
            return [r["00080050"]["Value"][0] for r in find(archive.db, query)]

        step = _key("ScheduledProcedureStepSequence")
        assert search() == ["ACC1", "ACC2", "ACC4", "ACC3", "ACC5"]
        assert search(step, _key("Modality", "CT", STEP_SEQUENCE)) == ["ACC1", "ACC4", "ACC3"]
        assert search(_key("PatientName", "newman^paul")) == ["ACC3"]
        assert search(_key("PatientName", "newman^paul"), case_insensitive_pn=False) == []
        assert search(_key("PatientName", "OLD*")) == []  # the record's name is the name
        assert search(_key("RequestedProcedurePriority", "HIGH")) == ["ACC5"]
        assert search(_key("PatientBirthDate", "-19600101")) == ["ACC5"]
        date_time = [
            step,
            _key("ScheduledProcedureStepStartDate", "20260110-20260111", STEP_SEQUENCE),
            _key("ScheduledProcedureStepStartTime", "1000-0930", STEP_SEQUENCE),
        ]
        # One date-time range, negotiated or not (10:00 to 09:30 alone would hold no time).
        assert search(*date_time) == ["ACC2", "ACC4"]
        assert search(*date_time, combine_date_time=True) == ["ACC2", "ACC4"]
        time_only = [step, _key("ScheduledProcedureStepStartTime", "1000-0930", STEP_SEQUENCE)]
        assert search(*time_only) == []
        single_date = [
            step,
            _key("ScheduledProcedureStepStartDate", "20260111", STEP_SEQUENCE),
            _key("ScheduledProcedureStepStartTime", "09", STEP_SEQUENCE),
        ]
        assert search(*single_date) == ["ACC4"]
        assert search(_key("ScheduledPerformingPhysicianName", "HOUSE*", STEP_SEQUENCE)) == []
        assert search(limit=2, offset=1) == ["ACC2", "ACC4"]
        matches = find_worklist(
            archive.db, worklist_query([_key("StudyComments", "x"), _key("AccessionNumber")])
        )
        assert matches.unsupported
        assert len(list(matches.items)) == 5
        with pytest.raises(QueryError, match="AccessionNumber"):
            search(_key("AccessionNumber", "A" * 2000))
        with pytest.raises(QueryError, match="StudyInstanceUID"):
            search(_key("StudyInstanceUID", "1.2.*"))
        # An order leaving the worklist leaves the answers.
        with archive.db.session() as session:
            order = session.scalars(
                select(ImagingOrder).where(ImagingOrder.accession_number == "ACC1")
            ).one()
            order.status = "revoked"
            session.commit()
        assert "ACC1" not in search()
    finally:
        archive.close()


def test_worklist_queries_are_not_q_r_queries(index_backend: Backend):
    archive = Archive(index_backend.settings)
    try:
        from archive.query import find_matches

        with pytest.raises(QueryError, match="Modality Worklist"):
            find_matches(archive.db, worklist_query([_key("PatientID", "P1")]))
    finally:
        archive.close()
