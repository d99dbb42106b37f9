"""Event subscriptions and their deliveries, whatever the channel (AMQP, webhook, rest-hook).

The protocol-neutral half of event delivery: create, change, list and remove
:class:`~archive.outbox.EventSubscription` rows (from the TOML file, the admin API or FHIR
Subscription resources), list outbox events with where each stands, ask for a redelivery,
prune delivered events, and the few statements the dispatcher (``events``) runs on the
tables: the lease of a subscription, the batch after its cursor, the retries that are due.

A subscription starts at the end of the outbox (its ``cursor`` is the newest event id when it
is created): it gets the events written from then on, not the history.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement

from archive.audit import AuditEvent
from archive.audit import record as record_audit
from archive.db import Database, current_snapshot, server_after, server_now, snapshot_passed
from archive.outbox import CHANNELS, EVENT_TYPES, EventDelivery, EventSubscription, OutboxEvent

log = logging.getLogger(__name__)

_SUB = cast(Table, EventSubscription.__table__)
_EVENT = cast(Table, OutboxEvent.__table__)
_DELIVERY = cast(Table, EventDelivery.__table__)

SOURCES = ("toml", "api", "fhir")
STATUSES = ("requested", "active", "error", "off")
#: Delivery rows that still owe the event to the subscription (pruning keeps their events).
UNDELIVERED = ("held", "failed", "dead")
#: Largest id of the index's 64-bit columns.
MAX_ID = 2**63 - 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PATTERN_WORD = re.compile(r"^(\*|#|[a-z0-9-]+)$")


class SubscriptionError(Exception):
    """Base of the errors here; ``reason`` is meant for the API client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SubscriptionNotFound(SubscriptionError, KeyError):
    pass


class SubscriptionConflict(SubscriptionError):
    """The name is taken, or the subscription belongs to another source (HTTP 409)."""


class InvalidSubscription(SubscriptionError, ValueError):
    """A field breaks its rule (HTTP 422)."""


