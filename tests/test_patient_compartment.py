"""The patient compartment of SMART ``patient/`` scopes (FHIR R4
compartmentdefinition-patient.html) against a real `pacsbridge serve` with
``PACSBRIDGE_AUTH=required`` and billing on: two patients, A and B, each with a CT study, a
TID 1500 measurement report (a DiagnosticReport, its Observations, the algorithm's Device), a
technical charge, an account, an issued invoice and a payment. A service client registered with
``--patient A`` and ``patient/*.rs`` gets tokens carrying A as their launch context; with them
every search parameter, ``_include`` and ``_revinclude`` the CapabilityStatement declares, and
every read, vread and history of B's resources, returns nothing of B, while A's data is
returned. On DICOMweb the same tokens (and ``patient/ImagingStudy.rs`` ones) search A's
studies only, at every level and whatever the keys, and every retrieval of B's study answers
404 as if it did not exist; dicomweb-client sees A only. Writes (FHIR, STOW-RS, deletions) and
the administrative API are refused (403), a type's history too. Every FHIR body is validated
with ``fhir.resources.R4B`` (tests/fhir_support.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.routing import APIRoute
from pydicom.dataset import Dataset
from requests.exceptions import HTTPError
from sqlalchemy import select

from archive import Archive
from archive.dicom_json import dataset_to_json
from archive.models import Patient as PatientRow
from archive.mpps import create_step
from archive.query import Query, QueryLevel, QueryModel, find, study_patient
from config import Settings
from dicomweb.router import SERVICES
from fhir_bridge.context import Context
from fhir_bridge.provider import Include
from fhir_bridge.router import _load_includes, build_providers
from security.accounts import AccountError, add_client, add_user, list_clients
from security.roles import allowed
from security.scopes import compartment, permitted
from tests.conftest import Backend, RunningServer, _backend, start_server
from tests.dicom_factory import ct_slice
from tests.dicomweb_fixtures import multipart_body
from tests.fhir_support import FHIRValidator, new_uid, part10
from tests.test_archive_reports import ImagedStudy, _measurement_report
from tests.test_fhir import COMMON_VALUES, REFERENCE_TARGETS, sample_value
from tests.test_mpps import accession_of, in_progress

REPO = Path(__file__).resolve().parent.parent
PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
PASSWORD = "correct horse battery staple"
PATIENT_SYSTEM = "urn:pacsbridge:patient-id"
STRICT = {"Prefer": "handling=strict"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}
COMPARTMENT_TYPES = (
    "Patient",
    "ImagingStudy",
    "DiagnosticReport",
    "Observation",
    "ChargeItem",
    "Account",
    "Invoice",
    "ServiceRequest",
    "Procedure",
)
"""The types served here that R4's Patient compartment holds."""


# --- scopes without a server ------------------------------------------------------------------

SCOPE_CASES = [
    # (scopes, patient, method, path, permitted, compartment)
    ("patient/*.rs", None, "GET", "/fhir/ImagingStudy", False, None),
    ("patient/*.rs", "7", "GET", "/fhir/ImagingStudy", True, "7"),
    ("patient/*.read", "7", "GET", "/fhir/Patient/7", True, "7"),
    ("patient/ImagingStudy.rs", "7", "GET", "/fhir/ImagingStudy", True, "7"),
    ("patient/ImagingStudy.rs", "7", "GET", "/fhir/Patient", False, None),
    ("patient/*.rs", "7", "POST", "/fhir/Invoice/_search", True, "7"),
    # Writes and operations have no compartment here: patient scopes grant none of them.
    ("patient/*.cruds", "7", "POST", "/fhir/DiagnosticReport", False, None),
    ("patient/*.cruds", "7", "PUT", "/fhir/Patient/7", False, None),
    ("patient/*.cruds", "7", "DELETE", "/fhir/Patient/7", False, None),
    ("patient/*.rs", "7", "POST", "/fhir/ChargeItemDefinition/1/$apply", False, None),
    # DICOMweb reads as ImagingStudy (QIDO-RS s, WADO-RS r), held to the patient; STOW-RS
    # and deletions are writes, the administrative API no compartment's.
    ("patient/*.rs", "7", "GET", "/dicom-web/studies", True, "7"),
    ("patient/ImagingStudy.rs", "7", "GET", "/dicom-web/studies/1.2/series", True, "7"),
    ("patient/ImagingStudy.r", "7", "GET", "/dicom-web/studies/1.2/metadata", True, "7"),
    ("patient/ImagingStudy.r", "7", "GET", "/dicom-web/studies", False, None),
    ("patient/ImagingStudy.s", "7", "HEAD", "/dicom-web/instances", True, "7"),
    ("patient/Patient.rs", "7", "GET", "/dicom-web/studies", False, None),
    ("patient/*.rs", None, "GET", "/dicom-web/studies", False, None),
    ("patient/*.cruds", "7", "POST", "/dicom-web/studies", False, None),
    ("patient/*.cruds", "7", "DELETE", "/dicom-web/studies/1.2", False, None),
    ("patient/*.rs", "7", "GET", "/api/jobs", False, None),
    ("patient/*.rs user/ImagingStudy.rs", "7", "GET", "/dicom-web/studies", True, None),
    ("user/*.cruds", None, "DELETE", "/dicom-web/studies/1.2", True, None),
    # SMART scopes add up: a user/ scope that grants the request is not held to the patient.
    ("patient/*.rs user/ImagingStudy.rs", "7", "GET", "/fhir/ImagingStudy", True, None),
    ("patient/*.rs user/ImagingStudy.rs", "7", "GET", "/fhir/Patient", True, "7"),
    ("user/*.rs", "7", "GET", "/fhir/Patient", True, None),
    ("patient/*.rs?category=imaging", "7", "GET", "/fhir/Observation", False, None),
    # Held to a patient with no data scope at all (only openid asked for, or an external token
    # with a patient claim and no SMART scope): no patient's data, the role notwithstanding.
    ("openid", "7", "GET", "/fhir/Patient/5", False, None),
    ("", "7", "GET", "/fhir/ImagingStudy", False, None),
    ("openid fhirUser", "7", "GET", "/dicom-web/studies/1.2/metadata", False, None),
    ("openid", "7", "GET", "/api/jobs", False, None),
    ("openid", "7", "GET", "/.well-known/smart-configuration", True, None),
    ("openid", None, "GET", "/fhir/Patient/5", None, None),
]


