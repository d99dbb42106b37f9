"""The audit trail (issue 15, item 5): every access to PHI recorded once, readable as FHIR
AuditEvent by ``admin`` only, never changed, exported as IHE ATNA syslog."""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.routing import iter_route_contexts
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError

from ai.registry import ModelRegistry
from ai.runs import RunStore, execute_run, plan_study
from archive import Archive
from archive.audit import AuditEvent, AuditEventRow, AuditExportRow, record
from archive.db import current_snapshot
from archive.jobs import JobRecord, JobStatus, PermanentJobError
from archive.models import AIRun
from billing.capture import list_charges
from billing.invoices import create_invoice, issue_invoice
from billing.prices import load_price_list, store_price_list
from config import Settings
from config.settings import AISettings, AuditSettings
from fhir_bridge.router import _CREATES, _OPERATIONS, _UPDATES
from pacsbridge import atna
from pacsbridge.ai_jobs import _build_run, model_registry
from pacsbridge.app import create_app
from pacsbridge.atna import AtnaExporter, SyslogSender
from security.accounts import add_user
from tests.ai_data import SeriesSpec, grid_affine, series_datasets
from tests.ai_data import part10 as ai_part10
from tests.conftest import Backend, RunningServer, _backend, free_port, start_server
from tests.dicom_factory import ct_slice
from tests.fhir_support import FHIRValidator
from tests.test_ai import phantom_hu, phantom_series
from tests.test_billing_capture import SAMPLE as SAMPLE_PRICES
from tests.test_billing_capture import run_cli
from tests.test_billing_invoices import two_charges

PASSWORD = "audit day password 42"
ROLES = ("admin", "clinician", "radiologist", "billing")
WRONG = "not-the-password-7341"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"


#: The day's studies: a Wednesday morning (in force for the sample price list, no surcharge).
STUDY_DATE = "20260304"


def _dataset(study: str, series: str, index: int, patient: str) -> Dataset:
    return ct_slice(
        study_uid=study,
        series_uid=series,
        index=index,
        patient_id=patient,
        size=16,
        study_date=STUDY_DATE,
    )


def _body_series(like: Dataset) -> list[Dataset]:
    """A small CT series of ``like``'s study that the builtin ``ct-body`` model selects (CT,
    at least 10 slices): 12 slices of 32 x 32 through a water ellipsoid with a bone sphere."""
    spacing = (12.0, 6.5, 6.5)
    shape = (12, 32, 32)
    first = -np.array([(n - 1) * d for n, d in zip(shape[::-1], spacing[::-1], strict=True)]) / 2
    affine = grid_affine((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), first, spacing)
    k, i, j = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    points = np.einsum("ab,bijk->ijka", affine[:3, :3], np.stack([k, i, j]).astype(float))
    points += affine[:3, 3]
    series = series_datasets(
        phantom_hu(points).astype(np.float32),
        affine,
        SeriesSpec(
            modality="CT",
            patient_id=str(like.PatientID),
            patient_name=str(like.PatientName),
            study_uid=str(like.StudyInstanceUID),
            series_description="body 12 mm",
            series_number=2,
        ),
        rescale=(1.0, -1024.0),
    )
    for ds in series:  # the study's attributes, as the modality sends them with each series
        for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "StudyDescription"):
            setattr(ds, keyword, like.get(keyword))
        ds.ReferringPhysicianName = like.ReferringPhysicianName
    return series


# --- the scripted day --------------------------------------------------------------------------


@dataclass
class Day:
    server: RunningServer
    tokens: dict[str, str]
    study_a: str
    study_b: str
    series_a: str
    sop_a: str
    patient: str
    """Patient A's reference (``Patient/<id>``)."""
    collector: _Collector
    """The syslog collector the server exports to."""
    ai_run: int
    """The ``ct-body`` run on study A."""
    charges: dict[str, int]
    """Study A's charges captured by the ``charge-capture`` job, by kind."""
    invoice: int
    """The invoice of study A's charges, issued."""
    reconciliation: int
    """The PaymentReconciliation that paid it."""


