"""ServiceRequest (FHIR R4 servicerequest.html): the EHR's imaging order, kept in the index as
a Requested Procedure with one Scheduled Procedure Step (``archive.ordering``), which the
Modality Worklist serves.

**What an order says** (each element's place on the worklist, PS3.4 K.6.1.2):

- ``status``: a new order is ``draft``, ``active`` or ``on-hold``; ``active`` and ``on-hold``
  are on the worklist (``archive.orders.ON_WORKLIST``). ``revoked`` and ``entered-in-error``
  cancel it (the step is discontinued and leaves the worklist); ``completed``,
  ``revoked`` and ``entered-in-error`` are final (R4 request-status): a later change of status
  is refused (422).
- ``intent``: ``order`` or one of its kinds (``original-order``, ``reflex-order``,
  ``filler-order``, ``instance-order``). Proposals and plans (``proposal``, ``plan``,
  ``directive``, ``option``) are not orders a modality performs: refused with 422, so that
  nothing is kept that the worklist would silently leave out.
- ``code`` (required): the procedure, one coding (the price list's LOINC / RadLex Playbook
  ``RPID`` / CPT / local codes, ``billing.prices``) → Requested Procedure Code Sequence and
  Description.
- ``subject`` (required): ``Patient/<id>`` of this server (422 when it is not known); it never
  changes.
- ``occurrenceDateTime`` or ``occurrencePeriod.start``: Scheduled Procedure Step Start Date
  and Time, in the zone of the DICOM values (``dicom_timezone``); a date alone schedules the
  day.
- ``performerType``: the modality, a code of ``http://dicom.nema.org/resources/ontology/DCM``
  (``CT``, ``MR``…). Without one, the price list's modality of the ordered code is taken
  where the price list names one.
- ``performer``: the scheduled station. The AE title is the ``identifier`` of a performer
  (a Device or Location reference) whose system is ``urn:pacsbridge:ae-title``
  (``{"reference": "Device/ct1", "identifier": {"system": "urn:pacsbridge:ae-title",
  "value": "CT_ROOM_1"}, "display": "CT room 1"}``); its ``display`` (16 characters at most)
  is the Scheduled Station Name.
- ``requester`` (Requesting Physician from its display), ``reasonCode`` (Reason for the
  Requested Procedure, the texts joined), ``priority``.
- ``identifier``: the Accession Number is the identifier typed
  ``http://terminology.hl7.org/CodeSystem/v2-0203#ACSN`` (its ``system`` the Issuer of
  Accession Number); without one, pacsbridge assigns it (system ``urn:pacsbridge:accession``)
  and returns it. Pacsbridge adds the pre-assigned Study Instance UID (system
  ``urn:dicom:uid``, value ``urn:oid:<uid>``, as IHE RAD-MHD and ImagingStudy write it; an EHR
  may give it) and the Requested Procedure ID (system ``urn:pacsbridge:requested-procedure``).
  The three never change.

**Delete** cancels: the order becomes ``revoked`` (a new version; the step leaves the
worklist) and stays readable and searchable with that status, since a placed order is part of
the patient's record and the modality may already have seen it; the answer is 200 with an
OperationOutcome. ``_history`` and ``vread`` give every version.

Every write stores its version, its outbox event (``order.scheduled``, ``order.updated``,
``order.cancelled``) and its audit event ("Patient Record", DICOM PS3.15 A.5.3.9) in one
transaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, tzinfo
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Select, and_, false, func, literal, or_, select
from sqlalchemy.orm import Session

from archive import ordering
from archive.audit import record
from archive.models import Patient
from archive.orders import ImagingOrder
from billing.models import ChargeItemDefinition
from config.settings import dicom_zone
from fhir_bridge import identity, search
from fhir_bridge.billing import CODE_SYSTEM_OF
from fhir_bridge.change_audit import change_event, committed
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, not_found
from fhir_bridge.imaging_study import study_uid_of
from fhir_bridge.provider import Include, Provider, meta
from fhir_bridge.rest import validate_resource
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"
ACCESSION_SYSTEM = "urn:pacsbridge:accession"
"""System of the Accession Numbers pacsbridge assigns."""
REQUESTED_PROCEDURE_SYSTEM = "urn:pacsbridge:requested-procedure"
AE_TITLE_SYSTEM = "urn:pacsbridge:ae-title"
"""System of a performer identifier that names the scheduled station's AE title."""

