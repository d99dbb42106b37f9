"""Invoices and payments: an invoice of one account's billable charges, issued (immutable from
then on), paid (partial payments, refunds), cancelled; balances per account and per patient.

**States**: ``draft`` → ``issued`` → ``balanced`` (paid in full; a refund reopens it to
``issued``); ``draft`` or ``issued`` without payments → ``cancelled``, or ``entered-in-error``
when it was made by mistake (:func:`void_invoice`; a reason is required for either). A charge
is on at most one live (not cancelled nor entered-in-error) invoice; issuing turns its charges
``billed``, cancelling or voiding turns them back ``billable``. An issued invoice never
changes: a charge billed by mistake is corrected by :func:`credit_charge` — a new charge with
negative amounts that goes on the next invoice.

**Money**: ``Decimal`` only, cents (``NUMERIC(12,2)``). An invoice line is one charge: its net,
tax (the charge's priced tax lines) and gross (its total) as priced by ``billing.prices`` (each
priced line rounded on its own, ``ROUND_HALF_EVEN``); the invoice's totals are the sums of its
lines, so nothing is rounded again.

**Concurrency**: every function is one transaction. Payments and status changes lock the
invoice row (``SELECT … FOR UPDATE`` on PostgreSQL) before reading what was paid, so two
processes paying the outstanding amount at once never overpay: the second waits, then sees the
first payment. Invoicing locks the charges' rows the same way. SQLite writes are serialised by
the archive's write session.

**Audit**: every change writes an ``invoice_event`` (version, status, who, when, why, gross and
amount paid after it) and every change of a charge a ``charge_event``, in the transaction of the
change; :func:`recompute_from_history` recomputes an invoice's totals from its lines, payments
and events.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple, cast

from sqlalchemy import Integer, String, Table, and_, bindparam, case, false, func, insert, select
from sqlalchemy.orm import Session, aliased

from archive import Archive
from archive.audit import AuditEvent, record_change
from archive.outbox import emit
from billing.capture import BILLABLE, _change, _event, announce_charge
from billing.models import (
    BillingAccount,
    ChargeItem,
    Invoice,
    InvoiceEvent,
    InvoiceLine,
    Payment,
    PaymentReconciliation,
)
from config import Settings

DRAFT = "draft"
ISSUED = "issued"
BALANCED = "balanced"
CANCELLED = "cancelled"
ENTERED_IN_ERROR = "entered-in-error"
#: Invoices a charge may be on (at most one of them).
LIVE_STATUSES = (DRAFT, ISSUED, BALANCED)
#: The charge status of a charge on an issued invoice.
BILLED = "billed"
ZERO = Decimal("0.00")


class BillingError(ValueError):
    """A billing operation refused (the message says why)."""


class Balance(NamedTuple):
    billed: Decimal
    """The gross of the issued and balanced invoices."""
    paid: Decimal
    outstanding: Decimal
    overdue: Decimal
    """The outstanding amount of the invoices past their due date."""


class Recomputed(NamedTuple):
    net: Decimal
    tax: Decimal
    gross: Decimal
    """Sums of the invoice's lines."""
    paid: Decimal
    """Sum of its payments (refunds negative)."""
    status: str
    version: int
    """Of its last event."""


def money(value: Decimal | str | int) -> Decimal:
    """An amount in cents: a ``Decimal`` (or its string) with at most 2 decimals."""
    if isinstance(value, float):
        raise BillingError(f"amount {value!r}: a float, not a decimal amount")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise BillingError(f"amount {value!r}: not a decimal amount") from exc
    if not amount.is_finite():
        raise BillingError(f"amount {value!r}: not a decimal amount")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        raise BillingError(f"amount {value!r}: more than 2 decimals")
    return amount.quantize(Decimal("0.01"))


def _lock(session: Session, invoice_id: int) -> Invoice:
    invoice = session.scalars(
        select(Invoice).where(Invoice.id == invoice_id).with_for_update()
    ).first()
    if invoice is None:
        raise BillingError(f"no invoice {invoice_id}")
    return invoice


def _paid(session: Session, invoice_id: int) -> Decimal:
    total = session.scalar(
        select(func.coalesce(func.sum(Payment.amount), 0)).where(Payment.invoice_fk == invoice_id)
    )
    return Decimal(total or 0).quantize(Decimal("0.01"))


def _invoice_event(
    session: Session, invoice: Invoice, paid: Decimal, actor: str, reason: str | None
) -> None:
    session.add(
        InvoiceEvent(
            invoice_fk=invoice.id,
            version=invoice.version,
            status=invoice.status,
            at=datetime.now(UTC),
            actor=actor[:64],
            reason=reason,
            gross=invoice.gross,
            paid=paid,
        )
    )


