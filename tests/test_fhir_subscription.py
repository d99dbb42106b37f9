"""FHIR R4 Subscription (rest-hook) against a real `pacsbridge serve` with
``PACSBRIDGE_AUTH=required``: created, read, searched, updated and deleted over HTTP by an
administrator (refused to other roles), refused where the criteria or channel are not served,
and notifying a receiver on 127.0.0.1 of the one change that matches its criteria (the job
workers' event delivery). The matcher (``render_if_matches``) is also checked on its own."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.subscription import Subscription
from sqlalchemy import func, select

from archive import Archive
from archive.audit import AuditEventRow
from archive.outbox import EventDelivery, EventSubscription, OutboxEvent
from config import Settings
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError
from fhir_bridge.router import build_providers
from fhir_bridge.subscription import render_if_matches, rest_hook_renderer
from security.accounts import add_user
from tests.conftest import Backend, RunningServer, _backend, start_server
from tests.dicom_factory import ct_slice
from tests.fhir_support import FHIRValidator
from tests.test_outbox_emit import encode

PASSWORD = "correct horse battery staple"
JSON = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PATIENT_SYSTEM = "urn:pacsbridge:patient-id"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every request (200 to each)."""

    url: str
    got: list[Received] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got: list[Received] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            got.append(
                Received(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
            )
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = _record

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Receiver(f"http://127.0.0.1:{httpd.server_address[1]}/hook", got)
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class World:
    server: RunningServer
    admin: httpx.Client
    doctor: httpx.Client
    patient: str


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    assert checker.total > 0, "no FHIR response body was validated"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, validator: FHIRValidator) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("subscriptions")

    class _Request:  # _backend needs a request only for PostgreSQL or S3
        def getfixturevalue(self, name: str) -> Any:
            raise AssertionError(name)

    backend: Backend = _backend("sqlite", "file", workdir, _Request())  # type: ignore[arg-type]
    with closing(Archive(backend.settings)) as archive:
        add_user(archive, "root", "admin", PASSWORD)
        add_user(archive, "doctor", "radiologist", PASSWORD)
    server = start_server(
        backend,
        workdir,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_EVENTS=json.dumps({"poll_interval": 0.1}),
    )
    try:
        tokens = {}
        for user in ("root", "doctor"):
            answer = httpx.post(
                f"{server.http}/auth/token",
                data={"grant_type": "password", "username": user, "password": PASSWORD},
            )
            assert answer.status_code == 200, answer.text
            tokens[user] = answer.json()["access_token"]
        with (
            validator.httpx_client(
                f"{server.http}/fhir", headers={"Authorization": f"Bearer {tokens['root']}"}
            ) as admin,
            validator.httpx_client(
                f"{server.http}/fhir", headers={"Authorization": f"Bearer {tokens['doctor']}"}
            ) as doctor,
        ):
            created = admin.post(
                "/Patient",
                json={
                    "resourceType": "Patient",
                    "identifier": [{"system": PATIENT_SYSTEM, "value": "SUB-1"}],
                    "name": [{"family": "Subscriber", "given": ["Sam"]}],
                },
                headers=JSON,
            )
            assert created.status_code == 201, created.text
            yield World(server, admin, doctor, str(created.json()["id"]))
    finally:
        server.stop()


def _subscription(endpoint: str, criteria: str, **channel: Any) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Tell the EHR when an order is done",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": endpoint, **channel},
    }


