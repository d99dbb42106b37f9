"""The FHIR R4 REST API under ``/fhir`` (http.html, search.html): one set of routes for every
resource type, each served by its :class:`~fhir_bridge.provider.Provider`."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from fhir_bridge import search
from fhir_bridge.audit import AuditEventProvider, note_resource
from fhir_bridge.billing import (
    AccountProvider,
    ChargeItemDefinitionProvider,
    ChargeItemProvider,
    InvoiceProvider,
    PaymentReconciliationProvider,
)
from fhir_bridge.billing_writes import (
    apply_definition,
    create_charge_item,
    create_invoice_resource,
    create_payment_reconciliation,
    update_account_resource,
    update_charge_item,
    update_invoice_resource,
)
from fhir_bridge.capability import capability_statement
from fhir_bridge.change_audit import ChangeAudit
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, issue
from fhir_bridge.imaging_study import EndpointProvider, ImagingStudyProvider
from fhir_bridge.patient import PatientProvider
from fhir_bridge.procedure import ProcedureProvider
from fhir_bridge.provider import Page, Provider
from fhir_bridge.report import DeviceProvider, DiagnosticReportProvider, ObservationProvider
from fhir_bridge.rest import (
    PREFIX,
    FHIRRoute,
    answers_errors,
    archive_of,
    base_url,
    check_if_match,
    dicomweb_url,
    fhir_response,
    instant,
    not_modified,
    read_resource_body,
    settings_of,
    strict_handling,
    version_headers,
    write_response,
)
from fhir_bridge.service_request import (
    ServiceRequestProvider,
    create_service_request,
    delete_service_request,
    update_service_request,
)
from fhir_bridge.subscription import (
    SubscriptionProvider,
    create_subscription,
    delete_subscription,
    update_subscription,
)
from fhir_bridge.writes import create_patient, create_report, update_patient, update_report

router = APIRouter(prefix=PREFIX, tags=["fhir"], route_class=FHIRRoute)


def build_providers(settings: Any) -> dict[str, Provider]:
    """The resource types served."""
    patients = PatientProvider(settings)
    return {
        "Patient": patients,
        "ImagingStudy": ImagingStudyProvider(settings, patients),
        "Endpoint": EndpointProvider(),
        "DiagnosticReport": DiagnosticReportProvider(settings, patients),
        "Observation": ObservationProvider(settings, patients),
        "Device": DeviceProvider(),
        "ChargeItemDefinition": ChargeItemDefinitionProvider(),
        "ChargeItem": ChargeItemProvider(),
        "Account": AccountProvider(),
        "Invoice": InvoiceProvider(),
        "PaymentReconciliation": PaymentReconciliationProvider(),
        "AuditEvent": AuditEventProvider(settings),
        "Subscription": SubscriptionProvider(),
        "ServiceRequest": ServiceRequestProvider(settings, patients),
        "Procedure": ProcedureProvider(settings, patients),
    }


# The writes of each type: create (ctx, provider, body) -> (resource, status) and update
# (ctx, provider, id, body, If-Match check) -> resource.
_CREATES: dict[str, Callable[..., tuple[dict[str, Any], int]]] = {
    "DiagnosticReport": create_report,
    "ChargeItem": create_charge_item,
    "Invoice": create_invoice_resource,
    "PaymentReconciliation": create_payment_reconciliation,
    "Subscription": create_subscription,
}
# Creates that take If-None-Exist (http.html#ccreate): (ctx, provider, body, header).
_CONDITIONAL_CREATES: dict[str, Callable[..., tuple[dict[str, Any], int]]] = {
    "Patient": create_patient,
    "ServiceRequest": create_service_request,
}
_UPDATES: dict[str, Callable[..., dict[str, Any]]] = {
    "Patient": update_patient,
    "DiagnosticReport": update_report,
    "ChargeItem": update_charge_item,
    "Account": update_account_resource,
    "Invoice": update_invoice_resource,
    "ServiceRequest": update_service_request,
    "Subscription": update_subscription,
}
# Deletes: (ctx, provider, id) -> the resource as the delete left it.
_DELETES: dict[str, Callable[..., dict[str, Any]]] = {
    "ServiceRequest": delete_service_request,
    "Subscription": delete_subscription,
}
# Operations (operations.html): (type, name) -> (ctx, id, Parameters) -> resource.
_OPERATIONS: dict[tuple[str, str], Callable[..., dict[str, Any]]] = {
    ("ChargeItemDefinition", "$apply"): apply_definition,
}


def _providers_of(request: Request) -> dict[str, Provider]:
    """The providers of this application, built once (with its settings) and kept in its
    state."""
    state = request.app.state
    found: dict[str, Provider] | None = getattr(state, "fhir_providers", None)
    if found is None:
        found = state.fhir_providers = build_providers(settings_of(request))
    return found


def context(request: Request) -> Context:
    settings = settings_of(request)
    return Context(
        archive=archive_of(request),
        settings=settings,
        base=base_url(request),
        dicomweb=dicomweb_url(request),
        providers=_providers_of(request),
        actor=_actor(request),
        minimal=_prefers_minimal(request),
        compartment=request.scope.get("pacsbridge.compartment"),
        audit=ChangeAudit.of_scope(request.scope),
    )


def _actor(request: Request) -> str:
    """The authenticated subject (left in the scope by the bearer-token middleware)."""
    principal = request.scope.get("pacsbridge.principal")
    subject = getattr(principal, "subject", None)
    return str(subject) if subject else "fhir"


def _prefers_minimal(request: Request) -> bool:
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "return":
            return value.strip().strip('"').lower() == "minimal"
    return False


def _provider(ctx: Context, resource_type: str) -> Provider:
    provider = ctx.providers.get(resource_type)
    if provider is None:
        raise FHIRError(
            404,
            f"resource type {resource_type!r} is not served here (served: "
            f"{', '.join(sorted(ctx.providers))}; see /fhir/metadata)",
            code="not-supported",
        )
    return provider


def _interaction(provider: Provider, interaction: str, method: str) -> None:
    if interaction not in provider.interactions:
        raise FHIRError(
            405,
            f"{method} ({interaction}) is not supported for {provider.type}: it supports "
            f"{', '.join(provider.interactions)}",
            headers={"Allow": "GET"},
        )


def _read_session(ctx: Context, work: Callable[[Session], Any]) -> Any:
    with ctx.archive.db.session() as session:
        return work(session)


def _read_one(
    ctx: Context, provider: Provider, resource_id: str, work: Callable[[Session], Any]
) -> Any:
    """``work`` on one resource, in the same read transaction as the check that the request
    may see it (its patient compartment: 404 outside)."""

    def checked(session: Session) -> Any:
        provider.check_visible(ctx, session, resource_id)
        return work(session)

    return _read_session(ctx, checked)


# --- capability ------------------------------------------------------------------------------


@router.get("/metadata")
@answers_errors
def metadata(request: Request) -> Response:
    """The CapabilityStatement: exactly what works here."""
    ctx = context(request)
    return fhir_response(request, capability_statement(ctx))


# --- search -----------------------------------------------------------------------------------


@router.get("/{resource_type}")
@answers_errors
def search_type(request: Request, resource_type: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "search-type", "GET")
    return _search(request, ctx, provider, list(request.query_params.multi_items()))


@router.post("/{resource_type}/_search")
async def search_post(request: Request, resource_type: str) -> Response:
    """Search with the parameters in an ``application/x-www-form-urlencoded`` body (and the
    URL): search.html#Introduction."""
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "search-type", "POST")
    content_type = request.headers.get("content-type", "")
    items = list(request.query_params.multi_items())
    body = await request.body()
    if body:
        if not content_type.startswith("application/x-www-form-urlencoded"):
            raise FHIRError(415, "POST _search takes application/x-www-form-urlencoded")
        items += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    note = request.scope.get("pacsbridge.audit")
    if note is not None:  # the audit records the search's parameters, the body's included
        note["search"] = list(items)
    return await run_in_threadpool(_search, request, ctx, provider, items)


