"""Patient (FHIR R4 patient.html) from the archive's patient rows and the EHR's records.

A patient's FHIR id is its index row id. Its identifier is the DICOM Patient ID in the system
of its Issuer of Patient ID. Demographics an EHR sent (create, update) win over the DICOM
header's in this view; the DICOM files are never rewritten. Every EHR version is kept; a patient
that came from DICOM first has the DICOM view as version 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, case, exists, func, literal, literal_column, or_, select
from sqlalchemy.orm import Session

from archive.models import Patient, PatientRecord, Study
from config.settings import dicom_zone
from fhir_bridge import identity, search
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, not_found
from fhir_bridge.provider import Provider, meta
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"


def _effective(record: Any, dicom: Any) -> Any:
    """The value the Patient shows: the EHR record's once there is one (even when it leaves
    the element out), else the DICOM header's."""
    return case((Patient.record_version.is_not(None), record), else_=dicom)


_NAME = _effective(Patient.record_name_search, Patient.patient_name_search)
_NAME_AS_GIVEN = _effective(Patient.record_name, Patient.patient_name)
"""The name as written, for ``:exact`` (which includes case: search.html#string)."""
_BIRTH = _effective(Patient.record_birth_date, Patient.patient_birth_date)
_SEX = _effective(Patient.record_sex, Patient.patient_sex)
_UPDATED = func.coalesce(Patient.record_updated_at, Patient.created_at)


def _row_id(resource_id: str) -> int | None:
    return search.row_id(resource_id)


