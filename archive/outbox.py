"""The event outbox: every step of the archive's work, written in the transaction that made it.

A change that others subscribe to (an instance stored, a study stable, an order scheduled, a
charge created…) inserts one :class:`OutboxEvent` row in the same transaction as the change
itself (the transactional outbox pattern): the event exists if and only if the change does.
The ``events`` package delivers the rows, at least once, to each :class:`EventSubscription`
(RabbitMQ, webhooks, FHIR rest-hook), in the order of their ids for one study, with the
event's stable ``event_id`` for de-duplication.

Delivery keeps a cursor per subscription (the last event id it has passed); only the events
that failed, and the later events of the same study that wait behind them, get a
:class:`EventDelivery` row. The common path writes nothing per event beyond the outbox row.

Payloads carry identifiers and links (UIDs, FHIR references), never pixel data.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, Session, mapped_column

from archive.models import LO, UI, Base

_Json = JSON().with_variant(JSONB(), "postgresql")
_EventId = BigInteger().with_variant(Integer, "sqlite")

#: The event types the archive and its parts emit (AMQP routing keys, webhook ``type``).
EVENT_TYPES = (
    "instance.stored",
    "study.stable",
    "study.deleted",
    "ai.result",
    "report.final",
    "report.amended",
    "order.scheduled",
    "order.updated",
    "order.cancelled",
    "order.in-progress",
    "order.completed",
    "order.discontinued",
    "charge.created",
    "charge.updated",
    "invoice.issued",
    "invoice.paid",
)

CHANNELS = ("amqp", "webhook", "rest-hook")
DELIVERY_STATUSES = ("held", "failed", "dead", "delivered")


class OutboxEvent(Base):
    """One event, written in the transaction of the change it announces (append-only)."""

    __tablename__ = "outbox_event"
    __table_args__ = (
        Index("ix_outbox_event_study_instance_uid", "study_instance_uid"),
        Index("ix_outbox_event_created_at", "created_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_EventId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), nullable=False, unique=True)
    """A UUID: the same on every delivery of the event (consumers de-duplicate on it)."""
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    study_instance_uid: Mapped[str | None] = mapped_column(UI)
    """Events of one study are delivered in the order of their ids."""
    patient_id: Mapped[str | None] = mapped_column(LO)
    resource: Mapped[str | None] = mapped_column(String(128))
    """The FHIR reference of what changed (``ServiceRequest/…``, ``ImagingStudy/…``)."""
    data: Mapped[dict] = mapped_column(_Json, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class EventSubscription(Base):
    """Where events go: a RabbitMQ exchange, a webhook URL, or an R4 rest-hook endpoint.

    ``source`` is ``toml`` for subscriptions of the settings file (re-read at start),
    ``api`` for those of the admin API and ``fhir`` for FHIR Subscription resources
    (``document`` holds the resource). ``cursor`` is the id of the last outbox event
    passed to the channel (delivered, or left to an :class:`EventDelivery` row); one process
    at a time delivers a subscription (``locked_by`` until ``locked_until``), which keeps the
    order.
    """

    __tablename__ = "event_subscription"
    __table_args__ = (
        CheckConstraint("channel IN ('amqp', 'webhook', 'rest-hook')", name="ck_event_sub_channel"),
        CheckConstraint(
            "status IN ('requested', 'active', 'error', 'off')", name="ck_event_sub_status"
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    channel: Mapped[str] = mapped_column(String(16), nullable=False)
    endpoint: Mapped[str] = mapped_column(Text, nullable=False)
    """An ``amqp://`` URL, or the HTTP(S) URL POSTed to."""
    event_types: Mapped[str] = mapped_column(Text, nullable=False, default="#")
    """Comma-separated patterns of event types, AMQP topic style (``study.*``, ``#``)."""
    criteria: Mapped[str | None] = mapped_column(Text)
    """FHIR search criteria of a rest-hook (``ServiceRequest?status=completed``)."""
    secret: Mapped[str | None] = mapped_column(Text)
    """The HMAC-SHA256 key of a webhook's signature."""
    options: Mapped[dict] = mapped_column(_Json, nullable=False, default=dict)
    """Channel options: the exchange, extra headers, the payload MIME type, max attempts."""
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")
    error: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(8), nullable=False, default="api")
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    document: Mapped[dict | None] = mapped_column(_Json)
    cursor: Mapped[int] = mapped_column(_EventId, nullable=False, default=0)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    """Failed attempts in a row to reach the channel itself (broker or host down)."""
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    locked_by: Mapped[str | None] = mapped_column(String(128))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class EventDelivery(Base):
    """An event a subscription has not had yet although its cursor passed it: ``failed``
    (retried at ``next_attempt_at``), ``held`` (an earlier event of its study is failing),
    ``dead`` (given up after the subscription's most attempts; redelivered on request) or
    ``delivered`` (after a retry or a redelivery)."""

    __tablename__ = "event_delivery"
    __table_args__ = (
        UniqueConstraint("subscription_fk", "event_fk"),
        CheckConstraint(
            "status IN ('held', 'failed', 'dead', 'delivered')", name="ck_event_delivery_status"
        ),
        Index("ix_event_delivery_subscription_fk_status", "subscription_fk", "status"),
        Index(
            "ix_event_delivery_subscription_study_status",
            "subscription_fk",
            "study_instance_uid",
            "status",
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscription_fk: Mapped[int] = mapped_column(
        ForeignKey("event_subscription.id", ondelete="CASCADE"), nullable=False
    )
    event_fk: Mapped[int] = mapped_column(
        ForeignKey("outbox_event.id", ondelete="CASCADE"), nullable=False, index=True
    )
    study_instance_uid: Mapped[str | None] = mapped_column(UI)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


OUTBOX = cast(Table, OutboxEvent.__table__)
_INSERT = insert(OUTBOX)


def event_values(
    type: str,
    *,
    study_uid: str | None = None,
    patient_id: str | None = None,
    resource: str | None = None,
    data: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The row of one event (a new ``event_id``), for callers that insert it themselves."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    return {
        "event_id": str(uuid.uuid4()),
        "type": type,
        "study_instance_uid": study_uid or None,
        "patient_id": (patient_id or None) and str(patient_id)[:64],
        "resource": resource,
        "data": dict(data or {}),
        "created_at": now or datetime.now(UTC),
    }


def emit(
    target: Session | Connection,
    type: str,
    *,
    study_uid: str | None = None,
    patient_id: str | None = None,
    resource: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> str:
    """Write one event in the caller's transaction; its ``event_id``. It is delivered only if
    the transaction commits."""
    values = event_values(
        type, study_uid=study_uid, patient_id=patient_id, resource=resource, data=data
    )
    target.execute(_INSERT, values)
    return str(values["event_id"])
