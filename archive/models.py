"""The index: patient, study, series, instance (PS3.4 C.6 query/retrieve levels).

Columns hold the attributes C-FIND and QIDO-RS match on (PS3.4 C.6.1.1 / C.6.2.1 required and
optional keys); everything else of an instance is in its DICOM JSON (PS3.18 F.2), stored at ingest
so that metadata requests never re-read the file. Person names are also kept in an upper-cased
``*_search`` column for case-insensitive matching.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so that Alembic migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DicomJson = JSON().with_variant(JSONB(), "postgresql")

# VR lengths (PS3.5 6.2): UI 64, LO 64, SH 16, CS 16, PN 64 per component group, DA 8, TM 16, IS 12.
UI = String(64)
PN = String(324)
LO = String(64)
SH = String(16)
CS = String(16)
DA = String(8)
TM = String(16)


# Ingest caches parent row ids per process; SQLite must never hand a deleted row's id to a new
# row (AUTOINCREMENT), as PostgreSQL sequences never do.
_NEVER_REUSE_IDS = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(LO, nullable=False, index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(LO, nullable=False, default="")
    patient_name: Mapped[str | None] = mapped_column(PN)
    patient_name_search: Mapped[str | None] = mapped_column(PN, index=True)
    patient_birth_date: Mapped[str | None] = mapped_column(DA, index=True)
    patient_sex: Mapped[str | None] = mapped_column(CS)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Demographics an EHR sent (``PatientRecord``): they win over the DICOM header's for the
    # views that show them; the DICOM files are never rewritten. NULL while no record exists.
    # The columns hold the latest record's values in the shape of the DICOM ones, for matching.
    record_version: Mapped[int | None] = mapped_column(Integer)
    record_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    record_name: Mapped[str | None] = mapped_column(PN)
    """The record's official (else first) name as a DICOM PN, ``Family^Given Given…``."""
    record_name_search: Mapped[str | None] = mapped_column(PN, index=True)
    """``record_name`` upper-cased, as ``patient_name_search`` is."""
    record_birth_date: Mapped[str | None] = mapped_column(DA)
    record_sex: Mapped[str | None] = mapped_column(CS)
    """``M``, ``F``, ``O`` (PS3.3 C.7.1.1 Patient's Sex) or ``U`` for unknown."""

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (
        # The stable-study scanner looks only at studies not (yet, or no longer) stable.
        Index(
            "ix_study_updated_at_unstable",
            "updated_at",
            postgresql_where=text("stable_at IS NULL"),
            sqlite_where=text("stable_at IS NULL"),
        ),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UI, nullable=False, unique=True)
    patient_fk: Mapped[int] = mapped_column(
        ForeignKey("patient.id", ondelete="CASCADE"), nullable=False, index=True
    )
    study_date: Mapped[str | None] = mapped_column(DA, index=True)
    study_time: Mapped[str | None] = mapped_column(TM)
    accession_number: Mapped[str | None] = mapped_column(SH, index=True)
    study_id: Mapped[str | None] = mapped_column(SH)
    study_description: Mapped[str | None] = mapped_column(LO)
    referring_physician_name: Mapped[str | None] = mapped_column(PN)
    referring_physician_name_search: Mapped[str | None] = mapped_column(PN)
    institution_name: Mapped[str | None] = mapped_column(LO)
    specific_character_set: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    """When the last instance of the study arrived (stable-study detection)."""
    stable_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the study was declared stable; ingest resets it to NULL when the study grows."""
    version_floor: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    """With the study's instance row ids, its version: ``max(newest instance row id * 2**20,
    version_floor)`` (``archive.ingest.VERSION_STEP``). Row ids only grow, so a new instance
    raises it; a delete or an overwrite sets the floor one above the version it had and above
    the archive's newest row id * 2**20, so they raise it too, and so does the next instance."""
    changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When instances of the study were last deleted or overwritten (additions are
    ``updated_at``, which also drives stable-study detection and so is not moved by these)."""

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UI, nullable=False, unique=True)
    study_fk: Mapped[int] = mapped_column(
        ForeignKey("study.id", ondelete="CASCADE"), nullable=False, index=True
    )
    modality: Mapped[str | None] = mapped_column(CS, index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(LO)
    body_part_examined: Mapped[str | None] = mapped_column(CS)
    series_date: Mapped[str | None] = mapped_column(DA)
    series_time: Mapped[str | None] = mapped_column(TM)
    protocol_name: Mapped[str | None] = mapped_column(LO)
    station_name: Mapped[str | None] = mapped_column(SH)
    manufacturer: Mapped[str | None] = mapped_column(LO)
    performed_procedure_step_start_date: Mapped[str | None] = mapped_column(DA)
    performed_procedure_step_start_time: Mapped[str | None] = mapped_column(TM)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (
        Index("ix_instance_series_fk_instance_number", "series_fk", "instance_number"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UI, nullable=False, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UI, nullable=False, index=True)
    series_fk: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), nullable=False
    )
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    content_date: Mapped[str | None] = mapped_column(DA)
    content_time: Mapped[str | None] = mapped_column(TM)
    transfer_syntax_uid: Mapped[str] = mapped_column(UI, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    blob_key: Mapped[str] = mapped_column(Text, nullable=False)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    """Who sent it (Calling AE Title for DIMSE; empty for imports)."""
    dicom_json: Mapped[dict] = mapped_column(DicomJson, nullable=False)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    series: Mapped[Series] = relationship(back_populates="instances")


class Peer(Base):
    """A remote DICOM AE (a C-MOVE destination; a calling AE title granted the DIMSE services
    of ``permissions``) created over the REST API (``/api/peers``).

    Peers declared in the TOML file (``[peers.<name>]``) are not stored here: they come from the
    settings of each process and are read-only over the API (see ``archive.peers``).
    """

    __tablename__ = "peer"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    ae_title: Mapped[str] = mapped_column(String(16), nullable=False, unique=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    port: Mapped[int] = mapped_column(Integer, nullable=False)
    permissions: Mapped[str] = mapped_column(
        String(64), nullable=False, server_default="echo,store,find,move,get"
    )
    """The DIMSE services it may use (``archive.peers.PERMISSIONS``), comma-separated."""
    check_host: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    """Its associations must come from an address of ``host``."""
    tls: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    """Associations to it go over TLS (DICOM PS3.15 B.1)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PendingBlobDeletion(Base):
    """Blobs whose index rows are gone; deleted after the commit, retried at start.

    Written in the same transaction that removes the index rows, so that a crash between the
    commit and the blob deletion neither loses the deletion nor lets the start-up reconciler
    bring a deleted instance back.
    """

    __tablename__ = "pending_blob_deletion"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_key: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Job(Base):
    """One unit of background work in the durable queue (see ``archive.jobs``).

    ``failed`` means "failed, will be retried at ``next_run_at``"; ``dead`` means it gave up
    after ``max_attempts``. A ``running`` job is leased to ``locked_by`` until ``locked_until``:
    a worker that dies loses the lease and the job is claimed again once it has expired.
    """

    __tablename__ = "job"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'dead')", name="ck_job_status"
        ),
        Index("ix_job_status_next_run_at", "status", "next_run_at"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    payload: Mapped[dict] = mapped_column(DicomJson, nullable=False)
    study_instance_uid: Mapped[str | None] = mapped_column(UI, index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    locked_by: Mapped[str | None] = mapped_column(String(128))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AIRun(Base):
    """One run of one AI model on one series (the ``ai`` package writes and reads these rows;
    the archive only keeps them, beside the instances the run produced).

    ``input_fingerprint`` identifies the series as the model saw it (its SOP Instance UIDs):
    a study that becomes stable again without a new instance in the series is not run again.
    A newer run of the same model on a changed series supersedes the older one
    (``superseded_by``); the older results stay in the archive.
    """

    __tablename__ = "ai_run"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed')", name="ck_ai_run_status"
        ),
        Index("ix_ai_run_model_series", "model", "series_instance_uid"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(UI, nullable=False, unique=True)
    """A UID of the run: the UIDs of what it produces are derived from it (a repeated run
    after a crash stores the same instances again, never a second copy)."""
    model: Mapped[str] = mapped_column(String(64), nullable=False)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(UI, nullable=False, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UI, nullable=False)
    input_fingerprint: Mapped[str | None] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(16), nullable=False)
    """``stable`` (the stable-study job) or ``manual`` (API, CLI)."""
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict] = mapped_column(DicomJson, nullable=False)
    """Instances produced, per-stage timings, findings (volumes, probabilities)."""
    superseded_by: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PatientRecord(Base):
    """One version of a patient's demographics as an EHR sent them (the document as received).

    A patient often exists in the EHR before any image: the record then creates the patient row
    that the images' Patient ID later finds. Every version is kept; the newest one's searchable
    values are copied onto the patient row (``Patient.record_*``).
    """

    __tablename__ = "patient_record"
    __table_args__ = (UniqueConstraint("patient_fk", "version"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(
        ForeignKey("patient.id", ondelete="CASCADE"), nullable=False, index=True
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    document: Mapped[dict] = mapped_column(DicomJson, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ReportDocument(Base):
    """A structured report document (PS3.3 C.17) of the archive, indexed at ingest from its
    DICOM JSON: the header and document-level content the views of reports match on.

    Versions of one report are chained by Predecessor Documents Sequence (PS3.3 C.17.2.3):
    ``root_uid`` is the SOP Instance UID of the first version, ``version`` counts from 1, and a
    document with a successor in the archive is ``superseded``.
    """

    __tablename__ = "report_document"
    __table_args__ = (
        Index("ix_report_document_root_uid_version", "root_uid", "version"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_fk: Mapped[int] = mapped_column(
        ForeignKey("instance.id", ondelete="CASCADE"), nullable=False, unique=True
    )
    study_fk: Mapped[int] = mapped_column(
        ForeignKey("study.id", ondelete="CASCADE"), nullable=False, index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(UI, nullable=False, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UI, nullable=False)
    root_uid: Mapped[str] = mapped_column(UI, nullable=False)
    predecessor_uid: Mapped[str | None] = mapped_column(UI, index=True)
    """Ingest looks up the versions that name a document as predecessor (out-of-order
    arrival), and deletes which documents are still followed: indexed."""
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    superseded: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    template_id: Mapped[str | None] = mapped_column(String(16))
    """Template Identifier of the root container (``1500``, ``2000``…), when given."""
    title_scheme: Mapped[str | None] = mapped_column(String(16))
    title_code: Mapped[str | None] = mapped_column(String(64), index=True)
    title_meaning: Mapped[str | None] = mapped_column(String(128))
    completion_flag: Mapped[str | None] = mapped_column(CS)
    verification_flag: Mapped[str | None] = mapped_column(CS, index=True)
    content_datetime: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    """Content Date + Time (+ Timezone Offset From UTC; UTC when absent)."""
    verification_datetime: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    verifying_observer: Mapped[str | None] = mapped_column(PN)
    author: Mapped[str | None] = mapped_column(PN)
    """Person Observer Name of the observation context, else Author Observer Sequence."""
    status: Mapped[str | None] = mapped_column(String(16))
    """The status the writing edge asked for, where the flags cannot tell it (a correction
    versus an amendment); NULL for documents received from elsewhere."""
    conclusion: Mapped[str | None] = mapped_column(Text)
    """Impressions / conclusions: the text of the items under the concepts that mean it."""
    narrative: Mapped[str | None] = mapped_column(Text)
    """The document's text items in order, as plain text."""
    algorithm_name: Mapped[str | None] = mapped_column(LO)
    algorithm_version: Mapped[str | None] = mapped_column(LO)
    manufacturer: Mapped[str | None] = mapped_column(LO)
    device_key: Mapped[str | None] = mapped_column(String(32), index=True)
    """A digest of (manufacturer, algorithm name, version): one key per producing device."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ReportMeasurement(Base):
    """One measurement or qualitative evaluation of a report document (TID 300 / TID 1500
    measurement groups, or any NUM / CODE item with a concept name), in document order."""

    __tablename__ = "report_measurement"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_fk: Mapped[int] = mapped_column(
        ForeignKey("report_document.id", ondelete="CASCADE"), nullable=False, index=True
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    concept_scheme: Mapped[str] = mapped_column(String(16), nullable=False)
    concept_code: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    concept_meaning: Mapped[str | None] = mapped_column(String(128))
    value_type: Mapped[str] = mapped_column(String(8), nullable=False)
    """``NUM``, ``CODE`` or ``TEXT`` (PS3.3 C.17.3.2.1)."""
    numeric_value: Mapped[float | None] = mapped_column(Float, index=True)
    unit_code: Mapped[str | None] = mapped_column(String(64))
    """UCUM code of the Measurement Units Code Sequence."""
    unit_meaning: Mapped[str | None] = mapped_column(String(128))
    value_scheme: Mapped[str | None] = mapped_column(String(16))
    value_code: Mapped[str | None] = mapped_column(String(64))
    value_meaning: Mapped[str | None] = mapped_column(String(128))
    text_value: Mapped[str | None] = mapped_column(Text)
    finding_scheme: Mapped[str | None] = mapped_column(String(16))
    finding_code: Mapped[str | None] = mapped_column(String(64))
    finding_meaning: Mapped[str | None] = mapped_column(String(128))
    """The group's Finding (121071, DCM) or Finding Category, when given."""
    site_scheme: Mapped[str | None] = mapped_column(String(16))
    site_code: Mapped[str | None] = mapped_column(String(64))
    site_meaning: Mapped[str | None] = mapped_column(String(128))
    laterality_code: Mapped[str | None] = mapped_column(String(64))
    tracking_uid: Mapped[str | None] = mapped_column(UI)
    tracking_identifier: Mapped[str | None] = mapped_column(LO)
    method_meaning: Mapped[str | None] = mapped_column(String(128))
    referenced: Mapped[dict | None] = mapped_column(DicomJson)
    """Where the measurement was made: ``{"series": uid, "instances": [...],
    "segments": [...]}`` from its image / segmentation references, when given."""


class Tombstone(Base):
    """What was deleted, so that views can answer "gone" (HTTP 410) instead of "never was".

    ``kind`` is ``study`` (key: Study Instance UID) or ``report`` (key: the report's root
    SOP Instance UID); written in the transaction that deletes the rows. A study stored again
    under the same UID is live again: its rows take precedence over its tombstone.
    """

    __tablename__ = "tombstone"
    __table_args__ = (UniqueConstraint("kind", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    key: Mapped[str] = mapped_column(UI, nullable=False)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
