"""Manual charges and adjustments of charges: not everything billed is an imaging procedure
captured from a study (a consultation, a CD of the images, a missed appointment).

A **manual charge** (``kind`` ``manual``) is entered for a patient of the archive with a code,
a day and either a price definition (priced as captured charges are, with the conditions given)
or a unit price (``amount``: the base line; the site's tax rate, ``billing.tax_percent``, is
added when set). ``quantity`` multiplies every priced line. Without either it is ``planned`` and
waits for a price, like a captured charge without one. An identifier given by the sender makes
entering it again a no-op (its key is ``manual|<identifier>``).

**Adjusting** a charge (:func:`update_charge`) writes a new version and a ``charge_event`` with
who and why, in one transaction, the charge row locked and its version checked first (a
stale version raises :class:`ChargeConflict`). What may change:

- a manual charge, while ``planned`` or ``billable`` and not on an invoice: its code, display,
  day, quantity, price (amount or definition), note and status (``planned``, ``billable``,
  ``entered-in-error``);
- a captured charge: a ``planned`` one may be priced by hand (an amount; it becomes
  ``billable``), and an open one may be voided (``entered-in-error``); what it charges for
  comes from its study and does not change;
- never a ``billed`` charge (credit it: ``billing.invoices.credit_charge``), one on a draft
  invoice (cancel the draft first), nor one ``entered-in-error``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import Archive
from archive.audit import AuditEvent, record_change
from archive.models import Patient
from billing.capture import (
    BILLABLE,
    ENTERED_IN_ERROR,
    PLANNED,
    _account,
    _change,
    _event,
    _insert,
    announce_charge,
)
from billing.invoices import BILLED, BillingError, _invoiced, money
from billing.metrics import count_charge_on_commit
from billing.models import ChargeItem, ChargeItemDefinition
from billing.prices import price
from config import Settings

MANUAL = "manual"
MANUAL_STATUSES = (PLANNED, BILLABLE, ENTERED_IN_ERROR)


class ChargeConflict(BillingError):
    """The charge changed since the version the caller read."""


@dataclass(frozen=True)
class ChargeFields:
    """What a manual charge says (and what an adjustment may ask for)."""

    status: str
    code_system: str | None
    code: str | None
    display: str
    occurred_on: date
    quantity: int = 1
    amount: Decimal | None = None
    """The unit price given by hand (the base line), else None."""
    definition_id: int | None = None
    note: str | None = None
    conditions: tuple[str, ...] = ()


@dataclass
class _Priceable:
    base_amount: Decimal
    components: list[Any]


def _priced(
    session: Session, settings: Settings, wanted: ChargeFields
) -> tuple[dict[str, Any], str | None]:
    """The price columns of a charge, and why it is planned (None when priced)."""
    if wanted.quantity < 1:
        raise BillingError(f"quantity {wanted.quantity}: at least 1")
    if wanted.amount is not None and wanted.definition_id is not None:
        raise BillingError("give a price (amount) or a definition, not both")
    definition: Any
    if wanted.definition_id is not None:
        definition = session.get(ChargeItemDefinition, wanted.definition_id)
        if definition is None:
            raise BillingError(f"no charge item definition {wanted.definition_id}")
        if not definition.active:
            raise BillingError(
                f"charge item definition {wanted.definition_id} is retired (an older price "
                "list version)"
            )
        if not (
            definition.effective_from <= wanted.occurred_on
            and (definition.effective_to is None or wanted.occurred_on <= definition.effective_to)
        ):
            raise BillingError(
                f"charge item definition {wanted.definition_id} is not in force on "
                f"{wanted.occurred_on.isoformat()}"
            )
    elif wanted.amount is not None:
        amount = money(wanted.amount)
        if amount < 0:
            raise BillingError(f"amount {amount}: a charge is not negative (credit instead)")
        definition = _Priceable(amount, [])
    else:
        return {
            "definition_fk": None,
            "lines": [],
            "net": None,
            "tax": None,
            "total": None,
        }, "a manual charge without a price"
    priced = price(
        definition,
        wanted.conditions,
        site_tax_percent=settings.billing.tax_percent,
        site_tax_code=settings.billing.tax_code,
    )
    n = wanted.quantity
    lines = [
        {
            "type": line.type,
            "code": line.code,
            "description": line.description,
            "amount": str(line.amount * n),
        }
        for line in priced.lines
    ]
    return {
        "definition_fk": wanted.definition_id,
        "lines": lines,
        "net": priced.net * n,
        "tax": priced.tax * n,
        "total": priced.total * n,
    }, None


def _check(wanted: ChargeFields) -> None:
    if wanted.status not in MANUAL_STATUSES:
        raise BillingError(
            f"status {wanted.status!r}: a manual charge is {', '.join(MANUAL_STATUSES)}"
        )
    if not (wanted.display or wanted.code):
        raise BillingError("a manual charge needs a code or a display")


def create_manual_charge(
    archive: Archive,
    settings: Settings,
    *,
    patient_fk: int,
    fields_: ChargeFields,
    actor: str,
    identifier: str | None = None,
    performer: str | None = None,
    study_instance_uid: str | None = None,
    service: tuple[str, str] | None = None,
    audit: AuditEvent | None = None,
) -> tuple[int, bool]:
    """Enter a manual charge for the patient (its account created on the first charge).
    Returns (its id, whether it is new): with an ``identifier`` already entered, the
    charge entered then. ``audit``: the caller's audit event of the change, committed with
    the new charge (nothing is recorded when the charge was entered before)."""
    _check(fields_)
    if fields_.status == ENTERED_IN_ERROR:
        raise BillingError("a new charge is not entered-in-error")
    key = f"manual|{identifier}" if identifier else f"manual|{uuid.uuid4()}"
    if len(key) > 255:
        raise BillingError("the charge's identifier is too long (at most 240 characters)")
    with archive.db.write_session() as session:
        existing = session.scalar(select(ChargeItem.id).where(ChargeItem.idempotency_key == key))
        if existing is not None:
            return int(existing), False
        patient = session.get(Patient, patient_fk)
        if patient is None:
            raise BillingError(f"no patient {patient_fk}")
        priced, missing = _priced(session, settings, fields_)
        status = PLANNED if missing else fields_.status
        now = datetime.now(UTC)
        values = {
            "account_fk": _account(session, patient),
            "patient_id": patient.patient_id,
            "issuer_of_patient_id": patient.issuer_of_patient_id,
            "kind": MANUAL,
            "status": status,
            "idempotency_key": key,
            "study_instance_uid": study_instance_uid,
            "service_kind": service[0] if service else None,
            "service_uid": service[1] if service else None,
            "code_system": fields_.code_system,
            "code": fields_.code,
            "display": (fields_.display or fields_.code or "")[:255],
            "performer": performer,
            "occurred_on": fields_.occurred_on,
            "conditions": list(fields_.conditions),
            "currency": settings.billing.currency,
            "review_reason": missing,
            "quantity": fields_.quantity,
            "note": fields_.note,
            "version": 1,
            "created_at": now,
            "updated_at": now,
            **priced,
        }
        new_id = _insert(session, ChargeItem, values, ["idempotency_key"])
        if new_id is None:  # entered at the same moment by another request
            return int(
                session.execute(
                    select(ChargeItem.id).where(ChargeItem.idempotency_key == key)
                ).scalar_one()
            ), False
        _event(session, new_id, values, actor, fields_.note or missing or "entered by hand")
        announce_charge(session, int(new_id), values)
        record_change(
            session,
            audit,
            entity=f"ChargeItem/{new_id}",
            patient_id=patient.patient_id,
            study_uid=study_instance_uid,
        )
        count_charge_on_commit(session, MANUAL)
        return int(new_id), True


def _current(charge: ChargeItem) -> ChargeFields:
    amount = None
    if charge.definition_fk is None and charge.lines and charge.quantity:
        base = next((line for line in charge.lines if line.get("type") == "base"), None)
        if base is not None:
            amount = Decimal(base["amount"]) / charge.quantity
    return ChargeFields(
        status=charge.status,
        code_system=charge.code_system,
        code=charge.code,
        display=charge.display,
        occurred_on=charge.occurred_on,
        quantity=charge.quantity,
        amount=amount,
        definition_id=charge.definition_fk,
        note=charge.note,
        conditions=tuple(charge.conditions),
    )


def charge_fields(charge: ChargeItem) -> ChargeFields:
    """What a charge says now, as :class:`ChargeFields`."""
    return _current(charge)


def update_charge(
    archive: Archive,
    settings: Settings,
    charge_id: int,
    wanted: ChargeFields,
    *,
    actor: str,
    reason: str | None,
    expected_version: int | None = None,
    audit: AuditEvent | None = None,
) -> bool:
    """Adjust a charge to ``wanted`` (see the module's docstring for what may change).
    Returns whether anything changed (an identical request writes no version). ``audit``:
    the caller's audit event of the change, committed with it (none when nothing changed)."""
    with archive.db.write_session() as session:
        changed = _update_charge(
            session, settings, charge_id, wanted, actor, reason, expected_version
        )
        if changed:
            charge = session.get(ChargeItem, charge_id)
            record_change(
                session,
                audit,
                entity=f"ChargeItem/{charge_id}",
                patient_id=charge.patient_id if charge is not None else None,
                study_uid=charge.study_instance_uid if charge is not None else None,
            )
        return changed


def _update_charge(
    session: Session,
    settings: Settings,
    charge_id: int,
    wanted: ChargeFields,
    actor: str,
    reason: str | None,
    expected_version: int | None,
) -> bool:
    charge = session.scalars(
        select(ChargeItem).where(ChargeItem.id == charge_id).with_for_update()
    ).first()
    if charge is None:
        raise BillingError(f"no charge {charge_id}")
    if expected_version is not None and charge.version != expected_version:
        raise ChargeConflict(
            f"charge {charge_id} is at version {charge.version}, not {expected_version}"
        )
    current = _current(charge)
    changed = {
        f.name for f in fields(ChargeFields) if getattr(wanted, f.name) != getattr(current, f.name)
    }
    if (
        wanted.amount is not None
        and current.amount is not None
        and money(wanted.amount) == money(current.amount)
    ):
        changed.discard("amount")
    if not changed:
        return False
    if charge.status == BILLED:
        raise BillingError(
            f"charge {charge_id} is billed on an issued invoice: it does not change "
            "(credit it instead)"
        )
    if charge.status == ENTERED_IN_ERROR:
        raise BillingError(f"charge {charge_id} is entered-in-error: it does not change")
    on = _invoiced(session, [charge_id])
    if on:
        raise BillingError(
            f"charge {charge_id} is on draft invoice {on[charge_id]}: cancel the draft "
            "(or leave the charge as it is)"
        )
    if charge.kind != MANUAL:
        return _adjust_captured(session, settings, charge, current, wanted, changed, actor, reason)
    _check(wanted)
    if wanted.status == ENTERED_IN_ERROR:
        if changed - {"status", "note"}:
            raise BillingError("a charge voided (entered-in-error) keeps its other elements")
        if not (reason and reason.strip()):
            raise BillingError("a reason is required to void a charge")
        _change(session, charge, {"status": ENTERED_IN_ERROR, "note": wanted.note}, actor, reason)
        return True
    priced, missing = _priced(session, settings, wanted)
    if missing and wanted.status == BILLABLE:
        raise BillingError("a billable charge needs a price (an amount or a definition)")
    _change(
        session,
        charge,
        {
            "status": wanted.status,
            "code_system": wanted.code_system,
            "code": wanted.code,
            "display": (wanted.display or wanted.code or "")[:255],
            "occurred_on": wanted.occurred_on,
            "quantity": wanted.quantity,
            "conditions": list(wanted.conditions),
            "note": wanted.note,
            "review_reason": missing,
            **priced,
        },
        actor,
        reason or f"changed {', '.join(sorted(changed))}",
    )
    return True


def _adjust_captured(
    session: Session,
    settings: Settings,
    charge: ChargeItem,
    current: ChargeFields,
    wanted: ChargeFields,
    changed: set[str],
    actor: str,
    reason: str | None,
) -> bool:
    fixed = changed - {"status", "amount", "note"}
    if fixed:
        raise BillingError(
            f"charge {charge.id} was captured from its {charge.service_kind or 'study'}: "
            f"{', '.join(sorted(fixed))} cannot change (void it and enter a manual charge)"
        )
    if wanted.status == ENTERED_IN_ERROR:
        if "amount" in changed:
            raise BillingError("a charge voided (entered-in-error) keeps its price")
        if not (reason and reason.strip()):
            raise BillingError("a reason is required to void a charge")
        _change(session, charge, {"status": ENTERED_IN_ERROR, "note": wanted.note}, actor, reason)
        return True
    if "amount" in changed:
        if current.status != PLANNED or wanted.amount is None:
            raise BillingError(
                f"charge {charge.id} is priced by its definition: only a planned charge "
                "is priced by hand"
            )
        if wanted.status != BILLABLE:
            raise BillingError("a charge priced by hand becomes billable")
        priced, _ = _priced(
            session,
            settings,
            ChargeFields(
                status=BILLABLE,
                code_system=None,
                code=None,
                display=charge.display,
                occurred_on=charge.occurred_on,
                quantity=charge.quantity,
                amount=wanted.amount,
                conditions=tuple(charge.conditions),
            ),
        )
        _change(
            session,
            charge,
            {**priced, "status": BILLABLE, "review_reason": None, "note": wanted.note},
            actor,
            reason or f"priced by hand at {money(wanted.amount)}",
        )
        return True
    if "status" in changed:
        raise BillingError(
            f"charge {charge.id} is {charge.status}: a captured charge becomes billable when "
            "priced (by a price list or by hand) and may be voided (entered-in-error)"
        )
    _change(session, charge, {"note": wanted.note}, actor, reason or "note changed")
    return True
