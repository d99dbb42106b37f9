"""Orders: imaging orders as scheduled procedure steps, and the steps modalities performed.

An EHR's order (FHIR ServiceRequest) is one Requested Procedure with one Scheduled Procedure
Step (PS3.3 C.4.10 / C.4.11, the Modality Worklist attributes of PS3.4 K.6.1): the rows of
:class:`ImagingOrder` are what the worklist C-FIND matches on. A modality's Modality Performed
Procedure Step (PS3.4 F.7, N-CREATE / N-SET) is one :class:`PerformedProcedureStep`, tied to the
orders it names (Accession Number, Requested Procedure ID, Study Instance UID of the items of its
Scheduled Step Attributes Sequence; :class:`PerformedStepOrder`).

The archive knows no protocol: the FHIR edge turns a ServiceRequest into these rows, the DICOM
edge turns them into worklist items and takes MPPS into them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from archive.models import CS, DA, LO, PN, SH, TM, UI, Base, DicomJson

#: FHIR ServiceRequest.status (R4 request-status value set).
ORDER_STATUSES = (
    "draft",
    "active",
    "on-hold",
    "revoked",
    "completed",
    "entered-in-error",
    "unknown",
)
#: Scheduled Procedure Step Status (0040,0020), PS3.3 C.4.10 (defined terms).
STEP_STATUSES = ("SCHEDULED", "ARRIVED", "READY", "STARTED", "COMPLETED", "DISCONTINUED")
#: Performed Procedure Step Status (0040,0252), PS3.3 C.4.14.
PERFORMED_STATUSES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")
#: Order statuses whose step is on the worklist.
ON_WORKLIST = ("active", "on-hold")


class ImagingOrder(Base):
    """One imaging order: a ServiceRequest as received, and its scheduled procedure step.

    ``document`` is the FHIR resource as last written (its versions in
    :class:`ImagingOrderVersion`); the columns hold what the worklist matches on and returns.
    """

    __tablename__ = "imaging_order"
    __table_args__ = (
        CheckConstraint(
            "status IN ('draft', 'active', 'on-hold', 'revoked', 'completed', "
            "'entered-in-error', 'unknown')",
            name="ck_imaging_order_status",
        ),
        Index("ix_imaging_order_worklist", "status", "scheduled_start_date"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    """The ServiceRequest's logical id."""
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    intent: Mapped[str] = mapped_column(String(16), nullable=False)
    priority: Mapped[str | None] = mapped_column(String(16))
    """FHIR request-priority (routine, urgent, asap, stat)."""
    patient_fk: Mapped[int] = mapped_column(
        ForeignKey("patient.id", ondelete="CASCADE"), nullable=False, index=True
    )
    accession_number: Mapped[str] = mapped_column(SH, nullable=False, unique=True)
    issuer_of_accession_number: Mapped[str | None] = mapped_column(LO)
    requested_procedure_id: Mapped[str] = mapped_column(SH, nullable=False, index=True)
    scheduled_procedure_step_id: Mapped[str] = mapped_column(SH, nullable=False)
    study_instance_uid: Mapped[str] = mapped_column(UI, nullable=False, unique=True)
    """Pre-assigned (PS3.4 K.6.1.2.2 Study Instance UID of the Requested Procedure); moved to
    the study that arrived for the order when its images carry another."""
    procedure_scheme: Mapped[str | None] = mapped_column(String(64))
    """The ordered code's system (a URI, as FHIR gives it)."""
    procedure_code: Mapped[str | None] = mapped_column(String(64), index=True)
    procedure_display: Mapped[str | None] = mapped_column(LO)
    modality: Mapped[str | None] = mapped_column(CS, index=True)
    scheduled_station_ae_title: Mapped[str | None] = mapped_column(String(16), index=True)
    scheduled_station_name: Mapped[str | None] = mapped_column(SH)
    scheduled_start_date: Mapped[str | None] = mapped_column(DA)
    scheduled_start_time: Mapped[str | None] = mapped_column(TM)
    scheduled_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """``occurrence[x]`` as an instant (the start of a period)."""
    step_status: Mapped[str] = mapped_column(CS, nullable=False, default="SCHEDULED")
    requester: Mapped[str | None] = mapped_column(String(255))
    """The requester's reference (``Practitioner/…``) or display."""
    requesting_physician: Mapped[str | None] = mapped_column(PN)
    reason: Mapped[str | None] = mapped_column(Text)
    """reasonCode texts, joined (Reason for the Requested Procedure)."""
    document: Mapped[dict] = mapped_column(DicomJson, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ImagingOrderVersion(Base):
    """Every version of an order's ServiceRequest as written (FHIR vread and _history)."""

    __tablename__ = "imaging_order_version"
    __table_args__ = (UniqueConstraint("order_fk", "version"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_fk: Mapped[int] = mapped_column(
        ForeignKey("imaging_order.id", ondelete="CASCADE"), nullable=False, index=True
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    document: Mapped[dict] = mapped_column(DicomJson, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class PerformedProcedureStep(Base):
    """One Modality Performed Procedure Step (PS3.4 F.7), as N-CREATE and N-SET left it.

    ``dataset`` is the step's attributes as DICOM JSON (PS3.18 F.2): N-CREATE's, with each
    N-SET's applied. The columns are what the order and the FHIR ``Procedure`` need.
    """

    __tablename__ = "performed_procedure_step"
    __table_args__ = (
        CheckConstraint(
            "status IN ('IN PROGRESS', 'COMPLETED', 'DISCONTINUED')",
            name="ck_performed_procedure_step_status",
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UI, nullable=False, unique=True)
    order_fk: Mapped[int | None] = mapped_column(
        ForeignKey("imaging_order.id", ondelete="SET NULL"), index=True
    )
    patient_fk: Mapped[int | None] = mapped_column(
        ForeignKey("patient.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(CS, nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    study_instance_uid: Mapped[str | None] = mapped_column(UI, index=True)
    accession_number: Mapped[str | None] = mapped_column(SH, index=True)
    requested_procedure_id: Mapped[str | None] = mapped_column(SH)
    scheduled_procedure_step_id: Mapped[str | None] = mapped_column(SH)
    performed_procedure_step_id: Mapped[str | None] = mapped_column(SH)
    modality: Mapped[str | None] = mapped_column(CS)
    station_ae_title: Mapped[str | None] = mapped_column(String(16))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    start_date: Mapped[str | None] = mapped_column(DA)
    start_time: Mapped[str | None] = mapped_column(TM)
    end_date: Mapped[str | None] = mapped_column(DA)
    end_time: Mapped[str | None] = mapped_column(TM)
    procedure_scheme: Mapped[str | None] = mapped_column(String(64))
    procedure_code: Mapped[str | None] = mapped_column(String(64))
    procedure_display: Mapped[str | None] = mapped_column(LO)
    discontinuation_reason: Mapped[str | None] = mapped_column(LO)
    dataset: Mapped[dict] = mapped_column(DicomJson, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PerformedStepOrder(Base):
    """Each order a performed step performed: every one its Scheduled Step Attributes Sequence
    names (the IHE RAD SWF "group case": one acquisition for several Requested Procedures).
    ``PerformedProcedureStep.order_fk`` is the first of them."""

    __tablename__ = "performed_step_order"

    step_fk: Mapped[int] = mapped_column(
        ForeignKey("performed_procedure_step.id", ondelete="CASCADE"), primary_key=True
    )
    order_fk: Mapped[int] = mapped_column(
        ForeignKey("imaging_order.id", ondelete="CASCADE"), primary_key=True, index=True
    )