@pytest.mark.parametrize(("scopes", "patient", "method", "path", "granted", "held"), SCOPE_CASES)
def test_patient_scopes(
    scopes: str,
    patient: str | None,
    method: str,
    path: str,
    granted: bool | None,
    held: str | None,
) -> None:
    assert permitted(scopes, method, path, patient) is granted
    assert compartment(scopes, method, path, patient) == held


def test_clients_bound_to_a_patient(tmp_path: Path) -> None:
    with closing(Archive(Settings(data_dir=tmp_path / "data"))) as archive:
        with pytest.raises(AccountError, match="needs a patient/ scope"):
            add_client(archive, "no-scope", "service", "user/*.rs", patient="12")
        with pytest.raises(AccountError, match="not a FHIR id"):
            add_client(archive, "bad-id", "service", "patient/*.rs", patient="../12")
        add_client(archive, "bound", "service", "patient/*.rs", patient="12")
        assert [(c["name"], c["patient"]) for c in list_clients(archive)] == [("bound", "12")]


def test_external_tokens_carry_the_patient_claim_of_the_settings() -> None:
    from config.settings import ExternalIssuerSettings
    from security.external import ExternalError, ExternalIssuer
    from tests.test_auth import IdentityProvider

    idp = IdentityProvider()
    issuer = ExternalIssuer(
        ExternalIssuerSettings(
            issuer=idp.issuer,
            roles_claim="realm_access.roles",
            role_map={"r": "clinician"},
            patient_claim="smart_patient",
        ),
        leeway=30,
    )
    try:
        # The claim the settings name is the launch context; another one is not.
        assert issuer.validate(idp.token(["r"], smart_patient="42"))[4] == "42"
        assert issuer.validate(idp.token(["r"], patient="42"))[4] is None
        assert issuer.validate(idp.token(["r"]))[4] is None
        with pytest.raises(ExternalError, match="not a FHIR id"):
            issuer.validate(idp.token(["r"], smart_patient="42/../43"))
        with pytest.raises(ExternalError, match="not a FHIR id"):
            issuer.validate(idp.token(["r"], smart_patient=["42", "43"]))
    finally:
        idp.server.shutdown()


def test_the_archive_query_holds_a_search_to_one_patient_row(tmp_path: Path) -> None:
    """``Query.patient``: the patient row (Patient ID *and* Issuer of Patient ID) as an exact
    condition at every level, whatever the keys; its SQL, built once per shape, bound per
    search."""
    # Two patients with one Patient ID from two issuers, and one whose id P1* also matches.
    people = [("P1", None), ("P1", "HOSPITAL-B"), ("P10", None)]
    studies: dict[tuple[str, str | None], list[str]] = {}
    with closing(Archive(Settings(data_dir=tmp_path / "data"))) as archive:
        for number, (patient_id, issuer) in enumerate(people):
            for _ in range(2):
                study, series = new_uid(), new_uid()
                for index in range(2):
                    ct = ct_slice(
                        study_uid=study,
                        series_uid=series,
                        index=index,
                        size=4,
                        patient_id=patient_id,
                    )
                    if issuer:
                        ct.IssuerOfPatientID = issuer
                    ct.PatientName = f"PERSON^{number}"
                    archive.ingest(part10(ct))
                studies.setdefault((patient_id, issuer), []).append(study)
        with archive.db.engine.connect() as conn:
            rows = {
                (pid, issuer or None): key
                for key, pid, issuer in conn.execute(
                    select(PatientRow.id, PatientRow.patient_id, PatientRow.issuer_of_patient_id)
                )
            }
        assert len(rows) == 3
        for person in people:
            key = rows[person]
            own = set(studies[person])
            for held_study in own:
                assert study_patient(archive.db, held_study) == key
            for level in (QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE):
                for keys in (
                    {},
                    {"PatientID": "P1"},
                    {"PatientID": "*"},
                    {"PatientID": "P1*"},
                    {"StudyInstanceUID": "\\".join(s for v in studies.values() for s in v)},
                ):
                    query = Query.from_keywords(
                        level,
                        {**keys, "StudyInstanceUID": keys.get("StudyInstanceUID")},
                        hierarchical=False,
                    )
                    everything = list(find(archive.db, query))
                    query.patient = key
                    found = list(find(archive.db, query))
                    found_studies = {r["0020000D"]["Value"][0] for r in found}
                    expected = [r for r in everything if r["0020000D"]["Value"][0] in own]
                    assert found == expected, (person, level, keys)
                    assert found_studies <= own
            patient_level = Query.from_keywords(
                QueryLevel.PATIENT,
                {"PatientID": "*", "IssuerOfPatientID": None},
                model=QueryModel.PATIENT_ROOT,
            )
            patient_level.patient = key
            (found_patient,) = find(archive.db, patient_level)
            assert found_patient["00100020"]["Value"] == [person[0]]
            assert found_patient.get("00100021", {}).get("Value") == (
                [person[1]] if person[1] else None
            )
        # A key no row has matches nothing; a study nobody has belongs to nobody.
        nobody = Query.from_keywords(QueryLevel.STUDY, {"StudyInstanceUID": None}, patient=-1)
        assert list(find(archive.db, nobody)) == []
        assert study_patient(archive.db, "1.2.3.4") is None