ORDER_INTENTS = ("order", "original-order", "reflex-order", "filler-order", "instance-order")
_CREATE_STATUSES = ("draft", "active", "on-hold")
_FINAL = ("completed", "revoked", "entered-in-error")
_OWN_SYSTEMS = (ACCESSION_SYSTEM, REQUESTED_PROCEDURE_SYSTEM, identity.DICOM_UID_SYSTEM)
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")
_AE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5 6.2 AE: no backslash, no controls
_RADLEX_SYSTEMS = {"http://radlex.org": "radlex", "http://www.radlex.org": "radlex"}


def _is_accession(item: dict[str, Any]) -> bool:
    for coding in (item.get("type") or {}).get("coding") or []:
        if coding.get("system") == identity.V2_0203 and coding.get("code") == "ACSN":
            return True
    return item.get("system") == ACCESSION_SYSTEM


class ServiceRequestProvider(Provider):
    type = "ServiceRequest"
    compartment = ("subject",)  # R4 compartmentdefinition-patient: subject, performer
    profile = "http://hl7.org/fhir/StructureDefinition/ServiceRequest"
    interactions = (
        "read",
        "vread",
        "search-type",
        "create",
        "update",
        "delete",
        "history-instance",
        "history-type",
    )
    creatable = True
    updatable = True
    conditional_create = True
    documentation = (
        "Imaging orders: each one Requested Procedure with one Scheduled Procedure Step on the "
        "Modality Worklist. intent order; status draft | active | on-hold on create (active and "
        "on-hold are on the worklist), revoked / entered-in-error cancel; code (required), "
        "subject (a Patient of this server), occurrence[x] (the scheduled start), performerType "
        f"(a DCM modality code), performer with identifier {AE_TITLE_SYSTEM}|<AE title> (the "
        "scheduled station), requester, reasonCode, priority. identifier: the Accession Number "
        f"(type v2-0203#ACSN; assigned in {ACCESSION_SYSTEM} when absent), the Study Instance "
        f"UID (urn:dicom:uid, pre-assigned) and the Requested Procedure ID "
        f"({REQUESTED_PROCEDURE_SYSTEM}). DELETE revokes the order (it stays readable)."
    )
    summary_elements = frozenset(
        {
            "identifier",
            "status",
            "intent",
            "priority",
            "code",
            "subject",
            "occurrenceDateTime",
            "occurrencePeriod",
            "requester",
            "performerType",
            "performer",
        }
    )

    def __init__(self, settings: Any, patients: Any) -> None:
        super().__init__()
        self.patients = patients
        self.zone = dicom_zone(settings.dicom_timezone)
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id",
            lambda v, m: ImagingOrder.resource_id == v,
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        p["_lastUpdated"] = SearchParam(
            "_lastUpdated",
            "date",
            "When the order last changed",
            lambda v, m: search.date_condition(
                search.parse_date(v, "_lastUpdated"),
                ImagingOrder.updated_at,
                ImagingOrder.updated_at,
                lambda d: search.utc_bound(d).astimezone(UTC),
            ),
            definition=SEARCH_PARAMETER + "Resource-lastUpdated",
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
                + ("clinical-patient" if name == "patient" else "ServiceRequest-subject"),
            )
        for name, column, doc in (
            ("status", ImagingOrder.status, "draft | active | on-hold | revoked | completed …"),
            ("intent", ImagingOrder.intent, "order (and its kinds)"),
            ("priority", ImagingOrder.priority, "routine | urgent | asap | stat"),
        ):
            p[name] = SearchParam(
                name,
                "token",
                doc,
                self._code_on(column),
                definition=SEARCH_PARAMETER + f"ServiceRequest-{name}",
            )
        p["code"] = SearchParam(
            "code",
            "token",
            "The ordered procedure (system|code)",
            self._code,
            definition=SEARCH_PARAMETER + "clinical-code",
        )
        p["identifier"] = SearchParam(
            "identifier",
            "token",
            "The Accession Number ([issuer]|value), urn:dicom:uid|urn:oid:<Study Instance UID> "
            f"or {REQUESTED_PROCEDURE_SYSTEM}|<Requested Procedure ID>",
            self._identifier,
            definition=SEARCH_PARAMETER + "clinical-identifier",
        )
        p["occurrence"] = SearchParam(
            "occurrence",
            "date",
            "The scheduled start (all prefixes)",
            lambda v, m: search.date_condition(
                search.parse_date(v, "occurrence"),
                ImagingOrder.scheduled_start,
                ImagingOrder.scheduled_start,
                self._bound,
            ),
            definition=SEARCH_PARAMETER + "ServiceRequest-occurrence",
        )
        p["performer-type"] = SearchParam(
            "performer-type",
            "token",
            "The modality (DCM codes)",
            lambda v, m: search.token_condition(
                v,
                lambda code: ImagingOrder.modality == code,
                system_ok=lambda s: s in (None, "", identity.DCM),
            ),
            definition=SEARCH_PARAMETER + "ServiceRequest-performer-type",
        )
        p["requester"] = SearchParam(
            "requester",
            "reference",
            "Who asked for the order (Practitioner/id, PractitionerRole/id, Organization/id…)",
            self._requester,
            targets=("Practitioner", "PractitionerRole", "Organization", "Patient", "Device"),
            definition=SEARCH_PARAMETER + "ServiceRequest-requester",
        )
        self.sorts = {
            "_id": ImagingOrder.id,
            "_lastUpdated": ImagingOrder.updated_at,
            "occurrence": ImagingOrder.scheduled_start,
        }
        self.includes = {
            "ServiceRequest:subject": Include("ServiceRequest", "subject", "Patient"),
            "ServiceRequest:patient": Include("ServiceRequest", "patient", "Patient"),
        }

    # --- conditions ------------------------------------------------------------------------
    def _bound(self, value: datetime) -> datetime:
        # A zone-less bound is a time in the zone of the DICOM values (the schedule's zone);
        # compared in UTC, as the instants are stored (SQLite keeps no offset).
        return (value if value.tzinfo else value.replace(tzinfo=self.zone)).astimezone(UTC)

    @staticmethod
    def _code_on(column: Any) -> Callable[[str, str | None], Any]:
        return lambda v, m: column == (search.token(v)[1] or "")

    @staticmethod
    def _patient(value: str, modifier: str | None) -> Any:
        row = search.row_id(search.reference_id(value, "Patient"))
        return false() if row is None else ImagingOrder.patient_fk == row

    def _patient_chain(self, param: str, modifier: str | None, value: str) -> Any:
        target = self.patients.params.get(param)
        if target is None or (param.startswith("_") and param != "_id"):
            raise FHIRError(
                400,
                f"Patient has no search parameter {param!r} to chain",
                expression=[f"subject:Patient.{param}"],
            )
        if modifier is not None and modifier not in target.modifiers:
            raise FHIRError(
                400,
                f"Patient.{param} takes no modifier {modifier!r}",
                expression=[f"subject:Patient.{param}:{modifier}"],
            )
        return ImagingOrder.patient_fk.in_(
            select(Patient.id).where(target.condition(value, modifier))
        )

    @staticmethod
    def _requester(value: str, modifier: str | None) -> Any:
        return ImagingOrder.requester == value

    @staticmethod
    def _code(value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None:
            return ImagingOrder.procedure_scheme == system if system else false()
        if system is None:
            return ImagingOrder.procedure_code == code
        if system == "":
            return and_(
                ImagingOrder.procedure_code == code, ImagingOrder.procedure_scheme.is_(None)
            )
        return and_(ImagingOrder.procedure_code == code, ImagingOrder.procedure_scheme == system)

    @staticmethod
    def _identifier(value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None:
            return literal(system in (identity.DICOM_UID_SYSTEM, REQUESTED_PROCEDURE_SYSTEM))
        if system == identity.DICOM_UID_SYSTEM:
            return ImagingOrder.study_instance_uid == study_uid_of(code)
        if system == REQUESTED_PROCEDURE_SYSTEM:
            return ImagingOrder.requested_procedure_id == code
        if system == ACCESSION_SYSTEM:
            return and_(
                ImagingOrder.accession_number == code,
                ImagingOrder.issuer_of_accession_number.is_(None),
            )
        if system == "":
            return and_(
                ImagingOrder.accession_number == code,
                ImagingOrder.issuer_of_accession_number.is_(None),
            )
        if system is None:
            return or_(
                ImagingOrder.accession_number == code,
                ImagingOrder.study_instance_uid == study_uid_of(code),
            )
        return and_(
            ImagingOrder.accession_number == code,
            ImagingOrder.issuer_of_accession_number == system,
        )

    # --- rows ------------------------------------------------------------------------------
    def id_column(self) -> Any:
        return ImagingOrder.id

    def base_select(self) -> Select[Any]:
        return select(ImagingOrder.id)

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return list(
            session.scalars(
                select(ImagingOrder.id).where(ImagingOrder.resource_id.in_(list(resource_ids)))
            )
        )

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        rows = {
            row.id: row
            for row in session.execute(
                select(
                    ImagingOrder.id,
                    ImagingOrder.resource_id,
                    ImagingOrder.version,
                    ImagingOrder.updated_at,
                    ImagingOrder.document,
                ).where(ImagingOrder.id.in_(list(row_ids)))
            )
        }
        return [
            resource(rows[i].resource_id, rows[i].version, rows[i].updated_at, rows[i].document)
            for i in row_ids
            if i in rows
        ]

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        found = self.load(ctx, session, self.row_ids_for(session, [resource_id]))
        if not found:
            raise not_found(self.type, resource_id)
        return found[0]

    def history(self, ctx: Context, session: Session, resource_id: str) -> list[dict[str, Any]]:
        row = ordering.by_resource_id(session, resource_id)
        if row is None:
            raise not_found(self.type, resource_id)
        return [
            resource(row.resource_id, v.version, v.created_at, v.document)
            for v in ordering.versions(session, row.id)
        ]

    def history_type(
        self, ctx: Context, session: Session, since: datetime | None, offset: int, count: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """Every version of every order, newest first (FHIR R4 http "history", type level); with
        ``_since``, those written from then on."""
        versions, orders = ordering.VERSIONS, ordering.ORDERS
        rows = select(
            orders.c.resource_id, versions.c.version, versions.c.created_at, versions.c.document
        ).join(orders, orders.c.id == versions.c.order_fk)
        if since is not None:
            rows = rows.where(versions.c.created_at >= since)
        total = session.scalar(select(func.count()).select_from(rows.subquery())) or 0
        page = session.execute(
            rows.order_by(versions.c.created_at.desc(), versions.c.id.desc())
            .offset(offset)
            .limit(count)
        ).all()
        return int(total), [
            resource(r.resource_id, r.version, r.created_at, r.document) for r in page
        ]

    def vread(
        self, ctx: Context, session: Session, resource_id: str, version: str
    ) -> dict[str, Any]:
        for found in self.history(ctx, session, resource_id):
            if found["meta"]["versionId"] == version:
                return found
        raise FHIRError(404, f"ServiceRequest/{resource_id} has no version {version!r}")


def resource(
    resource_id: str, version: int, updated: datetime, document: dict[str, Any]
) -> dict[str, Any]:
    """The ServiceRequest of a stored document and its version."""
    return {
        "resourceType": "ServiceRequest",
        "id": resource_id,
        "meta": meta(version, updated),
        **{k: v for k, v in document.items() if k not in ("resourceType", "id", "meta")},
    }


# --- what a request says ------------------------------------------------------------------------


def _fail(status: int, message: str, where: str, code: str | None = None) -> FHIRError:
    return FHIRError(status, message, code=code, expression=[f"ServiceRequest.{where}"])


def _patient_row(ctx: Context, session: Session, body: dict[str, Any]) -> int:
    reference = (body.get("subject") or {}).get("reference")
    if not reference:
        raise _fail(
            422, "subject: the order's Patient (Patient/<id>) is required", "subject", "required"
        )
    row = search.row_id(search.reference_id(reference, "Patient", ctx.base))
    if row is None or session.get(Patient, row) is None:
        raise _fail(
            422,
            f"subject {reference!r} is not a Patient of this server: create the Patient first",
            "subject",
            "not-found",
        )
    return row


def _procedure(body: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    concept = body.get("code") or {}
    for coding in concept.get("coding") or []:
        if coding.get("code"):
            return (
                coding.get("system"),
                str(coding["code"])[:64],
                coding.get("display") or concept.get("text"),
            )
    if concept.get("text"):
        return None, None, concept["text"]
    raise _fail(
        422,
        "code: the ordered procedure (a coding of the price list's / RadLex Playbook codes) is "
        "required",
        "code",
        "required",
    )


def _modality(session: Session, body: dict[str, Any], procedure: tuple[Any, ...]) -> str | None:
    concept = body.get("performerType") or {}
    for coding in concept.get("coding") or []:
        if coding.get("system") == identity.DCM and coding.get("code"):
            code = str(coding["code"])
            if not _CS.fullmatch(code):
                raise _fail(
                    422,
                    f"performerType {code!r} is not a DICOM modality (CS, PS3.3 C.7.3.1.1.1)",
                    "performerType",
                    "value",
                )
            return code
    if concept.get("coding"):
        raise _fail(
            422,
            f"performerType: give the modality as a code of {identity.DCM}",
            "performerType",
            "code-invalid",
        )
    system, code, _ = procedure
    name = CODE_SYSTEM_OF.get(system or "") or _RADLEX_SYSTEMS.get(system or "")
    if code and name:
        # The price list's modality of the ordered code, where it names one.
        found = session.scalar(
            select(ChargeItemDefinition.modality)
            .where(
                ChargeItemDefinition.code_system == name,
                ChargeItemDefinition.code == code,
                ChargeItemDefinition.modality.is_not(None),
            )
            .order_by(ChargeItemDefinition.id.desc())
            .limit(1)
        )
        return str(found).upper() if found else None
    return None


def _station(body: dict[str, Any]) -> tuple[str | None, str | None]:
    for position, performer in enumerate(body.get("performer") or []):
        ident = performer.get("identifier") or {}
        if ident.get("system") != AE_TITLE_SYSTEM:
            continue
        ae = str(ident.get("value") or "").strip()
        if not _AE.fullmatch(ae):
            raise _fail(
                422,
                f"performer identifier {ae!r} is not an AE title (1 to 16 characters, PS3.5 6.2)",
                f"performer[{position}].identifier",
                "value",
            )
        name = performer.get("display")
        return ae, (str(name)[:16].replace("\\", " ") if name else None)
    return None, None


def _pn(display: str | None) -> str | None:
    """A DICOM PN from a display name ("Family, Given", "Given Family" or "Family^Given")."""
    if not display:
        return None
    display = display.strip()
    if "^" in display:
        return display[:324]
    if "," in display:
        family, _, given = display.partition(",")
        return f"{family.strip()}^{given.strip()}"[:324]
    parts = display.split()
    return (parts[-1] + ("^" + " ".join(parts[:-1]) if len(parts) > 1 else ""))[:324]


def _parse_moment(value: str, zone: tzinfo) -> tuple[datetime, bool]:
    """(the instant, whether a time was given) of a FHIR date or dateTime; a value without
    a zone is in ``zone``."""
    if "T" not in value:
        parts = [int(p) for p in value.split("-")]
        day = date(parts[0], parts[1] if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else 1)
        return datetime.combine(day, time(), zone), False
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)), True


def _schedule(body: dict[str, Any], zone: tzinfo) -> tuple[datetime | None, str | None, str | None]:
    value = body.get("occurrenceDateTime") or (body.get("occurrencePeriod") or {}).get("start")
    where = "occurrenceDateTime" if body.get("occurrenceDateTime") else "occurrencePeriod.start"
    if body.get("occurrenceTiming"):
        raise _fail(
            422,
            "occurrenceTiming: a worklist step has one start: give occurrenceDateTime or "
            "occurrencePeriod",
            "occurrenceTiming",
            "not-supported",
        )
    if not value:
        return None, None, None
    try:
        moment, timed = _parse_moment(str(value), zone)
    except ValueError as exc:
        raise _fail(400, f"{where} {value!r}: {exc}", where) from exc
    local = moment.astimezone(zone)
    return (
        moment.astimezone(UTC),
        local.strftime("%Y%m%d"),
        local.strftime("%H%M%S") if timed else None,
    )


def _accession(body: dict[str, Any]) -> tuple[str | None, str | None]:
    for position, item in enumerate(body.get("identifier") or []):
        if not _is_accession(item):
            continue
        value = str(item.get("value") or "")
        if not value or len(value) > ordering.MAX_SH or "\\" in value:
            raise _fail(
                422,
                f"identifier (ACSN) {value!r}: an Accession Number is 1 to 16 characters (SH)",
                f"identifier[{position}]",
                "value",
            )
        system = item.get("system")
        if system == ACCESSION_SYSTEM:
            system = None
        if system and len(system) > 64:
            raise _fail(
                422,
                "identifier (ACSN) system: the Issuer of Accession Number is at most 64 "
                "characters (LO)",
                f"identifier[{position}].system",
                "value",
            )
        return value, system
    return None, None


def _given_study_uid(body: dict[str, Any]) -> str | None:
    from archive.dicom import valid_uid

    for position, item in enumerate(body.get("identifier") or []):
        if item.get("system") == identity.DICOM_UID_SYSTEM and item.get("value"):
            uid = study_uid_of(str(item["value"]))
            if not valid_uid(uid):
                raise _fail(
                    422,
                    f"identifier {item['value']!r} is not a DICOM UID (urn:oid:<uid>)",
                    f"identifier[{position}]",
                    "value",
                )
            return uid
    return None


def _draft(
    ctx: Context, session: Session, provider: ServiceRequestProvider, body: dict[str, Any]
) -> ordering.OrderDraft:
    intent = body.get("intent")
    if intent not in ORDER_INTENTS:
        raise _fail(
            422,
            f"intent {intent!r}: the worklist takes orders (intent order, or original-order, "
            "reflex-order, filler-order, instance-order), not proposals or plans",
            "intent",
            "business-rule",
        )
    procedure = _procedure(body)
    start, start_date, start_time = _schedule(body, provider.zone)
    accession, issuer = _accession(body)
    station, station_name = _station(body)
    requester = body.get("requester") or {}
    reasons = [
        c.get("text") or next((x.get("display") for x in c.get("coding") or []), None)
        for c in body.get("reasonCode") or []
    ]
    return ordering.OrderDraft(
        patient_row=_patient_row(ctx, session, body),
        status=str(body.get("status")),
        intent=str(intent),
        priority=body.get("priority"),
        accession_number=accession,
        issuer_of_accession_number=issuer,
        study_instance_uid=_given_study_uid(body),
        procedure_scheme=(procedure[0] or None) and str(procedure[0])[:64],
        procedure_code=procedure[1],
        procedure_display=procedure[2],
        modality=_modality(session, body, procedure),
        scheduled_station_ae_title=station,
        scheduled_station_name=station_name,
        scheduled_start=start,
        scheduled_start_date=start_date,
        scheduled_start_time=start_time,
        requester=requester.get("reference") or requester.get("display"),
        requesting_physician=_pn(requester.get("display")),
        reason="; ".join(r for r in reasons if r) or None,
    )


def _document(
    body: dict[str, Any],
    *,
    accession: str,
    issuer: str | None,
    study_uid: str,
    requested_procedure_id: str,
) -> dict[str, Any]:
    """The document kept: the body as sent, its identifiers those of the EHR that are not the
    order's own, then the Accession Number, the Study Instance UID and the Requested
    Procedure ID."""
    document = {k: v for k, v in body.items() if k not in ("resourceType", "id", "meta")}
    kept = [
        item
        for item in body.get("identifier") or []
        if not _is_accession(item) and item.get("system") not in _OWN_SYSTEMS
    ]
    accession_identifier: dict[str, Any] = {
        "use": "usual",
        "type": {
            "coding": [{"system": identity.V2_0203, "code": "ACSN", "display": "Accession ID"}]
        },
        "system": issuer or ACCESSION_SYSTEM,
        "value": accession,
    }
    document["identifier"] = [
        *kept,
        accession_identifier,
        {"use": "official", "system": identity.DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"},
        {"use": "secondary", "system": REQUESTED_PROCEDURE_SYSTEM, "value": requested_procedure_id},
    ]
    return document


def _checked(resource_id: str, version: int, document: dict[str, Any]) -> dict[str, Any]:
    """The document as it will be served, checked against the R4 model."""
    validate_resource(resource(resource_id, version, datetime.now(UTC), document), "ServiceRequest")
    return document


def _order_error(exc: ordering.OrderError) -> FHIRError:
    where = {
        "accession_number": "identifier",
        "study_instance_uid": "identifier",
        "patient": "subject",
        "modality": "performerType",
        "scheduled_station_ae_title": "performer",
        "scheduled_station_name": "performer",
    }.get(exc.field or "", exc.field or "ServiceRequest")
    if exc.kind == "conflict":
        return _fail(409, str(exc), where, "duplicate")
    return _fail(422, str(exc), where, "value" if exc.kind == "invalid" else "not-found")


# --- writes ------------------------------------------------------------------------------------


def create_service_request(
    ctx: Context, provider: Provider, body: dict[str, Any], if_none_exist: str | None
) -> tuple[dict[str, Any], int]:
    """Create (201), or with ``If-None-Exist`` answer the one match (200) / refuse several
    (412): http.html#ccreate."""
    assert isinstance(provider, ServiceRequestProvider)
    if if_none_exist:
        parsed = search.parse(parse_qsl(if_none_exist.lstrip("?")), provider.params, strict=True)
        with ctx.archive.db.session() as session:
            page = provider.search(
                ctx, session, parsed, offset=0, count=2, snapshot=None, want_total=True
            )
        if page.total == 1:
            return page.resources[0], 200
        if page.total and page.total > 1:
            raise FHIRError(
                412,
                f"If-None-Exist {if_none_exist!r} matches {page.total} orders",
                expression=["If-None-Exist"],
            )
    status = body.get("status")
    if status not in _CREATE_STATUSES:
        raise _fail(
            422,
            f"status {status!r}: a new order is draft, active or on-hold",
            "status",
            "business-rule",
        )
    try:
        with ctx.archive.db.write_session() as session:
            draft = _draft(ctx, session, provider, body)

            def render(assigned: ordering.Assigned) -> dict[str, Any]:
                return _checked(
                    assigned.resource_id,
                    1,
                    _document(
                        body,
                        accession=assigned.accession_number,
                        issuer=draft.issuer_of_accession_number,
                        study_uid=assigned.study_instance_uid,
                        requested_procedure_id=assigned.requested_procedure_id,
                    ),
                )

            row = ordering.create(session, draft, render)
            created = _recorded(ctx, session, row)
    except ordering.OrderError as exc:
        raise _order_error(exc) from exc
    committed(ctx.audit)
    return created, 201


def _recorded(ctx: Context, session: Session, row: Any) -> dict[str, Any]:
    """The audit event of a write of the order ``row`` (in its transaction), and the
    ServiceRequest as written."""
    event = change_event(
        ctx.audit,
        f"ServiceRequest/{row.resource_id}",
        patient_row=row.patient_fk,
        study_uid=row.study_instance_uid,
    )
    if event is not None:
        record(session, event)
    return resource(row.resource_id, row.version, row.updated_at, row.document)


def update_service_request(
    ctx: Context,
    provider: Provider,
    resource_id: str,
    body: dict[str, Any],
    check: Callable[[str], None],
) -> dict[str, Any]:
    assert isinstance(provider, ServiceRequestProvider)
    try:
        with ctx.archive.db.write_session() as session:
            current = ordering.by_resource_id(session, resource_id, lock=True)
            if current is None:
                raise FHIRError(
                    405,
                    f"ServiceRequest/{resource_id} does not exist and this server does not "
                    "create resources with client-assigned ids: POST the ServiceRequest",
                    code="not-supported",
                )
            check(str(current.version))
            status = body.get("status")
            if current.status in _FINAL and status != current.status:
                raise _fail(
                    422,
                    f"the order is {current.status}, a final status: it cannot become {status}",
                    "status",
                    "business-rule",
                )
            draft = _draft(ctx, session, provider, body)
            if draft.patient_row != current.patient_fk:
                raise _fail(
                    422,
                    f"subject: an order's patient cannot change (it is Patient/"
                    f"{current.patient_fk})",
                    "subject",
                    "business-rule",
                )
            if draft.accession_number is not None and (
                draft.accession_number != current.accession_number
                or draft.issuer_of_accession_number != current.issuer_of_accession_number
            ):
                raise _fail(
                    422,
                    "identifier: an order's Accession Number cannot change (it is "
                    f"{current.accession_number})",
                    "identifier",
                    "business-rule",
                )
            draft.issuer_of_accession_number = current.issuer_of_accession_number
            document = _checked(
                resource_id,
                current.version + 1,
                _document(
                    body,
                    accession=current.accession_number,
                    issuer=current.issuer_of_accession_number,
                    study_uid=current.study_instance_uid,
                    requested_procedure_id=current.requested_procedure_id,
                ),
            )
            row = ordering.update_order(session, current.id, draft, document)
            updated = _recorded(ctx, session, row)
    except ordering.OrderError as exc:
        raise _order_error(exc) from exc
    committed(ctx.audit)
    return updated


def delete_service_request(ctx: Context, provider: Provider, resource_id: str) -> dict[str, Any]:
    """DELETE: the order is revoked (see the module's documentation); its resource as now."""
    assert isinstance(provider, ServiceRequestProvider)
    with ctx.archive.db.write_session() as session:
        current = ordering.by_resource_id(session, resource_id, lock=True)
        if current is None:
            raise not_found("ServiceRequest", resource_id)
        if current.status in ("revoked", "entered-in-error"):
            return resource(
                current.resource_id, current.version, current.updated_at, current.document
            )
        if current.status == "completed":
            raise _fail(
                409,
                "the order is completed: its images are in the archive, it cannot be revoked",
                "status",
                "business-rule",
            )
        row = ordering.cancel(session, current.id)
        if row.version == current.version:  # revoked already: nothing changed, nothing recorded
            deleted = resource(row.resource_id, row.version, row.updated_at, row.document)
        else:
            deleted = _recorded(ctx, session, row)
    committed(ctx.audit)
    return deleted
