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