def _count(parsed: search.ParsedSearch, ctx: Context) -> int:
    fhir = ctx.settings.fhir
    values = parsed.result.get("_count")
    if not values:
        return fhir.default_count
    value = values[-1]
    return min(search.count_value(value, "_count"), fhir.max_count)


def _offset(parsed: search.ParsedSearch, name: str) -> int | None:
    values = parsed.result.get(name)
    if not values:
        return None
    return search.count_value(values[-1], name, limit=18)


def _search(
    request: Request, ctx: Context, provider: Provider, items: list[tuple[str, str]]
) -> Response:
    parsed = search.parse(items, provider.params, strict=strict_handling(request))
    count = _count(parsed, ctx)
    summary = (parsed.result.get("_summary") or [""])[-1] or None
    if summary == "count":
        count = 0
    if summary not in (None, "true", "false", "count", "data", "text"):
        raise FHIRError(
            400, f"_summary={summary!r}: true, false, count, data or text", expression=["_summary"]
        )
    total_mode = (parsed.result.get("_total") or ["accurate"])[-1]
    offset = _offset(parsed, "_offset") or 0
    snapshot = _offset(parsed, "_snapshot")
    counted = _offset(parsed, "_counted")
    includes = _includes(parsed, provider, ctx)

    def work(session: Session) -> tuple[Page, list[dict[str, Any]]]:
        page = provider.search(
            ctx,
            session,
            parsed,
            offset=offset,
            count=count,
            snapshot=snapshot,
            want_total=total_mode != "none",
            counted=counted,
        )
        included = _load_includes(ctx, session, provider, page.resources, includes)
        return page, included

    page, included = _read_session(ctx, work)
    bundle = _bundle(request, ctx, provider, items, parsed, page, included, summary)
    return fhir_response(request, bundle)


