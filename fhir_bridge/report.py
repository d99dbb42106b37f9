"""DiagnosticReport, Observation and Device (FHIR R4) from the structured reports of the archive.

Each SR document becomes a DiagnosticReport, following the HL7 "DICOM SR to FHIR" IG: one
Observation per measurement or qualitative evaluation (``valueQuantity`` in UCUM, codes from
the SR, ``partOf`` / ``derivedFrom`` the ImagingStudy, identifiers from the tracking UIDs) and a
Device for the algorithm that produced it (IHE AIR algorithm identification). A report's FHIR id
is the SOP Instance UID of its first version; every later version (Predecessor Documents
Sequence) is a version of the same DiagnosticReport.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, case, exists, func, literal, select
from sqlalchemy.orm import Session, aliased

from archive.models import Patient, ReportDocument, ReportMeasurement, Study, Tombstone
from archive.order_links import orders_of_studies
from fhir_bridge import identity, search
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, gone, not_found
from fhir_bridge.imaging_study import study_uid_of
from fhir_bridge.provider import Include, Provider, meta
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"

# FHIR status of a document (DiagnosticReport.status, R4 valueset-diagnostic-report-status):
# the status its writer asked for, else from the SR's flags (PS3.3 C.17.2.1).
STATUS = case(
    (ReportDocument.status.is_not(None), ReportDocument.status),
    (ReportDocument.verification_flag == "VERIFIED", "final"),
    (ReportDocument.completion_flag == "PARTIAL", "partial"),
    else_="preliminary",
)
_STATUS_ANY: Any = STATUS
_RADIOLOGY = {"coding": [{"system": identity.V2_0074, "code": "RAD", "display": "Radiology"}]}
_IMAGING = {
    "coding": [{"system": identity.OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]
}


def fhir_status(document: ReportDocument) -> str:
    if document.status:
        return document.status
    if document.verification_flag == "VERIFIED":
        # Without a stated status, a later version may be a preliminary report made final as
        # well as an amendment: final is what the flags say.
        return "final"
    return "partial" if document.completion_flag == "PARTIAL" else "preliminary"


def _int_id(value: str | None) -> int | None:
    return search.row_id(value)


def _code_condition(scheme_column: Any, code_column: Any, value: str) -> Any:
    system, code = search.token(value)
    if code is None:
        scheme = identity.coding_scheme(system)
        return scheme_column == scheme if scheme else literal(False)
    if system is None:
        return code_column == code
    scheme = identity.coding_scheme(system)
    if scheme is None:
        return literal(False)
    return (code_column == code) & (scheme_column == scheme)


def _patient_condition(value: str) -> Any:
    patient = _int_id(search.reference_id(value, "Patient"))
    if patient is None:
        return literal(False)
    return ReportDocument.study_fk.in_(select(Study.id).where(Study.patient_fk == patient))


def _study_condition(value: str) -> Any:
    uid = search.reference_id(value, "ImagingStudy")
    if uid is None:
        return literal(False)
    return ReportDocument.study_fk.in_(
        select(Study.id).where(Study.study_instance_uid == study_uid_of(uid))
    )


def _date_param(name: str, column: Any, documentation: str, definition: str) -> SearchParam:
    return SearchParam(
        name,
        "date",
        documentation,
        lambda v, m: search.date_condition(
            search.parse_date(v, name), column, column, search.utc_bound
        ),
        definition=definition,
    )


class DiagnosticReportProvider(Provider):
    type = "DiagnosticReport"
    compartment = ("subject",)  # R4 compartmentdefinition-patient
    profile = "http://hl7.org/fhir/StructureDefinition/DiagnosticReport"
    interactions = (
        "read",
        "vread",
        "search-type",
        "create",
        "update",
        "history-instance",
        "history-type",
    )
    creatable = True
    updatable = True
    documentation = (
        "Reports from the SR documents of the archive (AI TID 1500 results, any modality's SR, "
        "and radiologists' reports: a report created or updated here is stored as an Enhanced "
        "SR with TID 2000 content in its study, every version kept)."
    )

    def __init__(self, settings: Any, patients: Any) -> None:
        super().__init__()
        self.patients = patients
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id (the first version's SOP Instance UID)",
            lambda v, m: ReportDocument.root_uid == v,
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        for name in ("patient", "subject"):
            p[name] = SearchParam(
                name,
                "reference",
                "The patient (Patient/id); chains to Patient's parameters",
                lambda v, m: _patient_condition(v),
                chain=self._patient_chain,
                targets=("Patient",),
                definition=SEARCH_PARAMETER
                + ("clinical-patient" if name == "patient" else "DiagnosticReport-subject"),
            )
        p["status"] = SearchParam(
            "status",
            "token",
            "registered | partial | preliminary | final | amended | corrected",
            lambda v, m: (search.token(v)[1] or "") == _STATUS_ANY,
            definition=SEARCH_PARAMETER + "DiagnosticReport-status",
        )
        p["date"] = _date_param(
            "date",
            ReportDocument.content_datetime,
            "The report's Content Date/Time",
            SEARCH_PARAMETER + "clinical-date",
        )
        p["category"] = SearchParam(
            "category",
            "token",
            "RAD (v2-0074): every report here is a radiology report",
            lambda v, m: literal(
                search.token(v)[1] in ("RAD", "LP29684-5")
                and search.token(v)[0] in (None, "", identity.V2_0074, identity.LOINC)
            ),
            definition=SEARCH_PARAMETER + "DiagnosticReport-category",
        )
        p["code"] = SearchParam(
            "code",
            "token",
            "The document title (system|code)",
            lambda v, m: _code_condition(ReportDocument.title_scheme, ReportDocument.title_code, v),
            definition=SEARCH_PARAMETER + "clinical-code",
        )
        p["imaging-study"] = SearchParam(
            "imaging-study",
            "reference",
            "The ImagingStudy the report is about (custom: DiagnosticReport.imagingStudy)",
            lambda v, m: _study_condition(v),
            targets=("ImagingStudy",),
        )
        p["result"] = SearchParam(
            "result",
            "reference",
            "An Observation of the report",
            self._result,
            targets=("Observation",),
            definition=SEARCH_PARAMETER + "DiagnosticReport-result",
        )
        p["identifier"] = SearchParam(
            "identifier",
            "token",
            "urn:dicom:uid|urn:oid:<SOP Instance UID> of any version",
            self._identifier,
            definition=SEARCH_PARAMETER + "clinical-identifier",
        )
        p["_lastUpdated"] = _date_param(
            "_lastUpdated",
            ReportDocument.created_at,
            "When the newest version was stored",
            SEARCH_PARAMETER + "Resource-lastUpdated",
        )
        self.sorts = {
            "_id": ReportDocument.root_uid,
            "date": ReportDocument.content_datetime,
            "_lastUpdated": ReportDocument.created_at,
        }
        self.includes = {
            "DiagnosticReport:result": Include("DiagnosticReport", "result", "Observation"),
            "DiagnosticReport:subject": Include("DiagnosticReport", "subject", "Patient"),
            "DiagnosticReport:patient": Include("DiagnosticReport", "patient", "Patient"),
        }

    def _patient_chain(self, param: str, modifier: str | None, value: str) -> Any:
        target = self.patients.params.get(param)
        if target is not None and modifier is not None and modifier not in target.modifiers:
            raise FHIRError(
                400,
                f"Patient.{param} takes no modifier {modifier!r}",
                expression=[f"subject:Patient.{param}:{modifier}"],
            )
        if target is None:
            raise FHIRError(400, f"Patient has no search parameter {param!r} to chain")
        return ReportDocument.study_fk.in_(
            select(Study.id)
            .join(Patient, Study.patient_fk == Patient.id)
            .where(target.condition(value, modifier))
        )

    @staticmethod
    def _result(value: str, modifier: str | None) -> Any:
        measurement = _int_id(search.reference_id(value, "Observation"))
        if measurement is None:
            return literal(False)
        return exists(
            select(ReportMeasurement.id).where(
                ReportMeasurement.id == measurement,
                ReportMeasurement.document_fk == ReportDocument.id,
            )
        )

    @staticmethod
    def _identifier(value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None or system not in (None, identity.DICOM_UID_SYSTEM):
            return literal(False)
        other = aliased(ReportDocument)
        return ReportDocument.root_uid.in_(
            select(other.root_uid).where(other.sop_instance_uid == study_uid_of(code))
        )

    # --- rows --------------------------------------------------------------------------------
    def id_column(self) -> Any:
        return ReportDocument.id

    def base_select(self) -> Select[Any]:
        return select(ReportDocument.id).where(ReportDocument.superseded.is_(False))

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return list(
            session.scalars(
                select(ReportDocument.id).where(
                    ReportDocument.root_uid.in_(list(resource_ids)),
                    ReportDocument.superseded.is_(False),
                )
            )
        )

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        if not row_ids:
            return []
        rows = {
            row.ReportDocument.id: row
            for row in session.execute(
                select(
                    ReportDocument,
                    Study.study_instance_uid,
                    Study.patient_fk,
                    Study.accession_number,
                )
                .join(Study, ReportDocument.study_fk == Study.id)
                .where(ReportDocument.id.in_(row_ids))
            )
        }
        # basedOn: the orders the report's study was made for (archive.order_links).
        orders = orders_of_studies(
            session, {(row.study_instance_uid, row.accession_number) for row in rows.values()}
        )
        results: dict[int, list[int]] = defaultdict(list)
        for measurement_id, document_fk in session.execute(
            select(ReportMeasurement.id, ReportMeasurement.document_fk)
            .where(ReportMeasurement.document_fk.in_(list(rows)))
            .order_by(ReportMeasurement.position)
        ):
            results[document_fk].append(measurement_id)
        resources = []
        for i in row_ids:
            if i not in rows:
                continue
            resource = self.resource(
                rows[i].ReportDocument,
                rows[i].study_instance_uid,
                rows[i].patient_fk,
                results.get(i, []),
            )
            based_on = orders.get(rows[i].study_instance_uid)
            if based_on:
                resource["basedOn"] = [{"reference": f"ServiceRequest/{o}"} for o in based_on]
            resources.append(resource)
        return resources

    @staticmethod
    def resource(
        document: ReportDocument, study_uid: str, patient_fk: int, results: list[int]
    ) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "id": document.root_uid,
            "meta": meta(document.version, document.created_at),
            "identifier": [
                {
                    "system": identity.DICOM_UID_SYSTEM,
                    "value": f"urn:oid:{document.sop_instance_uid}",
                }
            ],
            "status": fhir_status(document),
            "category": [_RADIOLOGY],
            "code": identity.concept(
                document.title_scheme, document.title_code, document.title_meaning
            )
            if document.title_code
            else {"text": "Report"},
            "subject": {"reference": f"Patient/{patient_fk}"},
        }
        if document.content_datetime is not None:
            resource["effectiveDateTime"] = identity.fhir_instant_or_datetime(
                document.content_datetime
            )
        resource["issued"] = identity.fhir_instant_or_datetime(
            document.verification_datetime or document.created_at
        )
        interpreters = [
            {"display": display}
            for display in (
                identity.person_display(document.verifying_observer)
                or identity.person_display(document.author),
            )
            if display
        ]
        if interpreters:
            resource["resultsInterpreter"] = interpreters
        if results:
            resource["result"] = [{"reference": f"Observation/{i}"} for i in results]
        resource["imagingStudy"] = [{"reference": f"ImagingStudy/{study_uid}"}]
        if document.conclusion:
            resource["conclusion"] = document.conclusion
        if document.narrative:
            resource["presentedForm"] = [
                {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(document.narrative.encode()).decode(),
                    "title": document.title_meaning or "Report",
                }
            ]
        return resource

    def _documents(self, session: Session, resource_id: str) -> list[Any]:
        return list(
            session.execute(
                select(ReportDocument, Study.study_instance_uid, Study.patient_fk)
                .join(Study, ReportDocument.study_fk == Study.id)
                .where(ReportDocument.root_uid == resource_id)
                .order_by(ReportDocument.version.desc(), ReportDocument.id.desc())
            )
        )

    def _missing(self, session: Session, resource_id: str) -> FHIRError:
        if session.scalar(
            select(Tombstone.id).where(Tombstone.kind == "report", Tombstone.key == resource_id)
        ):
            return gone("DiagnosticReport", resource_id)
        return not_found("DiagnosticReport", resource_id)

    def current(self, session: Session, resource_id: str) -> Any:
        documents = self._documents(session, resource_id)
        live = [d for d in documents if not d.ReportDocument.superseded] or documents
        if not live:
            raise self._missing(session, resource_id)
        return live[0]

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        row = self.current(session, resource_id)
        return self.load(ctx, session, [row.ReportDocument.id])[0]

    def vread(
        self, ctx: Context, session: Session, resource_id: str, version: str
    ) -> dict[str, Any]:
        for resource in self.history(ctx, session, resource_id):
            if resource["meta"]["versionId"] == version:
                return resource
        raise FHIRError(404, f"DiagnosticReport/{resource_id} has no version {version!r}")

    def history(self, ctx: Context, session: Session, resource_id: str) -> list[dict[str, Any]]:
        documents = self._documents(session, resource_id)
        if not documents:
            raise self._missing(session, resource_id)
        return self.load(ctx, session, [d.ReportDocument.id for d in documents])

    def history_type(
        self, ctx: Context, session: Session, since: datetime | None, offset: int, count: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """Every version of every report (each an SR document), newest first."""
        rows = select(ReportDocument.id)
        if since is not None:
            rows = rows.where(ReportDocument.created_at >= since)
        total = session.scalar(select(func.count()).select_from(rows.subquery())) or 0
        ids = list(
            session.scalars(
                rows.order_by(ReportDocument.created_at.desc(), ReportDocument.id.desc())
                .offset(offset)
                .limit(count)
            )
        )
        return int(total), self.load(ctx, session, ids)


class ObservationProvider(Provider):
    type = "Observation"
    compartment = ("subject",)  # R4: subject, performer (no patient performs here)
    profile = "http://hl7.org/fhir/StructureDefinition/Observation"
    interactions = ("read", "search-type")
    documentation = (
        "Measurements and qualitative evaluations of the SR documents (HL7 DICOM SR to FHIR IG)."
    )

    def __init__(self, settings: Any, patients: Any) -> None:
        super().__init__()
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id",
            lambda v, m: ReportMeasurement.id == (_int_id(v) or -1),
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        for name in ("patient", "subject"):
            p[name] = SearchParam(
                name,
                "reference",
                "The patient (Patient/id)",
                lambda v, m: _patient_condition(v),
                targets=("Patient",),
                definition=SEARCH_PARAMETER
                + ("clinical-patient" if name == "patient" else "Observation-subject"),
            )
        p["code"] = SearchParam(
            "code",
            "token",
            "What was measured (system|code)",
            lambda v, m: _code_condition(
                ReportMeasurement.concept_scheme, ReportMeasurement.concept_code, v
            ),
            definition=SEARCH_PARAMETER + "clinical-code",
        )
        p["date"] = _date_param(
            "date",
            ReportDocument.content_datetime,
            "The report's Content Date/Time",
            SEARCH_PARAMETER + "clinical-date",
        )
        p["derived-from"] = SearchParam(
            "derived-from",
            "reference",
            "The ImagingStudy measured",
            lambda v, m: _study_condition(v),
            targets=("ImagingStudy",),
            definition=SEARCH_PARAMETER + "Observation-derived-from",
        )
        p["device"] = SearchParam(
            "device",
            "reference",
            "The algorithm (Device/id)",
            lambda v, m: ReportDocument.device_key == (search.reference_id(v, "Device") or ""),
            targets=("Device",),
            definition=SEARCH_PARAMETER + "Observation-device",
        )
        p["value-quantity"] = SearchParam(
            "value-quantity",
            "quantity",
            "[prefix]number[|system|code] (UCUM)",
            self._quantity,
            definition=SEARCH_PARAMETER + "Observation-value-quantity",
        )
        p["_lastUpdated"] = _date_param(
            "_lastUpdated",
            ReportDocument.created_at,
            "When the report was stored",
            SEARCH_PARAMETER + "Resource-lastUpdated",
        )
        self.sorts = {
            "_id": ReportMeasurement.id,
            "date": ReportDocument.content_datetime,
            "value-quantity": ReportMeasurement.numeric_value,
        }
        self.includes = {
            "Observation:device": Include("Observation", "device", "Device"),
            "Observation:patient": Include("Observation", "patient", "Patient"),
            "Observation:subject": Include("Observation", "subject", "Patient"),
        }

    @staticmethod
    def _quantity(value: str, modifier: str | None) -> Any:
        number, _, unit = value.partition("|")
        prefix, amount = search.parse_number(number, "value-quantity")
        condition = search.number_condition(prefix, amount, ReportMeasurement.numeric_value)
        if unit:
            system, _, code = unit.partition("|")
            if system and system != identity.UCUM:
                return literal(False)
            if code:
                condition = condition & (ReportMeasurement.unit_code == code)
        return condition

    def id_column(self) -> Any:
        return ReportMeasurement.id

    def base_select(self) -> Select[Any]:
        return (
            select(ReportMeasurement.id)
            .join(ReportDocument, ReportMeasurement.document_fk == ReportDocument.id)
            .where(ReportDocument.superseded.is_(False))
        )

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return [i for i in (_int_id(r) for r in resource_ids) if i is not None]

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        row_id = _int_id(resource_id)
        found = self.load(ctx, session, [row_id]) if row_id is not None else []
        if not found:
            raise not_found("Observation", resource_id)
        return found[0]

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        if not row_ids:
            return []
        rows = {
            row.ReportMeasurement.id: row
            for row in session.execute(
                select(
                    ReportMeasurement, ReportDocument, Study.study_instance_uid, Study.patient_fk
                )
                .join(ReportDocument, ReportMeasurement.document_fk == ReportDocument.id)
                .join(Study, ReportDocument.study_fk == Study.id)
                .where(ReportMeasurement.id.in_(row_ids))
            )
        }
        return [self.resource(rows[i]) for i in row_ids if i in rows]

    @staticmethod
    def resource(row: Any) -> dict[str, Any]:
        m: ReportMeasurement = row.ReportMeasurement
        document: ReportDocument = row.ReportDocument
        study = {"reference": f"ImagingStudy/{row.study_instance_uid}"}
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "id": str(m.id),
            "meta": meta(document.version, document.created_at),
        }
        identifiers = []
        if m.tracking_uid:
            identifiers.append(
                {"system": identity.DICOM_UID_SYSTEM, "value": f"urn:oid:{m.tracking_uid}"}
            )
        if m.tracking_identifier:
            identifiers.append({"value": m.tracking_identifier})
        if identifiers:
            resource["identifier"] = identifiers
        resource["partOf"] = [study]
        resource["status"] = "final" if document.verification_flag == "VERIFIED" else "preliminary"
        resource["category"] = [_IMAGING]
        resource["code"] = identity.concept(m.concept_scheme, m.concept_code, m.concept_meaning)
        resource["subject"] = {"reference": f"Patient/{row.patient_fk}"}
        if document.content_datetime is not None:
            resource["effectiveDateTime"] = identity.fhir_instant_or_datetime(
                document.content_datetime
            )
        if m.value_type == "NUM" and m.numeric_value is not None and math.isfinite(m.numeric_value):
            quantity: dict[str, Any] = {"value": m.numeric_value}
            if m.unit_code:
                quantity.update(
                    unit=m.unit_meaning or m.unit_code, system=identity.UCUM, code=m.unit_code
                )
            resource["valueQuantity"] = quantity
        elif m.value_type == "CODE" and m.value_code:
            resource["valueCodeableConcept"] = identity.concept(
                m.value_scheme, m.value_code, m.value_meaning
            )
        elif m.text_value:
            resource["valueString"] = m.text_value
        if m.finding_code:
            # The group's Finding (121071, DCM): what was measured (a structure, a lesion).
            resource["component"] = [
                {
                    "code": identity.concept("DCM", "121071", "Finding"),
                    "valueCodeableConcept": identity.concept(
                        m.finding_scheme, m.finding_code, m.finding_meaning
                    ),
                }
            ]
        if m.site_code:
            site = identity.concept(m.site_scheme, m.site_code, m.site_meaning)
            if m.laterality_code:
                site["text"] = f"{m.site_meaning or m.site_code} ({m.laterality_code})"
            resource["bodySite"] = site
        if m.method_meaning:
            resource["method"] = {"text": m.method_meaning}
        if document.device_key:
            resource["device"] = {"reference": f"Device/{document.device_key}"}
        resource["derivedFrom"] = [study]
        return resource


class DeviceProvider(Provider):
    """The algorithms that wrote SR documents (name, version, manufacturer: IHE AIR)."""

    type = "Device"
    compartment = None  # R4: Device.patient; these are models, of no patient
    profile = "http://hl7.org/fhir/StructureDefinition/Device"
    interactions = ("read",)
    documentation = "The algorithms named by the SR documents' algorithm identification."

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        document = session.scalars(
            select(ReportDocument)
            .where(ReportDocument.device_key == resource_id)
            .order_by(ReportDocument.id)
            .limit(1)
        ).first()
        if document is None:
            raise not_found("Device", resource_id)
        return self.resource(document)

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return list(resource_ids)

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        out = []
        for key in row_ids:
            try:
                out.append(self.read(ctx, session, str(key)))
            except FHIRError:
                continue
        return out

    @staticmethod
    def resource(document: ReportDocument) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "Device",
            "id": document.device_key,
            "meta": meta(1, document.created_at),
            "status": "active",
            "type": {"text": "Algorithm"},
        }
        if document.manufacturer:
            resource["manufacturer"] = document.manufacturer
        if document.algorithm_name:
            resource["deviceName"] = [{"name": document.algorithm_name, "type": "model-name"}]
        if document.algorithm_version:
            resource["version"] = [{"value": document.algorithm_version}]
        return resource
