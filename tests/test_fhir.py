"""The FHIR R4 bridge with real clients (fhirclient, fhirpy sync and async, httpx) against a real
`pacsbridge serve`: images go in over DCMTK storescu (and archive ingest for bulk), come out as
Patient / ImagingStudy / Endpoint resources; reports written over FHIR are stored as DICOM SR and
seen over C-FIND, QIDO-RS and WADO-RS. Every FHIR response body of the module is validated with
``fhir.resources.R4B`` (tests/fhir_support.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from fhirclient.models.imagingstudy import ImagingStudy as SmartImagingStudy
from fhirclient.models.patient import Patient as SmartPatient
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage
from sqlalchemy import create_engine, text

from tests.conftest import RunningServer
from tests.dicom_factory import ct_slice
from tests.fhir_support import (
    FHIRValidator,
    findscu,
    new_uid,
    part10,
    start_fhir_server,
    storescu,
)
from tests.test_archive_reports import ImagedStudy, _measurement_report

pytestmark = pytest.mark.dcmtk

PATIENT_SYSTEM = "urn:pacsbridge:patient-id"
DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SUBSETTED = "SUBSETTED"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
REPORT_CODE = {
    "coding": [
        {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
    ]
}


# --- the server, the clients and the validation of every body ----------------------------------


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    # The hook provably ran, for every client library the module used.
    assert checker.total > 0 or not checker.clients, "no FHIR response body was validated"
    for client in checker.clients:
        assert checker.validated[client] > 0, f"no {client} response was validated"


@pytest.fixture(autouse=True)
def _bodies_valid(validator: FHIRValidator, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test whose responses did not validate, even where a client swallowed the
    hook's AssertionError (where the test failed already, it was not swallowed)."""
    before, failed = len(validator.failures), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        assert validator.failures[before:] == []