def _includes(
    parsed: search.ParsedSearch, provider: Provider, ctx: Context
) -> list[tuple[str, Any]]:
    wanted: list[tuple[str, Any]] = []
    for kind, known in (("_include", provider.includes), ("_revinclude", None)):
        for value in parsed.result.get(kind, []):
            name = value.split(":iterate", 1)[0]
            source, _, rest = name.partition(":")
            param, _, target = rest.partition(":")  # Source:param[:Target] (search.html#include)
            if kind == "_include":
                spec = known.get(f"{source}:{param}") if known else None
            else:
                spec = provider.revincludes.get(f"{source}:{param}")
            if spec is not None and target and target != spec.target:
                spec = None
            if spec is None:
                choices = sorted(provider.includes if kind == "_include" else provider.revincludes)
                raise FHIRError(
                    400,
                    f"{kind}={value!r} is not supported for {provider.type} "
                    f"(supported: {', '.join(choices) or 'none'})",
                    expression=[kind],
                )
            wanted.append((kind, spec))
    return wanted


def _load_includes(
    ctx: Context,
    session: Session,
    provider: Provider,
    resources: list[dict[str, Any]],
    includes: list[tuple[str, Any]],
) -> list[dict[str, Any]]:
    """One query per ``_include`` / ``_revinclude`` (search.html#include)."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    if not resources:
        return out
    for kind, spec in includes:
        if kind == "_include":
            target = ctx.providers[spec.target]
            ids: list[str] = []
            for resource in resources:
                for reference in _references(resource, spec.param):
                    kind_, _, ref_id = reference.partition("/")
                    if kind_ == spec.target and ref_id not in ids:
                        ids.append(ref_id)
            # Held to the request's patient compartment as its searches are.
            row_ids = target.visible(ctx, session, target.row_ids_for(session, ids))
            loaded = target.load(ctx, session, row_ids)
        else:
            source = ctx.providers[spec.source]
            param = source.params[spec.param]
            condition = search.conditions(
                search.ParsedSearch(
                    criteria=[
                        search.Criterion(
                            spec.param,
                            None,
                            None,
                            tuple(f"{provider.type}/{r['id']}" for r in resources),
                            spec.param,
                        )
                    ]
                ),
                {spec.param: param},
            )
            page = source.search(
                ctx,
                session,
                search.ParsedSearch(),
                offset=0,
                count=ctx.settings.fhir.max_count,
                snapshot=None,
                want_total=False,
                extra=condition,
            )
            loaded = page.resources
        for resource in loaded:
            key = (resource["resourceType"], resource["id"])
            if key not in seen:
                seen.add(key)
                out.append(resource)
    return out


_REFERENCE_ELEMENTS = {
    "subject": ("subject",),
    "patient": ("subject",),
    "result": ("result",),
    "device": ("device",),
    "imaging-study": ("imagingStudy",),
    "based-on": ("basedOn",),
}


def _references(resource: dict[str, Any], param: str) -> list[str]:
    out = []
    for element in _REFERENCE_ELEMENTS.get(param, (param,)):
        value = resource.get(element)
        for item in value if isinstance(value, list) else [value] if value else []:
            reference = item.get("reference") if isinstance(item, dict) else None
            if reference:
                out.append(reference)
    return out


def _page_url(ctx: Context, resource_type: str, items: list[tuple[str, str]], **extra: Any) -> str:
    kept = [(k, v) for k, v in items if k not in ("_offset", "_snapshot", "_counted")]
    kept += [(k, str(v)) for k, v in extra.items() if v is not None]
    query = urlencode(kept)
    return f"{ctx.base}/{resource_type}" + (f"?{query}" if query else "")


# Elements of minimum cardinality 1 (the R4 StructureDefinitions): kept by _elements and
# _summary, or the subset would not be a valid resource (search.html#elements).
_MANDATORY = {
    "ImagingStudy": {"status", "subject"},
    "DiagnosticReport": {"status", "code"},
    "Observation": {"status", "code"},
    "Endpoint": {"status", "connectionType", "payloadType", "address"},
    "ChargeItemDefinition": {"url", "status"},
    "ChargeItem": {"status", "code", "subject"},
    "Account": {"status"},
    "Invoice": {"status"},
    "PaymentReconciliation": {"status", "created", "paymentDate", "paymentAmount"},
    "AuditEvent": {"type", "recorded", "agent", "source"},
    "Subscription": {"status", "reason", "criteria", "channel"},
    "ServiceRequest": {"status", "intent", "subject"},
    "Procedure": {"status", "subject"},
}


def _shape(
    resource: dict[str, Any],
    provider: Provider | None,
    summary: str | None,
    elements: set[str] | None,
) -> dict[str, Any]:
    """``_summary`` / ``_elements`` (search.html#summary, #elements): mandatory elements stay,
    and the resource is tagged SUBSETTED."""
    if summary in (None, "false") and not elements:
        return resource
    if summary == "data":
        keep = {k for k in resource if k != "text"}
    elif summary == "text":
        keep = {"text", "id", "meta"}
    elif summary == "true" and provider is not None:
        keep = set(provider.summary_elements) or set(resource)
    else:
        keep = set(elements or ())
    keep |= {"resourceType", "id", "meta"} | _MANDATORY.get(resource.get("resourceType", ""), set())
    shaped = {k: v for k, v in resource.items() if k in keep}
    shaped["meta"] = {
        **resource.get("meta", {}),
        "tag": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                "code": "SUBSETTED",
                "display": "subsetted",
            }
        ],
    }
    return shaped


def _bundle(
    request: Request,
    ctx: Context,
    provider: Provider,
    items: list[tuple[str, str]],
    parsed: search.ParsedSearch,
    page: Page,
    included: list[dict[str, Any]],
    summary: str | None,
) -> dict[str, Any]:
    elements: set[str] | None = None
    for value in parsed.result.get("_elements", []):
        elements = (elements or set()) | {e.strip() for e in value.split(",") if e.strip()}
    snapshot = page.snapshot
    links = [
        {
            "relation": "self",
            "url": _page_url(
                ctx,
                provider.type,
                items,
                _offset=page.offset or None,
                _snapshot=snapshot if page.offset else None,
                _counted=page.total if page.offset else None,
            ),
        }
    ]
    more = page.more
    if more:
        links.append(
            {
                "relation": "next",
                "url": _page_url(
                    ctx,
                    provider.type,
                    items,
                    _offset=page.offset + page.count,
                    _snapshot=snapshot,
                    _counted=page.total,
                ),
            }
        )
    if page.offset > 0 and page.count > 0:
        previous = max(page.offset - page.count, 0)
        links.append(
            {
                "relation": "previous",
                "url": _page_url(
                    ctx,
                    provider.type,
                    items,
                    _offset=previous or None,
                    _snapshot=snapshot,
                    _counted=page.total,
                ),
            }
        )
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": ctx.url(r["resourceType"], r["id"]),
            "resource": _shape(r, provider, summary, elements),
            "search": {"mode": "match"},
        }
        for r in page.resources
    ]
    entries += [
        {
            "fullUrl": ctx.url(r["resourceType"], r["id"]),
            "resource": _shape(r, ctx.providers.get(r["resourceType"]), summary, None),
            "search": {"mode": "include"},
        }
        for r in included
    ]
    if parsed.unknown:
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        issue(
                            "warning",
                            "not-supported",
                            f"search parameter {name!r} is unknown to {provider.type}: it was "
                            "ignored",
                            [name],
                        )
                        for name in parsed.unknown
                    ],
                },
                "search": {"mode": "outcome"},
            }
        )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(datetime.now(UTC))},
        "type": "searchset",
    }
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return bundle


def _since(request: Request) -> datetime | None:
    since = request.query_params.get("_since")
    return search.utc_bound(search.parse_date(since, "_since").low) if since else None


def _history_bundle(
    request: Request,
    ctx: Context,
    total: int,
    shown: list[dict[str, Any]],
    offset: int,
    count: int,
) -> dict[str, Any]:
    """A history Bundle (http.html#history): newest first, each entry with its request."""
    items = list(request.query_params.multi_items())
    path = request.url.path[len(PREFIX) + 1 :]
    url = f"{ctx.base}/{path}"
    kept = [(k, v) for k, v in items if k != "_offset"]
    links = [{"relation": "self", "url": url + ("?" + urlencode(items) if items else "")}]
    if offset + count < total:
        links.append(
            {
                "relation": "next",
                "url": url + "?" + urlencode([*kept, ("_offset", str(offset + count))]),
            }
        )
    entries = []
    for resource in shown:
        version = resource["meta"]["versionId"]
        first = version == "1"
        entries.append(
            {
                "fullUrl": ctx.url(resource["resourceType"], resource["id"]),
                "resource": resource,
                "request": {
                    "method": "POST" if first else "PUT",
                    "url": resource["resourceType"]
                    if first
                    else f"{resource['resourceType']}/{resource['id']}",
                },
                "response": {
                    "status": "201 Created" if first else "200 OK",
                    "etag": f'W/"{version}"',
                    "lastModified": resource["meta"]["lastUpdated"],
                },
            }
        )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(datetime.now(UTC))},
        "type": "history",
        "total": total,
        "link": links,
    }
    if entries:
        bundle["entry"] = entries
    return bundle


