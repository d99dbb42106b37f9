"""Billing tables on the archive's declarative ``Base`` (one schema, one Alembic history).

``billing_account`` is one account per patient (Patient ID + issuer); ``charge_item`` holds the
captured charges (``billing.capture``) and ``charge_event`` every state change of a charge (who,
when, why), written in the transaction of the change.

``price_list`` is one loaded version of the site's price list file; ``charge_item_definition``
holds its rows. Loading a new version marks the earlier definitions inactive (no new charge is
priced by them) but keeps them: charges made earlier reference their definition's id.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from archive.models import LO, PN, UI, Base

# As the archive's tables (``archive.models._NEVER_REUSE_IDS``): SQLite never hands a deleted
# row's id to a new row, as PostgreSQL sequences never do; charges will reference these ids.
_NEVER_REUSE_IDS = {"sqlite_autoincrement": True}

#: Money columns: NUMERIC(12,2), read back as ``Decimal``.
Money = Numeric(12, 2, asdecimal=True)


class PriceList(Base):
    """One loaded version of a price list file."""

    __tablename__ = "price_list"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    """The name given at load (default: the file's name)."""
    source: Mapped[str] = mapped_column(String(1024), nullable=False)
    """The file loaded (its path as given)."""
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    loaded_by: Mapped[str] = mapped_column(String(64), nullable=False)
    row_count: Mapped[int] = mapped_column(Integer, nullable=False)


class ChargeItemDefinition(Base):
    """One priced procedure: keyed by a procedure code, else by modality + body part
    (+ laterality, + contrast where given); technical or professional; in force from
    ``effective_from`` to ``effective_to`` (both days included; open-ended when NULL)."""

    __tablename__ = "charge_item_definition"
    __table_args__ = (
        Index(None, "code_system", "code"),
        Index(None, "modality", "body_part"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    price_list_fk: Mapped[int] = mapped_column(
        ForeignKey("price_list.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    line: Mapped[int] = mapped_column(Integer, nullable=False)
    """The line of the file the definition was read from."""
    code_system: Mapped[str | None] = mapped_column(String(16))
    """``loinc``, ``radlex``, ``local`` or ``cpt``; NULL for a modality + body part row."""
    code: Mapped[str | None] = mapped_column(String(64))
    display: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    """``technical`` or ``professional``."""
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(16))
    laterality: Mapped[str | None] = mapped_column(String(1))
    contrast: Mapped[bool | None] = mapped_column(Boolean)
    effective_from: Mapped[date] = mapped_column(Date, nullable=False)
    effective_to: Mapped[date | None] = mapped_column(Date)
    base_amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    components: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    """``[{"type", "code", "description", "amount" | "factor" | "percent", "condition"}]``,
    numbers as decimal strings (see ``billing.prices``)."""
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    """Whether new charges may be priced by it (only the latest loaded version's are)."""


class BillingAccount(Base):
    """The account charges of one patient go to (Patient ID + Issuer of Patient ID).

    The patient's row may be deleted by the archive: the account keeps the identifiers it
    copied (``patient_fk`` becomes NULL)."""

    __tablename__ = "billing_account"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int | None] = mapped_column(
        ForeignKey("patient.id", ondelete="SET NULL"), index=True
    )
    patient_id: Mapped[str] = mapped_column(LO, nullable=False)
    issuer_of_patient_id: Mapped[str] = mapped_column(LO, nullable=False, default="")
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    name: Mapped[str | None] = mapped_column(String(255))
    guarantor: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    """Who pays: ``[{"party": {"reference" | "display": ...}, "onHold": bool}]`` (FHIR
    Account.guarantor), as given by the EHR."""
    coverage: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    """Insurance: ``[{"coverage": {"reference" | "display": ...}, "priority": n}]`` (FHIR
    Account.coverage), as given by the EHR."""
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ChargeItem(Base):
    """One captured charge: ``technical`` (a performed procedure of a study) or
    ``professional`` (the reading of a study: a signed report).

    ``status``: ``planned`` (no price: waiting for review, ``review_reason`` says why),
    ``billable`` (priced), ``billed`` (on an issued invoice: never voided; corrected by a
    credit charge, ``billing.invoices.credit_charge``) or ``entered-in-error`` (voided: the
    study was deleted).
    ``idempotency_key`` (``technical|<study uid>|<procedure key>``,
    ``professional|<report root uid>``) is unique: capturing again never charges twice.
    ``version`` starts at 1 and grows with every change (``charge_event`` keeps each)."""

    __tablename__ = "charge_item"
    __table_args__ = (Index(None, "status"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_fk: Mapped[int] = mapped_column(
        ForeignKey("billing_account.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    patient_id: Mapped[str] = mapped_column(LO, nullable=False, index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(LO, nullable=False, default="")
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    """``technical`` or ``professional``."""
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UI, index=True)
    """NULL for a manual charge that names no study."""
    service_kind: Mapped[str | None] = mapped_column(String(16))
    """What was done: ``study`` (technical) or ``report`` (professional); NULL for a manual
    charge without a service."""
    service_uid: Mapped[str | None] = mapped_column(UI)
    """The Study Instance UID, or the report's root SOP Instance UID (its first version)."""
    definition_fk: Mapped[int | None] = mapped_column(
        ForeignKey("charge_item_definition.id", ondelete="RESTRICT"), index=True
    )
    code_system: Mapped[str | None] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(64))
    display: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(16))
    laterality: Mapped[str | None] = mapped_column(String(1))
    contrast: Mapped[bool | None] = mapped_column(Boolean)
    """The procedure's key as found in the study (repricing looks it up again)."""
    performer: Mapped[str | None] = mapped_column(PN)
    """The verifying observer of the report (professional charges)."""
    occurred_on: Mapped[date] = mapped_column(Date, nullable=False)
    """The study date (technical) or the report's verification date (professional): the day
    whose price applies."""
    conditions: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    """The priced lines ``{"type", "code", "description", "amount"}``, amounts as strings."""
    net: Mapped[Decimal | None] = mapped_column(Money)
    tax: Mapped[Decimal | None] = mapped_column(Money)
    total: Mapped[Decimal | None] = mapped_column(Money)
    """NULL while planned."""
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    review_reason: Mapped[str | None] = mapped_column(Text)
    quantity: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    """How many times the priced lines apply (manual charges; captured charges are 1)."""
    note: Mapped[str | None] = mapped_column(Text)
    """Why a manual charge was entered or its price overridden."""
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ChargeEvent(Base):
    """One state change of a charge (its creation included): who, when, why."""

    __tablename__ = "charge_event"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    charge_fk: Mapped[int] = mapped_column(
        ForeignKey("charge_item.id", ondelete="CASCADE"), nullable=False, index=True
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    net: Mapped[Decimal | None] = mapped_column(Money)
    total: Mapped[Decimal | None] = mapped_column(Money)


class Invoice(Base):
    """An invoice of one account: ``draft`` → ``issued`` (immutable from then on) →
    ``balanced`` (paid in full); ``cancelled`` (with a reason) or ``entered-in-error``.
    ``version`` grows with every change (``invoice_event`` keeps each)."""

    __tablename__ = "invoice"
    __table_args__ = (Index(None, "status"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_fk: Mapped[int] = mapped_column(
        ForeignKey("billing_account.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    net: Mapped[Decimal] = mapped_column(Money, nullable=False)
    tax: Mapped[Decimal] = mapped_column(Money, nullable=False)
    gross: Mapped[Decimal] = mapped_column(Money, nullable=False)
    issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    due_on: Mapped[date | None] = mapped_column(Date)
    cancelled_reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class InvoiceLine(Base):
    """One charge on an invoice, with the charge's priced lines (``components``).

    Indexed by charge then invoice: whether a charge is on a live invoice is answered from
    the index, however many times the charge was invoiced and the invoice cancelled."""

    __tablename__ = "invoice_line"
    __table_args__ = (
        UniqueConstraint("invoice_fk", "position"),
        Index(None, "charge_fk", "invoice_fk"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    invoice_fk: Mapped[int] = mapped_column(
        ForeignKey("invoice.id", ondelete="CASCADE"), nullable=False, index=True
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    charge_fk: Mapped[int] = mapped_column(
        ForeignKey("charge_item.id", ondelete="RESTRICT"), nullable=False
    )
    description: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    code: Mapped[str | None] = mapped_column(String(64))
    net: Mapped[Decimal] = mapped_column(Money, nullable=False)
    tax: Mapped[Decimal] = mapped_column(Money, nullable=False)
    gross: Mapped[Decimal] = mapped_column(Money, nullable=False)
    components: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)


class PaymentReconciliation(Base):
    """One remittance (FHIR PaymentReconciliation): the payments it made, one per invoice, were
    recorded in one transaction."""

    __tablename__ = "payment_reconciliation"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    payment_date: Mapped[date] = mapped_column(Date, nullable=False)
    reference: Mapped[str | None] = mapped_column(String(255))
    """The payer's identifier of the payment (a bank transfer's reference)."""
    disposition: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class Payment(Base):
    """A payment against an invoice; a negative ``amount`` is a refund (``reason`` required)."""

    __tablename__ = "payment"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    invoice_fk: Mapped[int] = mapped_column(
        ForeignKey("invoice.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    reference: Mapped[str | None] = mapped_column(String(255))
    reconciliation_fk: Mapped[int | None] = mapped_column(
        ForeignKey("payment_reconciliation.id", ondelete="RESTRICT"), index=True
    )


class InvoiceEvent(Base):
    """One state change of an invoice (its creation and every payment included): who, when,
    why, and the gross and amount paid after it."""

    __tablename__ = "invoice_event"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    invoice_fk: Mapped[int] = mapped_column(
        ForeignKey("invoice.id", ondelete="CASCADE"), nullable=False, index=True
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    gross: Mapped[Decimal] = mapped_column(Money, nullable=False)
    paid: Mapped[Decimal] = mapped_column(Money, nullable=False)