@pytest.fixture(scope="module")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_fhir_server(tmp_path_factory.mktemp("fhir"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def base(fhir_server: RunningServer) -> str:
    return f"{fhir_server.http}/fhir"


@pytest.fixture(scope="module")
def http(validator: FHIRValidator, base: str) -> Iterator[httpx.Client]:
    with validator.httpx_client(base) as client:
        yield client


@pytest.fixture(scope="module")
def smart(validator: FHIRValidator, base: str) -> Any:
    client = validator.fhirclient(base)
    assert client.prepare() is True  # reads the CapabilityStatement
    return client


@pytest.fixture(scope="module")
def fhirpy_sync(validator: FHIRValidator, base: str) -> Any:
    return validator.fhirpy_sync(base)


@pytest.fixture(scope="module")
def dicomweb(fhir_server: RunningServer) -> DICOMwebClient:
    return DICOMwebClient(url=f"{fhir_server.http}/dicom-web")


def entries(bundle: dict[str, Any], mode: str = "match") -> list[dict[str, Any]]:
    return [
        e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode
    ]


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [r["id"] for r in entries(bundle, mode)]


def search(http: httpx.Client, resource_type: str, params: Any = None, **kw: Any) -> dict:
    response = http.get(f"/{resource_type}", params=params, **kw)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def outcome(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The OperationOutcome of an error: its status, issue code and a diagnostics text."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    first = body["issue"][0]
    assert first["severity"] in ("error", "fatal"), body
    assert first["code"] == code, body
    assert first.get("diagnostics", "").strip(), body
    return body


def patient_id_of(http: httpx.Client, value: str) -> str:
    bundle = search(http, "Patient", {"identifier": f"{PATIENT_SYSTEM}|{value}"})
    assert bundle["total"] == 1, bundle
    return ids(bundle)[0]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- data -------------------------------------------------------------------------------------


@dataclass
class StudyData:
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    patient_id: str
    accession: str
    datasets: list[Dataset] = field(default_factory=list)


def make_study(
    count: int,
    *,
    patient_id: str,
    patient_name: str = "DOE^JANE",
    study_date: str = "20240115",
    modality: str = "CT",
) -> StudyData:
    study_uid, series_uid = new_uid(), new_uid()
    datasets = []
    for index in range(count):
        ds = ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            index=index,
            size=8,
            patient_id=patient_id,
            patient_name=patient_name,
            study_date=study_date,
        )
        if modality == "MR":
            ds.Modality = "MR"
            ds.SOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SeriesDescription = "T1"
        datasets.append(ds)
    return StudyData(
        study_uid,
        series_uid,
        [str(ds.SOPInstanceUID) for ds in datasets],
        patient_id,
        str(datasets[0].AccessionNumber),
        datasets,
    )


def send(server: RunningServer, study: StudyData, directory: Path) -> StudyData:
    """Store the study with DCMTK storescu."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(study.datasets):
        path = directory / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    storescu(server, paths)
    return study


def ingest(server: RunningServer, studies: list[StudyData]) -> None:
    """Store studies through the archive's ingest (the path C-STORE and STOW-RS take)."""
    with closing(server.archive()) as archive:
        for study in studies:
            for ds in study.datasets:
                archive.ingest(part10(ds))


@pytest.fixture(scope="module")
def ct_study(fhir_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> StudyData:
    study = make_study(5, patient_id="FHIR-CT-0001", patient_name="CTPATIENT^ANNA")
    return send(fhir_server, study, tmp_path_factory.mktemp("ct"))


def test_the_validator_rejects_what_is_not_r4() -> None:
    """The hook of every request below fails on bodies that are not valid R4 (and so can)."""
    checker = FHIRValidator()
    url = "http://127.0.0.1:1/fhir/Patient"

    def check(body: Any, content_type: str = "application/fhir+json; charset=utf-8") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        checker.check(
            client="self-test",
            method="GET",
            url=url,
            status=200,
            content_type=content_type,
            accept=None,
            body=raw,
        )

    check({"resourceType": "Patient", "gender": "female"})
    check(b"", "application/fhir+json")  # nothing to validate
    assert checker.validated["self-test"] == 1
    study = {"resourceType": "ImagingStudy", "id": "1.2.3", "status": "available"}
    bad: list[tuple[Any, str]] = [
        ({"resourceType": "Patient", "gender": "woman"}, "application/fhir+json"),
        ({"resourceType": "Patient", "birthDate": "12/08/1964"}, "application/fhir+json"),
        ({"resourceType": "Patient", "colour": "blue"}, "application/fhir+json"),
        (
            {"resourceType": "OperationOutcome", "issue": [{"severity": "bad", "code": "x"}]},
            "application/fhir+json",
        ),
        ({"resourceType": "Patient"}, "application/json"),  # not asked for plain JSON
        ({"resourceType": "Patient"}, "application/fhir+json; charset=latin-1"),
        ({"resourceType": "NoSuchThing"}, "application/fhir+json"),
        (b"{not json", "application/fhir+json"),
        (  # an entry without its mandatory subject
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [
                    {
                        "fullUrl": "http://127.0.0.1:1/fhir/ImagingStudy/1.2.3",
                        "resource": study,
                        "search": {"mode": "match"},
                    }
                ],
            },
            "application/fhir+json",
        ),
        (  # a relative fullUrl
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [
                    {
                        "fullUrl": "Patient/1",
                        "resource": {"resourceType": "Patient", "id": "1"},
                        "search": {"mode": "match"},
                    }
                ],
            },
            "application/fhir+json",
        ),
    ]
    for body, content_type in bad:
        with pytest.raises(AssertionError):
            check(body, content_type)
    assert len(checker.failures) == len(bad)
    assert checker.validated["self-test"] == 1


# --- 1, 2: the CapabilityStatement with fhirclient and fhirpy ----------------------------------


def check_capability(statement: dict[str, Any]) -> None:
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["kind"] == "instance"
    assert "application/fhir+json" in statement["format"]
    rest = statement["rest"][0]
    assert rest["mode"] == "server"
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(by_type) >= {
        "Patient",
        "ImagingStudy",
        "Endpoint",
        "DiagnosticReport",
        "Observation",
        "Device",
    }
    study = by_type["ImagingStudy"]
    assert "ImagingStudy:subject" in study["searchInclude"]
    assert "DiagnosticReport:imaging-study" in study["searchRevInclude"]
    study_params = {p["name"]: p["type"] for p in study["searchParam"]}
    assert study_params["started"] == "date"
    assert study_params["identifier"] == "token"
    assert study_params["patient"] == "reference"
    report = by_type["DiagnosticReport"]
    report_params = {p["name"]: p for p in report["searchParam"]}
    assert report_params["imaging-study"]["type"] == "reference"
    assert "DiagnosticReport:result" in report["searchInclude"]
    interactions = {i["code"] for i in report["interaction"]}
    assert {"read", "vread", "search-type", "create", "update", "history-instance"} <= interactions
    patient = by_type["Patient"]
    assert {i["code"] for i in patient["interaction"]} >= {"create", "update", "history-type"}
    assert patient["conditionalCreate"] is True
    assert patient["versioning"] == "versioned"
    assert {"create", "update", "delete"}.isdisjoint({i["code"] for i in study["interaction"]}), (
        "ImagingStudy is a view of the archive"
    )


def test_capability_statement_with_fhirclient_and_fhirpy(
    smart: Any, validator: FHIRValidator, base: str
) -> None:
    # fhirclient read it in prepare() and parsed it with its R4 models.
    statement = smart.server.capabilityStatement
    assert statement.fhirVersion == "4.0.1"
    check_capability(statement.as_json())

    sync = validator.fhirpy_sync(base)
    check_capability(dict(sync.execute("metadata", method="get")))

    async def read_async() -> dict[str, Any]:
        client = validator.fhirpy_async(base)
        return dict(await client.execute("metadata", method="get"))

    check_capability(asyncio.run(read_async()))


# --- 3: a study stored with storescu as ImagingStudy ------------------------------------------


def test_imaging_study_of_a_storescu_study(
    http: httpx.Client,
    ct_study: StudyData,
    fhir_server: RunningServer,
    fhirpy_sync: Any,
) -> None:
    patient = patient_id_of(http, ct_study.patient_id)
    by_patient = search(http, "ImagingStudy", {"patient": f"Patient/{patient}"})
    assert by_patient["total"] == 1 and ids(by_patient) == [ct_study.study_uid]
    by_uid = search(
        http, "ImagingStudy", {"identifier": f"{DICOM_UID}|urn:oid:{ct_study.study_uid}"}
    )
    assert ids(by_uid) == [ct_study.study_uid]
    by_accession = search(http, "ImagingStudy", {"identifier": f"|{ct_study.accession}"})
    assert ct_study.study_uid in ids(by_accession)

    study = entries(by_uid)[0]
    assert study["status"] == "available"
    assert {"use": "official", "system": DICOM_UID, "value": f"urn:oid:{ct_study.study_uid}"} in (
        study["identifier"]
    )
    accession = [i for i in study["identifier"] if i.get("type")]
    assert accession[0]["value"] == ct_study.accession
    assert accession[0]["type"]["coding"][0]["code"] == "ACSN"
    assert study["subject"]["reference"] == f"Patient/{patient}"
    assert study["started"] == "2024-01-15T10:15:00+01:00"  # StudyDate/Time in Europe/Berlin
    assert study["numberOfSeries"] == 1 and study["numberOfInstances"] == 5
    assert study["modality"] == [{"system": DCM, "code": "CT"}]
    assert study["description"] == "CT HEAD"
    (series,) = study["series"]
    assert series["uid"] == ct_study.series_uid
    assert series["number"] == 1
    assert series["modality"] == {"system": DCM, "code": "CT"}
    assert series["numberOfInstances"] == 5
    assert series["bodySite"]["code"] == "69536005"  # HEAD
    assert [i["uid"] for i in series["instance"]] == ct_study.sop_uids  # by Instance Number
    assert [i["number"] for i in series["instance"]] == [1, 2, 3, 4, 5]
    for instance in series["instance"]:
        assert instance["sopClass"] == {
            "system": "urn:ietf:rfc:3986",
            "code": f"urn:oid:{CTImageStorage}",
        }

    # The endpoint resolves to the DICOMweb root, and that root serves the study.
    (reference,) = study["endpoint"]
    response = http.get(f"/{reference['reference']}")
    assert response.status_code == 200
    endpoint = response.json()
    assert endpoint["resourceType"] == "Endpoint" and endpoint["status"] == "active"
    assert endpoint["address"] == f"{fhir_server.http}/dicom-web"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    qido = httpx.get(f"{endpoint['address']}/studies/{ct_study.study_uid}/series", timeout=30)
    assert qido.status_code == 200
    assert [s["0020000E"]["Value"][0] for s in qido.json()] == [ct_study.series_uid]

    # _include=ImagingStudy:subject brings the Patient along.
    included = search(
        http,
        "ImagingStudy",
        {"_id": ct_study.study_uid, "_include": "ImagingStudy:subject"},
    )
    assert ids(included) == [ct_study.study_uid]
    (subject,) = entries(included, "include")
    assert subject["resourceType"] == "Patient" and subject["id"] == patient
    assert subject["identifier"][0]["value"] == ct_study.patient_id

    # Chained search on the patient's identifier and name.
    chained = search(
        http,
        "ImagingStudy",
        {"subject:Patient.identifier": f"{PATIENT_SYSTEM}|{ct_study.patient_id}"},
    )
    assert ids(chained) == [ct_study.study_uid]
    by_name = search(http, "ImagingStudy", {"patient.name": "ctpatient"})
    assert ids(by_name) == [ct_study.study_uid]
    assert search(http, "ImagingStudy", {"patient.name": "nobody-like-this"})["total"] == 0

    # The Patient as the DICOM header has it.
    dicom_patient = http.get(f"/Patient/{patient}").json()
    assert dicom_patient["name"][0]["family"] == "CTPATIENT"
    assert dicom_patient["name"][0]["given"] == ["ANNA"]
    assert dicom_patient["gender"] == "female" and dicom_patient["birthDate"] == "1970-01-01"

    # read with fhirpy; conditional read with the version as ETag.
    resource = fhirpy_sync.reference("ImagingStudy", ct_study.study_uid).to_resource()
    assert resource["numberOfInstances"] == 5
    read = http.get(f"/ImagingStudy/{ct_study.study_uid}")
    assert read.headers["etag"] == f'W/"{read.json()["meta"]["versionId"]}"'
    assert read.headers["last-modified"].endswith("GMT")
    again = http.get(
        f"/ImagingStudy/{ct_study.study_uid}", headers={"If-None-Match": read.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    since = http.get(
        f"/ImagingStudy/{ct_study.study_uid}",
        headers={"If-Modified-Since": read.headers["last-modified"]},
    )
    assert since.status_code == 304
    changed = http.get(f"/ImagingStudy/{ct_study.study_uid}", headers={"If-None-Match": 'W/"0"'})
    assert changed.status_code == 200 and changed.json() == read.json()
    vread = http.get(
        f"/ImagingStudy/{ct_study.study_uid}/_history/{read.json()['meta']['versionId']}"
    )
    assert vread.status_code == 200 and vread.json() == read.json()


# --- 4: paging with both client libraries -----------------------------------------------------

PAGING_PATIENT = "FHIR-PAGE-0001"


@dataclass
class Paging:
    patient: str
    study_uids: set[str]


@pytest.fixture(scope="module")
def paging(fhir_server: RunningServer, http: httpx.Client) -> Paging:
    studies = [
        make_study(1, patient_id=PAGING_PATIENT, patient_name="PAGER^PAUL", study_date="20230301")
        for _ in range(250)
    ]
    ingest(fhir_server, studies)
    return Paging(patient_id_of(http, PAGING_PATIENT), {s.study_uid for s in studies})


def page_sizes(total: int, count: int) -> list[int]:
    return [count] * (total // count) + ([total % count] if total % count else [])


def test_paging_with_fhirclient(smart: Any, paging: Paging) -> None:
    query = SmartImagingStudy.where({"patient": f"Patient/{paging.patient}", "_count": "50"})
    seen: list[str] = []
    sizes = []
    for bundle in query.perform_iter(smart.server):  # follows Bundle.link "next"
        assert bundle.total == len(paging.study_uids)
        page = [e.resource.id for e in bundle.entry or []]
        sizes.append(len(page))
        seen += page
    assert sizes == page_sizes(len(paging.study_uids), 50)
    assert len(seen) == len(set(seen)) and set(seen) == paging.study_uids


def test_paging_with_fhirpy_sync_and_async(
    validator: FHIRValidator, base: str, fhirpy_sync: Any, paging: Paging
) -> None:
    searchset = fhirpy_sync.resources("ImagingStudy").search(patient=f"Patient/{paging.patient}")
    assert searchset.count() == len(paging.study_uids)
    first = searchset.limit(50).fetch_raw()
    assert len(first["entry"]) == 50
    assert any(link["relation"] == "next" for link in first["link"])
    before = validator.validated["fhirpy-sync"]
    seen = [r.id for r in searchset.limit(50)]
    pages = len(page_sizes(len(paging.study_uids), 50))
    assert validator.validated["fhirpy-sync"] - before == pages  # one request per page of 50
    assert len(seen) == len(set(seen)) and set(seen) == paging.study_uids

    async def fetch_all() -> list[str]:
        client = validator.fhirpy_async(base)
        found = await (
            client.resources("ImagingStudy")
            .search(patient=f"Patient/{paging.patient}")
            .limit(50)
            .fetch_all()
        )
        return [r.id for r in found]

    seen_async = asyncio.run(fetch_all())
    assert len(seen_async) == len(set(seen_async)) and set(seen_async) == paging.study_uids


def test_paging_is_stable_while_studies_arrive(
    http: httpx.Client, fhir_server: RunningServer, paging: Paging
) -> None:
    expected = set(paging.study_uids)
    query = {"patient": f"Patient/{paging.patient}", "_count": "50", "_sort": "started"}
    bundle = search(http, "ImagingStudy", query)
    seen = ids(bundle)
    # Earlier studies: without the snapshot they would sort first and shift every later page.
    added = [
        make_study(1, patient_id=PAGING_PATIENT, patient_name="PAGER^PAUL", study_date="20230201")
        for _ in range(5)
    ]
    ingest(fhir_server, added)
    paging.study_uids |= {s.study_uid for s in added}
    sizes = [len(seen)]
    while True:
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        if "next" not in links:
            break
        assert "_snapshot=" in links["next"] and "_offset=" in links["next"]
        response = http.get(links["next"])
        assert response.status_code == 200
        bundle = response.json()
        assert bundle["total"] == len(expected)  # the snapshot's total
        seen += ids(bundle)
        sizes.append(len(ids(bundle)))
    assert sizes == page_sizes(len(expected), 50)
    assert len(seen) == len(set(seen)) and set(seen) == expected  # exactly the snapshot
    fresh = search(http, "ImagingStudy", {**query, "_count": "5"})
    assert fresh["total"] == len(expected) + 5
    assert set(ids(fresh)) == {s.study_uid for s in added}


# --- 5: an EHR's Patient, then images for it ---------------------------------------------------


def test_ehr_patient_then_images(
    smart: Any, http: httpx.Client, fhir_server: RunningServer, tmp_path: Path
) -> None:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-EHR-0001"}],
        "name": [{"use": "official", "family": "Schmidt", "given": ["Erika"]}],
        "gender": "female",
        "birthDate": "1964-08-12",
    }
    created = SmartPatient(body).create(smart.server)
    assert created["resourceType"] == "Patient"
    patient = created["id"]
    assert created["meta"]["versionId"] == "1"

    study = make_study(3, patient_id="FHIR-EHR-0001", patient_name="SCHMIDT-DICOM^E")
    send(fhir_server, study, tmp_path / "ehr")
    found = search(http, "ImagingStudy", {"patient": f"Patient/{patient}"})
    assert ids(found) == [study.study_uid]
    assert entries(found)[0]["subject"]["reference"] == f"Patient/{patient}"

    # The EHR's demographics, not the DICOM header's.
    view = SmartPatient.read(patient, smart.server)
    assert view.name[0].family == "Schmidt" and view.name[0].given == ["Erika"]
    assert view.birthDate.isostring == "1964-08-12"
    assert view.meta.versionId == "1"
    assert ids(search(http, "Patient", {"family": "Schmidt", "gender": "female"})) == [patient]
    assert search(http, "Patient", {"name": "SCHMIDT-DICOM"})["total"] == 0

    # Update with If-Match: the current version goes through, a stale one is refused.
    changed = {**body, "id": patient, "telecom": [{"system": "phone", "value": "+49 30 1234"}]}
    updated = http.put(
        f"/Patient/{patient}",
        json=changed,
        headers={"If-Match": 'W/"1"', "Content-Type": "application/fhir+json"},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2"
    assert updated.headers["etag"] == 'W/"2"'
    assert updated.headers["location"].endswith(f"/Patient/{patient}/_history/2")
    stale = http.put(
        f"/Patient/{patient}",
        json={**changed, "gender": "other"},
        headers={"If-Match": 'W/"1"', "Content-Type": "application/fhir+json"},
    )
    outcome(stale, 412, "conflict")
    assert http.get(f"/Patient/{patient}").json()["gender"] == "female"

    history = http.get(f"/Patient/{patient}/_history").json()
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]
    first = http.get(f"/Patient/{patient}/_history/1")
    second = http.get(f"/Patient/{patient}/_history/2")
    assert first.headers["etag"] == 'W/"1"' and "telecom" not in first.json()
    assert second.json()["telecom"] == [{"system": "phone", "value": "+49 30 1234"}]
    outcome(http.get(f"/Patient/{patient}/_history/3"), 404, "not-found")
    everyone = http.get("/Patient/_history", params={"_count": "500"}).json()
    mine = [e for e in everyone["entry"] if e["resource"]["id"] == patient]
    assert [e["resource"]["meta"]["versionId"] for e in mine] == ["2", "1"]


def test_create_for_a_dicom_patient_becomes_its_record(
    http: httpx.Client, fhir_server: RunningServer
) -> None:
    study = make_study(1, patient_id="FHIR-DICOM-FIRST", patient_name="FIRST^DICOM")
    ingest(fhir_server, [study])
    patient = patient_id_of(http, "FHIR-DICOM-FIRST")
    created = http.post(
        "/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-DICOM-FIRST"}],
            "name": [{"family": "Record", "given": ["Ehr"]}],
        },
        headers={"Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text
    assert created.json()["id"] == patient and created.json()["meta"]["versionId"] == "2"
    history = http.get(f"/Patient/{patient}/_history").json()
    assert [e["resource"]["name"][0]["family"] for e in history["entry"]] == ["Record", "FIRST"]
    # A second create of the same identifier is a conflict: update it instead.
    again = http.post(
        "/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-DICOM-FIRST"}],
        },
        headers={"Content-Type": "application/fhir+json"},
    )
    outcome(again, 409, "duplicate")


# --- 6: a DiagnosticReport's life: preliminary, final, amended ------------------------------------


def text_values(ds: Dataset) -> list[str]:
    found = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += text_values(item)
    return found


def sop_uid_of(report: dict[str, Any]) -> str:
    (identifier,) = [i for i in report["identifier"] if i["system"] == DICOM_UID]
    value = str(identifier["value"])
    assert value.startswith("urn:oid:")
    return value[8:]


