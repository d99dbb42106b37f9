"""Modality Performed Procedure Step SCP (PS3.4 F.7) against a real `pacsbridge serve`.

A pynetdicom MPPS SCU (what a modality does) creates steps IN PROGRESS and sets them COMPLETED
or DISCONTINUED for orders placed over FHIR (ServiceRequest); the test reads the order rows,
the outbox events and the audit rows of the index, and the FHIR Procedure and ServiceRequest
over HTTP (every body validated with ``fhir.resources.R4B``). Then the refusals, each with its
DIMSE status: an unknown instance, a change after COMPLETED, a bad status, missing attributes,
a duplicate, a change of what N-SET may not change, and a declared peer without ``store``.
Steps are read back with N-GET (the Retrieve SOP Class, PS3.4 F.8).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityPerformedProcedureStepRetrieve,
)
from sqlalchemy import select

from archive.audit import AuditEventRow
from archive.orders import ImagingOrder, PerformedProcedureStep
from archive.outbox import OutboxEvent
from config import Settings
from tests.conftest import Backend, RunningServer, _backend, start_server
from tests.dicom_factory import ct_slice
from tests.fhir_support import FHIRValidator
from tests.test_fhir import INTERACTIONS, exercise, outcome

PATIENT_SYSTEM = "urn:pacsbridge:patient-id"
LOINC = "http://loinc.org"
ACSN = "http://terminology.hl7.org/CodeSystem/v2-0203"
MPPS = str(ModalityPerformedProcedureStep)
MPPS_RETRIEVE = str(ModalityPerformedProcedureStepRetrieve)
MODALITY_AE = "CT_MPPS"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


# --- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    assert checker.total > 0, "no FHIR response body was validated"
    assert checker.failures == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mpps")


@pytest.fixture(scope="module")
def backend(workdir: Path, request: pytest.FixtureRequest) -> Backend:
    return _backend("sqlite", "file", workdir, request)


@pytest.fixture(scope="module")
def server(backend: Backend, workdir: Path) -> Iterator[RunningServer]:
    running = start_server(
        backend,
        workdir,
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_DICOM_TIMEZONE="Europe/Berlin",
        # A declared modality that may only echo: it may not report steps either.
        PACSBRIDGE_PEERS=json.dumps(
            {"echo-only": {"ae_title": "ECHO_ONLY", "host": "127.0.0.1", "port": 11112,
                           "permissions": ["echo"]}}
        ),
    )  # fmt: skip
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log()[-3000:]


@pytest.fixture(scope="module")
def http(validator: FHIRValidator, server: RunningServer) -> Iterator[httpx.Client]:
    with validator.httpx_client(f"{server.http}/fhir") as client:
        yield client


# --- orders and steps ---------------------------------------------------------------------------


def place_order(
    http: httpx.Client,
    patient_id: str,
    *,
    code: str = "24725-4",
    display: str = "CT Head",
    modality: str = "CT",
) -> dict[str, Any]:
    """A Patient (when new) and an active ServiceRequest for it, over FHIR."""
    found = http.get("/Patient", params={"identifier": f"{PATIENT_SYSTEM}|{patient_id}"}).json()
    if found.get("total"):
        patient = found["entry"][0]["resource"]
    else:
        made = http.post(
            "/Patient",
            json={
                "resourceType": "Patient",
                "identifier": [{"system": PATIENT_SYSTEM, "value": patient_id}],
                "name": [{"family": "Modality", "given": ["Test"]}],
                "gender": "female",
                "birthDate": "1970-01-01",
            },
            headers=FHIR_JSON,
        )
        assert made.status_code == 201, made.text
        patient = made.json()
    order = http.post(
        "/ServiceRequest",
        json={
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "occurrenceDateTime": "2026-03-04T10:00:00+01:00",
            "performerType": {
                "coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                            "code": modality}]
            },
        },
        headers=FHIR_JSON,
    )  # fmt: skip
    assert order.status_code == 201, order.text
    return dict(order.json())


def accession_of(order: dict[str, Any]) -> str:
    for item in order["identifier"]:
        codes = [c["code"] for c in (item.get("type") or {}).get("coding", [])]
        if "ACSN" in codes:
            return str(item["value"])
    raise AssertionError(f"no accession number in {order['identifier']}")


def study_uid_of(order: dict[str, Any]) -> str:
    for item in order["identifier"]:
        if item.get("system") == "urn:dicom:uid":
            return str(item["value"]).removeprefix("urn:oid:")
    raise AssertionError(f"no Study Instance UID in {order['identifier']}")


def requested_procedure_of(order: dict[str, Any]) -> str:
    for item in order["identifier"]:
        if item.get("system") == "urn:pacsbridge:requested-procedure":
            return str(item["value"])
    raise AssertionError(f"no Requested Procedure ID in {order['identifier']}")


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def in_progress(
    *,
    patient_id: str,
    accession: str = "",
    study_uid: str | None = None,
    requested_procedure: str = "",
    pps_id: str = "PPS1",
    status: str = "IN PROGRESS",
) -> Dataset:
    """An N-CREATE Attribute List (PS3.4 Table F.7.2-1) as a modality sends it."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study_uid or generate_uid()
    scheduled.AccessionNumber = accession
    scheduled.RequestedProcedureID = requested_procedure
    scheduled.ScheduledProcedureStepID = ""
    scheduled.ScheduledProcedureStepDescription = ""
    scheduled.ReferencedStudySequence = Sequence([])
    ds.ScheduledStepAttributesSequence = Sequence([scheduled])
    ds.PatientName = "MODALITY^TEST"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.ReferencedPatientSequence = Sequence([])
    ds.PerformedProcedureStepID = pps_id
    ds.PerformedStationAETitle = MODALITY_AE
    ds.PerformedStationName = "CT ROOM 1"
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20260304"
    ds.PerformedProcedureStepStartTime = "101500"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = "CT head"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = Sequence([])
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = Sequence([])
    ds.PerformedSeriesSequence = Sequence([])
    return ds


