"""The HTTP application: one FastAPI app that the edges' routers mount into."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from archive import Archive
from config import Settings
from dicomweb import router as dicomweb_router
from dicomweb.common import RequestCheck
from dicomweb.direct import DirectApp
from dicomweb.router import PREFIX as DICOMWEB_PREFIX
from dicomweb.router import SERVICES as DICOMWEB_SERVICES
from fhir_bridge import PREFIX as FHIR_PREFIX
from fhir_bridge import FHIRError, outcome_response
from fhir_bridge import router as fhir_router
from fhir_bridge.router import build_providers
from pacsbridge import __version__
from pacsbridge.ai_api import router as ai_router
from pacsbridge.api_peers import router as peers_router
from pacsbridge.audit_http import AuditMiddleware
from pacsbridge.auth_api import router as auth_router
from pacsbridge.events_api import router as events_router
from pacsbridge.jobs_api import router as jobs_router
from pacsbridge.metrics_api import FHIRTiming, LoopbackMetrics, registry_for
from pacsbridge.metrics_api import router as metrics_router
from pacsbridge.request_id import RequestIdMiddleware
from security.http import AuthMiddleware
from security.keys import KeyStore
from security.policy import http_auth_enforced
from security.tokens import TokenService


def create_app(
    archive: Archive,
    settings: Settings,
    dimse_acceptors: Callable[[], dict[str, int]] | None = None,
) -> FastAPI:
    """The HTTP application; ``dimse_acceptors`` reports the DICOM acceptor processes
    (configured, ready) for ``/health``."""
    app = DirectApp(
        title="pacsbridge",
        version=__version__,
        description="DICOM-native PACS integration server.",
    )
    app.state.archive = archive
    app.state.settings = settings
    keys = KeyStore(settings.auth_keys_dir or settings.data_dir / "auth" / "keys")
    app.state.tokens = TokenService(archive, settings, keys)
    app.include_router(auth_router)
    app.include_router(peers_router)
    app.include_router(jobs_router)
    app.include_router(events_router)
    app.include_router(ai_router)
    app.include_router(dicomweb_router)
    app.include_router(metrics_router)
    app.state.metrics_registry = registry_for(archive.db)
    if settings.fhir.enabled:
        app.include_router(fhir_router)
        app.serve_directly(FHIR_PREFIX, [fhir_router])
    # DICOMweb GETs past FastAPI's per-request machinery (dicomweb/direct.py)
    app.serve_directly(DICOMWEB_PREFIX, [service.router for service in DICOMWEB_SERVICES])
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Path UIDs (and the Host header URLs are built from) are checked once for every DICOMweb
    # route, direct or not: the direct routes run inside the same middleware stack.
    app.add_middleware(
        RequestCheck,
        prefix=DICOMWEB_PREFIX,
        check_host=not (settings.public_url or settings.dicomweb_base_url),
    )
    if http_auth_enforced(settings):
        # Inside CORS (a browser's preflight needs no token), around every route, the direct
        # GET paths included.
        app.add_middleware(AuthMiddleware, tokens=app.state.tokens)
        if settings.metrics_loopback_without_auth:
            app.add_middleware(LoopbackMetrics, registry=app.state.metrics_registry)
    # Around the bearer-token check: refusals are audited too, with the principal it found.
    app.add_middleware(AuditMiddleware, audit=archive.audit)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Content-Type", "Content-Range", "ETag", "Warning", "Location"],
        )
    if settings.fhir.enabled:
        app.add_middleware(FHIRTiming, prefix=FHIR_PREFIX, types=build_providers(settings))
    # Outermost: every log line of a request, refusals included, carries its id.
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health", tags=["operations"])
    def health() -> JSONResponse:
        """Liveness and readiness: the index answers and the blob store is writable."""
        checks: dict[str, Any] = {}
        try:
            with archive.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        checks["storage"] = "ok" if archive.blobs.healthy() else "error"
        healthy = all(v == "ok" for v in checks.values())
        body = {
            "status": "ok" if healthy else "error",
            "version": __version__,
            "ae_title": settings.ae_title,
            **checks,
        }
        if dimse_acceptors is not None:
            body["dimse_processes"] = dimse_acceptors()
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/ready", tags=["operations"])
    def ready() -> JSONResponse:
        """Ready to serve: the index answers with every migration applied, the blob store is
        writable (for a load balancer's or an orchestrator's readiness probe)."""
        checks: dict[str, Any] = {}
        try:
            current, head = archive.db.schema_revisions()
            checks["database"] = "ok"
            checks["schema"] = (
                "ok" if current == head else f"at revision {current}, this code needs {head}"
            )
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        checks["storage"] = "ok" if archive.blobs.healthy() else "error"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", **checks}, status_code=200 if ok else 503
        )

    return app


def _json_safe(value: Any) -> Any:
    """``value`` with every float JSON cannot hold (NaN, ±Infinity) as its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _fhir_path(request: Request) -> bool:
    path = request.url.path
    return path == FHIR_PREFIX or path.startswith(FHIR_PREFIX + "/")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 (no such route, method not allowed): an OperationOutcome
    under ``/fhir`` (FHIR R4 http.html: every error is one), the default answer elsewhere."""
    assert isinstance(exc, StarletteHTTPException)
    if _fhir_path(request):
        error = FHIRError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return outcome_response(request, error)
    return await http_exception_handler(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 for a request that fails validation, with a body that is always JSON:
    the rejected input is echoed, and a body may hold NaN or Infinity (Python's JSON reader
    takes them; JSON itself has no such numbers). Under ``/fhir``: a 400 OperationOutcome."""
    assert isinstance(exc, RequestValidationError)
    if _fhir_path(request):
        errors = exc.errors()
        where = [".".join(str(p) for p in e.get("loc", ())) for e in errors[:10]]
        return outcome_response(
            request,
            FHIRError(400, "; ".join(str(e.get("msg")) for e in errors[:10]), expression=where),
        )
    return JSONResponse(
        status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))}
    )
