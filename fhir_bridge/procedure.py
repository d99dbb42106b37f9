"""Procedure (FHIR R4 procedure.html): each Modality Performed Procedure Step a modality
reported (``archive.mpps``), as a view of its row.

- ``id``: the step's SOP Instance UID; ``identifier`` ``urn:dicom:uid`` / ``urn:oid:<uid>``,
  and the Performed Procedure Step ID;
- ``status``: IN PROGRESS → ``in-progress``, COMPLETED → ``completed``, DISCONTINUED →
  ``stopped`` (R4 event-status), ``statusReason`` from the Discontinuation Reason Code
  Sequence;
- ``basedOn``: the ServiceRequests of the orders the step performed (several in the IHE SWF
  group case, the first named first; none for an unscheduled step); ``partOf``: none;
- ``code``: the step's Procedure Code Sequence (0008,1032), else the order's code;
- ``subject``: the step's patient (``Patient/<id>``), else its Patient ID as an identifier;
- ``performedPeriod``: start and end date and time of the step (in ``dicom_timezone``);
- ``performer``: the Performed Station AE Title (identifier system ``urn:pacsbridge:ae-title``).

``meta.versionId`` counts the step's N-CREATE and N-SETs. The type is in the Patient
compartment by ``patient`` (R4 compartmentdefinition-patient): a request held to a patient sees
that patient's steps only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, and_, func, literal, select
from sqlalchemy.orm import Session

from archive.mpps import DISCONTINUATION_REASON_SEQUENCE, code_of
from archive.orders import ImagingOrder, PerformedProcedureStep, PerformedStepOrder
from archive.query import tm_sql
from config.settings import dicom_zone
from fhir_bridge import identity, search
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, not_found
from fhir_bridge.imaging_study import study_uid_of
from fhir_bridge.provider import Include, Provider, meta
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"
AE_TITLE_SYSTEM = "urn:pacsbridge:ae-title"
PPS_ID_SYSTEM = "urn:pacsbridge:performed-procedure-step"
#: Performed Procedure Step Status (PS3.3 C.4.14) as R4 event-status.
STATUS_OF = {"IN PROGRESS": "in-progress", "COMPLETED": "completed", "DISCONTINUED": "stopped"}
STEP_STATUS_OF = {fhir: dicom for dicom, fhir in STATUS_OF.items()}
_IMAGING = {
    "coding": [
        {"system": identity.SNOMED_CT, "code": "363679005", "display": "Imaging (procedure)"}
    ]
}

_Step = PerformedProcedureStep
_LOW = _Step.start_date + func.coalesce(tm_sql(_Step.start_time), "000000")
# A step still in progress has no end: it lasts until further notice.
_HIGH = func.coalesce(
    _Step.end_date + func.coalesce(tm_sql(_Step.end_time), "235959.999999"), "99991231235959"
)


class ProcedureProvider(Provider):
    type = "Procedure"
    compartment = ("patient",)  # R4 compartmentdefinition-patient: patient, performer
    profile = "http://hl7.org/fhir/StructureDefinition/Procedure"
    interactions = ("read", "vread", "search-type")
    documentation = (
        "The procedure steps modalities performed (DICOM Modality Performed Procedure Step, "
        "N-CREATE / N-SET), each based on the ServiceRequest it performed."
    )
    summary_elements = frozenset(
        {"identifier", "basedOn", "status", "code", "subject", "performedPeriod"}
    )

    def __init__(self, settings: Any, patients: Any) -> None:
        super().__init__()
        self.patients = patients
        self._zone = dicom_zone(settings.dicom_timezone)
        self._bound = search.dicom_bound_in(self._zone)
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id (the step's SOP Instance UID)",
            lambda v, m: _Step.sop_instance_uid == v,
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        p["identifier"] = SearchParam(
            "identifier",
            "token",
            "urn:dicom:uid|urn:oid:<SOP Instance UID>, or the Performed Procedure Step ID",
            self._identifier,
            definition=SEARCH_PARAMETER + "clinical-identifier",
        )
        for name in ("patient", "subject"):
            p[name] = SearchParam(
                name,
                "reference",
                "The patient (Patient/id)",
                self._patient,
                targets=("Patient",),
                definition=SEARCH_PARAMETER
                + ("clinical-patient" if name == "patient" else "Procedure-subject"),
            )
        p["status"] = SearchParam(
            "status",
            "token",
            "in-progress | completed | stopped",
            lambda v, m: search.token_condition(
                v,
                lambda code: (
                    _Step.status == STEP_STATUS_OF[code]
                    if code in STEP_STATUS_OF
                    else literal(False)
                ),
                system_ok=lambda s: s in (None, "", "http://hl7.org/fhir/event-status"),
            ),
            definition=SEARCH_PARAMETER + "Procedure-status",
        )
        p["based-on"] = SearchParam(
            "based-on",
            "reference",
            "The ServiceRequest the step performed (ServiceRequest/id)",
            self._based_on,
            targets=("ServiceRequest",),
            definition=SEARCH_PARAMETER + "Procedure-based-on",
        )
        p["date"] = SearchParam(
            "date",
            "date",
            "When the step was performed (its start to its end; all prefixes)",
            self._date,
            definition=SEARCH_PARAMETER + "clinical-date",
        )
        p["_lastUpdated"] = SearchParam(
            "_lastUpdated",
            "date",
            "When the step last changed",
            lambda v, m: search.date_condition(
                search.parse_date(v, "_lastUpdated"),
                _Step.updated_at,
                _Step.updated_at,
                search.utc_bound,
            ),
            definition=SEARCH_PARAMETER + "Resource-lastUpdated",
        )
        self.sorts = {"_id": _Step.sop_instance_uid, "date": _LOW, "_lastUpdated": _Step.updated_at}
        self.includes = {
            "Procedure:patient": Include("Procedure", "patient", "Patient"),
            "Procedure:subject": Include("Procedure", "subject", "Patient"),
            "Procedure:based-on": Include("Procedure", "based-on", "ServiceRequest"),
        }

    # --- conditions ------------------------------------------------------------------------
    def _identifier(self, value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None:
            return literal(system in (identity.DICOM_UID_SYSTEM, PPS_ID_SYSTEM))
        if system == identity.DICOM_UID_SYSTEM:
            return _Step.sop_instance_uid == study_uid_of(code)
        if system == PPS_ID_SYSTEM:
            return _Step.performed_procedure_step_id == code
        if system is None:
            return (_Step.sop_instance_uid == study_uid_of(code)) | (
                _Step.performed_procedure_step_id == code
            )
        return literal(False)

    def _patient(self, value: str, modifier: str | None) -> Any:
        row = search.row_id(search.reference_id(value, "Patient"))
        return literal(False) if row is None else _Step.patient_fk == row

    def _based_on(self, value: str, modifier: str | None) -> Any:
        resource_id = search.reference_id(value, "ServiceRequest")
        if resource_id is None:
            return literal(False)
        return _Step.id.in_(
            select(PerformedStepOrder.step_fk)
            .join(ImagingOrder, ImagingOrder.id == PerformedStepOrder.order_fk)
            .where(ImagingOrder.resource_id == resource_id)
        )

    def _date(self, value: str, modifier: str | None) -> Any:
        rng = search.parse_date(value, "date")
        return and_(
            _Step.start_date.is_not(None),
            search.date_condition(rng, _LOW, _HIGH, self._bound),
        )

    # --- rows ------------------------------------------------------------------------------
    def id_column(self) -> Any:
        return _Step.id

    def base_select(self) -> Select[Any]:
        return select(_Step.id)

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return list(
            session.scalars(select(_Step.id).where(_Step.sop_instance_uid.in_(list(resource_ids))))
        )

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        row_id = session.scalar(select(_Step.id).where(_Step.sop_instance_uid == resource_id))
        if row_id is None:
            raise not_found("Procedure", resource_id)
        return self.load(ctx, session, [row_id])[0]

    def vread(
        self, ctx: Context, session: Session, resource_id: str, version: str
    ) -> dict[str, Any]:
        current = self.read(ctx, session, resource_id)
        if current["meta"]["versionId"] != version:
            raise FHIRError(
                404,
                f"Procedure/{resource_id} version {version} is not kept: the current version "
                f"is {current['meta']['versionId']}",
            )
        return current

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        if not row_ids:
            return []
        rows = {
            row.PerformedProcedureStep.id: row
            for row in session.execute(
                select(
                    _Step,
                    ImagingOrder.resource_id,
                    ImagingOrder.procedure_scheme,
                    ImagingOrder.procedure_code,
                    ImagingOrder.procedure_display,
                )
                .outerjoin(ImagingOrder, ImagingOrder.id == _Step.order_fk)
                .where(_Step.id.in_(list(row_ids)))
            )
        }
        # Every order each step performed (the group case names several): one query.
        based_on: dict[int, list[str]] = {}
        for step_fk, order_fk, resource_id in session.execute(
            select(PerformedStepOrder.step_fk, ImagingOrder.id, ImagingOrder.resource_id)
            .join(ImagingOrder, ImagingOrder.id == PerformedStepOrder.order_fk)
            .where(PerformedStepOrder.step_fk.in_(list(row_ids)))
            .order_by(ImagingOrder.id)
        ):
            first = rows[step_fk].PerformedProcedureStep.order_fk if step_fk in rows else None
            orders = based_on.setdefault(step_fk, [])
            if order_fk == first:
                orders.insert(0, resource_id)  # the first the step named, first
            else:
                orders.append(resource_id)
        return [self._resource(rows[i], based_on.get(i, [])) for i in row_ids if i in rows]

    def _resource(self, row: Any, based_on: list[str]) -> dict[str, Any]:
        step: PerformedProcedureStep = row.PerformedProcedureStep
        identifiers: list[dict[str, Any]] = [
            {
                "use": "official",
                "system": identity.DICOM_UID_SYSTEM,
                "value": f"urn:oid:{step.sop_instance_uid}",
            }
        ]
        if step.performed_procedure_step_id:
            identifiers.append({"system": PPS_ID_SYSTEM, "value": step.performed_procedure_step_id})
        status = STATUS_OF.get(step.status, "unknown")
        resource: dict[str, Any] = {
            "resourceType": "Procedure",
            "id": step.sop_instance_uid,
            "meta": meta(step.version, step.updated_at),
            "identifier": identifiers,
        }
        if based_on:
            resource["basedOn"] = [{"reference": f"ServiceRequest/{o}"} for o in based_on]
        resource["status"] = status
        if step.status == "DISCONTINUED":
            reason = code_of(step.dataset or {}, DISCONTINUATION_REASON_SEQUENCE)
            if reason is not None:
                resource["statusReason"] = identity.concept(*reason)
        resource["category"] = _IMAGING
        code = self._code(step, row)
        if code is not None:
            resource["code"] = code
        resource["subject"] = self._subject(step)
        period: dict[str, str] = {}
        start = identity.fhir_datetime(step.start_date, step.start_time, self._zone)
        end = identity.fhir_datetime(step.end_date, step.end_time, self._zone)
        if start:
            period["start"] = start
        if end:
            period["end"] = end
        if period:
            resource["performedPeriod"] = period
        if step.station_ae_title:
            resource["performer"] = [
                {
                    "actor": {
                        "identifier": {"system": AE_TITLE_SYSTEM, "value": step.station_ae_title},
                        "display": step.station_ae_title,
                    }
                }
            ]
        return resource

    @staticmethod
    def _code(step: PerformedProcedureStep, row: Any) -> dict[str, Any] | None:
        if step.procedure_code:
            return identity.concept(
                step.procedure_scheme, step.procedure_code, step.procedure_display
            )
        if row.procedure_code:
            coding: dict[str, Any] = {"code": row.procedure_code}
            if row.procedure_scheme:
                coding["system"] = row.procedure_scheme
            if row.procedure_display:
                coding["display"] = row.procedure_display
            concept: dict[str, Any] = {"coding": [coding]}
            if row.procedure_display:
                concept["text"] = row.procedure_display
            return concept
        return None

    @staticmethod
    def _subject(step: PerformedProcedureStep) -> dict[str, Any]:
        if step.patient_fk is not None:
            return {"reference": f"Patient/{step.patient_fk}"}
        dataset = step.dataset or {}
        subject: dict[str, Any] = {}
        patient_id = _first(dataset, "00100020")
        if patient_id:
            subject["identifier"] = {"value": patient_id}
        name = identity.person_display(_first(dataset, "00100010"))
        subject["display"] = name or "patient not in the archive"
        return subject


def _first(dataset: dict[str, Any], tag: str) -> str | None:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):
        value = value.get("Alphabetic")
    return str(value) if value else None
