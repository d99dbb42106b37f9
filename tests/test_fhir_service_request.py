"""Imaging orders over FHIR: ServiceRequest against a real `pacsbridge serve` with
``PACSBRIDGE_AUTH=required`` and the sample price list, written with fhirpy and httpx.

An order becomes a Requested Procedure with its Scheduled Procedure Step in the index
(``imaging_order``): the assertions read those rows, the versions, the outbox events and the
audit events the writes committed, besides the FHIR answers. Every FHIR body is validated with
``fhir.resources.R4B`` (tests/fhir_support.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirpy import SyncFHIRClient
from sqlalchemy import select

from archive import Archive, ordering
from archive.audit import AuditEventRow
from archive.orders import ON_WORKLIST, ImagingOrder, ImagingOrderVersion
from archive.outbox import OutboxEvent
from security.accounts import add_client, add_user
from tests.conftest import Backend, RunningServer, _backend, start_server
from tests.fhir_support import FHIRValidator

REPO = Path(__file__).resolve().parent.parent
PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
PASSWORD = "correct horse battery staple"
PATIENT_SYSTEM = "urn:pacsbridge:patient-id"
JSON = {"Content-Type": "application/fhir+json"}
STRICT = {"Prefer": "handling=strict"}
ACSN = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
AE_SYSTEM = "urn:pacsbridge:ae-title"


@dataclass
class World:
    server: RunningServer
    admin: httpx.Client
    fhirpy: SyncFHIRClient
    alice: str
    betty: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    assert checker.total > 0, "no FHIR response body was validated"
    for client in checker.clients:
        assert checker.validated[client] > 0, f"no {client} response was validated"


@pytest.fixture(autouse=True)
def _bodies_valid(validator: FHIRValidator, request: pytest.FixtureRequest) -> Iterator[None]:
    before, failed = len(validator.failures), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        assert validator.failures[before:] == []


def _token(server: RunningServer, **form: str) -> str:
    answer = httpx.post(f"{server.http}/auth/token", data=form)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def _patient(admin: httpx.Client, value: str, family: str) -> str:
    created = admin.post(
        "/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": value}],
            "name": [{"family": family, "given": ["Orla"]}],
        },
        headers=JSON,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, validator: FHIRValidator) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("orders")

    class _Request:  # _backend needs a request only for PostgreSQL or S3
        def getfixturevalue(self, name: str) -> Any:
            raise AssertionError(name)

    backend: Backend = _backend("sqlite", "file", workdir, _Request())  # type: ignore[arg-type]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    loaded = subprocess.run(
        [str(PACSBRIDGE), "billing", "prices", "load", str(REPO / "billing/sample-prices.csv")],
        env=env | backend.env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    with closing(Archive(backend.settings)) as archive:
        add_user(archive, "root", "admin", PASSWORD)
        add_user(archive, "doctor", "clinician", PASSWORD)
    server = start_server(
        backend,
        workdir,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_DICOM_TIMEZONE="Europe/Berlin",
    )
    try:
        admin_token = _token(server, grant_type="password", username="root", password=PASSWORD)
        headers = {"Authorization": f"Bearer {admin_token}"}
        with validator.httpx_client(f"{server.http}/fhir", headers=headers) as admin:
            alice = _patient(admin, "ORD-A", "Alpha")
            betty = _patient(admin, "ORD-B", "Beta")
            tokens = {"admin": admin_token}
            with closing(server.archive()) as archive:
                portal = add_client(
                    archive, "portal-a", "service", "patient/*.rs launch/patient", patient=alice
                )
                ris = add_client(archive, "ris", "service", "system/ServiceRequest.cruds")
                viewer = add_client(archive, "viewer", "service", "system/ServiceRequest.rs")
            for name, secret in (("portal-a", portal), ("ris", ris), ("viewer", viewer)):
                tokens[name] = _token(
                    server, grant_type="client_credentials", client_id=name, client_secret=secret
                )
            tokens["doctor"] = _token(
                server, grant_type="password", username="doctor", password=PASSWORD
            )
            validator.clients.add("fhirpy-sync")
            client = SyncFHIRClient(
                f"{server.http}/fhir",
                authorization=f"Bearer {admin_token}",
                requests_config={
                    "hooks": {"response": [validator.requests_hook("fhirpy-sync")]},
                    "timeout": 60,
                },
            )
            yield World(server, admin, client, alice, betty, tokens)
    finally:
        server.stop()


def _order(patient: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"coding": [{"system": LOINC, "code": "24725-4", "display": "CT Head"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    body.update(extra)
    return body


def _rows(server: RunningServer, model: Any, *where: Any) -> list[Any]:
    with closing(server.archive()) as archive, archive.db.session() as session:
        return list(session.scalars(select(model).where(*where).order_by(model.id)))


def _order_row(server: RunningServer, resource_id: str) -> ImagingOrder:
    (row,) = _rows(server, ImagingOrder, ImagingOrder.resource_id == resource_id)
    return row


def _identifier(resource: dict[str, Any], system: str) -> str:
    found = [i["value"] for i in resource["identifier"] if i.get("system") == system]
    assert len(found) == 1, resource["identifier"]
    return str(found[0])


def _accession(resource: dict[str, Any]) -> dict[str, Any]:
    found = [
        i
        for i in resource["identifier"]
        if any(
            (c.get("system"), c.get("code")) == (ACSN["system"], ACSN["code"])
            for c in (i.get("type") or {}).get("coding", [])
        )
    ]
    assert len(found) == 1, resource["identifier"]
    return found[0]


def _events(server: RunningServer, resource_id: str) -> list[OutboxEvent]:
    return _rows(server, OutboxEvent, OutboxEvent.resource == f"ServiceRequest/{resource_id}")


def _audits(server: RunningServer, resource_id: str) -> list[AuditEventRow]:
    """The audit events of the changes of an order that succeeded (refused requests and reads
    are audited too, with their outcome)."""
    return _rows(
        server,
        AuditEventRow,
        AuditEventRow.entity == f"ServiceRequest/{resource_id}",
        AuditEventRow.action.in_(("C", "U", "D")),
        AuditEventRow.outcome == 0,
    )


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == "match"
    }


def _outcome(response: httpx.Response, status: int, code: str, where: str | None = None) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    first = body["issue"][0]
    assert first["severity"] == "error" and first["code"] == code, body
    assert first["diagnostics"].strip(), body
    if where is not None:
        assert first["expression"] == [where], body


# --- create -------------------------------------------------------------------------------------


def test_order_without_accession_number_gets_one(world: World) -> None:
    created = world.fhirpy.resource(
        "ServiceRequest",
        **{
            k: v
            for k, v in _order(
                world.alice,
                priority="urgent",
                occurrenceDateTime="2026-12-09T09:30:00+00:00",
                performerType={"coding": [{"system": DCM, "code": "CT", "display": "CT"}]},
                performer=[
                    {
                        "reference": "Device/ct-room-1",
                        "identifier": {"system": AE_SYSTEM, "value": "CT_ROOM_1"},
                        "display": "CT room 1",
                    }
                ],
                requester={"reference": "Practitioner/77", "display": "Gregory House"},
                reasonCode=[{"text": "headache"}, {"coding": [{"display": "dizziness"}]}],
                identifier=[{"system": "urn:ehr:placer", "value": "PLACER-1"}],
            ).items()
            if k != "resourceType"
        },
    )
    created.save()
    resource = created.serialize()
    assert resource["meta"]["versionId"] == "1"
    accession = _accession(resource)
    assert re.fullmatch(r"PB[0-9A-Z]{6,14}", accession["value"]), accession
    assert accession["system"] == "urn:pacsbridge:accession"
    study_uid = _identifier(resource, "urn:dicom:uid").removeprefix("urn:oid:")
    assert study_uid.startswith("2.25.") and len(study_uid) <= 64
    requested = _identifier(resource, "urn:pacsbridge:requested-procedure")
    assert _identifier(resource, "urn:ehr:placer") == "PLACER-1"  # the EHR's own, kept

    row = _order_row(world.server, resource["id"])
    assert (row.status, row.intent, row.priority, row.step_status) == (
        "active",
        "order",
        "urgent",
        "SCHEDULED",
    )
    assert row.accession_number == accession["value"] and row.issuer_of_accession_number is None
    assert row.study_instance_uid == study_uid
    assert row.requested_procedure_id == requested and len(requested) <= 16
    assert row.scheduled_procedure_step_id.startswith("SPS")
    assert len(row.scheduled_procedure_step_id) <= 16
    assert (row.procedure_scheme, row.procedure_code, row.procedure_display) == (
        LOINC,
        "24725-4",
        "CT Head",
    )
    assert (row.modality, row.scheduled_station_ae_title, row.scheduled_station_name) == (
        "CT",
        "CT_ROOM_1",
        "CT room 1",
    )
    # 09:30 UTC is 10:30 in Berlin in December: the DICOM values are in dicom_timezone.
    assert (row.scheduled_start_date, row.scheduled_start_time) == ("20261209", "103000")
    assert row.requester == "Practitioner/77" and row.requesting_physician == "House^Gregory"
    assert row.reason == "headache; dizziness"
    assert row.patient_fk == int(world.alice)

    (version,) = _rows(world.server, ImagingOrderVersion, ImagingOrderVersion.order_fk == row.id)
    assert version.version == 1 and version.document["identifier"] == resource["identifier"]
    (event,) = _events(world.server, resource["id"])
    assert event.type == "order.scheduled" and event.study_instance_uid == study_uid
    assert event.patient_id == "ORD-A"
    assert event.data["accession_number"] == accession["value"]
    assert event.data["status"] == "active" and event.data["procedure_code"] == "24725-4"
    (audit,) = _audits(world.server, resource["id"])
    assert (audit.action, audit.type_code, audit.patient_id, audit.outcome) == (
        "C",
        "110110",
        "ORD-A",
        0,
    )
    # Read back as written (fhirpy), and by httpx with its version as the ETag.
    again = world.fhirpy.reference("ServiceRequest", resource["id"]).to_resource()
    assert again.serialize() == resource
    read = world.admin.get(f"/ServiceRequest/{resource['id']}")
    assert read.headers["etag"] == 'W/"1"' and read.json() == resource


def test_order_with_accession_number_and_conditional_create(world: World) -> None:
    body = _order(
        world.betty,
        identifier=[{"type": {"coding": [ACSN]}, "system": "urn:ehr:acc", "value": "EHR-0001"}],
        occurrencePeriod={"start": "2026-12-10"},
        code={"coding": [{"system": LOINC, "code": "24590-2"}]},  # MR Brain in the price list
    )
    created = world.admin.post("/ServiceRequest", json=body, headers=JSON)
    assert created.status_code == 201, created.text
    resource = created.json()
    assert created.headers["location"].endswith(f"/ServiceRequest/{resource['id']}/_history/1")
    assert _accession(resource)["value"] == "EHR-0001"
    assert _accession(resource)["system"] == "urn:ehr:acc"
    row = _order_row(world.server, resource["id"])
    assert (row.accession_number, row.issuer_of_accession_number) == ("EHR-0001", "urn:ehr:acc")
    assert row.modality == "MR"  # from the price list's row of the ordered code
    assert (row.scheduled_start_date, row.scheduled_start_time) == ("20261210", None)

    # The same accession number again: a conflict, nothing stored.
    before = len(_rows(world.server, ImagingOrder))
    _outcome(world.admin.post("/ServiceRequest", json=body, headers=JSON), 409, "duplicate")
    assert len(_rows(world.server, ImagingOrder)) == before
    # If-None-Exist finds the order instead of creating another (http.html#ccreate).
    found = world.admin.post(
        "/ServiceRequest",
        json=body,
        headers={**JSON, "If-None-Exist": "identifier=urn:ehr:acc|EHR-0001"},
    )
    assert found.status_code == 200 and found.json()["id"] == resource["id"], found.text
    assert len(_rows(world.server, ImagingOrder)) == before
    # Two matches: 412.
    _outcome(
        world.admin.post(
            "/ServiceRequest",
            json=_order(world.betty),
            headers={**JSON, "If-None-Exist": "status=active"},
        ),
        412,
        "conflict",
    )


def test_concurrent_orders_get_distinct_accession_numbers(world: World) -> None:
    def post(n: int) -> str:
        answer = world.admin.post(
            "/ServiceRequest",
            json=_order(world.betty, status="draft", note=[{"text": f"concurrent {n}"}]),
            headers=JSON,
        )
        assert answer.status_code == 201, answer.text
        return str(_accession(answer.json())["value"])

    with ThreadPoolExecutor(6) as pool:
        numbers = list(pool.map(post, range(12)))
    assert len(set(numbers)) == 12, numbers


def test_an_assigned_number_the_ehr_took_already_is_skipped(world: World) -> None:
    """The number pacsbridge would assign next is an EHR's Accession Number already: the
    unique constraint refuses it and another is assigned (in a savepoint of the same
    transaction)."""
    with closing(world.server.archive()) as archive, archive.db.session() as session:
        newest = session.scalar(select(ImagingOrder.id).order_by(ImagingOrder.id.desc()).limit(1))
    taken = "PB" + ordering.base36((newest or 0) + 2).rjust(6, "0")
    ehr = world.admin.post(
        "/ServiceRequest",
        json=_order(world.alice, identifier=[{"type": {"coding": [ACSN]}, "value": taken}]),
        headers=JSON,
    )
    assert ehr.status_code == 201, ehr.text
    ours = world.admin.post("/ServiceRequest", json=_order(world.alice), headers=JSON)
    assert ours.status_code == 201, ours.text
    assigned = _accession(ours.json())["value"]
    assert int(ours.json()["id"]) == (newest or 0) + 2
    assert assigned != taken and assigned.startswith(taken) and len(assigned) <= 16
    row = _order_row(world.server, ours.json()["id"])
    assert row.accession_number == assigned and row.version == 1
    assert [e.type for e in _events(world.server, ours.json()["id"])] == ["order.scheduled"]


# --- search -------------------------------------------------------------------------------------


def test_search_by_each_parameter(world: World) -> None:
    admin = world.admin
    made = []
    for patient, code, modality, when, priority, ae in (
        (world.alice, "24627-2", "CT", "2027-03-01T08:00:00+01:00", "stat", "CT_A"),
        (world.alice, "36643-5", "DX", "2027-03-02T14:00:00+01:00", "routine", "DX_A"),
        (world.betty, "24627-2", "CT", "2027-03-03T08:00:00+01:00", "routine", "CT_B"),
    ):
        answer = admin.post(
            "/ServiceRequest",
            json=_order(
                patient,
                code={"coding": [{"system": LOINC, "code": code}]},
                performerType={"coding": [{"system": DCM, "code": modality}]},
                occurrenceDateTime=when,
                priority=priority,
                requester={"reference": f"Practitioner/{ae}"},
                performer=[{"identifier": {"system": AE_SYSTEM, "value": ae}}],
            ),
            headers=JSON,
        )
        assert answer.status_code == 201, answer.text
        made.append(answer.json())
    one, two, three = (r["id"] for r in made)
    mine = {one, two, three}

    def found(**params: str) -> set[str]:
        response = admin.get("/ServiceRequest", params={**params, "_count": "100"}, headers=STRICT)
        assert response.status_code == 200, response.text
        return _ids(response.json()) & mine

    assert found(_id=one) == {one}
    assert found(patient=f"Patient/{world.alice}") == {one, two}
    assert found(subject=world.betty) == {three}
    assert found(**{"patient.identifier": f"{PATIENT_SYSTEM}|ORD-B"}) == {three}
    assert found(**{"subject:Patient.family": "alp"}) == {one, two}
    assert found(code=f"{LOINC}|24627-2") == {one, three}
    assert found(code="36643-5") == {two}
    assert found(code="http://snomed.info/sct|24627-2") == set()
    assert found(**{"performer-type": f"{DCM}|CT"}) == {one, three}
    assert found(**{"performer-type": "DX"}) == {two}
    assert found(priority="stat") == {one}
    assert found(requester="Practitioner/DX_A") == {two}
    assert found(occurrence="2027-03-02") == {two}
    assert found(occurrence="ge2027-03-02T00:00:00+01:00") == {two, three}
    assert found(occurrence="lt2027-03-02") == {one}
    assert found(occurrence="le2027-03-02T13:00:00Z") == {one, two}
    # Without a zone: a time in the zone of the DICOM values (Berlin, +01:00 in March).
    assert found(occurrence="lt2027-03-02T14:00") == {one}
    assert found(occurrence="ge2027-03-02T14:00") == {two, three}
    assert found(status="active", intent="order") == mine
    assert found(status="revoked") == set()
    accession = _accession(made[1])["value"]
    assert found(identifier=accession) == {two}
    assert found(identifier=f"urn:pacsbridge:accession|{accession}") == {two}
    assert found(identifier=f"urn:other|{accession}") == set()
    uid = _identifier(made[2], "urn:dicom:uid")
    assert found(identifier=f"urn:dicom:uid|{uid}") == {three}
    rp = _identifier(made[0], "urn:pacsbridge:requested-procedure")
    assert found(identifier=f"urn:pacsbridge:requested-procedure|{rp}") == {one}
    assert found(_lastUpdated=f"ge{made[0]['meta']['lastUpdated']}") == mine
    # Sorted by the scheduled start, newest first, and the patient included.
    response = admin.get(
        "/ServiceRequest",
        params={
            "_id": f"{one},{two},{three}",
            "_sort": "-occurrence",
            "_include": "ServiceRequest:patient",
        },
    )
    bundle = response.json()
    matches = [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert matches == [three, two, one]
    included = {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"}
    assert included == {world.alice, world.betty}


# --- update, cancel, delete ---------------------------------------------------------------------


def test_update_versions_and_cancel(world: World) -> None:
    admin = world.admin
    created = admin.post("/ServiceRequest", json=_order(world.alice), headers=JSON).json()
    resource_id = created["id"]
    changed = {**created, "status": "on-hold", "priority": "asap"}
    changed.pop("meta")
    # The identifiers pacsbridge owns may be left out: they stay.
    changed["identifier"] = []
    _outcome(
        admin.put(
            f"/ServiceRequest/{resource_id}", json=changed, headers={**JSON, "If-Match": 'W/"9"'}
        ),
        412,
        "conflict",
    )
    updated = admin.put(
        f"/ServiceRequest/{resource_id}", json=changed, headers={**JSON, "If-Match": 'W/"1"'}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2"
    assert updated.json()["identifier"] == created["identifier"]
    row = _order_row(world.server, resource_id)
    assert (row.status, row.priority, row.version, row.step_status) == (
        "on-hold",
        "asap",
        2,
        "SCHEDULED",
    )
    assert row.status in ON_WORKLIST
    # The patient and the accession number never change.
    _outcome(
        admin.put(
            f"/ServiceRequest/{resource_id}",
            json={**changed, "subject": {"reference": f"Patient/{world.betty}"}},
            headers=JSON,
        ),
        422,
        "business-rule",
        "ServiceRequest.subject",
    )
    _outcome(
        admin.put(
            f"/ServiceRequest/{resource_id}",
            json={**changed, "identifier": [{"type": {"coding": [ACSN]}, "value": "OTHER-1"}]},
            headers=JSON,
        ),
        422,
        "business-rule",
        "ServiceRequest.identifier",
    )
    # Cancelled: revoked, the step discontinued, off the worklist.
    revoked = admin.put(
        f"/ServiceRequest/{resource_id}", json={**changed, "status": "revoked"}, headers=JSON
    )
    assert revoked.status_code == 200, revoked.text
    row = _order_row(world.server, resource_id)
    assert (row.status, row.step_status, row.version) == ("revoked", "DISCONTINUED", 3)
    assert row.status not in ON_WORKLIST
    _outcome(
        admin.put(f"/ServiceRequest/{resource_id}", json=changed, headers=JSON),
        422,
        "business-rule",
        "ServiceRequest.status",
    )
    assert [e.type for e in _events(world.server, resource_id)] == [
        "order.scheduled",
        "order.updated",
        "order.cancelled",
    ]
    assert [a.action for a in _audits(world.server, resource_id)] == ["C", "U", "U"]
    # Every version: vread and _history.
    history = admin.get(f"/ServiceRequest/{resource_id}/_history").json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["revoked", "on-hold", "active"]
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["3", "2", "1"]
    first = admin.get(f"/ServiceRequest/{resource_id}/_history/1").json()
    assert first["status"] == "active" and first == created
    _outcome(admin.get(f"/ServiceRequest/{resource_id}/_history/7"), 404, "not-found")


def test_history_of_every_order(world: World) -> None:
    """Type-level history: every version of every order written since ``_since``, newest
    first, in pages."""
    admin = world.admin
    since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    time.sleep(0.01)
    first = admin.post("/ServiceRequest", json=_order(world.alice), headers=JSON).json()
    second = admin.post("/ServiceRequest", json=_order(world.betty), headers=JSON).json()
    held = admin.put(
        f"/ServiceRequest/{first['id']}", json={**first, "status": "on-hold"}, headers=JSON
    )
    assert held.status_code == 200, held.text
    history = admin.get("/ServiceRequest/_history", params={"_since": since}).json()
    assert history["type"] == "history" and history["total"] == 3
    assert [
        (e["resource"]["id"], e["resource"]["meta"]["versionId"], e["resource"]["status"])
        for e in history["entry"]
    ] == [
        (first["id"], "2", "on-hold"),
        (second["id"], "1", "active"),
        (first["id"], "1", "active"),
    ]
    assert history["entry"][2]["resource"] == first
    page = admin.get("/ServiceRequest/_history", params={"_since": since, "_count": "2"}).json()
    assert [e["resource"]["meta"]["versionId"] for e in page["entry"]] == ["2", "1"]
    following = next(link["url"] for link in page["link"] if link["relation"] == "next")
    rest = admin.get(following).json()
    assert [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in rest["entry"]] == [
        (first["id"], "1")
    ]


def test_delete_revokes_the_order(world: World) -> None:
    admin = world.admin
    created = admin.post("/ServiceRequest", json=_order(world.betty), headers=JSON).json()
    resource_id = created["id"]
    deleted = admin.delete(f"/ServiceRequest/{resource_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["resourceType"] == "OperationOutcome"
    assert deleted.headers["etag"] == 'W/"2"'
    row = _order_row(world.server, resource_id)
    assert (row.status, row.step_status, row.version) == ("revoked", "DISCONTINUED", 2)
    # The order stays readable as revoked, with every version.
    read = admin.get(f"/ServiceRequest/{resource_id}").json()
    assert read["status"] == "revoked" and read["meta"]["versionId"] == "2"
    assert read["identifier"] == created["identifier"]
    # A second delete changes nothing.
    assert admin.delete(f"/ServiceRequest/{resource_id}").status_code == 200
    assert _order_row(world.server, resource_id).version == 2
    assert [e.type for e in _events(world.server, resource_id)] == [
        "order.scheduled",
        "order.cancelled",
    ]
    # One event per request: the create, the delete, and the second delete (which changed
    # nothing, recorded as a request).
    assert [a.action for a in _audits(world.server, resource_id)] == ["C", "D", "D"]
    _outcome(admin.delete("/ServiceRequest/999999"), 404, "not-found")


# --- what the modality's side does: transition and find_order -----------------------------------


def test_transition_and_find_order(world: World) -> None:
    created = world.admin.post("/ServiceRequest", json=_order(world.alice), headers=JSON).json()
    row = _order_row(world.server, created["id"])
    with closing(world.server.archive()) as archive, archive.db.write_connection() as conn:
        found = ordering.find_order(conn, accession_number=row.accession_number)
        assert found is not None and found.id == row.id
        found = ordering.find_order(conn, requested_procedure_id=row.requested_procedure_id)
        assert found is not None and found.id == row.id
        found = ordering.find_order(conn, study_instance_uid=row.study_instance_uid)
        assert found is not None and found.id == row.id
        assert ordering.find_order(conn, accession_number="NO-SUCH") is None
        ordering.transition(conn, row.id, step_status="STARTED", event="order.in-progress")
        ordering.transition(
            conn,
            row.id,
            status="completed",
            step_status="COMPLETED",
            event="order.completed",
            study_instance_uid="1.2.826.0.1.3680043.10.1506.99.1",
        )
    after = _order_row(world.server, created["id"])
    assert (after.status, after.step_status, after.version) == ("completed", "COMPLETED", 3)
    assert after.study_instance_uid == "1.2.826.0.1.3680043.10.1506.99.1"
    read = world.admin.get(f"/ServiceRequest/{created['id']}").json()
    assert read["status"] == "completed" and read["meta"]["versionId"] == "3"
    assert _identifier(read, "urn:dicom:uid") == "urn:oid:1.2.826.0.1.3680043.10.1506.99.1"
    events = _events(world.server, created["id"])
    assert [(e.type, e.data["status"], e.data["step_status"]) for e in events] == [
        ("order.scheduled", "active", "SCHEDULED"),
        ("order.in-progress", "active", "STARTED"),
        ("order.completed", "completed", "COMPLETED"),
    ]
    assert events[-1].study_instance_uid == "1.2.826.0.1.3680043.10.1506.99.1"
    # A completed order is final: no update moves it, no delete revokes it.
    again = {k: v for k, v in read.items() if k != "meta"}
    _outcome(
        world.admin.put(
            f"/ServiceRequest/{created['id']}", json={**again, "status": "active"}, headers=JSON
        ),
        422,
        "business-rule",
    )
    _outcome(world.admin.delete(f"/ServiceRequest/{created['id']}"), 409, "business-rule")


# --- refusals -----------------------------------------------------------------------------------


def test_invalid_orders_are_refused(world: World) -> None:
    admin = world.admin
    before = len(_rows(world.server, ImagingOrder))

    def refused(body: dict[str, Any], status: int, code: str, where: str | None) -> None:
        _outcome(admin.post("/ServiceRequest", json=body, headers=JSON), status, code, where)

    refused(_order(world.alice, intent="plan"), 422, "business-rule", "ServiceRequest.intent")
    refused(_order(world.alice, status="completed"), 422, "business-rule", "ServiceRequest.status")
    refused(_order("999999"), 422, "not-found", "ServiceRequest.subject")
    refused(
        _order(world.alice, subject={"reference": "Group/1"}),
        422,
        "not-found",
        "ServiceRequest.subject",
    )
    no_code = _order(world.alice)
    no_code.pop("code")
    refused(no_code, 422, "required", "ServiceRequest.code")
    refused(
        _order(world.alice, performerType={"coding": [{"system": DCM, "code": "ct scanner"}]}),
        422,
        "value",
        "ServiceRequest.performerType",
    )
    refused(
        _order(world.alice, performerType={"coding": [{"system": "urn:x", "code": "CT"}]}),
        422,
        "code-invalid",
        "ServiceRequest.performerType",
    )
    refused(
        _order(
            world.alice,
            performer=[{"identifier": {"system": AE_SYSTEM, "value": "A_TITLE_LONGER_THAN_16"}}],
        ),
        422,
        "value",
        "ServiceRequest.performer[0].identifier",
    )
    refused(
        _order(world.alice, identifier=[{"type": {"coding": [ACSN]}, "value": "X" * 17}]),
        422,
        "value",
        "ServiceRequest.identifier[0]",
    )
    refused(
        _order(world.alice, identifier=[{"system": "urn:dicom:uid", "value": "urn:oid:1.2.x"}]),
        422,
        "value",
        "ServiceRequest.identifier[0]",
    )
    refused(_order(world.alice, status="bogus"), 422, "business-rule", "ServiceRequest.status")
    refused({**_order(world.alice), "colour": "blue"}, 400, "structure", None)
    assert len(_rows(world.server, ImagingOrder)) == before
    _outcome(admin.get("/ServiceRequest/424242"), 404, "not-found")
    _outcome(
        admin.put(
            "/ServiceRequest/424242", json={**_order(world.alice), "id": "424242"}, headers=JSON
        ),
        405,
        "not-supported",
    )


# --- security -----------------------------------------------------------------------------------


def _client(world: World, who: str, validator: FHIRValidator) -> httpx.Client:
    return validator.httpx_client(
        f"{world.server.http}/fhir", headers={"Authorization": f"Bearer {world.tokens[who]}"}
    )


def test_scopes_roles_and_the_patient_compartment(world: World, validator: FHIRValidator) -> None:
    of_alice = world.admin.post("/ServiceRequest", json=_order(world.alice), headers=JSON).json()
    of_betty = world.admin.post("/ServiceRequest", json=_order(world.betty), headers=JSON).json()
    all_alice = {
        e["resource"]["id"]
        for e in world.admin.get(
            "/ServiceRequest", params={"patient": world.alice, "_count": "500"}
        ).json()["entry"]
    }
    with _client(world, "portal-a", validator) as portal:
        # Held to Alice's compartment: her orders, none of Betty's, whatever the search.
        seen = _ids(portal.get("/ServiceRequest", params={"_count": "500"}).json())
        assert seen == all_alice and of_alice["id"] in seen
        assert _ids(portal.get("/ServiceRequest", params={"_id": of_betty["id"]}).json()) == set()
        by_patient = portal.get("/ServiceRequest", params={"patient": world.betty}).json()
        assert _ids(by_patient) == set()
        _outcome(portal.get(f"/ServiceRequest/{of_betty['id']}"), 404, "not-found")
        _outcome(portal.get(f"/ServiceRequest/{of_betty['id']}/_history"), 404, "not-found")
        # Every order's history is not a compartment's.
        _outcome(portal.get("/ServiceRequest/_history"), 403, "forbidden")
        assert portal.get(f"/ServiceRequest/{of_alice['id']}").status_code == 200
        # patient/ scopes grant no writes.
        assert (
            portal.post("/ServiceRequest", json=_order(world.alice), headers=JSON).status_code
            == 403
        )
        assert portal.delete(f"/ServiceRequest/{of_alice['id']}").status_code == 403
    with _client(world, "viewer", validator) as viewer:  # system/ServiceRequest.rs
        assert viewer.get(f"/ServiceRequest/{of_betty['id']}").status_code == 200
        assert (
            viewer.post("/ServiceRequest", json=_order(world.alice), headers=JSON).status_code
            == 403
        )
        assert viewer.get(f"/Patient/{world.alice}").status_code == 403  # no scope on Patient
    with _client(world, "ris", validator) as ris:  # system/ServiceRequest.cruds
        made = ris.post("/ServiceRequest", json=_order(world.alice), headers=JSON)
        assert made.status_code == 201, made.text
        (audit,) = _audits(world.server, made.json()["id"])
        assert audit.agent == "client:ris" and audit.action == "C"
    with _client(world, "doctor", validator) as doctor:  # role clinician: reads only
        assert doctor.get(f"/ServiceRequest/{of_betty['id']}").status_code == 200
        assert (
            doctor.post("/ServiceRequest", json=_order(world.alice), headers=JSON).status_code
            == 403
        )
    anonymous = httpx.post(f"{world.server.http}/fhir/ServiceRequest", json=_order(world.alice))
    assert anonymous.status_code == 401


# --- the CapabilityStatement is exact for ServiceRequest ----------------------------------------


def test_capability_statement_entry_works(world: World) -> None:
    statement = world.admin.get("/metadata").json()
    (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "ServiceRequest"]
    declared = {i["code"] for i in entry["interaction"]}
    assert declared == {
        "read",
        "vread",
        "search-type",
        "create",
        "update",
        "delete",
        "history-instance",
        "history-type",
    }
    assert entry["conditionalCreate"] is True
    names = {p["name"] for p in entry["searchParam"]}
    assert {
        "_id",
        "_lastUpdated",
        "patient",
        "subject",
        "status",
        "intent",
        "code",
        "identifier",
        "occurrence",
        "performer-type",
        "priority",
        "requester",
    } <= names
    samples = {
        "token": "x",
        "date": "ge2000-01-01",
        "reference": "Patient/1",
    }
    for param in entry["searchParam"]:
        value = samples[param["type"]]
        if param["name"] == "requester":
            value = "Practitioner/1"
        answer = world.admin.get("/ServiceRequest", params={param["name"]: value}, headers=STRICT)
        assert answer.status_code == 200, (param, answer.text)
    for value in entry["searchInclude"]:
        answer = world.admin.get("/ServiceRequest", params={"_include": value}, headers=STRICT)
        assert answer.status_code == 200, answer.text
    assert world.admin.get("/ServiceRequest/_history", headers=STRICT).status_code == 200
