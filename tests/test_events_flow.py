"""One order's whole day, announced on the real RabbitMQ (127.0.0.1:5672).

A running ``pacsbridge serve`` with an AMQP subscription of its settings (every type) and
charge capture on. The EHR places an order (fhirpy); DCMTK ``findscu -W`` reads it from the
worklist; a modality (pynetdicom) reports MPPS IN PROGRESS, sends a CT series with the order's
accession number and Study Instance UID, and reports COMPLETED; the study becomes stable and
its technical charge is captured; the admin runs the builtin ``ct-body`` model on it; the
radiologist signs a report (its professional charge follows); the billing office invoices both
charges and records the payment. A consumer bound to the exchange then holds every event the
outbox holds, each exactly once (distinct message ids, no second copy in a run without
failures), in outbox order per study, with the steps in the order they happened.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from ai.runs import RunStore
from archive.outbox import OutboxEvent
from billing.capture import list_charges
from tests.conftest import Backend, RunningServer, _backend, start_server
from tests.fhir_support import FHIRValidator
from tests.test_audit import _body_series
from tests.test_events_amqp import AMQP_URL, Consumer, _broker_up
from tests.test_fhir_billing import SAMPLE, run_cli, wait_until
from tests.test_mpps import MPPS, completed, in_progress
from tests.test_order_flow import order, worklist

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(not _broker_up(), reason="no RabbitMQ on 127.0.0.1:5672"),
]

FHIR_JSON = {"Content-Type": "application/fhir+json"}
PATIENT_SYSTEM = "urn:pacsbridge:patient-id"
LOINC = "http://loinc.org"


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    assert checker.failures == []


@pytest.fixture(scope="module")
def exchange() -> str:
    return f"test.flow.{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def consumer(exchange: str) -> Iterator[Consumer]:
    # Bound before the server starts: every event the server publishes has a queue to go to.
    bound = Consumer(exchange)
    yield bound
    bound.close()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    exchange: str,
    consumer: Consumer,
) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("events-flow")
    backend: Backend = _backend("sqlite", "file", workdir, request)
    loaded = run_cli(backend, workdir, "billing", "prices", "load", str(SAMPLE))
    assert loaded.returncode == 0, loaded.stderr
    events = {
        "subscriptions": {
            "integration-engine": {
                "channel": "amqp",
                "url": AMQP_URL,
                "exchange": exchange,
                "types": ["#"],
            }
        }
    }
    running = start_server(
        backend,
        workdir,
        PACSBRIDGE_EVENTS=json.dumps(events),
        PACSBRIDGE_PUBLIC_URL="https://pacs.example",
        # No model runs by itself on stable studies; ct-body runs when the admin asks.
        PACSBRIDGE_AI=json.dumps({"enabled": False, "models": {"brain-mr": {"enabled": False}}}),
        PACSBRIDGE_BILLING=json.dumps({"enabled": True}),
        PACSBRIDGE_STABLE_AGE="1",
        PACSBRIDGE_STABLE_SCAN_INTERVAL="0.2",
        PACSBRIDGE_WORKER_POLL_INTERVAL="0.1",
        PACSBRIDGE_DIMSE_PROCESSES="1",
    )
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log()[-3000:]


def _perform(server: RunningServer, item: Dataset) -> list[Dataset]:
    """The modality: MPPS IN PROGRESS, a 12-slice CT series ``ct-body`` selects (with the
    worklist item's accession number, Study Instance UID and Requested Procedure ID), MPPS
    COMPLETED, on one association."""
    like = Dataset()
    like.PatientID, like.PatientName = item.PatientID, item.PatientName
    like.StudyInstanceUID, like.AccessionNumber = item.StudyInstanceUID, item.AccessionNumber
    like.StudyDate, like.StudyTime, like.StudyDescription = "20260304", "101500", "CT BODY"
    like.ReferringPhysicianName = "Ward^Walter"
    series = _body_series(like)
    request = Dataset()
    request.RequestedProcedureID = item.RequestedProcedureID
    request.AccessionNumber = item.AccessionNumber
    for ds in series:
        ds.RequestAttributesSequence = Sequence([request])
    ae = AE(ae_title="CT_FLOW")
    ae.add_requested_context(MPPS)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
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
        started.PatientName = item.PatientName
        status, _ = assoc.send_n_create(started, MPPS, step)
        assert status.Status == 0x0000
        for ds in series:
            assert assoc.send_c_store(ds).Status == 0x0000
        ended = completed(str(series[0].SeriesInstanceUID), [str(s.SOPInstanceUID) for s in series])
        status, _ = assoc.send_n_set(ended, MPPS, step)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    return series


def _charges(server: RunningServer, study: str, count: int) -> dict[str, int]:
    def billable() -> dict[str, int] | None:
        with closing(server.archive()) as arc:
            charges = list_charges(arc, study=study)
        found = {c.kind: c.id for c in charges if c.status == "billable"}
        return found if len(found) == count else None

    found: dict[str, int] = wait_until(billable, server, timeout=90)
    return found


def _ai_run(server: RunningServer, study: str) -> None:
    asked = httpx.post(
        f"{server.http}/api/ai/runs",
        json={"study_instance_uid": study, "model": "ct-body"},
        timeout=30,
    )
    assert asked.status_code == 202, asked.text
    (queued,) = asked.json()

    def finished() -> Any:
        with closing(server.archive()) as arc:
            run = RunStore(arc).get(queued["id"])
        return run if run is not None and run.status in ("done", "failed") else None

    run = wait_until(finished, server, timeout=180)
    assert run.status == "done", run.error


def _invoice_and_payment(fhir: httpx.Client, charges: dict[str, int]) -> str:
    created = fhir.post(
        "/Invoice",
        json={
            "resourceType": "Invoice",
            "status": "issued",
            "lineItem": [
                {"chargeItemReference": {"reference": f"ChargeItem/{charge}"}}
                for charge in charges.values()
            ],
        },
    )
    assert created.status_code == 201, created.text
    invoice = created.json()
    today = datetime.now(UTC)
    paid = fhir.post(
        "/PaymentReconciliation",
        json={
            "resourceType": "PaymentReconciliation",
            "status": "active",
            "created": today.isoformat(timespec="seconds"),
            "paymentDate": today.date().isoformat(),
            "paymentAmount": invoice["totalGross"],
            "detail": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/payment-type",
                                "code": "payment",
                            }
                        ]
                    },
                    "request": {"reference": f"Invoice/{invoice['id']}"},
                    "amount": invoice["totalGross"],
                }
            ],
        },
    )
    assert paid.status_code == 201, paid.text
    assert fhir.get(f"/Invoice/{invoice['id']}").json()["status"] == "balanced"
    return str(invoice["id"])


def test_an_orders_day_reaches_the_broker_once_and_in_order(
    server: RunningServer, consumer: Consumer, validator: FHIRValidator, tmp_path: Path
) -> None:
    fhirpy = validator.fhirpy_sync(f"{server.http}/fhir")
    fhir = httpx.Client(
        base_url=f"{server.http}/fhir",
        headers=FHIR_JSON,
        event_hooks={"response": [lambda r: (r.read(), validator.httpx_hook()(r))]},
        timeout=30,
    )
    patient = fhirpy.resource(
        "Patient",
        identifier=[{"system": PATIENT_SYSTEM, "value": "EVENTS-1"}],
        name=[{"family": "Events", "given": ["Eve"]}],
        gender="female",
        birthDate="1965-05-05",
    )
    patient.save()
    placed = order(fhirpy, patient.id, "24725-4", "CT Head")
    (item,) = worklist(server, tmp_path / "worklist")
    study = str(item.StudyInstanceUID)

    series = _perform(server, item)
    technical = _charges(server, study, 1)
    _ai_run(server, study)
    with fhir:
        report = fhir.post(
            "/DiagnosticReport",
            json={
                "resourceType": "DiagnosticReport",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "18748-4"}]},
                "subject": {"reference": f"Patient/{patient.id}"},
                "imagingStudy": [{"reference": f"ImagingStudy/{study}"}],
                "conclusion": "No acute finding.",
                "resultsInterpreter": [{"display": "Rad^Rita"}],
            },
        )
        assert report.status_code == 201, report.text
        charges = _charges(server, study, 2)
        assert charges["technical"] == technical["technical"]
        invoice = _invoice_and_payment(fhir, charges)

    # What the outbox holds, once the last change (the payment) has committed.
    with closing(server.archive()) as arc, arc.db.session() as session:
        outbox = session.execute(
            select(OutboxEvent.event_id, OutboxEvent.type, OutboxEvent.study_instance_uid).order_by(
                OutboxEvent.id
            )
        ).all()
    messages = consumer.drain(len(outbox), timeout=60)
    consumer.drain(len(outbox) + 1, timeout=2)  # a second copy of anything would show now
    received = {m.message_id: m for m in consumer.messages}
    assert set(received) == {row.event_id for row in outbox}
    assert len(consumer.messages) == len(received), "an event was published twice"
    for message in messages:
        assert message.routing_key == message.body["type"] == message.properties.type
        assert message.body["id"] == message.message_id
        assert "patient" not in message.body  # include_phi is off

    # Per study: the consumer's order is the outbox's.
    of_study = [m for m in consumer.messages if m.body["study"] == study]
    sequences = [m.body["sequence"] for m in of_study]
    assert sequences == sorted(sequences)
    assert [m.message_id for m in of_study] == [
        row.event_id for row in outbox if row.study_instance_uid == study
    ]
    types = [m.routing_key for m in of_study]

    def first(kind: str) -> int:
        return types.index(kind)

    def last(kind: str) -> int:
        return len(types) - 1 - types[::-1].index(kind)

    assert types[0] == "order.scheduled"
    assert first("order.in-progress") < first("instance.stored")
    body = {str(ds.SOPInstanceUID) for ds in series}
    stored = [m for m in of_study if m.routing_key == "instance.stored"]
    assert body <= {m.body["data"]["sop_instance_uid"] for m in stored}
    last_body = max(
        i
        for i, m in enumerate(of_study)
        if m.routing_key == "instance.stored" and m.body["data"]["sop_instance_uid"] in body
    )
    assert last_body < first("order.completed") < first("study.stable")
    assert first("study.stable") < first("charge.created") < first("ai.result")
    assert first("ai.result") < first("report.final") < last("charge.created")
    assert types.count("charge.created") == 2
    assert types.count("order.completed") == 1
    assert types.count("ai.result") == 1
    # The SEG and SR of the run and the report's SR are stored instances of the study too.
    assert len(stored) == len(series) + 3
    completed_order = of_study[first("order.completed")].body
    assert completed_order["resource"] == f"ServiceRequest/{placed.id}"
    assert (
        completed_order["links"]["fhir"] == f"https://pacs.example/fhir/ServiceRequest/{placed.id}"
    )
    assert of_study[first("study.stable")].body["links"]["dicomweb"] == (
        f"https://pacs.example/dicom-web/studies/{study}"
    )
    # The invoice's events name no study: they come after the charges they bill.
    billing = [m for m in consumer.messages if m.routing_key.startswith("invoice.")]
    assert [m.routing_key for m in billing] == ["invoice.issued", "invoice.paid"]
    assert {m.body["resource"] for m in billing} == {f"Invoice/{invoice}"}
    assert billing[0].body["sequence"] > of_study[last("charge.created")].body["sequence"]