# --- the server -------------------------------------------------------------------------------


@dataclass
class Holdings:
    """What one patient holds: the DICOM Patient ID, and (type, id) of every resource."""

    patient_id: str
    name: str
    patient: str = ""
    study: str = ""
    resources: dict[str, list[str]] = field(default_factory=dict)
    pixels: dict[str, bytes] = field(default_factory=dict)
    """The Pixel Data of each CT image, by SOP Instance UID."""

    def keys(self) -> set[tuple[str, str]]:
        return {(kind, i) for kind, ids in self.resources.items() for i in ids}


@dataclass
class World:
    server: RunningServer
    admin: httpx.Client
    a: Holdings
    b: Holdings
    token_a: str
    token_answer: dict[str, Any]


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    # The tests without a server build no client.
    assert not checker.clients or checker.total > 0, "no FHIR response body was validated"


@pytest.fixture(autouse=True)
def _bodies_valid(validator: FHIRValidator) -> Iterator[None]:
    yield
    assert validator.failures == [], validator.failures


def _wait(what: Any, server: RunningServer, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting\n{server.log()[-3000:]}")
        time.sleep(0.2)


def _ids(bundle: dict[str, Any], mode: str | None = None) -> list[tuple[str, str]]:
    return [
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in bundle.get("entry", [])
        if mode is None or e["search"]["mode"] == mode
    ]


def _store(server: RunningServer, admin: httpx.Client, holdings: Holdings) -> None:
    """A CT study (priced: LOINC 24725-4) and its measurement report, by archive ingest; the
    charge captured when the study is stable; an invoice issued and a payment."""
    study = ImagedStudy(patient_id=holdings.patient_id)
    procedure = Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator = "24725-4", "LN"
    procedure.CodeMeaning = "CT Head"
    for ct in study.cts:
        ct.PatientName = holdings.name
        ct.StudyDate, ct.StudyTime, ct.Modality = "20260304", "101500", "CT"
        ct.BodyPartExamined = "HEAD"
        ct.ProcedureCodeSequence = [procedure]
    with closing(server.archive()) as archive:
        for ct in study.cts:
            archive.ingest(part10(ct))
        archive.ingest(part10(_measurement_report(study, new_uid())))
    holdings.study = str(study.uid)
    holdings.pixels = {str(ct.SOPInstanceUID): bytes(ct.PixelData) for ct in study.cts}
    found = admin.get(
        "/Patient", params={"identifier": f"{PATIENT_SYSTEM}|{holdings.patient_id}"}
    ).json()
    assert found["total"] == 1, found
    holdings.patient = found["entry"][0]["resource"]["id"]

    def charges() -> list[Any]:
        bundle = admin.get("/ChargeItem", params={"patient": f"Patient/{holdings.patient}"})
        return [e["resource"] for e in bundle.json().get("entry", [])]

    (charge,) = _wait(charges, server)
    account = charge["account"][0]["reference"]
    invoice = admin.post(
        "/Invoice",
        json={"resourceType": "Invoice", "status": "draft", "account": {"reference": account}},
        headers=FHIR_JSON,
    )
    assert invoice.status_code == 201, invoice.text
    draft = invoice.json()
    issued = admin.put(
        f"/Invoice/{draft['id']}",
        json={**draft, "status": "issued"},
        headers={**FHIR_JSON, "If-Match": f'W/"{draft["meta"]["versionId"]}"'},
    )
    assert issued.status_code == 200, issued.text
    gross = issued.json()["totalGross"]["value"]
    paid = admin.post(
        "/PaymentReconciliation",
        json={
            "resourceType": "PaymentReconciliation",
            "status": "active",
            "created": "2026-03-20T10:00:00Z",
            "paymentDate": "2026-03-20",
            "paymentAmount": {"value": gross, "currency": "EUR"},
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
                    "request": {"reference": f"Invoice/{draft['id']}"},
                    "amount": {"value": gross, "currency": "EUR"},
                }
            ],
        },
        headers=FHIR_JSON,
    )
    assert paid.status_code == 201, paid.text
    # An imaging order (ServiceRequest, in the compartment by its subject).
    order = admin.post(
        "/ServiceRequest",
        json={
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "code": {"coding": [{"system": "http://loinc.org", "code": "24725-4"}]},
            "subject": {"reference": f"Patient/{holdings.patient}"},
        },
        headers=FHIR_JSON,
    )
    assert order.status_code == 201, order.text
    # The step a modality performed for it (Procedure, in the compartment by its patient).
    step = in_progress(patient_id=holdings.patient_id, accession=accession_of(order.json()))
    with closing(server.archive()) as archive:
        create_step(archive.db, new_uid(), dataset_to_json(step, lambda *a: ""))
    # Everything of the patient, as the admin (held to no compartment) finds it.
    reference = f"Patient/{holdings.patient}"
    for kind in COMPARTMENT_TYPES:
        params = {"_id": holdings.patient} if kind == "Patient" else {"patient": reference}
        bundle = admin.get(f"/{kind}", params={**params, "_count": "100"}).json()
        holdings.resources[kind] = [i for _, i in _ids(bundle)]
        assert holdings.resources[kind], (kind, bundle)
    holdings.resources["PaymentReconciliation"] = [paid.json()["id"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, validator: FHIRValidator) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("compartment")

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
    server = start_server(
        backend,
        workdir,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_STABLE_AGE="1",
        PACSBRIDGE_STABLE_SCAN_INTERVAL="0.2",
        PACSBRIDGE_WORKER_POLL_INTERVAL="0.1",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_BILLING=json.dumps({"enabled": True, "payment_terms_days": 14}),
    )
    try:
        answer = httpx.post(
            f"{server.http}/auth/token",
            data={"grant_type": "password", "username": "root", "password": PASSWORD},
        )
        assert answer.status_code == 200, answer.text
        admin_token = answer.json()["access_token"]
        with validator.httpx_client(
            f"{server.http}/fhir", headers={"Authorization": f"Bearer {admin_token}"}
        ) as admin:
            a = Holdings("CMP-A", "COMPARTMENT^ALICE")
            b = Holdings("CMP-B", "COMPARTMENT^BETTY")
            _store(server, admin, a)
            _store(server, admin, b)
            with closing(server.archive()) as archive:
                secret = add_client(
                    archive, "portal-a", "service", "patient/*.rs launch/patient", patient=a.patient
                )
            granted = httpx.post(
                f"{server.http}/auth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": "portal-a",
                    "client_secret": secret,
                },
            )
            assert granted.status_code == 200, granted.text
            body = granted.json()
            yield World(server, admin, a, b, body["access_token"], body)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def as_a(world: World, validator: FHIRValidator) -> Iterator[httpx.Client]:
    with validator.httpx_client(
        f"{world.server.http}/fhir", headers={"Authorization": f"Bearer {world.token_a}"}
    ) as client:
        yield client