def invoice_patient(session: Session, invoice_id: int) -> str | None:
    """The Patient ID of an invoice's account (for its audit events)."""
    return session.scalar(
        select(BillingAccount.patient_id)
        .join(Invoice, Invoice.account_fk == BillingAccount.id)
        .where(Invoice.id == invoice_id)
    )


def _audit(session: Session, audit: AuditEvent | None, invoice: Invoice) -> None:
    """The caller's audit event of a change of ``invoice``, in the change's transaction."""
    if audit is not None:
        record_change(
            session,
            audit,
            entity=f"Invoice/{invoice.id}",
            patient_id=invoice_patient(session, invoice.id),
        )


def _announce(session: Session, type: str, invoice: Invoice, paid: Decimal, **extra: Any) -> None:
    """The ``invoice.issued`` / ``invoice.paid`` event (archive.outbox) of ``invoice``, in the
    transaction of the change: amounts as strings, never names."""
    emit(
        session,
        type,
        patient_id=invoice_patient(session, invoice.id),
        resource=f"Invoice/{invoice.id}",
        data={
            "invoice_id": invoice.id,
            "version": invoice.version,
            "status": invoice.status,
            "currency": invoice.currency,
            "net": str(invoice.net),
            "tax": str(invoice.tax),
            "gross": str(invoice.gross),
            "paid": str(paid),
            "issued_at": invoice.issued_at.isoformat() if invoice.issued_at else None,
            "due_on": invoice.due_on.isoformat() if invoice.due_on else None,
            **extra,
        },
    )


def _bump(session: Session, invoice: Invoice, status: str, actor: str, reason: str | None) -> None:
    invoice.status = status
    invoice.version += 1
    invoice.updated_at = datetime.now(UTC)
    session.flush()
    _invoice_event(session, invoice, _paid(session, invoice.id), actor, reason)


def _invoiced(session: Session, charge_ids: Iterable[int]) -> dict[int, int]:
    """Charge id → the live invoice it is on."""
    rows = session.execute(
        select(InvoiceLine.charge_fk, InvoiceLine.invoice_fk)
        .join(Invoice, Invoice.id == InvoiceLine.invoice_fk)
        .where(InvoiceLine.charge_fk.in_(list(charge_ids)), Invoice.status.in_(LIVE_STATUSES))
    ).all()
    return {int(charge): int(invoice) for charge, invoice in rows}


# --- adding lines: SQL built once, run with bound parameters --------------------------------

_ON_LINE = aliased(InvoiceLine, name="on_line")
_ON_INVOICE = aliased(Invoice, name="on_invoice")
#: Correlated to ``charge_item`` of the enclosing query: the live invoice its row is on (NULL
#: when none).
_LIVE_INVOICE = (
    select(func.min(_ON_LINE.invoice_fk))
    .join(_ON_INVOICE, _ON_INVOICE.id == _ON_LINE.invoice_fk)
    .where(_ON_LINE.charge_fk == ChargeItem.id, _ON_INVOICE.status.in_(LIVE_STATUSES))
    .scalar_subquery()
)
_PRICED = and_(
    ChargeItem.net.is_not(None), ChargeItem.tax.is_not(None), ChargeItem.total.is_not(None)
)
#: Every rule a charge meets to go on the invoice (``:account``, ``:currency``): billable, on
#: no live invoice, priced, of the invoice's account and currency. Invoicing inserts the lines
#: of the charges that meet them in one ``INSERT … SELECT`` and counts what it inserted; only a
#: refused request looks at each charge (:func:`_refusal`) to say why.
_INVOICEABLE = and_(
    ChargeItem.status == BILLABLE,
    _LIVE_INVOICE.is_(None),
    _PRICED,
    ChargeItem.account_fk == bindparam("account", type_=Integer),
    ChargeItem.currency == bindparam("currency", type_=String),
)
#: The charges asked for: those of ``:ids``, or the billable charges of ``:account``.
_CHARGES = {
    "ids": ChargeItem.id.in_(bindparam("ids", expanding=True)),
    "account": and_(
        ChargeItem.account_fk == bindparam("account", type_=Integer),
        ChargeItem.status == BILLABLE,
    ),
}
_LINE_COLUMNS = [
    "invoice_fk",
    "position",
    "charge_fk",
    "description",
    "code",
    "net",
    "tax",
    "gross",
    "components",
]


def _cents(column: Any) -> Any:
    """SQL: the sum of a money column in whole cents. Exact on both databases: PostgreSQL sums
    ``NUMERIC``; SQLite keeps a ``NUMERIC`` value of 2 decimals as a REAL, which ``round(x *
    100)`` turns into an integral value exactly (and sums of integral values stay exact far
    beyond any invoice: below 2**53 cents)."""
    return func.coalesce(func.sum(func.round(column * 100)), 0)


