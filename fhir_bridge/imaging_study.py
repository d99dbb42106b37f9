"""ImagingStudy and Endpoint (FHIR R4 imagingstudy.html, endpoint.html) as views of the index.

Mapping as the ImagingStudy page's DICOM mapping and IHE RAD IDR do: id and identifier
``urn:dicom:uid`` / ``urn:oid:<Study Instance UID>``, the accession number as an identifier of
type ``v2-0203#ACSN``, series and instances from the index, and one Endpoint for the DICOMweb
root. ``meta.versionId`` is the newest instance row id of the study (row ids only grow), so it
moves whenever the study gains an instance; ``meta.lastUpdated`` is when it last grew.
``basedOn``: the ServiceRequests of the orders the study was made for (its Study Instance UID
or Accession Number, ``archive.order_links``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Select, and_, exists, func, literal, literal_column, select
from sqlalchemy.orm import Session

from archive.ingest import VERSION_STEP
from archive.models import Instance, Patient, ReportDocument, Series, Study, Tombstone
from archive.order_links import orders_of_studies
from archive.query import tm_sql
from config.settings import dicom_zone
from fhir_bridge import identity, search
from fhir_bridge.body_parts import SNOMED_CT, body_parts_for, body_site
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, gone, not_found
from fhir_bridge.provider import Include, Provider, meta
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"
ENDPOINT_ID = "dicomweb"
_STARTED_AT = datetime.now(UTC)
"""The Endpoint changes with the settings only: its version is the server's start."""
_STARTED_LOW = Study.study_date + func.coalesce(tm_sql(Study.study_time), "000000")
_STARTED_HIGH = Study.study_date + func.coalesce(tm_sql(Study.study_time), "235959.999999")


def study_uid_of(value: str) -> str:
    return value[8:] if value.startswith("urn:oid:") else value