# --- the tests --------------------------------------------------------------------------------


def test_the_token_carries_the_patient(world: World) -> None:
    # SMART App Launch 2.0 "Launch context arrives with your access_token": in the token
    # response, and as a claim of the JWT.
    assert world.token_answer["patient"] == world.a.patient
    assert world.token_answer["scope"] == "patient/*.rs launch/patient"
    claims = jwt.decode(world.token_a, options={"verify_signature": False})
    assert claims["patient"] == world.a.patient
    assert world.a.patient != world.b.patient
    # Discovery says so (SMART App Launch 2.0 "Conformance": capabilities).
    smart = httpx.get(f"{world.server.http}/.well-known/smart-configuration").json()
    assert "permission-patient" in smart["capabilities"]
    assert "patient/*.rs" in smart["scopes_supported"]


def _b_values(world: World, kind: str, name: str, kind_of_param: str) -> list[str]:
    """Values of a search parameter that match B's resources (and the sample value)."""
    b = world.b
    values = [sample_value(name, kind_of_param)]
    if name == "_id":
        values += b.resources.get(kind, [])
    elif kind_of_param == "reference":
        target = REFERENCE_TARGETS[name]
        if target == "ImagingStudy":
            values.append(f"ImagingStudy/{b.study}")
        values += [f"{target}/{i}" for i in b.resources.get(target, [])]
    elif kind_of_param == "date":
        values.append("ge1900-01-01")
    elif kind_of_param == "string":
        values += ["COMPARTMENT", "BETTY"]
    elif name == "identifier" and kind == "Patient":
        values.append(f"{PATIENT_SYSTEM}|{b.patient_id}")
    elif name == "identifier" and kind == "ImagingStudy":
        values.append(f"urn:dicom:uid|urn:oid:{b.study}")
    return values


