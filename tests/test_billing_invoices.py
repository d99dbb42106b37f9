"""Invoices and payments: create → issue → partial and final payment → balanced, overpayment
refused, refunds, cancelling, immutability of an issued invoice, credits, overdue, totals
recomputed from the history, Decimal exactness, invoices entered in error (voided), the CLI, and
(PostgreSQL) two concurrent payers: two processes (spawned), each with its own Archive and so its
own engine and connection, released together."""

from __future__ import annotations

import json
import multiprocessing
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from archive import Archive
from billing.capture import capture_technical, charge_events, list_charges, void_study
from billing.invoices import (
    BillingError,
    add_charges,
    balance,
    cancel_invoice,
    create_invoice,
    credit_charge,
    invoice_json,
    issue_invoice,
    recompute_from_history,
    record_payment,
    void_invoice,
)
from billing.models import ChargeItem, Invoice
from billing.prices import cents, load_price_list, store_price_list
from config import Settings
from tests.conftest import Backend
from tests.test_billing_capture import SAMPLE, code, ct_study, run_cli, store

HEAD = Decimal("202.30")  # CT head, no code: 170.00 + VAT 32.30
CHEST = Decimal("365.92")  # CT chest with contrast after hours (see test_billing_capture)


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    parsed = load_price_list(SAMPLE)
    store_price_list(archive, parsed, "sample", parsed.sha256, loaded_by="test")
    yield archive
    archive.close()


def two_charges(arc: Archive, patient_id: str = "PAT-I") -> tuple[int, int, int]:
    """(account, head charge, chest charge) of one patient."""
    head = store(arc, ct_study(1, patient_id=patient_id))
    chest = store(
        arc,
        ct_study(
            1,
            patient_id=patient_id,
            body_part="CHEST",
            procedure=code("24627-2", "LN", "CT Chest"),
            contrast="IODINE",
            study_time="210000",
        ),
    )
    (head_id,) = capture_technical(arc, arc.settings, head)
    (chest_id,) = capture_technical(arc, arc.settings, chest)
    (charge,) = list_charges(arc, study=head)
    return charge.account_fk, head_id, chest_id


def charge(arc: Archive, charge_id: int) -> ChargeItem:
    with arc.db.session() as session:
        found = session.get(ChargeItem, charge_id)
        assert found is not None
        return found


def study_of(arc: Archive, charge_id: int) -> str:
    uid = charge(arc, charge_id).study_instance_uid
    assert uid is not None
    return uid


def invoice(arc: Archive, invoice_id: int) -> Invoice:
    with arc.db.session() as session:
        found = session.get(Invoice, invoice_id)
        assert found is not None
        return found


def assert_history_agrees(arc: Archive, invoice_id: int) -> None:
    stored = invoice(arc, invoice_id)
    again = recompute_from_history(arc, invoice_id)
    paid = Decimal(invoice_json(arc, invoice_id)["paid"])
    assert (again.net, again.tax, again.gross, again.paid) == (
        stored.net,
        stored.tax,
        stored.gross,
        paid,
    )
    assert (again.status, again.version) == (stored.status, stored.version)


