"""Charge capture: technical charges from the procedures performed in a study, professional
charges from its signed (VERIFIED) reports.

A **procedure** is what one image series of a study shows was done: the codes of its
Procedure Code Sequence (0008,1032), else Requested Procedure Code Sequence (0032,1064), else
Performed Protocol Code Sequence (0040,0260) — the first of those with items, each item one
procedure — else its Modality + Body Part Examined (+ Laterality / Image Laterality, + contrast:
Contrast/Bolus Agent (0018,0010) not empty). Series that are not images (SR, SEG, KO, PR, DOC,
REG, RTSTRUCT, or only SR instances) are skipped. A study has one procedure per distinct code (or
modality + body part + laterality + contrast key), however many series show it. A study made for
an order (``archive.order_links``) whose procedure code the price list prices has its ordered
procedures instead, one per order (several when one acquisition performed several orders, the
IHE SWF group case; :func:`ordered_procedures`), as soon as the price list prices one of their
codes.

**Re-coding**: each capture makes the study's technical charges those of its procedures as
they stand. An open technical charge of the study under another key is voided
(``entered-in-error``, "re-coded as ordered: …" / "re-coded as performed: …"): the order was
linked only after the study was charged (images that came before their order), or it no longer
counts (revoked as entered-in-error, its code no longer priced); a voided charge whose
procedure comes back is captured again. So a study is never charged both ways. If one of the
charges to void is billed already (on an issued invoice), nothing changes and a warning is
logged: a credit corrects it.

**Conditions** a price component may name: ``contrast`` (a series of the procedure had a
contrast agent), ``after_hours`` (Study Time before 07:00 or from 19:00, the study's local time)
and ``weekend`` (Study Date a Saturday or Sunday).

**Idempotency**: every charge has a unique key — ``technical|<study uid>|<procedure key>`` and
``professional|<report root uid>`` — inserted with "on conflict do nothing", so capturing a study
again (re-sent, stable again, a report amended or signed again), even from two processes at once,
never charges twice. A charge voided because its study was deleted comes back (a new version)
when the study is stored and captured again.

**Never a silent zero**: a procedure without a definition in force becomes a ``planned`` charge
with a ``review_reason``; :func:`reprice_planned` (run after a price list is loaded) makes it
``billable`` once a definition prices it. Every change of a charge writes a ``charge_event`` in
the same transaction.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from archive import Archive
from archive.audit import AuditEvent, record_change
from archive.models import Instance, Patient, ReportDocument, Series, Study
from archive.order_links import orders_for_study
from archive.outbox import emit
from billing.metrics import count_charge_on_commit
from billing.models import BillingAccount, ChargeEvent, ChargeItem, ChargeItemDefinition
from billing.prices import CODE_SYSTEMS, find_definition, price
from config import Settings

log = logging.getLogger(__name__)

PLANNED = "planned"
BILLABLE = "billable"
ENTERED_IN_ERROR = "entered-in-error"
OPEN_STATUSES = (PLANNED, BILLABLE)

#: Series of these modalities are no performed imaging procedure.
NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "KO", "PR", "DOC", "REG", "RTSTRUCT"})
_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: The code sequences read, in order of preference.
PROCEDURE_SEQUENCES = ("00081032", "00321064", "00400260")
_SCHEMES = {"LN": "loinc", "RADLEX": "radlex"}
#: ``after_hours``: a study that started before 07:00 or from 19:00.
DAY_STARTS, DAY_ENDS = 7, 19


@dataclass
class Procedure:
    """One performed procedure of a study (see the module's docstring)."""

    key: str
    display: str
    code_system: str | None
    code: str | None
    modality: str | None
    body_part: str | None
    laterality: str | None
    contrast: bool
    conditions: list[str] = field(default_factory=list)
    series: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.code is not None:
            return f"{self.code_system} {self.code}"
        return _fallback_label(self.modality, self.body_part, self.laterality, self.contrast)


def _fallback_label(
    modality: str | None, body_part: str | None, laterality: str | None, contrast: bool | None
) -> str:
    words = [modality or "(no modality)", body_part or "(no body part)"]
    if laterality:
        words.append(laterality)
    if contrast:
        words.append("with contrast")
    return " ".join(words)


def _value(dataset: dict[str, Any], tag: str) -> Any:
    values = (dataset.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _text(dataset: dict[str, Any], tag: str) -> str | None:
    value = _value(dataset, tag)
    if isinstance(value, dict):  # a person name
        value = value.get("Alphabetic")
    text = str(value).strip() if value is not None else ""
    return text or None


def _codes(dataset: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(system, code, meaning) of the first procedure code sequence that has items."""
    for tag in PROCEDURE_SEQUENCES:
        items = (dataset.get(tag) or {}).get("Value") or []
        codes = []
        for item in items:
            if not isinstance(item, dict):
                continue
            code = _text(item, "00080100")
            if code is None:
                continue
            scheme = (_text(item, "00080102") or "").upper()
            codes.append((_SCHEMES.get(scheme, "local"), code, _text(item, "00080104") or ""))
        if codes:
            return codes
    return []


def study_day(study: Study) -> date:
    """The study date, else the day it was first received (UTC)."""
    text = (study.study_date or "").strip()
    if re.fullmatch(r"\d{8}", text):
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            pass
    created = study.created_at
    return created.date() if created is not None else datetime.now(UTC).date()


def study_conditions(study: Study) -> list[str]:
    """``after_hours`` and ``weekend`` of the study (see the module's docstring)."""
    conditions = []
    time = (study.study_time or "").replace(":", "").strip()
    if re.match(r"\d{2}", time) and not DAY_STARTS <= int(time[:2]) < DAY_ENDS:
        conditions.append("after_hours")
    if study_day(study).weekday() >= 5:
        conditions.append("weekend")
    return conditions


def study_procedures(session: Session, study_uid: str) -> list[Procedure]:
    """The procedures performed in a study, in series order; empty for an unknown study."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        return []
    base_conditions = study_conditions(study)
    found: dict[str, Procedure] = {}
    series_rows = session.execute(
        select(Series.id, Series.series_instance_uid, Series.modality, Series.body_part_examined)
        .where(Series.study_fk == study.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    for series_id, series_uid, series_modality, series_body_part in series_rows:
        if (series_modality or "").upper() in NON_IMAGE_MODALITIES:
            continue
        instance = session.execute(
            select(Instance.dicom_json)
            .where(
                Instance.series_fk == series_id,
                Instance.sop_class_uid.not_like(_SR_CLASS_PREFIX + "%"),
            )
            .order_by(Instance.id)
            .limit(1)
        ).first()
        if instance is None:  # no instance, or only SR documents
            continue
        dataset: dict[str, Any] = instance[0] or {}
        modality = (series_modality or _text(dataset, "00080060") or "").upper() or None
        body_part = (series_body_part or _text(dataset, "00180015") or "").upper() or None
        laterality = (_text(dataset, "00200060") or _text(dataset, "00200062") or "").upper()
        contrast = _text(dataset, "00180010") is not None
        codes = _codes(dataset)
        keys: list[tuple[str, str, str | None, str | None]] = []
        if codes:
            keys = [(f"{system}:{code}", meaning, system, code) for system, code, meaning in codes]
        else:
            key = f"{modality or '-'}/{body_part or '-'}/{laterality or '-'}/" + (
                "contrast" if contrast else "plain"
            )
            label = _fallback_label(modality, body_part, laterality or None, contrast)
            keys = [(key, label, None, None)]
        for key, display, system, code in keys:
            procedure = found.get(key)
            if procedure is None:
                procedure = found[key] = Procedure(
                    key=key,
                    display=display,
                    code_system=system,
                    code=code,
                    modality=modality,
                    body_part=body_part,
                    laterality=laterality or None,
                    contrast=contrast,
                )
            procedure.contrast = procedure.contrast or contrast
            procedure.series.append(series_uid)
    for procedure in found.values():
        procedure.conditions = sorted(
            {*base_conditions, *(["contrast"] if procedure.contrast else [])}
        )
    return list(found.values())


# --- writing charges -----------------------------------------------------------------------


def _insert(session: Session, table: Any, values: dict[str, Any], unique: list[str]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id: the new id, or None if it existed."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=unique)
        .returning(table.id)
    )
    return session.execute(statement).scalar_one_or_none()


def _account(session: Session, patient: Patient) -> int:
    """The patient's account (created on its first charge)."""
    _insert(
        session,
        BillingAccount,
        {
            "patient_fk": patient.id,
            "patient_id": patient.patient_id,
            "issuer_of_patient_id": patient.issuer_of_patient_id,
            "status": "active",
            "created_at": datetime.now(UTC),
        },
        ["patient_id", "issuer_of_patient_id"],
    )
    return session.execute(
        select(BillingAccount.id).where(
            BillingAccount.patient_id == patient.patient_id,
            BillingAccount.issuer_of_patient_id == patient.issuer_of_patient_id,
        )
    ).scalar_one()


def _priced(
    definition: ChargeItemDefinition | None,
    conditions: Iterable[str],
    settings: Settings | None = None,
) -> dict[str, Any]:
    """A charge's price columns; the site's tax rate (``billing.tax_percent``) taxes a
    definition without a tax component of its own."""
    if definition is None:
        return {"definition_fk": None, "lines": [], "net": None, "tax": None, "total": None}
    billing = settings.billing if settings is not None else None
    priced = price(
        definition,
        conditions,
        site_tax_percent=billing.tax_percent if billing is not None else None,
        site_tax_code=billing.tax_code if billing is not None else "VAT",
    )
    return {
        "definition_fk": definition.id,
        "lines": [
            {
                "type": line.type,
                "code": line.code,
                "description": line.description,
                "amount": str(line.amount),
            }
            for line in priced.lines
        ],
        "net": priced.net,
        "tax": priced.tax,
        "total": priced.total,
        "currency": definition.currency,
    }


def _event(
    session: Session, charge_id: int, values: dict[str, Any], actor: str, reason: str
) -> None:
    session.add(
        ChargeEvent(
            charge_fk=charge_id,
            version=values["version"],
            status=values["status"],
            at=datetime.now(UTC),
            actor=actor[:64],
            reason=reason,
            net=values.get("net"),
            total=values.get("total"),
        )
    )


def announce_charge(session: Session, charge_id: int, values: dict[str, Any]) -> None:
    """The ``charge.created`` event (archive.outbox) of a new charge, in the transaction that
    inserts it: codes and amounts (as strings), never names."""

    def money(value: Any) -> str | None:
        return None if value is None else str(value)

    occurred = values.get("occurred_on")
    emit(
        session,
        "charge.created",
        study_uid=values.get("study_instance_uid"),
        patient_id=values.get("patient_id"),
        resource=f"ChargeItem/{charge_id}",
        data={
            "charge_id": charge_id,
            "version": values.get("version"),
            "kind": values.get("kind"),
            "status": values.get("status"),
            "code_system": values.get("code_system"),
            "code": values.get("code"),
            "quantity": money(values.get("quantity")),
            "net": money(values.get("net")),
            "tax": money(values.get("tax")),
            "total": money(values.get("total")),
            "currency": values.get("currency"),
            "occurred_on": occurred.isoformat() if occurred is not None else None,
            "service_kind": values.get("service_kind"),
            "service_uid": values.get("service_uid"),
        },
    )


def announce_charge_change(session: Session, charge: ChargeItem) -> None:
    """The ``charge.updated`` event of a change to a charge (its new version), in the change's
    transaction: voided when its study was deleted or by hand (``entered-in-error``), priced,
    billed on an issued invoice, credited. Codes, status and amounts, never the reason's text
    (free text a clerk typed)."""

    def money(value: Any) -> str | None:
        return None if value is None else str(value)

    emit(
        session,
        "charge.updated",
        study_uid=charge.study_instance_uid,
        patient_id=charge.patient_id,
        resource=f"ChargeItem/{charge.id}",
        data={
            "charge_id": charge.id,
            "version": charge.version,
            "kind": charge.kind,
            "status": charge.status,
            "code_system": charge.code_system,
            "code": charge.code,
            "net": money(charge.net),
            "total": money(charge.total),
            "currency": charge.currency,
        },
    )


def _capture(
    session: Session,
    settings: Settings,
    *,
    key: str,
    base: dict[str, Any],
    definition: ChargeItemDefinition | None,
    missing: str,
    actor: str,
    audit: AuditEvent | None = None,
) -> int:
    """Insert one charge unless its key exists; its id either way. A charge voided because
    its study was deleted is captured again (a new version) when the study is stored again.
    ``audit``: the capturer's audit event, a copy of it recorded for each charge captured (in
    this transaction), none for a charge captured before."""
    existing = session.scalars(
        select(ChargeItem).where(ChargeItem.idempotency_key == key).with_for_update()
    ).first()
    if existing is not None:
        if existing.status == ENTERED_IN_ERROR:
            _change(
                session,
                existing,
                {
                    **base,
                    "currency": settings.billing.currency,
                    **_priced(definition, base["conditions"], settings),
                    "status": BILLABLE if definition is not None else PLANNED,
                    "review_reason": None if definition is not None else missing,
                },
                actor,
                "captured again" if definition is not None else missing,
            )
            _audit_capture(session, audit, existing.id, base)
        return existing.id
    now = datetime.now(UTC)
    values = {
        **base,
        "idempotency_key": key,
        "currency": settings.billing.currency,
        **_priced(definition, base["conditions"], settings),
        "status": BILLABLE if definition is not None else PLANNED,
        "review_reason": None if definition is not None else missing,
        "version": 1,
        "created_at": now,
        "updated_at": now,
    }
    new_id = _insert(session, ChargeItem, values, ["idempotency_key"])
    if new_id is None:  # captured at the same moment by another worker
        return int(
            session.execute(
                select(ChargeItem.id).where(ChargeItem.idempotency_key == key)
            ).scalar_one()
        )
    _event(session, new_id, values, actor, "captured" if definition is not None else missing)
    announce_charge(session, int(new_id), values)
    _audit_capture(session, audit, int(new_id), base)
    count_charge_on_commit(session, str(base["kind"]))
    return int(new_id)


def _audit_capture(
    session: Session, audit: AuditEvent | None, charge_id: int, base: dict[str, Any]
) -> None:
    if audit is not None:
        record_change(
            session,
            dataclasses.replace(audit),
            entity=f"ChargeItem/{charge_id}",
            patient_id=base.get("patient_id"),
            study_uid=base.get("study_instance_uid"),
        )


def _study_and_patient(session: Session, study_uid: str) -> tuple[Study, Patient] | None:
    row = session.execute(
        select(Study, Patient)
        .join(Patient, Study.patient_fk == Patient.id)
        .where(Study.study_instance_uid == study_uid)
    ).first()
    return None if row is None else (row[0], row[1])


def _find(
    session: Session, kind: str, on: date, procedure: Procedure
) -> ChargeItemDefinition | None:
    return find_definition(
        session,
        kind=kind,
        on=on,
        procedure_codes=(
            [(procedure.code_system or "local", procedure.code)] if procedure.code else []
        ),
        modality=procedure.modality,
        body_part=procedure.body_part,
        laterality=procedure.laterality,
        contrast=procedure.contrast,
    )


def _procedure_columns(procedure: Procedure) -> dict[str, Any]:
    return {
        "code_system": procedure.code_system,
        "code": procedure.code,
        "display": procedure.display[:255],
        "modality": procedure.modality,
        "body_part": procedure.body_part,
        "laterality": procedure.laterality,
        "contrast": procedure.contrast,
        "conditions": procedure.conditions,
    }


#: The code systems of ordered procedures (FHIR ServiceRequest.code URIs, as the orders keep
#: them) by their names in the price list (``billing.prices.CODE_SYSTEMS``).
ORDER_CODE_SYSTEMS = {
    "http://loinc.org": "loinc",
    "http://www.radlex.org": "radlex",
    "http://radlex.org": "radlex",
    "http://www.ama-assn.org/go/cpt": "cpt",
    "urn:pacsbridge:procedure-code": "local",
    **{name: name for name in CODE_SYSTEMS},
}


def ordered_procedures(
    session: Session,
    study_uid: str,
    performed: list[Procedure],
    on: date,
    kind: str = "technical",
) -> list[Procedure]:
    """The study's procedures as ordered when it was made for orders (archive.order_links:
    one, or several in a group case) and the price list prices the code of at least one of
    them for ``kind`` on ``on``: one per ordered code (those priced first), coded as ordered,
    with what the series showed (modality, body part, laterality, contrast, conditions). An
    ordered code without a price is kept (its charge is priced as its series, or planned for
    review), never dropped. Empty otherwise: the procedures the series show are charged
    then."""
    if not performed:
        return []
    first = performed[0]
    contrast = any(p.contrast for p in performed)
    priced: dict[str, Procedure] = {}
    unpriced: dict[str, Procedure] = {}
    for order in orders_for_study(session, study_uid):
        system = ORDER_CODE_SYSTEMS.get((order.procedure_scheme or "").strip())
        if system is None or not order.procedure_code:
            continue
        code = str(order.procedure_code)
        key = f"{system}:{code}"
        procedure = Procedure(
            key=key,
            display=order.procedure_display or f"{system} {code}",
            code_system=system,
            code=code,
            modality=first.modality,
            body_part=first.body_part,
            laterality=first.laterality,
            contrast=contrast,
            conditions=sorted({c for p in performed for c in p.conditions}),
            series=[uid for p in performed for uid in p.series],
        )
        coded = find_definition(session, kind=kind, on=on, procedure_codes=[(system, code)])
        (priced if coded is not None else unpriced).setdefault(key, procedure)
    if not priced:
        return []
    return [*priced.values(), *(p for k, p in unpriced.items() if k not in priced)]


def _recoded(
    session: Session,
    study_uid: str,
    keys: list[str],
    how: str,
    actor: str,
    audit: AuditEvent | None,
) -> bool:
    """Make the study's technical charges those of ``keys``: its open technical charges
    under other keys are voided, "re-coded as ``how``" (see the module's docstring). False,
    voiding nothing, when one of those is billed already (on an issued invoice): the study's
    charges are then left as they are, for a credit to correct."""
    prefix = f"technical|{study_uid}|"
    others = [
        charge
        for charge in session.scalars(
            select(ChargeItem)
            .where(
                ChargeItem.study_instance_uid == study_uid,
                ChargeItem.kind == "technical",
                ChargeItem.idempotency_key.not_in(keys),
                ChargeItem.status != ENTERED_IN_ERROR,
            )
            .order_by(ChargeItem.id)
            .with_for_update()
        ).all()
        if charge.idempotency_key.startswith(prefix)
    ]
    if any(charge.status not in OPEN_STATUSES for charge in others):
        log.warning(
            "study's procedures changed after one of its charges was billed: left as they are "
            "(a credit corrects them)",
            extra={
                "study": study_uid,
                "charged_as": ", ".join(k.removeprefix(prefix) for k in keys),
            },
        )
        return False
    reason = f"re-coded as {how}: " + ", ".join(k.removeprefix(prefix) for k in keys)
    change = dataclasses.replace(audit, action="U") if audit is not None else None
    _void(session, others, actor, reason, change)
    return True


def _void(
    session: Session,
    charges: Sequence[ChargeItem],
    actor: str,
    reason: str,
    audit: AuditEvent | None,
) -> None:
    """The charges become entered-in-error, each with its charge event and ``audit``."""
    for charge in charges:
        _change(session, charge, {"status": ENTERED_IN_ERROR}, actor, reason)
        _audit_capture(
            session,
            audit,
            charge.id,
            {"patient_id": charge.patient_id, "study_instance_uid": charge.study_instance_uid},
        )


def capture_technical(
    archive: Archive,
    settings: Settings,
    study_uid: str,
    actor: str = "stable-study",
    audit: AuditEvent | None = None,
) -> list[int]:
    """One technical charge per procedure of the study, priced by the definition in force on
    the study date (else planned for review). Returns the ids of the study's technical
    charges (new or captured before); empty for an unknown study. ``audit``: the capturer's
    audit event, recorded for each charge captured in the capture's transaction."""
    with archive.db.write_session() as session:
        found = _study_and_patient(session, study_uid)
        if found is None:
            return []
        study, patient = found
        procedures = study_procedures(session, study_uid)
        if not procedures:
            return []
        account = _account(session, patient)
        on = study_day(study)
        ordered = ordered_procedures(session, study_uid, procedures, on)
        if ordered:
            procedures = ordered
        keys = [f"technical|{study_uid}|{p.key}" for p in procedures]
        if not _recoded(
            session, study_uid, keys, "ordered" if ordered else "performed", actor, audit
        ):
            return list(
                session.scalars(
                    select(ChargeItem.id)
                    .where(
                        ChargeItem.study_instance_uid == study_uid,
                        ChargeItem.kind == "technical",
                        ChargeItem.status != ENTERED_IN_ERROR,
                    )
                    .order_by(ChargeItem.id)
                )
            )
        ids = []
        for procedure in procedures:
            definition = _find(session, "technical", on, procedure)
            base = {
                "account_fk": account,
                "patient_id": patient.patient_id,
                "issuer_of_patient_id": patient.issuer_of_patient_id,
                "kind": "technical",
                "study_instance_uid": study_uid,
                "service_kind": "study",
                "service_uid": study_uid,
                "performer": None,
                "occurred_on": on,
                **_procedure_columns(procedure),
            }
            ids.append(
                _capture(
                    session,
                    settings,
                    key=f"technical|{study_uid}|{procedure.key}",
                    base=base,
                    definition=definition,
                    missing=f"no technical price for {procedure.label} on {on.isoformat()}",
                    actor=actor,
                    audit=audit,
                )
            )
        return ids


def capture_professional(
    archive: Archive,
    settings: Settings,
    study_uid: str,
    actor: str = "stable-study",
    audit: AuditEvent | None = None,
) -> list[int]:
    """One professional charge per signed report of the study: every current (not superseded)
    VERIFIED report document, keyed by its root UID (amending or signing it again never
    charges twice), performed by its verifying observer on its verification date, priced
    as the ordered procedure when the study was made for an order whose code the price list
    prices for reading on that date, else as the study's first procedure (else planned for
    review)."""
    with archive.db.write_session() as session:
        found = _study_and_patient(session, study_uid)
        if found is None:
            return []
        study, patient = found
        reports = session.scalars(
            select(ReportDocument)
            .where(
                ReportDocument.study_fk == study.id,
                ReportDocument.superseded.is_(False),
                ReportDocument.verification_flag == "VERIFIED",
            )
            .order_by(ReportDocument.id)
        ).all()
        if not reports:
            return []
        procedures = study_procedures(session, study_uid)
        first = procedures[0] if procedures else None
        account = _account(session, patient)
        ids = []
        for report in reports:
            signed = report.verification_datetime or report.content_datetime
            on = signed.date() if signed is not None else study_day(study)
            # The first ordered code the price list prices for reading, else the series'.
            readings = ordered_procedures(session, study_uid, procedures, on, "professional")
            procedure = readings[0] if readings else first
            definition = _find(session, "professional", on, procedure) if procedure else None
            missing = (
                f"no professional price for {procedure.label} on {on.isoformat()}"
                if procedure
                else "no performed procedure in the study to price its reading by"
            )
            base = {
                "account_fk": account,
                "patient_id": patient.patient_id,
                "issuer_of_patient_id": patient.issuer_of_patient_id,
                "kind": "professional",
                "study_instance_uid": study_uid,
                "service_kind": "report",
                "service_uid": report.root_uid,
                "performer": report.verifying_observer,
                "occurred_on": on,
                **(
                    _procedure_columns(procedure)
                    if procedure
                    else {"display": report.title_meaning or "report", "conditions": []}
                ),
            }
            ids.append(
                _capture(
                    session,
                    settings,
                    key=f"professional|{report.root_uid}",
                    base=base,
                    definition=definition,
                    missing=missing,
                    actor=actor,
                    audit=audit,
                )
            )
        return ids


def _change(
    session: Session, charge: ChargeItem, changes: dict[str, Any], actor: str, reason: str
) -> None:
    for name, value in changes.items():
        setattr(charge, name, value)
    charge.version += 1
    charge.updated_at = datetime.now(UTC)
    session.flush()
    announce_charge_change(session, charge)
    _event(
        session,
        charge.id,
        {
            "version": charge.version,
            "status": charge.status,
            "net": charge.net,
            "total": charge.total,
        },
        actor,
        reason,
    )


def reprice_planned(
    archive: Archive,
    settings: Settings,
    actor: str = "reprice",
    audit: AuditEvent | None = None,
) -> int:
    """Price every planned charge again with the definitions now in force on its day; those
    that find one become billable (taxed at ``billing.tax_percent`` where the definition has
    no tax of its own; the currency comes with the definition). Returns how many did.
    ``audit``: the caller's audit event, a copy recorded for each charge priced, in the same
    transaction."""
    count = 0
    with archive.db.write_session() as session:
        planned = session.scalars(
            select(ChargeItem)
            .where(ChargeItem.status == PLANNED)
            .order_by(ChargeItem.id)
            .with_for_update(skip_locked=True)
        ).all()
        for charge in planned:
            if charge.modality is None and charge.code is None:
                continue  # nothing to price it by (a reading of a study without images)
            procedure = Procedure(
                key="",
                display=charge.display,
                code_system=charge.code_system,
                code=charge.code,
                modality=charge.modality,
                body_part=charge.body_part,
                laterality=charge.laterality,
                contrast=bool(charge.contrast),
            )
            definition = _find(session, charge.kind, charge.occurred_on, procedure)
            if definition is None:
                continue
            priced = _priced(definition, charge.conditions, settings)
            _change(
                session,
                charge,
                {**priced, "status": BILLABLE, "review_reason": None},
                actor,
                f"priced by definition {definition.id}",
            )
            _audit_capture(
                session,
                audit,
                charge.id,
                {"patient_id": charge.patient_id, "study_instance_uid": charge.study_instance_uid},
            )
            count += 1
    return count


def void_study(
    archive: Archive,
    study_uid: str,
    actor: str,
    reason: str = "study deleted",
    *,
    audit: AuditEvent | None = None,
) -> int:
    """The study's open (planned or billable) charges become entered-in-error, each with a
    charge event saying why. Returns how many. A ``billed`` charge (on an issued invoice) is
    left as it is: it is corrected by a credit (``billing.invoices.credit_charge``).
    ``audit``: the caller's event, recorded for each charge voided (the charge, its patient and
    study) in the same transaction."""
    with archive.db.write_session() as session:
        charges = session.scalars(
            select(ChargeItem)
            .where(
                ChargeItem.study_instance_uid == study_uid,
                ChargeItem.status.in_(OPEN_STATUSES),
            )
            .order_by(ChargeItem.id)
            .with_for_update()
        ).all()
        _void(session, charges, actor, reason, audit)
        return len(charges)


# --- reading -------------------------------------------------------------------------------


def list_charges(
    archive: Archive,
    *,
    study: str | None = None,
    patient: str | None = None,
    status: str | None = None,
) -> list[ChargeItem]:
    query = select(ChargeItem)
    if study:
        query = query.where(ChargeItem.study_instance_uid == study)
    if patient:
        query = query.where(ChargeItem.patient_id == patient)
    if status:
        query = query.where(ChargeItem.status == status)
    with archive.db.session() as session:
        return list(session.scalars(query.order_by(ChargeItem.id)).all())


def charge_events(archive: Archive, charge_id: int) -> list[ChargeEvent]:
    with archive.db.session() as session:
        return list(
            session.scalars(
                select(ChargeEvent)
                .where(ChargeEvent.charge_fk == charge_id)
                .order_by(ChargeEvent.version)
            ).all()
        )


def charge_json(charge: ChargeItem) -> dict[str, Any]:
    def money(value: Any) -> str | None:
        return None if value is None else str(value)

    return {
        "id": charge.id,
        "account": charge.account_fk,
        "patient_id": charge.patient_id,
        "issuer_of_patient_id": charge.issuer_of_patient_id,
        "kind": charge.kind,
        "status": charge.status,
        "study": charge.study_instance_uid,
        "service": {"kind": charge.service_kind, "uid": charge.service_uid},
        "definition": charge.definition_fk,
        "code_system": charge.code_system,
        "code": charge.code,
        "display": charge.display,
        "performer": charge.performer,
        "occurred_on": charge.occurred_on.isoformat(),
        "conditions": charge.conditions,
        "lines": charge.lines,
        "net": money(charge.net),
        "tax": money(charge.tax),
        "total": money(charge.total),
        "currency": charge.currency,
        "review_reason": charge.review_reason,
        "version": charge.version,
    }