@functools.cache
def _insert_statement(asked: str) -> Any:
    """``INSERT … SELECT``: one line per charge asked for (:data:`_CHARGES`) that is
    :data:`_INVOICEABLE`, on invoice ``:invoice``, numbered in id order after ``:after``."""
    copied = select(
        bindparam("invoice", type_=Integer),
        func.row_number().over(order_by=ChargeItem.id) + bindparam("after", type_=Integer),
        ChargeItem.id,
        func.substr(ChargeItem.display, 1, 255),
        ChargeItem.code,
        ChargeItem.net,
        ChargeItem.tax,
        ChargeItem.total,
        ChargeItem.lines,
    ).where(_CHARGES[asked], _INVOICEABLE)
    # Core's insert (the ORM's would take the parameters for rows of a bulk insert)
    return insert(cast(Table, InvoiceLine.__table__)).from_select(_LINE_COLUMNS, copied)


@functools.cache
def _totals_statement(asked: str) -> Any:
    """The sums of invoice ``:invoice``'s lines in cents, the number of its lines after
    position ``:after``, and of the charges asked for (:data:`_CHARGES`) left on no live
    invoice once the lines are in: those unpriced or in another currency (the others are on
    this invoice now, or on another live one)."""
    left = (
        select(func.count())
        .select_from(ChargeItem)
        .where(
            _CHARGES[asked],
            ~_PRICED | (ChargeItem.currency != bindparam("currency", type_=String)),
            _LIVE_INVOICE.is_(None),
        )
        .scalar_subquery()
    )
    return select(
        _cents(InvoiceLine.net),
        _cents(InvoiceLine.tax),
        _cents(InvoiceLine.gross),
        func.count(case((InvoiceLine.position > bindparam("after", type_=Integer), 1))),
        left,
    ).where(InvoiceLine.invoice_fk == bindparam("invoice", type_=Integer))


def _locks_rows(session: Session) -> bool:
    """Whether the database locks rows (``SELECT … FOR UPDATE`` on PostgreSQL); SQLite has
    no row locks: the archive's write session serialises its writers."""
    return session.get_bind().dialect.name != "sqlite"


def _lock_charges(session: Session, where: Any) -> list[int]:
    """Lock the charges matching ``where`` (in id order, as every writer of charges does);
    their ids."""
    return list(
        session.scalars(
            select(ChargeItem.id).where(where).order_by(ChargeItem.id).with_for_update()
        ).all()
    )


def _insert_lines(
    session: Session,
    invoice: Invoice,
    *,
    ids: list[int] | None,
    after: int,
) -> tuple[int, int]:
    """One line per charge asked for — those of ``ids``, or (None) the billable charges of
    the invoice's account — that meets every rule (:data:`_INVOICEABLE`), copied from the
    charges by one ``INSERT … SELECT`` in id order after position ``after`` (the invoice's
    last line); the invoice's totals become the sums of its lines, in one more query. Returns
    how many lines were added, and how many of the charges asked for are left on no live
    invoice (those refused)."""
    asked = "ids" if ids is not None else "account"
    params: dict[str, Any] = {
        "invoice": invoice.id,
        "after": after,
        "account": invoice.account_fk,
        "currency": invoice.currency,
    }
    if ids is not None:
        params["ids"] = ids
    session.execute(_insert_statement(asked), params)
    net, tax, gross, added, left_over = session.execute(_totals_statement(asked), params).one()
    invoice.net = _money_of_cents(net)
    invoice.tax = _money_of_cents(tax)
    invoice.gross = _money_of_cents(gross)
    return int(added), int(left_over)


def _money_of_cents(value: Any) -> Decimal:
    return (Decimal(int(value)) / 100).quantize(Decimal("0.01"))


