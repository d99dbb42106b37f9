"""The radiology loop with real peers, against a real `pacsbridge serve` with charge capture on.

An order placed with fhirpy (ServiceRequest) is on the Modality Worklist that DCMTK
``findscu -W`` reads; a modality simulated with pynetdicom takes the worklist item, reports MPPS
IN PROGRESS, sends its CT images (with the worklist's Accession Number, Study Instance UID and
Requested Procedure ID) and reports MPPS COMPLETED. Then: the ServiceRequest is ``completed``,
the ImagingStudy's and the report's ``basedOn`` point to it, the Procedure of the step too, and
once the study is stable its technical charge carries the ordered procedure code (the images
carry none: without the order it would be priced by modality and body part). A cancelled order
leaves the worklist. Every FHIR body is validated with ``fhir.resources.R4B``.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from billing.models import ChargeItem
from tests.conftest import Backend, RunningServer, _backend, require_tool, start_server
from tests.dicom_factory import ct_slice
from tests.fhir_support import FHIRValidator
from tests.test_fhir_billing import SAMPLE, captures_done, run_cli, wait_until
from tests.test_mpps import MPPS, completed, in_progress, order_events, order_row, step_row

pytestmark = pytest.mark.dcmtk

PATIENT_SYSTEM = "urn:pacsbridge:patient-id"
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
STATION = "CT_FLOW"
WEDNESDAY = "20260304"


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    assert checker.total > 0, "no FHIR response body was validated"
    assert checker.failures == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("order-flow")


@pytest.fixture(scope="module")
def backend(workdir: Path, request: pytest.FixtureRequest) -> Backend:
    return _backend("sqlite", "file", workdir, request)


@pytest.fixture(scope="module")
def server(backend: Backend, workdir: Path) -> Iterator[RunningServer]:
    loaded = run_cli(backend, workdir, "billing", "prices", "load", str(SAMPLE))
    assert loaded.returncode == 0, loaded.stderr
    running = start_server(
        backend,
        workdir,
        PACSBRIDGE_STABLE_AGE="1",
        PACSBRIDGE_STABLE_SCAN_INTERVAL="0.2",
        PACSBRIDGE_WORKER_POLL_INTERVAL="0.1",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_DICOM_TIMEZONE="Europe/Berlin",
        PACSBRIDGE_BILLING=json.dumps({"enabled": True}),
    )
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log()[-3000:]


@pytest.fixture(scope="module")
def fhirpy(validator: FHIRValidator, server: RunningServer) -> Any:
    return validator.fhirpy_sync(f"{server.http}/fhir")


# --- the EHR, the worklist and the modality -------------------------------------------------------


def order(fhirpy: Any, patient: str, code: str, display: str) -> Any:
    request = fhirpy.resource(
        "ServiceRequest",
        status="active",
        intent="order",
        priority="routine",
        code={"coding": [{"system": LOINC, "code": code, "display": display}]},
        subject={"reference": f"Patient/{patient}"},
        occurrenceDateTime="2026-03-04T10:00:00+01:00",
        performerType={"coding": [{"system": DCM, "code": "CT"}]},
        performer=[
            {
                "reference": "Device/ct-flow",
                "identifier": {"system": "urn:pacsbridge:ae-title", "value": STATION},
                "display": "CT flow room",
            }
        ],
        reasonCode=[{"text": "headache"}],
    )
    request.save()
    return request


def flow_patient(
    fhirpy: Any, value: str, given: str, *, gender: str | None = None, birth_date: str | None = None
) -> Any:
    """A Patient of the EHR, created over FHIR (Patient ID ``value``, family name Flow)."""
    fields: dict[str, Any] = {
        "identifier": [{"system": PATIENT_SYSTEM, "value": value}],
        "name": [{"family": "Flow", "given": [given]}],
    }
    if gender:
        fields["gender"] = gender
    if birth_date:
        fields["birthDate"] = birth_date
    patient = fhirpy.resource("Patient", **fields)
    patient.save()
    return patient


def worklist(server: RunningServer, out: Path) -> list[Dataset]:
    """``findscu -W`` for today's CT station's scheduled steps: the items as data sets."""
    tool = require_tool("findscu")
    out.mkdir(parents=True, exist_ok=True)
    keys = [
        f"ScheduledProcedureStepSequence[0].ScheduledStationAETitle={STATION}",
        "ScheduledProcedureStepSequence[0].Modality=CT",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20260304",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
        "AccessionNumber",
        "StudyInstanceUID",
        "RequestedProcedureID",
        "RequestedProcedureCodeSequence",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
    ]
    args = [tool, "-W", "-X", "-od", str(out), "-aec", server.ae_title]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(server.dimse_port)]
    result = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def images(item: Dataset, count: int) -> tuple[str, list[Dataset]]:
    """The modality's CT series for a worklist item (no procedure code of its own)."""
    series_uid = generate_uid()
    request = Dataset()
    request.RequestedProcedureID = item.RequestedProcedureID
    request.AccessionNumber = item.AccessionNumber
    request.ScheduledProcedureStepID = item.ScheduledProcedureStepSequence[
        0
    ].ScheduledProcedureStepID
    slices = []
    for index in range(count):
        ds = ct_slice(
            study_uid=str(item.StudyInstanceUID),
            series_uid=series_uid,
            index=index,
            size=8,
            patient_id=str(item.PatientID),
            patient_name=str(item.PatientName),
            study_date=WEDNESDAY,
        )
        ds.StudyTime, ds.Modality, ds.BodyPartExamined = "101500", "CT", "HEAD"
        ds.AccessionNumber = item.AccessionNumber
        ds.RequestAttributesSequence = Sequence([request])
        slices.append(ds)
    return series_uid, slices


