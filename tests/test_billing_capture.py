"""Charge capture: technical charges from performed procedures, professional charges from
signed reports, idempotency, review of unpriced procedures, voiding on delete, and the whole
path through a running `pacsbridge serve` fed by DCMTK storescu (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from archive import Archive
from archive.audit import AuditEventRow
from archive.jobs import JobStatus
from archive.models import ReportDocument
from billing.capture import (
    capture_professional,
    capture_technical,
    charge_events,
    list_charges,
    reprice_planned,
    study_procedures,
    void_study,
)
from billing.invoices import create_invoice, issue_invoice
from billing.models import ChargeItem
from billing.prices import load_price_list, store_price_list
from tests.conftest import Backend, start_server
from tests.dicom_factory import ct_slice
from tests.fhir_support import storescu
from tests.test_archive_reports import ImagedStudy, _text_report

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "billing" / "sample-prices.csv"
PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
WEDNESDAY = "20260304"


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    parsed = load_price_list(SAMPLE)
    store_price_list(archive, parsed, "sample", parsed.sha256, loaded_by="test")
    yield archive
    archive.close()


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def ct_study(
    count: int = 2,
    *,
    study_uid: str | None = None,
    patient_id: str = "PAT-B",
    study_date: str = WEDNESDAY,
    study_time: str = "101500",
    modality: str = "CT",
    body_part: str = "HEAD",
    procedure: Dataset | None = None,
    contrast: str | None = None,
) -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    slices = []
    for index in range(count):
        ds = ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            index=index,
            size=8,
            patient_id=patient_id,
            study_date=study_date,
        )
        ds.StudyTime, ds.Modality, ds.BodyPartExamined = study_time, modality, body_part
        if procedure is not None:
            ds.ProcedureCodeSequence = [procedure]
        if contrast:
            ds.ContrastBolusAgent = contrast
        slices.append(ds)
    return slices


def store(arc: Archive, slices: list[Dataset]) -> str:
    for ds in slices:
        arc.ingest(encode(ds))
    return str(slices[0].StudyInstanceUID)


def charge_count(arc: Archive) -> int:
    with arc.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(ChargeItem)) or 0)


def test_coded_ct_with_contrast_after_hours(arc: Archive):
    chest = code("24627-2", "LN", "CT Chest")
    study = store(
        arc,
        ct_study(3, body_part="CHEST", procedure=chest, contrast="IODINE", study_time="210000"),
    )
    with arc.db.session() as session:
        (procedure,) = study_procedures(session, study)
    assert (procedure.key, procedure.code_system, procedure.code) == (
        "loinc:24627-2",
        "loinc",
        "24627-2",
    )
    assert procedure.conditions == ["after_hours", "contrast"]

    ids = capture_technical(arc, arc.settings, study)
    (charge,) = list_charges(arc, study=study)
    assert ids == [charge.id]
    assert (charge.kind, charge.status, charge.service_kind, charge.service_uid) == (
        "technical",
        "billable",
        "study",
        study,
    )
    assert charge.idempotency_key == f"technical|{study}|loinc:24627-2"
    assert charge.occurred_on == date(2026, 3, 4)
    # 210.00 + contrast 45.00 + after hours 210.00 * 0.25 = 307.50; VAT 19% = 58.425 -> 58.42
    assert charge.net == Decimal("307.50") and isinstance(charge.net, Decimal)
    assert charge.tax == Decimal("58.42")
    assert charge.total == Decimal("365.92")
    assert [(line["code"], line["amount"]) for line in charge.lines] == [
        ("base", "210.00"),
        ("CONTRAST", "45.00"),
        ("AFTER-HOURS", "52.50"),
        ("VAT", "58.42"),
    ]
    assert charge.currency == "EUR" and charge.version == 1
    (event,) = charge_events(arc, charge.id)
    assert (event.version, event.status, event.actor, event.total) == (
        1,
        "billable",
        "stable-study",
        Decimal("365.92"),
    )


def test_study_without_codes_priced_by_modality_and_body_part(arc: Archive):
    study = store(arc, ct_study(2, study_date="20260307"))  # a Saturday, 10:15
    ids = capture_technical(arc, arc.settings, study)
    (charge,) = list_charges(arc, study=study)
    assert ids == [charge.id]
    assert (charge.code, charge.modality, charge.body_part) == (None, "CT", "HEAD")
    assert charge.conditions == ["weekend"]
    # "CT head (no procedure code)": 170.00 (no weekend component), VAT 32.30
    assert (charge.status, charge.net, charge.total) == (
        "billable",
        Decimal("170.00"),
        Decimal("202.30"),
    )


def test_no_price_is_planned_for_review_then_priced_by_a_new_list(
    arc: Archive, index_backend: Backend, tmp_path: Path
):
    study = store(arc, ct_study(1, modality="US", body_part="KNEE"))
    captured = run_cli(index_backend, tmp_path, "billing", "capture", study, "--json")
    assert captured.returncode == 0, captured.stderr
    (shown,) = json.loads(captured.stdout)
    review = run_cli(index_backend, tmp_path, "billing", "review", "--json")
    assert review.returncode == 0, review.stderr
    assert json.loads(review.stdout) == [shown]
    assert (shown["status"], shown["total"]) == ("planned", None)
    (charge,) = list_charges(arc, status="planned")
    assert charge.id == shown["id"] and shown["review_reason"] == charge.review_reason
    assert charge.net is None and charge.total is None and charge.definition_fk is None
    assert charge.review_reason == "no technical price for US KNEE on 2026-03-04"
    assert reprice_planned(arc, arc.settings) == 0  # the sample list does not price it

    prices = tmp_path / "prices.csv"
    prices.write_text(
        SAMPLE.read_text(encoding="utf-8")
        + ",,US knee,technical,US,KNEE,,,2026-01-01,,60.00,tax:VAT:19%\n",
        encoding="utf-8",
    )
    loaded = run_cli(index_backend, tmp_path, "billing", "prices", "load", str(prices))
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.splitlines()[-1])["billable"] == 1
    (priced,) = list_charges(arc, study=study)
    assert (priced.id, priced.status, priced.review_reason) == (charge.id, "billable", None)
    assert (priced.net, priced.total, priced.version) == (Decimal("60.00"), Decimal("71.40"), 2)
    events = charge_events(arc, charge.id)
    assert [(e.version, e.status) for e in events] == [(1, "planned"), (2, "billable")]
    assert events[0].reason == charge.review_reason and events[1].total == Decimal("71.40")
    assert list_charges(arc, status="planned") == []


def test_capture_twice_and_concurrently_charges_once(arc: Archive):
    study = store(arc, ct_study(2, procedure=code("24725-4", "LN", "CT Head")))
    first = capture_technical(arc, arc.settings, study)
    assert capture_technical(arc, arc.settings, study) == first
    assert charge_count(arc) == 1

    other = store(arc, ct_study(2, procedure=code("24725-4", "LN", "CT Head")))
    barrier = threading.Barrier(2)
    results: list[list[int]] = []

    def capture() -> None:
        barrier.wait()
        results.append(capture_technical(arc, arc.settings, other))

    threads = [threading.Thread(target=capture) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert charge_count(arc) == 2
    (charge,) = list_charges(arc, study=other)
    assert len(charge_events(arc, charge.id)) == 1


def test_signed_report_makes_one_professional_charge(arc: Archive):
    imaged = ImagedStudy("PAT-R")
    for ct in imaged.cts:
        ct.StudyDate = WEDNESDAY
    imaged.store_images(arc)
    draft = _text_report(imaged, generate_uid(), "Unremarkable.")  # not signed: no charge
    arc.ingest(encode(draft))
    assert capture_professional(arc, arc.settings, imaged.uid) == []

    root_uid = generate_uid()
    signed = _text_report(imaged, root_uid, "Unremarkable.", verified=True)
    signed.VerifyingObserverSequence[0].VerificationDateTime = "20260305094500"
    arc.ingest(encode(signed))
    capture_technical(arc, arc.settings, imaged.uid)
    (charge_id,) = capture_professional(arc, arc.settings, imaged.uid)
    (charge,) = list_charges(arc, study=imaged.uid, status="billable")[1:]
    assert charge.id == charge_id
    assert (charge.kind, charge.service_kind, charge.service_uid) == (
        "professional",
        "report",
        root_uid,
    )
    assert charge.idempotency_key == f"professional|{root_uid}"
    assert charge.performer == "Verifier^Victor"
    assert charge.occurred_on == date(2026, 3, 5)
    # "CT report (no procedure code)" CT HEAD: 55.00 + VAT 10.45
    assert (charge.net, charge.total) == (Decimal("55.00"), Decimal("65.45"))

    amended = _text_report(imaged, generate_uid(), "Amended.", previous=signed, verified=True)
    amended.VerifyingObserverSequence[0].VerificationDateTime = "20260306080000"
    arc.ingest(encode(amended))
    with arc.db.session() as session:
        current = session.scalars(
            select(ReportDocument).where(ReportDocument.superseded.is_(False))
        ).all()
        assert root_uid in {d.root_uid for d in current if d.verification_flag == "VERIFIED"}
    assert capture_professional(arc, arc.settings, imaged.uid) == [charge_id]
    assert [c.kind for c in list_charges(arc, study=imaged.uid)] == ["technical", "professional"]


def test_deleting_the_study_voids_its_open_charges(
    arc: Archive, index_backend: Backend, tmp_path: Path
):
    study = store(arc, ct_study(2, procedure=code("24725-4", "LN", "CT Head")))
    kept = store(arc, ct_study(1, patient_id="PAT-K"))
    (charge_id,) = capture_technical(arc, arc.settings, study)
    capture_technical(arc, arc.settings, kept)
    deleted = run_cli(index_backend, tmp_path, "delete", "--study", study)
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout) == {"deleted_instances": 2, "voided_charges": 1}
    (charge,) = list_charges(arc, study=study)
    assert (charge.id, charge.status, charge.version) == (charge_id, "entered-in-error", 2)
    last = charge_events(arc, charge_id)[-1]
    assert (last.status, last.reason) == ("entered-in-error", "study deleted")
    assert [c.status for c in list_charges(arc, study=kept)] == ["billable"]
    # The void is a change of the patient's record of its own (PS3.15 A.5.3.9, U), beside the
    # deletion's DICOM Study Deleted.
    with arc.db.session() as session:
        audits = session.scalars(
            select(AuditEventRow).where(AuditEventRow.study_uid == study)
        ).all()
    assert sorted((a.type_code, a.action, a.source, a.entity) for a in audits) == [
        ("110105", "D", "cli", f"delete {study}"),
        ("110110", "U", "cli", f"ChargeItem/{charge_id}"),
    ]
    assert {a.patient_id for a in audits if a.type_code == "110110"} == {charge.patient_id}
    assert void_study(arc, study, actor="test") == 0  # nothing open is left

    # Stored again under the same UID: the same charge comes back, as a new version.
    store(arc, ct_study(2, study_uid=study, procedure=code("24725-4", "LN", "CT Head")))
    assert capture_technical(arc, arc.settings, study) == [charge_id]
    (again,) = list_charges(arc, study=study)
    assert (again.status, again.version, again.total) == ("billable", 3, Decimal("214.20"))
    assert charge_events(arc, charge_id)[-1].reason == "captured again"

    by_patient = run_cli(index_backend, tmp_path, "delete", "--patient", "PAT-K")
    assert json.loads(by_patient.stdout) == {"deleted_instances": 1, "voided_charges": 1}
    assert [c.status for c in list_charges(arc, study=kept)] == ["entered-in-error"]


def _two_procedure_study(arc: Archive) -> tuple[str, str]:
    """A study of a coded CT head series and an uncoded one: (study uid, uncoded series uid)."""
    coded = ct_study(1, procedure=code("24725-4", "LN", "CT Head"), patient_id="PAT-R")
    plain = ct_study(1, study_uid=str(coded[0].StudyInstanceUID), patient_id="PAT-R")
    study = store(arc, coded + plain)
    return study, str(plain[0].SeriesInstanceUID)


def _technical(arc: Archive, study: str) -> list[tuple[str, str]]:
    return [
        (c.idempotency_key.rsplit("|", 1)[1], c.status)
        for c in list_charges(arc, study=study)
        if c.kind == "technical"
    ]


def test_a_procedure_gone_from_the_study_is_re_coded_away(arc: Archive):
    """Each capture makes the study's technical charges those of its procedures as they
    stand: the charge of a series' procedure deleted since is voided, and comes back with it."""
    study, plain_series = _two_procedure_study(arc)
    capture_technical(arc, arc.settings, study)
    assert _technical(arc, study) == [
        ("loinc:24725-4", "billable"),
        ("CT/HEAD/-/plain", "billable"),
    ]
    assert arc.delete_series(plain_series) == 1
    capture_technical(arc, arc.settings, study)
    assert _technical(arc, study) == [
        ("loinc:24725-4", "billable"),
        ("CT/HEAD/-/plain", "entered-in-error"),
    ]
    (voided,) = [c for c in list_charges(arc, study=study) if c.status == "entered-in-error"]
    last = charge_events(arc, voided.id)[-1]
    assert (last.status, last.reason) == (
        "entered-in-error",
        "re-coded as performed: loinc:24725-4",
    )