def _refusal(
    session: Session,
    charge_ids: Sequence[int],
    *,
    account: int | None,
    currency: str,
    holder: BillingAccount | None,
    adding: tuple[int, int] | None = None,
) -> str | None:
    """Why the charges (all of them) cannot go on an invoice of ``account`` (None: of the
    one account the charges are of) in ``currency``, naming every charge concerned; None
    when they can. One query; run when invoicing added fewer lines than asked, before the
    transaction is rolled back: the lines of invoice ``adding[0]`` after position
    ``adding[1]``, added by the refused request, are not counted."""
    line, on = aliased(InvoiceLine), aliased(Invoice)
    added = (line.invoice_fk == adding[0]) & (line.position > adding[1]) if adding else false()
    live_invoice = (
        select(func.min(line.invoice_fk))
        .join(on, on.id == line.invoice_fk)
        .where(line.charge_fk == ChargeItem.id, on.status.in_(LIVE_STATUSES), ~added)
        .scalar_subquery()
    )
    rows = session.execute(
        select(
            ChargeItem.id,
            ChargeItem.account_fk,
            ChargeItem.status,
            ChargeItem.currency,
            _PRICED.label("priced"),
            live_invoice.label("invoice"),
        )
        .where(ChargeItem.id.in_(list(charge_ids)))
        .order_by(ChargeItem.id)
    ).all()
    missing = sorted(set(charge_ids) - {r.id for r in rows})
    if missing:
        return "no such charge: " + ", ".join(map(str, missing))
    problems = [f"charge {r.id} is {r.status}" for r in rows if r.status != BILLABLE]
    problems += [f"charge {r.id} is on invoice {r.invoice}" for r in rows if r.invoice is not None]
    if problems:
        return "not billable: " + "; ".join(sorted(problems))
    if account is None:
        accounts = {r.account_fk for r in rows}
        if len(accounts) > 1:
            return "charges of more than one account: " + ", ".join(map(str, sorted(accounts)))
        (account,) = accounts
    if holder is not None and holder.status != "active":
        return f"account {account} is {holder.status}: it takes no new invoice"
    for r in rows:
        if r.account_fk != account:
            return f"charge {r.id} is of account {r.account_fk}, the invoice's is {account}"
    currencies = {r.currency for r in rows} - {currency}
    if currencies:
        return f"charges in another currency: {', '.join(sorted(currencies))}"
    for r in rows:
        if not r.priced:
            return f"charge {r.id} has no price"
    return None


def _locked_charges(session: Session, charge_ids: list[int]) -> list[ChargeItem]:
    charges = list(
        session.scalars(
            select(ChargeItem)
            .where(ChargeItem.id.in_(charge_ids))
            .order_by(ChargeItem.id)
            .with_for_update()
        ).all()
    )
    missing = sorted(set(charge_ids) - {c.id for c in charges})
    if missing:
        raise BillingError("no such charge: " + ", ".join(map(str, missing)))
    return charges


def _account_refusal(session: Session, account: int, currency: str, ids: list[int] | None) -> str:
    """Why the billable charges of an account (those of ``ids``, the ones locked) on no live
    invoice, left out by invoicing, cannot be invoiced."""
    rows = session.execute(
        select(ChargeItem.id, ChargeItem.currency, _PRICED.label("priced"))
        .where(
            _CHARGES["account"] if ids is None else _CHARGES["ids"],
            _LIVE_INVOICE.is_(None),
        )
        .order_by(ChargeItem.id),
        {"account": account} if ids is None else {"ids": ids},
    ).all()
    currencies = {r.currency for r in rows} - {currency}
    if currencies:
        return f"charges in another currency: {', '.join(sorted(currencies))}"
    unpriced = [r.id for r in rows if not r.priced]
    if unpriced:
        return f"charge {unpriced[0]} has no price"
    return f"account {account}: charges {', '.join(str(r.id) for r in rows)} were refused"


def create_invoice(
    archive: Archive,
    settings: Settings,
    *,
    account_id: int | None = None,
    charge_ids: list[int] | None = None,
    actor: str,
    audit: AuditEvent | None = None,
) -> int:
    """A draft invoice of the billable charges of an account not yet on a live invoice, or of
    an explicit list of billable charges of one account. Returns its id.

    However many lines, the lines are copied from the charges by one ``INSERT … SELECT`` that
    applies every rule (:data:`_INVOICEABLE`) and the totals summed by one query; charges are
    looked at one by one only to say why a request is refused (the transaction is then rolled
    back: nothing of the invoice remains)."""
    if (account_id is None) == (charge_ids is None):
        raise BillingError("give an account or a list of charges (one of them)")
    currency = settings.billing.currency
    with archive.db.write_session() as session:
        locks = _locks_rows(session)
        wanted: list[int] = []
        ids: list[int] | None = None
        if charge_ids is not None:
            if not charge_ids:
                raise BillingError("no charges given")
            wanted = ids = sorted(set(charge_ids))
            if locks:
                _lock_charges(session, ChargeItem.id.in_(wanted))
            # The invoice's account is the charges' (a charge of another is refused).
            account = session.scalar(
                select(func.min(ChargeItem.account_fk)).where(ChargeItem.id.in_(wanted))
            )
            holder = session.get(BillingAccount, account) if account is not None else None
        else:
            assert account_id is not None
            holder = session.get(BillingAccount, account_id)
            if holder is None:
                raise BillingError(f"no account {account_id}")
            account = account_id
            if locks:
                # Exactly the charges locked: one committed meanwhile goes on the next
                # invoice, never on two at once.
                ids = _lock_charges(
                    session,
                    (ChargeItem.account_fk == account_id) & (ChargeItem.status == BILLABLE),
                )
        if holder is None or holder.status != "active":
            refused = None
            if wanted:  # the charges' own problems first
                refused = _refusal(session, wanted, account=None, currency=currency, holder=holder)
            status = holder.status if holder is not None else "unknown"
            raise BillingError(refused or f"account {account} is {status}: it takes no new invoice")
        assert account is not None  # the holder's
        now = datetime.now(UTC)
        invoice = Invoice(
            account_fk=account,
            status=DRAFT,
            currency=currency,
            net=ZERO,
            tax=ZERO,
            gross=ZERO,
            version=1,
            created_at=now,
            updated_at=now,
        )
        session.add(invoice)
        session.flush()
        added, left_over = _insert_lines(session, invoice, ids=ids, after=0)
        if wanted and added != len(wanted):
            refused = _refusal(
                session,
                wanted,
                account=None,
                currency=currency,
                holder=holder,
                adding=(invoice.id, 0),
            )
            raise BillingError(refused or f"{len(wanted) - added} of the charges were refused")
        if not wanted and left_over:
            raise BillingError(_account_refusal(session, account, currency, ids))
        if added == 0:
            raise BillingError(f"account {account} has no billable charge to invoice")
        if invoice.gross < 0:
            raise BillingError(
                f"the invoice's gross would be negative ({invoice.gross}): credits exceed charges"
            )
        session.flush()
        _invoice_event(session, invoice, ZERO, actor, f"created with {added} charges")
        _audit(session, audit, invoice)
        return int(invoice.id)