class ImagingStudyProvider(Provider):
    type = "ImagingStudy"
    compartment = ("subject",)  # R4 compartmentdefinition-patient
    profile = "http://hl7.org/fhir/StructureDefinition/ImagingStudy"
    interactions = ("read", "vread", "search-type")
    documentation = (
        "The studies of the archive: series and instances from the index, AI results (SEG, SR) "
        "as series of their study; deleted studies answer 410 Gone."
    )
    summary_elements = frozenset(
        {
            "identifier",
            "status",
            "modality",
            "subject",
            "started",
            "basedOn",
            "referrer",
            "interpreter",
            "endpoint",
            "numberOfSeries",
            "numberOfInstances",
            "procedureReference",
            "procedureCode",
            "location",
            "reasonCode",
            "series",
        }
    )

    def __init__(self, settings: Any, patients: Any) -> None:
        super().__init__()
        self.fhir = settings.fhir
        self.patients = patients
        self._zone = dicom_zone(settings.dicom_timezone)
        self._bound = search.dicom_bound_in(self._zone)
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id (the Study Instance UID)",
            lambda v, m: Study.study_instance_uid == study_uid_of(v),
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        p["identifier"] = SearchParam(
            "identifier",
            "token",
            "urn:dicom:uid|urn:oid:<Study Instance UID>, or the accession number",
            self._identifier,
            definition=SEARCH_PARAMETER + "clinical-identifier",
        )
        for name in ("patient", "subject"):
            p[name] = SearchParam(
                name,
                "reference",
                "The patient (Patient/id); chains to Patient's parameters",
                self._patient,
                chain=self._patient_chain,
                targets=("Patient",),
                definition=SEARCH_PARAMETER
                + ("clinical-patient" if name == "patient" else "ImagingStudy-subject"),
            )
        p["started"] = SearchParam(
            "started",
            "date",
            "When the study started (Study Date + Time; all prefixes)",
            self._started,
            definition=SEARCH_PARAMETER + "ImagingStudy-started",
        )
        p["modality"] = SearchParam(
            "modality",
            "token",
            "A modality of the study's series (DCM codes)",
            lambda v, m: search.token_condition(
                v,
                lambda code: self._series_has(Series.modality == code),
                system_ok=lambda s: s in (None, "", identity.DCM),
            ),
            definition=SEARCH_PARAMETER + "ImagingStudy-modality",
        )
        p["series"] = SearchParam(
            "series",
            "token",
            "A Series Instance UID of the study",
            lambda v, m: self._series_has(
                Series.series_instance_uid == study_uid_of(search.token(v)[1] or "")
            ),
            definition=SEARCH_PARAMETER + "ImagingStudy-series",
        )
        p["dicom-class"] = SearchParam(
            "dicom-class",
            "token",
            "A SOP Class UID of the study's instances (urn:oid: or bare)",
            self._dicom_class,
            definition=SEARCH_PARAMETER + "ImagingStudy-dicom-class",
        )
        p["bodysite"] = SearchParam(
            "bodysite",
            "token",
            "Body site of a series (SNOMED CT, PS3.16 Annex L)",
            lambda v, m: search.token_condition(
                v,
                lambda code: (
                    self._series_has(Series.body_part_examined.in_(body_parts_for(code)))
                    if body_parts_for(code)
                    else literal(False)
                ),
                system_ok=lambda s: s in (None, "", SNOMED_CT),
            ),
            definition=SEARCH_PARAMETER + "ImagingStudy-bodysite",
        )
        p["_lastUpdated"] = SearchParam(
            "_lastUpdated",
            "date",
            "When the study last gained an instance",
            lambda v, m: search.date_condition(
                search.parse_date(v, "_lastUpdated"),
                Study.updated_at,
                Study.updated_at,
                search.utc_bound,
            ),
            definition=SEARCH_PARAMETER + "Resource-lastUpdated",
        )
        self.sorts = {
            "_id": Study.study_instance_uid,
            "started": _STARTED_LOW,
            "_lastUpdated": Study.updated_at,
        }
        self.includes = {
            "ImagingStudy:subject": Include("ImagingStudy", "subject", "Patient"),
            "ImagingStudy:patient": Include("ImagingStudy", "patient", "Patient"),
        }
        self.revincludes = {
            "DiagnosticReport:imaging-study": Include(
                "DiagnosticReport", "imaging-study", "ImagingStudy"
            ),
        }

    # --- conditions ------------------------------------------------------------------------
    def _started(self, value: str, modifier: str | None) -> Any:
        rng = search.parse_date(value, "started")
        return and_(
            search.day_prefilter(rng, Study.study_date, self._bound),
            search.date_condition(rng, _STARTED_LOW, _STARTED_HIGH, self._bound),
        )

    def _identifier(self, value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None:
            return literal(system in (identity.DICOM_UID_SYSTEM, ""))
        if system == identity.DICOM_UID_SYSTEM:
            return Study.study_instance_uid == study_uid_of(code)
        if system == "":  # |value: the accession number, an identifier without a system
            return Study.accession_number == code
        if system is None:
            return (Study.accession_number == code) | (
                Study.study_instance_uid == study_uid_of(code)
            )
        return literal(False)

    def _patient(self, value: str, modifier: str | None) -> Any:
        patient_id = search.reference_id(value, "Patient")
        row = search.row_id(patient_id)
        return literal(False) if row is None else Study.patient_fk == row

    def _patient_chain(self, param: str, modifier: str | None, value: str) -> Any:
        target = self.patients.params.get(param)
        if target is not None and modifier is not None and modifier not in target.modifiers:
            raise FHIRError(
                400,
                f"Patient.{param} takes no modifier {modifier!r}",
                expression=[f"subject:Patient.{param}:{modifier}"],
            )
        if target is None or (param.startswith("_") and param != "_id"):
            raise FHIRError(
                400,
                f"Patient has no search parameter {param!r} to chain",
                expression=[f"subject:Patient.{param}"],
            )
        return Study.patient_fk.in_(select(Patient.id).where(target.condition(value, modifier)))

    @staticmethod
    def _series_has(condition: Any) -> Any:
        return exists(select(Series.id).where(Series.study_fk == Study.id, condition))

    def _dicom_class(self, value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None or system not in (None, "", identity.RFC3986, identity.DICOM_UID_SYSTEM):
            return literal(False)
        uid = study_uid_of(code)
        return exists(
            select(Instance.id)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.study_fk == Study.id, Instance.sop_class_uid == uid)
        )

    # --- rows ----------------------------------------------------------------------------
    def id_column(self) -> Any:
        return Study.id

    def base_select(self) -> Select[Any]:
        return select(Study.id)

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        uids = [study_uid_of(i) for i in resource_ids]
        return list(session.scalars(select(Study.id).where(Study.study_instance_uid.in_(uids))))

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        uid = study_uid_of(resource_id)
        row_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        if row_id is None:
            if session.scalar(
                select(Tombstone.id).where(Tombstone.kind == "study", Tombstone.key == uid)
            ):
                raise gone("ImagingStudy", resource_id)
            raise not_found("ImagingStudy", resource_id)
        return self.load(ctx, session, [row_id])[0]

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        """The studies of ``row_ids`` in one query (each instance's row with its series, study
        and patient), on columns, not ORM objects: a page of 100 studies is built here."""
        if not row_ids:
            return []
        tz = self._zone
        rows_of: dict[int, list[Any]] = defaultdict(list)
        for row in session.execute(
            select(
                Study.id.label("study_id"),
                Study.study_instance_uid,
                Study.patient_fk,
                Study.study_date,
                Study.study_time,
                Study.accession_number,
                Study.study_description,
                Study.referring_physician_name,
                Study.updated_at,
                Study.changed_at,
                Study.version_floor,
                Patient.patient_name,
                Patient.record_version,
                Series.id.label("series_id"),
                Series.series_instance_uid,
                Series.series_number,
                Series.modality,
                Series.series_description,
                Series.body_part_examined,
                Series.series_date,
                Series.series_time,
                Instance.id,
                Instance.sop_instance_uid,
                Instance.sop_class_uid,
                Instance.instance_number,
                Instance.received_at,
                ReportDocument.title_meaning,
            )
            .join(Patient, Study.patient_fk == Patient.id)
            .join(Series, Series.study_fk == Study.id)
            .join(Instance, Instance.series_fk == Series.id)
            .outerjoin(ReportDocument, ReportDocument.instance_fk == Instance.id)
            .where(Study.id.in_(row_ids))
            .order_by(
                Study.id,
                Series.series_number,
                Series.id,
                Instance.instance_number,
                Instance.id,
            )
        ):
            rows_of[row.study_id].append(row)
        resources = [self._resource(rows_of[i], tz) for i in row_ids if i in rows_of]
        # basedOn: the orders the studies were made for (archive.order_links), one query.
        orders = orders_of_studies(
            session,
            [(rows[0].study_instance_uid, rows[0].accession_number) for rows in rows_of.values()],
        )
        for resource in resources:
            based_on = orders.get(resource["id"])
            if based_on:
                resource["basedOn"] = [{"reference": f"ServiceRequest/{i}"} for i in based_on]
        return resources

    @staticmethod
    def _resource(rows: list[Any], tz: Any) -> dict[str, Any]:
        """One study from its instances' rows (a study row without instances is not kept: the
        archive removes a study with its last instance)."""
        study = rows[0]
        endpoint = _ENDPOINT_REFERENCE
        uid = study.study_instance_uid
        identifiers: list[dict[str, Any]] = [
            {"use": "official", "system": identity.DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}
        ]
        if study.accession_number:
            identifiers.append(
                {
                    "use": "usual",
                    "type": {"coding": [{"system": identity.V2_0203, "code": "ACSN"}]},
                    "value": study.accession_number,
                }
            )
        modalities: list[str] = []
        series_out: list[dict[str, Any]] = []
        version = max(row.id for row in rows)
        received = [row.received_at for row in rows if row.received_at is not None]
        updated = study.updated_at
        if received and _aware(max(received)) > _aware(updated):
            updated = max(received)
        current: dict[str, Any] | None = None
        current_id = None
        for row in rows:
            if row.series_id != current_id:
                current_id = row.series_id
                if row.modality and row.modality not in modalities:
                    modalities.append(row.modality)
                current = {"uid": row.series_instance_uid}
                if row.series_number is not None and row.series_number >= 0:
                    current["number"] = row.series_number  # unsignedInt
                current["modality"] = {"system": identity.DCM, "code": row.modality or "OT"}
                if row.series_description:
                    current["description"] = row.series_description
                current["numberOfInstances"] = 0
                current["endpoint"] = endpoint
                site = body_site(row.body_part_examined)
                if site:
                    current["bodySite"] = {"system": SNOMED_CT, "code": site[0], "display": site[1]}
                started = identity.fhir_datetime(row.series_date, row.series_time, tz)
                if started:
                    current["started"] = started
                current["instance"] = []
                series_out.append(current)
            assert current is not None
            entry: dict[str, Any] = {
                "uid": row.sop_instance_uid,
                "sopClass": _sop_class(row.sop_class_uid),
            }
            if row.instance_number is not None and row.instance_number >= 0:
                entry["number"] = row.instance_number
            if row.title_meaning:
                entry["title"] = row.title_meaning
            current["instance"].append(entry)
            current["numberOfInstances"] += 1
        resource: dict[str, Any] = {
            "resourceType": "ImagingStudy",
            "id": uid,
            # Study.version_floor: a delete or overwrite moves the version too.
            "meta": meta(
                max(version * VERSION_STEP, study.version_floor),
                updated
                if study.changed_at is None or _aware(study.changed_at) <= _aware(updated)
                else study.changed_at,
            ),
            "identifier": identifiers,
            "status": "available",
        }
        if modalities:
            resource["modality"] = [{"system": identity.DCM, "code": m} for m in modalities]
        subject: dict[str, Any] = {"reference": f"Patient/{study.patient_fk}"}
        # The EHR's demographics win over the header's: no display from the header then.
        if study.record_version is None:
            display = identity.person_display(study.patient_name)
            if display:
                subject["display"] = display
        resource["subject"] = subject
        started = identity.fhir_datetime(study.study_date, study.study_time, tz)
        if started:
            resource["started"] = started
        referrer = identity.person_display(study.referring_physician_name)
        if referrer:
            resource["referrer"] = {"display": referrer}
        resource["endpoint"] = endpoint
        resource["numberOfSeries"] = len(series_out)
        resource["numberOfInstances"] = sum(s["numberOfInstances"] for s in series_out)
        if study.study_description:
            resource["description"] = study.study_description
        if series_out:
            resource["series"] = series_out
        return resource


_ENDPOINT_REFERENCE = [{"reference": f"Endpoint/{ENDPOINT_ID}"}]
"""Shared by every resource built here (they are serialised, never changed in place)."""


@lru_cache(maxsize=512)
def _sop_class(uid: str) -> dict[str, str]:
    return {"system": identity.RFC3986, "code": f"urn:oid:{uid}"}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class EndpointProvider(Provider):
    """The DICOMweb root of this server (connectionType ``dicom-wado-rs``)."""

    type = "Endpoint"
    compartment = None  # outside the Patient compartment; no patient's data
    profile = "http://hl7.org/fhir/StructureDefinition/Endpoint"
    interactions = ("read", "search-type")
    documentation = "The DICOMweb (WADO-RS, QIDO-RS, STOW-RS) root of this server."

    def __init__(self) -> None:
        super().__init__()
        self.params["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id",
            lambda v, m: literal(v == ENDPOINT_ID),
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        self.sorts = {"_id": literal_column("1")}

    def id_column(self) -> Any:
        return literal_column("1")

    def base_select(self) -> Select[Any]:
        return select(literal_column("1"))

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return [1] if ENDPOINT_ID in resource_ids else []

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        return [self.endpoint(ctx) for _ in row_ids[:1]]

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        if resource_id != ENDPOINT_ID:
            raise not_found("Endpoint", resource_id)
        return self.endpoint(ctx)

    @staticmethod
    def endpoint(ctx: Context) -> dict[str, Any]:
        return {
            "resourceType": "Endpoint",
            "id": ENDPOINT_ID,
            "meta": meta(1, _STARTED_AT),
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "name": "DICOMweb (WADO-RS, QIDO-RS, STOW-RS)",
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": ctx.dicomweb,
        }