class _MoveDestination:
    """A Storage SCP (pynetdicom) that C-MOVE sends to."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        ae = AE(ae_title="VIEWER")
        ae.supported_contexts = StoragePresentationContexts
        self.ae = ae

        def stored(event: Any) -> int:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, stored)]
        )
        assert server is not None
        self.server = server

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Day]:
    """`pacsbridge serve` with auth required, then a day of work on it."""
    workdir = tmp_path_factory.mktemp("audit")

    class _Request:
        def getfixturevalue(self, name: str) -> Any:
            raise AssertionError(name)

    destination = _MoveDestination()
    collector = _Collector()
    peers = {
        "modality": {"ae_title": "MODALITY", "host": "127.0.0.1", "port": 104},
        "viewer": {"ae_title": "VIEWER", "host": "127.0.0.1", "port": destination.port},
    }
    backend: Backend = _backend(
        "sqlite",
        "file",
        workdir,
        _Request(),  # type: ignore[arg-type]
        peers=peers,
    )
    with closing(Archive(backend.settings)) as archive:
        for role in ROLES:
            add_user(archive, f"user-{role}", role, PASSWORD)
        prices = load_price_list(SAMPLE_PRICES)
        store_price_list(archive, prices, "sample", prices.sha256, loaded_by="test")
    server = start_server(
        backend,
        workdir,
        PACSBRIDGE_AUTH="required",
        # No model runs by itself on stable studies; ct-body runs when the admin asks.
        PACSBRIDGE_AI=json.dumps({"enabled": False, "models": {"brain-mr": {"enabled": False}}}),
        # Charge capture on each stable study, by the worker of `serve`.
        PACSBRIDGE_BILLING=json.dumps({"enabled": True}),
        PACSBRIDGE_STABLE_AGE="1",
        PACSBRIDGE_STABLE_SCAN_INTERVAL="0.2",
        PACSBRIDGE_WORKER_POLL_INTERVAL="0.1",
        PACSBRIDGE_DIMSE_PROCESSES="1",
        PACSBRIDGE_AUDIT=json.dumps({"syslog_url": f"tcp://127.0.0.1:{collector.port}"}),
    )
    try:
        tokens = {}
        for role in ROLES:
            answer = httpx.post(
                f"{server.http}/auth/token",
                data={"grant_type": "password", "username": f"user-{role}", "password": PASSWORD},
            )
            assert answer.status_code == 200, answer.text
            tokens[role] = answer.json()["access_token"]
        yield _work(server, tokens, destination, collector)
    finally:
        server.stop()
        destination.stop()
        collector.close()


def _work(
    server: RunningServer,
    tokens: dict[str, str],
    destination: _MoveDestination,
    collector: _Collector,
) -> Day:
    study_a, study_b, series_a, series_b = (generate_uid() for _ in range(4))
    slices = [_dataset(study_a, series_a, i, "AUDIT-A") for i in range(3)]
    body = _body_series(slices[0])
    # C-STORE: two series of study A (3 + 12 instances) and one instance of study B on one
    # association.
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(slices[0].SOPClassUID, slices[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    for ds in [*slices, *body, _dataset(study_b, series_b, 0, "AUDIT-B")]:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    # C-FIND (one match) and C-MOVE of study A to the viewer.
    viewer = AE(ae_title="VIEWER")
    viewer.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    viewer.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = viewer.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "AUDIT-A"
    query.StudyInstanceUID = ""
    found = [
        ident
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        if status.Status in (0xFF00, 0xFF01)
    ]
    assert [str(f.StudyInstanceUID) for f in found if f is not None] == [study_a]
    move = Dataset()
    move.QueryRetrieveLevel = "STUDY"
    move.StudyInstanceUID = study_a
    statuses = [
        status.Status
        for status, _ in assoc.send_c_move(
            move, "VIEWER", StudyRootQueryRetrieveInformationModelMove
        )
    ]
    assert statuses[-1] == 0x0000, statuses
    assoc.release()
    assert sorted(destination.received) == sorted(str(s.SOPInstanceUID) for s in slices + body)

    def get(role: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(
            f"{server.http}{path}", headers={"Authorization": f"Bearer {tokens[role]}"}, **kw
        )

    # WADO-RS: the study's metadata, then one instance.
    sop_a = str(slices[0].SOPInstanceUID)
    assert get("clinician", f"/dicom-web/studies/{study_a}/metadata").status_code == 200
    instance = get(
        "clinician",
        f"/dicom-web/studies/{study_a}/series/{series_a}/instances/{sop_a}",
        params=None,
    )
    assert instance.status_code == 200
    # STOW-RS: the radiologist adds an instance to study A.
    part = io.BytesIO()
    _dataset(study_a, series_a, 7, "AUDIT-A").save_as(part, enforce_file_format=True)
    boundary = "audit-day-boundary"
    stowed = httpx.post(
        f"{server.http}/dicom-web/studies",
        content=(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + part.getvalue()
            + f"\r\n--{boundary}--\r\n".encode()
        ),
        headers={
            "Authorization": f"Bearer {tokens['radiologist']}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    assert stowed.status_code == 200, stowed.text
    # FHIR: the clinician reads the study and searches the patient's studies.
    study = get("clinician", f"/fhir/ImagingStudy/{study_a}")
    assert study.status_code == 200, study.text
    patient_ref = study.json()["subject"]["reference"]
    searched = get("clinician", "/fhir/ImagingStudy", params={"patient": patient_ref})
    assert searched.json()["total"] == 1
    # The radiologist writes a report.
    report = httpx.post(
        f"{server.http}/fhir/DiagnosticReport",
        json={
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
            "subject": {"reference": patient_ref},
            "imagingStudy": [{"reference": f"ImagingStudy/{study_a}"}],
            "conclusion": "No acute finding.",
            "resultsInterpreter": [{"display": "Smith, Jane"}],
        },
        headers={**FHIR_JSON, "Authorization": f"Bearer {tokens['radiologist']}"},
    )
    assert report.status_code == 201, report.text
    # A failed login, and the clinician trying to read the audit trail.
    failed = httpx.post(
        f"{server.http}/auth/token",
        data={"grant_type": "password", "username": "user-clinician", "password": WRONG},
    )
    assert failed.status_code in (400, 401)
    assert get("clinician", "/fhir/AuditEvent").status_code == 403
    ai_run = _ai_run(server, tokens, study_a, str(body[0].SeriesInstanceUID))
    charges = _captured(server, study_a)
    invoice, reconciliation = _invoice_and_payment(server, tokens, patient_ref, charges)
    return Day(
        server,
        tokens,
        study_a,
        study_b,
        series_a,
        sop_a,
        patient_ref,
        collector,
        ai_run,
        charges,
        invoice,
        reconciliation,
    )


def _wait(what: Any, timeout: float = 60) -> Any:
    """``what()`` once it is true (checked every 0.2 s), else fail."""
    for _ in range(int(timeout / 0.2)):
        found = what()
        if found:
            return found
        threading.Event().wait(0.2)
    raise AssertionError(f"not reached within {timeout} s: {what}")


def _ai_run(server: RunningServer, tokens: dict[str, str], study: str, series: str) -> int:
    """The admin runs ct-body on study A; the worker of `serve` stores its SEG and SR."""
    asked = httpx.post(
        f"{server.http}/api/ai/runs",
        json={"study_instance_uid": study, "model": "ct-body"},
        headers={"Authorization": f"Bearer {tokens['admin']}"},
    )
    assert asked.status_code == 202, asked.text
    (queued,) = asked.json()  # the body series only: the 4-slice series is under min_slices
    assert (queued["model"], queued["study"], queued["series"]) == ("ct-body", study, series)
    # Read from the index, not over the API: the test's polling is no part of the day.
    with closing(server.archive()) as archive:
        store = RunStore(archive)
        run = _wait(
            lambda: (
                (r := store.get(queued["id"])) is not None and r.status in ("done", "failed") and r
            )
        )
    assert run.status == "done", run.error
    assert sorted(p["modality"] for p in run.result["produced"]) == ["SEG", "SR"]
    assert {p["outcome"] for p in run.result["produced"]} == {"stored"}
    return int(run.id)


def _captured(server: RunningServer, study: str) -> dict[str, int]:
    """Study A's technical charge (the study performed) and professional charge (its signed
    report), captured by the ``charge-capture`` job once the study is stable."""

    def billable() -> dict[str, int] | None:
        with closing(server.archive()) as archive:
            charges = list_charges(archive, study=study)
        found = {c.kind: c.id for c in charges if c.status == "billable"}
        return found if len(charges) == 2 and len(found) == 2 else None

    charges: dict[str, int] = _wait(billable)
    assert set(charges) == {"technical", "professional"}
    return charges


def _invoice_and_payment(
    server: RunningServer, tokens: dict[str, str], patient: str, charges: dict[str, int]
) -> tuple[int, int]:
    """The billing office finds the patient's charges, invoices them (created issued) and
    records the payment of the whole invoice (FHIR PaymentReconciliation)."""
    billing = httpx.Client(
        base_url=f"{server.http}/fhir",
        headers={**FHIR_JSON, "Authorization": f"Bearer {tokens['billing']}"},
        timeout=30,
    )
    with billing:
        found = billing.get("/ChargeItem", params={"patient": patient})
        assert found.status_code == 200, found.text
        assert sorted(int(e["resource"]["id"]) for e in found.json()["entry"]) == sorted(
            charges.values()
        )
        created = billing.post(
            "/Invoice",
            json={
                "resourceType": "Invoice",
                "status": "issued",
                "lineItem": [
                    {"chargeItemReference": {"reference": f"ChargeItem/{charges[kind]}"}}
                    for kind in ("technical", "professional")
                ],
            },
        )
        assert created.status_code == 201, created.text
        invoice = created.json()
        assert invoice["status"] == "issued"
        gross = invoice["totalGross"]
        today = datetime.now(UTC)
        paid = billing.post(
            "/PaymentReconciliation",
            json={
                "resourceType": "PaymentReconciliation",
                "status": "active",
                "created": today.isoformat(timespec="seconds"),
                "paymentDate": today.date().isoformat(),
                "paymentAmount": gross,
                "detail": [
                    {
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/payment-type",
                                    "code": "payment",
                                }
                            ]
                        },
                        "request": {"reference": f"Invoice/{invoice['id']}"},
                        "amount": gross,
                    }
                ],
            },
        )
        assert paid.status_code == 201, paid.text
        assert billing.get(f"/Invoice/{invoice['id']}").json()["status"] == "balanced"
    return int(invoice["id"]), int(paid.json()["id"])


def _admin(day: Day, validator: FHIRValidator) -> httpx.Client:
    return httpx.Client(
        base_url=f"{day.server.http}/fhir",
        headers={"Authorization": f"Bearer {day.tokens['admin']}"},
        event_hooks={"response": [lambda r: (r.read(), validator.httpx_hook()(r))]},
        timeout=30,
    )


def _all(client: httpx.Client, params: dict[str, str]) -> list[dict[str, Any]]:
    """Every match, following the next links."""
    out: list[dict[str, Any]] = []
    answer = client.get("/AuditEvent", params=params)
    while True:
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        out += [e["resource"] for e in bundle.get("entry", [])]
        following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not following:
            return out
        answer = client.get(following[0])


def _shape(event: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return (
        event["type"]["code"],
        event["action"],
        event["agent"][0]["who"]["identifier"]["value"],
        event["source"]["site"],
        event["outcome"],
    )


def _patient_of(event: dict[str, Any]) -> str | None:
    for entity in event.get("entity", []):
        if entity.get("role", {}).get("code") == "1":
            return str(entity["what"]["identifier"]["value"])
    return None


def _study_of(event: dict[str, Any]) -> str | None:
    for entity in event.get("entity", []):
        if entity.get("role", {}).get("code") == "3":
            return str(entity["what"]["reference"]).removeprefix("ImagingStudy/")
    return None


def _object_of(event: dict[str, Any]) -> str | None:
    """The resource or path the event is about (the entity that is neither patient, study
    nor query)."""
    for entity in event.get("entity", []):
        if "role" not in entity:
            what = entity["what"]
            return str(what.get("reference") or what.get("display"))
    return None


EXPECTED_FOR_A = Counter(
    {
        ("110104", "C", "ae:MODALITY", "dimse", "0"): 1,  # C-STORE: one per study, association
        ("110112", "E", "ae:VIEWER", "dimse", "0"): 1,  # C-FIND: one per query
        ("110104", "R", "ae:VIEWER", "dimse", "0"): 1,  # C-MOVE
        ("110103", "R", "user:user-clinician", "dicomweb", "0"): 1,  # WADO-RS metadata
        ("110104", "R", "user:user-clinician", "dicomweb", "0"): 1,  # WADO-RS instance
        ("110104", "C", "user:user-radiologist", "dicomweb", "0"): 1,  # STOW-RS
        ("110110", "R", "user:user-clinician", "fhir", "0"): 1,  # ImagingStudy read
        ("110112", "E", "user:user-clinician", "fhir", "0"): 1,  # ImagingStudy search
        ("110110", "C", "user:user-radiologist", "fhir", "0"): 1,  # DiagnosticReport create
        ("110100", "E", "user:user-admin", "admin", "0"): 1,  # POST /api/ai/runs
        ("110103", "C", "ai:ct-body", "jobs", "0"): 1,  # the run (ai-run job)
        ("110104", "C", "ai:ct-body", "jobs", "0"): 1,  # its SEG and SR stored
        ("110110", "C", "job:charge-capture", "jobs", "0"): 2,  # technical, professional
        ("110112", "E", "user:user-billing", "fhir", "0"): 1,  # ChargeItem search
        ("110110", "C", "user:user-billing", "fhir", "0"): 2,  # Invoice, PaymentReconciliation
        ("110110", "U", "user:user-billing", "fhir", "0"): 1,  # the Invoice issued
        ("110110", "R", "user:user-billing", "fhir", "0"): 1,  # the Invoice read, balanced
    }
)


@pytest.fixture(scope="module")
def validator() -> FHIRValidator:
    return FHIRValidator()


def _events_of_patient_a(client: httpx.Client, day: Day) -> tuple[str, list[dict[str, Any]]]:
    patient = day.patient
    # The reads are written by a background thread (a quarter second): wait for all of them.
    for _ in range(100):
        events = _all(client, {"patient": patient, "_count": "3"})
        if sum(Counter(_shape(e) for e in events).values()) >= sum(EXPECTED_FOR_A.values()):
            break
        threading.Event().wait(0.2)
    return patient, events


def test_a_day_yields_exactly_its_audit_events(day: Day, validator: FHIRValidator) -> None:
    with _admin(day, validator) as client:
        patient, events = _events_of_patient_a(client, day)
        assert Counter(_shape(e) for e in events) == EXPECTED_FOR_A
        for event in events:
            assert _patient_of(event) == "AUDIT-A", event
            if event["source"]["site"] == "jobs":  # no requestor on the network
                assert "network" not in event["agent"][0], event
            else:
                assert event["agent"][0]["network"]["address"] == "127.0.0.1"
            patient_entity = next(x for x in event["entity"] if x["role"]["code"] == "1")
            assert patient_entity["what"]["reference"] == patient
        studies = {_shape(e): _study_of(e) for e in events}
        assert studies[("110104", "C", "ae:MODALITY", "dimse", "0")] == day.study_a
        assert studies[("110104", "R", "ae:VIEWER", "dimse", "0")] == day.study_a
        assert studies[("110103", "R", "user:user-clinician", "dicomweb", "0")] == day.study_a
        assert studies[("110104", "C", "user:user-radiologist", "dicomweb", "0")] == day.study_a
        assert studies[("110110", "R", "user:user-clinician", "fhir", "0")] == day.study_a
        # The AI run: the admin's request, the run and the results it stored, on study A.
        run = f"/api/ai/runs/{day.ai_run}"
        for shape in [
            ("110100", "E", "user:user-admin", "admin", "0"),
            ("110103", "C", "ai:ct-body", "jobs", "0"),
            ("110104", "C", "ai:ct-body", "jobs", "0"),
        ]:
            assert studies[shape] == day.study_a, shape
        objects = Counter((_shape(e)[:3], _object_of(e)) for e in events)
        assert objects[(("110100", "E", "user:user-admin"), "/api/ai/runs")] == 1
        assert objects[(("110103", "C", "ai:ct-body"), run)] == 1
        assert objects[(("110104", "C", "ai:ct-body"), run)] == 1
        # The payment: the charges captured, the invoice created and issued, the payment.
        capture = ("110110", "C", "job:charge-capture")
        billing = ("110110", "C", "user:user-billing")
        assert {o for (shape, o) in objects if shape == capture} == {
            f"ChargeItem/{day.charges['technical']}",
            f"ChargeItem/{day.charges['professional']}",
        }
        for event in events:
            if _shape(event)[:3] == capture:
                assert _study_of(event) == day.study_a
        assert {o for (shape, o) in objects if shape == billing} == {
            f"Invoice/{day.invoice}",
            f"PaymentReconciliation/{day.reconciliation}",
        }
        assert objects[(("110110", "U", "user:user-billing"), f"Invoice/{day.invoice}")] == 1
        assert objects[(("110110", "R", "user:user-billing"), f"Invoice/{day.invoice}")] == 1
        assert objects[(("110112", "E", "user:user-billing"), "ChargeItem")] == 1
        # The C-FIND keeps its keys as the query (base64, PS3.15 A.5.3.12).
        (find,) = [e for e in events if _shape(e)[:4] == ("110112", "E", "ae:VIEWER", "dimse")]
        (query,) = [x for x in find["entity"] if x.get("role", {}).get("code") == "24"]
        keys = base64.b64decode(query["query"]).decode()
        assert "PatientID=AUDIT-A" in keys and "QueryRetrieveLevel=STUDY" in keys
        # The C-STORE association held two studies: one event each.
        stored = _all(client, {"agent": "ae:MODALITY"})
        assert sorted(_study_of(e) or "" for e in stored) == sorted([day.study_a, day.study_b])
        assert {_patient_of(e) for e in stored} == {"AUDIT-A", "AUDIT-B"}
        # Search by entity, action and date.
        by_study = _all(client, {"entity": f"ImagingStudy/{day.study_a}", "_count": "50"})
        assert {e["id"] for e in by_study} >= {
            e["id"] for e in events if _study_of(e) == day.study_a
        }
        assert all(_study_of(e) == day.study_a for e in by_study)
        writes = _all(client, {"patient": patient, "action": "C"})
        assert sorted(_shape(e)[2] for e in writes) == [
            "ae:MODALITY",
            "ai:ct-body",
            "ai:ct-body",
            "job:charge-capture",
            "job:charge-capture",
            "user:user-billing",
            "user:user-billing",
            "user:user-radiologist",
            "user:user-radiologist",
        ]
        today = datetime.now(UTC).date().isoformat()
        assert len(_all(client, {"patient": patient, "date": f"ge{today}"})) == len(events)
        assert _all(client, {"patient": patient, "date": "lt2000-01-01"}) == []
        # One event read by itself.
        one = client.get(f"/AuditEvent/{events[0]['id']}")
        assert one.status_code == 200 and one.json() == events[0]
    assert validator.failures == []


def test_failed_login_and_refusals_are_audited(day: Day, validator: FHIRValidator) -> None:
    with _admin(day, validator) as client:
        for _ in range(100):
            logins = _all(client, {"type": "110114", "outcome": "4"})
            refused = _all(client, {"type": "110101", "agent": "user:user-clinician"})
            if logins and refused:
                break
            threading.Event().wait(0.2)
        (login,) = logins
        assert login["agent"][0]["who"]["identifier"]["value"] == "user:user-clinician"
        assert login["subtype"][0]["code"] == "110122"  # Login
        assert login["agent"][0]["network"]["address"] == "127.0.0.1"
        (audit_read,) = refused
        assert audit_read["outcome"] == "4" and audit_read["outcomeDesc"] == "HTTP 403"
        # Successful logins are recorded too; secrets and tokens never.
        ok = _all(client, {"type": "110114", "outcome": "0", "_count": "50"})
        assert {_shape(e)[2] for e in ok} >= {"user:user-admin", "user:user-clinician"}
        everything = json.dumps(_all(client, {"_count": "500"}))
        for secret in (PASSWORD, WRONG, *day.tokens.values()):
            assert secret not in everything
    with closing(day.server.archive()) as archive, archive.db.session() as session:
        rows = session.scalars(select(AuditEventRow)).all()
        stored = json.dumps([[str(v) for v in vars(r).values()] for r in rows])
    for secret in (PASSWORD, WRONG, *day.tokens.values()):
        assert secret not in stored


def test_audit_events_cannot_be_written(day: Day, validator: FHIRValidator) -> None:
    with _admin(day, validator) as client:
        first = _all(client, {"_count": "1"})[0]
        before = client.get(f"/AuditEvent/{first['id']}").json()
        attempts = [
            client.post("/AuditEvent", json=before, headers=FHIR_JSON),
            client.put(f"/AuditEvent/{first['id']}", json=before, headers=FHIR_JSON),
            client.delete(f"/AuditEvent/{first['id']}"),
        ]
        for answer in attempts:
            assert answer.status_code == 405, answer.text
            assert answer.json()["resourceType"] == "OperationOutcome"
        assert client.get(f"/AuditEvent/{first['id']}").json() == before
        statement = client.get("/metadata").json()
        (audit,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent"]
        assert sorted(i["code"] for i in audit["interaction"]) == ["read", "search-type"]
        assert {"patient", "agent", "entity", "date", "action"} <= {
            p["name"] for p in audit["searchParam"]
        }


def test_no_route_changes_an_audit_row(tmp_path: Path) -> None:
    """Walk every route of the application: the only one that reaches the audit trail is the
    generic FHIR route, whose writes refuse AuditEvent (above); no route is about audit."""
    settings = Settings(data_dir=tmp_path / "data")
    with closing(Archive(settings)) as archive:
        app = create_app(archive, settings)
        routes = list(iter_route_contexts(app.router.routes))
        assert len(routes) > 30
        for route in routes:
            path = route.path or ""
            assert "audit" not in path.lower(), path
        assert "AuditEvent" not in _CREATES and "AuditEvent" not in _UPDATES
        assert all(kind != "AuditEvent" for kind, _ in _OPERATIONS)


def test_the_cli_records_deletions_in_their_transaction(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    study, series = generate_uid(), generate_uid()
    with closing(Archive(settings)) as archive:
        for i in range(2):
            buffer = io.BytesIO()
            _dataset(study, series, i, "AUDIT-CLI").save_as(buffer, enforce_file_format=True)
            archive.ingest(buffer.getvalue())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env["PACSBRIDGE_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(
        [str(PACSBRIDGE), "delete", "--study", study],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with closing(Archive(settings)) as archive:
        events = archive.audit.since(0)
    (event,) = [e for _, e in events if e.source == "cli"]
    assert (event.type_code, event.action, event.outcome) == ("110105", "D", 0)
    assert event.agent.startswith("os:") and len(event.agent) > 3
    assert (event.study_uid, event.patient_id) == (study, "AUDIT-CLI")


# --- append-only in the database ---------------------------------------------------------------


def test_the_database_refuses_to_change_an_event(index_backend: Backend) -> None:
    with closing(Archive(index_backend.settings)) as archive:
        old = AuditEvent(
            action="R",
            type_code="110103",
            agent="user:someone",
            source="dicomweb",
            study_uid="1.2.3",
            recorded=datetime.now(UTC) - timedelta(days=archive.audit.retention_days + 1),
        )
        new = AuditEvent(action="E", type_code="110112", agent="ae:X", source="dimse")
        archive.audit.write([old, new])
        with (
            pytest.raises(DBAPIError, match="append-only"),
            archive.db.write_connection() as conn,
        ):
            conn.execute(text("UPDATE audit_event SET agent = 'user:nobody'"))
        with archive.db.session() as session:
            agents = sorted(session.scalars(select(AuditEventRow.agent)))
        assert agents == ["ae:X", "user:someone"]
        # The retention prune is the one deletion: the old event goes, the new one stays.
        assert archive.audit.prune() == 1
        assert [e.agent for _, e in archive.audit.since(0)] == ["ae:X"]


def test_a_full_queue_makes_the_reader_write_its_own_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``audit.max_queued``: while the writer is stuck (the index slow), at most that many
    events wait in memory; the next request writes its own at once, and nothing is lost."""
    settings = Settings(data_dir=tmp_path, audit=AuditSettings(max_queued=2))
    with closing(Archive(settings)) as archive:
        audit = archive.audit
        stuck = threading.Event()
        original = audit._write_batch

        def slow_writer(batch: list[AuditEvent]) -> None:
            stuck.wait(30)
            original(batch)

        monkeypatch.setattr(audit, "_write_batch", slow_writer)

        def read(n: int) -> AuditEvent:
            return AuditEvent(action="R", type_code="110103", agent=f"user:r{n}", source="fhir")

        for n in range(2):
            audit.submit(read(n))
        assert audit.since(0) == []  # both wait in memory
        audit.submit(read(2))  # the queue is full: written now, by this caller
        assert [e.agent for _, e in audit.since(0)] == ["user:r2"]
        stuck.set()
        assert audit.flush(10)
        assert sorted(e.agent for _, e in audit.since(0)) == ["user:r0", "user:r1", "user:r2"]


