"""FHIR R4 ``Subscription`` with the rest-hook channel (FHIR R4 4.0.1 subscription.html).

A Subscription names a search (``criteria``: ``<Type>?<search parameters>``) and an endpoint;
when a resource of that type changes and matches the search, the server notifies the endpoint
(the event delivery of the ``events`` package, channel ``rest-hook``). Each resource is one
:class:`~archive.outbox.EventSubscription` row (``source = fhir``, ``document`` the resource),
named ``fhir-<id>``.

- **channel**: ``rest-hook`` only (subscription.html 2.46.7.1; websocket, email, sms and message
  are refused with 422 ``not-supported``). ``channel.endpoint`` (http or https) is required;
  ``channel.payload`` absent (a POST with an empty body to the endpoint) or a FHIR JSON MIME
  type (the resource PUT to ``[endpoint]/[type]/[id]``); ``channel.header`` values go with
  every notification.
- **status**: the server accepts a Subscription asked ``requested`` (or ``active``) and makes
  it ``active`` at once (subscription.html 2.46.6: requested → active); ``off`` stores it
  switched off; ``error`` is the server's to set (the delivery sets it, with
  ``Subscription.error``, when the endpoint keeps failing).
- **criteria**: a type of this server that announces changes, and search parameters that
  type's search takes (checked as a strict search). Which changes are looked at, per type
  (the events of ``archive.outbox``; ``events_of_type``):

  ========================  ==================================================
  ServiceRequest            ``order.#`` (scheduled, updated, cancelled, performed)
  ImagingStudy              ``study.stable``, ``ai.result`` (a study complete,
                            its AI results added; not each stored instance)
  DiagnosticReport          ``report.#`` (final, amended)
  ChargeItem                ``charge.#``
  Invoice                   ``invoice.#`` (issued, paid)
  ========================  ==================================================

- ``end`` (automatic switch-off) is not supported: a Subscription with one is refused.

Only administrators manage Subscriptions (``security.roles``: the path is in no role's area
but ``admin``'s; a token with SMART scopes also needs ``system/Subscription.*``). Every change
commits with its audit event (DICOM PS3.15 A.5.3.11 Security Alert, 110128 Network
Configuration: where the server sends data).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from archive import Archive
from archive.audit import AuditEvent, record
from archive.outbox import EventSubscription
from archive.subscriptions import (
    InvalidSubscription,
    SubscriptionConflict,
    SubscriptionNotFound,
    SubscriptionRecord,
    Subscriptions,
)
from config import Settings
from fhir_bridge import search
from fhir_bridge.change_audit import committed
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, not_found
from fhir_bridge.provider import Provider, meta
from fhir_bridge.rest import validate_resource
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"
NAME_PREFIX = "fhir-"

#: The outbox event types whose changes a Subscription on a type looks at (the events'
#: ``resource`` is ``<Type>/<id>``): see the module's documentation.
EVENTS_OF_TYPE: dict[str, tuple[str, ...]] = {
    "ServiceRequest": ("order.#",),
    "ImagingStudy": ("study.stable", "ai.result"),
    "DiagnosticReport": ("report.#",),
    "ChargeItem": ("charge.#",),
    "Invoice": ("invoice.#",),
}
_JSON_PAYLOADS = ("application/fhir+json", "application/json", "application/json+fhir")
_STATUSES = {"requested": "active", "active": "active", "off": "off"}


def events_of_type(resource_type: str) -> tuple[str, ...]:
    return EVENTS_OF_TYPE.get(resource_type, ())


class SubscriptionProvider(Provider):
    type = "Subscription"
    compartment = None  # no patient's data (R4 compartmentdefinition-patient)
    profile = "http://hl7.org/fhir/StructureDefinition/Subscription"
    interactions = ("read", "vread", "search-type", "create", "update", "delete")
    creatable = True
    updatable = True
    documentation = (
        "Rest-hook notifications of changes (administrators only): criteria "
        f"<Type>?<search parameters> on {', '.join(EVENTS_OF_TYPE)}; channel.type rest-hook "
        "with an http(s) endpoint, payload empty or application/fhir+json (the resource PUT "
        "to [endpoint]/[type]/[id]), header values sent with each notification. A "
        "Subscription asked 'requested' is made 'active' at once; 'error' is set by the "
        "server when the endpoint keeps failing. 'end' is not supported."
    )
    summary_elements = frozenset({"status", "criteria", "channel", "end"})

    def __init__(self) -> None:
        super().__init__()
        sub = EventSubscription
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id",
            lambda v, m: sub.name == NAME_PREFIX + v,
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        p["status"] = SearchParam(
            "status",
            "token",
            "requested | active | error | off",
            lambda v, m: sub.status == (search.token(v)[1] or ""),
            definition=SEARCH_PARAMETER + "Subscription-status",
        )
        p["type"] = SearchParam(
            "type",
            "token",
            "The channel type (rest-hook)",
            lambda v, m: sub.channel == (search.token(v)[1] or ""),
            definition=SEARCH_PARAMETER + "Subscription-type",
        )
        p["url"] = SearchParam(
            "url",
            "uri",
            "The channel's endpoint (exact)",
            lambda v, m: sub.endpoint == v,
            definition=SEARCH_PARAMETER + "Subscription-url",
        )
        p["criteria"] = SearchParam(
            "criteria",
            "string",
            "The criteria (starts with; :exact for the whole value)",
            self._criteria,
            modifiers=frozenset({"exact", "contains"}),
            definition=SEARCH_PARAMETER + "Subscription-criteria",
        )
        self.sorts = {"_id": sub.id, "_lastUpdated": sub.updated_at}

    @staticmethod
    def _criteria(value: str, modifier: str | None) -> ColumnElement[bool]:
        column = EventSubscription.criteria
        if modifier == "exact":
            return column == value
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        if modifier == "contains":
            return column.like(f"%{escaped}%", escape="\\")
        return column.like(f"{escaped}%", escape="\\")

    # --- rows ----------------------------------------------------------------------------------
    def id_column(self) -> Any:
        return EventSubscription.id

    def base_select(self) -> Select[Any]:
        return select(EventSubscription.id).where(EventSubscription.source == "fhir")

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        names = [NAME_PREFIX + i for i in resource_ids]
        return list(session.scalars(self.base_select().where(EventSubscription.name.in_(names))))

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        rows = {
            row.id: row
            for row in session.scalars(
                select(EventSubscription).where(
                    EventSubscription.id.in_(list(row_ids)), EventSubscription.source == "fhir"
                )
            )
        }
        return [resource_of(SubscriptionRecord.from_row(rows[i])) for i in row_ids if i in rows]

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        found = self.load(ctx, session, self.row_ids_for(session, [resource_id]))
        if not found:
            raise not_found(self.type, resource_id)
        return found[0]

    def vread(
        self, ctx: Context, session: Session, resource_id: str, version: str
    ) -> dict[str, Any]:
        current = self.read(ctx, session, resource_id)
        if current["meta"]["versionId"] != version:
            raise FHIRError(
                404,
                f"Subscription/{resource_id} version {version} is not kept: the current "
                f"version is {current['meta']['versionId']}",
            )
        return current


def resource_of(record: SubscriptionRecord) -> dict[str, Any]:
    """The Subscription of a stored row: its document, with the row's status (the delivery
    turns it to ``error``) and error."""
    document = dict(record.document or {})
    body: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": record.name.removeprefix(NAME_PREFIX),
        "meta": meta(record.version, record.updated_at),
        **{k: v for k, v in document.items() if k not in ("resourceType", "id", "meta")},
        "status": record.status,
    }
    if record.error:
        body["error"] = record.error[:1000]
    else:
        body.pop("error", None)
    return body


# --- what a request says ----------------------------------------------------------------------


def _fail(status: int, message: str, where: str, code: str | None = None) -> FHIRError:
    return FHIRError(status, message, code=code, expression=[f"Subscription.{where}"])


def parse_criteria(
    criteria: Any, providers: dict[str, Provider]
) -> tuple[str, list[tuple[str, str]]]:
    """(type, search parameters) of ``<Type>?<parameters>``; 422 for a type this server does
    not announce changes of, or a search its type does not take."""
    if not isinstance(criteria, str) or not criteria.strip():
        raise _fail(422, "criteria is required: <Type>?<search parameters>", "criteria", "required")
    type_, _, query = criteria.strip().partition("?")
    supported = [t for t in EVENTS_OF_TYPE if t in providers]
    if type_ not in supported:
        raise _fail(
            422,
            f"criteria {criteria!r}: subscriptions are on {', '.join(supported)} "
            "(<Type>?<search parameters>)",
            "criteria",
            "not-supported",
        )
    items = parse_qsl(query, keep_blank_values=True)
    for name, _ in items:
        if name.startswith("_") and name not in ("_id", "_lastUpdated"):
            raise _fail(
                422,
                f"criteria {criteria!r}: the parameter {name!r} does not select resources here",
                "criteria",
                "not-supported",
            )
    provider = providers[type_]
    try:
        parsed = search.parse(items, provider.params, strict=True)
        search.conditions(parsed, provider.params)  # values the search cannot take: 400
    except FHIRError as exc:
        raise _fail(422, f"criteria {criteria!r}: {exc.diagnostics}", "criteria", "value") from exc
    return type_, items


def _checked(body: dict[str, Any], providers: dict[str, Provider]) -> dict[str, Any]:
    """The fields of the event subscription row a Subscription asks for."""
    channel = body.get("channel") or {}
    channel_type = channel.get("type")
    if channel_type != "rest-hook":
        raise _fail(
            422,
            f"channel.type {channel_type!r} is not supported: only rest-hook",
            "channel.type",
            "not-supported",
        )
    endpoint = channel.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint.lower().startswith(("http://", "https://")):
        raise _fail(
            422,
            "channel.endpoint: a rest-hook needs the http(s) URL it is notified at",
            "channel.endpoint",
            "required",
        )
    payload = channel.get("payload")
    if payload is not None and payload.split(";")[0].strip() not in _JSON_PAYLOADS:
        raise _fail(
            422,
            f"channel.payload {payload!r} is not supported: none (an empty notification) or "
            "application/fhir+json",
            "channel.payload",
            "not-supported",
        )
    if body.get("end") is not None:
        raise _fail(
            422, "end is not supported: delete the Subscription to end it", "end", "not-supported"
        )
    status = body.get("status")
    if status not in _STATUSES:
        raise _fail(
            422,
            f"status {status!r}: a client asks requested (made active) or off; error is the "
            "server's",
            "status",
            "business-rule",
        )
    type_, _ = parse_criteria(body.get("criteria"), providers)
    headers = channel.get("header") or []
    options: dict[str, Any] = {"payload": payload, "headers": list(headers)}
    return {
        "channel": "rest-hook",
        "endpoint": endpoint,
        "criteria": body["criteria"].strip(),
        "event_types": list(events_of_type(type_)),
        "options": options,
        "status": _STATUSES[status],
    }


def _document(body: dict[str, Any], status: str) -> dict[str, Any]:
    kept = {k: v for k, v in body.items() if k not in ("id", "meta", "error", "status")}
    return {**kept, "status": status}


def _validated(resource_id: str, version: int, document: dict[str, Any]) -> None:
    validate_resource(
        {
            "resourceType": "Subscription",
            "id": resource_id,
            "meta": meta(version, datetime.now(UTC)),
            **{k: v for k, v in document.items() if k != "resourceType"},
        },
        "Subscription",
    )


def _audit(ctx: Context, conn: Connection, resource_id: str) -> None:
    """The change's audit event, in its transaction: a Security Alert of the Network
    Configuration (DICOM PS3.15 A.5.3.11; where the server sends data changes)."""
    if ctx.audit is None:
        return
    record(
        conn,
        AuditEvent(
            action=ctx.audit.action,
            type_code="110113",
            subtype_code="110128",
            agent=ctx.audit.agent,
            agent_address=ctx.audit.address,
            source="fhir",
            entity=f"Subscription/{resource_id}",
        ),
    )


def _invalid(exc: InvalidSubscription | SubscriptionConflict) -> FHIRError:
    return FHIRError(422, exc.reason, code="value", expression=["Subscription"])


# --- writes ------------------------------------------------------------------------------------


def create_subscription(
    ctx: Context, provider: Provider, body: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """POST: a new Subscription, active at once (or off, as asked); 201."""
    fields = _checked(body, ctx.providers)
    resource_id = str(uuid.uuid4())
    document = _document(body, fields["status"])
    _validated(resource_id, 1, document)
    store = Subscriptions(ctx.archive.db)
    try:
        with ctx.archive.db.write_connection() as conn:
            created = store.create(
                NAME_PREFIX + resource_id,
                source="fhir",
                document=document,
                conn=conn,
                **fields,
            )
            _audit(ctx, conn, resource_id)
    except (InvalidSubscription, SubscriptionConflict) as exc:
        raise _invalid(exc) from exc
    committed(ctx.audit)
    return resource_of(created), 201


def update_subscription(
    ctx: Context,
    provider: Provider,
    resource_id: str,
    body: dict[str, Any],
    check: Callable[[str], None],
) -> dict[str, Any]:
    """PUT: change the criteria, channel or status (``requested`` → active, ``off``)."""
    fields = _checked(body, ctx.providers)
    store = Subscriptions(ctx.archive.db)
    try:
        with ctx.archive.db.write_connection() as conn:
            current = _current(store, conn, resource_id)
            check(str(current.version))
            document = _document(body, fields["status"])
            _validated(resource_id, current.version + 1, document)
            updated = store.update(
                current.id, source="fhir", conn=conn, document=document, error=None, **fields
            )
            _audit(ctx, conn, resource_id)
    except (InvalidSubscription, SubscriptionConflict) as exc:
        raise _invalid(exc) from exc
    committed(ctx.audit)
    return resource_of(updated)


def delete_subscription(ctx: Context, provider: Provider, resource_id: str) -> dict[str, Any]:
    """DELETE: the Subscription ends (no notification after it); the resource as it was,
    ``off``."""
    store = Subscriptions(ctx.archive.db)
    with ctx.archive.db.write_connection() as conn:
        current = _current(store, conn, resource_id)
        try:
            store.delete(current.id, source="fhir", conn=conn)
        except SubscriptionNotFound as exc:
            raise not_found("Subscription", resource_id) from exc
        _audit(ctx, conn, resource_id)
    committed(ctx.audit)
    current.status = "off"
    return resource_of(current)


def _current(store: Subscriptions, conn: Connection, resource_id: str) -> SubscriptionRecord:
    row = conn.execute(
        select(EventSubscription).where(
            EventSubscription.name == NAME_PREFIX + resource_id,
            EventSubscription.source == "fhir",
        )
    ).first()
    if row is None:
        raise FHIRError(
            404,
            f"Subscription/{resource_id} does not exist (this server assigns the ids of new "
            "Subscriptions: POST one)",
            code="not-found",
        )
    return SubscriptionRecord.from_row(row)


# --- the rest-hook matcher ---------------------------------------------------------------------


def render_if_matches(ctx: Context, criteria: str, reference: str) -> dict[str, Any] | None:
    """The resource ``reference`` (``Type/id``, or ``Type/id/_history/<version>``) when the
    search ``criteria`` finds it, else None: the criteria's search, run by the type's own
    search engine and restricted to that ``_id``, on the resource as it is now. A reference to
    a resource of another type never matches; a versioned reference whose resource has changed
    since does not either (the later change is judged by its own event, so that a quick
    succession of changes notifies the state they end in once)."""
    type_, items = parse_criteria(criteria, ctx.providers)
    parts = reference.split("/")
    if len(parts) == 4 and parts[2] == "_history":
        ref_type, ref_id, version = parts[0], parts[1], parts[3]
    elif len(parts) == 2:
        (ref_type, ref_id), version = parts, None
    else:
        return None
    if ref_type != type_ or not ref_id:
        return None
    provider = ctx.providers[type_]
    parsed = search.parse([*items, ("_id", ref_id)], provider.params, strict=True)
    with ctx.archive.db.session() as session:
        page = provider.search(
            ctx, session, parsed, offset=0, count=1, snapshot=None, want_total=False
        )
    if not page.resources:
        return None
    found = page.resources[0]
    if version is not None and str((found.get("meta") or {}).get("versionId")) != version:
        return None
    return found


def rest_hook_renderer(
    archive: Archive, settings: Settings
) -> Callable[[str, str], dict[str, Any] | None]:
    """``(criteria, reference) → resource or None`` for the event delivery (the rest-hook
    channel of ``events``), with this server's providers and base URL."""
    from fhir_bridge.router import build_providers

    providers = build_providers(settings)
    public = settings.public_url.rstrip("/") if settings.public_url else None
    base = settings.fhir.base_url or (f"{public}/fhir" if public else "urn:pacsbridge:fhir")
    dicomweb = (settings.dicomweb_base_url or "").rstrip("/") or (
        f"{public}/dicom-web" if public else "urn:pacsbridge:dicom-web"
    )
    ctx = Context(
        archive=archive, settings=settings, base=base, dicomweb=dicomweb, providers=providers
    )

    def render(criteria: str, reference: str) -> dict[str, Any] | None:
        return render_if_matches(ctx, criteria, reference)

    return render
