"""Modality Performed Procedure Steps (PS3.4 F.7): what a modality reports it performed.

A modality creates a step with N-CREATE (status IN PROGRESS) and changes it with N-SET until it
is COMPLETED or DISCONTINUED. Each step is one :class:`~archive.orders.PerformedProcedureStep`
row holding the step's attributes as DICOM JSON (PS3.18 F.2): the N-CREATE's, with each
N-SET's applied. The edge decodes the DIMSE attribute lists into DICOM JSON; this module knows
no protocol and answers bad requests with an :class:`MppsError` whose :class:`MppsErrorKind`
the edge turns into a status.

**The orders.** A step is tied to every order (:class:`~archive.orders.ImagingOrder`) that an
item of its Scheduled Step Attributes Sequence (0040,0270) names, by Accession Number, Requested
Procedure ID or Study Instance UID: one item per Requested Procedure, so several in the IHE RAD
SWF "group case" (one acquisition performs several ordered procedures), each order moved alike
(:class:`~archive.orders.PerformedStepOrder`; the first named is the step's ``order_fk``). A
step that names none is an unscheduled one (PS3.4 F.7.2.1, IHE RAD SWF "unscheduled case"),
kept without an order. The effects on each order, through
:func:`archive.ordering.transition` (which writes the order's new version and its outbox
event):

- IN PROGRESS (N-CREATE): the Scheduled Procedure Step Status becomes STARTED,
  event ``order.in-progress``; the order's Study Instance UID follows the step's when the
  modality chose another one (and no other order holds that one: in a group case the first
  order named takes it);
- COMPLETED: the ServiceRequest becomes ``completed``, the step COMPLETED, event
  ``order.completed``;
- DISCONTINUED: the step becomes DISCONTINUED, event ``order.discontinued``; the
  ServiceRequest stays ``active``. IHE RAD SWF (RAD-7 "Modality Procedure Step Completed/
  Discontinued") leaves it to the Order Filler to reschedule a discontinued procedure step or
  to cancel its order: the procedure was not done, so the order is neither fulfilled nor
  cancelled here; it stays on the worklist for a new attempt (whose N-CREATE starts it again)
  until the EHR revokes or completes it.

An order already ``completed``, ``revoked`` or ``entered-in-error`` is not moved by a step
(an appended step, say): the step is kept and tied to it all the same.

The step row, the order's change, its event and the audit event (PS3.15 A.5.3 "Procedure
Record", 110111, action C for N-CREATE, U for N-SET) commit in one transaction.

**Retrieve.** A step's attributes are read back by its SOP Instance UID (:func:`read_step`,
the N-GET of the Modality Performed Procedure Step Retrieve SOP Class, PS3.4 F.8), by the
Performed Procedure Step Manager or Order Filler that did not receive the modality's own
requests.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from sqlalchemy import Table, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from archive.audit import AuditEvent, record_change
from archive.db import Database
from archive.models import Patient
from archive.ordering import by_resource_id, find_order, transition
from archive.orders import (
    PERFORMED_STATUSES,
    ImagingOrder,
    PerformedProcedureStep,
    PerformedStepOrder,
)

log = logging.getLogger(__name__)

_STEP: Table = PerformedProcedureStep.__table__  # type: ignore[assignment]
_ORDER: Table = ImagingOrder.__table__  # type: ignore[assignment]
_STEP_ORDER: Table = PerformedStepOrder.__table__  # type: ignore[assignment]

IN_PROGRESS, COMPLETED, DISCONTINUED = PERFORMED_STATUSES

# Attribute tags (DICOM JSON keys).
SPECIFIC_CHARACTER_SET = "00080005"
ACCESSION_NUMBER = "00080050"
MODALITY = "00080060"
PROCEDURE_CODE_SEQUENCE = "00081032"
CODE_VALUE, CODING_SCHEME, CODE_MEANING = "00080100", "00080102", "00080104"
PATIENT_NAME, PATIENT_ID, ISSUER_OF_PATIENT_ID = "00100010", "00100020", "00100021"
PATIENT_BIRTH_DATE, PATIENT_SEX = "00100030", "00100040"
STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = "0020000D", "0020000E"
SCHEDULED_PROCEDURE_STEP_ID = "00400009"
PERFORMED_STATION_AE_TITLE = "00400241"
START_DATE, START_TIME = "00400244", "00400245"
END_DATE, END_TIME = "00400250", "00400251"
STATUS = "00400252"
PERFORMED_PROCEDURE_STEP_ID = "00400253"
SCHEDULED_STEP_ATTRIBUTES_SEQUENCE = "00400270"
DISCONTINUATION_REASON_SEQUENCE = "00400281"
PERFORMED_SERIES_SEQUENCE = "00400340"
REQUESTED_PROCEDURE_ID = "00401001"

#: Type 1 attributes of the N-CREATE (PS3.4 Table F.7.2-1, "N-CREATE" column): a step
#: without one of them is refused.
CREATE_REQUIRED = (
    SCHEDULED_STEP_ATTRIBUTES_SEQUENCE,
    PERFORMED_STATION_AE_TITLE,
    START_DATE,
    START_TIME,
    STATUS,
    PERFORMED_PROCEDURE_STEP_ID,
    MODALITY,
)
#: Attributes PS3.4 Table F.7.2-1 marks "Not allowed" in an N-SET: the step's identity, its
#: patient, where and when it started. An N-SET that repeats their value is accepted (some
#: modalities send the whole step again), one that changes it is refused.
NOT_SETTABLE = (
    SCHEDULED_STEP_ATTRIBUTES_SEQUENCE,
    PATIENT_NAME,
    PATIENT_ID,
    ISSUER_OF_PATIENT_ID,
    PATIENT_BIRTH_DATE,
    PATIENT_SEX,
    PERFORMED_STATION_AE_TITLE,
    START_DATE,
    START_TIME,
    PERFORMED_PROCEDURE_STEP_ID,
    MODALITY,
)
#: PS3.4 F.7.2.2.2: an N-SET on a step that is COMPLETED or DISCONTINUED fails with status
#: 0110H, this Error ID (0000,0903) and this Error Comment (0000,0902).
NO_LONGER_UPDATABLE = "Performed Procedure Step Object may no longer be updated"
NO_LONGER_UPDATABLE_ERROR_ID = 0xA710

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_UI = re.compile(r"[0-9]+(\.[0-9]+)*")

#: The order status a step leaves alone (the order is over).
_ORDER_CLOSED = ("completed", "revoked", "entered-in-error")


class MppsErrorKind(Enum):
    """Why a step request is refused (the edge's status for each, PS3.4 F.7.2.1.2/F.7.2.2.2
    and PS3.7 C)."""

    DUPLICATE = "duplicate SOP instance"  # 0111H
    NO_SUCH_INSTANCE = "no such object instance"  # 0112H
    INVALID_VALUE = "invalid attribute value"  # 0106H
    MISSING_ATTRIBUTE = "missing attribute"  # 0120H
    MISSING_VALUE = "missing attribute value"  # 0121H
    NOT_UPDATABLE = "may no longer be updated"  # 0110H, Error ID A710H


class MppsError(Exception):
    def __init__(self, kind: MppsErrorKind, reason: str, tags: Iterable[str] = ()) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.tags = tuple(tags)
        """The attributes at fault (DICOM JSON keys), for the Attribute Identifier List."""


@dataclass(slots=True)
class StepResult:
    """A step as a request left it."""

    sop_instance_uid: str
    status: str
    study_instance_uid: str | None
    patient_id: str | None
    order_id: int | None = None
    order_resource_id: str | None = None
    events: list[str] = field(default_factory=list)
    """The order events this request emitted (their types), of every order."""
    order_resource_ids: list[str] = field(default_factory=list)
    """The ServiceRequest ids of every order the step performs (the first is ``order_id``'s)."""


# --- DICOM JSON ------------------------------------------------------------------------------


def _values(dataset: dict[str, Any], tag: str) -> list[Any]:
    element = dataset.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def text(dataset: dict[str, Any], tag: str) -> str | None:
    """The first value of an attribute as text (a person name's alphabetic group)."""
    values = _values(dataset, tag)
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):
        value = value.get("Alphabetic")
    found = str(value).strip() if value is not None else ""
    return found or None