class PatientProvider(Provider):
    type = "Patient"
    compartment = ("_id",)  # R4 compartmentdefinition-patient: Patient itself (and link)
    profile = "http://hl7.org/fhir/StructureDefinition/Patient"
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
    conditional_create = True
    documentation = (
        "The patients of the archive (DICOM Patient ID in the system of its Issuer of Patient "
        "ID) and those an EHR created; EHR demographics win over the DICOM header's."
    )
    summary_elements = frozenset(
        {
            "identifier",
            "active",
            "name",
            "telecom",
            "gender",
            "birthDate",
            "deceasedBoolean",
            "deceasedDateTime",
            "address",
            "managingOrganization",
            "link",
        }
    )

    def __init__(self, settings: Any) -> None:
        super().__init__()
        self.fhir = settings.fhir
        p = self.params
        p["_id"] = SearchParam(
            "_id",
            "token",
            "Logical id",
            lambda v, m: Patient.id == (_row_id(v) or -1),
            definition=SEARCH_PARAMETER + "Resource-id",
        )
        p["identifier"] = SearchParam(
            "identifier",
            "token",
            "The DICOM Patient ID (system|value)",
            self._identifier,
            definition=SEARCH_PARAMETER + "Patient-identifier",
        )
        for name, mode in (("name", "any"), ("family", "family"), ("given", "given")):
            p[name] = SearchParam(
                name,
                "string",
                f"Patient name ({mode}): starts with, :exact, :contains",
                self._name(mode),
                modifiers=frozenset({"exact", "contains"}),
                definition=SEARCH_PARAMETER
                + f"{'individual' if name != 'name' else 'Patient'}-{name}",
            )
        bound = search.dicom_bound_in(dicom_zone(settings.dicom_timezone))
        p["birthdate"] = SearchParam(
            "birthdate",
            "date",
            "Birth date (all prefixes)",
            lambda v, m: search.date_condition(
                search.parse_date(v, "birthdate"),
                _BIRTH + "000000",
                _BIRTH + "235959.999999",
                bound,
            ),
            definition=SEARCH_PARAMETER + "individual-birthdate",
        )
        p["gender"] = SearchParam(
            "gender",
            "token",
            "male | female | other | unknown",
            self._gender,
            definition=SEARCH_PARAMETER + "individual-gender",
        )
        p["_lastUpdated"] = SearchParam(
            "_lastUpdated",
            "date",
            "When the patient last changed",
            lambda v, m: search.date_condition(
                search.parse_date(v, "_lastUpdated"), _UPDATED, _UPDATED, search.utc_bound
            ),
            definition=SEARCH_PARAMETER + "Resource-lastUpdated",
        )
        self.sorts = {
            "_id": Patient.id,
            "birthdate": _BIRTH,
            "_lastUpdated": _UPDATED,
            "family": _NAME,
            "name": _NAME,
        }

    # --- search conditions -------------------------------------------------------------------
    def _identifier(self, value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None:
            issuer = identity.issuer_for_system(self.fhir, system)
            return Patient.issuer_of_patient_id == issuer if issuer is not None else literal(False)
        if system is None:
            return Patient.patient_id == code
        issuer = identity.issuer_for_system(self.fhir, system or None)
        if issuer is None:
            return literal(False)
        return (Patient.patient_id == code) & (Patient.issuer_of_patient_id == issuer)

    @staticmethod
    def _name(mode: str) -> Any:
        def condition(value: str, modifier: str | None) -> Any:
            family: Any
            given: Any
            if modifier == "exact":
                # Case-sensitive comparisons only (substr and replace are, LIKE is not on
                # SQLite): the family name is the first PN component, a given name one of the
                # words of the others.
                name = _NAME_AS_GIVEN
                family = (name == value) | (func.substr(name, 1, len(value) + 1) == value + "^")
                words = "^" + func.replace(name, " ", "^") + "^"
                given = func.replace(words, f"^{value}^", "") != words
                given = given & (func.substr(name, 1, len(value) + 1) != value + "^")
            else:
                text = search.like_escape(value.upper())
                if modifier == "contains":
                    family = given = _NAME.like(f"%{text}%", escape="\\")
                else:
                    family = _NAME.like(f"{text}%", escape="\\")
                    given = _NAME.like(f"%^{text}%", escape="\\") | _NAME.like(
                        f"%^% {text}%", escape="\\"
                    )
            if mode == "family":
                return family
            if mode == "given":
                return given
            return or_(family, given)

        return condition

    @staticmethod
    def _gender(value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if system not in (None, "", "http://hl7.org/fhir/administrative-gender"):
            return literal(False)
        sex = identity.SEX_OF_GENDER.get(code or "")
        if sex is None:
            return literal(False)
        if sex == "U":
            return _SEX == "U"  # what shows as unknown: a Patient without gender has none
        return sex == _SEX

    # --- rows ----------------------------------------------------------------------------------
    def id_column(self) -> Any:
        return Patient.id

    def base_select(self) -> Select[Any]:
        return select(Patient.id)

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return [row_id for row_id in (_row_id(i) for i in resource_ids) if row_id is not None]

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        if not row_ids:
            return []
        rows = {p.id: p for p in session.scalars(select(Patient).where(Patient.id.in_(row_ids)))}
        records = self._records(session, [r for r in rows.values() if r.record_version])
        return [self.resource(rows[i], records.get(i)) for i in row_ids if i in rows]

    @staticmethod
    def _records(session: Session, patients: list[Patient]) -> dict[int, PatientRecord]:
        if not patients:
            return {}
        keys = [(p.id, p.record_version) for p in patients]
        found = session.scalars(
            select(PatientRecord).where(
                PatientRecord.patient_fk.in_([k[0] for k in keys]),
                PatientRecord.version.in_({k[1] for k in keys}),
            )
        )
        wanted = dict(keys)
        return {r.patient_fk: r for r in found if wanted.get(r.patient_fk) == r.version}

    def identifier(self, patient: Patient) -> dict[str, Any]:
        return {
            "use": "usual",
            "system": identity.system_for_issuer(self.fhir, patient.issuer_of_patient_id),
            "value": patient.patient_id,
        }

    def resource(self, patient: Patient, record: PatientRecord | None) -> dict[str, Any]:
        """The current view; with ``record`` the EHR's document, else the DICOM header's."""
        if record is not None:
            return self._from_record(patient, record)
        return self._from_dicom(patient)

    def _from_dicom(self, patient: Patient) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "Patient",
            "id": str(patient.id),
            "meta": meta(1, patient.created_at),
            "identifier": [self.identifier(patient)],
        }
        name = identity.human_name(patient.patient_name)
        if name:
            resource["name"] = [name]
        gender = identity.GENDER_OF_SEX.get((patient.patient_sex or "").strip().upper())
        if gender:
            resource["gender"] = gender
        birth = identity.fhir_date(patient.patient_birth_date)
        if birth:
            resource["birthDate"] = birth
        return resource

    def _from_record(self, patient: Patient, record: PatientRecord) -> dict[str, Any]:
        document = record.document
        resource: dict[str, Any] = {
            "resourceType": "Patient",
            "id": str(patient.id),
            "meta": {**(document.get("meta") or {}), **meta(record.version, record.created_at)},
        }
        resource.update(
            (k, v) for k, v in document.items() if k not in ("resourceType", "id", "meta")
        )
        ours = self.identifier(patient)
        identifiers = list(resource.get("identifier") or [])
        if not any(
            i.get("system") == ours["system"] and i.get("value") == ours["value"]
            for i in identifiers
        ):
            identifiers.insert(0, ours)
        resource["identifier"] = identifiers
        return resource

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        row_id = _row_id(resource_id)
        patient = session.get(Patient, row_id) if row_id is not None else None
        if patient is None:
            raise not_found("Patient", resource_id)
        record = (
            self._records(session, [patient]).get(patient.id) if patient.record_version else None
        )
        return self.resource(patient, record)

    def vread(
        self, ctx: Context, session: Session, resource_id: str, version: str
    ) -> dict[str, Any]:
        current = self.read(ctx, session, resource_id)
        for resource in self.history(ctx, session, resource_id):
            if resource["meta"]["versionId"] == version:
                return resource
        raise FHIRError(
            404,
            f"Patient/{resource_id} has no version {version!r} (the current version is "
            f"{current['meta']['versionId']})",
        )

    def history(self, ctx: Context, session: Session, resource_id: str) -> list[dict[str, Any]]:
        """Every version of one patient, newest first."""
        row_id = _row_id(resource_id)
        if row_id is None or session.get(Patient, row_id) is None:
            raise not_found("Patient", resource_id)
        return self._versions(
            session, self._version_rows().where(literal_column("patient") == row_id)
        )[1]

    def history_type(
        self, ctx: Context, session: Session, since: datetime | None, offset: int, count: int
    ) -> tuple[int, list[dict[str, Any]]]:
        rows = self._version_rows()
        if since is not None:
            rows = rows.where(literal_column("at") >= since)
        return self._versions(session, rows, offset, count)

    @staticmethod
    def _version_rows() -> Select[Any]:
        """(patient, version, at) of every version: the EHR's records, and the DICOM view as
        version 1 of a patient whose first record came later (or that has none)."""
        records = select(
            PatientRecord.patient_fk.label("patient"),
            PatientRecord.version.label("version"),
            PatientRecord.created_at.label("at"),
        )
        dicom = select(
            Patient.id.label("patient"), literal(1).label("version"), Patient.created_at.label("at")
        ).where(~exists().where(PatientRecord.patient_fk == Patient.id, PatientRecord.version == 1))
        union = records.union_all(dicom).subquery()
        return select(union.c.patient, union.c.version, union.c.at)

    def _versions(
        self, session: Session, rows: Select[Any], offset: int = 0, count: int | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        total = session.scalar(select(func.count()).select_from(rows.subquery())) or 0
        page = rows.order_by(literal_column("at").desc(), literal_column("version").desc())
        page = page.offset(offset)
        if count is not None:
            page = page.limit(count)
        found = session.execute(page).all()
        patients = {
            p.id: p
            for p in session.scalars(select(Patient).where(Patient.id.in_({r[0] for r in found})))
        }
        records = {
            (r.patient_fk, r.version): r
            for r in session.scalars(
                select(PatientRecord).where(
                    PatientRecord.patient_fk.in_(list(patients)),
                    PatientRecord.version.in_({r[1] for r in found}),
                )
            )
        }
        out = []
        for patient_id, version, _ in found:
            patient = patients.get(patient_id)
            if patient is None:
                continue
            record = records.get((patient_id, version))
            out.append(self._from_record(patient, record) if record else self._from_dicom(patient))
        return int(total), out

    # --- writes ------------------------------------------------------------------------------
    def dicom_key(self, body: dict[str, Any]) -> tuple[str, str]:
        """(Patient ID, Issuer of Patient ID) of the first identifier in a mapped system."""
        for position, item in enumerate(body.get("identifier") or []):
            issuer = identity.issuer_for_system(self.fhir, item.get("system"))
            value = (item.get("value") or "").strip()
            if issuer is not None and value:
                if len(value) > 64 or "\\" in value:
                    raise FHIRError(
                        422,
                        "the identifier value is not a DICOM Patient ID (LO: at most 64 "
                        "characters, no backslash)",
                        expression=[f"Patient.identifier[{position}].value"],
                    )
                return value, issuer
        raise FHIRError(
            422,
            "Patient.identifier: none is in a system this server maps to DICOM Patient IDs "
            f"({self.fhir.patient_identifier_system}, the issuer systems of the settings, or "
            f"{self.fhir.patient_identifier_system}:<issuer>)",
            code="business-rule",
            expression=["Patient.identifier"],
        )

    def store(self, session: Session, patient: Patient, body: dict[str, Any]) -> PatientRecord:
        """Record ``body`` as the next version of ``patient`` (in the caller's transaction)."""
        now = datetime.now(UTC)
        if patient.record_version is not None:
            version = patient.record_version + 1
        else:
            version = 2 if _has_dicom(session, patient) else 1
        document = {k: v for k, v in body.items() if k not in ("id", "meta", "text")}
        record = PatientRecord(
            patient_fk=patient.id, version=version, document=document, created_at=now
        )
        session.add(record)
        names = body.get("name") or []
        official = next(
            (n for n in names if n.get("use") == "official"), names[0] if names else None
        )
        patient.record_version = version
        patient.record_updated_at = now
        patient.record_name = identity.pn_from_human_name(official)
        patient.record_name_search = identity.search_name(patient.record_name)
        patient.record_birth_date = identity.dicom_date(body.get("birthDate"))
        patient.record_sex = identity.SEX_OF_GENDER.get(body.get("gender") or "")
        session.flush()
        return record


def _has_dicom(session: Session, patient: Patient) -> bool:
    """Whether the patient row came from images (a DICOM view exists as version 1)."""
    if patient.patient_name is not None or patient.patient_birth_date or patient.patient_sex:
        return True
    return bool(session.scalar(select(func.count()).where(Study.patient_fk == patient.id)))