def test_control_characters_a_request_smuggles_in_are_left_out(index_backend: Backend) -> None:
    """A path or query with NUL (PostgreSQL refuses it in text) or other C0 controls (XML 1.0
    refuses them) is recorded without them: the writer never stalls on one event."""
    with closing(Archive(index_backend.settings)) as archive:
        event = AuditEvent(
            action="R",
            type_code="110110",
            agent="user:a\x00b",
            source="fhir",
            entity="Patient/a\x00\x1bb",
            query="x=\x00&y=1\tz\n",
        )
        archive.audit.write([event])
        (stored,) = [e for _, e in archive.audit.since(0)]
    assert (stored.agent, stored.entity, stored.query) == ("user:ab", "Patient/ab", "x=&y=1\tz\n")


# --- ATNA export -------------------------------------------------------------------------------

_RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
    rb"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<proc>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) - \xef\xbb\xbf(?P<msg><.*)$",
    re.DOTALL,
)


class _Collector:
    """A syslog collector on 127.0.0.1 reading RFC 6587 octet-counted frames."""

    def __init__(self, context: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.frames: list[bytes] = []
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.context is not None:
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    conn.close()
                    continue
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    assert length.isdigit(), buffer[:40]
                    if len(rest) < int(length):
                        break
                    with self.arrived:
                        self.frames.append(rest[: int(length)])
                        self.arrived.notify_all()
                    buffer = rest[int(length) :]

    def wait_for(self, count: int) -> list[bytes]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.frames) >= count, 30)
            return list(self.frames)

    def close(self) -> None:
        self.listener.close()


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the collector's) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "audit collector")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "collector.pem", directory / "collector.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _day_events() -> list[AuditEvent]:
    return [
        AuditEvent(
            action="C",
            type_code="110104",
            agent="ae:MODALITY",
            agent_address="10.0.0.7",
            source="dimse",
            patient_id="ATNA-1",
            study_uid="1.2.840.99.1",
            entity="C-STORE",
        ),
        AuditEvent(
            action="E",
            type_code="110112",
            agent="user:alice",
            agent_address="127.0.0.1",
            source="fhir",
            patient_id="ATNA-1",
            entity="ImagingStudy",
            query="patient=Patient/1&status=available",
        ),
        AuditEvent(
            action="E",
            type_code="110114",
            subtype_code="110122",
            agent="user:mallory <&>",
            source="auth",
            outcome=4,
            outcome_text="invalid_grant",
        ),
    ]