def items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    """The items of a sequence attribute."""
    return [item for item in _values(dataset, tag) if isinstance(item, dict)]


def code_of(dataset: dict[str, Any], tag: str) -> tuple[str | None, str, str | None] | None:
    """(Coding Scheme Designator, Code Value, Code Meaning) of a code sequence's first item."""
    for item in items(dataset, tag):
        value = text(item, CODE_VALUE)
        if value:
            return text(item, CODING_SCHEME), value, text(item, CODE_MEANING)
    return None


def _present(dataset: dict[str, Any], tag: str) -> bool:
    return isinstance(dataset.get(tag), dict)


# --- checks ----------------------------------------------------------------------------------


def _check_formats(dataset: dict[str, Any]) -> None:
    """The values the index keeps must fit their VRs (PS3.5 6.2): dates, times, UIDs."""
    for tag in (START_DATE, END_DATE):
        value = text(dataset, tag)
        if value is not None and not _DA.fullmatch(value):
            raise MppsError(
                MppsErrorKind.INVALID_VALUE, f"({tag[:4]},{tag[4:]}) {value!r} is not a DA", [tag]
            )
    for tag in (START_TIME, END_TIME):
        value = text(dataset, tag)
        if value is not None and not _TM.fullmatch(value):
            raise MppsError(
                MppsErrorKind.INVALID_VALUE, f"({tag[:4]},{tag[4:]}) {value!r} is not a TM", [tag]
            )
    for item in items(dataset, SCHEDULED_STEP_ATTRIBUTES_SEQUENCE):
        uid = text(item, STUDY_INSTANCE_UID)
        if uid is not None and (len(uid) > 64 or not _UI.fullmatch(uid)):
            raise MppsError(
                MppsErrorKind.INVALID_VALUE,
                f"Study Instance UID {uid[:40]!r} is not a UID",
                [SCHEDULED_STEP_ATTRIBUTES_SEQUENCE],
            )