def add_charges(
    archive: Archive,
    invoice_id: int,
    charge_ids: list[int],
    *,
    actor: str,
    audit: AuditEvent | None = None,
) -> None:
    """Add billable charges to a draft invoice (an issued invoice is immutable)."""
    with archive.db.write_session() as session:
        invoice = _lock(session, invoice_id)
        if invoice.status != DRAFT:
            raise BillingError(f"invoice {invoice_id} is {invoice.status}: only a draft changes")
        wanted = sorted(set(charge_ids))
        if _locks_rows(session):
            _lock_charges(session, ChargeItem.id.in_(wanted))
        after = int(
            session.scalar(
                select(func.coalesce(func.max(InvoiceLine.position), 0)).where(
                    InvoiceLine.invoice_fk == invoice.id
                )
            )
            or 0
        )
        added, _ = _insert_lines(session, invoice, ids=wanted, after=after)
        if added != len(wanted):
            raise BillingError(
                _refusal(
                    session,
                    wanted,
                    account=invoice.account_fk,
                    currency=invoice.currency,
                    holder=None,
                    adding=(invoice.id, after),
                )
                or f"{len(wanted) - added} of the charges were refused"
            )
        _bump(session, invoice, DRAFT, actor, f"added charges {', '.join(map(str, charge_ids))}")
        _audit(session, audit, invoice)


def issue_invoice(
    archive: Archive,
    settings: Settings,
    invoice_id: int,
    *,
    actor: str,
    now: datetime | None = None,
    audit: AuditEvent | None = None,
) -> None:
    """draft → issued: its charges become ``billed``; due on the issue date plus
    ``billing.payment_terms_days``. Immutable from then on."""
    now = now or datetime.now(UTC)
    with archive.db.write_session() as session:
        invoice = _lock(session, invoice_id)
        if invoice.status != DRAFT:
            raise BillingError(f"invoice {invoice_id} is {invoice.status}: only a draft is issued")
        lines = _lines(session, invoice_id)
        if not lines:
            raise BillingError(f"invoice {invoice_id} has no lines")
        charges = _locked_charges(session, [line.charge_fk for line in lines])
        bad = [f"charge {c.id} is {c.status}" for c in charges if c.status != BILLABLE]
        if bad:
            raise BillingError(f"cannot issue invoice {invoice_id}: " + "; ".join(bad))
        for charge in charges:
            _change(session, charge, {"status": BILLED}, actor, f"billed on invoice {invoice_id}")
        invoice.issued_at = now
        invoice.due_on = now.date() + timedelta(days=settings.billing.payment_terms_days)
        _bump(session, invoice, ISSUED, actor, "issued")
        _announce(
            session,
            "invoice.issued",
            invoice,
            _paid(session, invoice_id),
            charges=[line.charge_fk for line in lines],
        )
        _audit(session, audit, invoice)


def cancel_invoice(
    archive: Archive,
    invoice_id: int,
    *,
    reason: str,
    actor: str,
    audit: AuditEvent | None = None,
) -> None:
    """A draft, or an issued invoice without payments, becomes cancelled; its charges are
    billable again (they may go on another invoice)."""
    _withdraw(archive, invoice_id, CANCELLED, reason=reason, actor=actor, audit=audit)