# --- history ------------------------------------------------------------------------------


def _history_offset(request: Request) -> int:
    return search.count_value(request.query_params.get("_offset", "0"), "_offset")


def _history_count(request: Request, ctx: Context, default: int) -> int:
    text = request.query_params.get("_count")
    if text is None:
        return default
    return min(search.count_value(text, "_count"), ctx.settings.fhir.max_count)


@router.get("/{resource_type}/_history")
@answers_errors
def history_type(request: Request, resource_type: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "history-type", "GET")
    if ctx.compartment is not None and provider.compartment is not None:
        raise FHIRError(
            403,
            f"the history of every {provider.type} is not offered to a token held to one "
            "patient's compartment: read the history of each resource, or search",
            code="forbidden",
        )
    count = _history_count(request, ctx, ctx.settings.fhir.default_count)
    offset = _history_offset(request)
    since = _since(request)
    total, shown = _read_session(ctx, lambda s: provider.history_type(ctx, s, since, offset, count))
    return fhir_response(request, _history_bundle(request, ctx, total, shown, offset, count))


@router.get("/{resource_type}/{resource_id}/_history")
@answers_errors
def history_instance(request: Request, resource_type: str, resource_id: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "history-instance", "GET")
    count = _history_count(request, ctx, ctx.settings.fhir.max_count)
    offset = _history_offset(request)
    since = _since(request)
    versions = _read_one(
        ctx, provider, resource_id, lambda s: provider.history(ctx, s, resource_id)
    )
    if since is not None:
        versions = [
            r
            for r in versions
            if datetime.fromisoformat(r["meta"]["lastUpdated"].replace("Z", "+00:00")) >= since
        ]
    shown = versions[offset : offset + count]
    return fhir_response(
        request, _history_bundle(request, ctx, len(versions), shown, offset, count)
    )