def perform(server: RunningServer, item: Dataset, *also: Dataset) -> tuple[str, str]:
    """MPPS IN PROGRESS, the images, MPPS COMPLETED over one association (a modality's day):
    (the step's SOP Instance UID, the series UID). ``also``: more worklist items the same
    step performs, in ``item``'s study (the IHE SWF group case)."""
    ae = AE(ae_title=STATION)
    ae.add_requested_context(MPPS)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        step = generate_uid()
        started = in_progress(
            patient_id=str(item.PatientID),
            accession=str(item.AccessionNumber),
            study_uid=str(item.StudyInstanceUID),
            requested_procedure=str(item.RequestedProcedureID),
        )
        started.ScheduledStepAttributesSequence[
            0
        ].ScheduledProcedureStepID = item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
        started.PatientName = item.PatientName
        for other in also:
            grouped = Dataset()
            grouped.StudyInstanceUID = item.StudyInstanceUID
            grouped.AccessionNumber = other.AccessionNumber
            grouped.RequestedProcedureID = other.RequestedProcedureID
            grouped.ScheduledProcedureStepID = other.ScheduledProcedureStepSequence[
                0
            ].ScheduledProcedureStepID
            started.ScheduledStepAttributesSequence.append(grouped)
        status, _ = assoc.send_n_create(started, MPPS, step)
        assert status.Status == 0x0000
        series_uid, slices = images(item, 3)
        for ds in slices:
            assert assoc.send_c_store(ds).Status == 0x0000
        ended = completed(series_uid, [str(ds.SOPInstanceUID) for ds in slices])
        status, _ = assoc.send_n_set(ended, MPPS, step)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    return step, series_uid


def sign_report(fhirpy: Any, patient: str, study: str, conclusion: str) -> Any:
    """A final DiagnosticReport of the study, signed by Rad^Rita (stored as a VERIFIED SR)."""
    report = fhirpy.resource(
        "DiagnosticReport",
        status="final",
        code={"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging"}]},
        subject={"reference": f"Patient/{patient}"},
        imagingStudy=[{"reference": f"ImagingStudy/{study}"}],
        conclusion=conclusion,
        resultsInterpreter=[{"display": "Rad^Rita"}],
        presentedForm=[
            {"contentType": "text/plain", "data": base64.b64encode(conclusion.encode()).decode()}
        ],
    )
    report.save()
    return report