# --- event type patterns (AMQP topic matching) ------------------------------------------------
def parse_patterns(value: str | Iterable[str]) -> list[str]:
    """Event type patterns from a comma-separated string or a list, checked: dot-separated
    words, ``*`` for exactly one word, ``#`` for zero or more (AMQP 0-9-1 topic exchange)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = [str(item).strip() for item in items if str(item).strip()]
    if not patterns:
        raise InvalidSubscription("event types: at least one pattern (# for every event)")
    for pattern in patterns:
        if len(pattern) > 255 or not all(_PATTERN_WORD.match(w) for w in pattern.split(".")):
            raise InvalidSubscription(
                f"event type pattern {pattern!r}: dot-separated words of a-z, 0-9 and '-', "
                "or * (one word) or # (any words)"
            )
    return patterns


@functools.lru_cache(maxsize=4096)
def topic_matches(pattern: str, key: str) -> bool:
    """Whether routing key ``key`` matches an AMQP topic ``pattern`` (remembered: the
    dispatcher asks once per event, about a few types and patterns)."""
    return _match(pattern.split("."), key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


def types_match(patterns: Sequence[str], event_type: str) -> bool:
    return any(topic_matches(p, event_type) for p in patterns)


# --- records ----------------------------------------------------------------------------------
@dataclass(slots=True)
class SubscriptionRecord:
    id: int
    name: str
    channel: str
    endpoint: str
    event_types: list[str]
    criteria: str | None
    secret: str | None
    options: dict[str, Any]
    status: str
    error: str | None
    source: str
    version: int
    document: dict[str, Any] | None
    cursor: int
    attempts: int
    next_attempt_at: datetime | None
    locked_by: str | None
    locked_until: datetime | None
    created_at: datetime
    updated_at: datetime
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Any) -> SubscriptionRecord:
        return cls(
            id=row.id,
            name=row.name,
            channel=row.channel,
            endpoint=row.endpoint,
            event_types=[p for p in row.event_types.split(",") if p],
            criteria=row.criteria,
            secret=row.secret,
            options=dict(row.options or {}),
            status=row.status,
            error=row.error,
            source=row.source,
            version=row.version,
            document=row.document,
            cursor=int(row.cursor),
            attempts=row.attempts,
            next_attempt_at=_aware(row.next_attempt_at),
            locked_by=row.locked_by,
            locked_until=_aware(row.locked_until),
            created_at=_aware(row.created_at) or datetime.now(UTC),
            updated_at=_aware(row.updated_at) or datetime.now(UTC),
        )

    def to_json(self) -> dict[str, Any]:
        """The subscription as the API and CLI show it: the secret is never shown; the
        password of an ``amqp://`` URL and the values of extra headers are masked."""
        return {
            "id": self.id,
            "name": self.name,
            "channel": self.channel,
            "endpoint": mask_url(self.endpoint),
            "types": self.event_types,
            "criteria": self.criteria,
            "has_secret": bool(self.secret),
            "options": _shown_options(self.options),
            "status": self.status,
            "error": self.error,
            "source": self.source,
            "version": self.version,
            "cursor": self.cursor,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "deliveries": self.counts,
        }


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One outbox event (``id`` is its position in the outbox, ``event_id`` its stable id)."""

    id: int
    event_id: str
    type: str
    study_instance_uid: str | None
    patient_id: str | None
    resource: str | None
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> EventRecord:
        return cls(
            id=int(row.id),
            event_id=row.event_id,
            type=row.type,
            study_instance_uid=row.study_instance_uid,
            patient_id=row.patient_id,
            resource=row.resource,
            data=dict(row.data or {}),
            created_at=_aware(row.created_at) or datetime.now(UTC),
        )


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """A delivery row joined with its event (what a retry needs)."""

    id: int
    subscription_id: int
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    event: EventRecord


def _shown_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as shown: the values of extra headers (tokens, often) are masked."""
    shown = dict(options)
    if isinstance(shown.get("headers"), list):
        shown["headers"] = [f"{str(h).partition(':')[0]}: ***" for h in shown["headers"]]
    return shown


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def mask_url(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***`` (everything from the
    user's ``:`` to the last ``@`` before the host: a password may hold ``/`` or ``@``)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@]*):.*@", r"\1:***@", url.split("?", 1)[0]) + (
        "?" + url.split("?", 1)[1] if "?" in url else ""
    )


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidSubscription(
            "a subscription name is 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_endpoint(channel: str, endpoint: str) -> str:
    if channel not in CHANNELS:
        raise InvalidSubscription(f"channel {channel!r}: one of {', '.join(CHANNELS)}")
    endpoint = endpoint.strip()
    schemes = ("amqp://", "amqps://") if channel == "amqp" else ("http://", "https://")
    if not endpoint.lower().startswith(schemes) or len(endpoint) > 2000 or " " in endpoint:
        raise InvalidSubscription(
            f"a {channel} endpoint is a URL starting with {' or '.join(schemes)}"
        )
    return endpoint


def _validate_options(channel: str, options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if "max_attempts" in out and out["max_attempts"] is not None:
        value = out["max_attempts"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise InvalidSubscription("options.max_attempts: an integer from 1 to 1000")
    if "headers" in out:
        headers = out["headers"]
        if not isinstance(headers, list) or not all(
            isinstance(h, str) and ":" in h and "\n" not in h and "\r" not in h for h in headers
        ):
            raise InvalidSubscription('options.headers: a list of "Name: value" strings')
    if "exchange" in out and not (
        isinstance(out["exchange"], str) and 0 < len(out["exchange"]) <= 255
    ):
        raise InvalidSubscription("options.exchange: an exchange name of 1 to 255 characters")
    if "timeout" in out:
        value = out["timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 300:
            raise InvalidSubscription("options.timeout: seconds, more than 0 and at most 300")
    return out


# --- the store --------------------------------------------------------------------------------
class Subscriptions:
    """Subscriptions, deliveries and the outbox, on one index."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # clock: the server's on PostgreSQL (leases across hosts), ours on SQLite
    def _now(self) -> ColumnElement[datetime]:
        return server_now(self.db)

    def _after(self, seconds: float) -> ColumnElement[datetime]:
        return server_after(self.db, seconds)

    # --- subscriptions -------------------------------------------------------------------------
    def all(self, *, include_off: bool = True, counts: bool = False) -> list[SubscriptionRecord]:
        query = select(_SUB).order_by(_SUB.c.name)
        if not include_off:
            query = query.where(_SUB.c.status != "off")
        with self.db.engine.connect() as conn:
            records = [SubscriptionRecord.from_row(row) for row in conn.execute(query)]
            if counts and records:
                tally = conn.execute(
                    select(_DELIVERY.c.subscription_fk, _DELIVERY.c.status, func.count()).group_by(
                        _DELIVERY.c.subscription_fk, _DELIVERY.c.status
                    )
                ).all()
                by_id = {r.id: r for r in records}
                for sub_id, status, count in tally:
                    if sub_id in by_id:
                        by_id[sub_id].counts[status] = int(count)
        return records

    def get(self, key: str | int) -> SubscriptionRecord | None:
        """By name, or by id for an integer."""
        if isinstance(key, int) and not 0 < key <= MAX_ID:
            return None
        column = _SUB.c.id if isinstance(key, int) else _SUB.c.name
        with self.db.engine.connect() as conn:
            row = conn.execute(select(_SUB).where(column == key)).first()
            if row is None:
                return None
            record = SubscriptionRecord.from_row(row)
            for status, count in conn.execute(
                select(_DELIVERY.c.status, func.count())
                .where(_DELIVERY.c.subscription_fk == record.id)
                .group_by(_DELIVERY.c.status)
            ):
                record.counts[status] = int(count)
        return record

    def create(
        self,
        name: str,
        *,
        channel: str,
        endpoint: str,
        event_types: str | Iterable[str] = "#",
        criteria: str | None = None,
        secret: str | None = None,
        options: Mapping[str, Any] | None = None,
        status: str = "active",
        error: str | None = None,
        source: str = "api",
        document: Mapping[str, Any] | None = None,
        conn: Connection | None = None,
    ) -> SubscriptionRecord:
        """A new subscription, starting after the newest event of the outbox. With ``conn``,
        in the caller's transaction. :class:`SubscriptionConflict` if the name is taken."""
        values = self._values(
            channel=channel,
            endpoint=endpoint,
            event_types=event_types,
            criteria=criteria,
            secret=secret,
            options=options or {},
            status=status,
            error=error,
            source=source,
            document=document,
        )
        values["name"] = validate_name(name)
        if conn is None:
            try:
                with self.db.write_connection() as own:
                    return self.create(name, **_kwargs(values), conn=own)
            except IntegrityError as exc:
                raise SubscriptionConflict(f"a subscription named {name!r} exists") from exc
        if conn.execute(select(_SUB.c.id).where(_SUB.c.name == values["name"])).first():
            raise SubscriptionConflict(f"a subscription named {name!r} exists")
        now = datetime.now(UTC)
        head = conn.execute(select(func.coalesce(func.max(_EVENT.c.id), 0))).scalar_one()
        row = conn.execute(
            _SUB.insert()
            .values(
                **values,
                version=1,
                cursor=int(head),
                attempts=0,
                created_at=now,
                updated_at=now,
            )
            .returning(*_SUB.c)
        ).one()
        log.info(
            "event subscription created",
            extra={"subscription": name, "channel": channel, "source": source},
        )
        return SubscriptionRecord.from_row(row)

    def update(
        self,
        key: str | int,
        *,
        source: str | None = None,
        conn: Connection | None = None,
        **changes: Any,
    ) -> SubscriptionRecord:
        """Change the fields given (``channel``, ``endpoint``, ``event_types``, ``criteria``,
        ``secret``, ``options``, ``status``, ``error``, ``document``); the version goes up.
        ``source``: the subscription must be of this source (an API client cannot change a
        TOML or FHIR subscription). Turning a subscription ``active`` clears its error and its
        channel back-off."""
        if conn is None:
            with self.db.write_connection() as own:
                return self.update(key, source=source, conn=own, **changes)
        allowed = {
            "channel",
            "endpoint",
            "event_types",
            "criteria",
            "secret",
            "options",
            "status",
            "error",
            "document",
        }
        unknown = set(changes) - allowed
        if unknown:
            raise InvalidSubscription(f"unknown fields: {', '.join(sorted(unknown))}")
        column = _SUB.c.id if isinstance(key, int) else _SUB.c.name
        row = conn.execute(select(_SUB).where(column == key)).first()
        if row is None:
            raise SubscriptionNotFound(f"no subscription {key!r}")
        current = SubscriptionRecord.from_row(row)
        if source is not None and current.source != source:
            raise SubscriptionConflict(
                f"subscription {current.name!r} comes from {current.source}; change it there"
            )
        merged: dict[str, Any] = {
            "channel": current.channel,
            "endpoint": current.endpoint,
            "event_types": current.event_types,
            "criteria": current.criteria,
            "secret": current.secret,
            "options": current.options,
            "status": current.status,
            "error": current.error,
            "document": current.document,
        }
        merged.update(changes)
        values = self._values(source=current.source, **merged)
        if values["status"] == "active" and "error" not in changes:
            values["error"] = None
        if values["status"] == "active" and current.status != "active":
            values["attempts"] = 0
            values["next_attempt_at"] = None
        row = conn.execute(
            update(_SUB)
            .where(_SUB.c.id == current.id)
            .values(**values, version=_SUB.c.version + 1, updated_at=datetime.now(UTC))
            .returning(*_SUB.c)
        ).one()
        return SubscriptionRecord.from_row(row)

    def delete(
        self, key: str | int, *, source: str | None = None, conn: Connection | None = None
    ) -> None:
        """Remove a subscription and its delivery rows. :class:`SubscriptionNotFound`,
        :class:`SubscriptionConflict` for one of another ``source``."""
        if conn is None:
            with self.db.write_connection() as own:
                self.delete(key, source=source, conn=own)
            return
        column = _SUB.c.id if isinstance(key, int) else _SUB.c.name
        row = conn.execute(
            select(_SUB.c.id, _SUB.c.name, _SUB.c.source).where(column == key)
        ).first()
        if row is None:
            raise SubscriptionNotFound(f"no subscription {key!r}")
        if source is not None and row.source != source:
            raise SubscriptionConflict(
                f"subscription {row.name!r} comes from {row.source}; remove it there"
            )
        conn.execute(delete(_DELIVERY).where(_DELIVERY.c.subscription_fk == row.id))
        conn.execute(delete(_SUB).where(_SUB.c.id == row.id))
        log.info("event subscription deleted", extra={"subscription": row.name})

    def sync_toml(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """Make the ``source='toml'`` subscriptions those of the settings file: create the new,
        update the changed (their cursor stays), turn ``off`` those no longer there (their
        delivery state is kept, should they come back). ``entries``: name → the fields of
        :meth:`create`. A name an API or FHIR subscription holds is refused."""
        for attempt in range(3):  # several processes start at once: one creates, others update
            try:
                self._sync_toml(entries)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _sync_toml(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        with self.db.write_connection() as conn:
            existing = {
                row.name: row
                for row in conn.execute(select(_SUB.c.name, _SUB.c.source, _SUB.c.status))
            }
            for name, fields in entries.items():
                row = existing.get(name)
                if row is None:
                    self.create(name, source="toml", conn=conn, **fields)
                elif row.source != "toml":
                    raise SubscriptionConflict(
                        f"subscription {name!r} of the settings file: the name is taken by "
                        f"a subscription from {row.source}"
                    )
                else:
                    current = self.get_in(conn, name)
                    wanted = self._values(source="toml", **fields)
                    if any(getattr(current, k) != v for k, v in _comparable(wanted)):
                        self.update(name, conn=conn, **fields)
            for name, row in existing.items():
                if row.source == "toml" and name not in entries and row.status != "off":
                    self.update(name, conn=conn, status="off")
                    log.info(
                        "event subscription of the settings file turned off",
                        extra={"subscription": name},
                    )

    def get_in(self, conn: Connection, name: str) -> SubscriptionRecord:
        return SubscriptionRecord.from_row(
            conn.execute(select(_SUB).where(_SUB.c.name == name)).one()
        )

    def _values(
        self,
        *,
        channel: str,
        endpoint: str,
        event_types: str | Iterable[str] = "#",
        criteria: str | None = None,
        secret: str | None = None,
        options: Mapping[str, Any] | None = None,
        status: str = "active",
        error: str | None = None,
        source: str = "api",
        document: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if source not in SOURCES:
            raise InvalidSubscription(f"source {source!r}: one of {', '.join(SOURCES)}")
        if status not in STATUSES:
            raise InvalidSubscription(f"status {status!r}: one of {', '.join(STATUSES)}")
        endpoint = validate_endpoint(channel, endpoint)
        if channel == "rest-hook" and not criteria:
            raise InvalidSubscription("a rest-hook subscription needs FHIR search criteria")
        if criteria is not None and len(criteria) > 4000:
            raise InvalidSubscription("criteria: at most 4000 characters")
        if secret is not None and not 0 < len(secret) <= 1024:
            raise InvalidSubscription("secret: 1 to 1024 characters")
        return {
            "channel": channel,
            "endpoint": endpoint,
            "event_types": ",".join(parse_patterns(event_types)),
            "criteria": criteria or None,
            "secret": secret or None,
            "options": _validate_options(channel, options or {}),
            "status": status,
            "error": error,
            "source": source,
            "document": dict(document) if document is not None else None,
        }

    # --- events and deliveries --------------------------------------------------------------
    def events(
        self,
        *,
        type: str | None = None,
        study: str | None = None,
        subscription: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Outbox events, newest first, each with where it stands for every subscription that
        has a delivery row for it (``failed``, ``held``, ``dead``, ``delivered`` after a retry)
        and the subscriptions it is still ahead of (``pending``). ``status`` keeps the events
        with a delivery row in that status (of ``subscription`` when given)."""
        if not (0 < limit <= MAX_ID and 0 <= offset <= MAX_ID):
            raise ValueError(f"limit and offset must be integers from 0 to {MAX_ID}")
        query = select(_EVENT).order_by(_EVENT.c.id.desc()).limit(limit).offset(offset)
        if type is not None:
            query = query.where(_EVENT.c.type == type)
        if study is not None:
            query = query.where(_EVENT.c.study_instance_uid == study)
        with self.db.engine.connect() as conn:
            subs = {
                row.id: row
                for row in conn.execute(
                    select(_SUB.c.id, _SUB.c.name, _SUB.c.cursor, _SUB.c.event_types, _SUB.c.status)
                )
            }
            sub_id: int | None = None
            if subscription is not None:
                sub_id = next((i for i, r in subs.items() if r.name == subscription), None)
                if sub_id is None:
                    raise SubscriptionNotFound(f"no subscription {subscription!r}")
            if status is not None:
                if status not in ("held", "failed", "dead", "delivered"):
                    raise ValueError("status: held, failed, dead or delivered")
                where = [_DELIVERY.c.event_fk == _EVENT.c.id, _DELIVERY.c.status == status]
                if sub_id is not None:
                    where.append(_DELIVERY.c.subscription_fk == sub_id)
                query = query.where(exists().where(*where))
            events = [EventRecord.from_row(row) for row in conn.execute(query)]
            rows = (
                conn.execute(
                    select(_DELIVERY).where(_DELIVERY.c.event_fk.in_([e.id for e in events]))
                ).all()
                if events
                else []
            )
        by_event: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            if sub_id is not None and row.subscription_fk != sub_id:
                continue
            sub = subs.get(row.subscription_fk)
            by_event.setdefault(row.event_fk, []).append(
                {
                    "subscription": sub.name if sub else None,
                    "status": row.status,
                    "attempts": row.attempts,
                    "next_attempt_at": _iso(_aware(row.next_attempt_at)),
                    "last_error": row.last_error,
                    "updated_at": _iso(_aware(row.updated_at)),
                }
            )
        out = []
        for event in events:
            pending = [
                sub.name
                for i, sub in sorted(subs.items(), key=lambda item: item[1].name)
                if sub.status != "off"
                and (sub_id is None or i == sub_id)
                and event.id > int(sub.cursor)
                and types_match(sub.event_types.split(","), event.type)
            ]
            out.append(
                {
                    "sequence": event.id,
                    "id": event.event_id,
                    "type": event.type,
                    "time": _iso(event.created_at),
                    "study": event.study_instance_uid,
                    "resource": event.resource,
                    "data": event.data,
                    "deliveries": by_event.get(event.id, []),
                    "pending": pending,
                }
            )
        return out

    def event(self, event_id: str) -> EventRecord | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(select(_EVENT).where(_EVENT.c.event_id == event_id)).first()
        return None if row is None else EventRecord.from_row(row)

    def redeliver(
        self,
        event_id: str,
        subscription: str | None = None,
        *,
        audit: AuditEvent | None = None,
    ) -> list[str]:
        """Deliver an event again (``dead``, ``delivered`` or passed without a row): its delivery
        row becomes ``failed`` with no attempt made and is retried at once. Without
        ``subscription``: for every subscription (not ``off``) whose cursor has passed it and
        whose types match it. Returns the names of the subscriptions it will go to.
        ``audit``: the event of the request, recorded in the same transaction.
        :class:`SubscriptionNotFound` for an unknown event or subscription."""
        with self.db.write_connection() as conn:
            event = conn.execute(
                select(_EVENT.c.id, _EVENT.c.type, _EVENT.c.study_instance_uid).where(
                    _EVENT.c.event_id == event_id
                )
            ).first()
            if event is None:
                raise SubscriptionNotFound(f"no event {event_id!r}")
            query = select(_SUB.c.id, _SUB.c.name, _SUB.c.cursor, _SUB.c.event_types, _SUB.c.status)
            if subscription is not None:
                query = query.where(_SUB.c.name == subscription)
            subs = conn.execute(query).all()
            if subscription is not None and not subs:
                raise SubscriptionNotFound(f"no subscription {subscription!r}")
            names = []
            now = datetime.now(UTC)
            for sub in subs:
                if int(sub.cursor) < event.id:
                    continue  # not passed yet: it is delivered in its turn
                if subscription is None and (
                    sub.status == "off" or not types_match(sub.event_types.split(","), event.type)
                ):
                    continue
                changed = conn.execute(
                    update(_DELIVERY)
                    .where(_DELIVERY.c.subscription_fk == sub.id, _DELIVERY.c.event_fk == event.id)
                    .values(status="failed", attempts=0, next_attempt_at=now, updated_at=now)
                ).rowcount
                if not changed:
                    conn.execute(
                        _DELIVERY.insert().values(
                            subscription_fk=sub.id,
                            event_fk=event.id,
                            study_instance_uid=event.study_instance_uid,
                            status="failed",
                            attempts=0,
                            next_attempt_at=now,
                            last_error=None,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                names.append(sub.name)
            if audit is not None:  # recorded with the change, in its transaction
                audit.study_uid = audit.study_uid or event.study_instance_uid
                record_audit(conn, audit)
        log.info(
            "event redelivery requested",
            extra={"event": event_id, "subscriptions": ",".join(names) or "-"},
        )
        return names

    def prune(self, retention_days: float) -> int:
        """Delete events older than ``retention_days`` that every subscription not ``off`` has
        passed and that no undelivered (held, failed, dead) delivery row refers to. Returns how
        many."""
        cutoff = datetime.now(UTC) - timedelta(days=retention_days)
        with self.db.write_connection() as conn:
            low = conn.execute(
                select(func.min(_SUB.c.cursor)).where(_SUB.c.status != "off")
            ).scalar_one_or_none()
            conditions = [_EVENT.c.created_at < cutoff]
            if low is not None:
                conditions.append(_EVENT.c.id <= int(low))
            owed = exists().where(
                _DELIVERY.c.event_fk == _EVENT.c.id, _DELIVERY.c.status.in_(UNDELIVERED)
            )
            doomed = select(_EVENT.c.id).where(*conditions, ~owed)
            conn.execute(delete(_DELIVERY).where(_DELIVERY.c.event_fk.in_(doomed)))
            count = conn.execute(delete(_EVENT).where(_EVENT.c.id.in_(doomed))).rowcount
        if count:
            log.info("delivered events pruned", extra={"count": count})
        return int(count)

    # --- the dispatcher's statements ----------------------------------------------------------
    def active(self) -> list[SubscriptionRecord]:
        """Subscriptions to deliver: ``active`` and ``error`` (an erring one keeps trying)."""
        with self.db.engine.connect() as conn:
            return [SubscriptionRecord.from_row(row) for row in conn.execute(_ACTIVE)]

    def take_lease(
        self, subscription_id: int, owner: str, seconds: float
    ) -> SubscriptionRecord | None:
        """Hold the subscription for ``seconds`` (renewed if ``owner`` holds it already); the
        fresh record, or None when another owner holds a valid lease or it is no longer to be
        delivered."""
        with self.db.write_connection() as conn:
            row = conn.execute(
                update(_SUB)
                .where(
                    _SUB.c.id == subscription_id,
                    _SUB.c.status.in_(("active", "error")),
                    or_(
                        _SUB.c.locked_by == owner,
                        _SUB.c.locked_until.is_(None),
                        _SUB.c.locked_until < self._now(),
                    ),
                )
                .values(locked_by=owner, locked_until=self._after(seconds))
                .returning(*_SUB.c)
            ).first()
        return None if row is None else SubscriptionRecord.from_row(row)

    def release_lease(self, subscription_id: int, owner: str) -> None:
        with self.db.write_connection() as conn:
            conn.execute(
                update(_SUB)
                .where(_SUB.c.id == subscription_id, _SUB.c.locked_by == owner)
                .values(locked_by=None, locked_until=None)
            )

    def batch(self, after: int, limit: int) -> list[EventRecord]:
        """Outbox events after id ``after``, in id order."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(_BATCH, {"after": after, "limit": limit})
            return [EventRecord.from_row(row) for row in rows]

    def events_by_id(self, ids: Iterable[int]) -> list[EventRecord]:
        wanted = list(ids)
        if not wanted:
            return []
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(_EVENT).where(_EVENT.c.id.in_(wanted)).order_by(_EVENT.c.id))
            return [EventRecord.from_row(row) for row in rows]

    def head(self) -> int:
        """The newest outbox id (0 when the outbox is empty)."""
        with self.db.engine.connect() as conn:
            return int(conn.execute(_HEAD).scalar_one())

    def due(self) -> dict[int, tuple[datetime | None, int]]:
        """Per subscription with ``failed`` or ``held`` rows: (the earliest retry time of its
        failed rows that are first of their study, how many held rows are free to go: those
        whose study has no ``failed`` row before them; the others go after that row's retry,
        which comes due first)."""
        with self.db.engine.connect() as conn:
            failed = conn.execute(_DUE_FAILED).all()
            held = conn.execute(_DUE_HELD).all()
        out: dict[int, tuple[datetime | None, int]] = {
            sub_id: (_aware(first), 0) for sub_id, first in failed
        }
        for sub_id, count in held:
            out[sub_id] = (out.get(sub_id, (None, 0))[0], int(count))
        return out

    def snapshot(self) -> str | None:
        """PostgreSQL: the current transaction snapshot (:func:`archive.db.current_snapshot`);
        None on SQLite (one writer at a time: outbox ids commit in their order)."""
        return current_snapshot(self.db)

    def snapshot_passed(self, token: str) -> bool:
        """Whether every transaction that was running at ``token`` (:meth:`snapshot`) has
        committed or rolled back."""
        return snapshot_passed(self.db, token)

    def owing_studies(self, subscription_id: int) -> set[str]:
        """The studies with a ``failed`` or ``held`` row of the subscription (their new events
        wait behind those rows)."""
        return self._studies_of(subscription_id, _DELIVERY.c.status.in_(("failed", "held")))

    def waiting_studies(self, subscription_id: int, now: datetime) -> set[str]:
        """The studies of the subscription's ``failed`` rows whose retry is later than ``now``:
        their later events wait behind them."""
        return self._studies_of(
            subscription_id, _DELIVERY.c.status == "failed", _DELIVERY.c.next_attempt_at > now
        )

    def _studies_of(self, subscription_id: int, *conditions: Any) -> set[str]:
        """The studies of the subscription's delivery rows that meet ``conditions``."""
        with self.db.engine.connect() as conn:
            return set(
                conn.execute(
                    select(_DELIVERY.c.study_instance_uid)
                    .where(
                        _DELIVERY.c.subscription_fk == subscription_id,
                        _DELIVERY.c.study_instance_uid.is_not(None),
                        *conditions,
                    )
                    .distinct()
                ).scalars()
            )

    def pending_deliveries(
        self, subscription_id: int, limit: int, now: datetime
    ) -> list[DeliveryRecord]:
        """At most ``limit`` of the subscription's deliveries to try now, in event order:
        ``failed`` rows whose retry is due and ``held`` rows, neither behind a ``failed`` row
        of its study whose retry is not (those wait for it, and are not read every round)."""
        failing = _DELIVERY.alias("failing")
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(_DELIVERY, *[c.label(f"e_{c.name}") for c in _EVENT.c])
                .join(_EVENT, _EVENT.c.id == _DELIVERY.c.event_fk)
                .where(
                    _DELIVERY.c.subscription_fk == subscription_id,
                    or_(
                        (_DELIVERY.c.status == "failed")
                        & or_(
                            _DELIVERY.c.next_attempt_at.is_(None),
                            _DELIVERY.c.next_attempt_at <= now,
                        ),
                        _DELIVERY.c.status == "held",
                    ),
                    ~_behind_failure(failing, not_due_at=now),
                )
                .order_by(_DELIVERY.c.event_fk)
                .limit(limit)
            ).all()
        out = []
        for row in rows:
            event = EventRecord(
                id=int(row.e_id),
                event_id=row.e_event_id,
                type=row.e_type,
                study_instance_uid=row.e_study_instance_uid,
                patient_id=row.e_patient_id,
                resource=row.e_resource,
                data=dict(row.e_data or {}),
                created_at=_aware(row.e_created_at) or datetime.now(UTC),
            )
            out.append(
                DeliveryRecord(
                    id=row.id,
                    subscription_id=row.subscription_fk,
                    status=row.status,
                    attempts=row.attempts,
                    next_attempt_at=_aware(row.next_attempt_at),
                    last_error=row.last_error,
                    event=event,
                )
            )
        return out

    def record(
        self,
        subscription_id: int,
        owner: str,
        *,
        cursor: int | None = None,
        read_cursor: int | None = None,
        new_rows: Sequence[Mapping[str, Any]] = (),
        changed_rows: Sequence[Mapping[str, Any]] = (),
        subscription: Mapping[str, Any] | None = None,
    ) -> bool:
        """One transaction of the dispatcher: move the cursor forward to ``cursor``, insert
        delivery rows (``event_fk``, ``study_instance_uid``, ``status``, ``attempts``,
        ``next_attempt_at``, ``last_error``), change delivery rows (``id`` and the fields), and
        set subscription fields (``attempts``, ``next_attempt_at``, ``status``, ``error``).
        Only while ``owner`` holds the lease and the cursor is still ``read_cursor`` (the one
        its round started from, when given): False (nothing written) otherwise. A process
        whose lease lapsed in a long round, and that took it back after another process had
        moved the cursor, never moves it back."""
        now = datetime.now(UTC)
        with self.db.write_connection() as conn:
            values: dict[str, Any] = dict(subscription or {})
            state = {k: values.pop(k) for k in ("status", "error") if k in values}
            if cursor is not None:
                values["cursor"] = cursor
            where = [_SUB.c.id == subscription_id, _SUB.c.locked_by == owner]
            if read_cursor is not None:
                where.append(_SUB.c.cursor == read_cursor)
            held = conn.execute(
                update(_SUB).where(*where).values(**values, locked_by=owner)
            ).rowcount
            if not held:
                return False
            if state:  # not over a change made meanwhile (turned off, say)
                conn.execute(
                    update(_SUB)
                    .where(_SUB.c.id == subscription_id, _SUB.c.status.in_(("active", "error")))
                    .values(**state)
                )
            for row in new_rows:
                # A row the event already has (a redelivery asked for meanwhile) stands: the
                # event is owed either way.
                conn.execute(
                    (postgresql if not self.db.is_sqlite else sqlite)
                    .insert(_DELIVERY)
                    .values(subscription_fk=subscription_id, created_at=now, updated_at=now, **row)
                    .on_conflict_do_nothing(index_elements=["subscription_fk", "event_fk"])
                )
            for row in changed_rows:
                fields = {k: v for k, v in row.items() if k != "id"}
                conn.execute(
                    update(_DELIVERY)
                    .where(_DELIVERY.c.id == row["id"])
                    .values(**fields, updated_at=now)
                )
        return True


def _behind_failure(failing: Any, *, not_due_at: datetime | None = None) -> ColumnElement[bool]:
    """A delivery row (of ``event_delivery``) has a ``failed`` row of the same subscription and
    study before it (``failing``: an alias of the table); with ``not_due_at``, only a failed
    row whose retry is later than that."""
    conditions = [
        failing.c.subscription_fk == _DELIVERY.c.subscription_fk,
        failing.c.study_instance_uid == _DELIVERY.c.study_instance_uid,
        failing.c.status == "failed",
        failing.c.event_fk < _DELIVERY.c.event_fk,
    ]
    if not_due_at is not None:
        conditions.append(failing.c.next_attempt_at > not_due_at)
    return exists().where(*conditions)


# The statements the dispatcher runs each round, built once (a statement with an alias costs
# more to build than to run on a small table).
_FAILING = _DELIVERY.alias("failing")
_ACTIVE = select(_SUB).where(_SUB.c.status.in_(("active", "error"))).order_by(_SUB.c.id)
_HEAD = select(func.coalesce(func.max(_EVENT.c.id), 0))
_BATCH = (
    select(_EVENT)
    .where(_EVENT.c.id > bindparam("after"))
    .order_by(_EVENT.c.id)
    .limit(bindparam("limit"))
)
_DUE_FAILED = (
    select(_DELIVERY.c.subscription_fk, func.min(_DELIVERY.c.next_attempt_at))
    .where(_DELIVERY.c.status == "failed", ~_behind_failure(_FAILING))
    .group_by(_DELIVERY.c.subscription_fk)
)
_DUE_HELD = (
    select(_DELIVERY.c.subscription_fk, func.count())
    .where(_DELIVERY.c.status == "held", ~_behind_failure(_FAILING))
    .group_by(_DELIVERY.c.subscription_fk)
)


def _comparable(values: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        if key == "source":
            continue
        if key == "event_types":
            yield key, [p for p in str(value).split(",") if p]
        else:
            yield key, value


def _kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != "name"}


__all__ = [
    "EVENT_TYPES",
    "DeliveryRecord",
    "EventRecord",
    "InvalidSubscription",
    "SubscriptionConflict",
    "SubscriptionError",
    "SubscriptionNotFound",
    "SubscriptionRecord",
    "Subscriptions",
    "parse_patterns",
    "topic_matches",
    "types_match",
]