def test_diagnostic_report_versions_as_dicom_sr(
    http: httpx.Client,
    fhirpy_sync: Any,
    validator: FHIRValidator,
    base: str,
    fhir_server: RunningServer,
    dicomweb: DICOMwebClient,
    tmp_path: Path,
) -> None:
    study = send(
        fhir_server,
        make_study(2, patient_id="FHIR-DR-0001", patient_name="REPORT^RITA"),
        tmp_path / "images",
    )
    patient = patient_id_of(http, study.patient_id)
    conclusion = "Keine Blutung — unauffällig"
    findings = "Befund: Hirnparenchym altersentsprechend, keine Raumforderung."
    draft = fhirpy_sync.resource(
        "DiagnosticReport",
        status="preliminary",
        code=REPORT_CODE,
        subject={"reference": f"Patient/{patient}"},
        imagingStudy=[{"reference": f"ImagingStudy/{study.study_uid}"}],
        conclusion=conclusion,
        presentedForm=[
            {"contentType": "text/plain", "data": base64.b64encode(findings.encode()).decode()}
        ],
    )
    draft.save()
    report_id = draft.id
    assert report_id and draft["meta"]["versionId"] == "1"
    assert draft["status"] == "preliminary"
    first = http.get(f"/DiagnosticReport/{report_id}").json()
    assert first["conclusion"] == conclusion
    assert first["subject"] == {"reference": f"Patient/{patient}"}
    assert first["imagingStudy"] == [{"reference": f"ImagingStudy/{study.study_uid}"}]
    text = base64.b64decode(first["presentedForm"][0]["data"]).decode()
    assert text.startswith(findings) and conclusion in text  # the whole report as issued
    assert first["presentedForm"][0]["contentType"].startswith("text/plain")
    assert sop_uid_of(first) == report_id  # the id is the first version's SOP Instance UID

    # The SR is in the study: C-FIND (DCMTK findscu) and QIDO-RS see it.
    series = findscu(
        fhir_server,
        tmp_path / "find-series",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study.study_uid}",
            "Modality=SR",
            "SeriesInstanceUID",
            "SeriesNumber",
        ],
    )
    assert len(series) == 1 and int(series[0].SeriesNumber) == 9000
    sr_series = str(series[0].SeriesInstanceUID)
    images = findscu(
        fhir_server,
        tmp_path / "find-images",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study.study_uid}",
            f"SeriesInstanceUID={sr_series}",
            "SOPInstanceUID",
            "SOPClassUID",
        ],
    )
    assert [(str(i.SOPInstanceUID), str(i.SOPClassUID)) for i in images] == [
        (report_id, ENHANCED_SR)
    ]
    qido = dicomweb.search_for_series(study.study_uid, search_filters={"Modality": "SR"})
    assert [s["0020000E"]["Value"][0] for s in qido] == [sr_series]
    sr1 = dicomweb.retrieve_instance(study.study_uid, sr_series, report_id)
    assert sr1.VerificationFlag == "UNVERIFIED" and sr1.CompletionFlag == "COMPLETE"
    assert str(sr1.PatientID) == study.patient_id
    assert conclusion in text_values(sr1)
    assert "PredecessorDocumentsSequence" not in sr1

    # Final, with If-Match: a VERIFIED SR document, version 2.
    final_body = {
        **first,
        "status": "final",
        "resultsInterpreter": [{"display": "Jane Smith"}],
    }
    final_body.pop("meta")
    stale = http.put(
        f"/DiagnosticReport/{report_id}",
        json=final_body,
        headers={"If-Match": 'W/"7"', "Content-Type": "application/fhir+json"},
    )
    outcome(stale, 412, "conflict")
    final = http.put(
        f"/DiagnosticReport/{report_id}",
        json=final_body,
        headers={"If-Match": 'W/"1"', "Content-Type": "application/fhir+json"},
    )
    assert final.status_code == 200, final.text
    assert final.json()["meta"]["versionId"] == "2" and final.json()["status"] == "final"
    assert final.json()["resultsInterpreter"] == [{"display": "Jane Smith"}]
    assert final.json()["id"] == report_id
    sop2 = sop_uid_of(final.json())
    assert sop2 != report_id
    sr2 = dicomweb.retrieve_instance(study.study_uid, sr_series, sop2)
    assert sr2.VerificationFlag == "VERIFIED"
    assert str(sr2.VerifyingObserverSequence[0].VerifyingObserverName) == "Smith^Jane"
    predecessor = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == report_id
    # A final report is changed by amending it, not by another "final".
    refused = http.put(
        f"/DiagnosticReport/{report_id}",
        json={**final_body, "conclusion": "changed"},
        headers={"Content-Type": "application/fhir+json"},
    )
    outcome(refused, 422, "business-rule")

    # Amended: version 3, whose predecessor is version 2.
    amended_text = "Keine Blutung. Nachtrag: kleine Zyste links frontal (8 mm)."
    amended = http.put(
        f"/DiagnosticReport/{report_id}",
        json={**final_body, "status": "amended", "conclusion": amended_text},
        headers={"If-Match": 'W/"2"', "Content-Type": "application/fhir+json"},
    )
    assert amended.status_code == 200, amended.text
    assert amended.json()["meta"]["versionId"] == "3" and amended.json()["status"] == "amended"
    assert amended.json()["conclusion"] == amended_text
    sop3 = sop_uid_of(amended.json())
    sr3 = dicomweb.retrieve_instance(study.study_uid, sr_series, sop3)
    assert sr3.VerificationFlag == "VERIFIED"
    (prior,) = sr3.PredecessorDocumentsSequence
    assert prior.StudyInstanceUID == study.study_uid
    (prior_series,) = prior.ReferencedSeriesSequence
    assert prior_series.SeriesInstanceUID == sr_series
    (prior_sop,) = prior_series.ReferencedSOPSequence
    assert prior_sop.ReferencedSOPInstanceUID == sop2
    assert prior_sop.ReferencedSOPClassUID == ENHANCED_SR
    assert amended_text in text_values(sr3)
    every = findscu(
        fhir_server,
        tmp_path / "find-versions",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study.study_uid}",
            f"SeriesInstanceUID={sr_series}",
            "SOPInstanceUID",
        ],
    )
    assert {str(i.SOPInstanceUID) for i in every} == {report_id, sop2, sop3}  # every version kept

    # _history lists the three versions, newest first; vread of each.
    history = http.get(f"/DiagnosticReport/{report_id}/_history").json()
    assert history["total"] == 3
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["3", "2", "1"]
    assert [e["resource"]["status"] for e in history["entry"]] == [
        "amended",
        "final",
        "preliminary",
    ]
    assert [sop_uid_of(e["resource"]) for e in history["entry"]] == [sop3, sop2, report_id]
    for version, status in (("1", "preliminary"), ("2", "final"), ("3", "amended")):
        old = http.get(f"/DiagnosticReport/{report_id}/_history/{version}")
        assert old.status_code == 200 and old.json()["status"] == status
        assert old.headers["etag"] == f'W/"{version}"'
    assert http.get(f"/DiagnosticReport/{report_id}").json()["meta"]["versionId"] == "3"

    # Searches see the current version only.
    def report_ids(**params: str) -> list[str]:
        return ids(search(http, "DiagnosticReport", params))

    assert report_ids(patient=f"Patient/{patient}") == [report_id]
    assert report_ids(subject=f"Patient/{patient}", status="amended") == [report_id]
    assert report_ids(subject=f"Patient/{patient}", status="preliminary") == []
    assert report_ids(**{"imaging-study": f"ImagingStudy/{study.study_uid}"}) == [report_id]
    assert report_ids(identifier=f"{DICOM_UID}|urn:oid:{sop2}") == [report_id]
    assert report_ids(
        patient=f"Patient/{patient}", category="RAD", code="http://loinc.org|18748-4"
    ) == [report_id]
    with_results = search(
        http,
        "DiagnosticReport",
        {"_id": report_id, "_include": "DiagnosticReport:result"},
    )
    assert ids(with_results) == [report_id]
    assert entries(with_results, "include") == []  # a text report has no Observations
    assert "result" not in entries(with_results)[0]
    with_reports = search(
        http,
        "ImagingStudy",
        {"_id": study.study_uid, "_revinclude": "DiagnosticReport:imaging-study"},
    )
    assert ids(with_reports) == [study.study_uid]
    (included,) = entries(with_reports, "include")
    assert included["resourceType"] == "DiagnosticReport" and included["id"] == report_id
    assert included["meta"]["versionId"] == "3"
    # The study lists the report series, its documents titled.
    imaging = entries(with_reports)[0]
    assert imaging["numberOfSeries"] == 2 and imaging["numberOfInstances"] == 5
    assert {"CT", "SR"} == {m["code"] for m in imaging["modality"]}

    async def async_reports() -> list[str]:
        client = validator.fhirpy_async(base)
        found = await (
            client.resources("DiagnosticReport").search(patient=f"Patient/{patient}").fetch_all()
        )
        return [r.id for r in found]

    assert asyncio.run(async_reports()) == [report_id]


def test_report_read_and_written_back_keeps_its_text(
    http: httpx.Client, fhir_server: RunningServer
) -> None:
    """An EHR reads a report, changes its status and PUTs it back: the text stays as it was
    (``presentedForm`` as read already holds the conclusion; it must not be added again)."""
    study = make_study(1, patient_id="FHIR-RT-0001", patient_name="ROUND^TRIP")
    ingest(fhir_server, [study])
    created = http.post(
        "/DiagnosticReport",
        json={
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": REPORT_CODE,
            "imagingStudy": [{"reference": f"ImagingStudy/{study.study_uid}"}],
            "conclusion": "Kein Nachweis einer Fraktur.",
            "presentedForm": [
                {"contentType": "text/plain", "data": base64.b64encode(b"Befund.").decode()}
            ],
        },
        headers=JSON,
    )
    assert created.status_code == 201, created.text
    read = created.json()
    text = base64.b64decode(read["presentedForm"][0]["data"]).decode()
    written = {k: v for k, v in read.items() if k != "meta"}
    written |= {"status": "final", "resultsInterpreter": [{"display": "Jane Smith"}]}
    final = http.put(
        f"/DiagnosticReport/{read['id']}", json=written, headers={**JSON, "If-Match": 'W/"1"'}
    )
    assert final.status_code == 200, final.text
    assert final.json()["conclusion"] == read["conclusion"]
    assert base64.b64decode(final.json()["presentedForm"][0]["data"]).decode() == text