def test_every_search_sees_nothing_of_b(world: World, as_a: httpx.Client) -> None:
    statement = as_a.get("/metadata").json()
    rest = statement["rest"][0]
    of_b = world.b.keys()
    of_a = world.a.keys()
    runs = 0
    leaks: list[tuple[str, dict[str, str], list[tuple[str, str]]]] = []
    found_of_a: set[tuple[str, str]] = set()

    reaching_b = 0
    """Searches that find B's resources without the compartment (as the admin)."""

    def run(kind: str, params: dict[str, str]) -> dict[str, Any]:
        nonlocal runs, reaching_b
        runs += 1
        response = as_a.get(f"/{kind}", params={**params, "_count": "100"}, headers=STRICT)
        assert response.status_code == 200, (kind, params, response.text[:300])
        bundle = response.json()
        seen = set(_ids(bundle))
        if seen & of_b:
            leaks.append((kind, params, sorted(seen & of_b)))
        found_of_a.update(seen & of_a)
        unrestricted = world.admin.get(f"/{kind}", params={**params, "_count": "100"})
        if set(_ids(unrestricted.json())) & of_b:
            reaching_b += 1
        return bundle

    searched = set()
    for resource in rest["resource"]:
        kind = resource["type"]
        if "search-type" not in {i["code"] for i in resource["interaction"]}:
            continue
        if not allowed("service", "GET", f"/fhir/{kind}"):
            # Its role reads none of these (AuditEvent: admin only), compartment or not.
            refused = as_a.get(f"/{kind}")
            assert refused.status_code == 403, (kind, refused.text[:200])
            continue
        searched.add(kind)
        everything = run(kind, {})
        if kind in COMPARTMENT_TYPES:
            # A's resources are there: the restriction is to A, not to nothing.
            assert set(_ids(everything)) == {(kind, i) for i in world.a.resources[kind]}, kind
            assert everything["total"] == len(world.a.resources[kind])
        for param in resource.get("searchParam", []):
            for value in _b_values(world, kind, param["name"], param["type"]):
                run(kind, {param["name"]: value})
        for common in rest.get("searchParam", []):
            run(kind, {common["name"]: COMMON_VALUES[common["name"]]})
        for value in resource.get("searchInclude", []):
            run(kind, {"_include": value})
            for b_id in world.b.resources.get(kind, []):
                run(kind, {"_id": b_id, "_include": value})
        for value in resource.get("searchRevInclude", []):
            run(kind, {"_revinclude": value})
            for b_id in world.b.resources.get(kind, []):
                run(kind, {"_id": b_id, "_revinclude": value})
        # By POST too (search.html#Introduction).
        posted = as_a.post(
            f"/{kind}/_search",
            content=f"_count=100&_id={','.join(world.b.resources.get(kind, ['0']))}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert posted.status_code == 200, posted.text
        assert not set(_ids(posted.json())) & of_b, kind
    assert set(COMPARTMENT_TYPES) <= searched
    assert leaks == [], leaks
    assert runs > 100
    assert reaching_b > 40, reaching_b
    # Includes reach A's other resources (the Patient of a study, the Observations of a report).
    assert ("Patient", world.a.patient) in found_of_a
    assert {("Observation", i) for i in world.a.resources["Observation"]} <= found_of_a


def test_the_same_searches_find_b_without_the_compartment(world: World) -> None:
    """The searches above would find B (the admin's token is held to no patient)."""
    for kind in COMPARTMENT_TYPES:
        bundle = world.admin.get(f"/{kind}", params={"_count": "100"}).json()
        assert {(kind, i) for i in world.b.resources[kind]} <= set(_ids(bundle)), kind
    payments = world.admin.get("/PaymentReconciliation").json()
    assert payments["total"] == 2


def test_reads_of_b_answer_not_found(world: World, as_a: httpx.Client) -> None:
    statement = as_a.get("/metadata").json()
    interactions = {
        r["type"]: {i["code"] for i in r["interaction"]} for r in statement["rest"][0]["resource"]
    }
    for kind, ids in world.b.resources.items():
        for resource_id in ids:
            paths = [f"/{kind}/{resource_id}"]
            if "vread" in interactions[kind]:
                current = world.admin.get(paths[0]).json()["meta"]["versionId"]
                paths.append(f"/{kind}/{resource_id}/_history/{current}")
            if "history-instance" in interactions[kind]:
                paths.append(f"/{kind}/{resource_id}/_history")
            for path in paths:
                # As if it did not exist (never 403, which would tell that it does).
                answer = as_a.get(path)
                assert answer.status_code == 404, (path, answer.status_code, answer.text[:200])
                body = answer.json()
                assert body["resourceType"] == "OperationOutcome"
                assert body["issue"][0]["code"] == "not-found"
                assert world.admin.get(path).status_code == 200, path
    for kind, ids in world.a.resources.items():
        if kind == "PaymentReconciliation":
            continue  # outside R4's Patient compartment: nobody's payments are shown
        for resource_id in ids:
            answer = as_a.get(f"/{kind}/{resource_id}")
            assert answer.status_code == 200, (kind, resource_id, answer.text[:200])
            assert answer.json()["id"] == resource_id
    # Its own payments are not in R4's Patient compartment either.
    (payment,) = world.a.resources["PaymentReconciliation"]
    assert as_a.get(f"/PaymentReconciliation/{payment}").status_code == 404
    # Resources outside the compartment that hold no patient's data stay readable.
    devices = as_a.get(
        "/Observation",
        params={"_id": world.a.resources["Observation"][0], "_include": "Observation:device"},
    ).json()
    assert [k for k, _ in _ids(devices, "include")] == ["Device"]
    assert as_a.get("/Endpoint").json()["total"] == 1
    assert as_a.get("/ChargeItemDefinition", params={"_count": "1"}).json()["total"] > 0


def test_writes_history_and_api_are_refused(world: World, as_a: httpx.Client) -> None:
    a = world.a
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "CT head"},
        "subject": {"reference": f"Patient/{a.patient}"},
        "imagingStudy": [{"reference": f"ImagingStudy/{a.study}"}],
        "conclusion": "No haemorrhage.",
    }
    refused = [
        as_a.post("/DiagnosticReport", json=report, headers=FHIR_JSON),
        as_a.put(
            f"/Patient/{a.patient}",
            json={"resourceType": "Patient", "id": a.patient},
            headers=FHIR_JSON,
        ),
        as_a.delete(f"/Patient/{a.patient}"),
        as_a.post("/ChargeItemDefinition/1/$apply", json={"resourceType": "Parameters"}),
    ]
    for answer in refused:
        assert answer.status_code == 403, (answer.request.url, answer.text[:200])
        assert answer.json()["issue"][0]["code"] == "forbidden"
        assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
    for kind in ("Patient", "DiagnosticReport"):
        history = as_a.get(f"/{kind}/_history")
        assert history.status_code == 403, history.text[:200]
        assert "one patient's compartment" in history.json()["issue"][0]["diagnostics"]
        assert world.admin.get(f"/{kind}/_history").json()["total"] >= 2
    bearer = {"Authorization": f"Bearer {world.token_a}"}
    for path in ("/api/jobs", "/api/peers"):
        answer = httpx.get(f"{world.server.http}{path}", headers=bearer)
        assert answer.status_code == 403, (path, answer.text[:200])
    # Nothing was written.
    reports = world.admin.get("/DiagnosticReport", params={"patient": f"Patient/{a.patient}"})
    assert reports.json()["total"] == len(a.resources["DiagnosticReport"])


