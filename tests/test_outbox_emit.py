"""The outbox events the archive, AI and billing write: each in the transaction of the change it
announces (present when the change commits, absent when it rolls back), with its type, study,
patient, FHIR reference and data. On SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from ai.runs import RunStore
from archive import Archive, IngestOutcome
from archive.ingest import IngestError
from archive.jobs import JobQueue
from archive.models import AIRun, Study
from archive.outbox import EVENT_TYPES, OutboxEvent
from archive.stable import StableStudyScanner
from billing.capture import capture_technical, void_study
from billing.invoices import (
    BillingError,
    create_invoice,
    credit_charge,
    issue_invoice,
    record_payment,
)
from billing.manual import ChargeFields, create_manual_charge
from billing.models import ChargeItem
from billing.prices import load_price_list, store_price_list
from tests.conftest import Backend
from tests.dicom_factory import ct_slice
from tests.test_archive_reports import ImagedStudy, _text_report
from tests.test_billing_capture import SAMPLE, ct_study, store


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    yield archive
    archive.close()


@pytest.fixture
def priced(arc: Archive) -> Archive:
    parsed = load_price_list(SAMPLE)
    store_price_list(arc, parsed, "sample", parsed.sha256, loaded_by="test")
    return arc


def events(arc: Archive, type: str | None = None) -> list[OutboxEvent]:
    with arc.db.session() as session:
        query = select(OutboxEvent).order_by(OutboxEvent.id)
        if type is not None:
            query = query.where(OutboxEvent.type == type)
        found = list(session.scalars(query))
        session.expunge_all()
    for event in found:
        assert event.type in EVENT_TYPES
    return found


def types(arc: Archive) -> list[str]:
    return [event.type for event in events(arc)]


# --- instance.stored ---------------------------------------------------------------------


def test_instance_stored_once_per_stored_instance_not_for_a_duplicate(arc: Archive) -> None:
    study, series = generate_uid(), generate_uid()
    slices = [
        encode(ct_slice(study_uid=study, series_uid=series, index=k, size=8, patient_id="P-7"))
        for k in range(3)
    ]
    for data in slices:
        assert arc.ingest(data).outcome is IngestOutcome.STORED
    assert arc.ingest(slices[0]).outcome is IngestOutcome.DUPLICATE
    stored = events(arc, "instance.stored")
    assert len(stored) == 3 and types(arc) == ["instance.stored"] * 3
    sops = [e.data["sop_instance_uid"] for e in stored]
    assert len(set(sops)) == 3
    first = stored[0]
    assert (first.study_instance_uid, first.patient_id, first.resource) == (
        study,
        "P-7",
        f"ImagingStudy/{study}",
    )
    assert first.data == {
        "sop_instance_uid": sops[0],
        "series_instance_uid": series,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "modality": "CT",
    }
    assert len({e.event_id for e in stored}) == 3  # each its own stable id
    assert [e.id for e in stored] == sorted(e.id for e in stored)


@pytest.mark.parametrize("index", ["sqlite", "postgresql"])
def test_instance_stored_on_overwrite(make_backend: Any, index: str) -> None:
    arc = Archive(make_backend(index, "file", duplicate_policy="overwrite").settings)
    try:
        ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0, size=8)
        arc.ingest(encode(ds))
        ds.SeriesDescription = "AXIAL again"
        assert arc.ingest(encode(ds)).outcome is IngestOutcome.OVERWRITTEN
        assert [e.data["sop_instance_uid"] for e in events(arc, "instance.stored")] == [
            str(ds.SOPInstanceUID)
        ] * 2
    finally:
        arc.close()


def test_no_event_for_a_refused_or_failed_ingest(make_backend: Any) -> None:
    arc = Archive(make_backend("sqlite", "file", refused_sop_classes=["CTImageStorage"]).settings)
    try:
        ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0, size=8)
        with pytest.raises(IngestError):
            arc.ingest(encode(ds))
        assert events(arc) == []
    finally:
        arc.close()


def test_no_event_when_the_index_transaction_rolls_back(arc: Archive) -> None:
    def failing(conn: Any, parsed: Any, calling: str) -> None:
        raise RuntimeError("a listener failed")

    arc.ingestor.listeners.append(failing)
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0, size=8)
    with pytest.raises(Exception, match="a listener failed"):
        arc.ingest(encode(ds))
    arc.ingestor.listeners.remove(failing)
    assert events(arc) == []
    arc.ingest(encode(ds))  # stored now: announced now
    assert [e.data["sop_instance_uid"] for e in events(arc)] == [str(ds.SOPInstanceUID)]


# --- study.stable, study.deleted --------------------------------------------------------------


def _age(arc: Archive, study: str) -> None:
    with arc.db.write_connection() as conn:
        conn.execute(
            update(Study)
            .where(Study.study_instance_uid == study)
            .values(updated_at=datetime.now(UTC) - timedelta(seconds=30))
        )


def test_study_stable_with_the_declaration_and_not_when_it_rolls_back(arc: Archive) -> None:
    study = store(arc, ct_study(2, patient_id="P-S"))

    class Failing(JobQueue):
        def enqueue_many(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("queue down")

    _age(arc, study)
    failing = StableStudyScanner(arc.db, Failing(arc.db), stable_age=1, kinds=["ai"])
    with pytest.raises(RuntimeError, match="queue down"):
        failing.scan()
    assert events(arc, "study.stable") == []

    scanner = StableStudyScanner(arc.db, arc.jobs, stable_age=1, kinds=["ai"])
    (declared,) = scanner.scan()
    (event,) = events(arc, "study.stable")
    assert (event.study_instance_uid, event.patient_id, event.resource) == (
        study,
        "P-S",
        f"ImagingStudy/{study}",
    )
    assert event.data == {
        "study_instance_uid": study,
        "last_instance_at": declared.updated_at.isoformat(),
    }
    assert scanner.scan() == [] and len(events(arc, "study.stable")) == 1


def test_study_deleted_when_its_last_instance_goes(arc: Archive) -> None:
    study = store(arc, ct_study(2, patient_id="P-D"))
    other = store(arc, ct_study(1, patient_id="P-D"))
    with arc.db.session() as session:
        from archive.models import Instance, Series

        first_sop = session.scalar(
            select(Instance.sop_instance_uid)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Study.study_instance_uid == study)
            .limit(1)
        )
    assert first_sop is not None
    arc.delete_instance(first_sop)  # the study keeps an instance: not deleted
    assert events(arc, "study.deleted") == []
    assert arc.delete_study(study) == 1
    (event,) = events(arc, "study.deleted")
    assert (event.study_instance_uid, event.patient_id, event.resource, event.data) == (
        study,
        "P-D",
        f"ImagingStudy/{study}",
        {"study_instance_uid": study},
    )
    assert arc.delete_study(generate_uid()) == 0  # nothing deleted, nothing announced
    assert len(events(arc, "study.deleted")) == 1
    assert other != study


# --- report.final, report.amended --------------------------------------------------------------


def test_report_final_then_amended(arc: Archive) -> None:
    study = ImagedStudy(patient_id="P-R")
    study.store_images(arc)
    draft_uid, final_uid, amended_uid = generate_uid(), generate_uid(), generate_uid()
    draft = _text_report(study, draft_uid, "Hepatomegaly.")
    arc.ingest(encode(draft))
    assert events(arc, "report.final") == []  # a preliminary report announces nothing

    final = _text_report(study, final_uid, "Hepatomegaly.", previous=draft, verified=True)
    arc.ingest(encode(final))
    arc.ingest(encode(final))  # the same document again: kept once, announced once
    (event,) = events(arc, "report.final")
    assert (event.study_instance_uid, event.patient_id, event.resource) == (
        study.uid,
        "P-R",
        f"DiagnosticReport/{draft_uid}",  # a report is named by its first version
    )
    assert event.data == {
        "sop_instance_uid": final_uid,
        "series_instance_uid": study.sr_series,
        "root_uid": draft_uid,
        "version": 2,
        "status": "final",
    }

    amended = _text_report(study, amended_uid, "No lesion.", previous=final, verified=True)
    arc.ingest(encode(amended))
    (again,) = events(arc, "report.amended")
    assert again.resource == f"DiagnosticReport/{draft_uid}"
    assert (again.data["sop_instance_uid"], again.data["version"]) == (amended_uid, 3)
    assert len(events(arc, "report.final")) == 1
    # Reports indexed again (``reindex_reports``) announce nothing.
    arc.reindex_reports()
    assert len(events(arc, "report.final")) == 1 and len(events(arc, "report.amended")) == 1


def test_report_status_asked_by_the_writer(arc: Archive) -> None:
    study = ImagedStudy(patient_id="P-R2")
    study.store_images(arc)
    uid = generate_uid()
    arc.ingest(encode(_text_report(study, uid, "Normal.")), report_status="final")
    (event,) = events(arc, "report.final")
    assert (event.resource, event.data["status"], event.data["version"]) == (
        f"DiagnosticReport/{uid}",
        "final",
        1,
    )


# --- ai.result -----------------------------------------------------------------------------


def test_ai_result_when_a_run_is_recorded_done(arc: Archive) -> None:
    study = store(arc, ct_study(1, patient_id="P-AI"))
    series = generate_uid()
    with arc.db.write_session() as session:
        row = AIRun(
            uid="2.25.1234",
            model="ct-organs",
            study_instance_uid=study,
            series_instance_uid=series,
            trigger="stable",
            status="running",
            result={},
        )
        session.add(row)
        session.flush()
        run_id = row.id
    runs = RunStore(arc)
    run = runs.get(run_id)
    assert run is not None
    seg, sr = generate_uid(), generate_uid()
    result: dict[str, Any] = {
        "model_version": "1.0",
        "findings": [
            {"label": "liver", "code": {}, "voxels": 10, "volume_ml": 1.5},
            {"label": "spleen", "code": {}, "voxels": 4, "volume_ml": 0.25},
        ],
        "produced": [
            {
                "modality": "SEG",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
                "sop_instance_uid": seg,
                "series_instance_uid": "1.2.3.9001",
                "outcome": "stored",
            },
            {
                "modality": "SR",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
                "sop_instance_uid": sr,
                "series_instance_uid": "1.2.3.9002",
                "outcome": "stored",
            },
        ],
        "timings": {"infer": 1.0},
    }
    assert events(arc, "ai.result") == []
    runs.finished(run, result)
    (event,) = events(arc, "ai.result")
    assert (event.study_instance_uid, event.patient_id, event.resource) == (
        study,
        "P-AI",
        f"ImagingStudy/{study}",
    )
    assert event.data == {
        "model": "ct-organs",
        "model_version": "1.0",
        "run_id": run_id,
        "run_uid": "2.25.1234",
        "trigger": "stable",
        "series_instance_uid": series,
        "produced": [
            {k: v for k, v in item.items() if k != "outcome"} for item in result["produced"]
        ],
        "findings": [
            {"label": "liver", "volume_ml": 1.5},
            {"label": "spleen", "volume_ml": 0.25},
        ],
    }


# --- charge.created, invoice.issued, invoice.paid ----------------------------------------------


def test_charges_and_invoices(priced: Archive) -> None:
    arc = priced
    study = store(arc, ct_study(1, patient_id="P-B"))
    (charge_id,) = capture_technical(arc, arc.settings, study)
    assert capture_technical(arc, arc.settings, study) == [charge_id]  # captured once
    (event,) = events(arc, "charge.created")
    assert (event.study_instance_uid, event.patient_id, event.resource) == (
        study,
        "P-B",
        f"ChargeItem/{charge_id}",
    )
    with arc.db.session() as session:
        charge = session.get(ChargeItem, charge_id)
        assert charge is not None
        account = charge.account_fk
        expected_total = str(charge.total)
    assert (event.data["charge_id"], event.data["version"]) == (charge_id, 1)
    assert (event.data["kind"], event.data["status"], event.data["currency"]) == (
        "technical",
        "billable",
        arc.settings.billing.currency,
    )
    assert event.data["total"] == expected_total == "202.30"
    assert (event.data["net"], event.data["tax"]) == ("170.00", "32.30")
    assert "display" not in event.data and "P-B" not in str(event.data)

    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    assert events(arc, "invoice.issued") == []  # a draft is not announced
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    with pytest.raises(BillingError):
        issue_invoice(arc, arc.settings, invoice_id, actor="clerk")  # refused: no event
    (issued,) = events(arc, "invoice.issued")
    assert (issued.resource, issued.patient_id, issued.study_instance_uid) == (
        f"Invoice/{invoice_id}",
        "P-B",
        None,
    )
    assert (issued.data["status"], issued.data["gross"], issued.data["paid"]) == (
        "issued",
        "202.30",
        "0.00",
    )
    assert issued.data["charges"] == [charge_id]
    assert issued.data["version"] == 2  # draft 1, issued 2 (Invoice.meta.versionId)
    (billed,) = events(arc, "charge.updated")  # the charge is billed with the issue
    assert (billed.resource, billed.study_instance_uid, billed.patient_id) == (
        f"ChargeItem/{charge_id}",
        study,
        "P-B",
    )
    assert (billed.data["status"], billed.data["version"], billed.data["total"]) == (
        "billed",
        2,
        "202.30",
    )

    record_payment(arc, invoice_id, Decimal("100.00"), actor="cashier")
    assert events(arc, "invoice.paid") == []  # paid in part
    with pytest.raises(BillingError, match="overpayment"):
        record_payment(arc, invoice_id, Decimal("500.00"), actor="cashier")
    assert events(arc, "invoice.paid") == []
    payment = record_payment(arc, invoice_id, "102.30", actor="cashier")
    (paid,) = events(arc, "invoice.paid")
    assert (paid.resource, paid.data["status"], paid.data["paid"], paid.data["payment_id"]) == (
        f"Invoice/{invoice_id}",
        "balanced",
        "202.30",
        payment,
    )

    credit = credit_charge(arc, charge_id, reason="billed twice", actor="clerk")
    created = events(arc, "charge.created")
    assert [e.resource for e in created] == [f"ChargeItem/{charge_id}", f"ChargeItem/{credit}"]
    assert created[1].data["total"] == "-202.30"
    credited = events(arc, "charge.updated")[-1]  # the credited charge's new version
    assert (credited.resource, credited.data["version"]) == (f"ChargeItem/{charge_id}", 3)

    # A study deleted: its open charges are voided, each announced with its new status.
    other = store(arc, ct_study(1, patient_id="P-V"))
    (open_charge,) = capture_technical(arc, arc.settings, other)
    assert void_study(arc, other, actor="test", reason="study deleted") == 1
    voided = events(arc, "charge.updated")[-1]
    assert (voided.resource, voided.study_instance_uid, voided.data["status"]) == (
        f"ChargeItem/{open_charge}",
        other,
        "entered-in-error",
    )
    assert voided.data["version"] == 2 and "study deleted" not in str(voided.data)


def test_manual_charge_created(priced: Archive) -> None:
    arc = priced
    study = store(arc, ct_study(1, patient_id="P-M"))
    with arc.db.session() as session:
        patient_fk = session.scalar(
            select(Study.patient_fk).where(Study.study_instance_uid == study)
        )
    assert patient_fk is not None
    fields = ChargeFields(
        status="billable",
        code_system="local",
        code="CONSULT",
        display="Consultation",
        occurred_on=datetime(2026, 3, 4, tzinfo=UTC).date(),
        amount=Decimal("50.00"),
    )
    charge_id, new = create_manual_charge(
        arc, arc.settings, patient_fk=patient_fk, fields_=fields, actor="clerk", identifier="m-1"
    )
    assert new
    again, new_again = create_manual_charge(
        arc, arc.settings, patient_fk=patient_fk, fields_=fields, actor="clerk", identifier="m-1"
    )
    assert (again, new_again) == (charge_id, False)
    (event,) = events(arc, "charge.created")
    assert (event.resource, event.patient_id, event.data["kind"], event.data["code"]) == (
        f"ChargeItem/{charge_id}",
        "P-M",
        "manual",
        "CONSULT",
    )
    assert "Consultation" not in str(event.data)


def test_ai_result_summarises_classification_findings() -> None:
    from ai.runs import RunRecord, result_event_data

    now = datetime.now(UTC)
    run = RunRecord(
        id=7,
        uid="2.25.77",
        model="cxr",
        weights_sha256=None,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        input_fingerprint=None,
        trigger="manual",
        status="done",
        error=None,
        result={},
        superseded_by=None,
        created_at=now,
        started_at=now,
        finished_at=now,
    )
    findings = [
        {"image": "1.2.3.4.1", "label": "effusion", "probability": 0.91, "present": True},
        {"image": "1.2.3.4.2", "label": "effusion", "probability": 0.12, "present": False},
        {"image": "1.2.3.4.1", "label": "nodule", "probability": 0.3, "present": False},
    ]
    data = result_event_data(run, {"findings": findings, "produced": []})
    assert data["findings"] == [
        {"label": "effusion", "images_present": 1, "max_probability": 0.91},
        {"label": "nodule", "images_present": 0, "max_probability": 0.3},
    ]
    assert "1.2.3.4.1" not in json.dumps(data)  # per-image findings stay in the run record
