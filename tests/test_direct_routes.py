"""DICOMweb GET requests served past FastAPI's machinery (dicomweb/direct.py) answer exactly
as FastAPI does: same bodies, errors, headers; everything else still goes through FastAPI."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import APIRouter, Query, Request
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class

from archive import Archive
from config import Settings
from dicomweb.router import SERVICES
from fhir_bridge import router as fhir_router
from pacsbridge.app import create_app


@pytest.fixture
def app(tmp_path) -> Iterator:
    settings = Settings(data_dir=tmp_path / "data", cors_origins=["http://viewer.example"])
    archive = Archive(settings)
    yield create_app(archive, settings)
    archive.close()


def _get_routes(routers: list[APIRouter]) -> int:
    return sum(
        1 for router in routers for r in router.routes if getattr(r, "methods", None) == {"GET"}
    )


def test_every_dicomweb_and_fhir_get_route_is_served_directly(app) -> None:
    dicomweb = _get_routes([s.router for s in SERVICES])
    assert dicomweb > 20
    assert len(app._direct_routes) == dicomweb + _get_routes([fhir_router]) > dicomweb + 5
    assert set(app._direct_prefixes) == {"/dicom-web", "/fhir"}


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/metadata",
        "/fhir/Patient?name=nobody&unknown=1",
        "/fhir/Patient/12345",
        "/fhir/Nothing/1",
        "/fhir/Patient?birthdate=notadate",
        "/fhir/metadata?_format=xml",
        "/fhir/ImagingStudy/1.2.3/_history/1",
    ],
)
def test_direct_fhir_answers_equal_fastapi_answers(app, path: str) -> None:
    """The FHIR GET endpoints answer their own errors (OperationOutcome), past FastAPI too."""
    with TestClient(app) as client:
        direct = client.get(path, headers={"Origin": "http://viewer.example"})
        routes, app._direct_routes = app._direct_routes, []
        try:
            routed = client.get(path, headers={"Origin": "http://viewer.example"})
        finally:
            app._direct_routes = routes
    assert direct.status_code == routed.status_code
    for answer in (direct, routed):  # every FHIR body the suite receives is valid R4
        body = answer.json()
        get_fhir_model_class(body["resourceType"]).model_validate(body)
    strip = ("id", "date")
    body_direct, body_routed = direct.json(), routed.json()
    for body in (body_direct, body_routed):
        for key in strip:
            body.pop(key, None)
        body.pop("meta", None)
        for entry in body.get("entry", []):
            entry.pop("fullUrl")  # a fresh urn:uuid for the outcome entry
    assert body_direct == body_routed
    assert direct.headers["content-type"] == routed.headers["content-type"]
    assert direct.headers.get("access-control-allow-origin") == "http://viewer.example"


@pytest.mark.parametrize(
    "path",
    [
        "/dicom-web/studies?PatientID=NOBODY",
        "/dicom-web/studies?NoSuchKeyword=1",
        "/dicom-web/studies/1.2.3/metadata",
        "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1",
        "/dicom-web/studies/1.2.3/series",
        "/dicom-web/nothing-here",
        "/health",
    ],
)
def test_direct_answers_equal_fastapi_answers(app, path: str) -> None:
    headers = {"Origin": "http://viewer.example", "Accept": "application/dicom+json"}
    with TestClient(app) as client:
        direct = client.get(path, headers=headers)
        routes, app._direct_routes = app._direct_routes, []
        try:
            through_fastapi = client.get(path, headers=headers)
        finally:
            app._direct_routes = routes
    assert direct.status_code == through_fastapi.status_code
    assert direct.content == through_fastapi.content
    for header in ("content-type", "access-control-allow-origin", "warning"):
        assert direct.headers.get(header) == through_fastapi.headers.get(header)


def test_routes_with_more_than_path_parameters_stay_with_fastapi(tmp_path) -> None:
    from dicomweb.direct import DirectApp

    router = APIRouter()

    @router.get("/plain/{x}")
    def plain(request: Request, x: str) -> dict:
        return {"x": x}

    @router.get("/query/{x}")
    def with_query(request: Request, x: str, n: int = Query(1)) -> dict:
        return {"x": x, "n": n}

    app = DirectApp()
    app.include_router(router, prefix="/p")
    app.serve_directly("/p", [router])
    assert [r.path for r in app._direct_routes] == ["/p/plain/{x}"]
    with TestClient(app) as client:
        assert client.get("/p/query/a?n=3").json() == {"x": "a", "n": 3}


def test_dependencies_from_include_router_and_the_app_are_never_skipped(tmp_path) -> None:
    """A route that gets a dependency where it is included (or from the application) is not
    served directly: FastAPI runs it, so a guard declared there always runs."""
    from fastapi import Depends, HTTPException

    from dicomweb.direct import DirectApp

    def guard(request: Request) -> None:
        if request.headers.get("x-key") != "open":
            raise HTTPException(401, "no key")

    router = APIRouter()

    @router.get("/plain/{x}")
    def plain(request: Request, x: str) -> dict:
        return {"x": x}

    guarded = DirectApp()
    guarded.include_router(router, prefix="/g", dependencies=[Depends(guard)])
    guarded.serve_directly("/g", [router])
    assert guarded._direct_routes == []
    app_wide = DirectApp(dependencies=[Depends(guard)])
    app_wide.include_router(router, prefix="/a")
    app_wide.serve_directly("/a", [router])
    assert app_wide._direct_routes == []
    for app, path in ((guarded, "/g/plain/1"), (app_wide, "/a/plain/1")):
        with TestClient(app) as client:
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"x-key": "open"}).json() == {"x": "1"}


def test_direct_routes_answer_with_the_apps_exception_handler(tmp_path) -> None:
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from dicomweb.direct import DirectApp

    router = APIRouter()

    @router.get("/missing/{x}")
    def missing(request: Request, x: str) -> dict:
        raise HTTPException(404, f"no {x}")

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse({"problem": exc.detail}, status_code=exc.status_code)

    app = DirectApp()
    app.include_router(router, prefix="/p")
    app.serve_directly("/p", [router])
    app.add_exception_handler(StarletteHTTPException, handler)
    assert [r.path for r in app._direct_routes] == ["/p/missing/{x}"]
    with TestClient(app) as client:
        answer = client.get("/p/missing/7")
    assert (answer.status_code, answer.json()) == (404, {"problem": "no 7"})


def test_head_wherever_get_works(app) -> None:
    """RFC 9110 9.3.2: HEAD answers as GET does, headers and all, without the content."""
    with TestClient(app) as client:
        for path in ("/dicom-web/studies", "/fhir/metadata", "/health", "/fhir/Patient/404"):
            got = client.get(path)
            head = client.head(path)
            assert head.status_code == got.status_code, path
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
            if "content-length" in got.headers:
                assert head.headers["content-length"] == got.headers["content-length"], path


def test_ready_needs_every_migration(tmp_path) -> None:
    from alembic import command

    from archive.db import alembic_config

    settings = Settings(data_dir=tmp_path / "data")
    archive = Archive(settings)
    try:
        with TestClient(create_app(archive, settings)) as client:
            answer = client.get("/ready")
            assert (answer.status_code, answer.json()["status"]) == (200, "ready")
            current, head = archive.db.schema_revisions()
            assert current == head is not None
            with archive.db.engine.connect() as conn:
                cfg = alembic_config(archive.db.engine)
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "-1")
                conn.commit()
            behind = client.get("/ready")
            assert behind.status_code == 503
            assert behind.json()["schema"].endswith(f"this code needs {head}")
            assert client.get("/health").status_code == 200  # alive all the same
    finally:
        archive.close()