def test_deleted_study_answers_gone(http: httpx.Client, fhir_server: RunningServer) -> None:
    study = make_study(1, patient_id="FHIR-DEL-0001", patient_name="GONE^GUS")
    ingest(fhir_server, [study])
    created = http.post(
        "/DiagnosticReport",
        json={
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": REPORT_CODE,
            "imagingStudy": [{"reference": f"ImagingStudy/{study.study_uid}"}],
            "conclusion": "Normal.",
            "resultsInterpreter": [{"display": "Smith, Jane"}],
        },
        headers={"Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text
    report = created.json()["id"]
    assert created.json()["status"] == "final"
    assert http.get(f"/ImagingStudy/{study.study_uid}").status_code == 200
    with closing(fhir_server.archive()) as archive:
        assert archive.delete_study(study.study_uid) == 2  # the image and the report
    outcome(http.get(f"/ImagingStudy/{study.study_uid}"), 410, "deleted")
    outcome(http.get(f"/DiagnosticReport/{report}"), 410, "deleted")
    assert search(http, "ImagingStudy", {"_id": study.study_uid})["total"] == 0
    assert search(http, "DiagnosticReport", {"_id": report})["total"] == 0


# --- 7: errors speak OperationOutcome -----------------------------------------------------------


@pytest.fixture(scope="module")
def some_patient(http: httpx.Client) -> str:
    created = http.post(
        "/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-ERR-0001"}],
            "name": [{"family": "Errorson", "given": ["Eve"]}],
        },
        headers={"Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


JSON = {"Content-Type": "application/fhir+json"}


def test_malformed_and_wrong_bodies(http: httpx.Client, ct_study: StudyData) -> None:
    outcome(
        http.post("/Patient", content=b'{"resourceType": "Patient",', headers=JSON),
        400,
        "structure",
    )
    outcome(http.post("/Patient", content=b"[1, 2]", headers=JSON), 400, "structure")
    wrong_type = http.post(
        "/DiagnosticReport",
        json={"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "X"}]},
        headers=JSON,
    )
    body = outcome(wrong_type, 400, "invalid")
    assert body["issue"][0]["expression"] == ["resourceType"]
    invalid = http.post(
        "/Patient",
        json={"resourceType": "Patient", "gender": 12, "birthDate": "not a date"},
        headers=JSON,
    )
    body = outcome(invalid, 400, "structure")
    assert any("birthDate" in e or "gender" in e for e in body["issue"][0].get("expression", []))
    outcome(
        http.post("/Patient", content=b"<Patient/>", headers={"Content-Type": "application/xml"}),
        415,
        "not-supported",
    )
    outcome(
        http.post("/Patient", content=b"{}", headers={"Content-Type": "text/plain"}),
        415,
        "not-supported",
    )
    no_study = http.post(
        "/DiagnosticReport",
        json={
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": REPORT_CODE,
            "conclusion": "x",
        },
        headers=JSON,
    )
    outcome(no_study, 422, "required")
    unsigned = http.post(
        "/DiagnosticReport",
        json={
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": REPORT_CODE,
            "imagingStudy": [{"reference": f"ImagingStudy/{ct_study.study_uid}"}],
            "conclusion": "x",
        },
        headers=JSON,
    )
    outcome(unsigned, 422, "required")  # final needs who verified it


def test_search_parameter_handling(http: httpx.Client) -> None:
    lenient = search(http, "ImagingStudy", {"frobnicate": "1", "_count": "1"})
    (report,) = entries(lenient, "outcome")
    assert report["resourceType"] == "OperationOutcome"
    assert report["issue"][0]["code"] == "not-supported"
    assert report["issue"][0]["severity"] == "warning"
    assert "frobnicate" in report["issue"][0]["diagnostics"]
    strict = http.get(
        "/ImagingStudy", params={"frobnicate": "1"}, headers={"Prefer": "handling=strict"}
    )
    body = outcome(strict, 400, "not-supported")
    assert "frobnicate" in body["issue"][0]["diagnostics"]
    outcome(http.get("/ImagingStudy", params={"started": "yesterday"}), 400, "invalid")
    outcome(http.get("/ImagingStudy", params={"_count": "-1"}), 400, "invalid")
    outcome(http.get("/ImagingStudy", params={"_sort": "color"}), 400, "invalid")
    outcome(http.get("/ImagingStudy", params={"_include": "ImagingStudy:basedOn"}), 400, "invalid")
    outcome(http.get("/ImagingStudy", params={"_summary": "maybe"}), 400, "invalid")


def test_not_found_not_allowed_and_formats(
    http: httpx.Client, some_patient: str, base: str
) -> None:
    outcome(http.get("/Patient/999999999"), 404, "not-found")
    outcome(http.get("/Patient/not-a-number"), 404, "not-found")
    outcome(http.get("/ImagingStudy/1.2.3.4.5.6.7.8.9"), 404, "not-found")
    outcome(http.get("/DiagnosticReport/1.2.3.4.5.6.7.8.9"), 404, "not-found")
    outcome(http.get("/Endpoint/other"), 404, "not-found")
    outcome(http.get("/Device/no-such-model"), 404, "not-found")
    outcome(http.get("/Observation/424242"), 404, "not-found")
    outcome(http.get("/Medication/1"), 404, "not-supported")
    outcome(http.get("/Medication"), 404, "not-supported")
    outcome(http.delete(f"/Patient/{some_patient}"), 405, "not-supported")
    patch = http.patch(
        f"/Patient/{some_patient}",
        content=b"[]",
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert patch.status_code == 405, patch.text
    assert patch.headers["content-type"].startswith("application/fhir+json"), patch.headers
    assert patch.json()["resourceType"] == "OperationOutcome", patch.text
    outcome(
        http.post("/ImagingStudy", json={"resourceType": "ImagingStudy"}, headers=JSON),
        405,
        "not-supported",
    )
    outcome(
        http.put("/Patient/999999999", json={"resourceType": "Patient"}, headers=JSON),
        405,
        "not-supported",
    )
    mismatch = http.put(
        f"/Patient/{some_patient}",
        json={"resourceType": "Patient", "id": "1" + some_patient},
        headers=JSON,
    )
    outcome(mismatch, 400, "invalid")

    # Formats: JSON as asked.
    plain = http.get(f"/Patient/{some_patient}", params={"_format": "application/json"})
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("application/json")
    accepted = http.get(f"/Patient/{some_patient}", headers={"Accept": "application/json"})
    assert accepted.headers["content-type"].startswith("application/json")
    fhir = http.get(f"/Patient/{some_patient}", params={"_format": "json"})
    assert fhir.headers["content-type"].startswith("application/fhir+json")
    pretty = http.get(f"/Patient/{some_patient}", params={"_pretty": "true"})
    assert pretty.text.startswith("{\n  ") and pretty.json() == fhir.json()
    assert "\n" not in fhir.text
    assert http.get("/metadata").json()["implementation"]["url"] == base


def test_xml_is_not_acceptable(http: httpx.Client, some_patient: str) -> None:
    """This server writes JSON only: ``_format=xml`` and an XML-only Accept are 406 (in JSON)."""
    outcome(http.get("/metadata", params={"_format": "xml"}), 406, "not-supported")
    outcome(http.get(f"/Patient/{some_patient}", params={"_format": "xml"}), 406, "not-supported")
    outcome(http.get("/Patient", params={"_format": "application/fhir+xml"}), 406, "not-supported")
    outcome(http.get("/metadata", headers={"Accept": "application/fhir+xml"}), 406, "not-supported")


def test_conditional_create_and_prefer(http: httpx.Client, some_patient: str) -> None:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-ERR-0001"}],
        "name": [{"family": "Other"}],
    }
    existing = http.post(
        "/Patient",
        json=body,
        headers={**JSON, "If-None-Exist": f"identifier={PATIENT_SYSTEM}|FHIR-ERR-0001"},
    )
    assert existing.status_code == 200, existing.text
    assert existing.json()["id"] == some_patient
    assert existing.json()["name"][0]["family"] == "Errorson"  # untouched
    fresh_body = {**body, "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-COND-0001"}]}
    fresh = http.post(
        "/Patient",
        json=fresh_body,
        headers={**JSON, "If-None-Exist": f"identifier={PATIENT_SYSTEM}|FHIR-COND-0001"},
    )
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["id"] != some_patient
    repeated = http.post(
        "/Patient",
        json=fresh_body,
        headers={**JSON, "If-None-Exist": f"identifier={PATIENT_SYSTEM}|FHIR-COND-0001"},
    )
    assert repeated.status_code == 200 and repeated.json()["id"] == fresh.json()["id"]

    minimal = http.post(
        "/Patient",
        json={**body, "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-MIN-0001"}]},
        headers={**JSON, "Prefer": "return=minimal"},
    )
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["etag"] == 'W/"1"'
    location = minimal.headers["location"]
    assert location.startswith("http") and location.endswith("/_history/1")
    stored = http.get(location)
    assert stored.status_code == 200
    assert stored.json()["identifier"][0]["value"] == "FHIR-MIN-0001"
    informed = http.put(
        location.rsplit("/_history/", 1)[0],
        json={**stored.json(), "gender": "male"},
        headers={**JSON, "Prefer": "return=OperationOutcome", "If-Match": 'W/"1"'},
    )
    assert informed.status_code == 200
    assert informed.json()["resourceType"] == "OperationOutcome"
    assert informed.json()["issue"][0]["severity"] == "information"
    assert informed.headers["etag"] == 'W/"2"'


# --- 8: Patient search ----------------------------------------------------------------------------


@dataclass
class Patients:
    ids: dict[str, str]  # key -> id
    before: str


@pytest.fixture(scope="module")
def patients(http: httpx.Client) -> Patients:
    before = utc_now()
    time.sleep(0.01)
    people = {
        "erika": ("Quaxley", ["Erika", "Maria"], "female", "1981-03-04"),
        "otto": ("Quaxley", ["Otto"], "male", "1981-03-05"),
        "ida": ("Quaxleyson", ["Ida"], "female", "1990-12-31"),
        "kim": ("Vanquaxley", ["Kim"], "other", "2001-07-15"),
    }
    created = {}
    for key, (family, given, gender, birth) in people.items():
        response = http.post(
            "/Patient",
            json={
                "resourceType": "Patient",
                "identifier": [{"system": PATIENT_SYSTEM, "value": f"FHIR-SEARCH-{key}"}],
                "name": [{"use": "official", "family": family, "given": given}],
                "gender": gender,
                "birthDate": birth,
            },
            headers=JSON,
        )
        assert response.status_code == 201, response.text
        created[key] = str(response.json()["id"])
    return Patients(created, before)