def _check_frames(frames: list[bytes]) -> list[ET.Element]:
    messages = []
    for frame in frames:
        found = _RFC5424.match(frame)
        assert found is not None, frame[:200]
        assert found["app"] == b"pacsbridge" and found["msgid"] == b"IHE+RFC-3881"
        assert int(found["pri"]) in (10 * 8 + 5, 10 * 8 + 4)
        root = ET.fromstring(found["msg"])
        assert root.tag == "AuditMessage"
        messages.append(root)
    return messages


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_events_are_exported_as_atna_syslog(scheme: str, tmp_path: Path) -> None:
    ca_file = None
    context = None
    if scheme == "tls":
        ca_file, key = _certificate(tmp_path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(ca_file, key)
    collector = _Collector(context)
    try:
        with closing(Archive(Settings(data_dir=tmp_path / "data"))) as archive:
            archive.audit.write(
                [AuditEvent(action="R", type_code="110103", agent="ae:OLD", source="dimse")]
            )
            sender = SyslogSender(f"{scheme}://127.0.0.1:{collector.port}", ca_file)
            exporter = AtnaExporter(archive, sender, source_id="PACSBRIDGE")
            archive.audit.write(_day_events())
            assert exporter.run_once() == 3  # events before the exporter started are not sent
            messages = _check_frames(collector.wait_for(3))
            assert len(messages) == 3
            store, query, login = messages
            ident = store.find("EventIdentification")
            assert ident is not None
            assert ident.get("EventActionCode") == "C"
            assert ident.get("EventOutcomeIndicator") == "0"
            event_id = ident.find("EventID")
            assert event_id is not None and event_id.get("csd-code") == "110104"
            assert event_id.get("codeSystemName") == "DCM"
            (requestor, server) = store.findall("ActiveParticipant")
            assert requestor.get("UserID") == "ae:MODALITY"
            assert requestor.get("UserIsRequestor") == "true"
            assert requestor.get("NetworkAccessPointID") == "10.0.0.7"
            assert server.get("UserID") == "PACSBRIDGE"
            source = store.find("AuditSourceIdentification")
            assert source is not None and source.get("AuditSourceID") == "PACSBRIDGE"
            objects = {
                o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID")
                for o in store.findall("ParticipantObjectIdentification")
            }
            assert objects["1"] == "ATNA-1" and objects["3"] == "1.2.840.99.1"
            (query_object,) = [
                o
                for o in query.findall("ParticipantObjectIdentification")
                if o.get("ParticipantObjectTypeCodeRole") == "24"
            ]
            encoded = query_object.findtext("ParticipantObjectQuery") or ""
            assert base64.b64decode(encoded).decode() == "patient=Patient/1&status=available"
            login_id = login.find("EventIdentification")
            assert login_id is not None and login_id.get("EventOutcomeIndicator") == "4"
            assert login_id.findtext("EventOutcomeDescription") == "invalid_grant"
            assert login.find("ActiveParticipant").get("UserID") == "user:mallory <&>"  # type: ignore[union-attr]
            sender.close()
    finally:
        collector.close()


def test_export_waits_for_an_unreachable_collector(tmp_path: Path) -> None:
    port = free_port()
    with closing(Archive(Settings(data_dir=tmp_path / "data"))) as archive:
        sender = SyslogSender(f"tcp://127.0.0.1:{port}")
        exporter = AtnaExporter(archive, sender, source_id="PACSBRIDGE")
        archive.audit.write(_day_events())
        with pytest.raises(OSError):
            exporter.run_once()
        assert exporter.sent == 0
        collector = _Collector(port=port)  # the collector comes up
        try:
            assert exporter.run_once() == 3
            assert len(_check_frames(collector.wait_for(3))) == 3
            assert exporter.run_once() == 0  # nothing twice
        finally:
            sender.close()
            collector.close()


def _read(agent: str) -> AuditEvent:
    return AuditEvent(action="R", type_code="110103", agent=agent, source="dimse")


def _agents(frames: list[bytes]) -> list[str]:
    """The requestor of each message, in the order the collector got them."""
    agents = []
    for message in _check_frames(frames):
        requestor = message.find("ActiveParticipant")
        assert requestor is not None
        agents.append(requestor.get("UserID") or "")
    return agents


def _settled(collector: _Collector, count: int) -> list[str]:
    """The agents of the collector's messages once ``count`` arrived and a moment passed
    without more (a duplicate would arrive in that moment)."""
    collector.wait_for(count)
    threading.Event().wait(0.3)
    with collector.arrived:
        return _agents(list(collector.frames))


def _stored_cursor(archive: Archive) -> int:
    with archive.db.session() as session:
        return int(
            session.scalars(
                select(AuditExportRow.cursor).where(AuditExportRow.name == atna.EXPORT_NAME)
            ).one()
        )


def test_the_export_resumes_where_it_stopped(index_backend: Backend) -> None:
    """Events recorded while no exporter runs (``serve`` down or restarting, a worker writing
    meanwhile) are sent by the next exporter: its position is kept in the index."""
    collector = _Collector()
    url = f"tcp://127.0.0.1:{collector.port}"
    try:
        with closing(Archive(index_backend.settings)) as archive:
            archive.audit.write([_read("ae:BEFORE")])  # before the first start: not sent
            first = AtnaExporter(archive, SyslogSender(url), source_id="PACSBRIDGE")
            archive.audit.write([_read("ae:ONE")])
            assert first.run_once() == 1
            first.stop()
        with closing(Archive(index_backend.settings)) as worker:  # no exporter runs
            worker.audit.write([_read("ae:DOWN-1"), _read("ae:DOWN-2")])
        with closing(Archive(index_backend.settings)) as archive:  # serve starts again
            second = AtnaExporter(archive, SyslogSender(url), source_id="PACSBRIDGE")
            archive.audit.write([_read("ae:AFTER")])
            assert second.run_once() == 3
            assert second.run_once() == 0
            second.stop()
            newest = max(i for i, _ in archive.audit.since(0))
            assert _stored_cursor(archive) == newest
        assert _settled(collector, 4) == ["ae:ONE", "ae:DOWN-1", "ae:DOWN-2", "ae:AFTER"]
    finally:
        collector.close()


def test_two_exporters_on_one_index_send_each_event_once(index_backend: Backend) -> None:
    """Scale-out: two ``serve`` processes export to one collector; a lease lets one of them
    export at a time, the other takes over when it stops."""
    collector = _Collector()
    url = f"tcp://127.0.0.1:{collector.port}"
    try:
        with (
            closing(Archive(index_backend.settings)) as one,
            closing(Archive(index_backend.settings)) as two,
        ):
            exporters = [
                AtnaExporter(archive, SyslogSender(url), source_id=name, interval=0.02, batch=7)
                for archive, name in ((one, "ONE"), (two, "TWO"))
            ]
            for exporter in exporters:
                exporter.start()
            wanted = []
            for n in range(12):
                batch = [f"ae:E{n}-{i}" for i in range(5)]
                (one if n % 2 else two).audit.write([_read(agent) for agent in batch])
                wanted += batch
                threading.Event().wait(0.03)
            collector.wait_for(len(wanted))
            holder = next(e for e in exporters if e.sent)
            holder.stop()  # its lease is given back: the other takes over at once
            other = next(e for e in exporters if e is not holder)
            batch = [f"ae:LAST-{i}" for i in range(5)]
            one.audit.write([_read(agent) for agent in batch])
            wanted += batch
            collector.wait_for(len(wanted))
            other.stop()
            agents = _settled(collector, len(wanted))
        assert Counter(agents) == Counter(wanted)  # each once
        assert agents == wanted  # in id order
        assert sum(e.sent for e in exporters) == len(wanted)
    finally:
        collector.close()


def test_another_exporter_takes_over_when_the_lease_passes(index_backend: Backend) -> None:
    collector = _Collector()
    url = f"tcp://127.0.0.1:{collector.port}"
    try:
        with closing(Archive(index_backend.settings)) as archive:
            first, second = (
                AtnaExporter(archive, SyslogSender(url), source_id="PACSBRIDGE", lease_seconds=0.5)
                for _ in range(2)
            )
            archive.audit.write([_read("ae:A1"), _read("ae:A2")])
            assert second.run_once() == 2  # the first to find work holds the export
            archive.audit.write([_read("ae:B1")])
            assert first.run_once() == 0  # held by the other
            threading.Event().wait(0.7)  # the holder is gone: its lease passes
            assert first.run_once() == 1
            archive.audit.write([_read("ae:C1")])
            assert second.run_once() == 0  # held by the other now
            assert first.run_once() == 1
            for exporter in (first, second):
                exporter.stop()
        assert _settled(collector, 4) == ["ae:A1", "ae:A2", "ae:B1", "ae:C1"]
    finally:
        collector.close()


def _rounds(exporter: AtnaExporter, collector: _Collector, count: int) -> None:
    """Rounds until the collector has ``count`` messages (a gap resolves in a few)."""
    deadline = time.monotonic() + 20
    while len(collector.frames) < count:
        assert time.monotonic() < deadline, _agents(list(collector.frames))
        exporter.run_once()
        threading.Event().wait(0.05)


@pytest.mark.parametrize("index_backend", ["postgresql"], indirect=True)
def test_an_event_committed_late_is_still_sent(index_backend: Backend) -> None:
    """PostgreSQL takes an id when a transaction inserts the row, not when it commits: the
    export never passes an id a running transaction may still commit, and passes one whose
    transaction rolled back once it has ended."""
    collector = _Collector()
    url = f"tcp://127.0.0.1:{collector.port}"
    try:
        with closing(Archive(index_backend.settings)) as archive:
            exporter = AtnaExporter(archive, SyslogSender(url), source_id="PACSBRIDGE")
            start = _stored_cursor(archive)
            with archive.db.engine.connect() as conn:
                late = conn.begin()
                record(conn, _read("ae:LATE"))  # its id now, its commit later
                archive.audit.write([_read("ae:EARLY")])  # a later id, committed first
                for _ in range(3):  # the gap's snapshot is taken and still running
                    assert exporter.run_once() == 0
                    threading.Event().wait(0.15)
                assert _stored_cursor(archive) == start
                late.commit()
            _rounds(exporter, collector, 2)
            for _ in range(3):
                assert exporter.run_once() == 0
            with archive.db.engine.connect() as conn:
                gone = conn.begin()
                record(conn, _read("ae:ROLLED-BACK"))
                archive.audit.write([_read("ae:AFTER")])
                assert exporter.run_once() == 0
                gone.rollback()
            _rounds(exporter, collector, 3)
            exporter.stop()
        assert _settled(collector, 3) == ["ae:LATE", "ae:EARLY", "ae:AFTER"]
    finally:
        collector.close()


@pytest.mark.parametrize("index_backend", ["postgresql"], indirect=True)
def test_a_burst_of_rolled_back_events_costs_one_snapshot(
    index_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids missing below the highest one read were all taken before it: one snapshot after
    that read settles them all, not one wait per rolled-back event."""
    taken: list[str | None] = []

    def counted(db: Any) -> str | None:
        token = current_snapshot(db)
        taken.append(token)
        return token

    monkeypatch.setattr(atna, "current_snapshot", counted)
    collector = _Collector()
    url = f"tcp://127.0.0.1:{collector.port}"
    try:
        with closing(Archive(index_backend.settings)) as archive:
            exporter = AtnaExporter(archive, SyslogSender(url), source_id="PACSBRIDGE")
            with archive.db.engine.connect() as conn:
                for n in range(5):
                    gone = conn.begin()
                    record(conn, _read(f"ae:ROLLED-BACK-{n}"))
                    archive.audit.write([_read(f"ae:KEPT-{n}")])
                    gone.rollback()
            _rounds(exporter, collector, 5)
            exporter.stop()
        assert _settled(collector, 5) == [f"ae:KEPT-{n}" for n in range(5)]
        assert len(taken) == 1, taken
    finally:
        collector.close()


def test_an_event_that_cannot_be_exported_is_passed(
    index_backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One event whose message cannot be built is logged with its id and passed: the events
    after it are sent, the export never stalls on it."""
    built = atna.syslog_message

    def syslog_message(event: AuditEvent, *, source_id: str, host: str) -> bytes:
        if event.agent.startswith("ae:BROKEN"):
            raise ValueError("this event cannot be built")
        return built(event, source_id=source_id, host=host)

    monkeypatch.setattr(atna, "syslog_message", syslog_message)
    collector = _Collector()
    url = f"tcp://127.0.0.1:{collector.port}"
    try:
        with closing(Archive(index_backend.settings)) as archive:
            exporter = AtnaExporter(archive, SyslogSender(url), source_id="PACSBRIDGE")
            archive.audit.write([_read("ae:BEFORE"), _read("ae:BROKEN"), _read("ae:AFTER")])
            with caplog.at_level(logging.ERROR, logger="pacsbridge.atna"):
                assert exporter.run_once() == 2
                archive.audit.write([_read("ae:BROKEN-ALONE")])
                assert exporter.run_once() == 0  # nothing to send, the cursor passes it
            ids = {e.agent: i for i, e in archive.audit.since(0)}
            assert _stored_cursor(archive) == ids["ae:BROKEN-ALONE"]
            logged = [getattr(r, "audit_event_id", None) for r in caplog.records if r.exc_info]
            assert logged == [ids["ae:BROKEN"], ids["ae:BROKEN-ALONE"]]
            archive.audit.write([_read("ae:LATER")])
            assert exporter.run_once() == 1
            exporter.stop()
        assert _settled(collector, 3) == ["ae:BEFORE", "ae:AFTER", "ae:LATER"]
    finally:
        collector.close()


def test_a_payment_from_the_command_line_is_audited(tmp_path: Path) -> None:
    backend = _backend("sqlite", "file", tmp_path, None)  # type: ignore[arg-type]
    with closing(Archive(backend.settings)) as archive:
        parsed = load_price_list(SAMPLE_PRICES)
        store_price_list(archive, parsed, "sample", parsed.sha256, loaded_by="test")
        _, head, chest = two_charges(archive, patient_id="AUDIT-PAY")
        invoice_id = create_invoice(
            archive, archive.settings, charge_ids=[head, chest], actor="clerk"
        )
        issue_invoice(archive, archive.settings, invoice_id, actor="clerk")
    paid = run_cli(backend, tmp_path, "billing", "pay", str(invoice_id), "10.00")
    assert paid.returncode == 0, paid.stderr
    with closing(Archive(backend.settings)) as archive:
        events = [e for _, e in archive.audit.since(0) if e.source == "cli"]
    (event,) = events
    assert (event.type_code, event.action, event.outcome) == ("110110", "C", 0)
    assert event.agent.startswith("os:")
    assert (event.patient_id, event.entity) == ("AUDIT-PAY", f"Invoice/{invoice_id}")


def test_an_ai_run_is_audited(tmp_path: Path) -> None:
    """The ``ai-run`` job records what the model did to the study, failures included."""
    settings = Settings(
        data_dir=tmp_path / "data",
        ai=AISettings.model_validate(
            {
                "models": {
                    "ct-body": {"enabled": False},
                    "brain-mr": {"enabled": False},
                    "absent": {
                        "kind": "segmentation",
                        "source": str(tmp_path / "missing.pt"),
                        "selector": {"modality": ["CT"]},
                        "labels": [
                            {
                                "name": "Dense",
                                "type": {"value": "3138006", "scheme": "SCT", "meaning": "Bone"},
                            }
                        ],
                        "roi_size": [32, 32, 32],
                    },
                }
            }
        ),
    )
    study = generate_uid()
    with closing(Archive(settings)) as archive:
        for ds in phantom_series("axial-head-first", study):
            archive.ingest(ai_part10(ds))
        (planned,) = plan_study(archive, model_registry(settings), study)
        handle = _build_run(archive, settings)
        now = datetime.now(UTC)
        job = JobRecord(
            1, "ai-run", {"run_id": planned.run_id, "model": "absent"}, study,
            JobStatus.RUNNING, 1, 3, now, "test", None, None, now, now, None,
        )  # fmt: skip
        with pytest.raises(PermanentJobError, match="does not exist"):
            handle(job)
        assert archive.audit.flush()
        (event,) = [e for _, e in archive.audit.since(0)]
    assert (event.type_code, event.action, event.source) == ("110103", "C", "jobs")
    assert (event.agent, event.outcome, event.study_uid) == ("ai:absent", 8, study)
    assert event.patient_id is not None  # looked up from the study
    assert "does not exist" in (event.outcome_text or "")


def _ai_results_rows(archive: Archive) -> list[tuple[str, str, str, str, str | None, str | None]]:
    return [
        (e.type_code, e.action, e.agent, e.source, e.study_uid, e.patient_id)
        for _, e in archive.audit.since(0)
    ]


@pytest.mark.parametrize("sr_refused", [False, True], ids=["stored", "sr-refused"])
def test_the_results_an_ai_run_stores_are_recorded_in_their_ingest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sr_refused: bool
) -> None:
    """One event for the SEG and SR a run stores, committed with the first of them (nothing
    waits in the background queue); a repeated run stores nothing new and records nothing; a
    SEG taken back out because the SR was refused records its deletion."""
    refused = ["Comprehensive3DSRStorage"] if sr_refused else []
    settings = Settings(data_dir=tmp_path / "data", refused_sop_classes=refused)
    study, series = generate_uid(), generate_uid()
    with closing(Archive(settings)) as archive:
        for ds in _body_series(_dataset(study, series, 0, "AUDIT-AI")):
            archive.ingest(ai_part10(ds))
        registry = ModelRegistry(settings.ai)
        (planned,) = plan_study(archive, registry, study, model="ct-body")
        queued: list[AuditEvent] = []
        monkeypatch.setattr(archive.audit, "submit", queued.append)
        run = execute_run(archive, registry, planned.run_id)
        entity = f"/api/ai/runs/{planned.run_id}"
        stored = ("110104", "C", "ai:ct-body", "jobs", study, "AUDIT-AI")
        if sr_refused:
            assert run.status == "failed" and "SR was refused" in (run.error or "")
            taken_back = ("110103", "D", "ai:ct-body", "jobs", study, "AUDIT-AI")
            assert _ai_results_rows(archive) == [stored, taken_back]
            assert archive.stats().instances == 12
        else:
            assert run.status == "done", run.error
            assert _ai_results_rows(archive) == [stored]
            with archive.db.write_session() as session:  # as if the worker died at the end
                session.execute(
                    update(AIRun).where(AIRun.id == planned.run_id).values(status="running")
                )
            again = execute_run(archive, registry, planned.run_id)
            assert {p["outcome"] for p in again.result["produced"]} == {"duplicate"}
            assert _ai_results_rows(archive) == [stored]
        assert {e.entity for _, e in archive.audit.since(0)} == {entity}
        assert queued == []


def test_serve_exports_the_day_to_the_syslog_collector(day: Day) -> None:
    """``audit.syslog_url`` on ``serve``: the events of every edge reach the collector."""
    wanted = {
        ("110104", "ae:MODALITY"),
        ("110112", "ae:VIEWER"),
        ("110110", "user:user-radiologist"),
    }
    for _ in range(150):
        seen = set()
        for message in _check_frames(list(day.collector.frames)):
            event_id = message.find("EventIdentification/EventID")
            requestor = message.find("ActiveParticipant")
            assert event_id is not None and requestor is not None
            seen.add((event_id.get("csd-code"), requestor.get("UserID")))
        if wanted <= seen:
            break
        threading.Event().wait(0.2)
    assert wanted <= seen
