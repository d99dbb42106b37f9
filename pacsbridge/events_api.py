"""``/api/events``: the event outbox and where each event stands, redelivery, and the
subscriptions events go to (RabbitMQ exchanges, webhooks).

Subscriptions created here are ``"source": "api"``; those of the settings file
(``[events.subscriptions.*]``, ``"source": "toml"``) and FHIR Subscription resources
(``"source": "fhir"``) are listed and read here but changed where they come from (409).
A webhook's secret is write-only: never shown, kept by a ``PUT`` that leaves it out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from archive import Archive
from archive.outbox import EVENT_TYPES
from archive.subscriptions import (
    MAX_ID,
    InvalidSubscription,
    SubscriptionConflict,
    SubscriptionNotFound,
    Subscriptions,
)

router = APIRouter(prefix="/api/events", tags=["events"])

SubscriptionName = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="1 to 64 letters, digits, '.', '_' or '-'",
    ),
]
EventId = Annotated[str, Path(max_length=36, description="the event's id (a UUID)")]


class SubscriptionIn(BaseModel):
    """A subscription as ``POST`` (with ``name``) and ``PUT`` take it; no other field is
    allowed, so that a mistyped body is refused (422) rather than half applied."""

    model_config = ConfigDict(extra="forbid")

    channel: Literal["amqp", "webhook"]
    url: str = Field(
        max_length=2000,
        description="amqp(s)://user:password@host:port/vhost, or the http(s) URL to POST to",
        examples=["https://hooks.example/pacs"],
    )
    types: list[str] = Field(
        default_factory=lambda: ["#"],
        min_length=1,
        max_length=64,
        description="event types, AMQP topic patterns (study.*, order.#, # for all)",
        examples=[["study.stable", "order.#"]],
    )
    exchange: str | None = Field(
        default=None, max_length=255, description="AMQP: the topic exchange"
    )
    secret: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="webhook: the HMAC-SHA256 key (write-only)",
    )
    max_attempts: int | None = Field(
        default=None, ge=1, le=1000, description="attempts of one event before it is dead"
    )
    headers: list[str] = Field(
        default_factory=list, max_length=32, description='webhook: extra "Name: value" headers'
    )
    timeout: float | None = Field(default=None, gt=0, le=300, description="webhook: seconds")
    enabled: bool = True

    def fields(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.exchange:
            options["exchange"] = self.exchange
        if self.max_attempts is not None:
            options["max_attempts"] = self.max_attempts
        if self.headers:
            options["headers"] = list(self.headers)
        if self.timeout is not None:
            options["timeout"] = self.timeout
        values: dict[str, Any] = {
            "channel": self.channel,
            "endpoint": self.url,
            "event_types": list(self.types),
            "options": options,
            "status": "active" if self.enabled else "off",
        }
        if "secret" in self.model_fields_set:
            values["secret"] = self.secret
        return values


class SubscriptionCreate(SubscriptionIn):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", examples=["ris-hooks"])


def _store(request: Request) -> Subscriptions:
    archive: Archive = request.app.state.archive
    return Subscriptions(archive.db)


def _refused(exc: Exception) -> HTTPException:
    if isinstance(exc, SubscriptionNotFound):
        return HTTPException(status_code=404, detail=exc.reason)
    if isinstance(exc, SubscriptionConflict):
        return HTTPException(status_code=409, detail=exc.reason)
    assert isinstance(exc, InvalidSubscription)
    return HTTPException(status_code=422, detail=exc.reason)


@router.get("/subscriptions")
def list_subscriptions(request: Request) -> list[dict[str, Any]]:
    """Every subscription by name, with its cursor, state and delivery counts."""
    return [sub.to_json() for sub in _store(request).all(counts=True)]


@router.post(
    "/subscriptions",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "the name is taken"}},
)
def create_subscription(
    request: Request, response: Response, body: SubscriptionCreate
) -> dict[str, Any]:
    """A new subscription: it gets the events written from now on."""
    try:
        record = _store(request).create(body.name, source="api", **body.fields())
    except (InvalidSubscription, SubscriptionConflict) as exc:
        raise _refused(exc) from exc
    response.headers["Location"] = f"/api/events/subscriptions/{record.name}"
    return record.to_json()


@router.get("/subscriptions/{name}", responses={404: {"description": "no such subscription"}})
def get_subscription(request: Request, name: SubscriptionName) -> dict[str, Any]:
    record = _store(request).get(name)
    if record is None:
        raise HTTPException(status_code=404, detail=f"no subscription {name!r}")
    return record.to_json()


@router.put(
    "/subscriptions/{name}",
    responses={
        404: {"description": "no such subscription"},
        409: {"description": "it comes from the settings file or FHIR"},
    },
)
def replace_subscription(
    request: Request, name: SubscriptionName, body: SubscriptionIn
) -> dict[str, Any]:
    """Replace an API subscription's settings (its cursor and deliveries stay)."""
    try:
        record = _store(request).update(name, source="api", **body.fields())
    except (InvalidSubscription, SubscriptionConflict, SubscriptionNotFound) as exc:
        raise _refused(exc) from exc
    return record.to_json()


@router.delete(
    "/subscriptions/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        404: {"description": "no such subscription"},
        409: {"description": "it comes from the settings file or FHIR"},
    },
)
def delete_subscription(request: Request, name: SubscriptionName) -> Response:
    try:
        _store(request).delete(name, source="api")
    except (SubscriptionConflict, SubscriptionNotFound) as exc:
        raise _refused(exc) from exc
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("", responses={404: {"description": "no such subscription"}})
def list_events(
    request: Request,
    type: Annotated[str | None, Query(max_length=64, description=", ".join(EVENT_TYPES))] = None,
    study: Annotated[str | None, Query(max_length=64, description="Study Instance UID")] = None,
    subscription: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[
        Literal["held", "failed", "dead", "delivered"] | None,
        Query(description="events with a delivery in this status"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[dict[str, Any]]:
    """Outbox events, newest first, each with its delivery rows (failed, held, dead, or
    delivered after a retry) and the subscriptions it has still to reach (``pending``)."""
    try:
        return _store(request).events(
            type=type,
            study=study,
            subscription=subscription,
            status=status,
            limit=limit,
            offset=offset,
        )
    except SubscriptionNotFound as exc:
        raise _refused(exc) from exc


@router.post(
    "/{event_id}/redeliver",
    responses={404: {"description": "no such event or subscription"}},
)
def redeliver_event(
    request: Request,
    event_id: EventId,
    subscription: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Deliver an event again, now: to one subscription, or to every subscription that has
    passed it and takes its type."""
    try:
        names = _store(request).redeliver(event_id, subscription)
    except SubscriptionNotFound as exc:
        raise _refused(exc) from exc
    return {"event": event_id, "subscriptions": names}