def test_patient_search(http: httpx.Client, patients: Patients) -> None:
    p = patients.ids

    def found(params: dict[str, str]) -> set[str]:
        bundle = search(http, "Patient", {**params, "_count": "100"})
        assert bundle["total"] == len(ids(bundle))
        return set(ids(bundle)) & set(p.values())

    def named(*keys: str) -> set[str]:
        return {p[k] for k in keys}

    assert found({"identifier": f"{PATIENT_SYSTEM}|FHIR-SEARCH-otto"}) == named("otto")
    assert found({"identifier": "FHIR-SEARCH-ida"}) == named("ida")
    assert found({"identifier": "urn:other:system|FHIR-SEARCH-ida"}) == set()
    assert found({"name": "quax"}) == named("erika", "otto", "ida")
    assert found({"family": "Quaxley"}) == named("erika", "otto", "ida")
    assert found({"family:exact": "Quaxley"}) == named("erika", "otto")
    assert found({"family:contains": "quaxley"}) == named("erika", "otto", "ida", "kim")
    assert found({"name:contains": "axleys"}) == named("ida")
    assert found({"given": "Eri"}) == named("erika")
    assert found({"given": "Maria"}) == named("erika")  # a second given name
    assert found({"given:exact": "Otto"}) == named("otto")
    assert found({"given:exact": "Ott"}) == set()
    assert found({"family": "Quaxley", "given": "Otto"}) == named("otto")
    assert found({"name": "Otto,Ida"}) == named("otto", "ida")
    assert found({"family:contains": "quaxley", "birthdate": "ge1981-03-05"}) == named(
        "otto", "ida", "kim"
    )
    assert found({"family:contains": "quaxley", "birthdate": "le1981-03-04"}) == named("erika")
    assert found({"family:contains": "quaxley", "birthdate": "eb1981-03-05"}) == named("erika")
    assert found({"family:contains": "quaxley", "birthdate": "sa1990-12-30"}) == named("ida", "kim")
    assert found({"family:contains": "quaxley", "birthdate": "gt1990-12-31"}) == named("kim")
    assert found({"family:contains": "quaxley", "gender": "female"}) == named("erika", "ida")
    assert found({"family:contains": "quaxley", "gender": "male"}) == named("otto")
    assert found({"family:contains": "quaxley", "gender": "other"}) == named("kim")
    assert found({"family:contains": "quaxley", "_lastUpdated": f"ge{patients.before}"}) == named(
        "erika", "otto", "ida", "kim"
    )
    assert found({"family:contains": "quaxley", "_lastUpdated": f"lt{patients.before}"}) == set()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="seconds")
    assert found({"family:contains": "quaxley", "_lastUpdated": f"gt{later}"}) == set()
    ordered = search(
        http, "Patient", {"family:contains": "quaxley", "_sort": "-birthdate", "_count": "10"}
    )
    assert ids(ordered) == [p["kim"], p["ida"], p["otto"], p["erika"]]
    # POST _search takes the same parameters in a form body; its audit event keeps them.
    posted = http.post(
        "/Patient/_search?_count=5",
        content=b"family=Quaxleyson&birthdate=ge1900-01-01",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert posted.status_code == 200 and ids(posted.json()) == [p["ida"]]
    wanted = "_count=5&family=Quaxleyson&birthdate=ge1900-01-01"
    queries: list[str] = []
    deadline = time.monotonic() + 10  # read events are written in the background
    while wanted not in queries and time.monotonic() < deadline:
        time.sleep(0.1)
        trail = http.get(
            "/AuditEvent", params={"action": "E", "_sort": "-date", "_count": "50"}
        ).json()
        queries = [
            base64.b64decode(entity["query"]).decode()
            for entry in trail.get("entry", [])
            for entity in entry["resource"].get("entity", [])
            if "query" in entity
        ]
    assert wanted in queries


def test_patient_birthdate_equals_a_day(http: httpx.Client, patients: Patients) -> None:
    """A birthDate is the range of its day: ``eq`` of that day (or month) holds it."""
    p = patients.ids

    def found(value: str) -> set[str]:
        return set(ids(search(http, "Patient", {"birthdate": value}))) & set(p.values())

    assert found("1981-03-04") == {p["erika"]}
    assert found("eq1981-03-05") == {p["otto"]}
    assert found("1981-03") == {p["erika"], p["otto"]}
    assert found("1981") == {p["erika"], p["otto"]}
    assert found("ne1981-03-04") == {p["otto"], p["ida"], p["kim"]}
    assert found("lt1981-03-05") == {p["erika"]}
    assert found("ge1981-03-05") == {p["otto"], p["ida"], p["kim"]}
    both = search(http, "Patient", [("birthdate", "lt1981-03-05"), ("birthdate", "gt1981-03-03")])
    assert set(ids(both)) & set(p.values()) == {p["erika"]}


def test_patient_name_exact_is_case_sensitive(http: httpx.Client, patients: Patients) -> None:
    """search.html#string: ``:exact`` matches the whole string *including casing*."""
    bundle = search(http, "Patient", {"family:exact": "quaxley"})
    assert set(ids(bundle)) & set(patients.ids.values()) == set()


# --- 9: ImagingStudy search -----------------------------------------------------------------------


@dataclass
class Dated:
    patient: str
    uids: dict[str, str]  # date -> study uid
    studies: dict[str, StudyData]


@pytest.fixture(scope="module")
def dated(fhir_server: RunningServer, http: httpx.Client) -> Dated:
    plan = {"20190101": "CT", "20210601": "CT", "20210615": "MR", "20210701": "CT"}
    studies = {
        date: make_study(2, patient_id="FHIR-DATES-0001", study_date=date, modality=modality)
        for date, modality in plan.items()
    }
    ingest(fhir_server, list(studies.values()))
    return Dated(
        patient_id_of(http, "FHIR-DATES-0001"),
        {date: s.study_uid for date, s in studies.items()},
        studies,
    )


def test_imaging_study_search(http: httpx.Client, dated: Dated) -> None:
    u = dated.uids

    def found(**params: str) -> list[str]:
        bundle = search(http, "ImagingStudy", {"patient": dated.patient, **params})
        assert bundle["total"] == len(ids(bundle))
        return ids(bundle)

    def on(*dates: str) -> set[str]:
        return {u[d] for d in dates}

    assert set(found()) == on("20190101", "20210601", "20210615", "20210701")
    assert set(found(started="2021-06-15")) == on("20210615")
    assert set(found(started="eq2021-06")) == on("20210601", "20210615")
    assert set(found(started="ge2021-06-15")) == on("20210615", "20210701")
    assert set(found(started="gt2021-06-15")) == on("20210701")
    assert set(found(started="lt2021-06-15")) == on("20190101", "20210601")
    assert set(found(started="le2021-06-15")) == on("20190101", "20210601", "20210615")
    assert set(found(started="sa2021-06-15")) == on("20210701")
    assert set(found(started="eb2021-06-15")) == on("20190101", "20210601")
    assert set(found(started="ap2021-06-15")) == on("20210601", "20210615", "20210701")
    assert set(found(started="ne2021-06-15")) == on("20190101", "20210601", "20210701")
    assert set(found(started="2021-06-15T11:00:00")) == set()
    assert set(found(started="gt2021-06-15T10:14:00")) == on("20210615", "20210701")
    bundle = search(
        http,
        "ImagingStudy",
        [("patient", dated.patient), ("started", "ge2021-01-01"), ("started", "lt2021-07-01")],
    )
    assert set(ids(bundle)) == on("20210601", "20210615")
    assert set(found(modality="MR")) == on("20210615")
    assert set(found(modality=f"{DCM}|CT")) == on("20190101", "20210601", "20210701")
    assert set(found(modality="MR,CT")) == set(u.values())
    assert set(found(modality="urn:other|CT")) == set()
    series = dated.studies["20210601"].series_uid
    assert found(series=series) == [u["20210601"]]
    assert found(series=f"urn:oid:{series}") == [u["20210601"]]
    assert found(**{"dicom-class": f"urn:oid:{MRImageStorage}"}) == [u["20210615"]]
    assert found(**{"dicom-class": str(MRImageStorage)}) == [u["20210615"]]
    assert set(found(**{"dicom-class": f"urn:ietf:rfc:3986|urn:oid:{CTImageStorage}"})) == on(
        "20190101", "20210601", "20210701"
    )
    assert found(bodysite="69536005") == found(_sort="started")  # every study is of the head
    assert found(_sort="-started") == [u["20210701"], u["20210615"], u["20210601"], u["20190101"]]
    assert found(_sort="started") == [u["20190101"], u["20210601"], u["20210615"], u["20210701"]]
    mr = search(http, "ImagingStudy", {"_id": u["20210615"]})
    assert entries(mr)[0]["series"][0]["modality"]["code"] == "MR"
    assert entries(mr)[0]["started"] == "2021-06-15T10:15:00+02:00"  # summer time in Berlin

    counted = search(http, "ImagingStudy", {"patient": dated.patient, "_summary": "count"})
    assert counted["total"] == 4 and "entry" not in counted
    zero = search(http, "ImagingStudy", {"patient": dated.patient, "_count": "0"})
    assert zero["total"] == 4 and "entry" not in zero
    assert [link["relation"] for link in zero["link"]] == ["self"]
    none = search(http, "ImagingStudy", {"patient": dated.patient, "_total": "none"})
    assert "total" not in none and len(ids(none)) == 4
    summary = search(http, "ImagingStudy", {"_id": u["20210701"], "_summary": "true"})
    (short,) = entries(summary)
    assert short["meta"]["tag"][0]["code"] == SUBSETTED and short["numberOfInstances"] == 2
    assert short["subject"]["reference"] == f"Patient/{dated.patient}"
    assert "description" not in short  # not a summary element
    data = search(http, "ImagingStudy", {"_id": u["20210701"], "_summary": "data"})
    assert entries(data)[0]["meta"]["tag"][0]["code"] == SUBSETTED
    assert (
        entries(data)[0]["series"]
        == entries(search(http, "ImagingStudy", {"_id": u["20210701"]}))[0]["series"]
    )


def test_elements_keep_the_mandatory_elements(http: httpx.Client, dated: Dated) -> None:
    """``_elements`` (search.html#elements): only the elements asked for, plus the mandatory
    ones (ImagingStudy.status and .subject are 1..1), tagged SUBSETTED."""
    u = dated.uids
    subset = search(
        http,
        "ImagingStudy",
        {"patient": dated.patient, "_elements": "id,started", "_sort": "started"},
    )
    for resource in entries(subset):
        assert set(resource) == {"resourceType", "id", "meta", "started", "status", "subject"}
        assert resource["meta"]["tag"][0]["code"] == SUBSETTED
    assert [r["started"][:10] for r in entries(subset)] == [
        "2019-01-01",
        "2021-06-01",
        "2021-06-15",
        "2021-07-01",
    ]
    read_subset = http.get(f"/ImagingStudy/{u['20210701']}", params={"_elements": "started"})
    assert read_subset.status_code == 200
    assert set(read_subset.json()) == {
        "resourceType",
        "id",
        "meta",
        "started",
        "status",
        "subject",
    }


def test_started_with_a_time_and_a_zone(http: httpx.Client, dated: Dated) -> None:
    """``started`` at second precision and with a zone (search.html#date): the MR study began
    2021-06-15 10:15:00 in Europe/Berlin (the server's DICOM zone), 08:15:00 UTC."""
    mr = dated.uids["20210615"]

    def found(value: str) -> bool:
        bundle = search(http, "ImagingStudy", {"patient": dated.patient, "started": value})
        return mr in ids(bundle)

    assert found("2021-06-15T10:15:00")
    assert found("2021-06-15T10:15")
    assert found("ge2021-06-15T10:15:00")
    assert found("2021-06-15T10:15:00+02:00")
    assert found("2021-06-15T08:15:00Z")
    assert not found("2021-06-15T10:15:00Z")  # 12:15 in Berlin
    assert not found("ge2021-06-15T09:00:00Z")  # 11:00 in Berlin
    assert found("lt2021-06-15T09:00:00Z")


# --- 10: type-level history ---------------------------------------------------------------------


def history_of(http: httpx.Client, path: str, params: Any = None) -> dict[str, Any]:
    response = http.get(path, params=params)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history", bundle
    return bundle


def versions(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    """(id, versionId) of a history Bundle's entries, in their order."""
    return [
        (e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in bundle.get("entry", [])
    ]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    found = [item["url"] for item in bundle.get("link", []) if item["relation"] == relation]
    return found[0] if found else None


def new_patient(http: httpx.Client, value: str, **elements: Any) -> str:
    response = http.post(
        "/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": value}],
            **elements,
        },
        headers=JSON,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_patient_type_history_is_paged_newest_first(http: httpx.Client) -> None:
    before = utc_now()
    time.sleep(0.01)
    first = new_patient(http, "FHIR-HIST-A", name=[{"family": "Historia", "given": ["Anna"]}])
    second = new_patient(http, "FHIR-HIST-B", name=[{"family": "Historia", "given": ["Berta"]}])
    time.sleep(0.01)
    middle = utc_now()
    time.sleep(0.01)
    changed = http.put(
        f"/Patient/{first}",
        json={
            "resourceType": "Patient",
            "id": first,
            "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-HIST-A"}],
            "name": [{"family": "Historia", "given": ["Anna", "Maria"]}],
        },
        headers={**JSON, "If-Match": 'W/"1"'},
    )
    assert changed.status_code == 200, changed.text
    time.sleep(0.01)
    after = utc_now()

    expected = [(first, "2"), (second, "1"), (first, "1")]
    every = history_of(http, "/Patient/_history", {"_since": before})
    assert every["total"] == 3 and versions(every) == expected
    assert [e["request"]["method"] for e in every["entry"]] == ["PUT", "POST", "POST"]
    assert every["entry"][0]["request"]["url"] == f"Patient/{first}"
    assert every["entry"][1]["request"]["url"] == "Patient"
    assert [e["response"]["etag"] for e in every["entry"]] == ['W/"2"', 'W/"1"', 'W/"1"']
    assert every["entry"][0]["resource"]["name"][0]["given"] == ["Anna", "Maria"]
    assert every["entry"][2]["resource"]["name"][0]["given"] == ["Anna"]

    # Paged with _count; the next link carries _offset (and the same _since).
    page = history_of(http, "/Patient/_history", {"_since": before, "_count": "2"})
    assert page["total"] == 3 and versions(page) == expected[:2]
    following = link(page, "next")
    assert following is not None and "_offset=2" in following and "_since=" in following
    rest = history_of(http, following)
    assert rest["total"] == 3 and versions(rest) == expected[2:]
    assert link(rest, "next") is None
    offset = history_of(http, "/Patient/_history", {"_since": before, "_offset": "1"})
    assert versions(offset) == expected[1:]

    assert versions(history_of(http, "/Patient/_history", {"_since": middle})) == expected[:1]
    nothing = history_of(http, "/Patient/_history", {"_since": after})
    assert nothing["total"] == 0 and "entry" not in nothing
    # Without _since: every version of every patient, the newest first.
    newest = history_of(http, "/Patient/_history", {"_count": "1"})
    assert newest["total"] >= 3 and versions(newest) == expected[:1]
    assert link(newest, "next") is not None

    # Instance history: the same paging and _since.
    own = history_of(http, f"/Patient/{first}/_history", {"_count": "1"})
    assert own["total"] == 2 and versions(own) == [(first, "2")]
    following = link(own, "next")
    assert following is not None
    assert versions(history_of(http, following)) == [(first, "1")]
    assert versions(history_of(http, f"/Patient/{first}/_history", {"_since": middle})) == [
        (first, "2")
    ]

    outcome(http.get("/Patient/_history", params={"_since": "yesterday"}), 400, "invalid")
    outcome(http.get("/Patient/_history", params={"_count": "-1"}), 400, "invalid")
    outcome(http.get("/Patient/_history", params={"_offset": "x"}), 400, "invalid")


