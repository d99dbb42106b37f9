"""What EHRs write: Patients (records of demographics) and DiagnosticReports (stored as DICOM
SR documents in their study, so every PACS viewer sees them: the archive is the one record).

Each write commits its audit event ("Patient Record", DICOM PS3.15 A.5.3.9) in its own
transaction (``fhir_bridge.change_audit``): a patient in the session that stores it, a
report in the ingest transaction of its SR document."""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydicom import Dataset
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from archive.audit import AuditEvent, record
from archive.ingest import IngestError
from archive.models import Instance, Patient, ReportDocument, Series, Study
from fhir_bridge import identity, search
from fhir_bridge.change_audit import change_event, committed
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError
from fhir_bridge.imaging_study import study_uid_of
from fhir_bridge.patient import PatientProvider
from fhir_bridge.provider import Provider
from fhir_bridge.report import DiagnosticReportProvider, fhir_status
from fhir_bridge.report_sr import (
    DIAGNOSTIC_IMAGING_REPORT,
    Code,
    PriorDocument,
    ReportDraft,
    encode,
    write_report,
)

_REPORT_LOCKS = [threading.Lock() for _ in range(64)]


def report_lock_key(resource_id: str) -> int:
    """The PostgreSQL advisory lock key of a report (a signed 64-bit digest of its id)."""
    digest = hashlib.blake2b(f"DiagnosticReport/{resource_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


@contextmanager
def _report_update(ctx: Context, resource_id: str) -> Iterator[None]:
    """Updates of one report take turns, from the If-Match check to the new version stored:
    within the process (a lock), and across the processes of a PostgreSQL deployment (an
    advisory lock on a connection of its own, held while ingest writes on others)."""
    with _REPORT_LOCKS[hash(resource_id) % len(_REPORT_LOCKS)]:
        engine = ctx.archive.db.engine
        if engine.dialect.name != "postgresql":
            yield
            return
        key = report_lock_key(resource_id)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()


_SERIES_NUMBER = 9000
"""Series Number of the report series written here (apart from the modality's series)."""


# --- Patient ------------------------------------------------------------------------------


def create_patient(
    ctx: Context, provider: Provider, body: dict[str, Any], if_none_exist: str | None
) -> tuple[dict[str, Any], int]:
    """Create (201), or with ``If-None-Exist`` answer the one match (200) / refuse several
    (412): http.html#ccreate. A Patient whose identifier is a DICOM Patient ID the archive
    already holds (from images) becomes that patient's record."""
    assert isinstance(provider, PatientProvider)
    if if_none_exist:
        from urllib.parse import parse_qsl

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
                f"If-None-Exist {if_none_exist!r} matches {page.total} patients",
                expression=["If-None-Exist"],
            )
    patient_id, issuer = provider.dicom_key(body)
    for attempt in range(2):
        try:
            with ctx.archive.db.write_session() as session:
                patient = session.scalars(
                    select(Patient).where(
                        Patient.patient_id == patient_id,
                        Patient.issuer_of_patient_id == issuer,
                    )
                ).first()
                if patient is None:
                    patient = Patient(
                        patient_id=patient_id,
                        issuer_of_patient_id=issuer,
                        created_at=datetime.now(UTC),
                    )
                    session.add(patient)
                    session.flush()
                elif patient.record_version is not None:
                    raise FHIRError(
                        409,
                        f"Patient/{patient.id} already holds identifier "
                        f"{identity.system_for_issuer(provider.fhir, issuer)}|{patient_id}: "
                        "update it (PUT) instead",
                        code="duplicate",
                        expression=["Patient.identifier"],
                    )
                provider.store(session, patient, body)
                row_id = patient.id
                event = change_event(ctx.audit, f"Patient/{row_id}", patient_id=patient.patient_id)
                if event is not None:
                    record(session, event)
            break
        except IntegrityError:
            if attempt:
                raise
    committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, str(row_id)), 201


