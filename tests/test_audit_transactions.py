"""The record of a change of PHI is written in the change's own transaction (issue 15 item 5):
ingest (C-STORE, STOW-RS, import), FHIR writes, billing writes from FHIR, the command line and
the charge-capture job. For each path: a write that succeeds shows its audit row at once, with
the background writer out of the way (``AuditLog.submit`` replaced by a list); a transaction
that fails after the domain write leaves neither the change nor its audit row."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode as encode_dataset
from sqlalchemy import func, select

import billing.accounts
import billing.capture
import billing.invoices
import billing.manual
import billing.reconciliation
import fhir_bridge.writes
from archive import Archive, IngestError, IngestErrorKind
from archive.audit import AuditEvent, AuditEventRow, StudyEvents
from archive.importer import import_paths
from archive.jobs import JobRecord, JobStatus
from archive.models import Instance, Patient, ReportDocument
from billing.accounts import update_account
from billing.capture import capture_technical
from billing.invoices import create_invoice, issue_invoice, record_payment
from billing.manual import ChargeFields, charge_fields, create_manual_charge, update_charge
from billing.models import BillingAccount, ChargeItem, Invoice, Payment, PaymentReconciliation
from billing.prices import load_price_list, store_price_list
from billing.reconciliation import Detail, record_reconciliation
from dicom_node.server import DimseServer
from pacsbridge.app import create_app
from pacsbridge.billing_jobs import CHARGE_CAPTURE, _build_capture
from tests.conftest import Backend
from tests.dicom_factory import ct_slice
from tests.test_billing_capture import SAMPLE, ct_study, store

FHIR_JSON = {"Content-Type": "application/fhir+json"}


class Boom(RuntimeError):
    """The failure injected after the domain write, inside its transaction."""


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _slice(study: str, series: str, index: int, patient: str = "AUDIT-TX") -> Dataset:
    return ct_slice(study_uid=study, series_uid=series, index=index, patient_id=patient, size=8)


def _rows(archive: Archive) -> list[AuditEventRow]:
    """The audit rows in the index, read now (nothing waits for the background writer)."""
    with archive.db.session() as session:
        rows = session.scalars(select(AuditEventRow).order_by(AuditEventRow.id)).all()
        session.expunge_all()
        return list(rows)


def _count(archive: Archive, model: Any) -> int:
    with archive.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> Callable[[Archive], list[AuditEvent]]:
    """The background writer stopped: what an archive's audit log is given to queue is kept
    in a list and never written."""

    def stop(archive: Archive) -> list[AuditEvent]:
        kept: list[AuditEvent] = []
        monkeypatch.setattr(archive.audit, "submit", kept.append)
        return kept

    return stop


def _explode_after(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> None:
    """Make ``target.name`` do its work and then fail, as a later step of the transaction."""
    original = getattr(target, name)

    def then_fail(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise Boom(f"{name} failed after writing")

    monkeypatch.setattr(target, name, then_fail)


@pytest.fixture
def archive(index_backend: Backend) -> Iterator[Archive]:
    with closing(Archive(index_backend.settings)) as arc:
        yield arc


# --- archive ingest ----------------------------------------------------------------------------


def _change_event(**kw: Any) -> AuditEvent:
    return AuditEvent(action="C", type_code="110104", agent="ae:TESTER", source="dimse", **kw)


def test_ingest_commits_its_audit_event_with_the_instance(
    archive: Archive, queued: Callable[[Archive], list[AuditEvent]]
) -> None:
    kept = queued(archive)
    study, series = generate_uid(), generate_uid()
    result = archive.ingest(_part10(_slice(study, series, 0)), audit=_change_event())
    assert result.audited
    (row,) = _rows(archive)
    assert (row.agent, row.action, row.type_code, row.source) == (
        "ae:TESTER",
        "C",
        "110104",
        "dimse",
    )
    # What the edge did not know comes from the header.
    assert (row.study_uid, row.patient_id) == (study, "AUDIT-TX")
    # A function of the study and patient: None records nothing for this instance.
    asked: list[tuple[str, str]] = []

    def none_for_this_one(study_uid: str, patient_id: str) -> AuditEvent | None:
        asked.append((study_uid, patient_id))
        return None

    second = archive.ingest(_part10(_slice(study, series, 1)), audit=none_for_this_one)
    assert asked == [(study, "AUDIT-TX")] and not second.audited
    assert len(_rows(archive)) == 1
    assert kept == []


def test_a_copy_of_a_held_instance_is_not_audited_in_a_transaction(index_backend: Backend) -> None:
    settings = index_backend.settings.model_copy(update={"duplicate_policy": "keep"})
    with closing(Archive(settings)) as arc:
        data = _part10(_slice(generate_uid(), generate_uid(), 0))
        assert arc.ingest(data, audit=_change_event()).audited
        again = arc.ingest(data, audit=_change_event())
        assert str(again.outcome) == "duplicate" and not again.audited
        assert len(_rows(arc)) == 1


@pytest.mark.parametrize("on_connection", [False, True], ids=["direct", "connection"])
def test_ingest_that_fails_after_the_audit_insert_leaves_neither(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, on_connection: bool
) -> None:
    if on_connection:
        # A listener runs after the audit insert on a SQLAlchemy connection: it fails.
        def listener(*_: Any) -> None:
            raise Boom("routing failed")

        archive.ingestor.listeners.append(listener)
    else:  # the driver-level path: the audit insert itself fails after writing its row
        _explode_after(monkeypatch, archive.ingestor._insert_audit, "execute")
    with pytest.raises(Boom):
        archive.ingest(_part10(_slice(generate_uid(), generate_uid(), 0)), audit=_change_event())
    assert _count(archive, Instance) == 0
    assert _rows(archive) == []


# --- C-STORE -----------------------------------------------------------------------------------


@dataclass
class _Requestor:
    ae_title: str = "MODALITY"
    address: str = "192.0.2.7"


class _Association:
    def __init__(self) -> None:
        self.requestor = _Requestor()


def _c_store(node: DimseServer, ds: Dataset, assoc: _Association) -> int:
    stream = encode_dataset(ds, False, True)
    assert stream is not None
    status, _ = node._store(
        "MODALITY",
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
        stream,
        assoc=assoc,
    )
    return status


def test_c_store_records_each_study_once_per_association_in_its_transaction(
    archive: Archive, queued: Callable[[Archive], list[AuditEvent]]
) -> None:
    kept = queued(archive)
    node = DimseServer(archive, archive.settings)
    study_a, study_b, series_a, series_b = (generate_uid() for _ in range(4))
    assoc = _Association()
    for ds in [*(_slice(study_a, series_a, i) for i in range(3)), _slice(study_b, series_b, 0)]:
        assert _c_store(node, ds, assoc) == 0x0000
    rows = _rows(archive)
    assert sorted((r.study_uid, r.agent, r.agent_address, r.entity) for r in rows) == sorted(
        [
            (study_a, "ae:MODALITY", "192.0.2.7", "C-STORE"),
            (study_b, "ae:MODALITY", "192.0.2.7", "C-STORE"),
        ]
    )
    assert {r.patient_id for r in rows} == {"AUDIT-TX"}
    # A second association sending study A again: one event more.
    assert _c_store(node, _slice(study_a, series_a, 5), _Association()) == 0x0000
    assert [r.study_uid for r in _rows(archive)].count(study_a) == 2
    assert kept == []


def test_c_store_whose_transaction_fails_records_only_the_failure(
    archive: Archive,
    queued: Callable[[Archive], list[AuditEvent]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept = queued(archive)
    node = DimseServer(archive, archive.settings)
    _explode_after(monkeypatch, archive.ingestor._insert_audit, "execute")
    assoc = _Association()
    study = generate_uid()
    assert _c_store(node, _slice(study, generate_uid(), 0), assoc) == 0x0110
    assert _count(archive, Instance) == 0
    assert _rows(archive) == []
    (failure,) = kept  # the refusal, queued as reads are
    assert (failure.outcome, failure.entity, failure.agent) == (8, "C-STORE", "ae:MODALITY")
    # The study is then stored on the same association: its success event is recorded.
    monkeypatch.undo()
    kept = queued(archive)
    assert _c_store(node, _slice(study, generate_uid(), 1), assoc) == 0x0000
    assert [(r.study_uid, r.outcome) for r in _rows(archive)] == [(study, 0)]


# --- import ------------------------------------------------------------------------------------


def test_import_records_one_event_per_study_with_its_first_file(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_a, study_b = generate_uid(), generate_uid()
    series_a, series_b = generate_uid(), generate_uid()
    tree = tmp_path / "tree"
    tree.mkdir()
    slices = [_slice(study_a, series_a, i) for i in range(3)] + [_slice(study_b, series_b, 0)]
    for i, ds in enumerate(slices):
        (tree / f"{i}.dcm").write_bytes(_part10(ds))

    def imported(study: str, patient: str | None) -> AuditEvent:
        return AuditEvent(
            action="C",
            type_code="110107",
            agent="os:importer",
            source="cli",
            study_uid=study,
            patient_id=patient,
        )

    events = StudyEvents(imported)
    report = import_paths(archive.ingestor, [tree], jobs=2, audit=events)
    assert report.stored == 4 and report.studies == {study_a, study_b}
    assert events.unrecorded(report.studies) == []
    rows = _rows(archive)
    assert sorted((r.study_uid, r.type_code, r.patient_id) for r in rows) == sorted(
        [(study_a, "110107", "AUDIT-TX"), (study_b, "110107", "AUDIT-TX")]
    )
    # A study whose first file fails after its audit insert: the next file of it carries it.
    study_c, series_c = generate_uid(), generate_uid()
    again = tmp_path / "again"
    again.mkdir()
    (again / "0.dcm").write_bytes(_part10(_slice(study_c, series_c, 0)))
    (again / "1.dcm").write_bytes(_part10(_slice(study_c, series_c, 1)))
    original = archive.ingestor._insert_audit.execute
    calls: list[int] = []

    def first_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        original(*args, **kwargs)
        if len(calls) == 1:
            raise IngestError(IngestErrorKind.OUT_OF_RESOURCES, "the disk went away")

    monkeypatch.setattr(archive.ingestor._insert_audit, "execute", first_fails)
    report = import_paths(archive.ingestor, [again], jobs=1, audit=events)
    assert report.stored == 1 and len(report.rejected) == 1
    assert [r.study_uid for r in _rows(archive)].count(study_c) == 1
    assert _count(archive, Instance) == 5


# --- the HTTP edges (STOW-RS, FHIR) ------------------------------------------------------------


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with TestClient(
        create_app(archive, archive.settings), raise_server_exceptions=False
    ) as test_client:
        yield test_client


def _stow(client: TestClient, *datasets: Dataset) -> Any:
    boundary = "audit-tx-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + _part10(ds) + b"\r\n"
        for ds in datasets
    )
    return client.post(
        "/dicom-web/studies",
        content=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )


def test_stow_records_one_event_per_study_in_the_transaction_and_no_request_event(
    archive: Archive, client: TestClient, queued: Callable[[Archive], list[AuditEvent]]
) -> None:
    kept = queued(archive)
    study_a, study_b, series_a, series_b = (generate_uid() for _ in range(4))
    answer = _stow(
        client,
        _slice(study_a, series_a, 0),
        _slice(study_a, series_a, 1),
        _slice(study_b, series_b, 0, patient="AUDIT-TX-B"),
    )
    assert answer.status_code == 200, answer.text
    rows = _rows(archive)
    assert sorted((r.study_uid, r.patient_id, r.action, r.type_code, r.source) for r in rows) == (
        sorted(
            [
                (study_a, "AUDIT-TX", "C", "110104", "dicomweb"),
                (study_b, "AUDIT-TX-B", "C", "110104", "dicomweb"),
            ]
        )
    )
    assert {r.entity for r in rows} == {"/dicom-web/studies"}
    assert kept == []  # the middleware wrote no second event for the request


def test_stow_whose_transaction_fails_leaves_neither_and_the_request_is_recorded(
    archive: Archive,
    client: TestClient,
    queued: Callable[[Archive], list[AuditEvent]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept = queued(archive)
    _explode_after(monkeypatch, archive.ingestor._insert_audit, "execute")
    answer = _stow(client, _slice(generate_uid(), generate_uid(), 0))
    assert answer.status_code == 409, answer.text
    assert _count(archive, Instance) == 0
    assert _rows(archive) == []
    (request,) = kept  # the refused request, recorded by the middleware with its outcome
    assert (request.action, request.type_code, request.outcome) == ("C", "110104", 4)
    assert request.outcome_text == "HTTP 409"


def _patient_body(identifier: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": identifier}],
        "name": [{"family": "Audit", "given": ["Transaction"]}],
        "gender": "female",
        "birthDate": "1970-01-01",
    }


def test_fhir_patient_writes_commit_their_event(
    archive: Archive, client: TestClient, queued: Callable[[Archive], list[AuditEvent]]
) -> None:
    kept = queued(archive)
    created = client.post("/fhir/Patient", json=_patient_body("FHIR-TX-1"), headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    patient = created.json()
    (row,) = _rows(archive)
    assert (row.action, row.type_code, row.source, row.agent) == (
        "C",
        "110110",
        "fhir",
        "anonymous",
    )
    assert (row.entity, row.patient_id) == (f"Patient/{patient['id']}", "FHIR-TX-1")
    assert row.agent_address == "testclient"
    patient["name"] = [{"family": "Audit", "given": ["Changed"]}]
    updated = client.put(f"/fhir/Patient/{patient['id']}", json=patient, headers=FHIR_JSON)
    assert updated.status_code == 200, updated.text
    assert [(r.action, r.entity) for r in _rows(archive)] == [
        ("C", f"Patient/{patient['id']}"),
        ("U", f"Patient/{patient['id']}"),
    ]
    assert kept == []


def test_fhir_patient_create_that_fails_leaves_neither(
    archive: Archive,
    client: TestClient,
    queued: Callable[[Archive], list[AuditEvent]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept = queued(archive)
    _explode_after(monkeypatch, fhir_bridge.writes, "record")
    answer = client.post("/fhir/Patient", json=_patient_body("FHIR-TX-2"), headers=FHIR_JSON)
    assert answer.status_code == 500
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert _count(archive, Patient) == 0
    assert _rows(archive) == []
    (request,) = kept
    assert (request.action, request.outcome, request.outcome_text) == ("C", 8, "HTTP 500")


def _report_body(patient_ref: str, study: str) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": patient_ref},
        "imagingStudy": [{"reference": f"ImagingStudy/{study}"}],
        "conclusion": "No acute finding.",
        "resultsInterpreter": [{"display": "Smith, Jane"}],
    }


def _study_with_subject(archive: Archive, client: TestClient) -> tuple[str, str]:
    study = generate_uid()
    archive.ingest(_part10(_slice(study, generate_uid(), 0)))
    answer = client.get(f"/fhir/ImagingStudy/{study}")
    assert answer.status_code == 200, answer.text
    return study, str(answer.json()["subject"]["reference"])


def test_fhir_report_is_recorded_in_its_documents_ingest(
    archive: Archive, client: TestClient, queued: Callable[[Archive], list[AuditEvent]]
) -> None:
    kept = queued(archive)
    study, patient_ref = _study_with_subject(archive, client)
    created = client.post(
        "/fhir/DiagnosticReport", json=_report_body(patient_ref, study), headers=FHIR_JSON
    )
    assert created.status_code == 201, created.text
    (row,) = _rows(archive)
    assert (row.action, row.type_code, row.source) == ("C", "110110", "fhir")
    assert row.entity == f"DiagnosticReport/{created.json()['id']}"
    assert (row.study_uid, row.patient_id) == (study, "AUDIT-TX")
    assert [e.action for e in kept] == ["R"]  # the ImagingStudy read only


def test_fhir_report_whose_ingest_fails_leaves_neither(
    archive: Archive,
    client: TestClient,
    queued: Callable[[Archive], list[AuditEvent]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept = queued(archive)
    study, patient_ref = _study_with_subject(archive, client)
    _explode_after(monkeypatch, archive.ingestor._insert_audit, "execute")
    answer = client.post(
        "/fhir/DiagnosticReport", json=_report_body(patient_ref, study), headers=FHIR_JSON
    )
    assert answer.status_code >= 500
    assert _count(archive, ReportDocument) == 0
    assert _count(archive, Instance) == 1  # the study's image only
    assert _rows(archive) == []
    assert [(e.action, e.outcome) for e in kept] == [("R", 0), ("C", 8)]


# --- billing -----------------------------------------------------------------------------------


@pytest.fixture
def priced(archive: Archive) -> Archive:
    parsed = load_price_list(SAMPLE)
    store_price_list(archive, parsed, "sample", parsed.sha256, loaded_by="test")
    return archive


def _billing_event(action: str = "U") -> AuditEvent:
    return AuditEvent(action=action, type_code="110110", agent="user:biller", source="fhir")


def _captured(arc: Archive, patient: str = "AUDIT-BILL") -> tuple[str, int]:
    study = store(arc, ct_study(1, patient_id=patient))
    (charge_id,) = capture_technical(arc, arc.settings, study)
    return study, charge_id


def _issued(arc: Archive) -> int:
    _, charge_id = _captured(arc)
    invoice_id = create_invoice(arc, arc.settings, charge_ids=[charge_id], actor="test")
    issue_invoice(arc, arc.settings, invoice_id, actor="test")
    return invoice_id


def _billed(arc: Archive) -> int:
    """A charge billed on an issued invoice."""
    _, charge_id = _captured(arc)
    invoice_id = create_invoice(arc, arc.settings, charge_ids=[charge_id], actor="test")
    issue_invoice(arc, arc.settings, invoice_id, actor="test")
    return charge_id


@dataclass
class BillingWrite:
    """A billing domain write: what to prepare, how to make it with an audit event, what it
    changed (a count, or a status), and the module whose ``record_change`` it calls."""

    prepare: Callable[[Archive], Any]
    write: Callable[[Archive, Any, AuditEvent], Any]
    state: Callable[[Archive, Any], Any]
    module: ModuleType
    entity: Callable[[Any, Any], str]


def _invoice_status(arc: Archive, invoice_id: int) -> str:
    with arc.db.session() as session:
        found = session.get(Invoice, invoice_id)
        assert found is not None
        return str(found.status)


def _charge_fields(arc: Archive, charge_id: int) -> ChargeFields:
    with arc.db.session() as session:
        charge = session.get(ChargeItem, charge_id)
        assert charge is not None
        return charge_fields(charge)


def _patient_row(arc: Archive, patient_id: str = "AUDIT-BILL") -> int:
    with arc.db.session() as session:
        row = session.scalar(select(Patient.id).where(Patient.patient_id == patient_id))
    assert row is not None
    return int(row)


def _account_name(arc: Archive, account_id: int) -> str | None:
    with arc.db.session() as session:
        account = session.get(BillingAccount, account_id)
        assert account is not None
        return account.name


def _account_of(arc: Archive) -> int:
    with arc.db.session() as session:
        return int(session.scalars(select(BillingAccount.id)).one())


def _manual(arc: Archive, patient_row: int, event: AuditEvent) -> int:
    charge_id, created = create_manual_charge(
        arc,
        arc.settings,
        patient_fk=patient_row,
        fields_=ChargeFields(
            status="billable",
            code_system=None,
            code=None,
            display="Film copy",
            occurred_on=date(2024, 1, 17),
            quantity=1,
            amount=Decimal("12.50"),
        ),
        actor="test",
        audit=event,
    )
    assert created
    return charge_id


WRITES: dict[str, BillingWrite] = {
    "manual charge": BillingWrite(
        prepare=lambda arc: (_captured(arc), _patient_row(arc))[1],
        write=lambda arc, row, event: _manual(arc, row, event),
        state=lambda arc, _: _count(arc, ChargeItem),
        module=billing.manual,
        entity=lambda _, result: f"ChargeItem/{result}",
    ),
    "charge adjusted": BillingWrite(
        prepare=lambda arc: _captured(arc)[1],
        write=lambda arc, charge_id, event: update_charge(
            arc,
            arc.settings,
            charge_id,
            replace(_charge_fields(arc, charge_id), note="checked by hand"),
            actor="test",
            reason="checked",
            audit=event,
        ),
        state=lambda arc, charge_id: _charge_fields(arc, charge_id).note,
        module=billing.manual,
        entity=lambda charge_id, _: f"ChargeItem/{charge_id}",
    ),
    "invoice created": BillingWrite(
        prepare=lambda arc: _captured(arc)[1],
        write=lambda arc, charge_id, event: create_invoice(
            arc, arc.settings, charge_ids=[charge_id], actor="test", audit=event
        ),
        state=lambda arc, _: _count(arc, Invoice),
        module=billing.invoices,
        entity=lambda _, result: f"Invoice/{result}",
    ),
    "invoice issued": BillingWrite(
        prepare=lambda arc: create_invoice(
            arc, arc.settings, charge_ids=[_captured(arc)[1]], actor="test"
        ),
        write=lambda arc, invoice_id, event: issue_invoice(
            arc, arc.settings, invoice_id, actor="test", audit=event
        ),
        state=_invoice_status,
        module=billing.invoices,
        entity=lambda invoice_id, _: f"Invoice/{invoice_id}",
    ),
    "invoice cancelled": BillingWrite(
        prepare=_issued,
        write=lambda arc, invoice_id, event: billing.invoices.cancel_invoice(
            arc, invoice_id, reason="sent twice", actor="test", audit=event
        ),
        state=_invoice_status,
        module=billing.invoices,
        entity=lambda invoice_id, _: f"Invoice/{invoice_id}",
    ),
    "invoice voided": BillingWrite(
        prepare=_issued,
        write=lambda arc, invoice_id, event: billing.invoices.void_invoice(
            arc, invoice_id, reason="wrong patient", actor="test", audit=event
        ),
        state=_invoice_status,
        module=billing.invoices,
        entity=lambda invoice_id, _: f"Invoice/{invoice_id}",
    ),
    "payment": BillingWrite(
        prepare=_issued,
        write=lambda arc, invoice_id, event: record_payment(
            arc, invoice_id, "10.00", actor="test", audit=event
        ),
        state=lambda arc, _: _count(arc, Payment),
        module=billing.invoices,
        entity=lambda invoice_id, _: f"Invoice/{invoice_id}",
    ),
    "reconciliation": BillingWrite(
        prepare=_issued,
        write=lambda arc, invoice_id, event: record_reconciliation(
            arc,
            [Detail(invoice_id, Decimal("10.00"))],
            payment_date=date(2024, 2, 1),
            actor="test",
            audit=event,
        ),
        state=lambda arc, _: _count(arc, PaymentReconciliation),
        module=billing.reconciliation,
        entity=lambda _, result: f"PaymentReconciliation/{result}",
    ),
    "charge credited": BillingWrite(
        prepare=_billed,
        write=lambda arc, charge_id, event: billing.invoices.credit_charge(
            arc, charge_id, reason="overcharged", actor="test", audit=event
        ),
        state=lambda arc, _: _count(arc, ChargeItem),
        module=billing.invoices,
        entity=lambda _, result: f"ChargeItem/{result}",
    ),
    "account": BillingWrite(
        prepare=lambda arc: (_captured(arc), _account_of(arc))[1],
        write=lambda arc, account_id, event: update_account(
            arc,
            account_id,
            name="Audit household",
            status="active",
            guarantor=None,
            coverage=None,
            audit=event,
        ),
        state=lambda arc, account_id: _account_name(arc, account_id),
        module=billing.accounts,
        entity=lambda account_id, _: f"Account/{account_id}",
    ),
}


@pytest.mark.parametrize("name", list(WRITES))
def test_billing_write_commits_its_event(
    priced: Archive, queued: Callable[[Archive], list[AuditEvent]], name: str
) -> None:
    case = WRITES[name]
    prepared = case.prepare(priced)
    before = _rows(priced)
    kept = queued(priced)
    result = case.write(priced, prepared, _billing_event())
    (row,) = _rows(priced)[len(before) :]
    assert (row.agent, row.source, row.action) == ("user:biller", "fhir", "U")
    assert row.entity == case.entity(prepared, result)
    assert row.patient_id == "AUDIT-BILL"
    assert kept == []


@pytest.mark.parametrize("name", list(WRITES))
def test_billing_write_that_fails_leaves_neither(
    priced: Archive, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    case = WRITES[name]
    prepared = case.prepare(priced)
    before, state = len(_rows(priced)), case.state(priced, prepared)
    _explode_after(monkeypatch, case.module, "record_change")
    with pytest.raises(Boom):
        case.write(priced, prepared, _billing_event())
    assert case.state(priced, prepared) == state
    assert len(_rows(priced)) == before


def _job(study: str) -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(
        id=1,
        kind=CHARGE_CAPTURE,
        payload={"study_instance_uid": study},
        study_instance_uid=study,
        status=JobStatus.RUNNING,
        attempts=1,
        max_attempts=3,
        next_run_at=now,
        locked_by="test",
        locked_until=None,
        last_error=None,
        created_at=now,
        updated_at=now,
        finished_at=None,
    )


def test_the_capture_job_records_each_charge_as_its_system_identity(
    priced: Archive, queued: Callable[[Archive], list[AuditEvent]]
) -> None:
    study = store(priced, ct_study(2, patient_id="AUDIT-JOB"))
    kept = queued(priced)
    handle = _build_capture(priced, priced.settings)
    handle(_job(study))
    with priced.db.session() as session:
        (charge,) = session.scalars(select(ChargeItem)).all()
    (row,) = _rows(priced)
    assert (row.agent, row.source, row.action, row.type_code) == (
        f"job:{CHARGE_CAPTURE}",
        "jobs",
        "C",
        "110110",
    )
    assert (row.entity, row.study_uid, row.patient_id) == (
        f"ChargeItem/{charge.id}",
        study,
        "AUDIT-JOB",
    )
    handle(_job(study))  # captured before: no change, no event
    assert len(_rows(priced)) == 1
    assert kept == []


def test_a_capture_that_fails_leaves_neither(
    priced: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = store(priced, ct_study(1, patient_id="AUDIT-JOB"))
    _explode_after(monkeypatch, billing.capture, "record_change")
    with pytest.raises(Boom):
        _build_capture(priced, priced.settings)(_job(study))
    assert _count(priced, ChargeItem) == 0
    assert _rows(priced) == []


def test_fhir_billing_write_is_one_event_in_its_transaction(
    priced: Archive, client: TestClient, queued: Callable[[Archive], list[AuditEvent]]
) -> None:
    _captured(priced)
    account_id = _account_of(priced)
    kept = queued(priced)
    account = client.get(f"/fhir/Account/{account_id}")
    assert account.status_code == 200, account.text
    body = {**account.json(), "name": "Audit household"}
    body.pop("meta", None)
    answer = client.put(f"/fhir/Account/{account_id}", json=body, headers=FHIR_JSON)
    assert answer.status_code == 200, answer.text
    (row,) = [r for r in _rows(priced) if r.source == "fhir"]
    assert (row.action, row.entity, row.patient_id) == ("U", f"Account/{account_id}", "AUDIT-BILL")
    assert [e.action for e in kept] == ["R"]  # the read only: no second event for the write
    # The same body again changes nothing: no change event, the request is recorded.
    again = client.put(f"/fhir/Account/{account_id}", json=body, headers=FHIR_JSON)
    assert again.status_code == 200, again.text
    assert len([r for r in _rows(priced) if r.source == "fhir"]) == 1
    assert [(e.action, e.source, e.outcome) for e in kept] == [("R", "fhir", 0), ("U", "fhir", 0)]