def test_create_issue_pay_in_parts_balanced(arc: Archive):
    account, head, chest = two_charges(arc)
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    draft = invoice_json(arc, invoice_id)
    assert draft["status"] == "draft"
    assert [line["charge"] for line in draft["lines"]] == [head, chest]
    assert (draft["net"], draft["tax"], draft["gross"]) == ("477.50", "90.72", "568.22")
    assert Decimal(draft["gross"]) == HEAD + CHEST
    assert draft["lines"][1]["components"] == charge(arc, chest).lines
    assert charge(arc, head).status == "billable"  # billed only when issued

    issued_at = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk", now=issued_at)
    issued = invoice(arc, invoice_id)
    assert issued.status == "issued" and issued.due_on == date(2026, 4, 9)  # 30 days
    assert {charge(arc, head).status, charge(arc, chest).status} == {"billed"}
    last = charge_events(arc, head)[-1]
    assert (last.status, last.actor, last.reason) == (
        "billed",
        "clerk",
        f"billed on invoice {invoice_id}",
    )

    record_payment(arc, invoice_id, Decimal("100.00"), actor="cashier", reference="T-1")
    assert invoice(arc, invoice_id).status == "issued"
    on_due_day = balance(arc, patient_id="PAT-I", today=date(2026, 4, 9))
    assert on_due_day == (Decimal("568.22"), Decimal("100.00"), Decimal("468.22"), Decimal("0"))
    late = balance(arc, account_id=account, today=date(2026, 4, 10))
    assert late.overdue == Decimal("468.22") and late.outstanding == Decimal("468.22")

    record_payment(arc, invoice_id, "468.22", actor="cashier")
    assert invoice(arc, invoice_id).status == "balanced"
    assert balance(arc, patient_id="PAT-I", today=date(2026, 5, 1)) == (
        Decimal("568.22"),
        Decimal("568.22"),
        Decimal("0.00"),
        Decimal("0.00"),
    )
    assert balance(arc, patient_id="PAT-I", issuer="OTHER").billed == 0
    assert [e["status"] for e in invoice_json(arc, invoice_id)["events"]] == [
        "draft",
        "issued",
        "issued",
        "balanced",
    ]
    assert_history_agrees(arc, invoice_id)


def test_overpayment_refused_refund_reopens(arc: Archive):
    account, _, _ = two_charges(arc)
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    with pytest.raises(BillingError, match="issued invoices"):
        record_payment(arc, invoice_id, "1.00", actor="cashier")  # still a draft
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    with pytest.raises(BillingError, match=r"overpayment: outstanding is 568\.22, payment 568\.23"):
        record_payment(arc, invoice_id, "568.23", actor="cashier")
    with pytest.raises(BillingError, match="2 decimals"):
        record_payment(arc, invoice_id, "1.001", actor="cashier")
    with pytest.raises(BillingError, match="records nothing"):
        record_payment(arc, invoice_id, "0", actor="cashier")
    record_payment(arc, invoice_id, "568.22", actor="cashier")
    assert invoice(arc, invoice_id).status == "balanced"
    with pytest.raises(BillingError, match=r"overpayment: outstanding is 0\.00, payment 0\.01"):
        record_payment(arc, invoice_id, "0.01", actor="cashier")

    with pytest.raises(BillingError, match="requires a reason"):
        record_payment(arc, invoice_id, "-10.00", actor="cashier")
    with pytest.raises(BillingError, match="beyond what was paid"):
        record_payment(arc, invoice_id, "-568.23", actor="cashier", reason="too much")
    record_payment(arc, invoice_id, "-68.22", actor="cashier", reason="goodwill")
    assert invoice(arc, invoice_id).status == "issued"
    assert balance(arc, account_id=account).outstanding == Decimal("68.22")
    with pytest.raises(BillingError, match="has payments"):
        cancel_invoice(arc, invoice_id, reason="oops", actor="clerk")
    assert_history_agrees(arc, invoice_id)


def test_cancel_returns_charges_to_billable(arc: Archive):
    account, head, chest = two_charges(arc)
    invoice_id = create_invoice(arc, arc.settings, charge_ids=[head], actor="clerk")
    with pytest.raises(BillingError, match=f"charge {head} is on invoice {invoice_id}"):
        create_invoice(arc, arc.settings, charge_ids=[head, chest], actor="clerk")
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    with pytest.raises(BillingError, match=f"charge {head} is billed"):
        create_invoice(arc, arc.settings, charge_ids=[head], actor="clerk")
    with pytest.raises(BillingError, match="reason is required"):
        cancel_invoice(arc, invoice_id, reason=" ", actor="clerk")
    cancel_invoice(arc, invoice_id, reason="wrong patient", actor="clerk")
    cancelled = invoice(arc, invoice_id)
    assert (cancelled.status, cancelled.cancelled_reason) == ("cancelled", "wrong patient")
    assert charge(arc, head).status == "billable"
    assert "wrong patient" in (charge_events(arc, head)[-1].reason or "")
    assert balance(arc, account_id=account).billed == 0
    again = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    assert [line["charge"] for line in invoice_json(arc, again)["lines"]] == [head, chest]
    with pytest.raises(BillingError, match="cannot be cancelled"):
        cancel_invoice(arc, invoice_id, reason="twice", actor="clerk")
    assert_history_agrees(arc, invoice_id)