def _check_create(dataset: dict[str, Any]) -> None:
    """PS3.4 F.7.2.1.2: the N-CREATE's Type 1 attributes, and a status of IN PROGRESS."""
    missing = [tag for tag in CREATE_REQUIRED if not _present(dataset, tag)]
    if missing:
        raise MppsError(
            MppsErrorKind.MISSING_ATTRIBUTE,
            "missing " + ", ".join(f"({t[:4]},{t[4:]})" for t in missing),
            missing,
        )
    empty = [
        tag
        for tag in CREATE_REQUIRED
        if (
            not items(dataset, tag)
            if tag == SCHEDULED_STEP_ATTRIBUTES_SEQUENCE
            else not text(dataset, tag)
        )
    ]
    if empty:
        raise MppsError(
            MppsErrorKind.MISSING_VALUE,
            "no value in " + ", ".join(f"({t[:4]},{t[4:]})" for t in empty),
            empty,
        )
    if any(
        not text(item, STUDY_INSTANCE_UID)
        for item in items(dataset, SCHEDULED_STEP_ATTRIBUTES_SEQUENCE)
    ):
        raise MppsError(
            MppsErrorKind.MISSING_VALUE,
            "a Scheduled Step Attributes item has no Study Instance UID",
            [SCHEDULED_STEP_ATTRIBUTES_SEQUENCE],
        )
    status = text(dataset, STATUS)
    if status != IN_PROGRESS:
        raise MppsError(
            MppsErrorKind.INVALID_VALUE,
            f"a step is created IN PROGRESS, not {status!r}",
            [STATUS],
        )
    _check_formats(dataset)


def _check_final(dataset: dict[str, Any], status: str) -> None:
    """PS3.4 Table F.7.2-1 "Final State" requirements of a step set COMPLETED or DISCONTINUED:
    its end date and time; a COMPLETED step also its Performed Series Sequence, each item
    with its Series Instance UID. (A DISCONTINUED step may have made no series at all.)"""
    empty = [tag for tag in (END_DATE, END_TIME) if not text(dataset, tag)]
    if status == COMPLETED:
        series = items(dataset, PERFORMED_SERIES_SEQUENCE)
        if not series or any(not text(item, SERIES_INSTANCE_UID) for item in series):
            empty.append(PERFORMED_SERIES_SEQUENCE)
    if empty:
        raise MppsError(
            MppsErrorKind.MISSING_VALUE,
            f"{status} needs " + ", ".join(f"({t[:4]},{t[4:]})" for t in empty),
            empty,
        )


# --- columns ---------------------------------------------------------------------------------


def _cut(value: str | None, size: int) -> str | None:
    return value[:size] if value else None