@router.get("/{resource_type}/{resource_id}/_history/{version}")
@answers_errors
def vread(request: Request, resource_type: str, resource_id: str, version: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "vread", "GET")
    resource = _read_one(
        ctx, provider, resource_id, lambda s: provider.vread(ctx, s, resource_id, version)
    )
    return fhir_response(request, resource, headers=version_headers(resource))


# --- read, create, update, delete ---------------------------------------------------------


@router.get("/{resource_type}/{resource_id}")
@answers_errors
def read(request: Request, resource_type: str, resource_id: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "read", "GET")
    resource = _read_one(ctx, provider, resource_id, lambda s: provider.read(ctx, s, resource_id))
    headers = version_headers(resource)
    note_resource(request.scope, resource)
    if not_modified(request, resource):
        return Response(status_code=304, headers=headers)
    summary = request.query_params.get("_summary")
    elements = request.query_params.get("_elements")
    if summary or elements:
        resource = _shape(
            resource,
            provider,
            summary,
            {e.strip() for e in elements.split(",")} if elements else None,
        )
    return fhir_response(request, resource, headers=headers)


@router.post("/{resource_type}")
async def create(request: Request, resource_type: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "create", "POST")
    body = await read_resource_body(request, resource_type)
    conditional = _CONDITIONAL_CREATES.get(resource_type)
    if conditional is not None:
        resource, status = await run_in_threadpool(
            conditional, ctx, provider, body, request.headers.get("if-none-exist")
        )
    else:
        resource, status = await run_in_threadpool(_CREATES[resource_type], ctx, provider, body)
    note_resource(request.scope, resource)
    location = f"{ctx.url(resource_type, resource['id'])}/_history/{resource['meta']['versionId']}"
    return write_response(request, resource, status, location)