def test_void_an_invoice_made_by_mistake(arc: Archive):
    account, head, chest = two_charges(arc)
    draft = create_invoice(arc, arc.settings, charge_ids=[head], actor="clerk")
    with pytest.raises(BillingError, match="a reason is required to void an invoice"):
        void_invoice(arc, draft, reason=" ", actor="clerk")
    head_version = charge(arc, head).version
    void_invoice(arc, draft, reason="made for the wrong account", actor="clerk")
    voided = invoice(arc, draft)
    assert (voided.status, voided.cancelled_reason, voided.version) == (
        "entered-in-error",
        "made for the wrong account",
        2,
    )
    last = invoice_json(arc, draft)["events"][-1]
    assert (last["status"], last["actor"], last["reason"]) == (
        "entered-in-error",
        "clerk",
        "made for the wrong account",
    )
    # a draft's charges were never billed: they stay billable, unchanged
    assert (charge(arc, head).status, charge(arc, head).version) == ("billable", head_version)
    assert_history_agrees(arc, draft)
    with pytest.raises(BillingError, match="is entered-in-error: it cannot be voided"):
        void_invoice(arc, draft, reason="twice", actor="clerk")
    with pytest.raises(BillingError, match="is entered-in-error: it cannot be cancelled"):
        cancel_invoice(arc, draft, reason="twice", actor="clerk")
    with pytest.raises(BillingError, match="payments go on issued invoices"):
        record_payment(arc, draft, "1.00", actor="cashier")

    # an issued invoice without payments: its billed charges are billable again, each with
    # a charge event giving the reason; they go on the next invoice
    issued = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    issue_invoice(arc, arc.settings, issued, actor="clerk")
    assert {charge(arc, head).status, charge(arc, chest).status} == {"billed"}
    void_invoice(arc, issued, reason="duplicate of another invoice", actor="clerk")
    assert (invoice(arc, issued).status, invoice(arc, issued).cancelled_reason) == (
        "entered-in-error",
        "duplicate of another invoice",
    )
    for charge_id in (head, chest):
        assert charge(arc, charge_id).status == "billable"
        event = charge_events(arc, charge_id)[-1]
        assert (event.status, event.actor, event.reason) == (
            "billable",
            "clerk",
            f"invoice {issued} entered in error: duplicate of another invoice",
        )
    assert balance(arc, account_id=account).billed == 0  # not billed any more
    assert_history_agrees(arc, issued)

    # with payments, or balanced: refused, naming why
    again = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    assert [line["charge"] for line in invoice_json(arc, again)["lines"]] == [head, chest]
    issue_invoice(arc, arc.settings, again, actor="clerk")
    record_payment(arc, again, "100.00", actor="cashier")
    with pytest.raises(BillingError, match=f"invoice {again} has payments: refund them first"):
        void_invoice(arc, again, reason="oops", actor="clerk")
    record_payment(arc, again, "468.22", actor="cashier")
    with pytest.raises(BillingError) as refused:
        void_invoice(arc, again, reason="oops", actor="clerk")
    assert str(refused.value) == (
        f"invoice {again} is balanced (paid in full): it cannot be voided; "
        "refund its payments first, or credit its charges"
    )
    record_payment(arc, again, "-568.22", actor="cashier", reason="refund all")
    assert invoice(arc, again).status == "issued"
    with pytest.raises(BillingError, match="has payments"):
        void_invoice(arc, again, reason="oops", actor="clerk")  # refunded, still paid once
    assert {charge(arc, head).status, charge(arc, chest).status} == {"billed"}
    assert_history_agrees(arc, again)


