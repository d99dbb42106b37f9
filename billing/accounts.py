"""Accounts: one per patient (``billing.capture`` creates it with the first charge). The EHR
may name it, close it (``inactive``: it takes no new invoice) and give its guarantor and
coverage, as FHIR Account does; every change is a new version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from archive import Archive
from archive.audit import AuditEvent, record_change
from billing.invoices import BillingError
from billing.manual import ChargeConflict
from billing.models import BillingAccount

ACCOUNT_STATUSES = ("active", "inactive")


def update_account(
    archive: Archive,
    account_id: int,
    *,
    name: str | None,
    status: str,
    guarantor: list[dict[str, Any]] | None,
    coverage: list[dict[str, Any]] | None,
    expected_version: int | None = None,
    audit: AuditEvent | None = None,
) -> bool:
    """Set what the EHR says of an account. Returns whether anything changed; ``audit``: the
    caller's audit event of the change, committed with it."""
    if status not in ACCOUNT_STATUSES:
        raise BillingError(f"status {status!r}: an account is {' or '.join(ACCOUNT_STATUSES)}")
    with archive.db.write_session() as session:
        account = session.scalars(
            select(BillingAccount).where(BillingAccount.id == account_id).with_for_update()
        ).first()
        if account is None:
            raise BillingError(f"no account {account_id}")
        if expected_version is not None and account.version != expected_version:
            raise ChargeConflict(
                f"account {account_id} is at version {account.version}, not {expected_version}"
            )
        wanted = (name or None, status, guarantor or None, coverage or None)
        if wanted == (account.name, account.status, account.guarantor, account.coverage):
            return False
        account.name, account.status, account.guarantor, account.coverage = wanted
        account.version += 1
        account.updated_at = datetime.now(UTC)
        record_change(session, audit, entity=f"Account/{account_id}", patient_id=account.patient_id)
        return True