def test_includes_of_references_to_another_patient_are_held(world: World) -> None:
    """``_include`` follows references of the page's resources; a reference to B (which no
    resource of A holds today) is still held to A's compartment, by SQL on the target's
    rows."""
    settings = world.server.backend.settings
    b = world.b
    forged = {
        "resourceType": "ChargeItem",
        "id": world.a.resources["ChargeItem"][0],
        "subject": {"reference": f"Patient/{b.patient}"},
        "account": [{"reference": f"Account/{b.resources['Account'][0]}"}],
    }
    includes = [
        ("_include", Include("ChargeItem", "subject", "Patient")),
        ("_include", Include("ChargeItem", "account", "Account")),
    ]
    providers = build_providers(settings)
    with closing(world.server.archive()) as archive:

        def included(held: str | None) -> set[tuple[str, str]]:
            ctx = Context(archive, settings, "http://x/fhir", "http://x/dicom-web", providers)
            ctx = dataclasses.replace(ctx, compartment=held)
            with archive.db.session() as session:
                found = _load_includes(ctx, session, providers["ChargeItem"], [forged], includes)
            return {(r["resourceType"], r["id"]) for r in found}

        assert included(world.a.patient) == set()
        assert included(None) == {("Patient", b.patient), ("Account", b.resources["Account"][0])}
        assert included(b.patient) == included(None)


# --- DICOMweb ---------------------------------------------------------------------------------

DICOMWEB_SCOPES = ("patient/*.rs", "patient/ImagingStudy.rs")
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_SEARCHES = ("studies", "series", "instances")
"""The last segment of a QIDO-RS path."""


@dataclass
class Images:
    """What A's tokens see on DICOMweb: clients held to A, the admin's client, each
    patient's (series, SOP Instance UID) pairs, and a CT image of each patient."""

    held: dict[str, httpx.Client]
    admin: httpx.Client
    instances: dict[str, set[tuple[str, str]]]
    ct: dict[str, tuple[str, str]]


def _value(item: dict[str, Any], tag: str) -> str:
    return str((item.get(tag, {}).get("Value") or [""])[0])


def _uids(items: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(_value(i, _STUDY), _value(i, _SERIES), _value(i, _SOP)) for i in items}