def void_invoice(
    archive: Archive,
    invoice_id: int,
    *,
    reason: str,
    actor: str,
    audit: AuditEvent | None = None,
) -> None:
    """A draft, or an issued invoice without payments, made by mistake becomes
    ``entered-in-error`` (the reason in ``cancelled_reason``); its charges are billable again.
    A balanced invoice, or one with payments, is refused: refund the payments first."""
    _withdraw(archive, invoice_id, ENTERED_IN_ERROR, reason=reason, actor=actor, audit=audit)


def _withdraw(
    archive: Archive,
    invoice_id: int,
    status: str,
    *,
    reason: str,
    actor: str,
    audit: AuditEvent | None = None,
) -> None:
    """Cancel (``cancelled``) or void (``entered-in-error``) a draft, or an issued invoice
    without payments; its billed charges become billable again, each with a charge event."""
    verb, done = ("cancel", "cancelled") if status == CANCELLED else ("void", "voided")
    became = "cancelled" if status == CANCELLED else "entered in error"
    if not reason or not reason.strip():
        raise BillingError(f"a reason is required to {verb} an invoice")
    with archive.db.write_session() as session:
        invoice = _lock(session, invoice_id)
        if invoice.status == BALANCED:
            raise BillingError(
                f"invoice {invoice_id} is balanced (paid in full): it cannot be {done}; "
                "refund its payments first, or credit its charges"
            )
        if invoice.status not in (DRAFT, ISSUED):
            raise BillingError(f"invoice {invoice_id} is {invoice.status}: it cannot be {done}")
        payments = session.scalar(
            select(func.count()).select_from(Payment).where(Payment.invoice_fk == invoice_id)
        )
        if payments:
            raise BillingError(
                f"invoice {invoice_id} has payments: refund them first, or credit its charges"
            )
        lines = _lines(session, invoice_id)
        for charge in _locked_charges(session, [line.charge_fk for line in lines]):
            if charge.status == BILLED:
                _change(
                    session,
                    charge,
                    {"status": BILLABLE},
                    actor,
                    f"invoice {invoice_id} {became}: {reason}",
                )
        invoice.cancelled_reason = reason
        _bump(session, invoice, status, actor, reason)
        _audit(session, audit, invoice)


def record_payment(
    archive: Archive,
    invoice_id: int,
    amount: Decimal | str,
    *,
    actor: str,
    reason: str | None = None,
    reference: str | None = None,
    received_at: datetime | None = None,
    audit: AuditEvent | None = None,
) -> int:
    """A payment (positive, up to the outstanding amount) or a refund (negative, a reason
    required, up to what was paid) on an issued or balanced invoice. The invoice becomes
    ``balanced`` when paid in full and ``issued`` again when a refund reopens it. Returns
    the payment's id."""
    value = checked_payment(amount, reason)
    received_at = received_at or datetime.now(UTC)
    with archive.db.write_session() as session:
        # Every payment is part of a remittance (FHIR PaymentReconciliation): one of its own.
        reconciliation = PaymentReconciliation(
            amount=value,
            payment_date=received_at.date(),
            reference=reference,
            disposition=reason,
            actor=actor[:64],
            created_at=received_at,
        )
        session.add(reconciliation)
        session.flush()
        payment_id = pay(
            session,
            invoice_id,
            value,
            actor=actor,
            reason=reason,
            reference=reference,
            received_at=received_at,
            reconciliation_id=reconciliation.id,
        )
        record_change(
            session,
            audit,
            entity=f"Invoice/{invoice_id}",  # the invoice paid
            patient_id=invoice_patient(session, invoice_id),
        )
        return payment_id


def checked_payment(amount: Decimal | str, reason: str | None) -> Decimal:
    """The amount of a payment or refund, refused when it records nothing or is a refund
    without a reason."""
    value = money(amount)
    if value == 0:
        raise BillingError("a payment of 0.00 records nothing")
    if value < 0 and not (reason and reason.strip()):
        raise BillingError("a refund (a negative payment) requires a reason")
    return value