def test_a_billed_charge_is_not_re_coded(arc: Archive, caplog: pytest.LogCaptureFixture):
    """A charge already on an issued invoice is left as it is (a credit corrects it), and so
    is every other charge of the study."""
    study, plain_series = _two_procedure_study(arc)
    head, plain = capture_technical(arc, arc.settings, study)
    invoice = create_invoice(arc, arc.settings, charge_ids=[plain], actor="clerk")
    issue_invoice(arc, arc.settings, invoice, actor="clerk")
    assert arc.delete_series(plain_series) == 1
    with caplog.at_level(logging.WARNING, logger="billing.capture"):
        assert capture_technical(arc, arc.settings, study) == [head, plain]
    assert _technical(arc, study) == [("loinc:24725-4", "billable"), ("CT/HEAD/-/plain", "billed")]
    assert any("left as they are" in r.getMessage() for r in caplog.records)


def test_site_tax_rate_prices_captured_and_repriced_charges(arc: Archive, tmp_path: Path):
    arc.settings.billing.tax_percent = Decimal("7.7")
    arc.settings.billing.tax_code = "MWST"
    knee = store(arc, ct_study(1, modality="US", body_part="KNEE"))
    (planned_id,) = capture_technical(arc, arc.settings, knee)  # no price yet: planned
    prices = tmp_path / "prices.csv"
    prices.write_text(
        SAMPLE.read_text(encoding="utf-8")
        + ",,US knee,technical,US,KNEE,,,2026-01-01,,60.00,\n"
        + ",,US hand,technical,US,HAND,,,2026-01-01,,33.33,\n",
        encoding="utf-8",
    )
    parsed = load_price_list(prices)
    store_price_list(arc, parsed, "site tax", parsed.sha256, loaded_by="test")
    assert reprice_planned(arc, arc.settings) == 1
    (knee_charge,) = list_charges(arc, study=knee)
    assert knee_charge.id == planned_id
    # 7.7 % of 60.00 = 4.62
    assert (knee_charge.net, knee_charge.tax, knee_charge.total) == (
        Decimal("60.00"),
        Decimal("4.62"),
        Decimal("64.62"),
    )
    assert knee_charge.lines[-1] == {
        "type": "tax",
        "code": "MWST",
        "description": "MWST 7.7%",
        "amount": "4.62",
    }
    hand = store(arc, ct_study(1, modality="US", body_part="HAND"))
    capture_technical(arc, arc.settings, hand)
    (hand_charge,) = list_charges(arc, study=hand)
    # 7.7 % of 33.33 = 2.56641 -> 2.57
    assert (hand_charge.tax, hand_charge.total) == (Decimal("2.57"), Decimal("35.90"))
    # the sample's CT head has its own VAT 19 %: the site rate is not added to it
    head = store(arc, ct_study(1, body_part="HEAD"))
    capture_technical(arc, arc.settings, head)
    (head_charge,) = list_charges(arc, study=head)
    assert [line["code"] for line in head_charge.lines if line["type"] == "tax"] == ["VAT"]
    assert head_charge.total == Decimal("202.30")


