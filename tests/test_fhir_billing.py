"""Billing over FHIR R4 with real clients (fhirpy, httpx) against a real `pacsbridge serve` with
charge capture on, fed by DCMTK storescu: a study stabilises → a technical ChargeItem at the
price list's amount with its surcharge; a report finalised over FHIR → a professional charge;
an Invoice created and issued; a partial and a final PaymentReconciliation → balanced, and the
Account's billed / paid / outstanding figures; re-sending adds no charge; deleting a study
before invoicing voids its charge; an overpayment is refused with an OperationOutcome. Then the
price list as ChargeItemDefinition ($apply), manual charges, invoice status changes with
If-Match, accounts' guarantor and coverage, and the history (who, when, why) of money.
Every response body is validated with ``fhir.resources.R4B`` (tests/fhir_support.py)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset

from billing.invoices import issue_invoice, recompute_from_history
from config.settings import BillingSettings
from tests.conftest import Backend, RunningServer, _backend, start_server
from tests.dicom_factory import ct_slice
from tests.fhir_support import FHIRValidator, new_uid, storescu
from tests.test_fhir import (
    BILLING_TYPES,
    INTERACTIONS,
    REFERENCE_TARGETS,
    STRICT,
    exercise,
    sample_value,
)

pytestmark = pytest.mark.dcmtk

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "billing" / "sample-prices.csv"
PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
PATIENT_SYSTEM = "urn:pacsbridge:patient-id"
LOINC = "http://loinc.org"
PRICE = "urn:pacsbridge:fhir:StructureDefinition:charge-price"
ACCOUNT_BALANCE = "urn:pacsbridge:fhir:StructureDefinition:account-balance"
INVOICE_BALANCE = "urn:pacsbridge:fhir:StructureDefinition:invoice-balance"
CHANGE = "urn:pacsbridge:fhir:StructureDefinition:change"
WEDNESDAY = "20260304"
REPORT_CODE = {
    "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]
}


# --- the server ---------------------------------------------------------------------------------


def run_cli(backend: Backend, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PACSBRIDGE_")}
    env |= backend.env | {"COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run(
        [str(PACSBRIDGE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def validator() -> Iterator[FHIRValidator]:
    checker = FHIRValidator()
    yield checker
    assert checker.total > 0, "no FHIR response body was validated"


@pytest.fixture(autouse=True)
def _bodies_valid(validator: FHIRValidator, request: pytest.FixtureRequest) -> Iterator[None]:
    before, failed = len(validator.failures), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        assert validator.failures[before:] == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("billing-fhir")


@pytest.fixture(scope="module")
def backend(workdir: Path, request: pytest.FixtureRequest) -> Backend:
    return _backend("sqlite", "file", workdir, request)


@pytest.fixture(scope="module")
def server(backend: Backend, workdir: Path) -> Iterator[RunningServer]:
    loaded = run_cli(backend, workdir, "billing", "prices", "load", str(SAMPLE))
    assert loaded.returncode == 0, loaded.stderr
    running = start_server(
        backend,
        workdir,
        PYTHONPATH=str(REPO),
        PACSBRIDGE_STABLE_AGE="1",
        PACSBRIDGE_STABLE_SCAN_INTERVAL="0.2",
        PACSBRIDGE_WORKER_POLL_INTERVAL="0.1",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_BILLING=json.dumps({"enabled": True, "payment_terms_days": 14}),
    )
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log()[-3000:]


@pytest.fixture(scope="module")
def base(server: RunningServer) -> str:
    return f"{server.http}/fhir"


@pytest.fixture(scope="module")
def http(validator: FHIRValidator, base: str) -> Iterator[httpx.Client]:
    with validator.httpx_client(base) as client:
        yield client


@pytest.fixture(scope="module")
def fhirpy(validator: FHIRValidator, base: str) -> Any:
    return validator.fhirpy_sync(base)


# --- helpers ----------------------------------------------------------------------------------


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def ct_study(
    count: int,
    *,
    patient_id: str,
    body_part: str = "HEAD",
    procedure: Dataset | None = None,
    contrast: str | None = None,
) -> list[Dataset]:
    study_uid, series_uid = new_uid(), new_uid()
    slices = []
    for index in range(count):
        ds = ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            index=index,
            size=8,
            patient_id=patient_id,
            study_date=WEDNESDAY,
        )
        ds.StudyTime, ds.Modality, ds.BodyPartExamined = "101500", "CT", body_part
        if procedure is not None:
            ds.ProcedureCodeSequence = [procedure]
        if contrast:
            ds.ContrastBolusAgent = contrast
        slices.append(ds)
    return slices


def send(server: RunningServer, slices: list[Dataset], directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(slices):
        path = directory / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    storescu(server, paths)
    return str(slices[0].StudyInstanceUID)


def captures_done(server: RunningServer, study: str) -> int:
    from archive.jobs import JobStatus

    with closing(server.archive()) as arc:
        jobs = arc.jobs.list(kind="charge-capture", study_instance_uid=study)
        return sum(job.status is JobStatus.DONE for job in jobs)


def wait_until(what: Callable[[], Any], server: RunningServer, timeout: float = 40) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting\n{server.log()[-3000:]}")
        time.sleep(0.2)


def patient_of(http: httpx.Client, patient_id: str) -> str:
    bundle = http.get("/Patient", params={"identifier": f"{PATIENT_SYSTEM}|{patient_id}"}).json()
    assert bundle["total"] == 1, bundle
    return str(bundle["entry"][0]["resource"]["id"])


def price_of(charge: dict[str, Any]) -> dict[str, Any]:
    """net / tax / total and the (type, code, amount) of the priced lines of a ChargeItem."""
    (ext,) = [e for e in charge.get("extension", []) if e["url"] == PRICE]
    out: dict[str, Any] = {"lines": []}
    for part in ext["extension"]:
        if part["url"] == "component":
            fields = {p["url"]: p for p in part["extension"]}
            out["lines"].append(
                (
                    fields["type"]["valueCode"],
                    fields["code"]["valueCodeableConcept"]["coding"][0]["code"],
                    Decimal(str(fields["amount"]["valueMoney"]["value"])),
                )
            )
        else:
            out[part["url"]] = Decimal(str(part["valueMoney"]["value"]))
    return out


def balance_of(resource: dict[str, Any], url: str) -> dict[str, Any]:
    (ext,) = [e for e in resource["extension"] if e["url"] == url]
    out: dict[str, Any] = {}
    for part in ext["extension"]:
        value = next(v for k, v in part.items() if k.startswith("value"))
        out[part["url"]] = Decimal(str(value["value"])) if isinstance(value, dict) else value
    return out


def outcome(response: httpx.Response, status: int, code: str, text: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"][0]["code"] == code, body
    assert text in body["issue"][0]["diagnostics"], body


def put(http: httpx.Client, resource: dict[str, Any], **changes: Any) -> httpx.Response:
    body = {**resource, **changes}
    return http.put(
        f"/{resource['resourceType']}/{resource['id']}",
        json=body,
        headers={
            "Content-Type": "application/fhir+json",
            "If-Match": f'W/"{resource["meta"]["versionId"]}"',
        },
    )


def post(http: httpx.Client, resource: dict[str, Any]) -> httpx.Response:
    return http.post(
        f"/{resource['resourceType']}",
        json=resource,
        headers={"Content-Type": "application/fhir+json"},
    )


def pay(http: httpx.Client, invoice: str, amount: str, **extra: Any) -> httpx.Response:
    return post(
        http,
        {
            "resourceType": "PaymentReconciliation",
            "status": "active",
            "created": "2026-03-20T10:00:00Z",
            "paymentDate": "2026-03-20",
            "paymentAmount": {"value": float(amount), "currency": "EUR"},
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
                    "request": {"reference": f"Invoice/{invoice}"},
                    "amount": {"value": float(amount), "currency": "EUR"},
                }
            ],
            **extra,
        },
    )


# --- the issue's end-to-end path --------------------------------------------------------------


def test_study_to_charges_invoice_and_payments(
    server: RunningServer, backend: Backend, http: httpx.Client, fhirpy: Any, workdir: Path
) -> None:
    # A CT head with contrast, coded LOINC 24725-4, at 10:15 on a Wednesday: 180.00 + the
    # contrast surcharge 40.00 = 220.00 net, VAT 19 % 41.80, 261.80 in all.
    slices = ct_study(
        4,
        patient_id="BILL-E2E-1",
        procedure=code("24725-4", "LN", "CT Head"),
        contrast="Iohexol",
    )
    study = send(server, slices[:3], workdir / "e2e")
    wait_until(lambda: captures_done(server, study) >= 1, server)
    patient = patient_of(http, "BILL-E2E-1")

    charges = fhirpy.resources("ChargeItem").search(patient=f"Patient/{patient}").fetch_all()
    assert len(charges) == 1
    technical = charges[0].serialize()
    assert technical["status"] == "billable"
    assert technical["code"]["coding"][0] == {
        "system": LOINC,
        "code": "24725-4",
        "display": "CT Head",
    }
    assert technical["subject"] == {"reference": f"Patient/{patient}"}
    assert technical["service"] == [{"reference": f"ImagingStudy/{study}"}]
    assert technical["occurrenceDateTime"] == "2026-03-04"
    priced = price_of(technical)
    assert (priced["net"], priced["tax"], priced["total"]) == (
        Decimal("220.00"),
        Decimal("41.80"),
        Decimal("261.80"),
    )
    assert ("surcharge", "CONTRAST", Decimal("40.00")) in priced["lines"]
    definition = technical["definitionCanonical"][0]
    assert definition.startswith(f"{http.base_url}".rstrip("/") + "/ChargeItemDefinition/")
    account = technical["account"][0]["reference"]

    # The report, finalised over FHIR, is stored as an SR in the study: the study is stable
    # again and its reading is charged (60.00 + VAT 11.40).
    report = fhirpy.resource(
        "DiagnosticReport",
        status="final",
        code=REPORT_CODE,
        subject={"reference": f"Patient/{patient}"},
        imagingStudy=[{"reference": f"ImagingStudy/{study}"}],
        conclusion="No haemorrhage.",
        resultsInterpreter=[{"display": "Rad^Rita"}],
        presentedForm=[
            {"contentType": "text/plain", "data": base64.b64encode(b"Normal CT head.").decode()}
        ],
    )
    report.save()

    def professional() -> list[Any]:
        return (
            fhirpy.resources("ChargeItem")
            .search(service=f"DiagnosticReport/{report.id}")
            .fetch_all()
        )

    (reading,) = wait_until(professional, server)
    reading = reading.serialize()
    assert reading["status"] == "billable"
    assert price_of(reading)["total"] == Decimal("71.40")
    assert reading["performer"][0]["actor"]["display"]
    assert reading["account"] == [{"reference": account}]

    # Re-sending the study (with one slice more, so that it changes and is stable again):
    # captured again, never charged twice.
    done = captures_done(server, study)
    send(server, slices, workdir / "e2e-again")
    wait_until(lambda: captures_done(server, study) > done, server)
    assert len(fhirpy.resources("ChargeItem").search(patient=f"Patient/{patient}").fetch_all()) == 2

    # An invoice of the account's billable charges, created with fhirpy, issued by an update.
    invoice = fhirpy.resource("Invoice", status="draft", account={"reference": account})
    invoice.save()
    draft = http.get(f"/Invoice/{invoice.id}").json()
    assert draft["status"] == "draft"
    assert [item["chargeItemReference"]["reference"] for item in draft["lineItem"]] == [
        f"ChargeItem/{technical['id']}",
        f"ChargeItem/{reading['id']}",
    ]
    assert Decimal(str(draft["totalNet"]["value"])) == Decimal("280.00")
    assert Decimal(str(draft["totalGross"]["value"])) == Decimal("333.20")
    first_line = {
        (c["type"], Decimal(str(c["amount"]["value"])))
        for c in draft["lineItem"][0]["priceComponent"]
    }
    assert first_line == {
        ("base", Decimal("180.00")),
        ("surcharge", Decimal("40.00")),
        ("tax", Decimal("41.80")),
    }
    stale = dict(draft, meta={"versionId": "0"})
    outcome(put(http, stale, status="issued"), 412, "conflict", "If-Match")
    issued = put(http, draft, status="issued")
    assert issued.status_code == 200, issued.text
    issued_body = issued.json()
    assert issued_body["status"] == "issued"
    assert issued_body["meta"]["versionId"] == "2"
    assert balance_of(issued_body, INVOICE_BALANCE)["dueDate"]
    assert http.get(f"/ChargeItem/{technical['id']}").json()["status"] == "billed"

    # Partial payment, an overpayment refused, the final payment: balanced.
    partial = pay(http, invoice.id, "100.00", paymentIdentifier={"value": "BANK-0001"})
    assert partial.status_code == 201, partial.text
    assert partial.json()["detail"][0]["request"] == {"reference": f"Invoice/{invoice.id}"}
    after_partial = http.get(f"/Invoice/{invoice.id}").json()
    assert after_partial["status"] == "issued"
    assert balance_of(after_partial, INVOICE_BALANCE)["outstanding"] == Decimal("233.20")
    (acct,) = fhirpy.resources("Account").search(patient=f"Patient/{patient}").fetch_all()
    figures = balance_of(acct.serialize(), ACCOUNT_BALANCE)
    assert (figures["billed"], figures["paid"], figures["outstanding"], figures["overdue"]) == (
        Decimal("333.20"),
        Decimal("100.00"),
        Decimal("233.20"),
        Decimal("0.00"),
    )
    outcome(
        pay(http, invoice.id, "233.21"), 422, "business-rule", "overpayment: outstanding is 233.20"
    )
    final = pay(http, invoice.id, "233.20")
    assert final.status_code == 201, final.text
    balanced = http.get(f"/Invoice/{invoice.id}").json()
    assert balanced["status"] == "balanced"
    assert balance_of(balanced, INVOICE_BALANCE)["outstanding"] == Decimal("0.00")
    acct_now = http.get(f"/{account}").json()
    figures = balance_of(acct_now, ACCOUNT_BALANCE)
    assert (figures["billed"], figures["paid"], figures["outstanding"]) == (
        Decimal("333.20"),
        Decimal("333.20"),
        Decimal("0.00"),
    )
    outcome(pay(http, invoice.id, "0.01"), 422, "business-rule", "overpayment: outstanding is 0.00")
    paid_by = (
        fhirpy.resources("PaymentReconciliation")
        .search(invoice=f"Invoice/{invoice.id}")
        .fetch_all()
    )
    assert sorted(Decimal(str(p["paymentAmount"]["value"])) for p in paid_by) == [
        Decimal("100.00"),
        Decimal("233.20"),
    ]

    # The invoice's history: every change, who and why; totals recomputed from it agree.
    history = http.get(f"/Invoice/{invoice.id}/_history").json()
    assert [e["resource"]["status"] for e in history["entry"]] == [
        "balanced",
        "issued",
        "issued",
        "draft",
    ]
    whys = [
        {p["url"]: p["valueString"] for p in ext["extension"]}
        for e in history["entry"]
        for ext in e["resource"]["extension"]
        if ext["url"] == CHANGE
    ]
    assert all(w["who"] == "fhir" for w in whys)
    assert whys[-1]["why"] == "created with 2 charges"
    with closing(server.archive()) as arc:
        recomputed = recompute_from_history(arc, int(invoice.id))
    assert (recomputed.gross, recomputed.paid, recomputed.status) == (
        Decimal("333.20"),
        Decimal("333.20"),
        "balanced",
    )

    # A study deleted before it is invoiced: its charge is voided (entered-in-error).
    other = send(
        server,
        ct_study(
            2,
            patient_id="BILL-E2E-2",
            body_part="CHEST",
            procedure=code("24627-2", "LN", "CT Chest"),
        ),
        workdir / "deleted",
    )
    wait_until(lambda: captures_done(server, other) >= 1, server)
    (charge,) = fhirpy.resources("ChargeItem").search(service=f"ImagingStudy/{other}").fetch_all()
    assert charge["status"] == "billable"
    deleted = run_cli(backend, workdir, "delete", "--study", other)
    assert deleted.returncode == 0, deleted.stderr
    voided = http.get(f"/ChargeItem/{charge.id}").json()
    assert voided["status"] == "entered-in-error"
    versions = http.get(f"/ChargeItem/{charge.id}/_history").json()["entry"]
    assert [v["resource"]["status"] for v in versions] == ["entered-in-error", "billable"]
    (change,) = [e for e in versions[0]["resource"]["extension"] if e["url"] == CHANGE]
    assert {p["url"]: p["valueString"] for p in change["extension"]}["why"] == "study deleted"


# --- the price list, $apply, manual charges -----------------------------------------------------


@pytest.fixture(scope="module")
def patient_with_account(
    server: RunningServer, http: httpx.Client, workdir: Path
) -> tuple[str, str]:
    """A patient whose CT chest (no contrast) was captured: (Patient id, Account id)."""
    study = send(
        server,
        ct_study(
            2,
            patient_id="BILL-MANUAL-1",
            body_part="CHEST",
            procedure=code("24627-2", "LN", "CT Chest"),
        ),
        workdir / "manual",
    )
    wait_until(lambda: captures_done(server, study) >= 1, server)
    patient = patient_of(http, "BILL-MANUAL-1")
    bundle = http.get("/Account", params={"patient": f"Patient/{patient}"}).json()
    assert bundle["total"] == 1
    return patient, bundle["entry"][0]["resource"]["id"]


def test_price_list_as_charge_item_definitions(http: httpx.Client, fhirpy: Any) -> None:
    found = (
        fhirpy.resources("ChargeItemDefinition")
        .search(code=f"{LOINC}|24725-4", status="active")
        .fetch_all()
    )
    assert {d["description"] for d in found} == {"technical charge", "professional charge"}
    (technical,) = [d.serialize() for d in found if d["description"] == "technical charge"]
    assert technical["url"].endswith(f"/ChargeItemDefinition/{technical['id']}")
    assert technical["effectivePeriod"] == {"start": "2026-01-01"}
    components = [c for g in technical["propertyGroup"] for c in g["priceComponent"]]
    assert components[0]["type"] == "base"
    assert Decimal(str(components[0]["amount"]["value"])) == Decimal("180.00")
    contrast = next(
        g
        for g in technical["propertyGroup"]
        if g["priceComponent"][0]["type"] == "surcharge"
        and g["priceComponent"][0]["code"]["coding"][0]["code"] == "CONTRAST"
    )
    assert contrast["applicability"][0]["expression"] == "contrast"
    vat = next(c for c in components if c["type"] == "tax")
    assert Decimal(str(vat["factor"])) == Decimal("0.19")
    # Searches by date in force, by title, and the fallback rows (modality + body part).
    assert (
        http.get("/ChargeItemDefinition", params={"effective": "2025-06-01"}).json()["total"] == 0
    )
    in_force = http.get(
        "/ChargeItemDefinition", params={"effective": "2026-06-01", "_count": "0"}
    ).json()
    assert in_force["total"] == 20
    titled = http.get("/ChargeItemDefinition", params={"title": "mr brain"}).json()
    assert {e["resource"]["title"] for e in titled["entry"]} >= {
        "MR Brain",
        "MR brain (no procedure code)",
    }
    fallback = http.get(
        "/ChargeItemDefinition", params={"title:exact": "MG breast bilateral"}
    ).json()
    (row,) = [e["resource"] for e in fallback["entry"]]
    assert "laterality = 'B'" in row["applicability"][0]["expression"]


def test_apply_manual_charges_and_adjustments(
    http: httpx.Client, fhirpy: Any, patient_with_account: tuple[str, str]
) -> None:
    patient, account = patient_with_account
    (charge,) = http.get("/ChargeItem", params={"account": f"Account/{account}"}).json()["entry"]
    captured = charge["resource"]
    # $apply: the CT chest charge priced by the CT head definition (not stored).
    head = http.get(
        "/ChargeItemDefinition", params={"code": f"{LOINC}|24725-4", "status": "active"}
    ).json()
    head_technical = next(
        e["resource"] for e in head["entry"] if e["resource"]["description"] == "technical charge"
    )
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "chargeItem", "valueReference": {"reference": f"ChargeItem/{captured['id']}"}}
        ],
    }
    applied = http.post(
        f"/ChargeItemDefinition/{head_technical['id']}/$apply",
        json=parameters,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert applied.status_code == 200, applied.text
    priced = applied.json()
    assert priced["resourceType"] == "ChargeItem"
    assert priced["definitionCanonical"][0].endswith(
        f"/ChargeItemDefinition/{head_technical['id']}"
    )
    assert price_of(priced)["total"] == Decimal("214.20")  # 180.00 + VAT 34.20: no contrast
    assert price_of(http.get(f"/ChargeItem/{captured['id']}").json())["total"] == Decimal("249.90")
    missing = http.post(
        f"/ChargeItemDefinition/{head_technical['id']}/$apply",
        json={"resourceType": "Parameters"},
        headers={"Content-Type": "application/fhir+json"},
    )
    outcome(missing, 400, "invalid", "chargeItem")
    outcome(
        http.post(
            "/ChargeItemDefinition/1/$price",
            json=parameters,
            headers={"Content-Type": "application/fhir+json"},
        ),
        404,
        "not-supported",
        "$price",
    )

    # A manual charge (a CD of the images) with fhirpy: 2 x 12.50, no tax on the price list
    # row (the site rate is not set): 25.00.
    cd = fhirpy.resource(
        "ChargeItem",
        status="billable",
        identifier=[{"system": "urn:example:ris", "value": "CD-0001"}],
        code={
            "coding": [
                {
                    "system": "urn:pacsbridge:procedure-code",
                    "code": "CD-COPY",
                    "display": "Images on CD",
                }
            ]
        },
        subject={"reference": f"Patient/{patient}"},
        occurrenceDateTime="2026-03-05",
        quantity={"value": 2},
        priceOverride={"value": 12.5, "currency": "EUR"},
        overrideReason="copy for the referring physician",
    )
    cd.save()
    entered = http.get(f"/ChargeItem/{cd.id}").json()
    assert entered["status"] == "billable" and entered["account"] == [
        {"reference": f"Account/{account}"}
    ]
    assert price_of(entered)["total"] == Decimal("25.00")
    assert Decimal(str(entered["priceOverride"]["value"])) == Decimal("12.50")
    assert entered["quantity"] == {"value": 2}
    # The same identifier again: the charge entered then (200), not a second one.
    again = post(http, {k: v for k, v in cd.serialize().items() if k not in ("id", "meta")})
    assert again.status_code == 200 and again.json()["id"] == cd.id

    # Adjusted with If-Match: the price changes (a new version); a stale version is refused.
    changed = put(
        http, entered, priceOverride={"value": 15, "currency": "EUR"}, overrideReason="new tariff"
    )
    assert changed.status_code == 200, changed.text
    assert price_of(changed.json())["total"] == Decimal("30.00")
    assert changed.json()["meta"]["versionId"] == "2"
    outcome(put(http, entered, status="entered-in-error"), 412, "conflict", "version")
    # A manual charge without a price waits for review (planned).
    unpriced = post(
        http,
        {
            "resourceType": "ChargeItem",
            "status": "billable",
            "code": {"text": "Consultation"},
            "subject": {"reference": f"Patient/{patient}"},
            "occurrenceDateTime": "2026-03-05",
        },
    )
    assert unpriced.status_code == 201, unpriced.text
    assert unpriced.json()["status"] == "planned"
    assert "without a price" in unpriced.json()["note"][0]["text"]
    priced_now = put(
        http, unpriced.json(), status="billable", priceOverride={"value": 80, "currency": "EUR"}
    )
    assert priced_now.status_code == 200, priced_now.text
    assert priced_now.json()["status"] == "billable"
    assert price_of(priced_now.json())["total"] == Decimal("80.00")
    # A captured charge: its code does not change; voided with a reason it is entered-in-error.
    recoded = dict(captured, code={"text": "something else"})
    outcome(put(http, recoded), 422, "business-rule", "cannot change")
    voided = put(http, captured, status="entered-in-error", overrideReason="duplicate order")
    assert voided.status_code == 200, voided.text
    assert voided.json()["status"] == "entered-in-error"
    history = http.get(f"/ChargeItem/{captured['id']}/_history").json()["entry"]
    (change,) = [e for e in history[0]["resource"]["extension"] if e["url"] == CHANGE]
    assert {p["url"]: p["valueString"] for p in change["extension"]} == {
        "who": "fhir",
        "why": "duplicate order",
    }
    assert http.get(f"/ChargeItem/{captured['id']}/_history/1").json()["status"] == "billable"
    # Bad manual charges: another currency, an unknown patient, a foreign code system.
    foreign = {
        "resourceType": "ChargeItem",
        "status": "billable",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{patient}"},
        "priceOverride": {"value": 1, "currency": "USD"},
    }
    outcome(post(http, foreign), 422, "business-rule", "this site bills in EUR")
    outcome(
        post(
            http,
            {
                **foreign,
                "priceOverride": {"value": 1, "currency": "EUR"},
                "subject": {"reference": "Patient/999999"},
            },
        ),
        422,
        "processing",
        "not known",
    )
    outcome(
        post(
            http,
            {
                **foreign,
                "priceOverride": None,
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
            },
        ),
        422,
        "code-invalid",
        "not a price list code system",
    )


def test_invoice_status_changes_and_accounts(
    http: httpx.Client,
    fhirpy: Any,
    patient_with_account: tuple[str, str],
    server: RunningServer,
) -> None:
    patient, account = patient_with_account
    entered = post(
        http,
        {
            "resourceType": "ChargeItem",
            "status": "billable",
            "code": {"text": "Film printout"},
            "subject": {"reference": f"Patient/{patient}"},
            "occurrenceDateTime": "2026-03-06",
            "priceOverride": {"value": 9.99, "currency": "EUR"},
        },
    ).json()
    # An invoice of one named charge, then cancelled with a reason: the charge is billable again.
    created = post(
        http,
        {
            "resourceType": "Invoice",
            "status": "draft",
            "lineItem": [{"chargeItemReference": {"reference": f"ChargeItem/{entered['id']}"}}],
        },
    )
    assert created.status_code == 201, created.text
    assert created.headers["Location"].endswith("/_history/1")
    draft = created.json()
    assert [i["chargeItemReference"]["reference"] for i in draft["lineItem"]] == [
        f"ChargeItem/{entered['id']}"
    ]
    outcome(put(http, draft, status="cancelled"), 422, "business-rule", "reason")
    outcome(
        put(http, draft, status="balanced"), 422, "business-rule", "balanced follows from payments"
    )
    cancelled = put(http, draft, status="cancelled", cancelledReason="wrong patient")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancelledReason"] == "wrong patient"
    assert http.get(f"/ChargeItem/{entered['id']}").json()["status"] == "billable"
    # A charge on a draft does not change; taken off only by cancelling the draft.
    second = post(
        http,
        {
            "resourceType": "Invoice",
            "status": "draft",
            "lineItem": [{"chargeItemReference": {"reference": f"ChargeItem/{entered['id']}"}}],
        },
    ).json()
    outcome(
        put(
            http,
            http.get(f"/ChargeItem/{entered['id']}").json(),
            priceOverride={"value": 1, "currency": "EUR"},
        ),
        422,
        "business-rule",
        "draft invoice",
    )
    outcome(put(http, second, lineItem=[]), 422, "business-rule", "cannot be taken off")
    voided = put(http, second, status="entered-in-error", cancelledReason="made by mistake")
    assert voided.status_code == 200, voided.text
    assert voided.json()["status"] == "entered-in-error"
    # Issued at once; an issued invoice is immutable.
    issued = post(
        http,
        {
            "resourceType": "Invoice",
            "status": "issued",
            "lineItem": [{"chargeItemReference": {"reference": f"ChargeItem/{entered['id']}"}}],
        },
    )
    assert issued.status_code == 201, issued.text
    assert issued.json()["status"] == "issued"
    outcome(put(http, issued.json(), status="draft"), 422, "business-rule", "does not become draft")
    search = (
        fhirpy.resources("Invoice")
        .search(patient=f"Patient/{patient}", status="issued")
        .fetch_all()
    )
    assert [i.id for i in search] == [issued.json()["id"]]
    assert (
        http.get("/Invoice", params={"patient": f"Patient/{patient}", "overdue": "true"}).json()[
            "total"
        ]
        == 0
    )
    assert (
        http.get("/Invoice", params={"account": f"Account/{account}", "_count": "0"}).json()[
            "total"
        ]
        == 3
    )
    # The account's billable charges invoiced at once; then it has nothing left to invoice.
    everything = post(
        http,
        {
            "resourceType": "Invoice",
            "status": "issued",
            "account": {"reference": f"Account/{account}"},
        },
    )
    assert everything.status_code == 201, everything.text
    left = http.get("/ChargeItem", params={"account": f"Account/{account}", "status": "billable"})
    assert left.json()["total"] == 0
    outcome(
        post(
            http,
            {
                "resourceType": "Invoice",
                "status": "draft",
                "account": {"reference": f"Account/{account}"},
            },
        ),
        422,
        "business-rule",
        "no billable charge",
    )

    # The account: guarantor and coverage set by the EHR, with If-Match.
    current = http.get(f"/Account/{account}").json()
    updated = put(
        http,
        current,
        name="Self-pay account",
        guarantor=[{"party": {"display": "Jane Guarantor"}, "onHold": False}],
        coverage=[{"coverage": {"display": "Acme Health plan 42"}, "priority": 1}],
    )
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert body["guarantor"][0]["party"]["display"] == "Jane Guarantor"
    assert body["coverage"][0]["coverage"]["display"] == "Acme Health plan 42"
    assert body["meta"]["versionId"] == "2" and body["name"] == "Self-pay account"
    outcome(put(http, current, name="stale"), 412, "conflict", "If-Match")
    closed = put(http, body, status="inactive").json()
    assert (
        http.get("/Account", params={"status": "inactive", "patient": f"Patient/{patient}"}).json()[
            "total"
        ]
        == 1
    )
    reopened = put(http, closed, status="active")
    assert reopened.status_code == 200
    assert http.get(f"/Account/{account}/_history/4").json()["status"] == "active"

    # Overdue: an invoice issued in January (14 days' terms) and not paid.
    late_charge = post(
        http,
        {
            "resourceType": "ChargeItem",
            "status": "billable",
            "code": {"text": "Late fee"},
            "subject": {"reference": f"Patient/{patient}"},
            "priceOverride": {"value": 5, "currency": "EUR"},
        },
    ).json()
    late = post(
        http,
        {
            "resourceType": "Invoice",
            "status": "draft",
            "lineItem": [{"chargeItemReference": {"reference": f"ChargeItem/{late_charge['id']}"}}],
        },
    ).json()
    with closing(server.archive()) as arc:
        terms = arc.settings.model_copy(update={"billing": BillingSettings(payment_terms_days=14)})
        issue_invoice(
            arc, terms, int(late["id"]), actor="test", now=datetime(2026, 1, 5, tzinfo=UTC)
        )
    overdue = http.get("/Invoice", params={"patient": f"Patient/{patient}", "overdue": "true"})
    assert [e["resource"]["id"] for e in overdue.json()["entry"]] == [late["id"]]
    assert balance_of(overdue.json()["entry"][0]["resource"], INVOICE_BALANCE)["dueDate"] == (
        "2026-01-19"
    )
    not_overdue = http.get(
        "/Invoice", params={"patient": f"Patient/{patient}", "overdue": "false", "_count": "0"}
    )
    everything = http.get("/Invoice", params={"patient": f"Patient/{patient}", "_count": "0"})
    assert not_overdue.json()["total"] == everything.json()["total"] - 1
    figures = balance_of(http.get(f"/Account/{account}").json(), ACCOUNT_BALANCE)
    assert figures["overdue"] == Decimal("5.00")


def test_payment_reconciliation_of_several_invoices_is_all_or_nothing(
    http: httpx.Client, patient_with_account: tuple[str, str]
) -> None:
    patient, _ = patient_with_account

    def issued_invoice(amount: float) -> dict[str, Any]:
        charge = post(
            http,
            {
                "resourceType": "ChargeItem",
                "status": "billable",
                "code": {"text": "Report copy"},
                "subject": {"reference": f"Patient/{patient}"},
                "priceOverride": {"value": amount, "currency": "EUR"},
            },
        ).json()
        return post(
            http,
            {
                "resourceType": "Invoice",
                "status": "issued",
                "lineItem": [{"chargeItemReference": {"reference": f"ChargeItem/{charge['id']}"}}],
            },
        ).json()

    one, two = issued_invoice(10), issued_invoice(20)

    def remittance(first: str, second: str) -> dict[str, Any]:
        detail = lambda invoice, value: {  # noqa: E731
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/payment-type",
                        "code": "payment",
                    }
                ]
            },
            "request": {"reference": f"Invoice/{invoice}"},
            "amount": {"value": float(value), "currency": "EUR"},
        }
        total = Decimal(first) + Decimal(second)
        return {
            "resourceType": "PaymentReconciliation",
            "status": "active",
            "created": "2026-03-21T09:00:00Z",
            "paymentDate": "2026-03-21",
            "paymentAmount": {"value": float(total), "currency": "EUR"},
            "detail": [detail(one["id"], first), detail(two["id"], second)],
        }

    # The second invoice overpaid: nothing is recorded, the first stays unpaid.
    outcome(post(http, remittance("10.00", "20.01")), 422, "business-rule", "overpayment")
    assert http.get(f"/Invoice/{one['id']}").json()["status"] == "issued"
    assert (
        http.get("/PaymentReconciliation", params={"invoice": f"Invoice/{one['id']}"}).json()[
            "total"
        ]
        == 0
    )
    wrong_sum = remittance("10.00", "20.00") | {"paymentAmount": {"value": 31, "currency": "EUR"}}
    outcome(post(http, wrong_sum), 422, "business-rule", "not the sum")
    paid = post(http, remittance("10.00", "20.00"))
    assert paid.status_code == 201, paid.text
    assert {d["request"]["reference"] for d in paid.json()["detail"]} == {
        f"Invoice/{one['id']}",
        f"Invoice/{two['id']}",
    }
    for invoice in (one, two):
        assert http.get(f"/Invoice/{invoice['id']}").json()["status"] == "balanced"
    # A refund: a negative detail with a reason (disposition) reopens the invoice.
    refund = remittance("-10.00", "0.01") | {"disposition": "returned the CD"}
    refund["detail"] = refund["detail"][:1]
    refund["paymentAmount"] = {"value": -10.0, "currency": "EUR"}
    refunded = post(http, refund)
    assert refunded.status_code == 201, refunded.text
    assert refunded.json()["detail"][0]["type"]["coding"][0]["code"] == "adjustment"
    assert http.get(f"/Invoice/{one['id']}").json()["status"] == "issued"


def test_capability_statement_declares_billing(http: httpx.Client) -> None:
    """The billing types' part of the CapabilityStatement is exact: every declared search
    parameter, include and interaction works; every interaction left out is 405."""
    statement = http.get("/metadata").json()
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(by_type) >= BILLING_TYPES
    assert by_type["ChargeItemDefinition"]["operation"] == [
        {
            "name": "apply",
            "definition": "http://hl7.org/fhir/OperationDefinition/ChargeItemDefinition-apply",
        }
    ]
    charge_params = {p["name"] for p in by_type["ChargeItem"]["searchParam"]}
    assert {"patient", "subject", "status", "service", "code", "entered-date", "account"} <= (
        charge_params
    )
    assert {p["name"] for p in by_type["Invoice"]["searchParam"]} >= {
        "patient",
        "status",
        "date",
        "account",
        "overdue",
    }
    assert {p["name"] for p in by_type["Account"]["searchParam"]} >= {"patient", "status"}
    assert ACCOUNT_BALANCE in by_type["Account"]["documentation"]
    for kind in sorted(BILLING_TYPES):
        resource = by_type[kind]
        declared = {i["code"] for i in resource["interaction"]}
        one = "1"  # each type has its first resource after the tests above
        read = http.get(f"/{kind}/{one}")
        assert read.status_code == 200, (kind, read.text)
        version = read.json()["meta"]["versionId"]
        for interaction in INTERACTIONS:
            response = exercise(http, interaction, kind, one, version)
            where = (interaction, kind, response.status_code, response.text[:300])
            if interaction not in declared:
                outcome(response, 405, "not-supported", "")
            elif interaction in ("create", "update"):  # the route is there; the body is not R4
                outcome(response, 400, "structure", "")
            else:
                assert response.status_code == 200, where
        for param in resource["searchParam"]:
            value = sample_value(param["name"], param["type"])
            found = http.get(f"/{kind}", params={param["name"]: value}, headers=STRICT)
            assert found.status_code == 200, (kind, param["name"], found.text)
        for value in resource.get("searchInclude", []):
            bundle = http.get(f"/{kind}", params={"_id": one, "_include": value}, headers=STRICT)
            assert bundle.status_code == 200, (value, bundle.text)
            included = {
                e["resource"]["resourceType"]
                for e in bundle.json().get("entry", [])
                if e["search"]["mode"] == "include"
            }
            assert REFERENCE_TARGETS[value.split(":")[1]] in included, value