def pay(
    session: Session,
    invoice_id: int,
    value: Decimal,
    *,
    actor: str,
    reason: str | None = None,
    reference: str | None = None,
    received_at: datetime | None = None,
    reconciliation_id: int | None = None,
) -> int:
    """Record one payment in ``session``'s transaction (see :func:`record_payment`), the
    invoice row locked first."""
    invoice = _lock(session, invoice_id)
    if invoice.status not in (ISSUED, BALANCED):
        raise BillingError(
            f"invoice {invoice_id} is {invoice.status}: payments go on issued invoices"
        )
    paid = _paid(session, invoice_id)
    outstanding = invoice.gross - paid
    if value > 0 and value > outstanding:
        raise BillingError(f"overpayment: outstanding is {outstanding}, payment {value}")
    if value < 0 and -value > paid:
        raise BillingError(f"refund beyond what was paid: paid is {paid}, refund {-value}")
    payment = Payment(
        invoice_fk=invoice_id,
        amount=value,
        reason=reason,
        received_at=received_at or datetime.now(UTC),
        actor=actor[:64],
        reference=reference,
        reconciliation_fk=reconciliation_id,
    )
    session.add(payment)
    session.flush()
    status = BALANCED if paid + value == invoice.gross else ISSUED
    what = f"payment {payment.id} of {value}" if value > 0 else f"refund {payment.id}"
    was = invoice.status
    _bump(session, invoice, status, actor, f"{what}: {reason}" if reason else what)
    if status == BALANCED and was != BALANCED:
        # Paid in full by this payment (a refund that reopens it, and a later payment that
        # balances it again, announce it again).
        _announce(session, "invoice.paid", invoice, paid + value, payment_id=int(payment.id))
    return int(payment.id)


def credit_charge(
    archive: Archive,
    charge_id: int,
    *,
    reason: str,
    actor: str,
    audit: AuditEvent | None = None,
) -> int:
    """Correct a charge billed on an issued invoice without changing the invoice: a new
    billable charge (same kind and service, the amounts negated, key ``credit|<charge id>``)
    that goes on the next invoice. Returns its id. ``audit``: the caller's audit event,
    committed with the credit."""
    if not reason or not reason.strip():
        raise BillingError("a reason is required to credit a charge")
    with archive.db.write_session() as session:
        (charge,) = _locked_charges(session, [charge_id])
        if charge.status != BILLED:
            raise BillingError(
                f"charge {charge_id} is {charge.status}: only a billed charge is credited"
                " (a charge not yet issued is taken off its draft or voided)"
            )
        if charge.idempotency_key.startswith("credit|"):
            raise BillingError(f"charge {charge_id} is a credit itself")
        key = f"credit|{charge_id}"
        if session.scalar(select(ChargeItem.id).where(ChargeItem.idempotency_key == key)):
            raise BillingError(f"charge {charge_id} is credited already")
        assert charge.net is not None and charge.tax is not None and charge.total is not None
        now = datetime.now(UTC)
        credit = ChargeItem(
            account_fk=charge.account_fk,
            patient_id=charge.patient_id,
            issuer_of_patient_id=charge.issuer_of_patient_id,
            kind=charge.kind,
            status=BILLABLE,
            idempotency_key=key,
            study_instance_uid=charge.study_instance_uid,
            service_kind=charge.service_kind,
            service_uid=charge.service_uid,
            definition_fk=charge.definition_fk,
            code_system=charge.code_system,
            code=charge.code,
            display=f"credit: {charge.display}"[:255],
            modality=charge.modality,
            body_part=charge.body_part,
            laterality=charge.laterality,
            contrast=charge.contrast,
            performer=charge.performer,
            occurred_on=charge.occurred_on,
            conditions=list(charge.conditions),
            lines=[{**line, "amount": str(-Decimal(line["amount"]))} for line in charge.lines],
            net=-charge.net,
            tax=-charge.tax,
            total=-charge.total,
            currency=charge.currency,
            review_reason=reason,
            version=1,
            created_at=now,
            updated_at=now,
        )
        session.add(credit)
        session.flush()
        announce_charge(
            session, int(credit.id), {c.key: getattr(credit, c.key) for c in ChargeItem.__table__.c}
        )
        _event(
            session,
            credit.id,
            {"version": 1, "status": BILLABLE, "net": credit.net, "total": credit.total},
            actor,
            f"credit of charge {charge_id}: {reason}",
        )
        _change(session, charge, {}, actor, f"credited by charge {credit.id}: {reason}")
        record_change(
            session,
            audit,
            entity=f"ChargeItem/{credit.id}",
            patient_id=charge.patient_id,
            study_uid=charge.study_instance_uid,
        )
        return int(credit.id)


# --- reading -------------------------------------------------------------------------------


def _lines(session: Session, invoice_id: int) -> list[InvoiceLine]:
    return list(
        session.scalars(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_fk == invoice_id)
            .order_by(InvoiceLine.position)
        ).all()
    )