def completed(series_uid: str, sop_uids: Iterable[str], *, status: str = "COMPLETED") -> Dataset:
    """An N-SET Modification List that ends the step (Final State attributes)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20260304"
    ds.PerformedProcedureStepEndTime = "103000"
    series = Dataset()
    series.PerformingPhysicianName = ""
    series.ProtocolName = "HEAD ROUTINE"
    series.OperatorsName = ""
    series.SeriesInstanceUID = series_uid
    series.SeriesDescription = "HEAD 5mm"
    series.RetrieveAETitle = ""
    images = []
    for uid in sop_uids:
        image = Dataset()
        image.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        image.ReferencedSOPInstanceUID = uid
        images.append(image)
    series.ReferencedImageSequence = Sequence(images)
    series.ReferencedNonImageCompositeSOPInstanceSequence = Sequence([])
    ds.PerformedSeriesSequence = Sequence([series])
    return ds


class Modality:
    """A pynetdicom MPPS SCU association; the N-CREATE responses' Affected SOP Instance UID is
    kept (pynetdicom's send_n_create returns only the status)."""

    def __init__(self, server: RunningServer, ae_title: str = MODALITY_AE) -> None:
        ae = AE(ae_title=ae_title)
        ae.add_requested_context(MPPS)
        ae.add_requested_context(MPPS_RETRIEVE)
        self.created: list[str] = []
        handlers: list[Any] = [(evt.EVT_DIMSE_RECV, self._received)]
        self.assoc: Association = ae.associate(
            "127.0.0.1", server.dimse_port, ae_title=server.ae_title, evt_handlers=handlers
        )
        assert self.assoc.is_established

    def _received(self, event: Any) -> None:
        command = event.message.command_set
        if "AffectedSOPInstanceUID" in command and command.CommandField == 0x8140:
            self.created.append(str(command.AffectedSOPInstanceUID))

    def create(self, ds: Dataset, uid: str | None) -> Dataset:
        status, _ = self.assoc.send_n_create(ds, MPPS, uid)
        return status

    def set(self, ds: Dataset, uid: str) -> Dataset:
        status, _ = self.assoc.send_n_set(ds, MPPS, uid)
        return status

    def get(
        self, uid: str, tags: list[int] | None = None, sop_class: str = MPPS_RETRIEVE
    ) -> tuple[Dataset, Dataset | None]:
        identifiers = [Tag(tag) for tag in tags or []]
        status, attributes = self.assoc.send_n_get(identifiers, sop_class, uid)
        return status, attributes

    def close(self) -> None:
        self.assoc.release()


def order_row(server: RunningServer, resource_id: str) -> ImagingOrder:
    with closing(server.archive()) as arc, arc.db.session() as session:
        row = session.scalars(
            select(ImagingOrder).where(ImagingOrder.resource_id == resource_id)
        ).one()
        session.expunge(row)
        return row


def step_row(server: RunningServer, uid: str) -> PerformedProcedureStep:
    with closing(server.archive()) as arc, arc.db.session() as session:
        row = session.scalars(
            select(PerformedProcedureStep).where(PerformedProcedureStep.sop_instance_uid == uid)
        ).one()
        session.expunge(row)
        return row


def order_events(server: RunningServer, resource_id: str) -> list[OutboxEvent]:
    with closing(server.archive()) as arc, arc.db.session() as session:
        rows = session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.resource == f"ServiceRequest/{resource_id}")
            .order_by(OutboxEvent.id)
        ).all()
        for row in rows:
            session.expunge(row)
        return list(rows)