@pytest.fixture(scope="module")
def images(world: World) -> Iterator[Images]:
    """Fresh tokens (the module's first one may be near its expiry) of two clients held to A:
    one with ``patient/*.rs``, one with ``patient/ImagingStudy.rs`` (DICOMweb's FHIR type)."""
    base = f"{world.server.http}/dicom-web"
    tokens = {}
    with closing(world.server.archive()) as archive:
        for number, scope in enumerate(DICOMWEB_SCOPES):
            name = f"viewer-a-{number}"
            secret = add_client(archive, name, "service", scope, patient=world.a.patient)
            answer = httpx.post(
                f"{world.server.http}/auth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": name,
                    "client_secret": secret,
                },
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["patient"] == world.a.patient
            tokens[scope] = answer.json()["access_token"]
    admin_bearer = world.admin.headers["Authorization"]
    held = {
        scope: httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"})
        for scope, token in tokens.items()
    }
    admin = httpx.Client(base_url=base, headers={"Authorization": admin_bearer})
    try:
        instances: dict[str, set[tuple[str, str]]] = {}
        ct: dict[str, tuple[str, str]] = {}
        for who in (world.a, world.b):
            found = admin.get(f"/studies/{who.study}/instances", params={"includefield": "all"})
            assert found.status_code == 200, found.text[:200]
            instances[who.study] = {(s, i) for _, s, i in _uids(found.json())}
            (sop, *_) = sorted(who.pixels)
            ct[who.study] = next((s, i) for s, i in instances[who.study] if i == sop)
            assert len(instances[who.study]) == 3  # two CT images and the measurement report
        yield Images(held, admin, instances, ct)
    finally:
        for client in (*held.values(), admin):
            client.close()


def _searches(world: World, images: Images) -> list[tuple[str, dict[str, str]]]:
    """Every QIDO-RS resource, nested in A's and in B's study and series, with keys aimed at
    B, wildcards and none."""
    a, b = world.a, world.b
    b_series = {s for s, _ in images.instances[b.study]}
    a_series = {s for s, _ in images.instances[a.study]}
    paths = ["/studies", "/series", "/instances"]
    for study, series in ((a.study, sorted(a_series)), (b.study, sorted(b_series))):
        paths += [f"/studies/{study}/series", f"/studies/{study}/instances"]
        paths += [f"/studies/{study}/series/{s}/instances" for s in series]
    # A's study with B's series: the path mixes them; nothing of B either.
    paths.append(f"/studies/{a.study}/series/{sorted(b_series)[0]}/instances")
    keys: list[dict[str, str]] = [
        {},
        {"PatientID": b.patient_id},
        {"00100020": b.patient_id},
        {"PatientID": "*"},
        {"PatientID": "CMP-*"},
        {"PatientID": "CMP-?"},
        {"PatientName": "COMPARTMENT^*"},
        {"PatientName": "betty", "fuzzymatching": "true"},
        {"StudyInstanceUID": b.study},
        {"StudyInstanceUID": f"{a.study},{b.study}"},
        {"StudyInstanceUID": "*"},
        {"IssuerOfPatientID": "*"},
        {"ModalitiesInStudy": "CT"},
        {"StudyDate": "19000101-"},
        {"includefield": "all"},
        {"limit": "1", "offset": "1"},
    ]
    return [(path, params) for path in paths for params in keys]


def test_qido_searches_find_only_a(world: World, images: Images) -> None:
    a, b = world.a, world.b
    searches = _searches(world, images)
    reaching_b = 0
    finding_a = 0
    for path, params in searches:
        # The admin's results without paging, in the server's order (the index's).
        params = dict(params)
        paging: dict[str, str] = {k: params.pop(k) for k in ("limit", "offset") if k in params}
        unrestricted = images.admin.get(path, params=params)
        if unrestricted.status_code == 400:
            continue  # a key of a level below the path's: refused alike
        assert unrestricted.status_code == 200, (path, params, unrestricted.text[:200])
        everything = [_uids([item]).pop() for item in unrestricted.json()]
        of_a = [uids for uids in everything if uids[0] == a.study]
        if any(uids[0] == b.study for uids in everything):
            reaching_b += 1
        finding_a += bool(of_a)
        if paging:
            start = int(paging["offset"])
            of_a = of_a[start : start + int(paging["limit"])]
        for scope, client in images.held.items():
            answer = client.get(path, params={**params, **paging})
            where = (scope, path, params, paging, answer.text[:300])
            assert answer.status_code == 200, where
            items = answer.json()
            assert [_uids([item]).pop() for item in items] == of_a, where
            for item in items:
                assert _value(item, "00100020") in ("", a.patient_id), where
                assert b.study not in json.dumps(item), where
    assert reaching_b > 40, reaching_b
    assert finding_a > 40, finding_a
    # A study-level search names A's patient and studies, as the admin sees them.
    for client in images.held.values():
        (study,) = client.get("/studies").json()
        assert _value(study, _STUDY) == a.study
        assert _value(study, "00100020") == a.patient_id
        assert _value(study, "00201208") == "3"  # NumberOfStudyRelatedInstances
    assert {_value(s, _STUDY) for s in images.admin.get("/studies").json()} == {a.study, b.study}


def _retrievals(study: str, series: str, sop: str) -> list[str]:
    """Every WADO-RS, rendered and thumbnail route of the DICOMweb router for one CT image,
    taken from the routes themselves (the searches and STOW-RS aside)."""
    paths = []
    for service in SERVICES:
        for route in service.router.routes:
            assert isinstance(route, APIRoute)
            path = route.path
            if "GET" not in (route.methods or ()) or path.rsplit("/", 1)[-1] in _SEARCHES:
                continue
            paths.append(
                path.replace("{study}", study)
                .replace("{series}", series)
                .replace("{sop}", sop)
                .replace("{frames}", "1")
                .replace("{path:path}", "7FE00010")
            )
    assert len(paths) == 16, paths
    return paths