def run_cli(backend: Backend, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PACSBRIDGE_")}
    env |= backend.env | {"COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run(
        [str(PACSBRIDGE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


# --- end to end: storescu -> stable study -> charge-capture job -> charge ------------------


def test_serve_captures_a_charge_once_for_a_sent_study(make_backend, tmp_path: Path):
    backend: Backend = make_backend("sqlite")
    loaded = run_cli(backend, tmp_path, "billing", "prices", "load", str(SAMPLE))
    assert loaded.returncode == 0, loaded.stderr
    slices = ct_study(4, body_part="CHEST", procedure=code("24627-2", "LN", "CT Chest"))
    study = str(slices[0].StudyInstanceUID)
    paths = []
    for index, ds in enumerate(slices):
        path = tmp_path / f"ct{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    server = start_server(
        backend,
        tmp_path,
        PYTHONPATH=str(REPO),
        PACSBRIDGE_STABLE_AGE="1",
        PACSBRIDGE_STABLE_SCAN_INTERVAL="0.2",
        PACSBRIDGE_WORKER_POLL_INTERVAL="0.1",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_BILLING=json.dumps({"enabled": True}),
    )
    try:
        with closing(server.archive()) as arc:

            def captures_done() -> int:
                jobs = arc.jobs.list(kind="charge-capture", study_instance_uid=study)
                return sum(job.status is JobStatus.DONE for job in jobs)

            def wait_for(done: int) -> None:
                deadline = time.monotonic() + 30
                while captures_done() < done and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert captures_done() == done, server.log()[-3000:]

            storescu(server, paths[:3])
            wait_for(1)
            charges = run_cli(backend, tmp_path, "billing", "charges", "--study", study, "--json")
            assert charges.returncode == 0, charges.stderr
            (charge,) = json.loads(charges.stdout)
            assert (charge["status"], charge["code"], charge["total"]) == (
                "billable",
                "24627-2",
                "249.90",  # 210.00 + VAT 39.90 (10:15 on a Wednesday, no contrast)
            )
            # Sent again, with one more slice: the study is stable again, captured again.
            storescu(server, paths)
            wait_for(2)
            assert [c.id for c in list_charges(arc, study=study)] == [charge["id"]]
    finally:
        assert server.stop() == 0, server.log()