def _columns(dataset: dict[str, Any]) -> dict[str, Any]:
    """The step row's columns of its attributes."""
    scheduled = items(dataset, SCHEDULED_STEP_ATTRIBUTES_SEQUENCE)
    first = scheduled[0] if scheduled else {}
    code = code_of(dataset, PROCEDURE_CODE_SEQUENCE)
    reason = code_of(dataset, DISCONTINUATION_REASON_SEQUENCE)
    return {
        "status": text(dataset, STATUS),
        "study_instance_uid": _cut(text(first, STUDY_INSTANCE_UID), 64),
        "accession_number": _cut(text(first, ACCESSION_NUMBER), 16),
        "requested_procedure_id": _cut(text(first, REQUESTED_PROCEDURE_ID), 16),
        "scheduled_procedure_step_id": _cut(text(first, SCHEDULED_PROCEDURE_STEP_ID), 16),
        "performed_procedure_step_id": _cut(text(dataset, PERFORMED_PROCEDURE_STEP_ID), 16),
        "modality": _cut(text(dataset, MODALITY), 16),
        "station_ae_title": _cut(text(dataset, PERFORMED_STATION_AE_TITLE), 16),
        "start_date": text(dataset, START_DATE),
        "start_time": text(dataset, START_TIME),
        "end_date": text(dataset, END_DATE),
        "end_time": text(dataset, END_TIME),
        "procedure_scheme": _cut(code[0], 64) if code else None,
        "procedure_code": _cut(code[1], 64) if code else None,
        "procedure_display": _cut(code[2], 64) if code else None,
        "discontinuation_reason": _cut((reason[2] or reason[1]) if reason else None, 64),
    }


# --- the order -------------------------------------------------------------------------------


def _orders_of(conn: Connection, dataset: dict[str, Any]) -> list[Any]:
    """The orders the items of the Scheduled Step Attributes Sequence name, each once, in the
    order of the items (an item names its order by the first of its Accession Number,
    Requested Procedure ID and Study Instance UID that finds one)."""
    found: dict[int, Any] = {}
    for item in items(dataset, SCHEDULED_STEP_ATTRIBUTES_SEQUENCE):
        for keys in (
            {"accession_number": text(item, ACCESSION_NUMBER)},
            {"requested_procedure_id": text(item, REQUESTED_PROCEDURE_ID)},
            {"study_instance_uid": text(item, STUDY_INSTANCE_UID)},
        ):
            if not next(iter(keys.values())):
                continue
            order = find_order(conn, **keys)
            if order is not None:
                found.setdefault(int(order.id), order)
                break
    return list(found.values())


def _orders_of_step(conn: Connection, step_id: int, first: int | None) -> list[Any]:
    """The orders a step was tied to when it was created, its first (``order_fk``) first."""
    rows = conn.execute(
        select(_ORDER)
        .join(_STEP_ORDER, _STEP_ORDER.c.order_fk == _ORDER.c.id)
        .where(_STEP_ORDER.c.step_fk == step_id)
        .order_by(_ORDER.c.id)
    ).all()
    return sorted(rows, key=lambda row: row.id != first)


def _lock_orders(conn: Connection, orders: list[Any]) -> None:
    """Lock the orders (PostgreSQL; SQLite writers take turns already) in the order of their
    ids, before anything refers to them: the step's rows would otherwise take key-share locks
    on them first, and two steps naming the same orders would each wait for the other's."""
    if orders:
        conn.execute(
            select(_ORDER.c.id)
            .where(_ORDER.c.id.in_([o.id for o in orders]))
            .order_by(_ORDER.c.id)
            .with_for_update()
        ).all()


def _move_orders(
    conn: Connection, orders: list[Any], status: str, study_uid: str | None
) -> list[str]:
    """:func:`_move_order` for each order (locked already: :func:`_lock_orders`), in the
    order the step names them: the first takes the step's Study Instance UID when it moves."""
    events: list[str] = []
    for order in orders:
        events += _move_order(conn, order, status, study_uid)
    return events


def _patient_of(conn: Connection, dataset: dict[str, Any], order: Any | None) -> int | None:
    """The patient's index row: the order's, else the one Patient ID (and issuer) names."""
    if order is not None:
        return int(order.patient_fk)
    patient_id = text(dataset, PATIENT_ID)
    if not patient_id:
        return None
    rows = conn.execute(
        select(Patient.id)
        .where(
            Patient.patient_id == patient_id,
            Patient.issuer_of_patient_id == (text(dataset, ISSUER_OF_PATIENT_ID) or ""),
        )
        .limit(2)
    ).all()
    return int(rows[0][0]) if len(rows) == 1 else None