def test_report_type_history_is_paged_newest_first(
    http: httpx.Client, fhir_server: RunningServer
) -> None:
    study = make_study(1, patient_id="FHIR-DRHIST-0001", patient_name="HISTORY^HANS")
    ingest(fhir_server, [study])
    before = utc_now()
    time.sleep(0.01)

    def create(conclusion: str) -> str:
        response = http.post(
            "/DiagnosticReport",
            json={
                "resourceType": "DiagnosticReport",
                "status": "preliminary",
                "code": REPORT_CODE,
                "imagingStudy": [{"reference": f"ImagingStudy/{study.study_uid}"}],
                "conclusion": conclusion,
            },
            headers=JSON,
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    first = create("Erster Bericht.")
    second = create("Zweiter Bericht.")
    final = http.put(
        f"/DiagnosticReport/{first}",
        json={
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": REPORT_CODE,
            "imagingStudy": [{"reference": f"ImagingStudy/{study.study_uid}"}],
            "conclusion": "Erster Bericht, final.",
            "resultsInterpreter": [{"display": "Jane Smith"}],
        },
        headers={**JSON, "If-Match": 'W/"1"'},
    )
    assert final.status_code == 200, final.text

    expected = [(first, "2"), (second, "1"), (first, "1")]
    every = history_of(http, "/DiagnosticReport/_history", {"_since": before})
    assert every["total"] == 3 and versions(every) == expected
    assert [e["resource"]["status"] for e in every["entry"]] == [
        "final",
        "preliminary",
        "preliminary",
    ]
    assert [e["resource"]["conclusion"] for e in every["entry"]] == [
        "Erster Bericht, final.",
        "Zweiter Bericht.",
        "Erster Bericht.",
    ]
    assert [e["request"]["method"] for e in every["entry"]] == ["PUT", "POST", "POST"]
    page = history_of(http, "/DiagnosticReport/_history", {"_since": before, "_count": "2"})
    assert page["total"] == 3 and versions(page) == expected[:2]
    following = link(page, "next")
    assert following is not None and "_offset=2" in following
    rest = history_of(http, following)
    assert versions(rest) == expected[2:] and link(rest, "next") is None
    newest = history_of(http, "/DiagnosticReport/_history", {"_count": "1"})
    assert versions(newest) == expected[:1] and newest["total"] >= 3
    later = history_of(http, "/DiagnosticReport/_history", {"_since": utc_now()})
    assert later["total"] == 0


# --- 11: ImagingStudy versions move when instances go -------------------------------------------


def test_imaging_study_version_moves_when_instances_are_deleted(
    http: httpx.Client, fhir_server: RunningServer
) -> None:
    study = make_study(3, patient_id="FHIR-VERSION-0001", patient_name="VERSION^VERA")
    second_series = new_uid()
    extra = []
    for index in range(2):
        ds = ct_slice(
            study_uid=study.study_uid,
            series_uid=second_series,
            index=index,
            size=8,
            patient_id=study.patient_id,
            patient_name="VERSION^VERA",
        )
        ds.SeriesNumber = 2
        extra.append(ds)
    study.datasets += extra
    ingest(fhir_server, [study])
    path = f"/ImagingStudy/{study.study_uid}"

    def state() -> tuple[int, str, datetime, dict[str, Any]]:
        response = http.get(path)
        assert response.status_code == 200, response.text
        body = response.json()
        version = body["meta"]["versionId"]
        assert response.headers["etag"] == f'W/"{version}"'
        updated = datetime.fromisoformat(body["meta"]["lastUpdated"].replace("Z", "+00:00"))
        return int(version), response.headers["etag"], updated, body

    def delete(kind: str, uid: str) -> int:
        time.sleep(0.02)  # lastUpdated is at millisecond precision
        with closing(fhir_server.archive()) as archive:
            return int(getattr(archive, f"delete_{kind}")(uid))

    version0, etag0, updated0, body0 = state()
    assert body0["numberOfInstances"] == 5 and body0["numberOfSeries"] == 2
    assert http.get(path, headers={"If-None-Match": etag0}).status_code == 304

    # The newest instance (the last one stored) goes.
    newest = str(extra[-1].SOPInstanceUID)
    assert delete("instance", newest) == 1
    version1, etag1, updated1, body1 = state()
    assert version1 > version0 and etag1 != etag0
    assert updated1 > updated0
    assert body1["numberOfInstances"] == 4
    assert newest not in {i["uid"] for s in body1["series"] for i in s["instance"]}
    stale = http.get(path, headers={"If-None-Match": etag0})
    assert stale.status_code == 200 and stale.json()["meta"]["versionId"] == str(version1)
    assert http.get(path, headers={"If-None-Match": etag1}).status_code == 304
    vread = http.get(f"{path}/_history/{version1}")
    assert vread.status_code == 200 and vread.json()["numberOfInstances"] == 4
    outcome(http.get(f"{path}/_history/{version0}"), 404, "not-found")  # not kept

    # An instance in the middle of a series.
    assert delete("instance", study.sop_uids[1]) == 1
    version2, etag2, updated2, body2 = state()
    assert version2 > version1 and etag2 != etag1 and updated2 > updated1
    assert body2["numberOfInstances"] == 3
    assert http.get(path, headers={"If-None-Match": etag1}).status_code == 200

    # A whole series.
    assert delete("series", second_series) == 1
    version3, etag3, updated3, body3 = state()
    assert version3 > version2 and etag3 != etag2 and updated3 > updated2
    assert body3["numberOfSeries"] == 1 and body3["numberOfInstances"] == 2
    assert [s["uid"] for s in body3["series"]] == [study.series_uid]
    assert http.get(path, headers={"If-None-Match": etag2}).status_code == 200

    # A new instance after the deletes still moves it on.
    time.sleep(0.02)
    late = ct_slice(
        study_uid=study.study_uid,
        series_uid=study.series_uid,
        index=7,
        size=8,
        patient_id=study.patient_id,
        patient_name="VERSION^VERA",
    )
    ingest(fhir_server, [StudyData(study.study_uid, study.series_uid, [], "", "", [late])])
    version4, etag4, updated4, body4 = state()
    assert body4["numberOfInstances"] == 3  # it is there
    assert updated4 > updated3
    assert version4 > version3 and etag4 != etag3
    found = search(http, "ImagingStudy", {"_id": study.study_uid})
    assert entries(found)[0]["meta"]["versionId"] == str(version4)


# --- 12: an EHR's Patient first, its images later ------------------------------------------------


def test_ehr_patient_first_images_found_by_their_dicom_name(
    http: httpx.Client, fhir_server: RunningServer, tmp_path: Path
) -> None:
    """The EHR sends a Patient without birthDate and gender; the images that follow carry a
    DICOM name, birth date and sex. C-FIND and QIDO-RS find the study by the DICOM name; the
    FHIR Patient (and its search) stays the EHR's."""
    value = "FHIR-EHRFIRST-0001"
    patient = new_patient(
        http, value, name=[{"use": "official", "family": "Ehrfirst", "given": ["Johanna"]}]
    )
    study = send(
        fhir_server,
        make_study(2, patient_id=value, patient_name="DOEFIRST^JOHN"),
        tmp_path / "images",
    )

    found = findscu(
        fhir_server,
        tmp_path / "find",
        [
            "QueryRetrieveLevel=STUDY",
            "PatientName=DOEFIRST*",
            "PatientID",
            "StudyInstanceUID",
        ],
    )
    assert [(str(d.StudyInstanceUID), str(d.PatientID)) for d in found] == [
        (study.study_uid, value)
    ]
    assert str(found[0].PatientName) == "DOEFIRST^JOHN"
    qido = httpx.get(
        f"{fhir_server.http}/dicom-web/studies",
        params={"PatientName": "DOEFIRST*"},
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    assert qido.status_code == 200, qido.text
    assert [s["0020000D"]["Value"][0] for s in qido.json()] == [study.study_uid]
    assert qido.json()[0]["00100010"]["Value"][0]["Alphabetic"] == "DOEFIRST^JOHN"

    # The FHIR view is the EHR's record, untouched by the header.
    shown = http.get(f"/Patient/{patient}").json()
    assert shown["name"] == [{"use": "official", "family": "Ehrfirst", "given": ["Johanna"]}]
    assert "gender" not in shown and "birthDate" not in shown
    assert shown["meta"]["versionId"] == "1"
    assert versions(history_of(http, f"/Patient/{patient}/_history")) == [(patient, "1")]
    imaging = search(http, "ImagingStudy", {"patient": f"Patient/{patient}"})
    assert ids(imaging) == [study.study_uid]
    assert entries(imaging)[0]["subject"] == {"reference": f"Patient/{patient}"}  # no display
    assert ids(search(http, "ImagingStudy", {"patient.name": "Ehrfirst"})) == [study.study_uid]
    assert search(http, "ImagingStudy", {"patient.name": "DOEFIRST"})["total"] == 0

    # Patient search matches what the Patient shows: the record leaves birthDate and gender
    # out, so the header's values (1970-01-01, F) find nothing.
    def found_by(**params: str) -> list[str]:
        return ids(search(http, "Patient", {"identifier": f"{PATIENT_SYSTEM}|{value}", **params}))

    assert found_by() == [patient]
    assert found_by(name="Ehrfirst") == [patient]
    assert found_by(name="DOEFIRST") == []
    assert found_by(birthdate="1970-01-01") == []
    assert found_by(birthdate="ge1900-01-01") == []
    assert found_by(gender="female") == []
    assert found_by(gender="unknown") == []  # no gender is shown, not "unknown"


# --- 13: hostile input --------------------------------------------------------------------------


def refused(response: httpx.Response, *statuses: int) -> None:
    """An answer among ``statuses`` (never a 500); an error one is an OperationOutcome."""
    assert response.status_code in statuses, (
        response.request.method,
        str(response.request.url)[:200],
        response.status_code,
        response.text[:500],
    )
    if response.status_code >= 400:
        body = response.json()
        assert body["resourceType"] == "OperationOutcome", body
        assert body["issue"][0]["severity"] in ("error", "fatal")
        assert body["issue"][0].get("diagnostics", "").strip()


def check_hostile_input(client: httpx.Client) -> None:
    """Dates out of range, huge numbers, other scripts' digits, NUL bytes and deep bodies: a 4xx
    OperationOutcome (or a plain answer), never a 500."""
    for resource_type, name, value in (
        ("ImagingStudy", "started", "9999"),
        ("ImagingStudy", "started", "9999-12-31"),
        ("Patient", "birthdate", "0001-01-01T00:00+01:00"),
        ("ImagingStudy", "started", "2020-01-01T10:00+25:00"),
        ("Patient", "_lastUpdated", "ge10000"),
        ("DiagnosticReport", "date", "ge10000"),
        ("Patient", "_count", "²"),
        ("Patient", "name", "\x00"),
        ("ImagingStudy", "identifier", "x\x00"),
    ):
        refused(client.get(f"/{resource_type}", params={name: value}), 400)
    refused(client.get("/ImagingStudy", params={"started": "ap0002"}), 200, 400)
    for value in ("1e999999999", "1e-999999999", "ge1e999999999", "-1e999999999"):
        refused(client.get("/Observation", params={"value-quantity": value}), 200, 400)
    refused(client.get("/Patient/²"), 404)
    arabic_one = "\u0661"  # ARABIC-INDIC DIGIT ONE: not Patient/1
    refused(client.get(f"/Patient/{arabic_one}"), 404)
    refused(client.get(f"/Patient/{arabic_one}/_history"), 404)
    refused(client.get(f"/Patient/{arabic_one}/_history/1"), 404)
    refused(client.get(f"/Observation/{arabic_one}"), 404)
    refused(client.get("/Patient/_history", params={"_count": "²"}), 400)
    refused(client.get("/ImagingStudy/%00"), 400)
    refused(client.get("/Patient/%00/_history"), 400)
    deep = '{"resourceType":"Patient","a":' + '{"a":' * 100_000 + "1" + "}" * 100_001
    refused(client.post("/Patient", content=deep.encode(), headers=JSON), 400)
    nul = (
        b'{"resourceType":"Patient","identifier":[{"system":"'
        + PATIENT_SYSTEM.encode()
        + b'","value":"FHIR-NUL-0001"}],"name":[{"family":"Nul\\u0000Byte"}]}'
    )
    refused(client.post("/Patient", content=nul, headers=JSON), 400)
    refused(client.post("/Patient", content=nul.replace(b"\\u0000", b"\x00"), headers=JSON), 400)
    assert client.get("/Patient", params={"identifier": "FHIR-NUL-0001"}).json()["total"] == 0


def test_hostile_input_is_refused_not_failed(http: httpx.Client) -> None:
    check_hostile_input(http)


# --- 14: Observations and Devices of a TID 1500 measurement report ------------------------------


@dataclass
class Measured:
    patient: str
    study_uid: str
    report: str  # the SR's SOP Instance UID: the DiagnosticReport's id
    device: str
    before: str
    observations: dict[str, str]  # SNOMED CT code of the concept (and value) -> Observation id


ALGORITHM_DEVICE = hashlib.blake2b(b"pacsbridge|liver-net|1.2", digest_size=8).hexdigest()
"""Device id of the algorithm of ``_measurement_report`` (manufacturer|name|version)."""


@pytest.fixture(scope="module")
def measured(fhir_server: RunningServer, http: httpx.Client) -> Measured:
    before = utc_now()
    time.sleep(0.01)
    study = ImagedStudy(patient_id="FHIR-OBS-0001")
    sop = new_uid()
    with closing(fhir_server.archive()) as archive:
        for ct in study.cts:
            archive.ingest(part10(ct))
        archive.ingest(part10(_measurement_report(study, sop)))
    patient = patient_id_of(http, "FHIR-OBS-0001")
    found = search(http, "Observation", {"patient": f"Patient/{patient}", "_sort": "_id"})
    observations = {}
    for resource in entries(found):
        key = resource["code"]["coding"][0]["code"]
        if "valueCodeableConcept" in resource:
            key += "=" + resource["valueCodeableConcept"]["coding"][0]["code"]
        observations[key] = resource["id"]
    return Measured(patient, str(study.uid), sop, ALGORITHM_DEVICE, before, observations)


SNOMED = "http://snomed.info/sct"
VOLUME, MEAN, LESION_ABSENT, LESION_PRESENT = (
    "118565006",
    "373098007",
    "52988006=272519000",
    "52988006=52101004",
)


def test_observations_of_a_measurement_report(http: httpx.Client, measured: Measured) -> None:
    o = measured.observations
    assert set(o) == {VOLUME, MEAN, LESION_ABSENT, LESION_PRESENT}
    patient = f"Patient/{measured.patient}"

    def found(**params: str) -> list[str]:
        bundle = search(http, "Observation", {"patient": patient, "_sort": "_id", **params})
        assert bundle["total"] == len(ids(bundle))
        return ids(bundle)

    every = found()
    assert len(every) == 4
    volume = http.get(f"/Observation/{o[VOLUME]}").json()
    assert volume["status"] == "preliminary"  # the SR is UNVERIFIED
    assert volume["code"]["coding"][0] == {
        "system": SNOMED,
        "code": "118565006",
        "display": "Volume",
    }
    assert volume["valueQuantity"] == {
        "value": 1523.25,
        "unit": "milliliter",
        "system": "http://unitsofmeasure.org",
        "code": "ml",
    }
    assert volume["subject"] == {"reference": patient}
    assert volume["derivedFrom"] == [{"reference": f"ImagingStudy/{measured.study_uid}"}]
    assert volume["partOf"] == [{"reference": f"ImagingStudy/{measured.study_uid}"}]
    assert volume["device"] == {"reference": f"Device/{measured.device}"}
    assert volume["bodySite"]["coding"][0]["code"] == "10200004"  # Liver
    assert {"system": DICOM_UID, "value": "urn:oid:1.2.826.0.1.3680043.10.1506.77.1"} in volume[
        "identifier"
    ]
    assert volume["effectiveDateTime"].startswith("2024-01-15")
    mean = http.get(f"/Observation/{o[MEAN]}").json()
    assert mean["valueQuantity"]["value"] == 61.5 and mean["valueQuantity"]["code"] == "[hnsf'U]"
    absent = http.get(f"/Observation/{o[LESION_ABSENT]}").json()
    assert absent["valueCodeableConcept"]["coding"][0]["code"] == "272519000"
    assert absent["method"] == {"text": "RECIST 1.1"}

    assert found(code=f"{SNOMED}|118565006") == [o[VOLUME]]
    assert found(code="373098007") == [o[MEAN]]
    assert found(code=f"{SNOMED}|52988006") == [o[LESION_ABSENT], o[LESION_PRESENT]]
    assert found(code="http://loinc.org|118565006") == []
    assert found(date="2024-01-15") == every
    assert found(date="ge2024-01-01") == every
    assert found(date="lt2024-01-15") == []
    assert found(device=f"Device/{measured.device}") == every
    assert found(device="Device/no-such-model") == []
    assert found(**{"derived-from": f"ImagingStudy/{measured.study_uid}"}) == every
    assert found(**{"derived-from": "ImagingStudy/1.2.3"}) == []
    assert found(**{"value-quantity": "1523.25"}) == [o[VOLUME]]
    assert found(**{"value-quantity": "1523"}) == [o[VOLUME]]  # [1522.5, 1523.5)
    assert found(**{"value-quantity": "1524"}) == []
    assert found(**{"value-quantity": "ge1000"}) == [o[VOLUME]]
    assert found(**{"value-quantity": "lt100"}) == [o[MEAN]]
    assert found(**{"value-quantity": "ap1500"}) == [o[VOLUME]]
    assert found(**{"value-quantity": "61.5|http://unitsofmeasure.org|[hnsf'U]"}) == [o[MEAN]]
    assert found(**{"value-quantity": "61.5|http://unitsofmeasure.org|ml"}) == []
    assert found(**{"value-quantity": "gt0", "_sort": "-value-quantity"}) == [o[VOLUME], o[MEAN]]
    assert found(_lastUpdated=f"ge{measured.before}") == every
    assert found(_lastUpdated=f"lt{measured.before}") == []
    by_subject = search(http, "Observation", {"subject": patient, "_count": "100"})
    assert set(ids(by_subject)) == set(every)

    # _include=Observation:device: one Device, named as the SR's algorithm identification.
    with_device = search(
        http, "Observation", {"patient": patient, "_include": "Observation:device"}
    )
    assert set(ids(with_device)) == set(every)
    (device,) = entries(with_device, "include")
    assert device["resourceType"] == "Device" and device["id"] == measured.device
    assert device["deviceName"] == [{"name": "liver-net", "type": "model-name"}]
    assert device["version"] == [{"value": "1.2"}]
    assert device["manufacturer"] == "pacsbridge"
    read = http.get(f"/Device/{measured.device}")
    assert read.status_code == 200 and read.json() == device

    # The report of the Observations lists them as its results.
    report = http.get(f"/DiagnosticReport/{measured.report}").json()
    assert [r["reference"] for r in report["result"]] == [f"Observation/{i}" for i in every]
    assert report["code"]["coding"][0]["code"] == "126000"
    with_results = search(
        http, "DiagnosticReport", {"_id": measured.report, "_include": "DiagnosticReport:result"}
    )
    assert sorted(r["id"] for r in entries(with_results, "include")) == sorted(every)
    by_result = search(http, "DiagnosticReport", {"result": f"Observation/{o[MEAN]}"})
    assert ids(by_result) == [measured.report]


# --- 15: includes with a target type, chains with modifiers --------------------------------------


def test_include_with_target_and_chained_modifiers(
    http: httpx.Client, ct_study: StudyData, measured: Measured
) -> None:
    with_patient = search(
        http,
        "DiagnosticReport",
        {"_id": measured.report, "_include": "DiagnosticReport:subject:Patient"},
    )
    assert ids(with_patient) == [measured.report]
    assert [(r["resourceType"], r["id"]) for r in entries(with_patient, "include")] == [
        ("Patient", measured.patient)
    ]
    outcome(
        http.get(
            "/DiagnosticReport",
            params={"_id": measured.report, "_include": "DiagnosticReport:subject:Device"},
        ),
        400,
        "invalid",
    )
    with_device = search(
        http,
        "Observation",
        {"patient": measured.patient, "_include": "Observation:device:Device"},
    )
    assert [r["id"] for r in entries(with_device, "include")] == [measured.device]

    def studies(**params: str) -> list[str]:
        return ids(search(http, "ImagingStudy", params))

    assert studies(**{"subject.name:exact": "CTPATIENT"}) == [ct_study.study_uid]
    assert studies(**{"subject:Patient.name:exact": "CTPATIENT"}) == [ct_study.study_uid]
    assert studies(**{"patient.family:exact": "CTPATIENT"}) == [ct_study.study_uid]
    assert studies(**{"subject.given:exact": "ANNA"}) == [ct_study.study_uid]
    assert studies(**{"subject.name:exact": "ctpatient"}) == []  # exact includes case
    assert studies(**{"subject.name:exact": "CTPAT"}) == []  # and the whole name
    assert studies(**{"subject.name:contains": "PATIEN"}) == [ct_study.study_uid]
    outcome(
        http.get("/ImagingStudy", params={"subject.name:frob": "CTPATIENT"}),
        400,
        "invalid",
    )
    strict = http.get(
        "/ImagingStudy",
        params={"subject.identifier.foo": "x"},
        headers={"Prefer": "handling=strict"},
    )
    refused(strict, 400)
    lenient = http.get("/ImagingStudy", params={"subject.identifier.foo": "x"})
    refused(lenient, 200, 400)
    if lenient.status_code == 200:  # ignored, and said so
        (said,) = entries(lenient.json(), "outcome")
        assert "subject.identifier.foo" in json.dumps(said)


# --- 16: what a report write cannot keep is refused ---------------------------------------------


def test_report_writes_refuse_what_they_cannot_keep(
    http: httpx.Client, fhir_server: RunningServer, base: str
) -> None:
    study = make_study(1, patient_id="FHIR-DRW-0001", patient_name="WRITER^WANDA")
    ingest(fhir_server, [study])
    reference = {"reference": f"ImagingStudy/{study.study_uid}"}

    def body(**elements: Any) -> dict[str, Any]:
        return {
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": REPORT_CODE,
            "imagingStudy": [reference],
            "conclusion": "Kein pathologischer Befund.",
            **elements,
        }

    pdf = http.post(
        "/DiagnosticReport",
        json=body(
            presentedForm=[
                {"contentType": "application/pdf", "data": base64.b64encode(b"%PDF-1.4").decode()}
            ]
        ),
        headers=JSON,
    )
    refusal = outcome(pdf, 422, "not-supported")
    assert "presentedForm" in json.dumps(refusal)
    elsewhere = http.post(
        "/DiagnosticReport",
        json=body(
            imagingStudy=[
                {"reference": f"http://elsewhere.example/fhir/ImagingStudy/{study.study_uid}"}
            ]
        ),
        headers=JSON,
    )
    outcome(elsewhere, 422, "business-rule")
    assert search(http, "DiagnosticReport", {"imaging-study": study.study_uid})["total"] == 0

    # base64 with line breaks (base64Binary may hold whitespace), as MIME encoders write it.
    findings = "Befund: " + "Leber homogen, Gallenblase unauffällig. " * 8
    wrapped = base64.encodebytes(findings.encode()).decode()
    assert "\n" in wrapped.strip()
    created = http.post(
        "/DiagnosticReport",
        json=body(presentedForm=[{"contentType": "text/plain", "data": wrapped}]),
        headers=JSON,
    )
    assert created.status_code == 201, created.text
    report = created.json()
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert text.startswith(findings.strip())

    # The absolute URL of this server's study is that study.
    absolute = http.post(
        "/DiagnosticReport",
        json=body(imagingStudy=[{"reference": f"{base}/ImagingStudy/{study.study_uid}"}]),
        headers=JSON,
    )
    assert absolute.status_code == 201, absolute.text
    assert absolute.json()["imagingStudy"] == [reference]
    assert set(ids(search(http, "DiagnosticReport", {"imaging-study": study.study_uid}))) == {
        report["id"],
        absolute.json()["id"],
    }

    # corrected reads back as corrected.
    corrected_body = {k: v for k, v in report.items() if k != "meta"}
    corrected_body |= {
        "status": "corrected",
        "conclusion": "Korrektur: kleine Leberzyste.",
        "resultsInterpreter": [{"display": "Jane Smith"}],
    }
    corrected = http.put(
        f"/DiagnosticReport/{report['id']}",
        json=corrected_body,
        headers={**JSON, "If-Match": 'W/"1"'},
    )
    assert corrected.status_code == 200, corrected.text
    assert corrected.json()["status"] == "corrected"
    assert corrected.json()["meta"]["versionId"] == "2"
    read = http.get(f"/DiagnosticReport/{report['id']}").json()
    assert read["status"] == "corrected" and read["conclusion"] == "Korrektur: kleine Leberzyste."
    assert read["resultsInterpreter"] == [{"display": "Jane Smith"}]
    assert ids(
        search(http, "DiagnosticReport", {"imaging-study": study.study_uid, "status": "corrected"})
    ) == [report["id"]]
    history = history_of(http, f"/DiagnosticReport/{report['id']}/_history")
    assert [e["resource"]["status"] for e in history["entry"]] == ["corrected", "preliminary"]


# --- 17: the CapabilityStatement says exactly what works ----------------------------------------

STRICT = {"Prefer": "handling=strict"}
REFERENCE_TARGETS = {
    "patient": "Patient",
    "subject": "Patient",
    "imaging-study": "ImagingStudy",
    "derived-from": "ImagingStudy",
    "result": "Observation",
    "device": "Device",
    "service": "ImagingStudy",
    "account": "Account",
    "invoice": "Invoice",
    "entity": "ImagingStudy",
    "requester": "Practitioner",
    "based-on": "ServiceRequest",
}
"""The target type of each reference search parameter (the statement does not say it)."""
BILLING_TYPES = {
    "ChargeItemDefinition",
    "ChargeItem",
    "Account",
    "Invoice",
    "PaymentReconciliation",
}
"""Walked by tests/test_fhir_billing.py, on a server that bills."""
ORDER_TYPES = {"ServiceRequest", "Procedure"}
"""Walked by tests/test_fhir_service_request.py (DELETE revokes an order) and
tests/test_mpps.py (a Procedure is a step a modality reported)."""
SUBSCRIPTION_TYPES = {"Subscription"}
"""Walked by tests/test_fhir_subscription.py (administrators' rest-hook subscriptions)."""
SAMPLE_VALUES = {
    "token": "x",
    "string": "x",
    "date": "ge2000-01-01",
    "number": "1",
    "quantity": "1",
    "uri": "x",
}
COMMON_VALUES = {
    "_count": "1",
    "_sort": "_id",
    "_elements": "id",
    "_summary": "true",
    "_total": "none",
    "_format": "json",
    "_pretty": "true",
}
INTERACTIONS = (
    "read",
    "vread",
    "update",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)


BOOLEAN_TOKENS = {"overdue"}
"""Token parameters that take only true or false."""


def sample_value(name: str, kind: str) -> str:
    if name in BOOLEAN_TOKENS:
        return "true"
    if kind == "reference":
        assert name in REFERENCE_TARGETS, f"reference parameter {name!r} has no known target"
        return f"{REFERENCE_TARGETS[name]}/1"
    assert kind in SAMPLE_VALUES, f"search parameter {name!r} of type {kind!r}"
    return SAMPLE_VALUES[kind]


def search_every_declared_parameter(client: httpx.Client) -> int:
    """One strict search per search parameter, common parameter, _include and _revinclude the
    CapabilityStatement declares: each is a searchset (an undeclared one would be a 400).
    Every failing search is listed in the assertion, not the first alone."""
    statement = client.get("/metadata").json()
    rest = statement["rest"][0]
    runs = 0
    failed: list[tuple[str, dict[str, str], int, str]] = []

    def run(resource_type: str, params: dict[str, str]) -> None:
        nonlocal runs
        runs += 1
        response = client.get(f"/{resource_type}", params=params, headers=STRICT)
        if response.status_code != 200:
            failed.append((resource_type, params, response.status_code, response.text[:300]))
            return
        bundle = response.json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
        assert entries(bundle, "outcome") == [], (resource_type, params)

    for resource in rest["resource"]:
        kind = resource["type"]
        if "search-type" not in {i["code"] for i in resource["interaction"]}:
            assert "searchParam" not in resource, kind
            continue
        for param in resource["searchParam"]:
            run(kind, {param["name"]: sample_value(param["name"], param["type"])})
        for common in rest["searchParam"]:
            assert common["name"] in COMMON_VALUES, common
            run(kind, {common["name"]: COMMON_VALUES[common["name"]]})
        for value in resource.get("searchInclude", []):
            run(kind, {"_include": value})
        for value in resource.get("searchRevInclude", []):
            run(kind, {"_revinclude": value})
    assert failed == [], failed
    return runs


def exercise(
    http: httpx.Client, interaction: str, kind: str, one: str, version: str
) -> httpx.Response:
    """A request of ``interaction`` on ``kind`` (``one``: an id that exists); create and
    update send a body that is not valid R4."""
    invalid = {"resourceType": kind, "colour": "blue"}  # no element of any R4 resource
    match interaction:
        case "read":
            return http.get(f"/{kind}/{one}")
        case "vread":
            return http.get(f"/{kind}/{one}/_history/{version}")
        case "history-instance":
            return http.get(f"/{kind}/{one}/_history")
        case "history-type":
            return http.get(f"/{kind}/_history", params={"_count": "1"})
        case "search-type":
            return http.get(f"/{kind}", params={"_count": "1"})
        case "create":
            return http.post(f"/{kind}", json=invalid, headers=JSON)
        case "update":
            return http.put(f"/{kind}/{one}", json={**invalid, "id": one}, headers=JSON)
        case "delete":
            return http.delete(f"/{kind}/{one}")
    raise AssertionError(interaction)


def test_capability_statement_is_exact(http: httpx.Client, measured: Measured) -> None:
    """Every search parameter, include, revinclude and interaction the CapabilityStatement
    declares works; every interaction it leaves out of a type is 405."""
    assert search_every_declared_parameter(http) > 40
    statement = http.get("/metadata").json()
    existing = {
        "Patient": measured.patient,
        "ImagingStudy": measured.study_uid,
        "Endpoint": "dicomweb",
        "DiagnosticReport": measured.report,
        "Observation": measured.observations[VOLUME],
        "Device": measured.device,
        "AuditEvent": "1",  # the first request this server answered
    }
    resources = statement["rest"][0]["resource"]
    assert {r["type"] for r in resources} == (
        set(existing) | BILLING_TYPES | ORDER_TYPES | SUBSCRIPTION_TYPES
    )
    for resource in resources:
        kind = resource["type"]
        if kind in BILLING_TYPES | ORDER_TYPES | SUBSCRIPTION_TYPES:
            continue
        one = existing[kind]
        declared = {i["code"] for i in resource["interaction"]}
        assert declared <= set(INTERACTIONS), declared
        assert "read" in declared, kind
        read = http.get(f"/{kind}/{one}")
        assert read.status_code == 200, (kind, one, read.text)
        assert (read.json()["resourceType"], read.json()["id"]) == (kind, one)
        version = read.json()["meta"]["versionId"]
        for interaction in INTERACTIONS:
            response = exercise(http, interaction, kind, one, version)
            where = (interaction, kind, one, response.status_code, response.text[:500])
            if interaction not in declared:
                assert response.status_code == 405, where
                outcome(response, 405, "not-supported")
            elif interaction in ("create", "update"):  # the route is there; the body is not R4
                assert response.status_code == 400, where
                outcome(response, 400, "structure")
            else:
                assert response.status_code == 200, where
                body = response.json()
                if interaction in ("read", "vread"):
                    assert body["meta"]["versionId"] == version and body["id"] == one
                elif interaction.startswith("history"):
                    assert body["type"] == "history" and body["total"] >= 1, where
                    shown = [
                        (e["resource"]["resourceType"], e["resource"]["meta"]["versionId"])
                        for e in body["entry"]
                    ]
                    assert (kind, version) in shown or interaction == "history-type", where
                else:
                    assert body["type"] == "searchset", where
        if "search-type" not in declared:
            posted = http.post(
                f"/{kind}/_search",
                content=b"_count=1",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            outcome(posted, 405, "not-supported")
            continue
        # Each include of the type brings its target along, each revinclude its source.
        for value in resource.get("searchInclude", []):
            bundle = search(http, kind, {"_id": one, "_include": value}, headers=STRICT)
            assert ids(bundle) == [one], (value, bundle)
            target = REFERENCE_TARGETS[value.split(":")[1]]
            assert target in {r["resourceType"] for r in entries(bundle, "include")}, value
        for value in resource.get("searchRevInclude", []):
            bundle = search(http, kind, {"_id": one, "_revinclude": value}, headers=STRICT)
            assert ids(bundle) == [one], (value, bundle)
            source = value.split(":")[0]
            assert source in {r["resourceType"] for r in entries(bundle, "include")}, value
    # Two examples named outright: the views of the archive are not written over FHIR.
    outcome(
        http.put("/ImagingStudy/x", json={"resourceType": "ImagingStudy"}, headers=JSON),
        405,
        "not-supported",
    )
    outcome(
        http.post("/Observation", json={"resourceType": "Observation"}, headers=JSON),
        405,
        "not-supported",
    )


# --- a smoke test on PostgreSQL ----------------------------------------------------------------


@pytest.mark.postgres
def assert_report_updates_take_turns_across_processes(
    pg: httpx.Client, postgres_url: str, report: dict[str, Any]
) -> None:
    """An update of a report waits for the PostgreSQL advisory lock that another process
    (here: the test) holds on it, and sees the version that process wrote: two processes that
    both send If-Match of one version cannot both write."""
    from concurrent.futures import ThreadPoolExecutor

    from fhir_bridge.writes import report_lock_key

    final = {
        **report,
        "status": "final",
        "resultsInterpreter": [{"display": "Jane Smith"}],
    }
    final.pop("meta", None)
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as holder, ThreadPoolExecutor(1) as pool:
            key = report_lock_key(report["id"])
            holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                pending = pool.submit(
                    pg.put,
                    f"/DiagnosticReport/{report['id']}",
                    json=final,
                    headers={**JSON, "If-Match": 'W/"1"'},
                )
                time.sleep(1.5)
                assert not pending.done(), "the update did not wait for the lock"
            finally:
                holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                holder.commit()
            answer = pending.result(timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["meta"]["versionId"] == "2"
        stale = pg.put(
            f"/DiagnosticReport/{report['id']}",
            json={**final, "status": "amended"},
            headers={**JSON, "If-Match": 'W/"1"'},
        )
        assert stale.status_code == 412, stale.text
    finally:
        engine.dispose()


def test_search_and_create_on_postgresql(
    postgres_url: str, tmp_path: Path, validator: FHIRValidator
) -> None:
    server = start_fhir_server(tmp_path, database_url=postgres_url)
    try:
        with validator.httpx_client(f"{server.http}/fhir") as pg:
            created = pg.post(
                "/Patient",
                json={
                    "resourceType": "Patient",
                    "identifier": [{"system": PATIENT_SYSTEM, "value": "FHIR-PG-0001"}],
                    "name": [{"family": "Postgres", "given": ["Paula"]}],
                    "birthDate": "1977-02-03",
                },
                headers=JSON,
            )
            assert created.status_code == 201, created.text
            patient = created.json()["id"]
            studies = [
                make_study(1, patient_id="FHIR-PG-0001", study_date=f"2022010{n + 1}")
                for n in range(3)
            ]
            ingest(server, studies)
            first = search(pg, "ImagingStudy", {"patient": f"Patient/{patient}", "_count": "2"})
            assert first["total"] == 3 and len(ids(first)) == 2
            (next_url,) = [link["url"] for link in first["link"] if link["relation"] == "next"]
            second = pg.get(next_url).json()
            assert set(ids(first) + ids(second)) == {s.study_uid for s in studies}
            later = search(pg, "ImagingStudy", {"started": "ge2022-01-02", "patient": patient})
            assert set(ids(later)) == {studies[1].study_uid, studies[2].study_uid}
            assert ids(
                search(pg, "Patient", {"name": "postgres", "birthdate": "ge1977-02-03"})
            ) == [patient]
            report = pg.post(
                "/DiagnosticReport",
                json={
                    "resourceType": "DiagnosticReport",
                    "status": "preliminary",
                    "code": REPORT_CODE,
                    "imagingStudy": [{"reference": f"ImagingStudy/{studies[0].study_uid}"}],
                    "conclusion": "Unauffällig.",
                },
                headers=JSON,
            )
            assert report.status_code == 201, report.text
            found = search(pg, "DiagnosticReport", {"patient": f"Patient/{patient}"})
            assert ids(found) == [report.json()["id"]]
            assert entries(found)[0]["conclusion"] == "Unauffällig."
            assert_report_updates_take_turns_across_processes(pg, postgres_url, report.json())
            # The hostile input and every declared search parameter on PostgreSQL too (a NUL
            # in a bound text, say, fails there where SQLite takes it).
            check_hostile_input(pg)
            assert search_every_declared_parameter(pg) > 40
    finally:
        server.stop()