def _check_content(path: str, answer: httpx.Response, study: str, pixels: bytes) -> None:
    """A's retrieval holds A's study: its instances, metadata, pixels or an image."""
    kind = answer.headers["content-type"]
    body = answer.content
    where = (path, kind, body[:100])
    if path.endswith("/metadata"):
        items = answer.json()
        assert items and {_value(i, _STUDY) for i in items} == {study}, where
        return
    if path.endswith(("/rendered", "/thumbnail")):
        assert kind.startswith(("image/", "multipart/related")), where
        assert b"\x89PNG" in body or b"\xff\xd8\xff" in body, where
        return
    if path.endswith(("/frames/1", "/7FE00010")):
        assert pixels in body, where
        return
    assert 'type="application/dicom"' in kind, where
    assert study.encode() in body and b"DICM" in body, where


def test_wado_of_b_is_not_found_and_of_a_is_served(world: World, images: Images) -> None:
    a, b = world.a, world.b
    unknown = "1.2.826.0.1.3680043.10.1506.999999"
    for scope, client in images.held.items():
        for who in (b, a):
            series, sop = images.ct[who.study]
            for path in _retrievals(who.study, series, sop):
                answer = client.get(path)
                where = (scope, path, answer.status_code, answer.text[:200])
                if who is a:
                    assert answer.status_code == 200, where
                    _check_content(path, answer, a.study, a.pixels[sop])
                    assert b.study.encode() not in answer.content, where
                    continue
                # B's: as if it did not exist, like a study nobody has (not 403).
                assert answer.status_code == 404, where
                assert answer.json() == {"detail": "no such study"}, where
                assert client.head(path).status_code == 404, where
                missing = client.get(path.replace(b.study, unknown, 1))
                assert (missing.status_code, missing.json()) == (404, answer.json()), where
                # The admin, held to no patient, is served it.
                served = images.admin.get(path)
                assert served.status_code == 200, (path, served.text[:200])
                _check_content(path, served, b.study, b.pixels[sop])
            # B's series and image below A's study: the routes hold them to the study.
            b_series, b_sop = images.ct[b.study]
            for path in _retrievals(a.study, b_series, b_sop):
                if path.count("/") <= 3:
                    continue  # the study's own routes, A's
                answer = client.get(path)
                assert answer.status_code == 404, (scope, path, answer.text[:200])
                assert b.study.encode() not in answer.content


def test_stow_and_delete_are_refused(world: World, images: Images) -> None:
    a = world.a
    series, sop = images.ct[a.study]
    with closing(world.server.archive()) as archive:
        before = archive.stats()
    ct = ImagedStudy(patient_id=a.patient_id).cts[0]
    body, content_type = multipart_body([part10(ct)])
    for scope, client in images.held.items():
        refused = [
            client.post("/studies", content=body, headers={"Content-Type": content_type}),
            client.post(
                f"/studies/{a.study}", content=body, headers={"Content-Type": content_type}
            ),
            client.delete(f"/studies/{a.study}"),
            client.delete(f"/studies/{a.study}/series/{series}/instances/{sop}"),
        ]
        for answer in refused:
            where = (scope, answer.request.method, answer.request.url, answer.text[:200])
            assert answer.status_code == 403, where
            assert 'error="insufficient_scope"' in answer.headers["www-authenticate"], where
    with closing(world.server.archive()) as archive:
        assert archive.stats() == before
    assert images.held[DICOMWEB_SCOPES[0]].get(f"/studies/{a.study}/metadata").status_code == 200


def test_dicomweb_client_sees_only_a(world: World, images: Images) -> None:
    a, b = world.a, world.b
    for client in images.held.values():
        viewer = DICOMwebClient(
            url=f"{world.server.http}/dicom-web",
            headers={"Authorization": client.headers["Authorization"]},
        )
        studies = viewer.search_for_studies()
        assert [_value(s, _STUDY) for s in studies] == [a.study]
        assert viewer.search_for_studies(search_filters={"PatientID": b.patient_id}) == []
        assert viewer.search_for_series(search_filters={"StudyInstanceUID": b.study}) == []
        instances = viewer.search_for_instances()
        assert {(s, i) for _, s, i in _uids(instances)} == images.instances[a.study]
        assert viewer.search_for_instances(study_instance_uid=b.study) == []
        metadata = viewer.retrieve_study_metadata(a.study)
        assert {_value(m, "00100020") for m in metadata} == {a.patient_id}
        with pytest.raises(HTTPError) as refused:
            viewer.retrieve_study_metadata(b.study)
        assert refused.value.response is not None
        assert refused.value.response.status_code == 404
        series, sop = images.ct[a.study]
        (frame,) = viewer.retrieve_instance_frames(a.study, series, sop, frame_numbers=[1])
        assert frame == a.pixels[sop]
