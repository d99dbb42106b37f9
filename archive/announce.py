"""What the archive's own changes announce in the event outbox (:mod:`archive.outbox`).

Each function here writes one event in the transaction of the change it announces, so that
the event exists if and only if the change commits. The FHIR reference of a study is
``ImagingStudy/<Study Instance UID>``: the FHIR edge names an ImagingStudy by its Study
Instance UID (a UID fits the R4 ``id`` type, ``[A-Za-z0-9\\-\\.]{1,64}``), so the archive
computes the reference without knowing the edge. A report's is ``DiagnosticReport/<root SOP
Instance UID>`` (the first version's UID names every version of a report).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from archive.dicom import ParsedInstance
from archive.models import Patient, Study
from archive.outbox import emit, event_values

INSTANCE_STORED_KEYS = list(event_values("instance.stored"))
"""The columns of an outbox row, in the order :func:`instance_stored` gives them."""


def study_reference(study_uid: str) -> str:
    """The FHIR reference of a study's ImagingStudy."""
    return f"ImagingStudy/{study_uid}"


def report_reference(root_uid: str) -> str:
    """The FHIR reference of a report (all its versions): its first version's SOP Instance
    UID."""
    return f"DiagnosticReport/{root_uid}"


def instance_stored(parsed: ParsedInstance, now: datetime) -> dict[str, Any]:
    """The outbox row of an instance stored (or overwritten): built from the parsed header
    alone, without a lookup (it is written on ingest's hot path)."""
    data: dict[str, Any] = {
        "sop_instance_uid": parsed.sop_instance_uid,
        "series_instance_uid": parsed.series_instance_uid,
        "sop_class_uid": parsed.sop_class_uid,
    }
    modality = parsed.series.get("modality")
    if modality:
        data["modality"] = modality
    return event_values(
        "instance.stored",
        study_uid=parsed.study_instance_uid,
        patient_id=parsed.patient.get("patient_id"),
        resource=study_reference(parsed.study_instance_uid),
        data=data,
        now=now,
    )


def _patient_id(conn: Connection, patient_fk: int | None) -> str | None:
    if patient_fk is None:
        return None
    return conn.execute(select(Patient.patient_id).where(Patient.id == patient_fk)).scalar()


def study_stable(
    conn: Connection, study_uid: str, patient_fk: int | None, updated_at: datetime
) -> str:
    """``study.stable``: the study received no instance for the stable age (archive.stable)."""
    return emit(
        conn,
        "study.stable",
        study_uid=study_uid,
        patient_id=_patient_id(conn, patient_fk),
        resource=study_reference(study_uid),
        data={"study_instance_uid": study_uid, "last_instance_at": updated_at.isoformat()},
    )


def study_deleted(conn: Connection, study_uid: str, patient_fk: int | None) -> str:
    """``study.deleted``: the study's last instance was deleted (its tombstone written)."""
    return emit(
        conn,
        "study.deleted",
        study_uid=study_uid,
        patient_id=_patient_id(conn, patient_fk),
        resource=study_reference(study_uid),
        data={"study_instance_uid": study_uid},
    )


def report_indexed(
    conn: Connection,
    *,
    parsed: ParsedInstance,
    study_fk: int,
    root_uid: str,
    version: int,
    status: str,
    amends: bool,
) -> str:
    """``report.final`` for a report whose first final version was indexed, or
    ``report.amended`` for a later final (or amended, corrected) version of a report that
    was final before."""
    patient_fk = conn.execute(select(Study.patient_fk).where(Study.id == study_fk)).scalar()
    return emit(
        conn,
        "report.amended" if amends else "report.final",
        study_uid=parsed.study_instance_uid,
        patient_id=parsed.patient.get("patient_id") or _patient_id(conn, patient_fk),
        resource=report_reference(root_uid),
        data={
            "sop_instance_uid": parsed.sop_instance_uid,
            "series_instance_uid": parsed.series_instance_uid,
            "root_uid": root_uid,
            "version": version,
            "status": status,
        },
    )
