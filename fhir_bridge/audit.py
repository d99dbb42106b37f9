"""AuditEvent (FHIR R4 auditevent.html): the archive's audit trail (``archive.audit``) read as
FHIR, for the ``admin`` role only (``security.roles``). Read and search; never written over
FHIR (create, update and delete answer 405): the trail is append-only.

A row maps as DICOM PS3.15 A.5 maps onto FHIR (auditevent-mappings.html#dicom): EventID to
``type``, EventTypeCode to ``subtype``, EventActionCode to ``action``, EventOutcomeIndicator
to ``outcome``, the requesting ActiveParticipant to ``agent`` (``requestor``, with its network
address), AuditSourceIdentification to ``source`` and the ParticipantObjects (patient, study,
resource, query) to ``entity``.
"""

from __future__ import annotations

import base64
from collections.abc import MutableMapping, Sequence
from typing import Any

from sqlalchemy import Select, false, or_, select
from sqlalchemy.orm import Session

from archive.audit import EVENT_TYPES, AuditEventRow
from archive.models import Patient
from fhir_bridge import identity, search
from fhir_bridge.context import Context
from fhir_bridge.errors import not_found
from fhir_bridge.provider import Provider, meta
from fhir_bridge.rest import instant
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_TYPE = "http://terminology.hl7.org/CodeSystem/network-type"
AGENT_SYSTEM = "urn:pacsbridge:audit-agent"
"""Identifier system of the agents: ``user:NAME``, ``client:NAME``, ``ae:TITLE``, ``os:LOGIN``."""

_ACTIONS = {"C", "R", "U", "D", "E"}
_RESOURCE_TYPES = frozenset(
    {
        "Patient",
        "ImagingStudy",
        "Endpoint",
        "DiagnosticReport",
        "Observation",
        "Device",
        "ChargeItemDefinition",
        "ChargeItem",
        "Account",
        "Invoice",
        "PaymentReconciliation",
        "AuditEvent",
    }
)


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _dcm(code: str) -> dict[str, Any]:
    return _coding(identity.DCM, code, EVENT_TYPES.get(code))


def _patient_condition(value: str, modifier: str | None) -> Any:
    row = search.row_id(search.reference_id(value, "Patient"))
    if row is None:
        return false()
    return AuditEventRow.patient_id == (
        select(Patient.patient_id).where(Patient.id == row).scalar_subquery()
    )


def _entity_condition(value: str, modifier: str | None) -> Any:
    kind, _, ident = value.partition("/")
    conditions = [AuditEventRow.entity == value]
    if kind == "ImagingStudy" and ident:
        conditions.append(AuditEventRow.study_uid == ident)
    if kind == "Patient" and ident:
        conditions.append(_patient_condition(value, modifier))
    return or_(*conditions)


def _token_on(column: Any) -> Any:
    def condition(value: str, modifier: str | None) -> Any:
        code = search.token(value)[1]
        if code is None:
            return false()
        return column == code

    return condition