def balance(
    archive: Archive,
    *,
    account_id: int | None = None,
    patient_id: str | None = None,
    issuer: str = "",
    today: date | None = None,
) -> Balance:
    """Billed, paid, outstanding and overdue (past the due date on ``today``) of an account
    or of a patient (Patient ID + issuer)."""
    if (account_id is None) == (patient_id is None):
        raise BillingError("give an account or a patient (one of them)")
    today = today or datetime.now(UTC).date()
    with archive.db.session() as session:
        if account_id is not None:
            accounts = [account_id]
        else:
            accounts = list(
                session.scalars(
                    select(BillingAccount.id).where(
                        BillingAccount.patient_id == patient_id,
                        BillingAccount.issuer_of_patient_id == issuer,
                    )
                ).all()
            )
        invoices = session.scalars(
            select(Invoice).where(
                Invoice.account_fk.in_(accounts), Invoice.status.in_((ISSUED, BALANCED))
            )
        ).all()
        billed = paid = overdue = ZERO
        for invoice in invoices:
            on = _paid(session, invoice.id)
            billed += invoice.gross
            paid += on
            if invoice.due_on is not None and invoice.due_on < today:
                overdue += invoice.gross - on
        return Balance(billed, paid, billed - paid, overdue)


def recompute_from_history(archive: Archive, invoice_id: int) -> Recomputed:
    """The invoice's totals from its lines and payments, its status and version from its last
    event; refuses (``BillingError``) a history whose events disagree with them."""
    with archive.db.session() as session:
        lines = _lines(session, invoice_id)
        payments = session.scalars(select(Payment).where(Payment.invoice_fk == invoice_id)).all()
        events = session.scalars(
            select(InvoiceEvent)
            .where(InvoiceEvent.invoice_fk == invoice_id)
            .order_by(InvoiceEvent.version)
        ).all()
    if not events:
        raise BillingError(f"invoice {invoice_id} has no history")
    if [e.version for e in events] != list(range(1, len(events) + 1)):
        raise BillingError(f"invoice {invoice_id}: its event versions have gaps")
    net = sum((line.net for line in lines), ZERO)
    tax = sum((line.tax for line in lines), ZERO)
    gross = sum((line.gross for line in lines), ZERO)
    paid = sum((p.amount for p in payments), ZERO)
    for line in lines:
        if line.net + line.tax != line.gross:
            raise BillingError(f"invoice {invoice_id} line {line.position}: net + tax != gross")
        priced = sum((Decimal(c["amount"]) for c in line.components), ZERO)
        if priced != line.gross:
            raise BillingError(f"invoice {invoice_id} line {line.position}: components disagree")
    last = events[-1]
    if (last.gross, last.paid) != (gross, paid):
        raise BillingError(
            f"invoice {invoice_id}: last event says gross {last.gross} paid {last.paid}, "
            f"lines and payments say {gross} and {paid}"
        )
    return Recomputed(net, tax, gross, paid, last.status, last.version)


def invoice_json(archive: Archive, invoice_id: int, today: date | None = None) -> dict[str, Any]:
    today = today or datetime.now(UTC).date()
    with archive.db.session() as session:
        invoice = session.get(Invoice, invoice_id)
        if invoice is None:
            raise BillingError(f"no invoice {invoice_id}")
        lines = _lines(session, invoice_id)
        payments = session.scalars(
            select(Payment).where(Payment.invoice_fk == invoice_id).order_by(Payment.id)
        ).all()
        events = session.scalars(
            select(InvoiceEvent)
            .where(InvoiceEvent.invoice_fk == invoice_id)
            .order_by(InvoiceEvent.version)
        ).all()
        paid = sum((p.amount for p in payments), ZERO)
        live = invoice.status in (ISSUED, BALANCED)
        outstanding = invoice.gross - paid if live else ZERO
        return {
            "id": invoice.id,
            "account": invoice.account_fk,
            "status": invoice.status,
            "currency": invoice.currency,
            "net": str(invoice.net),
            "tax": str(invoice.tax),
            "gross": str(invoice.gross),
            "paid": str(paid),
            "outstanding": str(outstanding),
            "overdue": bool(
                live and outstanding > 0 and invoice.due_on is not None and invoice.due_on < today
            ),
            "issued_at": invoice.issued_at.isoformat() if invoice.issued_at else None,
            "due_on": invoice.due_on.isoformat() if invoice.due_on else None,
            "cancelled_reason": invoice.cancelled_reason,
            "version": invoice.version,
            "lines": [
                {
                    "position": line.position,
                    "charge": line.charge_fk,
                    "code": line.code,
                    "description": line.description,
                    "net": str(line.net),
                    "tax": str(line.tax),
                    "gross": str(line.gross),
                    "components": line.components,
                }
                for line in lines
            ],
            "payments": [
                {
                    "id": p.id,
                    "amount": str(p.amount),
                    "reason": p.reason,
                    "reference": p.reference,
                    "received_at": p.received_at.isoformat(),
                    "actor": p.actor,
                }
                for p in payments
            ],
            "events": [
                {
                    "version": e.version,
                    "status": e.status,
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "reason": e.reason,
                    "gross": str(e.gross),
                    "paid": str(e.paid),
                }
                for e in events
            ],
        }
