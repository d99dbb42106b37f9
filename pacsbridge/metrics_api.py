"""``GET /metrics`` (Prometheus text format) and the HTTP metrics: FHIR request durations,
and ``/metrics`` for a loopback client without a token when the settings allow it. How the
processes' values are gathered: ``pacsbridge/metrics.py``."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Iterator
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from archive.metrics import JobQueueCollector
from pacsbridge.metrics import multiprocess_enabled

FHIR_SECONDS = Histogram(
    "pacsbridge_fhir_request_duration_seconds",
    "Time to answer a FHIR request (to its last byte), by method, resource type (system: the "
    "base, metadata and system operations; other: no such type) and HTTP status.",
    ["method", "resource_type", "status"],
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def fhir_resource_label(path: str, prefix: str, types: frozenset[str]) -> str:
    """The ``resource_type`` label of a path under the FHIR base ``prefix``."""
    first = path[len(prefix) :].strip("/").split("/", 1)[0]
    if not first or first == "metadata" or first.startswith(("$", "_")):
        return "system"
    return first if first in types else "other"


class FHIRTiming:
    """ASGI middleware: the duration of every request under the FHIR base, the direct GET
    path included (it runs inside the application's middleware)."""

    def __init__(self, app: ASGIApp, prefix: str, types: Iterable[str]) -> None:
        self.app = app
        self.prefix = prefix
        self.types = frozenset(types)
        self.histogram = FHIR_SECONDS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path == self.prefix or path.startswith(self.prefix + "/")
        ):
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope["method"]  # any token is a method to the HTTP parser: labels bounded
            self.histogram.labels(
                method if method in _METHODS else "other",
                fhir_resource_label(path, self.prefix, self.types),
                str(status),
            ).observe(time.perf_counter() - started)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def registry_for(db: Any) -> Any:
    """The registry one scrape reads: every process's metrics (multiprocess mode) or this
    process's (without it), and the job queue read from the index."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_enabled():
        MultiProcessCollector(registry)
    else:

        class _ThisProcess(Collector):
            def collect(self) -> Iterator[Any]:
                yield from REGISTRY.collect()

        registry.register(_ThisProcess())
    registry.register(JobQueueCollector(db))
    return registry


router = APIRouter(tags=["operations"])


def _metrics_response(registry: Any) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Every process of this server (Prometheus text format); the `admin` "
    "role, or anyone when authentication is off.",
    response_class=Response,
)
def metrics(request: Request) -> Response:
    return _metrics_response(request.app.state.metrics_registry)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackMetrics:
    """ASGI middleware in front of authentication: ``GET /metrics`` from a loopback client
    is answered without a token (the ``metrics_loopback_without_auth`` setting: a Prometheus
    on the same host). Any other request goes on, to authentication."""

    def __init__(self, app: ASGIApp, registry: Any) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if (
            scope["type"] == "http"
            and scope["path"] == "/metrics"
            and scope["method"] in ("GET", "HEAD")
            and client is not None
            and _loopback(str(client[0]))
        ):
            response = await anyio.to_thread.run_sync(_metrics_response, self.registry)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