def test_void_cli(arc: Archive, index_backend: Backend, tmp_path: Path):
    _, head, _ = two_charges(arc)
    invoice_id = create_invoice(arc, arc.settings, charge_ids=[head], actor="clerk")
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    missing = run_cli(index_backend, tmp_path, "billing", "invoice", "void", str(invoice_id))
    assert missing.returncode == 2 and "--reason" in missing.stderr
    voided = run_cli(
        index_backend,
        tmp_path,
        "billing",
        "invoice",
        "void",
        str(invoice_id),
        "--reason",
        "wrong patient",
    )
    assert voided.returncode == 0, voided.stderr
    shown = run_cli(
        index_backend, tmp_path, "billing", "invoice", "show", str(invoice_id), "--json"
    )
    row = json.loads(shown.stdout)
    assert (row["status"], row["cancelled_reason"], row["outstanding"]) == (
        "entered-in-error",
        "wrong patient",
        "0.00",
    )
    assert charge(arc, head).status == "billable"
    twice = run_cli(
        index_backend, tmp_path, "billing", "invoice", "void", str(invoice_id), "--reason", "x"
    )
    assert twice.returncode == 1
    assert f"invoice {invoice_id} is entered-in-error: it cannot be voided" in twice.stderr


def test_refuses_planned_and_voided_charges(arc: Archive):
    account, head, _ = two_charges(arc)
    knee = store(arc, ct_study(1, patient_id="PAT-I", modality="US", body_part="KNEE"))
    (planned,) = capture_technical(arc, arc.settings, knee)
    void_study(arc, study_of(arc, head), actor="test")
    with pytest.raises(BillingError) as refused:
        create_invoice(arc, arc.settings, charge_ids=[planned, head], actor="clerk")
    assert str(refused.value) == (
        f"not billable: charge {head} is entered-in-error; charge {planned} is planned"
    )
    with pytest.raises(BillingError, match="no such charge: 999999"):
        create_invoice(arc, arc.settings, charge_ids=[999999], actor="clerk")
    with pytest.raises(BillingError, match="one of them"):
        create_invoice(arc, arc.settings, actor="clerk")
    # an account's invoice takes only its billable charges
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    assert invoice(arc, invoice_id).gross == CHEST


def test_issued_invoice_is_immutable_and_a_credit_goes_on_the_next(arc: Archive):
    account, head, chest = two_charges(arc)
    first = create_invoice(arc, arc.settings, charge_ids=[head], actor="clerk")
    add_charges(arc, first, [chest], actor="clerk")  # a draft changes
    issue_invoice(arc, arc.settings, first, actor="clerk")
    other = store(arc, ct_study(1, patient_id="PAT-I", study_date="20260305"))
    (late,) = capture_technical(arc, arc.settings, other)
    with pytest.raises(BillingError, match="only a draft changes"):
        add_charges(arc, first, [late], actor="clerk")
    with pytest.raises(BillingError, match="only a draft is issued"):
        issue_invoice(arc, arc.settings, first, actor="clerk")
    # voiding the study leaves a billed charge alone: a credit is required
    assert void_study(arc, study_of(arc, chest), actor="test") == 0
    assert charge(arc, chest).status == "billed"

    with pytest.raises(BillingError, match="only a billed charge"):
        credit_charge(arc, late, reason="x", actor="clerk")
    credit = credit_charge(arc, chest, reason="contrast not given", actor="clerk")
    with pytest.raises(BillingError, match="credited already"):
        credit_charge(arc, chest, reason="again", actor="clerk")
    made = charge(arc, credit)
    assert (made.status, made.kind, made.idempotency_key) == (
        "billable",
        "technical",
        f"credit|{chest}",
    )
    assert (made.net, made.tax, made.total) == (Decimal("-307.50"), Decimal("-58.42"), -CHEST)
    assert invoice(arc, first).gross == HEAD + CHEST  # unchanged
    assert (
        charge_events(arc, chest)[-1].reason == f"credited by charge {credit}: contrast not given"
    )

    with pytest.raises(BillingError, match=r"negative \(-163\.62\): credits exceed charges"):
        create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    chest_again = store(
        arc,
        ct_study(
            1,
            patient_id="PAT-I",
            study_date="20260306",
            body_part="CHEST",
            procedure=code("24627-2", "LN", "CT Chest"),
            contrast="IODINE",
            study_time="210000",
        ),
    )
    (redone,) = capture_technical(arc, arc.settings, chest_again)
    second = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    assert [line["charge"] for line in invoice_json(arc, second)["lines"]] == [
        late,
        credit,
        redone,
    ]
    assert invoice(arc, second).gross == HEAD
    issue_invoice(arc, arc.settings, second, actor="clerk")
    assert charge(arc, credit).status == "billed"
    with pytest.raises(BillingError, match="is a credit itself"):
        credit_charge(arc, credit, reason="x", actor="clerk")
    assert balance(arc, account_id=account).billed == HEAD + CHEST + HEAD
    assert_history_agrees(arc, first)