def update_patient(
    ctx: Context,
    provider: Provider,
    resource_id: str,
    body: dict[str, Any],
    check: Callable[[str], None],
) -> dict[str, Any]:
    assert isinstance(provider, PatientProvider)
    row_id = search.row_id(resource_id)
    with ctx.archive.db.write_session() as session:
        # Locked until the new version is written: concurrent updates take turns (If-Match).
        patient = session.get(Patient, row_id, with_for_update=True) if row_id is not None else None
        if patient is None:
            raise FHIRError(
                405,
                f"Patient/{resource_id} does not exist and this server does not create "
                "resources with client-assigned ids: POST the Patient",
                code="not-supported",
            )
        check(str(patient.record_version or 1))
        key = provider.dicom_key(body)
        if key != (patient.patient_id, patient.issuer_of_patient_id):
            raise FHIRError(
                422,
                "Patient.identifier: the DICOM Patient ID of a patient cannot change "
                f"(it is {identity.system_for_issuer(provider.fhir, patient.issuer_of_patient_id)}"
                f"|{patient.patient_id})",
                code="business-rule",
                expression=["Patient.identifier"],
            )
        provider.store(session, patient, body)
        event = change_event(ctx.audit, f"Patient/{patient.id}", patient_id=patient.patient_id)
        if event is not None:
            record(session, event)
    committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, resource_id)


# --- DiagnosticReport -----------------------------------------------------------------------

_CREATE_STATUSES = {"registered", "partial", "preliminary", "final"}
_UPDATE_STATUSES = _CREATE_STATUSES | {"amended", "corrected", "appended"}
_VERIFIED = {"final", "amended", "corrected", "appended"}


def _study_reference(ctx: Context, body: dict[str, Any]) -> str:
    for position, item in enumerate(body.get("imagingStudy") or []):
        reference = item.get("reference") or ""
        if "://" in reference and not reference.startswith(ctx.base + "/"):
            raise FHIRError(
                422,
                f"imagingStudy {reference!r} is on another server: a report is stored in a "
                "study of this archive",
                code="business-rule",
                expression=[f"DiagnosticReport.imagingStudy[{position}]"],
            )
        uid = search.reference_id(reference, "ImagingStudy", ctx.base)
        if uid:
            return study_uid_of(uid)
        raise FHIRError(
            422,
            "imagingStudy must reference ImagingStudy/<Study Instance UID>",
            expression=[f"DiagnosticReport.imagingStudy[{position}]"],
        )
    raise FHIRError(
        422,
        "DiagnosticReport.imagingStudy: name the study the report is about "
        "(ImagingStudy/<Study Instance UID>): the report is stored as an SR in that study",
        code="required",
        expression=["DiagnosticReport.imagingStudy"],
    )


