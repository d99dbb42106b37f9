"""/api/peers: list, get, create/replace, delete, validation; config peers are read-only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import pytest
from fastapi.testclient import TestClient

from archive import Archive
from pacsbridge.app import create_app

CONFIG_PEERS = {
    "orthanc": {"ae_title": "ORTHANC", "host": "orthanc.example", "port": 4242},
    "ct01": {"ae_title": "CT01", "host": "10.0.0.7", "port": 104},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest, make_backend) -> Iterator[TestClient]:
    backend = make_backend(request.param, "file", peers=CONFIG_PEERS)
    archive = Archive(backend.settings)
    with closing(archive), TestClient(create_app(archive, backend.settings)) as test_client:
        yield test_client


def test_config_peers_are_listed_and_read_only(client: TestClient):
    listed = client.get("/api/peers").json()
    assert [(p["name"], p["ae_title"], p["source"]) for p in listed] == [
        ("ct01", "CT01", "config"),
        ("orthanc", "ORTHANC", "config"),
    ]
    peer = client.get("/api/peers/orthanc").json()
    assert peer == {
        "name": "orthanc",
        "ae_title": "ORTHANC",
        "host": "orthanc.example",
        "port": 4242,
        "permissions": ["echo", "store", "find", "move", "get"],
        "check_host": False,
        "tls": False,
        "source": "config",
        "created_at": None,
        "updated_at": None,
    }
    body = {"ae_title": "OTHER", "host": "h", "port": 1}
    response = client.put("/api/peers/orthanc", json=body)
    assert response.status_code == 409
    assert "configuration file" in response.json()["detail"]
    response = client.delete("/api/peers/ct01")
    assert response.status_code == 409
    assert client.get("/api/peers/ct01").status_code == 200


def test_create_replace_delete(client: TestClient):
    body = {"ae_title": "VIEWER", "host": "viewer.example", "port": 11112}
    created = client.put("/api/peers/viewer", json=body)
    assert created.status_code == 201, created.text
    record = created.json()
    assert {k: record[k] for k in ("name", "ae_title", "host", "port", "source")} == {
        "name": "viewer",
        "ae_title": "VIEWER",
        "host": "viewer.example",
        "port": 11112,
        "source": "api",
    }
    assert record["created_at"] and record["updated_at"]
    assert client.get("/api/peers/viewer").json() == record

    replaced = client.put(
        "/api/peers/viewer", json={"ae_title": " VIEWER2 ", "host": "10.1.2.3", "port": 104}
    )
    assert replaced.status_code == 200
    assert replaced.json()["ae_title"] == "VIEWER2"  # non-significant spaces dropped
    assert replaced.json()["host"] == "10.1.2.3"
    assert replaced.json()["created_at"] == record["created_at"]
    names = [p["name"] for p in client.get("/api/peers").json()]
    assert names == ["ct01", "orthanc", "viewer"]

    assert client.delete("/api/peers/viewer").status_code == 204
    assert client.get("/api/peers/viewer").status_code == 404
    assert client.delete("/api/peers/viewer").status_code == 404
    # The AE title is free again.
    body = {"ae_title": "VIEWER2", "host": "h", "port": 1}
    assert client.put("/api/peers/other", json=body).status_code == 201


def test_ae_titles_are_unique(client: TestClient):
    body = {"ae_title": "SHARED", "host": "a.example", "port": 104}
    assert client.put("/api/peers/a", json=body).status_code == 201
    response = client.put("/api/peers/b", json=body)
    assert response.status_code == 409
    assert "belongs to peer 'a'" in response.json()["detail"]
    response = client.put("/api/peers/b", json={**body, "ae_title": "ORTHANC"})
    assert response.status_code == 409
    assert "'orthanc'" in response.json()["detail"]


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("p", {"ae_title": "A" * 17, "host": "h", "port": 104}, "1 to 16"),
        ("p", {"ae_title": "", "host": "h", "port": 104}, "1 to 16"),
        ("p", {"ae_title": "   ", "host": "h", "port": 104}, "1 to 16"),
        ("p", {"ae_title": "A\\B", "host": "h", "port": 104}, "backslash"),
        ("p", {"ae_title": "A\tB", "host": "h", "port": 104}, "control"),
        ("p", {"ae_title": "ÄE", "host": "h", "port": 104}, "ASCII"),
        ("p", {"ae_title": "AE", "host": "", "port": 104}, "host"),
        ("p", {"ae_title": "AE", "host": "a b", "port": 104}, "host"),
        ("p", {"ae_title": "AE", "host": "h", "port": 0}, "greater than or equal to 1"),
        ("p", {"ae_title": "AE", "host": "h", "port": 65536}, "less than or equal to 65535"),
        ("p", {"ae_title": "AE", "host": "h", "port": "x"}, "integer"),
        ("p", {"ae_title": "AE", "host": "h"}, "port"),
        ("p", {"ae_title": "AE", "host": "h", "port": 1, "permissions": ["read"]}, "'find'"),
        ("p", {"ae_title": "AE", "host": "h", "port": 1, "permissions": "find"}, "list"),
        ("p", {"ae_title": "AE", "host": "h", "port": 1, "check_host": "yes"}, "boolean"),
        ("p", {"ae_title": "AE", "host": "h", "port": 1, "tls": 1}, "boolean"),
        ("p", {"ae_title": "AE", "host": "h", "port": 1, "permission": ["find"]}, "extra"),
        ("-bad", {"ae_title": "AE", "host": "h", "port": 104}, "pattern"),
        ("x" * 65, {"ae_title": "AE", "host": "h", "port": 104}, "pattern"),
    ],
)
def test_validation(client: TestClient, name: str, body: dict, message: str):
    response = client.put(f"/api/peers/{name}", json=body)
    assert response.status_code == 422, response.text
    assert message in response.text
    assert all(p["source"] == "config" for p in client.get("/api/peers").json())


def test_permissions_and_check_host(client: TestClient):
    body = {"ae_title": "WS", "host": "ws.example", "port": 104}
    record = client.put("/api/peers/ws", json=body).json()
    assert record["permissions"] == ["echo", "store", "find", "move", "get"]
    assert record["check_host"] is False
    body |= {"permissions": ["get", "find", "get"], "check_host": True}
    record = client.put("/api/peers/ws", json=body).json()
    assert record["permissions"] == ["find", "get"]  # canonical order, no repeats
    assert record["check_host"] is True
    assert client.get("/api/peers/ws").json() == record
    record = client.put("/api/peers/ws", json={**body, "permissions": []}).json()
    assert record["permissions"] == []  # a C-MOVE destination only
    assert record["tls"] is False
    record = client.put("/api/peers/ws", json={**body, "tls": True}).json()
    assert record["tls"] is True  # associations to it go over TLS
    assert client.get("/api/peers/ws").json()["tls"] is True


def test_unknown_peer(client: TestClient):
    response = client.get("/api/peers/nobody")
    assert response.status_code == 404
    assert "nobody" in response.json()["detail"]