def _move_order(conn: Connection, order: Any, status: str, study_uid: str | None) -> list[str]:
    """Apply a step's status to its order (see the module's docstring); the events emitted."""
    # Decided on the order as it stands, locked: a revoke committed since it was found wins.
    order = by_resource_id(conn, order.resource_id, lock=True) or order
    if order.status in _ORDER_CLOSED:
        log.info(
            "performed step for a closed order: the order is left as it is",
            extra={"order": order.resource_id, "order_status": order.status, "step": status},
        )
        return []
    if status == IN_PROGRESS:
        moved_study = None
        if study_uid and study_uid != order.study_instance_uid:
            holder = find_order(conn, study_instance_uid=study_uid)
            if holder is None:
                moved_study = study_uid
        transition(
            conn,
            order.id,
            step_status="STARTED",
            event="order.in-progress",
            study_instance_uid=moved_study,
        )
        return ["order.in-progress"]
    if status == COMPLETED:
        transition(
            conn, order.id, status="completed", step_status="COMPLETED", event="order.completed"
        )
        return ["order.completed"]
    transition(conn, order.id, step_status="DISCONTINUED", event="order.discontinued")
    return ["order.discontinued"]


# --- requests --------------------------------------------------------------------------------


def create_step(
    db: Database,
    sop_instance_uid: str,
    attributes: dict[str, Any],
    *,
    calling_ae_title: str = "",
    audit: AuditEvent | None = None,
) -> StepResult:
    """N-CREATE (PS3.4 F.7.2.1): a new step IN PROGRESS, tied to its orders, which start.
    ``attributes``: the request's Attribute List as DICOM JSON; ``audit``: the requestor's
    event, recorded in the step's transaction. Two requests for one SOP Instance UID at once:
    the second is a duplicate (0111), as it is when it comes later."""
    try:
        return _create_step(
            db, sop_instance_uid, attributes, calling_ae_title=calling_ae_title, audit=audit
        )
    except IntegrityError:
        with db.engine.connect() as conn:
            held = conn.execute(
                select(_STEP.c.id).where(_STEP.c.sop_instance_uid == sop_instance_uid)
            ).first()
        if held is None:
            raise
        raise MppsError(
            MppsErrorKind.DUPLICATE, f"step {sop_instance_uid} exists already"
        ) from None


def _create_step(
    db: Database,
    sop_instance_uid: str,
    attributes: dict[str, Any],
    *,
    calling_ae_title: str = "",
    audit: AuditEvent | None = None,
) -> StepResult:
    """N-CREATE (PS3.4 F.7.2.1): a new step IN PROGRESS, tied to its orders, which start.
    ``attributes``: the request's Attribute List as DICOM JSON; ``audit``: the requestor's
    event, recorded in the step's transaction."""
    _check_create(attributes)
    dataset = copy.deepcopy(attributes)
    columns = _columns(dataset)
    now = datetime.now(UTC)
    with db.write_connection() as conn:
        if conn.execute(
            select(_STEP.c.id).where(_STEP.c.sop_instance_uid == sop_instance_uid)
        ).first():
            raise MppsError(MppsErrorKind.DUPLICATE, f"step {sop_instance_uid} exists already")
        orders = _orders_of(conn, dataset)
        _lock_orders(conn, orders)
        order = orders[0] if orders else None
        patient_fk = _patient_of(conn, dataset, order)
        inserted = conn.execute(
            insert(_STEP).values(
                sop_instance_uid=sop_instance_uid,
                order_fk=order.id if order is not None else None,
                patient_fk=patient_fk,
                version=1,
                calling_ae_title=_cut(calling_ae_title.strip(), 16),
                dataset=dataset,
                created_at=now,
                updated_at=now,
                **columns,
            )
        )
        step_id = inserted.inserted_primary_key[0] if inserted.inserted_primary_key else None
        if orders:
            conn.execute(
                insert(_STEP_ORDER),
                [{"step_fk": step_id, "order_fk": o.id} for o in orders],
            )
        events = _move_orders(conn, orders, IN_PROGRESS, columns["study_instance_uid"])
        return _recorded(
            conn, audit, sop_instance_uid, IN_PROGRESS, dataset, columns, orders, events
        )