@router.put("/{resource_type}/{resource_id}")
async def update(request: Request, resource_type: str, resource_id: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "update", "PUT")
    body = await read_resource_body(request, resource_type)
    if body.get("id") not in (None, resource_id):
        raise FHIRError(
            400,
            f"the body's id {body.get('id')!r} is not the URL's {resource_id!r}",
            expression=[f"{resource_type}.id"],
        )
    check = lambda current: check_if_match(request, current)  # noqa: E731
    resource = await run_in_threadpool(
        _UPDATES[resource_type], ctx, provider, resource_id, body, check
    )
    note_resource(request.scope, resource)
    location = f"{ctx.url(resource_type, resource['id'])}/_history/{resource['meta']['versionId']}"
    return write_response(request, resource, 200, location)


@router.post("/{resource_type}/{resource_id}/{operation}")
async def instance_operation(
    request: Request, resource_type: str, resource_id: str, operation: str
) -> Response:
    """An operation on an instance (``POST [base]/Type/id/$name`` with Parameters)."""
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    run = _OPERATIONS.get((resource_type, operation))
    if run is None:
        raise FHIRError(
            404 if operation.startswith("$") else 405,
            f"{resource_type} has no operation {operation!r} here"
            + (
                f" (it has: {', '.join(n for t, n in _OPERATIONS if t == resource_type)})"
                if any(t == resource_type for t, _ in _OPERATIONS)
                else ""
            ),
            code="not-supported",
        )
    del provider
    body = await read_resource_body(request, "Parameters")
    resource = await run_in_threadpool(run, ctx, resource_id, body)
    return fhir_response(request, resource)


@router.delete("/{resource_type}/{resource_id}")
async def delete(request: Request, resource_type: str, resource_id: str) -> Response:
    ctx = context(request)
    provider = _provider(ctx, resource_type)
    _interaction(provider, "delete", "DELETE")
    resource = await run_in_threadpool(_DELETES[resource_type], ctx, provider, resource_id)
    note_resource(request.scope, resource)
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            issue(
                "information",
                "informational",
                f"{resource_type}/{resource_id} deleted: it is {resource.get('status')} "
                f"(version {resource['meta']['versionId']})",
            )
        ],
    }
    return fhir_response(request, body, 200, version_headers(resource))