def _order(patient: str, status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": status,
        "intent": "order",
        "code": {"coding": [{"system": LOINC, "code": "24725-4", "display": "CT Head"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "performerType": {"coding": [{"system": DCM, "code": "CT"}]},
    }


def _outcome(answer: httpx.Response, status: int, code: str, text: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["code"] == code and text in issue["diagnostics"], body


def _wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _delivered(server: RunningServer) -> bool:
    """Whether every FHIR subscription has been passed every event of the outbox."""
    with closing(server.archive()) as archive, archive.db.session() as session:
        head = session.scalar(select(func.max(OutboxEvent.id))) or 0
        cursors = session.scalars(
            select(EventSubscription.cursor).where(EventSubscription.source == "fhir")
        ).all()
        pending = session.scalar(
            select(func.count())
            .select_from(EventDelivery)
            .where(EventDelivery.status.in_(("held", "failed")))
        )
    return all(cursor >= head for cursor in cursors) and not pending


def _audits(server: RunningServer, entity: str) -> list[AuditEventRow]:
    with closing(server.archive()) as archive, archive.db.session() as session:
        return list(
            session.scalars(
                select(AuditEventRow)
                .where(AuditEventRow.entity == entity)
                .order_by(AuditEventRow.id)
            )
        )


def test_crud_search_validation_and_access(world: World, receiver: Receiver) -> None:
    admin = world.admin
    body = _subscription(
        receiver.url,
        "ServiceRequest?status=completed",
        payload="application/fhir+json",
        header=["Authorization: Bearer to-the-ehr"],
    )
    created = admin.post("/Subscription", json=body, headers=JSON)
    assert created.status_code == 201, created.text
    sub = created.json()
    Subscription.model_validate(sub)
    sub_id = sub["id"]
    assert sub["status"] == "active"  # requested → active (subscription.html 2.46.6)
    assert sub["meta"]["versionId"] == "1"
    assert sub["criteria"] == "ServiceRequest?status=completed"
    assert sub["channel"] == body["channel"]
    assert created.headers["location"].endswith(f"/Subscription/{sub_id}/_history/1")
    with closing(world.server.archive()) as archive, archive.db.session() as session:
        row = session.scalars(
            select(EventSubscription).where(EventSubscription.name == f"fhir-{sub_id}")
        ).one()
        assert (row.channel, row.source, row.endpoint, row.status, row.event_types) == (
            "rest-hook",
            "fhir",
            receiver.url,
            "active",
            "order.#",
        )
        assert row.options == {
            "payload": "application/fhir+json",
            "headers": ["Authorization: Bearer to-the-ehr"],
        }
        assert row.document is not None and row.document["reason"] == body["reason"]
    [audit] = _audits(world.server, f"Subscription/{sub_id}")
    assert (audit.action, audit.type_code, audit.subtype_code, audit.agent) == (
        "C",
        "110113",
        "110128",
        "user:root",
    )

    read = admin.get(f"/Subscription/{sub_id}")
    assert read.status_code == 200 and read.json() == sub
    for params, found in (
        ({"status": "active"}, True),
        ({"status": "off"}, False),
        ({"type": "rest-hook"}, True),
        ({"url": receiver.url}, True),
        ({"url": receiver.url + "/other"}, False),
        ({"criteria": "ServiceRequest"}, True),
        ({"criteria:exact": "ServiceRequest"}, False),
        ({"criteria:exact": "ServiceRequest?status=completed"}, True),
        ({"criteria": "ImagingStudy"}, False),
    ):
        bundle = admin.get("/Subscription", params=params, headers={"Prefer": "handling=strict"})
        assert bundle.status_code == 200, bundle.text
        ids = {e["resource"]["id"] for e in bundle.json().get("entry", [])}
        assert (sub_id in ids) is found, params

    # Off, then on again: a new version each time, If-Match checked.
    off = admin.put(
        f"/Subscription/{sub_id}",
        json={**body, "id": sub_id, "status": "off"},
        headers={**JSON, "If-Match": 'W/"1"'},
    )
    assert off.status_code == 200, off.text
    assert (off.json()["status"], off.json()["meta"]["versionId"]) == ("off", "2")
    stale = admin.put(
        f"/Subscription/{sub_id}",
        json={**body, "id": sub_id},
        headers={**JSON, "If-Match": 'W/"1"'},
    )
    assert stale.status_code == 412, stale.text

    # Refused: other channels, unknown types, searches the type does not take, end, error.
    refusals = [
        ({**body, "channel": {"type": "websocket"}}, 422, "not-supported", "only rest-hook"),
        (
            {
                **body,
                "channel": {
                    "type": "rest-hook",
                    "endpoint": receiver.url,
                    "payload": "application/fhir+xml",
                },
            },
            422,
            "not-supported",
            "payload",
        ),
        ({**body, "criteria": "Patient?name=x"}, 422, "not-supported", "subscriptions are on"),
        ({**body, "criteria": "Observation?code=x"}, 422, "not-supported", "subscriptions are on"),
        ({**body, "criteria": "ServiceRequest?colour=blue"}, 422, "value", "colour"),
        ({**body, "criteria": "ServiceRequest?_count=5"}, 422, "not-supported", "_count"),
        ({**body, "end": "2030-01-01T00:00:00Z"}, 422, "not-supported", "end"),
        ({**body, "status": "error"}, 422, "business-rule", "error is the server's"),
        (
            {**body, "channel": {"type": "rest-hook", "endpoint": "ftp://example.org/x"}},
            422,
            "required",
            "http(s)",
        ),
    ]
    for refused, status, code, text in refusals:
        _outcome(admin.post("/Subscription", json=refused, headers=JSON), status, code, text)

    # Only administrators: a radiologist may write clinical resources but not this.
    assert world.doctor.post("/Subscription", json=body, headers=JSON).status_code == 403
    assert world.doctor.get(f"/Subscription/{sub_id}").status_code == 403
    assert world.doctor.delete(f"/Subscription/{sub_id}").status_code == 403

    deleted = admin.delete(f"/Subscription/{sub_id}")
    assert deleted.status_code == 200, deleted.text
    assert admin.get(f"/Subscription/{sub_id}").status_code == 404
    changes = [
        (a.action, a.outcome)
        for a in _audits(world.server, f"Subscription/{sub_id}")
        if a.type_code == "110113"
    ]
    assert changes == [("C", 0), ("U", 0), ("D", 0)]  # reads are audited apart (110110 R)
    with closing(world.server.archive()) as archive, archive.db.session() as session:
        assert (
            session.scalars(
                select(EventSubscription).where(EventSubscription.name == f"fhir-{sub_id}")
            ).first()
            is None
        )
    metadata = admin.get("/metadata").json()
    [entry] = [r for r in metadata["rest"][0]["resource"] if r["type"] == "Subscription"]
    assert {i["code"] for i in entry["interaction"]} >= {"create", "read", "update", "delete"}
    assert {p["name"] for p in entry["searchParam"]} >= {"status", "type", "url", "criteria"}


def test_rest_hook_notifies_the_matching_change(world: World, receiver: Receiver) -> None:
    admin = world.admin
    with_payload = admin.post(
        "/Subscription",
        json=_subscription(
            receiver.url,
            "ServiceRequest?status=completed",
            payload="application/fhir+json",
            header=["Authorization: Bearer to-the-ehr", "X-Site: north"],
        ),
        headers=JSON,
    )
    assert with_payload.status_code == 201, with_payload.text
    empty = admin.post(
        "/Subscription",
        json=_subscription(receiver.url + "/ping", "ServiceRequest?status=completed"),
        headers=JSON,
    )
    assert empty.status_code == 201, empty.text

    order = admin.post("/ServiceRequest", json=_order(world.patient), headers=JSON)
    assert order.status_code == 201, order.text
    order_id = order.json()["id"]
    # Each change is delivered before the next is made: the notification shows the resource
    # as it is when sent, so this is what tells each change apart.
    _wait_for(lambda: _delivered(world.server))
    held = admin.put(
        f"/ServiceRequest/{order_id}",
        json={**order.json(), "status": "on-hold"},
        headers=JSON,
    )
    assert held.status_code == 200, held.text
    _wait_for(lambda: _delivered(world.server))
    # Another order that never matches.
    other = admin.post("/ServiceRequest", json=_order(world.patient), headers=JSON)
    assert other.status_code == 201, other.text
    _wait_for(lambda: _delivered(world.server))
    assert receiver.got == []  # nothing matched so far
    done = admin.put(
        f"/ServiceRequest/{order_id}",
        json={**held.json(), "status": "completed"},
        headers=JSON,
    )
    assert done.status_code == 200, done.text

    _wait_for(lambda: len(receiver.got) >= 2 and _delivered(world.server))
    by_path = {r.path: r for r in receiver.got}
    assert len(receiver.got) == 2, [(r.method, r.path) for r in receiver.got]
    put = by_path[f"/hook/ServiceRequest/{order_id}"]
    assert put.method == "PUT"
    assert put.headers["content-type"] == "application/fhir+json"
    assert put.headers["authorization"] == "Bearer to-the-ehr"
    assert put.headers["x-site"] == "north"
    sent = json.loads(put.body)
    assert (sent["resourceType"], sent["id"], sent["status"]) == (
        "ServiceRequest",
        order_id,
        "completed",
    )
    assert sent["meta"]["versionId"] == done.json()["meta"]["versionId"]
    ping = by_path["/hook/ping"]
    assert (ping.method, ping.body) == ("POST", b"")


def test_matcher_runs_the_criteria_search(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"))  # type: ignore[arg-type]
    with closing(Archive(settings)) as archive:
        render = rest_hook_renderer(archive, settings)
        study, series = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
        archive.ingest(
            encode(ct_slice(study_uid=study, series_uid=series, index=0, size=8, patient_id="M1"))
        )
        found = render("ImagingStudy?modality=CT", f"ImagingStudy/{study}")
        assert found is not None and found["id"] == study
        assert render("ImagingStudy?modality=MR", f"ImagingStudy/{study}") is None
        assert render("ImagingStudy?modality=CT", "ImagingStudy/1.2.3.4") is None
        assert render("ImagingStudy?modality=CT", f"DiagnosticReport/{study}") is None
        with pytest.raises(FHIRError, match="subscriptions are on"):
            render("Patient?name=x", "Patient/1")
        # The same search, given the context of a request.
        ctx = Context(
            archive=archive,
            settings=settings,
            base="http://fhir.example/fhir",
            dicomweb="http://fhir.example/dicom-web",
            providers=build_providers(settings),
        )
        matched = render_if_matches(
            ctx, "ImagingStudy?patient.identifier=M1", f"ImagingStudy/{study}"
        )
        assert matched is not None and matched["id"] == study
