"""Which order a study's images were made for.

Images carry their order in the Accession Number (0008,0050) and in the Request Attributes
Sequence (0040,0275: Requested Procedure ID (0040,1001), Accession Number, Study Instance UID;
PS3.3 C.4.13 / IHE RAD SWF), and a study made for an order has the Study Instance UID that the
worklist gave (PS3.4 K.6.1.2.2). Nothing of this is looked at while an instance is stored:

- **at view time** (:func:`orders_of_studies`): a study's orders are those whose Study Instance
  UID is the study's, or whose Accession Number is the study's, and those a modality's
  performed step for the study performed with them (MPPS, the group case): two queries on
  indexed columns for a whole page of studies;
- **at stable time** (:func:`tie_stable_study`, called by the stable-study scanner in the
  transaction that declares the study stable, when the index holds orders at all): a study
  whose images name an order only by its Requested Procedure ID, or by an accession number
  while they carry another Study Instance UID than the one pre-assigned, moves the order's
  Study Instance UID to theirs (:func:`archive.ordering.transition`), after which the view
  finds it by UID.
  :func:`order_for_study` is the full look-up, :func:`orders_for_study` with the other orders
  of a group case (the charge capture uses them).

Orders ``entered-in-error`` are no one's order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Table, func, or_, select
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import Session

from archive.db import Database
from archive.models import Instance, Series, Study
from archive.ordering import find_order, transition
from archive.orders import ImagingOrder, PerformedProcedureStep, PerformedStepOrder

log = logging.getLogger(__name__)

ORDERS: Table = ImagingOrder.__table__  # type: ignore[assignment]
STEPS: Table = PerformedProcedureStep.__table__  # type: ignore[assignment]
STEP_ORDERS: Table = PerformedStepOrder.__table__  # type: ignore[assignment]

ACCESSION_NUMBER = "00080050"
STUDY_INSTANCE_UID = "0020000D"
REQUEST_ATTRIBUTES_SEQUENCE = "00400275"
REQUESTED_PROCEDURE_ID = "00401001"

_NOT_AN_ORDER = ("entered-in-error",)

Target = Session | Connection


def orders_of_studies(
    target: Target, studies: Iterable[tuple[str, str | None]]
) -> dict[str, list[str]]:
    """``{study uid: [ServiceRequest id, …]}`` for ``(study uid, accession number)`` pairs:
    the orders with the study's Study Instance UID or its Accession Number, then those a
    performed step of the study (in progress or completed) performed with them (the IHE SWF
    group case: one study for several orders, only one of which can hold its UID). Two
    queries."""
    pairs = [(uid, accession or None) for uid, accession in studies]
    uids = {uid for uid, _ in pairs}
    accessions = {accession for _, accession in pairs if accession}
    if not uids:
        return {}
    condition: ColumnElement[bool] = ORDERS.c.study_instance_uid.in_(uids)
    if accessions:
        condition = or_(condition, ORDERS.c.accession_number.in_(accessions))
    rows = target.execute(
        select(ORDERS.c.resource_id, ORDERS.c.study_instance_uid, ORDERS.c.accession_number)
        .where(condition, ORDERS.c.status.not_in(_NOT_AN_ORDER))
        .order_by(ORDERS.c.id)
    ).all()
    found: dict[str, list[str]] = {}
    for uid, accession in pairs:
        for row in rows:
            if row.study_instance_uid == uid or (accession and row.accession_number == accession):
                ids = found.setdefault(uid, [])
                if row.resource_id not in ids:
                    ids.append(row.resource_id)
    grouped = target.execute(
        select(STEPS.c.study_instance_uid, ORDERS.c.resource_id)
        .join(STEP_ORDERS, STEP_ORDERS.c.step_fk == STEPS.c.id)
        .join(ORDERS, ORDERS.c.id == STEP_ORDERS.c.order_fk)
        .where(
            STEPS.c.study_instance_uid.in_(uids),
            STEPS.c.status != "DISCONTINUED",  # what was not done is no one's basis
            ORDERS.c.status.not_in(_NOT_AN_ORDER),
        )
        .order_by(ORDERS.c.id)
    ).all()
    for uid, resource_id in grouped:
        ids = found.setdefault(uid, [])
        if resource_id not in ids:
            ids.append(resource_id)
    return found


def _request_keys(dataset: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    """(Accession Number, Requested Procedure ID) of each Request Attributes item."""
    element = dataset.get(REQUEST_ATTRIBUTES_SEQUENCE)
    values = element.get("Value") if isinstance(element, dict) else None
    keys: list[tuple[str | None, str | None]] = []
    for item in values or []:
        if isinstance(item, dict):
            keys.append((_text(item, ACCESSION_NUMBER), _text(item, REQUESTED_PROCEDURE_ID)))
    return keys


def _text(dataset: dict[str, Any], tag: str) -> str | None:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not values:
        return None
    text = str(values[0]).strip()
    return text or None


def order_for_study(target: Target, study_uid: str) -> Row[Any] | None:
    """The order of a stored study: the one with its Study Instance UID, else with its
    Accession Number, else one that the Request Attributes Sequence of its series' first
    instances names (by Accession Number or Requested Procedure ID). None when none does."""
    usable = ORDERS.c.status.not_in(_NOT_AN_ORDER)
    row = target.execute(
        select(ORDERS).where(ORDERS.c.study_instance_uid == study_uid, usable)
    ).first()
    if row is not None:
        return row
    study = target.execute(
        select(Study.id, Study.accession_number).where(Study.study_instance_uid == study_uid)
    ).first()
    if study is None:
        return None
    if study.accession_number:
        row = _usable(find_order(target, accession_number=study.accession_number))
        if row is not None:
            return row
    for (dataset,) in target.execute(
        select(Instance.dicom_json)
        .where(Instance.id.in_(_first_instances(study.id)))
        .order_by(Instance.id)
    ):
        for accession, requested in _request_keys(dataset or {}):
            row = _usable(
                find_order(target, accession_number=accession, requested_procedure_id=requested)
            )
            if row is not None:
                return row
    return None


def orders_for_study(target: Target, study_uid: str) -> list[Row[Any]]:
    """Every order of a stored study: :func:`order_for_study`'s first, then the others a
    performed step of the study (in progress or completed) performed with it (the IHE SWF
    group case), in the order of their ids. Empty when none."""
    first = order_for_study(target, study_uid)
    others = target.execute(
        select(ORDERS)
        .join(STEP_ORDERS, STEP_ORDERS.c.order_fk == ORDERS.c.id)
        .join(STEPS, STEPS.c.id == STEP_ORDERS.c.step_fk)
        .where(
            STEPS.c.study_instance_uid == study_uid,
            STEPS.c.status != "DISCONTINUED",
            ORDERS.c.status.not_in(_NOT_AN_ORDER),
        )
        .order_by(ORDERS.c.id)
    ).all()
    found = {int(row.id): row for row in ([first] if first is not None else [])}
    for row in others:
        found.setdefault(int(row.id), row)
    return list(found.values())


def _first_instances(study_row: int) -> Any:
    """The first instance row of each series of a study (a subquery)."""
    return (
        select(func.min(Instance.id))
        .join(Series, Instance.series_fk == Series.id)
        .where(Series.study_fk == study_row)
        .group_by(Series.id)
        .scalar_subquery()
    )


def _usable(row: Row[Any] | None) -> Row[Any] | None:
    return row if row is not None and row.status not in _NOT_AN_ORDER else None


def any_orders(conn: Connection) -> bool:
    """Whether the index holds an order at all (one indexed row read)."""
    return conn.execute(select(ORDERS.c.id).limit(1)).first() is not None


def tie_study(conn: Connection, study_uid: str) -> str | None:
    """Tie a stored study to its order in the caller's transaction: the order's Study Instance
    UID becomes the study's when the order was found otherwise (an accession number or a
    Requested Procedure ID) and its own UID has no images. The ServiceRequest id of the
    study's order, or None."""
    order = order_for_study(conn, study_uid)
    if order is None:
        return None
    if order.study_instance_uid != study_uid:
        has_images = conn.execute(
            select(Study.id).where(Study.study_instance_uid == order.study_instance_uid)
        ).first()
        if has_images is None:
            # A new version of the ServiceRequest (its urn:dicom:uid identifier changes):
            # subscribers hear of it as of any other change of the order.
            transition(conn, order.id, study_instance_uid=study_uid, event="order.updated")
            log.info(
                "study tied to its order", extra={"study": study_uid, "order": order.resource_id}
            )
    return str(order.resource_id)


def tie_stable_study(conn: Connection, study_uid: str) -> str | None:
    """:func:`tie_study` for the stable-study scanner (archive.stable), in a savepoint of its
    transaction: a failure to tie is logged and leaves the declaration of the study alone."""
    try:
        with conn.begin_nested():
            return tie_study(conn, study_uid)
    except Exception:
        log.exception("stable study not tied to its order", extra={"study": study_uid})
        return None


def link_study(db: Database, study_uid: str) -> str | None:
    """:func:`tie_study` in a transaction of its own."""
    with db.write_connection() as conn:
        return tie_study(conn, study_uid)