def _recorded(
    conn: Connection,
    audit: Any,
    sop_instance_uid: str,
    status: str,
    dataset: dict[str, Any],
    columns: dict[str, Any],
    orders: list[Any],
    events: list[str],
) -> StepResult:
    """The audit event of a step written (in its transaction), and what it did."""
    patient_id = text(dataset, PATIENT_ID)
    record_change(
        conn,
        audit,
        entity=f"Procedure/{sop_instance_uid}",
        patient_id=patient_id,
        study_uid=columns["study_instance_uid"],
    )
    first = orders[0] if orders else None
    return StepResult(
        sop_instance_uid,
        status,
        columns["study_instance_uid"],
        patient_id,
        first.id if first is not None else None,
        first.resource_id if first is not None else None,
        events,
        [str(o.resource_id) for o in orders],
    )


@dataclass(slots=True)
class StoredStep:
    """A step as N-GET reads it."""

    attributes: dict[str, Any]
    """The N-CREATE's attributes with each N-SET's applied, as DICOM JSON."""
    study_instance_uid: str | None
    patient_id: str | None


def read_step(db: Database, sop_instance_uid: str) -> StoredStep | None:
    """N-GET (PS3.4 F.8.2.1, the Modality Performed Procedure Step Retrieve SOP Class): the
    step as it stands; None when there is no such step."""
    with db.engine.connect() as conn:
        row = conn.execute(
            select(_STEP.c.dataset, _STEP.c.study_instance_uid).where(
                _STEP.c.sop_instance_uid == sop_instance_uid
            )
        ).first()
    if row is None:
        return None
    attributes = dict(row.dataset or {})
    return StoredStep(attributes, row.study_instance_uid, text(attributes, PATIENT_ID))


def _merged(dataset: dict[str, Any], modifications: dict[str, Any]) -> dict[str, Any]:
    """The step's attributes with an N-SET's Modification List applied (PS3.7 10.1.3: each
    attribute given replaces the one held; one given without a value empties it)."""
    changed = [
        tag
        for tag in NOT_SETTABLE
        if tag in modifications and modifications[tag] != dataset.get(tag)
    ]
    if changed:
        raise MppsError(
            MppsErrorKind.INVALID_VALUE,
            "N-SET may not change " + ", ".join(f"({t[:4]},{t[4:]})" for t in changed),
            changed,
        )
    # DICOM JSON holds decoded text: values of a Modification List in another Specific
    # Character Set than the step's mix with the step's as they are.
    merged = copy.deepcopy(dataset)
    merged.update(copy.deepcopy(modifications))
    return merged


def update_step(
    db: Database,
    sop_instance_uid: str,
    modifications: dict[str, Any],
    *,
    audit: AuditEvent | None = None,
) -> StepResult:
    """N-SET (PS3.4 F.7.2.2): change a step IN PROGRESS; COMPLETED or DISCONTINUED make it
    final and move its order. ``modifications``: the Modification List as DICOM JSON."""
    new_status = text(modifications, STATUS) if _present(modifications, STATUS) else None
    if _present(modifications, STATUS) and new_status not in PERFORMED_STATUSES:
        raise MppsError(
            MppsErrorKind.INVALID_VALUE,
            f"Performed Procedure Step Status {new_status!r} is not one of "
            + ", ".join(PERFORMED_STATUSES),
            [STATUS],
        )
    with db.write_connection() as conn:
        row = conn.execute(
            select(_STEP).where(_STEP.c.sop_instance_uid == sop_instance_uid).with_for_update()
        ).first()
        if row is None:
            raise MppsError(MppsErrorKind.NO_SUCH_INSTANCE, f"no step {sop_instance_uid}")
        if row.status != IN_PROGRESS:
            # PS3.4 F.7.2.2.2: a final step may no longer be updated.
            raise MppsError(MppsErrorKind.NOT_UPDATABLE, NO_LONGER_UPDATABLE)
        dataset = _merged(row.dataset or {}, modifications)
        status = text(dataset, STATUS) or IN_PROGRESS
        _check_formats(dataset)
        if status != IN_PROGRESS:
            _check_final(dataset, status)
        columns = _columns(dataset)
        columns["status"] = status
        conn.execute(
            update(_STEP)
            .where(_STEP.c.id == row.id)
            .values(
                dataset=dataset,
                version=row.version + 1,
                updated_at=datetime.now(UTC),
                **columns,
            )
        )
        orders = _orders_of_step(conn, row.id, row.order_fk)
        events: list[str] = []
        if status != IN_PROGRESS:
            _lock_orders(conn, orders)
            events = _move_orders(conn, orders, status, columns["study_instance_uid"])
        return _recorded(conn, audit, sop_instance_uid, status, dataset, columns, orders, events)