def _text(body: dict[str, Any]) -> str | None:
    """The report text from ``presentedForm`` (text/plain attachments, base64 ``data``)."""
    texts = []
    for position, form in enumerate(body.get("presentedForm") or []):
        content_type = (form.get("contentType") or "").split(";")[0].strip().lower()
        if content_type != "text/plain" or not form.get("data"):
            # Accepted and then lost would be worse than refused: only text is kept (in the
            # SR's Findings); a PDF or a link is not stored here.
            raise FHIRError(
                422,
                "presentedForm: only text/plain with inline data is stored (as the SR's "
                f"text), not {content_type or 'an attachment without contentType'}"
                + ("" if form.get("data") else " without data"),
                code="not-supported",
                expression=[f"DiagnosticReport.presentedForm[{position}]"],
            )
        try:
            data = "".join(str(form["data"]).split())  # base64Binary may hold whitespace
            texts.append(base64.b64decode(data, validate=True).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise FHIRError(
                400,
                f"presentedForm data is not base64 of UTF-8 text: {exc}",
                expression=[f"DiagnosticReport.presentedForm[{position}].data"],
            ) from exc
    return "\n\n".join(texts) or None


def _title(body: dict[str, Any]) -> Code:
    for item in (body.get("code") or {}).get("coding") or []:
        scheme = identity.coding_scheme(item.get("system"))
        if scheme and item.get("code"):
            return Code(scheme, item["code"], (item.get("display") or item["code"])[:64])
    return DIAGNOSTIC_IMAGING_REPORT


def _pn(display: str | None) -> str | None:
    """A DICOM PN from a display name ("Family, Given", "Given Family" or "Family^Given")."""
    if not display:
        return None
    display = display.strip()
    if "^" in display:
        return display
    if "," in display:
        family, _, given = display.partition(",")
        return f"{family.strip()}^{given.strip()}"
    parts = display.split()
    return parts[-1] + ("^" + " ".join(parts[:-1]) if len(parts) > 1 else "")


def _author(body: dict[str, Any]) -> str | None:
    for element in ("resultsInterpreter", "performer"):
        for item in body.get(element) or []:
            reference = item.get("reference") or ""
            if reference.startswith(("Organization/", "CareTeam/")):
                continue
            if item.get("display"):
                return _pn(item["display"])
    return None


def _organization(body: dict[str, Any], fallback: str) -> str:
    for item in body.get("performer") or []:
        if (item.get("reference") or "").startswith("Organization/") and item.get("display"):
            return str(item["display"])[:64]
    return fallback


def _effective(body: dict[str, Any]) -> datetime:
    for name in ("effectiveDateTime", "issued"):
        value = body.get(name)
        if isinstance(value, str) and "T" in value:
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return datetime.now(UTC)


_STUDY_TAGS = {
    "00080005",
    "00100010",
    "00100020",
    "00100021",
    "00100030",
    "00100040",
    "0020000D",
    "00080020",
    "00080030",
    "00200010",
    "00080050",
    "00080090",
    "00081030",
    "00080201",
}


def _study_header(session: Any, study_uid: str) -> tuple[Dataset, list[Dataset], int]:
    """A header with the patient and study attributes (from the study's first instance), the
    study's instances as evidence, and the study row id."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise FHIRError(
            422,
            f"ImagingStudy/{study_uid} is not in the archive",
            code="not-found",
            expression=["DiagnosticReport.imagingStudy[0]"],
        )
    first = session.scalar(
        select(Instance.dicom_json)
        .join(Series, Instance.series_fk == Series.id)
        .where(Series.study_fk == study.id)
        .order_by(Instance.id)
        .limit(1)
    )
    rows = session.execute(
        select(
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Series.series_instance_uid,
            Instance.id,
        )
        .join(Series, Instance.series_fk == Series.id)
        .where(Series.study_fk == study.id)
        .order_by(Instance.id)
    ).all()
    if not rows or first is None:
        raise FHIRError(422, f"ImagingStudy/{study_uid} holds no instances")
    header = Dataset.from_json({tag: first[tag] for tag in first if tag in _STUDY_TAGS})
    header.SeriesInstanceUID = rows[0].series_instance_uid
    header.SOPClassUID = rows[0].sop_class_uid
    header.SOPInstanceUID = rows[0].sop_instance_uid
    evidence = []
    for row in rows:
        if row.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
            continue  # other reports are not the evidence of this one
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.SeriesInstanceUID = row.series_instance_uid
        item.SOPClassUID = row.sop_class_uid
        item.SOPInstanceUID = row.sop_instance_uid
        evidence.append(item)
    return header, evidence, study.id


def _draft(
    ctx: Context,
    body: dict[str, Any],
    status: str,
    evidence: list[Dataset],
    predecessor: PriorDocument | None,
) -> ReportDraft:
    conclusion = (body.get("conclusion") or "").strip() or None
    findings = _text(body)
    if findings and conclusion:
        # presentedForm is the whole report as read back: its findings, then the conclusion
        # (the narrative of the SR). A report written back as it was read holds the
        # conclusion once, not once more with every version.
        if findings.strip() == conclusion:
            findings = None
        elif findings.rstrip().endswith("\n\n" + conclusion):
            findings = findings.rstrip()[: -len(conclusion) - 2].rstrip() or None
    if not conclusion and not findings:
        raise FHIRError(
            422,
            "the report has no text: give conclusion and/or a text/plain presentedForm",
            code="required",
            expression=["DiagnosticReport.conclusion"],
        )
    author = _author(body)
    verified = status in _VERIFIED
    if verified and not author:
        raise FHIRError(
            422,
            f"a {status} report names who verified it: resultsInterpreter (or performer) "
            "with a display name",
            code="required",
            expression=["DiagnosticReport.resultsInterpreter"],
        )
    return ReportDraft(
        title=_title(body),
        conclusion=conclusion,
        findings=findings,
        complete=status not in ("registered", "partial"),
        verified=verified,
        author=author,
        verifier=author if verified else None,
        verifying_organization=_organization(body, ctx.settings.fhir.verifying_organization),
        observed_at=_effective(body),
        predecessor=predecessor,
        evidence=evidence,
    )


def _store(
    ctx: Context,
    header: Dataset,
    draft: ReportDraft,
    *,
    series_uid: str,
    version: int,
    status: str,
    resource_id: str | None = None,
) -> str:
    """Store a report's SR document; its audit event (the request's, on ``resource_id``, the
    new document's id when None) is committed in the document's ingest transaction."""
    sop_uid = f"2.25.{uuid.uuid4().int}"
    event: AuditEvent | None = change_event(
        ctx.audit,
        f"DiagnosticReport/{resource_id or sop_uid}",
        study_uid=str(header.get("StudyInstanceUID", "")) or None,
    )
    dataset = write_report(
        header,
        draft,
        series_instance_uid=series_uid,
        series_number=_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=version,
        manufacturer=ctx.settings.fhir.report_manufacturer,
    )
    try:
        # The status the EHR asked for, where the SR's flags cannot tell it (amended or
        # corrected), is indexed in the transaction that stores the document.
        result = ctx.archive.ingest(encode(dataset), report_status=status, audit=event)
    except IngestError as exc:
        raise FHIRError(
            422 if exc.kind != "out-of-resources" else 503,
            f"the archive refused the report's SR document: {exc.reason}",
        ) from exc
    if result.audited:
        committed(ctx.audit)
    return sop_uid


def _check_subject(session: Any, body: dict[str, Any], study_row: int) -> None:
    reference = (body.get("subject") or {}).get("reference")
    if not reference:
        return
    patient = search.reference_id(reference, "Patient")
    owner = session.scalar(select(Study.patient_fk).where(Study.id == study_row))
    if patient != str(owner):
        raise FHIRError(
            422,
            f"subject {reference!r} is not the patient of the study (Patient/{owner})",
            code="business-rule",
            expression=["DiagnosticReport.subject"],
        )


def create_report(
    ctx: Context, provider: Provider, body: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    assert isinstance(provider, DiagnosticReportProvider)
    status = body.get("status")
    if status not in _CREATE_STATUSES:
        raise FHIRError(
            422,
            f"status {status!r}: a new report is registered, partial, preliminary or final",
            code="business-rule",
            expression=["DiagnosticReport.status"],
        )
    study_uid = _study_reference(ctx, body)
    with ctx.archive.db.session() as session:
        header, evidence, study_row = _study_header(session, study_uid)
        _check_subject(session, body, study_row)
    draft = _draft(ctx, body, status, evidence, None)
    sop_uid = _store(
        ctx, header, draft, series_uid=f"2.25.{uuid.uuid4().int}", version=1, status=status
    )
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, sop_uid), 201


def update_report(
    ctx: Context,
    provider: Provider,
    resource_id: str,
    body: dict[str, Any],
    check: Callable[[str], None],
) -> dict[str, Any]:
    """A new version: a new SR document whose Predecessor Documents Sequence names the current
    one (PS3.3 C.17.2.3): a verified document is never changed, every version is kept."""
    assert isinstance(provider, DiagnosticReportProvider)
    status = body.get("status")
    if status not in _UPDATE_STATUSES:
        raise FHIRError(
            422,
            f"status {status!r}: a report is updated to preliminary, partial, final, amended, "
            "corrected or appended",
            code="business-rule",
            expression=["DiagnosticReport.status"],
        )
    with _report_update(ctx, resource_id):
        with ctx.archive.db.session() as session:
            row = provider.current(session, resource_id)
            current: ReportDocument = row.ReportDocument
            check(str(current.version))
            was = fhir_status(current)
            if was in _VERIFIED and status not in ("amended", "corrected", "appended"):
                raise FHIRError(
                    422,
                    f"the report is {was}: a change of a verified report is amended, corrected "
                    "or appended",
                    code="business-rule",
                    expression=["DiagnosticReport.status"],
                )
            study_uid = (
                _study_reference(ctx, body) if body.get("imagingStudy") else row.study_instance_uid
            )
            if study_uid != row.study_instance_uid:
                raise FHIRError(
                    422,
                    "a report cannot move to another study",
                    expression=["DiagnosticReport.imagingStudy"],
                )
            header, evidence, study_row = _study_header(session, study_uid)
            _check_subject(session, body, study_row)
            series_uid, sop_class = session.execute(
                select(Series.series_instance_uid, Instance.sop_class_uid)
                .join(Instance, Instance.series_fk == Series.id)
                .where(Instance.id == current.instance_fk)
            ).one()
        prior = PriorDocument(study_uid, series_uid, sop_class, current.sop_instance_uid)
        draft = _draft(ctx, body, status, evidence, prior)
        _store(
            ctx,
            header,
            draft,
            series_uid=series_uid,
            version=current.version + 1,
            status=status,
            resource_id=resource_id,
        )
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, resource_id)
