"""Imaging orders: create, change, cancel and find the scheduled procedure steps of
:mod:`archive.orders`, each change with its version and its outbox event in one transaction.

The callers (the FHIR edge for the EHR's ServiceRequest, the DICOM edge for MPPS) hand in plain
values (:class:`OrderDraft`) and the document to keep; nothing here speaks a protocol. Every
function works in the caller's transaction (a :class:`~sqlalchemy.orm.Session` or a Core
:class:`~sqlalchemy.engine.Connection`): the order's row, its new
:class:`~archive.orders.ImagingOrderVersion` and its :func:`archive.outbox.emit` event commit
or roll back together.

**Identifiers** the archive assigns (PS3.4 K.6.1.2, the Requested Procedure and Scheduled
Procedure Step identifiers; each SH, at most 16 characters):

- Accession Number, when the order comes without one: ``ACCESSION_PREFIX`` followed by the
  order's row number in base 36, at least 6 digits (``PB00002S``). Row numbers are never
  reused, so two orders never get the same one; should an EHR already have given that very
  number to another order, the unique constraint refuses it and the next candidate
  (a random suffix) is tried in a savepoint.
- Requested Procedure ID ``RP`` + the same base-36 number, Scheduled Procedure Step ID ``SPS``
  + the same number: unique because the row number is.
- Study Instance UID, when the order names none: a UUID-derived UID (PS3.5 B.2, ``2.25.``),
  pre-assigned to the Requested Procedure (PS3.4 K.6.1.2.2) so that the modality's images carry
  it; :func:`transition` moves it to the UID the images came with when they carry another.

**Step status** (Scheduled Procedure Step Status (0040,0020), PS3.3 C.4.10) follows the order's
status: a new order is ``SCHEDULED``; ``revoked`` and ``entered-in-error`` discontinue the step,
``completed`` completes it; other changes keep the step where the modality left it
(``STARTED`` after an MPPS IN PROGRESS). The worklist shows the orders whose status is in
:data:`archive.orders.ON_WORKLIST`.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, Table, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from archive import outbox
from archive.models import Patient
from archive.orders import ORDER_STATUSES, STEP_STATUSES, ImagingOrder, ImagingOrderVersion

Target = Session | Connection

ORDERS: Table = ImagingOrder.__table__  # type: ignore[assignment]
VERSIONS: Table = ImagingOrderVersion.__table__  # type: ignore[assignment]

ACCESSION_PREFIX = "PB"
"""What Accession Numbers assigned here start with."""
MAX_SH = 16
"""SH: at most 16 characters (PS3.5 6.2)."""

#: Order statuses that end the scheduled step, and the step status each leaves.
_STEP_OF_STATUS = {
    "revoked": "DISCONTINUED",
    "entered-in-error": "DISCONTINUED",
    "completed": "COMPLETED",
}
#: FHIR identifier system of DICOM UIDs (RFC 3001 ``urn:oid:`` values), as the edges write it.
_DICOM_UID_SYSTEM = "urn:dicom:uid"


class OrderError(ValueError):
    """An order that cannot be stored as asked: ``kind`` is ``conflict`` (another order holds
    its Accession Number or Study Instance UID), ``not-found`` (no such order or patient) or
    ``invalid`` (a value the worklist cannot carry). ``field`` names the value."""

    def __init__(self, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field


@dataclass(slots=True)
class OrderDraft:
    """What an order says, as the worklist needs it (the edge maps its protocol onto this)."""

    patient_row: int
    status: str = "active"
    intent: str = "order"
    priority: str | None = None
    accession_number: str | None = None
    """None: assigned here."""
    issuer_of_accession_number: str | None = None
    study_instance_uid: str | None = None
    """None: pre-assigned here."""
    procedure_scheme: str | None = None
    procedure_code: str | None = None
    procedure_display: str | None = None
    modality: str | None = None
    scheduled_station_ae_title: str | None = None
    scheduled_station_name: str | None = None
    scheduled_start: datetime | None = None
    scheduled_start_date: str | None = None
    """DA (YYYYMMDD) in the zone of the DICOM values."""
    scheduled_start_time: str | None = None
    """TM (HHMMSS) in the zone of the DICOM values; None for a date without a time."""
    requester: str | None = None
    requesting_physician: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Assigned:
    """The identifiers of a new order, for the document the caller renders."""

    row_id: int
    resource_id: str
    accession_number: str
    requested_procedure_id: str
    scheduled_procedure_step_id: str
    study_instance_uid: str


# --- identifiers -----------------------------------------------------------------------------


def base36(number: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def new_study_uid() -> str:
    """A UID from a UUID (PS3.5 B.2): unique without a registered root."""
    return f"2.25.{uuid.uuid4().int}"


def _check_sh(value: str | None, name: str) -> None:
    if value is not None and (len(value) > MAX_SH or "\\" in value):
        raise OrderError(
            "invalid", f"{name} {value!r}: at most {MAX_SH} characters, no backslash (SH)", name
        )


def _columns(draft: OrderDraft) -> dict[str, Any]:
    if draft.status not in ORDER_STATUSES:
        raise OrderError("invalid", f"status {draft.status!r} is not an order status", "status")
    _check_sh(draft.accession_number, "accession_number")
    _check_sh(draft.scheduled_station_name, "scheduled_station_name")
    _check_sh(draft.modality, "modality")
    _check_sh(draft.scheduled_station_ae_title, "scheduled_station_ae_title")
    return {
        "status": draft.status,
        "intent": draft.intent,
        "priority": draft.priority,
        "patient_fk": draft.patient_row,
        "issuer_of_accession_number": draft.issuer_of_accession_number,
        "procedure_scheme": draft.procedure_scheme,
        "procedure_code": draft.procedure_code,
        "procedure_display": (draft.procedure_display or None) and draft.procedure_display[:64],
        "modality": draft.modality,
        "scheduled_station_ae_title": draft.scheduled_station_ae_title,
        "scheduled_station_name": draft.scheduled_station_name,
        "scheduled_start": draft.scheduled_start,
        "scheduled_start_date": draft.scheduled_start_date,
        "scheduled_start_time": draft.scheduled_start_time,
        "requester": (draft.requester or None) and draft.requester[:255],
        "requesting_physician": draft.requesting_physician,
        "reason": draft.reason,
    }


def _patient_id(target: Target, patient_row: int) -> str | None:
    return target.execute(select(Patient.patient_id).where(Patient.id == patient_row)).scalar()


def _emit(target: Target, event: str, row: Row[Any]) -> None:
    outbox.emit(
        target,
        event,
        study_uid=row.study_instance_uid,
        patient_id=_patient_id(target, row.patient_fk),
        resource=f"ServiceRequest/{row.resource_id}",
        data={
            "accession_number": row.accession_number,
            "status": row.status,
            "procedure_code": row.procedure_code,
            "step_status": row.step_status,
            "version": row.version,
        },
    )


# --- writes ----------------------------------------------------------------------------------


def create(
    target: Target,
    draft: OrderDraft,
    render: Callable[[Assigned], dict[str, Any]],
    *,
    now: datetime | None = None,
) -> Row[Any]:
    """Insert a new order (version 1) with its identifiers, the document ``render`` makes of
    them, its first version and the ``order.scheduled`` event; its row.

    OrderError ``conflict`` when the draft's Accession Number or Study Instance UID belongs to
    another order, ``not-found`` when its patient is not in the index."""
    if _patient_id(target, draft.patient_row) is None:
        raise OrderError("not-found", f"no patient row {draft.patient_row}", "patient")
    now = now or datetime.now(UTC)
    values = _columns(draft)
    values["step_status"] = _STEP_OF_STATUS.get(draft.status, "SCHEDULED")
    given_accession = draft.accession_number
    given_uid = draft.study_instance_uid
    for name, value, column in (
        ("accession_number", given_accession, ORDERS.c.accession_number),
        ("study_instance_uid", given_uid, ORDERS.c.study_instance_uid),
    ):
        if value is not None:
            holder = target.execute(select(ORDERS.c.resource_id).where(column == value)).scalar()
            if holder is not None:
                raise OrderError(
                    "conflict", f"{name} {value!r} belongs to ServiceRequest/{holder}", name
                )
    study_uid = given_uid or new_study_uid()
    # The numbers (id, accession number, RP/SPS IDs) derive from the row's id: the row is
    # inserted with unique interim values, then given them in the same savepoint; nothing
    # outside this transaction ever sees the interim row.
    placeholder = f"new-{uuid.uuid4().hex}"
    for attempt in range(8):
        nested = target.begin_nested()
        try:
            row_id = target.execute(
                insert(ORDERS)
                .values(
                    **values,
                    resource_id=placeholder,
                    version=1,
                    accession_number=given_accession or placeholder[:MAX_SH],
                    requested_procedure_id="-",
                    scheduled_procedure_step_id="-",
                    study_instance_uid=study_uid,
                    document={},
                    created_at=now,
                    updated_at=now,
                )
                .returning(ORDERS.c.id)
            ).scalar_one()
            number = base36(row_id).rjust(6, "0")
            accession = given_accession
            if accession is None:
                suffix = "" if attempt == 0 else base36(secrets.randbelow(36**3))
                accession = (ACCESSION_PREFIX + number + suffix)[:MAX_SH]
            assigned = Assigned(
                row_id=row_id,
                resource_id=str(row_id),
                accession_number=accession,
                requested_procedure_id=("RP" + number)[:MAX_SH],
                scheduled_procedure_step_id=("SPS" + number)[:MAX_SH],
                study_instance_uid=study_uid,
            )
            document = render(assigned)
            target.execute(
                update(ORDERS)
                .where(ORDERS.c.id == row_id)
                .values(
                    resource_id=assigned.resource_id,
                    accession_number=assigned.accession_number,
                    requested_procedure_id=assigned.requested_procedure_id,
                    scheduled_procedure_step_id=assigned.scheduled_procedure_step_id,
                    document=document,
                )
            )
            nested.commit()
            break
        except IntegrityError:
            nested.rollback()
            if given_accession is not None or attempt == 7:
                raise OrderError(
                    "conflict",
                    "the order's Accession Number or Study Instance UID is held by another order",
                    "accession_number",
                ) from None
    target.execute(
        insert(VERSIONS).values(order_fk=row_id, version=1, document=document, created_at=now)
    )
    row = _row(target, row_id)
    _emit(target, "order.scheduled", row)
    return row


def update_order(
    target: Target,
    order_id: int,
    draft: OrderDraft,
    document: dict[str, Any],
    *,
    event: str | None = None,
    now: datetime | None = None,
) -> Row[Any]:
    """A new version of an order as its orderer changed it: the columns of ``draft`` (its
    Accession Number and Study Instance UID stay what they are; None keeps them), the
    ``document`` as given, and the event (``order.updated``; ``order.cancelled`` when the
    order leaves the worklist for good)."""
    current = _locked(target, order_id)
    now = now or datetime.now(UTC)
    values = _columns(draft)
    for name in ("accession_number", "study_instance_uid"):
        given = getattr(draft, name)
        if given is not None and given != getattr(current, name):
            raise OrderError(
                "invalid",
                f"{name} cannot change (it is {getattr(current, name)!r})",
                name,
            )
    values["step_status"] = _STEP_OF_STATUS.get(draft.status, current.step_status)
    if draft.status not in _STEP_OF_STATUS and current.step_status in ("DISCONTINUED",):
        values["step_status"] = "SCHEDULED"  # an order put back on the worklist
    if event is None:
        event = (
            "order.cancelled"
            if draft.status in ("revoked", "entered-in-error")
            and current.status not in ("revoked", "entered-in-error")
            else "order.updated"
        )
    version = current.version + 1
    target.execute(
        update(ORDERS)
        .where(ORDERS.c.id == order_id)
        .values(**values, version=version, document=document, updated_at=now)
    )
    target.execute(
        insert(VERSIONS).values(
            order_fk=order_id, version=version, document=document, created_at=now
        )
    )
    row = _row(target, order_id)
    _emit(target, event, row)
    return row


def cancel(
    target: Target,
    order_id: int,
    *,
    status: str = "revoked",
    now: datetime | None = None,
) -> Row[Any]:
    """Revoke an order (or mark it ``entered-in-error``): its step is discontinued and leaves
    the worklist; the row and every version stay. Cancelling a cancelled order changes
    nothing (its row as it is)."""
    if status not in ("revoked", "entered-in-error"):
        raise OrderError(
            "invalid", "an order is cancelled as revoked or entered-in-error", "status"
        )
    current = _locked(target, order_id)
    if current.status == status:
        return current
    transition(target, order_id, status=status, step_status="DISCONTINUED", event="order.cancelled")
    return _row(target, order_id)


def transition(
    conn: Target,
    order_id: int,
    *,
    status: str | None = None,
    step_status: str | None = None,
    event: str | None = None,
    study_instance_uid: str | None = None,
) -> None:
    """Move an order's status and/or its step's status (and, when the images came with another
    Study Instance UID, the order's UID to theirs): a new version whose document is the stored
    one with ``status`` (and the ``urn:dicom:uid`` identifier) replaced, and ``event`` emitted
    when given (``order.in-progress``, ``order.completed``, ``order.discontinued``…)."""
    if status is not None and status not in ORDER_STATUSES:
        raise OrderError("invalid", f"status {status!r} is not an order status", "status")
    if step_status is not None and step_status not in STEP_STATUSES:
        raise OrderError("invalid", f"step status {step_status!r} is not one", "step_status")
    current = _locked(conn, order_id)
    now = datetime.now(UTC)
    document = copy.deepcopy(dict(current.document or {}))
    values: dict[str, Any] = {}
    if status is not None:
        values["status"] = status
        document["status"] = status
    if step_status is not None:
        values["step_status"] = step_status
    if study_instance_uid is not None and study_instance_uid != current.study_instance_uid:
        holder = conn.execute(
            select(ORDERS.c.id).where(ORDERS.c.study_instance_uid == study_instance_uid)
        ).scalar()
        if holder is not None:
            raise OrderError(
                "conflict",
                f"Study Instance UID {study_instance_uid} belongs to another order",
                "study_instance_uid",
            )
        values["study_instance_uid"] = study_instance_uid
        for item in document.get("identifier") or []:
            if isinstance(item, dict) and item.get("system") == _DICOM_UID_SYSTEM:
                item["value"] = f"urn:oid:{study_instance_uid}"
    version = current.version + 1
    conn.execute(
        update(ORDERS)
        .where(ORDERS.c.id == order_id)
        .values(**values, version=version, document=document, updated_at=now)
    )
    conn.execute(
        insert(VERSIONS).values(
            order_fk=order_id, version=version, document=document, created_at=now
        )
    )
    if event is not None:
        _emit(conn, event, _row(conn, order_id))


# --- reads -----------------------------------------------------------------------------------


def _row(target: Target, order_id: int) -> Row[Any]:
    row = target.execute(select(ORDERS).where(ORDERS.c.id == order_id)).first()
    if row is None:
        raise OrderError("not-found", f"no order {order_id}", "id")
    return row


def _locked(target: Target, order_id: int) -> Row[Any]:
    """The order's row, locked until the transaction ends (PostgreSQL; SQLite writers take
    turns already): concurrent changes of one order take turns."""
    row = target.execute(select(ORDERS).where(ORDERS.c.id == order_id).with_for_update()).first()
    if row is None:
        raise OrderError("not-found", f"no order {order_id}", "id")
    return row


def get(target: Target, order_id: int) -> Row[Any] | None:
    return target.execute(select(ORDERS).where(ORDERS.c.id == order_id)).first()


def by_resource_id(target: Target, resource_id: str, *, lock: bool = False) -> Row[Any] | None:
    """The order of a ServiceRequest id; ``lock``: locked until the transaction ends, for a
    change decided on what it holds (its version against If-Match, its status)."""
    query = select(ORDERS).where(ORDERS.c.resource_id == resource_id)
    return target.execute(query.with_for_update() if lock else query).first()


def find_order(
    conn: Target,
    *,
    accession_number: str | None = None,
    requested_procedure_id: str | None = None,
    study_instance_uid: str | None = None,
) -> Row[Any] | None:
    """The order named by any of these (the first given that matches, in this order: the
    Accession Number is unique, so is the Study Instance UID; a Requested Procedure ID is
    unique for the orders assigned here), or None."""
    for column, value in (
        (ORDERS.c.accession_number, accession_number),
        (ORDERS.c.study_instance_uid, study_instance_uid),
        (ORDERS.c.requested_procedure_id, requested_procedure_id),
    ):
        if value:
            row = conn.execute(
                select(ORDERS).where(column == value).order_by(ORDERS.c.id.desc()).limit(1)
            ).first()
            if row is not None:
                return row
    return None


def versions(target: Target, order_id: int) -> list[Row[Any]]:
    """Every version of an order, newest first."""
    return list(
        target.execute(
            select(VERSIONS)
            .where(VERSIONS.c.order_fk == order_id)
            .order_by(VERSIONS.c.version.desc())
        )
    )
