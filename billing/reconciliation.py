"""Payment reconciliations: one remittance (a bank transfer, a card payment, an insurer's
payment run) paying one or more invoices, recorded in one transaction — every payment of it or
none (an overpayment of any invoice refuses the whole remittance).

Its amount is the sum of its payments. The invoices are locked in id order, so two
remittances paying the same invoices never deadlock, and each payment follows the rules of
``billing.invoices.record_payment`` (an invoice paid in full turns ``balanced`` in the same
transaction; a negative payment is a refund with a reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import select

from archive import Archive
from archive.audit import AuditEvent, record_change
from billing.invoices import ZERO, BillingError, checked_payment, invoice_patient, pay
from billing.models import Payment, PaymentReconciliation


@dataclass(frozen=True)
class Detail:
    invoice_id: int
    amount: Decimal


def record_reconciliation(
    archive: Archive,
    details: list[Detail],
    *,
    payment_date: date,
    actor: str,
    reference: str | None = None,
    disposition: str | None = None,
    reason: str | None = None,
    amount: Decimal | None = None,
    audit: AuditEvent | None = None,
) -> int:
    """Record the payments of one remittance; ``amount``, when given, must be their sum.
    Returns the reconciliation's id. ``audit``: the caller's audit event, committed with the
    payments (naming the patient when every invoice paid is one patient's)."""
    if not details:
        raise BillingError("a payment reconciliation pays at least one invoice")
    values = [(d.invoice_id, checked_payment(d.amount, reason)) for d in details]
    total = sum((v for _, v in values), ZERO)
    if amount is not None and checked_payment(amount, reason) != total:
        raise BillingError(f"the payment amount {amount} is not the sum of its details ({total})")
    if len({i for i, _ in values}) != len(values):
        raise BillingError("an invoice is paid at most once by one reconciliation")
    now = datetime.now(UTC)
    with archive.db.write_session() as session:
        reconciliation = PaymentReconciliation(
            amount=total,
            payment_date=payment_date,
            reference=reference,
            disposition=disposition,
            actor=actor[:64],
            created_at=now,
        )
        session.add(reconciliation)
        session.flush()
        for invoice_id, value in sorted(values):
            pay(
                session,
                invoice_id,
                value,
                actor=actor,
                reason=reason,
                reference=reference,
                received_at=now,
                reconciliation_id=reconciliation.id,
            )
        patients = {invoice_patient(session, invoice_id) for invoice_id, _ in values}
        record_change(
            session,
            audit,
            entity=f"PaymentReconciliation/{reconciliation.id}",
            patient_id=patients.pop() if len(patients) == 1 else None,
        )
        return int(reconciliation.id)


def reconciliation_payments(archive: Archive, reconciliation_id: int) -> list[Payment]:
    with archive.db.session() as session:
        return list(
            session.scalars(
                select(Payment)
                .where(Payment.reconciliation_fk == reconciliation_id)
                .order_by(Payment.invoice_fk)
            ).all()
        )