# --- the loop ---------------------------------------------------------------------------------


def test_order_to_worklist_to_mpps_images_and_charge(
    server: RunningServer, fhirpy: Any, workdir: Path
) -> None:
    patient = flow_patient(fhirpy, "FLOW-1", "Olivia", gender="female", birth_date="1970-01-01")
    placed = order(fhirpy, patient.id, "24725-4", "CT Head")

    (item,) = worklist(server, workdir / "wl-1")
    accession = next(
        i["value"]
        for i in placed.serialize()["identifier"]
        if any(c.get("code") == "ACSN" for c in (i.get("type") or {}).get("coding", []))
    )
    assert str(item.AccessionNumber) == accession
    assert str(item.PatientID) == "FLOW-1"
    assert str(item.StudyInstanceUID) == order_row(server, placed.id).study_instance_uid
    assert item.RequestedProcedureCodeSequence[0].CodeValue == "24725-4"

    step, series_uid = perform(server, item)
    study = str(item.StudyInstanceUID)

    served = fhirpy.reference("ServiceRequest", placed.id).to_resource()
    assert served.status == "completed"
    assert order_row(server, placed.id).step_status == "COMPLETED"
    assert step_row(server, step).status == "COMPLETED"
    # The completed step is off the worklist.
    assert worklist(server, workdir / "wl-2") == []

    imaging = fhirpy.reference("ImagingStudy", study).to_resource().serialize()
    assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{placed.id}"}]
    assert imaging["series"][0]["uid"] == series_uid
    procedure = fhirpy.reference("Procedure", step).to_resource().serialize()
    assert procedure["basedOn"] == [{"reference": f"ServiceRequest/{placed.id}"}]
    assert procedure["status"] == "completed"
    found = fhirpy.resources("ImagingStudy").search(patient=f"Patient/{patient.id}").fetch_all()
    assert [s.serialize()["basedOn"] for s in found] == [
        [{"reference": f"ServiceRequest/{placed.id}"}]
    ]

    # Stable: the technical charge carries the ordered code (the images carry none).
    wait_until(lambda: captures_done(server, study) >= 1, server)
    with closing(server.archive()) as arc, arc.db.session() as session:
        charges = session.scalars(
            select(ChargeItem).where(
                ChargeItem.study_instance_uid == study, ChargeItem.kind == "technical"
            )
        ).all()
        assert [(c.code_system, c.code, c.display, c.status) for c in charges] == [
            ("loinc", "24725-4", "CT Head", "billable")
        ]
        assert str(charges[0].net) == "180.00"
        assert charges[0].idempotency_key == f"technical|{study}|loinc:24725-4"

    # The report of the study points to the order too.
    report = sign_report(fhirpy, patient.id, study, "No haemorrhage.")
    written = fhirpy.reference("DiagnosticReport", report.id).to_resource().serialize()
    assert written["basedOn"] == [{"reference": f"ServiceRequest/{placed.id}"}]

    # The signed report's reading is charged as the ordered procedure's (the price list prices
    # "CT Head report" for its code; the images carry no code of their own).
    def professional() -> list[ChargeItem]:
        with closing(server.archive()) as arc, arc.db.session() as session:
            return list(
                session.scalars(
                    select(ChargeItem).where(
                        ChargeItem.study_instance_uid == study, ChargeItem.kind == "professional"
                    )
                ).all()
            )

    (reading,) = wait_until(professional, server)
    assert (reading.code_system, reading.code, reading.status) == ("loinc", "24725-4", "billable")
    assert (str(reading.net), reading.performer) == ("60.00", "Rad^Rita")