class AuditEventProvider(Provider):
    type = "AuditEvent"
    profile = "http://hl7.org/fhir/StructureDefinition/AuditEvent"
    interactions = ("read", "search-type")
    versioned = False
    # R4 puts AuditEvent in the Patient compartment (by ``patient``); here the trail is admin's
    # only, and a token held to one patient's compartment sees none of it.
    compartment = ()
    documentation = (
        "The audit trail (admin only): one event per access to or change of PHI over DIMSE, "
        "DICOMweb, FHIR, the administrative API and the command line, and per login. type and "
        "subtype are DICOM PS3.15 A.5.3 event codes (DCM), agent the requestor (user:NAME, "
        "client:NAME, ae:TITLE, os:LOGIN) with its network address, entity the patient, the "
        "study, the resource and the query. Append-only: no create, update or delete."
    )

    def __init__(self, settings: Any) -> None:
        super().__init__()
        self.settings = settings
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id",
            lambda v, m: AuditEventRow.id == (search.row_id(v) or -1),
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        p["patient"] = SearchParam(
            "patient",
            "reference",
            "The patient whose data was accessed (Patient/id)",
            _patient_condition,
            targets=("Patient",),
            definition=SEARCH_PARAMETER + "AuditEvent-patient",
        )
        p["agent"] = SearchParam(
            "agent",
            "token",
            "Who: user:NAME, client:NAME, ae:TITLE or os:LOGIN (the agent's identifier)",
            self._agent,
        )
        p["entity"] = SearchParam(
            "entity",
            "reference",
            "What: a resource (ImagingStudy/<Study Instance UID>, Patient/id, "
            "DiagnosticReport/id...) or a DICOMweb path",
            _entity_condition,
            definition=SEARCH_PARAMETER + "AuditEvent-entity",
        )
        p["date"] = SearchParam(
            "date",
            "date",
            "When the event was recorded",
            lambda v, m: search.date_condition(
                search.parse_date(v, "date"),
                AuditEventRow.recorded,
                AuditEventRow.recorded,
                search.utc_bound,
            ),
            definition=SEARCH_PARAMETER + "AuditEvent-date",
        )
        p["action"] = SearchParam(
            "action",
            "token",
            "C | R | U | D | E",
            _token_on(AuditEventRow.action),
            definition=SEARCH_PARAMETER + "AuditEvent-action",
        )
        p["type"] = SearchParam(
            "type",
            "token",
            "The DICOM event ID (DCM code: 110112 Query, 110104 DICOM Instances Transferred...)",
            _token_on(AuditEventRow.type_code),
            definition=SEARCH_PARAMETER + "AuditEvent-type",
        )
        p["subtype"] = SearchParam(
            "subtype",
            "token",
            "The DICOM event type code (DCM: 110122 Login...)",
            _token_on(AuditEventRow.subtype_code),
            definition=SEARCH_PARAMETER + "AuditEvent-subtype",
        )
        p["outcome"] = SearchParam(
            "outcome",
            "token",
            "0 success | 4 minor failure | 8 serious failure | 12 major failure",
            self._outcome,
            definition=SEARCH_PARAMETER + "AuditEvent-outcome",
        )
        p["source"] = SearchParam(
            "source",
            "token",
            "The edge: dimse | dicomweb | fhir | admin | auth | cli | jobs",
            _token_on(AuditEventRow.source),
        )
        self.sorts = {"_id": AuditEventRow.id, "date": AuditEventRow.recorded}

    @staticmethod
    def _outcome(value: str, modifier: str | None) -> Any:
        code = search.token(value)[1]
        if code is None or not code.isdigit() or len(code) > 2:
            return false()
        return AuditEventRow.outcome == int(code)

    @staticmethod
    def _agent(value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None or system not in (None, "", AGENT_SYSTEM):
            return false()
        return AuditEventRow.agent == code

    def id_column(self) -> Any:
        return AuditEventRow.id

    def base_select(self) -> Select[Any]:
        return select(AuditEventRow.id)

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return [i for i in (search.row_id(r) for r in resource_ids) if i is not None]

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        row_id = search.row_id(resource_id)
        found = self.load(ctx, session, [row_id]) if row_id is not None else []
        if not found:
            raise not_found(self.type, resource_id)
        return found[0]

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        rows = {
            row.id: row
            for row in session.scalars(select(AuditEventRow).where(AuditEventRow.id.in_(row_ids)))
        }
        patient_ids = {row.patient_id for row in rows.values() if row.patient_id}
        patients: dict[str, int] = {}
        if patient_ids:
            # A Patient ID may be held with several issuers: the reference names one only
            # when it is unambiguous; the identifier always stands.
            found: dict[str, list[int]] = {}
            for pid, row_id in session.execute(
                select(Patient.patient_id, Patient.id).where(Patient.patient_id.in_(patient_ids))
            ):
                found.setdefault(pid, []).append(row_id)
            patients = {pid: ids[0] for pid, ids in found.items() if len(ids) == 1}
        return [self._resource(ctx, rows[i], patients) for i in row_ids if i in rows]

    def _resource(
        self, ctx: Context, row: AuditEventRow, patients: dict[str, int]
    ) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "id": str(row.id),
            "meta": meta(1, row.recorded),
            "type": _dcm(row.type_code),
        }
        if row.subtype_code:
            resource["subtype"] = [_dcm(row.subtype_code)]
        resource["action"] = row.action if row.action in _ACTIONS else "E"
        resource["recorded"] = instant(row.recorded)
        resource["outcome"] = str(row.outcome)
        if row.outcome_text:
            resource["outcomeDesc"] = row.outcome_text
        agent: dict[str, Any] = {
            "who": {
                "identifier": {"system": AGENT_SYSTEM, "value": row.agent},
                "display": row.agent,
            },
            "requestor": True,
        }
        if row.agent_address:
            # network-type 2: an IP address (R4 AuditEvent.agent.network.type)
            agent["network"] = {"address": row.agent_address, "type": "2"}
        resource["agent"] = [agent]
        resource["source"] = {
            "site": row.source,
            "observer": {"display": f"{ctx.settings.ae_title} ({row.source})"},
            # security-source-type 4: Application Server
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        }
        entities: list[dict[str, Any]] = []
        if row.patient_id:
            what: dict[str, Any] = {
                "identifier": {
                    "system": ctx.settings.fhir.patient_identifier_system,
                    "value": row.patient_id,
                }
            }
            if row.patient_id in patients:
                what["reference"] = f"Patient/{patients[row.patient_id]}"
            # PS3.15 A.5.2.6 / audit-entity-type 1 Person, object-role 1 Patient
            entities.append(
                {
                    "what": what,
                    "type": _coding(ENTITY_TYPE, "1", "Person"),
                    "role": _coding(OBJECT_ROLE, "1", "Patient"),
                }
            )
        if row.study_uid:
            # PS3.15 A.5.2.6: a study is a System Object (2) in the role Report (3), ID type
            # 110180 Study Instance UID.
            entities.append(
                {
                    "what": {
                        "reference": f"ImagingStudy/{row.study_uid}",
                        "identifier": {
                            "system": identity.DICOM_UID_SYSTEM,
                            "value": f"urn:oid:{row.study_uid}",
                        },
                    },
                    "type": _coding(ENTITY_TYPE, "2", "System Object"),
                    "role": _coding(OBJECT_ROLE, "3", "Report"),
                }
            )
        if row.entity and row.entity != f"ImagingStudy/{row.study_uid}":
            kind = row.entity.partition("/")[0]
            reference = (
                {"reference": row.entity}
                if kind in _RESOURCE_TYPES and "/" in row.entity
                else {"display": row.entity}
            )
            entities.append({"what": reference, "type": _coding(ENTITY_TYPE, "2", "System Object")})
        if row.query is not None:
            # object-role 24 Query; entity.query is base64Binary (R4 AuditEvent.entity.query)
            entities.append(
                {
                    "type": _coding(ENTITY_TYPE, "2", "System Object"),
                    "role": _coding(OBJECT_ROLE, "24", "Query"),
                    "query": base64.b64encode(row.query.encode()).decode("ascii"),
                }
            )
        if entities:
            resource["entity"] = entities
        return resource


def note_resource(request_scope: MutableMapping[str, Any], resource: dict[str, Any]) -> None:
    """Name the patient and study of a resource served to the request's audit event (the
    scope's ``pacsbridge.audit`` dict, left there by the application's audit middleware)."""
    note = request_scope.get("pacsbridge.audit")
    if note is None or not isinstance(resource, dict):
        return
    kind = resource.get("resourceType")
    if kind == "Patient":
        note["patient_row"] = search.row_id(str(resource.get("id", "")))
        return
    if kind == "ImagingStudy":
        note["study_uid"] = resource.get("id")
    subject = resource.get("subject") or resource.get("patient")
    reference = subject.get("reference", "") if isinstance(subject, dict) else ""
    if reference.startswith("Patient/"):
        note["patient_row"] = search.row_id(reference[len("Patient/") :])
    studies = resource.get("imagingStudy")
    if isinstance(studies, list) and studies and isinstance(studies[0], dict):
        study = studies[0].get("reference", "")
        if study.startswith("ImagingStudy/") and "study_uid" not in note:
            note["study_uid"] = study[len("ImagingStudy/") :]
