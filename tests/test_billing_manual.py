"""Manual charges and adjustments (what may change, with its version checked and its history
kept), accounts (guarantor, coverage, inactive), payment reconciliations of several invoices
(all or nothing), the site's tax rate on manual prices, and the `billing charge` commands —
on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from archive import Archive
from archive.models import Patient
from billing.accounts import update_account
from billing.capture import capture_technical, charge_events, list_charges
from billing.invoices import BillingError, create_invoice, invoice_json, issue_invoice
from billing.manual import (
    ChargeConflict,
    ChargeFields,
    charge_fields,
    create_manual_charge,
    update_charge,
)
from billing.models import ChargeItem, Payment
from billing.prices import load_price_list, store_price_list
from billing.reconciliation import Detail, record_reconciliation
from config import Settings
from tests.conftest import Backend
from tests.test_billing_capture import SAMPLE, ct_study, run_cli, store

DAY = date(2026, 3, 4)


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    parsed = load_price_list(SAMPLE)
    store_price_list(archive, parsed, "sample", parsed.sha256, loaded_by="test")
    yield archive
    archive.close()


def a_patient(arc: Archive, patient_id: str = "PAT-M") -> int:
    with arc.db.write_session() as session:
        patient = Patient(
            patient_id=patient_id, issuer_of_patient_id="", created_at=datetime.now(UTC)
        )
        session.add(patient)
        session.flush()
        return int(patient.id)


def fields(**changes: object) -> ChargeFields:
    values: dict[str, object] = {
        "status": "billable",
        "code_system": "local",
        "code": "CD-COPY",
        "display": "Images on CD",
        "occurred_on": DAY,
        "quantity": 2,
        "amount": Decimal("12.50"),
    }
    return ChargeFields(**(values | changes))  # type: ignore[arg-type]


def charge(arc: Archive, charge_id: int) -> ChargeItem:
    with arc.db.session() as session:
        found = session.get(ChargeItem, charge_id)
        assert found is not None
        return found


def test_manual_charge_priced_by_hand_or_by_definition(arc: Archive, index_backend: Backend):
    patient = a_patient(arc)
    cd, created = create_manual_charge(
        arc, arc.settings, patient_fk=patient, fields_=fields(), actor="t", identifier="ris|CD-1"
    )
    assert created
    row = charge(arc, cd)
    assert (row.kind, row.status, row.net, row.tax, row.total, row.quantity) == (
        "manual",
        "billable",
        Decimal("25.00"),
        Decimal("0.00"),
        Decimal("25.00"),
        2,
    )
    assert row.study_instance_uid is None and row.service_kind is None
    # The same identifier: the charge entered then.
    assert create_manual_charge(
        arc, arc.settings, patient_fk=patient, fields_=fields(), actor="t", identifier="ris|CD-1"
    ) == (cd, False)
    # With the site's tax rate: a tax line on the net.
    taxed = Settings(**{**arc.settings.model_dump(), "billing": {"tax_percent": "7.7"}})
    vat, _ = create_manual_charge(arc, taxed, patient_fk=patient, fields_=fields(), actor="t")
    assert (charge(arc, vat).tax, charge(arc, vat).total) == (Decimal("1.92"), Decimal("26.92"))
    # By a definition (CT head, LOINC 24725-4) with the contrast condition, twice.
    with arc.db.session() as session:
        from billing.models import ChargeItemDefinition

        head = session.scalar(
            select(ChargeItemDefinition.id).where(
                ChargeItemDefinition.code == "24725-4", ChargeItemDefinition.kind == "technical"
            )
        )
    by_definition, _ = create_manual_charge(
        arc,
        arc.settings,
        patient_fk=patient,
        fields_=fields(amount=None, definition_id=head, conditions=("contrast",)),
        actor="t",
    )
    assert charge(arc, by_definition).total == Decimal("523.60")  # 2 x (220.00 + VAT 41.80)
    # No price: planned, waiting for review.
    planned, _ = create_manual_charge(
        arc,
        arc.settings,
        patient_fk=patient,
        fields_=fields(amount=None, code=None, code_system=None, display="Consultation"),
        actor="t",
    )
    assert (charge(arc, planned).status, charge(arc, planned).review_reason) == (
        "planned",
        "a manual charge without a price",
    )
    with pytest.raises(BillingError, match="not both"):
        create_manual_charge(
            arc, arc.settings, patient_fk=patient, fields_=fields(definition_id=head), actor="t"
        )
    with pytest.raises(BillingError, match="not negative"):
        create_manual_charge(
            arc, arc.settings, patient_fk=patient, fields_=fields(amount=Decimal("-1")), actor="t"
        )
    with pytest.raises(BillingError, match="no patient"):
        create_manual_charge(arc, arc.settings, patient_fk=999999, fields_=fields(), actor="t")


def test_adjustments_follow_the_rules_and_keep_history(arc: Archive):
    patient = a_patient(arc)
    cd, _ = create_manual_charge(arc, arc.settings, patient_fk=patient, fields_=fields(), actor="t")
    # A stale version is refused; the current one changes the price.
    with pytest.raises(ChargeConflict):
        update_charge(
            arc,
            arc.settings,
            cd,
            fields(amount=Decimal("15")),
            actor="u",
            reason="tariff",
            expected_version=7,
        )
    assert update_charge(
        arc,
        arc.settings,
        cd,
        fields(amount=Decimal("15")),
        actor="u",
        reason="tariff",
        expected_version=1,
    )
    assert charge(arc, cd).total == Decimal("30.00")
    # The same again changes nothing (no version).
    assert not update_charge(
        arc, arc.settings, cd, fields(amount=Decimal("15.00")), actor="u", reason=None
    )
    assert [(e.version, e.actor, e.reason) for e in charge_events(arc, cd)] == [
        (1, "t", "entered by hand"),
        (2, "u", "tariff"),
    ]
    # On a draft invoice it waits; issued (billed) it never changes.
    invoice = create_invoice(arc, arc.settings, charge_ids=[cd], actor="t")
    with pytest.raises(BillingError, match="draft invoice"):
        update_charge(arc, arc.settings, cd, fields(amount=Decimal("16")), actor="u", reason=None)
    issue_invoice(arc, arc.settings, invoice, actor="t")
    with pytest.raises(BillingError, match="credit it"):
        update_charge(arc, arc.settings, cd, fields(amount=Decimal("16")), actor="u", reason=None)
    # A captured charge: what it is for does not change; planned, it is priced by hand; voided
    # with a reason.
    study = store(arc, ct_study(1, patient_id="PAT-M", modality="US", body_part="KNEE"))
    (captured,) = capture_technical(arc, arc.settings, study)
    current = charge_fields(charge(arc, captured))
    assert current.status == "planned"
    with pytest.raises(BillingError, match="cannot change"):
        update_charge(
            arc,
            arc.settings,
            captured,
            ChargeFields(**{**current.__dict__, "display": "x"}),
            actor="u",
            reason=None,
        )
    priced = ChargeFields(**{**current.__dict__, "amount": Decimal("55"), "status": "billable"})
    assert update_charge(arc, arc.settings, captured, priced, actor="u", reason="by hand")
    assert (charge(arc, captured).status, charge(arc, captured).total) == (
        "billable",
        Decimal("55.00"),
    )
    voided = ChargeFields(
        **{**charge_fields(charge(arc, captured)).__dict__, "status": "entered-in-error"}
    )
    with pytest.raises(BillingError, match="reason"):
        update_charge(arc, arc.settings, captured, voided, actor="u", reason=None)
    update_charge(arc, arc.settings, captured, voided, actor="u", reason="duplicate")
    assert [e.status for e in charge_events(arc, captured)] == [
        "planned",
        "billable",
        "entered-in-error",
    ]
    with pytest.raises(BillingError, match="entered-in-error"):
        update_charge(arc, arc.settings, captured, priced, actor="u", reason=None)


def test_reconciliation_is_all_or_nothing_and_accounts(arc: Archive):
    patient = a_patient(arc)
    one, _ = create_manual_charge(
        arc, arc.settings, patient_fk=patient, fields_=fields(), actor="t"
    )
    two, _ = create_manual_charge(
        arc, arc.settings, patient_fk=patient, fields_=fields(quantity=4), actor="t"
    )
    first = create_invoice(arc, arc.settings, charge_ids=[one], actor="t")
    second = create_invoice(arc, arc.settings, charge_ids=[two], actor="t")
    for invoice in (first, second):
        issue_invoice(arc, arc.settings, invoice, actor="t")
    with pytest.raises(BillingError, match="overpayment"):
        record_reconciliation(
            arc,
            [Detail(first, Decimal("25")), Detail(second, Decimal("50.01"))],
            payment_date=DAY,
            actor="t",
        )
    with arc.db.session() as session:
        assert session.scalars(select(Payment)).all() == []
    with pytest.raises(BillingError, match="not the sum"):
        record_reconciliation(
            arc, [Detail(first, Decimal("25"))], payment_date=DAY, actor="t", amount=Decimal("26")
        )
    paid = record_reconciliation(
        arc,
        [Detail(first, Decimal("25")), Detail(second, Decimal("50"))],
        payment_date=DAY,
        actor="t",
        reference="BANK-7",
    )
    assert [invoice_json(arc, i)["status"] for i in (first, second)] == ["balanced", "balanced"]
    with arc.db.session() as session:
        assert {p.reconciliation_fk for p in session.scalars(select(Payment))} == {paid}
    # The account: guarantor and coverage; inactive, it takes no new invoice.
    account = charge(arc, one).account_fk
    assert update_account(
        arc,
        account,
        name="Self-pay",
        status="inactive",
        guarantor=[{"party": {"display": "G"}}],
        coverage=None,
    )
    assert not update_account(
        arc,
        account,
        name="Self-pay",
        status="inactive",
        guarantor=[{"party": {"display": "G"}}],
        coverage=None,
    )
    more, _ = create_manual_charge(
        arc, arc.settings, patient_fk=patient, fields_=fields(), actor="t"
    )
    with pytest.raises(BillingError, match="inactive"):
        create_invoice(arc, arc.settings, charge_ids=[more], actor="t")
    with pytest.raises(ChargeConflict):
        update_account(
            arc,
            account,
            name=None,
            status="active",
            guarantor=None,
            coverage=None,
            expected_version=1,
        )
    with pytest.raises(BillingError, match="active or inactive"):
        update_account(arc, account, name=None, status="closed", guarantor=None, coverage=None)


def test_charge_commands(arc: Archive, index_backend: Backend, tmp_path: Path):
    a_patient(arc, "PAT-CLI")
    added = run_cli(
        index_backend,
        tmp_path,
        "billing",
        "charge",
        "add",
        "--patient",
        "PAT-CLI",
        "--text",
        "Images on CD",
        "--code",
        "local:CD-COPY",
        "--amount",
        "12.50",
        "--quantity",
        "2",
        "--identifier",
        "X1",
        "--json",
    )
    assert added.returncode == 0, added.stderr
    (row,) = json.loads(added.stdout)
    assert (row["status"], row["total"], row["code"]) == ("billable", "25.00", "CD-COPY")
    again = run_cli(
        index_backend,
        tmp_path,
        "billing",
        "charge",
        "add",
        "--patient",
        "PAT-CLI",
        "--text",
        "Images on CD",
        "--amount",
        "12.50",
        "--identifier",
        "X1",
        "--json",
    )
    assert json.loads(again.stdout)[0]["id"] == row["id"]
    planned = run_cli(
        index_backend,
        tmp_path,
        "billing",
        "charge",
        "add",
        "--patient",
        "PAT-CLI",
        "--text",
        "Consultation",
        "--json",
    )
    (waiting,) = json.loads(planned.stdout)
    assert waiting["status"] == "planned"
    priced = run_cli(
        index_backend,
        tmp_path,
        "billing",
        "charge",
        "price",
        str(waiting["id"]),
        "80.00",
        "--reason",
        "tariff",
    )
    assert priced.returncode == 0, priced.stderr
    assert charge(arc, waiting["id"]).total == Decimal("80.00")
    voided = run_cli(
        index_backend,
        tmp_path,
        "billing",
        "charge",
        "void",
        str(row["id"]),
        "--reason",
        "duplicate",
    )
    assert voided.returncode == 0, voided.stderr
    assert [c.status for c in list_charges(arc, patient="PAT-CLI")] == [
        "entered-in-error",
        "billable",
    ]
    unknown = run_cli(
        index_backend, tmp_path, "billing", "charge", "add", "--patient", "NOBODY", "--text", "x"
    )
    assert unknown.returncode == 1 and "no patient 'NOBODY'" in unknown.stdout + unknown.stderr
    bad = run_cli(
        index_backend, tmp_path, "billing", "charge", "price", str(waiting["id"]), "1.234"
    )
    assert bad.returncode == 1 and "more than 2 decimals" in bad.stdout + bad.stderr