def test_images_tied_by_requested_procedure_id_at_stable_time(
    server: RunningServer, fhirpy: Any, workdir: Path
) -> None:
    """A modality without MPPS that makes its own Study Instance UID and keeps only the
    Requested Procedure ID: the stable study takes the order over."""
    patient = flow_patient(fhirpy, "FLOW-2", "Peter", gender="male", birth_date="1960-01-01")
    placed = order(fhirpy, patient.id, "24725-4", "CT Head")
    (item,) = [i for i in worklist(server, workdir / "wl-3") if str(i.PatientID) == "FLOW-2"]
    item.StudyInstanceUID = generate_uid()  # the modality's own
    _, slices = images(item, 2)
    for ds in slices:
        ds.AccessionNumber = ""
        ds.RequestAttributesSequence[0].AccessionNumber = ""
    ae = AE(ae_title=STATION)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    try:
        for ds in slices:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    study = str(item.StudyInstanceUID)
    wait_until(lambda: order_row(server, placed.id).study_instance_uid == study, server)
    imaging = fhirpy.reference("ImagingStudy", study).to_resource().serialize()
    assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{placed.id}"}]
    identifiers = fhirpy.reference("ServiceRequest", placed.id).to_resource().serialize()
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"} in [
        {"system": i.get("system"), "value": i.get("value")} for i in identifiers["identifier"]
    ]
    # The order's new version is announced, under the study it now has.
    events = order_events(server, placed.id)
    assert [e.type for e in events] == ["order.scheduled", "order.updated"]
    assert events[-1].study_instance_uid == study
    assert events[-1].data["version"] == 2
    wait_until(lambda: captures_done(server, study) >= 1, server)
    with closing(server.archive()) as arc, arc.db.session() as session:
        codes = session.scalars(
            select(ChargeItem.code).where(
                ChargeItem.study_instance_uid == study, ChargeItem.kind == "technical"
            )
        ).all()
    assert codes == ["24725-4"]


def test_an_order_placed_after_its_images_recodes_the_study_charge(
    server: RunningServer, fhirpy: Any
) -> None:
    """Images that came before their order (the accession number the EHR gives the order
    later): charged as their series show, then, at the next capture once the order is known,
    re-coded as ordered: the first charge voided, never both billable."""
    patient = flow_patient(fhirpy, "FLOW-4", "Lena")
    walk_in = Dataset()
    walk_in.StudyInstanceUID = study = generate_uid()
    walk_in.AccessionNumber = "LATE-4"
    walk_in.RequestedProcedureID = ""
    walk_in.PatientID, walk_in.PatientName = "FLOW-4", "Flow^Lena"
    walk_in.ScheduledProcedureStepSequence = Sequence([Dataset()])
    walk_in.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID = ""
    _, slices = images(walk_in, 2)
    ae = AE(ae_title=STATION)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    try:
        for ds in slices:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()

    def technical() -> list[tuple[str, str, str]]:
        with closing(server.archive()) as arc, arc.db.session() as session:
            return [
                (c.idempotency_key.rsplit("|", 1)[1], c.status, str(c.net))
                for c in session.scalars(
                    select(ChargeItem)
                    .where(ChargeItem.study_instance_uid == study, ChargeItem.kind == "technical")
                    .order_by(ChargeItem.id)
                )
            ]

    assert wait_until(technical, server) == [("CT/HEAD/-/plain", "billable", "170.00")]

    placed = fhirpy.resource(
        "ServiceRequest",
        status="active",
        intent="order",
        code={"coding": [{"system": LOINC, "code": "24725-4", "display": "CT Head"}]},
        subject={"reference": f"Patient/{patient.id}"},
        identifier=[
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": "LATE-4",
            }
        ],
    )
    placed.save()
    # A signed report makes the study stable again: the next capture knows the order.
    sign_report(fhirpy, patient.id, study, "Normal.")
    recoded = [
        ("CT/HEAD/-/plain", "entered-in-error", "170.00"),
        ("loinc:24725-4", "billable", "180.00"),
    ]
    assert wait_until(lambda: technical() == recoded, server)
    with closing(server.archive()) as arc, arc.db.session() as session:
        voided = session.scalars(
            select(ChargeItem).where(
                ChargeItem.idempotency_key == f"technical|{study}|CT/HEAD/-/plain"
            )
        ).one()
    assert charge_events_of(server, voided.id)[-1] == (
        "entered-in-error",
        "re-coded as ordered: loinc:24725-4",
    )

    # The order was entered in error after all: the next capture charges the study as its
    # series show again (the first charge comes back), and the ordered charge is voided.
    current = fhirpy.reference("ServiceRequest", placed.id).to_resource()  # its UID moved
    current["status"] = "entered-in-error"
    current.save()
    sign_report(fhirpy, patient.id, study, "Normal, addendum.")
    back = [
        ("CT/HEAD/-/plain", "billable", "170.00"),
        ("loinc:24725-4", "entered-in-error", "180.00"),
    ]
    assert wait_until(lambda: technical() == back, server)