def test_due_date_from_payment_terms_and_overdue(arc: Archive):
    account, _, _ = two_charges(arc)
    arc.settings.billing.payment_terms_days = 14
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    issue_invoice(
        arc, arc.settings, invoice_id, actor="clerk", now=datetime.now(UTC) - timedelta(days=20)
    )
    shown = invoice_json(arc, invoice_id)
    assert shown["overdue"] is True
    assert shown["due_on"] == (datetime.now(UTC) - timedelta(days=6)).date().isoformat()
    record_payment(arc, invoice_id, "500.00", actor="cashier")
    assert balance(arc, patient_id="PAT-I").overdue == Decimal("68.22")


def test_decimal_exact_with_many_lines(arc: Archive):
    account, _, _ = two_charges(arc)
    rng = random.Random(20261207)
    expected_net = expected_tax = Decimal("0.00")
    now = datetime.now(UTC)
    with arc.db.write_session() as session:
        template = session.get(ChargeItem, 1)
        assert template is not None
        for number in range(300):
            net = Decimal(rng.randint(1, 99_999)) / 100
            tax = cents(net * Decimal("0.19"))
            expected_net, expected_tax = expected_net + net, expected_tax + tax
            session.add(
                ChargeItem(
                    account_fk=account,
                    patient_id="PAT-I",
                    issuer_of_patient_id="",
                    kind="technical",
                    status="billable",
                    idempotency_key=f"test|{number}",
                    study_instance_uid="1.2.3",
                    service_kind="study",
                    service_uid="1.2.3",
                    display=f"line {number}",
                    occurred_on=date(2026, 3, 4),
                    conditions=[],
                    lines=[
                        {"type": "base", "code": "base", "description": "", "amount": str(net)},
                        {"type": "tax", "code": "VAT", "description": "", "amount": str(tax)},
                    ],
                    net=net,
                    tax=tax,
                    total=net + tax,
                    currency="EUR",
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    stored = invoice(arc, invoice_id)
    expected_net += Decimal("477.50")
    expected_tax += Decimal("90.72")
    assert (stored.net, stored.tax) == (expected_net, expected_tax)
    assert stored.gross == expected_net + expected_tax
    assert isinstance(stored.gross, Decimal)
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    left = stored.gross
    while left > 0:
        part = min(left, Decimal(rng.randint(1, 5_000_000)) / 100)
        record_payment(arc, invoice_id, part, actor="cashier")
        left -= part
    assert invoice(arc, invoice_id).status == "balanced"
    assert balance(arc, account_id=account).outstanding == 0
    assert_history_agrees(arc, invoice_id)


def test_cli(arc: Archive, index_backend: Backend, tmp_path: Path):
    account, head, chest = two_charges(arc)
    created = run_cli(
        index_backend, tmp_path, "billing", "invoice", "create", "--charges", f"{head},{chest}"
    )
    assert created.returncode == 0, created.stderr
    invoice_id = int(created.stdout.strip())
    issued = run_cli(index_backend, tmp_path, "billing", "invoice", "issue", str(invoice_id))
    assert issued.returncode == 0, issued.stderr
    over = run_cli(index_backend, tmp_path, "billing", "pay", str(invoice_id), "600.00")
    assert over.returncode == 1
    assert "overpayment: outstanding is 568.22, payment 600.00" in over.stderr
    paid = run_cli(
        index_backend, tmp_path, "billing", "pay", str(invoice_id), "68.22", "--reference", "R1"
    )
    assert paid.returncode == 0, paid.stderr
    shown = run_cli(
        index_backend, tmp_path, "billing", "invoice", "show", str(invoice_id), "--json"
    )
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout)
    assert (row["status"], row["paid"], row["outstanding"]) == ("issued", "68.22", "500.00")
    assert row["payments"][0]["reference"] == "R1"
    text = run_cli(index_backend, tmp_path, "billing", "invoice", "show", str(invoice_id))
    assert text.returncode == 0 and "outstanding 500.00" in text.stdout
    owed = run_cli(index_backend, tmp_path, "billing", "balance", "--patient", "PAT-I", "--json")
    assert owed.returncode == 0, owed.stderr
    assert json.loads(owed.stdout) == {
        "billed": "568.22",
        "paid": "68.22",
        "outstanding": "500.00",
        "overdue": "0.00",
    }
    by_account = run_cli(index_backend, tmp_path, "billing", "balance", "--account", str(account))
    assert by_account.returncode == 0 and "outstanding 500.00" in by_account.stdout
    refused = run_cli(
        index_backend, tmp_path, "billing", "invoice", "cancel", str(invoice_id), "--reason", "x"
    )
    assert refused.returncode == 1 and "has payments" in refused.stderr
    missing = run_cli(index_backend, tmp_path, "billing", "invoice", "show", "999999")
    assert missing.returncode == 1 and "no invoice 999999" in missing.stderr


def _pay_in_child(
    settings: Settings,
    invoice_id: int,
    amount: str,
    name: str,
    barrier: Any,
    results: Any,
) -> None:
    """A payer in its own (spawned) process: its own Archive, engine and connection; waits at
    the barrier for the other payer, then pays; puts ``(name, "paid" | the error)``."""
    own = Archive(settings)
    try:
        barrier.wait(120)
        record_payment(own, invoice_id, amount, actor=name)
        results.put((name, "paid"))
    except BillingError as exc:
        results.put((name, str(exc)))
    except BaseException as exc:
        results.put((name, f"unexpected {type(exc).__name__}: {exc}"))
        raise
    finally:
        own.close()


def test_concurrent_payments_from_two_processes_never_overpay(arc: Archive, index_backend: Backend):
    if index_backend.index != "postgresql":
        pytest.skip("two writers at once: PostgreSQL (SQLite writes are serialised)")
    account, _, _ = two_charges(arc)
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    outstanding = invoice_json(arc, invoice_id)["outstanding"]
    assert outstanding == "568.22"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    payers = [
        context.Process(
            target=_pay_in_child,
            args=(arc.settings, invoice_id, outstanding, f"payer-{n}", barrier, results),
        )
        for n in range(2)
    ]
    for payer in payers:
        payer.start()
    try:
        outcomes = dict(results.get(timeout=180) for _ in payers)
    finally:
        for payer in payers:
            payer.join(30)
            if payer.is_alive():
                payer.kill()
    assert [payer.exitcode for payer in payers] == [0, 0]
    assert sorted(outcomes) == ["payer-0", "payer-1"]
    assert sorted(outcomes.values()) == [
        "overpayment: outstanding is 0.00, payment 568.22",
        "paid",
    ]
    stored = invoice(arc, invoice_id)
    assert stored.status == "balanced"
    assert Decimal(invoice_json(arc, invoice_id)["paid"]) == stored.gross == Decimal("568.22")
    assert balance(arc, account_id=account).paid == Decimal("568.22")
    assert_history_agrees(arc, invoice_id)