def audit_rows(server: RunningServer, entity: str) -> list[AuditEventRow]:
    with closing(server.archive()) as arc, arc.db.session() as session:
        rows = session.scalars(
            select(AuditEventRow)
            .where(AuditEventRow.entity == entity, AuditEventRow.type_code == "110111")
            .order_by(AuditEventRow.id)
        ).all()
        for row in rows:
            session.expunge(row)
        return list(rows)


def wait_for(what: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# --- the tests ----------------------------------------------------------------------------------


def test_in_progress_then_completed_completes_the_order(
    server: RunningServer, http: httpx.Client
) -> None:
    in_progress_then_completed(server, http)


def test_in_progress_then_completed_on_postgresql(
    postgres_url: str, tmp_path: Path, validator: FHIRValidator
) -> None:
    backend = Backend(
        "postgresql",
        "file",
        Settings(data_dir=tmp_path / "data", database_url=postgres_url),
        {
            "PACSBRIDGE_DATA_DIR": str(tmp_path / "data"),
            "PACSBRIDGE_DATABASE_URL": postgres_url,
        },
    )
    running = start_server(
        backend,
        tmp_path,
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_DICOM_TIMEZONE="Europe/Berlin",
    )
    try:
        with validator.httpx_client(f"{running.http}/fhir") as pg:
            in_progress_then_completed(running, pg)
    finally:
        assert running.stop() == 0, running.log()[-3000:]


def in_progress_then_completed(server: RunningServer, http: httpx.Client) -> None:
    """N-CREATE IN PROGRESS, N-SET COMPLETED for an order placed over FHIR: the order, the
    step, the FHIR Procedure and ServiceRequest, the events and the audit."""
    order = place_order(http, "MPPS-1")
    patient = order["subject"]["reference"]
    accession, study_uid = accession_of(order), study_uid_of(order)
    modality = Modality(server)
    try:
        uid = generate_uid()
        ds = in_progress(
            patient_id="MPPS-1",
            accession=accession,
            study_uid=study_uid,
            requested_procedure=requested_procedure_of(order),
        )
        assert modality.create(ds, uid).Status == 0x0000

        row = order_row(server, order["id"])
        assert (row.status, row.step_status) == ("active", "STARTED")
        step = step_row(server, uid)
        assert (step.status, step.order_fk, step.accession_number) == (
            "IN PROGRESS",
            row.id,
            accession,
        )
        assert step.dataset["00400252"]["Value"] == ["IN PROGRESS"]
        assert f"Patient/{step.patient_fk}" == patient
        procedure = http.get(f"/Procedure/{uid}").json()
        assert procedure["status"] == "in-progress"
        assert procedure["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
        assert procedure["subject"] == {"reference": patient}
        assert procedure["performedPeriod"] == {"start": "2026-03-04T10:15:00+01:00"}
        assert procedure["code"]["coding"][0] == {
            "system": LOINC,
            "code": "24725-4",
            "display": "CT Head",
        }
        assert procedure["meta"]["versionId"] == "1"

        series_uid, sops = generate_uid(), [generate_uid(), generate_uid()]
        ended = completed(series_uid, sops)
        ended.ProcedureCodeSequence = Sequence([code_item("24725-4", "LN", "CT Head")])
        assert modality.set(ended, uid).Status == 0x0000
    finally:
        modality.close()

    assert http.get(f"/ServiceRequest/{order['id']}").json()["status"] == "completed"
    row = order_row(server, order["id"])
    assert (row.status, row.step_status) == ("completed", "COMPLETED")
    step = step_row(server, uid)
    assert (step.status, step.version, step.end_date, step.end_time) == (
        "COMPLETED",
        2,
        "20260304",
        "103000",
    )
    # N-CREATE's attributes with the N-SET's applied.
    assert step.dataset["00400254"]["Value"] == ["CT head"]
    (series,) = step.dataset["00400340"]["Value"]
    assert series["0020000E"]["Value"] == [series_uid]
    procedure = http.get(f"/Procedure/{uid}").json()
    assert procedure["status"] == "completed"
    assert procedure["performedPeriod"] == {
        "start": "2026-03-04T10:15:00+01:00",
        "end": "2026-03-04T10:30:00+01:00",
    }
    assert procedure["meta"]["versionId"] == "2"
    assert procedure["performer"][0]["actor"]["identifier"]["value"] == MODALITY_AE

    # Searches: based-on, status, patient, date; outside the period nothing.
    for params in (
        {"based-on": f"ServiceRequest/{order['id']}"},
        {"status": "completed", "patient": patient},
        {"date": "2026-03-04", "subject": patient},
        {"_id": uid},
    ):
        bundle = http.get("/Procedure", params=params).json()
        assert [e["resource"]["id"] for e in bundle["entry"]] == [uid], params
    assert http.get("/Procedure", params={"date": "2026-03-05", "_id": uid}).json()["total"] == 0
    assert http.get("/Procedure", params={"status": "stopped", "_id": uid}).json()["total"] == 0
    included = http.get("/Procedure", params={"_id": uid, "_include": "Procedure:based-on"}).json()
    assert {e["resource"]["resourceType"] for e in included["entry"]} == {
        "Procedure",
        "ServiceRequest",
    }

    events = order_events(server, order["id"])
    assert [e.type for e in events] == ["order.scheduled", "order.in-progress", "order.completed"]
    assert {e.study_instance_uid for e in events} == {study_uid}
    assert events[-1].data["status"] == "completed"

    audits = audit_rows(server, f"Procedure/{uid}")
    assert [(a.action, a.outcome, a.agent, a.source) for a in audits] == [
        ("C", 0, f"ae:{MODALITY_AE}", "dimse"),
        ("U", 0, f"ae:{MODALITY_AE}", "dimse"),
    ]
    assert {a.patient_id for a in audits} == {"MPPS-1"}
    assert {a.study_uid for a in audits} == {study_uid}


def test_a_step_that_performs_two_orders_moves_both(
    server: RunningServer, http: httpx.Client
) -> None:
    """IHE RAD SWF group case: one acquisition for two Requested Procedures, one item each in
    the Scheduled Step Attributes Sequence, in a study of the modality's own. Both orders
    start and complete; the first named (placed last here) takes the study's UID; the
    Procedure and the ImagingStudy are based on both, the first named first."""
    head = place_order(http, "MPPS-6")
    chest = place_order(http, "MPPS-6", code="24627-2", display="CT Chest")
    study = generate_uid()  # the modality's own
    modality = Modality(server)
    try:
        uid = generate_uid()
        ds = in_progress(patient_id="MPPS-6", accession=accession_of(chest), study_uid=study)
        second = Dataset()
        second.StudyInstanceUID = study  # one study for both
        second.AccessionNumber = accession_of(head)
        second.RequestedProcedureID = requested_procedure_of(head)
        second.ScheduledProcedureStepID = ""
        second.ScheduledProcedureStepDescription = ""
        second.ReferencedStudySequence = Sequence([])
        ds.ScheduledStepAttributesSequence.append(second)
        assert modality.create(ds, uid).Status == 0x0000
        for order in (head, chest):
            row = order_row(server, order["id"])
            assert (row.status, row.step_status) == ("active", "STARTED"), order["id"]
        # The study is the first named order's now; the other keeps its pre-assigned UID.
        assert order_row(server, chest["id"]).study_instance_uid == study
        assert order_row(server, head["id"]).study_instance_uid == study_uid_of(head)
        procedure = http.get(f"/Procedure/{uid}").json()
        assert procedure["basedOn"] == [
            {"reference": f"ServiceRequest/{chest['id']}"},
            {"reference": f"ServiceRequest/{head['id']}"},
        ]
        found = http.get("/Procedure", params={"based-on": f"ServiceRequest/{head['id']}"})
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [uid]
        # The images of the one study: the ImagingStudy is based on both orders too.
        image = ct_slice(study_uid=study, series_uid=generate_uid(), index=0)
        image.PatientID = "MPPS-6"
        images = AE(ae_title=MODALITY_AE)
        images.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        stored = images.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
        try:
            assert stored.send_c_store(image).Status == 0x0000
        finally:
            stored.release()
        imaging = http.get(f"/ImagingStudy/{study}").json()
        assert imaging["basedOn"] == procedure["basedOn"]

        assert modality.set(completed(generate_uid(), [generate_uid()]), uid).Status == 0
    finally:
        modality.close()
    for order in (head, chest):
        assert http.get(f"/ServiceRequest/{order['id']}").json()["status"] == "completed"
        assert [e.type for e in order_events(server, order["id"])] == [
            "order.scheduled",
            "order.in-progress",
            "order.completed",
        ]
    assert step_row(server, uid).order_fk == order_row(server, chest["id"]).id


def test_discontinued_step_leaves_the_order_on_the_worklist(
    server: RunningServer, http: httpx.Client
) -> None:
    order = place_order(http, "MPPS-2", code="24627-2", display="CT Chest")
    modality = Modality(server)
    try:
        # No SOP Instance UID from the modality: the SCP assigns one (PS3.4 F.7.2.1.2).
        ds = in_progress(patient_id="MPPS-2", accession=accession_of(order))
        assert modality.create(ds, None).Status == 0x0000
        (uid,) = modality.created
        assert uid.startswith("2.25.")
        ended = completed(generate_uid(), [], status="DISCONTINUED")
        ended.PerformedSeriesSequence = Sequence([])
        ended.PerformedProcedureStepDiscontinuationReasonCodeSequence = Sequence(
            [code_item("110514", "DCM", "Incorrect worklist entry selected")]
        )
        assert modality.set(ended, uid).Status == 0x0000
    finally:
        modality.close()
    row = order_row(server, order["id"])
    assert (row.status, row.step_status) == ("active", "DISCONTINUED")
    # The modality chose another Study Instance UID: the order follows it.
    assert row.study_instance_uid == str(ds.ScheduledStepAttributesSequence[0].StudyInstanceUID)
    procedure = http.get(f"/Procedure/{uid}").json()
    assert procedure["status"] == "stopped"
    assert procedure["statusReason"]["text"] == "Incorrect worklist entry selected"
    assert procedure["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
    assert http.get(f"/ServiceRequest/{order['id']}").json()["status"] == "active"
    assert [e.type for e in order_events(server, order["id"])] == [
        "order.scheduled",
        "order.in-progress",
        "order.discontinued",
    ]
    assert step_row(server, uid).discontinuation_reason == "Incorrect worklist entry selected"


def test_unscheduled_step_is_kept_without_an_order(
    server: RunningServer, http: httpx.Client
) -> None:
    modality = Modality(server)
    try:
        uid = generate_uid()
        ds = in_progress(patient_id="WALK-IN-1", accession="NO-SUCH-ORDER")
        assert modality.create(ds, uid).Status == 0x0000
    finally:
        modality.close()
    step = step_row(server, uid)
    assert (step.order_fk, step.patient_fk) == (None, None)
    procedure = http.get(f"/Procedure/{uid}").json()
    assert "basedOn" not in procedure
    assert procedure["subject"] == {
        "identifier": {"value": "WALK-IN-1"},
        "display": "TEST MODALITY",
    }
    assert procedure["status"] == "in-progress"


def test_refusals_answer_their_dimse_status(server: RunningServer, http: httpx.Client) -> None:
    order = place_order(http, "MPPS-3")
    modality = Modality(server)
    try:
        unknown = generate_uid()
        status = modality.set(completed(generate_uid(), []), unknown)
        assert status.Status == 0x0112  # No Such Object Instance

        bad = in_progress(patient_id="MPPS-3", accession=accession_of(order), status="COMPLETED")
        status = modality.create(bad, generate_uid())
        assert status.Status == 0x0106  # Invalid Attribute Value: not created IN PROGRESS
        assert "IN PROGRESS" in status.ErrorComment

        missing = in_progress(patient_id="MPPS-3", accession=accession_of(order))
        del missing.Modality
        status = modality.create(missing, generate_uid())
        assert status.Status == 0x0120  # Missing Attribute
        assert "(0008,0060)" in status.ErrorComment

        uid = generate_uid()
        good = in_progress(patient_id="MPPS-3", accession=accession_of(order))
        assert modality.create(good, uid).Status == 0x0000
        assert modality.create(good, uid).Status == 0x0111  # Duplicate SOP Instance

        status = modality.set(completed(generate_uid(), [], status="DONE"), uid)
        assert status.Status == 0x0106

        changed = Dataset()
        changed.PatientID = "SOMEONE-ELSE"
        status = modality.set(changed, uid)
        assert status.Status == 0x0106
        assert "(0010,0020)" in status.ErrorComment
        same = Dataset()
        same.PatientID = "MPPS-3"  # repeating a value N-SET may not change is accepted
        assert modality.set(same, uid).Status == 0x0000

        # COMPLETED without the Final State attributes (Table F.7.2-1): the series.
        unfinished = completed(generate_uid(), [])
        unfinished.PerformedSeriesSequence = Sequence([])
        status = modality.set(unfinished, uid)
        assert status.Status == 0x0121  # Missing Attribute Value
        tags = status.AttributeIdentifierList
        assert [int(t) for t in (tags if isinstance(tags, list) else [tags])] == [0x00400340]
        assert step_row(server, uid).status == "IN PROGRESS"

        assert modality.set(completed(generate_uid(), [generate_uid()]), uid).Status == 0
        # PS3.4 F.7.2.2.2: a final step may no longer be updated.
        status = modality.set(completed(generate_uid(), [generate_uid()]), uid)
        assert status.Status == 0x0110
        assert status.ErrorID == 0xA710
        assert status.ErrorComment == "Performed Procedure Step Object may no longer be updated"
    finally:
        modality.close()
    assert step_row(server, uid).version == 3  # create, the repeated Patient ID, COMPLETED

    refused = wait_for(
        lambda: [a for a in audit_rows(server, f"Procedure/{uid}") if a.outcome == 4]
    )
    # The duplicate N-CREATE (C) and the refused N-SETs (U), with why.
    assert {a.action for a in refused} == {"C", "U"}
    assert any("may no longer be updated" in (a.outcome_text or "") for a in refused)


def test_a_peer_without_store_may_not_report_steps(server: RunningServer) -> None:
    modality = Modality(server, ae_title="ECHO_ONLY")
    try:
        status = modality.create(in_progress(patient_id="MPPS-4"), generate_uid())
        assert status.Status == 0x0124  # Refused: Not Authorized
        assert "store" in status.ErrorComment
        status = modality.set(completed(generate_uid(), []), generate_uid())
        assert status.Status == 0x0124
    finally:
        modality.close()
    with closing(server.archive()) as arc, arc.db.session() as session:
        assert (
            session.scalars(
                select(PerformedProcedureStep).where(
                    PerformedProcedureStep.calling_ae_title == "ECHO_ONLY"
                )
            ).all()
            == []
        )


def test_steps_are_read_back_with_n_get(server: RunningServer, http: httpx.Client) -> None:
    """N-GET of the Retrieve SOP Class (PS3.4 F.8.2.1): the attributes asked for, as the step
    holds them after each N-SET, in the step's character set; all of them when none are
    named; 0112H for an unknown step; N-CREATE is not an operation of the Retrieve class."""
    order = place_order(http, "MPPS-5")
    modality = Modality(server)
    try:
        uid = generate_uid()
        ds = in_progress(patient_id="MPPS-5", accession=accession_of(order))
        ds.PatientName = "Müller^Jürgen"  # ISO_IR 100 (Latin-1)
        assert modality.create(ds, uid).Status == 0x0000
        change = Dataset()
        change.PerformedProcedureStepDescription = "CT head, contrast"
        assert modality.set(change, uid).Status == 0x0000

        asked = [0x00100010, 0x00400252, 0x00400254, 0x00400270, 0x00081030]
        status, got = modality.get(uid, asked)
        assert status.Status == 0x0000
        assert got is not None
        # What was asked and the step holds (not Study Description), and the character set.
        assert sorted(int(e.tag) for e in got) == [
            0x00080005,
            0x00100010,
            0x00400252,
            0x00400254,
            0x00400270,
        ]
        assert got.SpecificCharacterSet == "ISO_IR 100"
        assert str(got.PatientName) == "Müller^Jürgen"
        assert got.PerformedProcedureStepStatus == "IN PROGRESS"
        assert got.PerformedProcedureStepDescription == "CT head, contrast"
        assert got.ScheduledStepAttributesSequence[0].AccessionNumber == accession_of(order)

        assert modality.set(completed(generate_uid(), [generate_uid()]), uid).Status == 0
        status, every = modality.get(uid)
        assert status.Status == 0x0000
        assert every is not None
        assert every.PerformedProcedureStepStatus == "COMPLETED"
        assert every.PerformedStationAETitle == MODALITY_AE
        assert every.PerformedProcedureStepEndTime == "103000"
        assert len(every.PerformedSeriesSequence) == 1

        # F.8.2: an N-GET names the Retrieve SOP Class, not the MPPS SOP Class.
        status, same = modality.get(uid, [0x00400252], sop_class=MPPS)
        assert status.Status == 0x0211  # Unrecognized Operation
        assert same is None

        # Japanese names in UTF-8, then an N-SET in Latin-1: the step's character set is now
        # Latin-1, which cannot hold the names; the reply is in ISO_IR 192 and both read back.
        other = generate_uid()
        japanese = in_progress(patient_id="MPPS-5", accession=accession_of(order))
        japanese.SpecificCharacterSet = "ISO_IR 192"
        japanese.PatientName = "山田^太郎"
        assert modality.create(japanese, other).Status == 0x0000
        latin = Dataset()
        latin.SpecificCharacterSet = "ISO_IR 100"
        latin.PerformedProcedureStepDescription = "Schädel"
        assert modality.set(latin, other).Status == 0x0000
        status, mixed = modality.get(other, [0x00100010, 0x00400254])
        assert status.Status == 0x0000 and mixed is not None
        assert mixed.SpecificCharacterSet == "ISO_IR 192"
        assert (str(mixed.PatientName), mixed.PerformedProcedureStepDescription) == (
            "山田^太郎",
            "Schädel",
        )

        status, nothing = modality.get(generate_uid(), [0x00400252])
        assert status.Status == 0x0112  # No Such Object Instance
        assert nothing is None

        status, _ = modality.assoc.send_n_create(in_progress(patient_id="MPPS-5"), MPPS_RETRIEVE)
        assert status.Status == 0x0211  # Unrecognized Operation
    finally:
        modality.close()

    reads = wait_for(lambda: [a for a in audit_rows(server, f"Procedure/{uid}") if a.action == "R"])
    study = step_row(server, uid).study_instance_uid
    # Two reads; the N-GET of the MPPS SOP Class refused (minor failure).
    assert [(a.outcome, a.agent, a.patient_id, a.study_uid) for a in reads] == [
        (0, f"ae:{MODALITY_AE}", "MPPS-5", study),
        (0, f"ae:{MODALITY_AE}", "MPPS-5", study),
        (4, f"ae:{MODALITY_AE}", None, None),
    ]

    # A declared peer without ``find`` may not read steps.
    echo_only = Modality(server, ae_title="ECHO_ONLY")
    try:
        status, attributes = echo_only.get(uid, [0x00400252])
        assert status.Status == 0x0124  # Refused: Not Authorized
        assert "find" in status.ErrorComment
        assert attributes is None
    finally:
        echo_only.close()


def test_procedure_interactions_are_those_the_statement_declares(
    server: RunningServer, http: httpx.Client
) -> None:
    """read, vread and search work; the others answer 405 with an OperationOutcome."""
    modality = Modality(server)
    try:
        uid = generate_uid()
        assert modality.create(in_progress(patient_id="MPPS-5"), uid).Status == 0x0000
    finally:
        modality.close()
    statement = http.get("/metadata").json()
    (declared,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Procedure"]
    codes = {i["code"] for i in declared["interaction"]}
    assert codes == {"read", "vread", "search-type"}
    assert {p["name"] for p in declared["searchParam"]} >= {
        "_id",
        "patient",
        "subject",
        "status",
        "based-on",
        "date",
    }
    for interaction in INTERACTIONS:
        response = exercise(http, interaction, "Procedure", uid, "1")
        if interaction in codes:
            assert response.status_code == 200, (interaction, response.text)
        else:
            outcome(response, 405, "not-supported")
    outcome(http.get(f"/Procedure/{uid}/_history/2"), 404, "not-found")
    outcome(http.get(f"/Procedure/{generate_uid()}"), 404, "not-found")