def test_one_acquisition_for_two_orders_charges_both(
    server: RunningServer, fhirpy: Any, workdir: Path
) -> None:
    """IHE RAD SWF group case: a CT head and a CT chest ordered, performed in one step and one
    study. Both orders complete, and each ordered procedure is a technical charge."""
    patient = flow_patient(fhirpy, "FLOW-5", "Gus")
    head = order(fhirpy, patient.id, "24725-4", "CT Head")
    chest = order(fhirpy, patient.id, "24627-2", "CT Chest")
    items = [i for i in worklist(server, workdir / "wl-5") if str(i.PatientID) == "FLOW-5"]
    assert len(items) == 2
    first, other = sorted(items, key=lambda i: str(i.RequestedProcedureCodeSequence[0].CodeValue))
    perform(server, first, other)
    study = str(first.StudyInstanceUID)  # one study for both: the first item's
    for placed in (head, chest):
        assert fhirpy.reference("ServiceRequest", placed.id).to_resource().status == "completed"
    imaging = fhirpy.reference("ImagingStudy", study).to_resource().serialize()
    assert {b["reference"] for b in imaging["basedOn"]} == {
        f"ServiceRequest/{head.id}",
        f"ServiceRequest/{chest.id}",
    }
    wait_until(lambda: captures_done(server, study) >= 1, server)
    with closing(server.archive()) as arc, arc.db.session() as session:
        charges = session.scalars(
            select(ChargeItem)
            .where(ChargeItem.study_instance_uid == study, ChargeItem.kind == "technical")
            .order_by(ChargeItem.code)
        ).all()
        assert [(c.code, c.display, str(c.net), c.status) for c in charges] == [
            ("24627-2", "CT Chest", "210.00", "billable"),
            ("24725-4", "CT Head", "180.00", "billable"),
        ]


def charge_events_of(server: RunningServer, charge_id: int) -> list[tuple[str, str | None]]:
    from billing.capture import charge_events

    with closing(server.archive()) as arc:
        return [(e.status, e.reason) for e in charge_events(arc, charge_id)]


def test_a_cancelled_order_leaves_the_worklist(
    server: RunningServer, fhirpy: Any, workdir: Path
) -> None:
    patient = flow_patient(fhirpy, "FLOW-3", "Clara", gender="female", birth_date="1980-01-01")
    placed = order(fhirpy, patient.id, "24627-2", "CT Chest")
    listed = [str(i.PatientID) for i in worklist(server, workdir / "wl-4")]
    assert "FLOW-3" in listed
    placed.delete()  # cancels: the order is revoked and stays readable
    assert fhirpy.reference("ServiceRequest", placed.id).to_resource().status == "revoked"
    listed = [str(i.PatientID) for i in worklist(server, workdir / "wl-5")]
    assert "FLOW-3" not in listed
    assert order_row(server, placed.id).step_status == "DISCONTINUED"
