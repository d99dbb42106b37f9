"""The audit trail: who accessed or changed which PHI, from where, how, with what outcome, when.

A protocol-neutral record (DESIGN.md): the edges describe each access as an :class:`AuditEvent`
and the archive keeps it in the ``audit_event`` table. The columns follow DICOM PS3.15 A.5
(Audit Trail Message Format) and FHIR R4 AuditEvent, so both views are built from a row:

- ``type_code`` / ``subtype_code``: EventID / EventTypeCode, codes of the DICOM Controlled
  Terminology (PS3.16 Annex D, "DCM"), :data:`EVENT_TYPES`;
- ``action``: EventActionCode (PS3.15 A.5.1, FHIR ``audit-event-action``): C, R, U, D, E;
- ``outcome``: EventOutcomeIndicator (0 success, 4 minor failure, 8 serious failure, 12 major
  failure);
- ``agent``: the requesting ActiveParticipant (``user:NAME``, ``client:NAME``, ``ae:TITLE``,
  ``os:LOGIN``), ``agent_address`` its network address;
- ``source``: the edge that served the request (:data:`SOURCES`);
- ``patient_id``, ``study_uid``, ``entity`` and ``query``: the ParticipantObjects.

Writes (an ingest, a FHIR write, a deletion) record their event with :func:`record` inside their
own transaction: the change and its audit commit or roll back together. Reads have no
transaction of their own: :meth:`AuditLog.submit` queues their events for a background thread
that writes them in batches (one INSERT statement per batch, off the request's path).

The table is append-only for the application: nothing here or in any API updates a row, and
the only deletion is :meth:`AuditLog.prune` of events older than ``audit.retention_days``. A
database trigger (migration 0012) refuses every UPDATE, on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    delete,
    insert,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from archive.db import Database
from archive.models import Base, Patient, Study

log = logging.getLogger(__name__)

# EventID and EventTypeCode values (PS3.15 A.5.3; the codes are PS3.16 Annex D "DCM").
EVENT_TYPES: dict[str, str] = {
    "110100": "Application Activity",
    "110101": "Audit Log Used",
    "110102": "Begin Transferring DICOM Instances",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110105": "DICOM Study Deleted",
    "110106": "Export",
    "110107": "Import",
    "110108": "Network Entry",
    "110109": "Order Record",
    "110110": "Patient Record",
    "110111": "Procedure Record",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
    # EventTypeCodes
    "110120": "Application Start",
    "110121": "Application Stop",
    "110122": "Login",
    "110123": "Logout",
    "110128": "Network Configuration",
    "110129": "Security Configuration",
    "110131": "Software Configuration",
    "110137": "User security Attributes Changed",
}

ACTIONS = ("C", "R", "U", "D", "E")
"""EventActionCode (PS3.15 A.5.1): Create, Read, Update, Delete, Execute."""

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
"""EventOutcomeIndicator (PS3.15 A.5.1)."""

SOURCES = ("dimse", "dicomweb", "fhir", "admin", "auth", "cli", "jobs")
"""The edges that record events."""


class AuditEventRow(Base):
    """One recorded event (the table behind FHIR AuditEvent and the ATNA export)."""

    __tablename__ = "audit_event"
    __table_args__ = (
        Index("ix_audit_event_recorded", "recorded"),
        Index("ix_audit_event_patient_id", "patient_id"),
        Index("ix_audit_event_study_uid", "study_uid"),
        Index("ix_audit_event_agent", "agent"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    recorded: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    action: Mapped[str] = mapped_column(String(1), nullable=False)
    type_code: Mapped[str] = mapped_column(String(16), nullable=False)
    subtype_code: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    outcome_text: Mapped[str | None] = mapped_column(String(255))
    agent: Mapped[str] = mapped_column(String(128), nullable=False)
    agent_address: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    entity: Mapped[str | None] = mapped_column(String(255))
    query: Mapped[str | None] = mapped_column(Text)


class AuditExportRow(Base):
    """Where an export of the audit trail stands, one row per destination (``syslog``: the
    IHE ATNA export, ``pacsbridge.atna``): the id of the last event it has sent (``cursor``)
    and the lease of the process that exports now (``locked_by`` until ``locked_until``).
    Kept in the index, so that an export resumes where it stopped whichever process runs it."""

    __tablename__ = "audit_export"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), nullable=False
    )
    locked_by: Mapped[str | None] = mapped_column(String(255))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


@dataclass(slots=True)
class AuditEvent:
    """One access or change, as an edge describes it (the row less its id)."""

    action: str
    type_code: str
    agent: str
    source: str
    outcome: int = SUCCESS
    subtype_code: str | None = None
    outcome_text: str | None = None
    agent_address: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    entity: str | None = None
    query: str | None = None
    recorded: datetime = field(default_factory=lambda: datetime.now(UTC))
    patient_row: int | None = None
    """The patient's index row (a FHIR Patient id), when only that is known: the writer turns
    it into the Patient ID. Not a column."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"audit action {self.action!r} is not one of {ACTIONS}")
        if self.type_code not in EVENT_TYPES:
            raise ValueError(f"audit event type {self.type_code!r} is not a known DCM code")
        if self.outcome not in (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE):
            raise ValueError(f"audit outcome {self.outcome!r} is not 0, 4, 8 or 12")
        if self.source not in SOURCES:
            raise ValueError(f"audit source {self.source!r} is not one of {SOURCES}")

    def values(self) -> dict[str, Any]:
        """The row's columns, each cut to its column's length, without the control characters
        a path or query may smuggle in (PostgreSQL refuses NUL in text; XML 1.0, which the ATNA
        export writes, refuses C0 controls but tab and line ends)."""
        row = asdict(self)
        del row["patient_row"]
        for name, value in row.items():
            if isinstance(value, str):
                value = _CONTROL.sub("", value)
                limit = _LIMITS.get(name)
                row[name] = value[:limit] if limit is not None else value
        return row


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


_LIMITS = {
    "outcome_text": 255,
    "agent": 128,
    "agent_address": 64,
    "patient_id": 64,
    "study_uid": 64,
    "entity": 255,
    "query": 4096,
}


def outcome_of_status(status: int) -> int:
    """EventOutcomeIndicator of an HTTP status: success below 400, a refused or bad request
    (4xx) a minor failure, a server error a serious one."""
    if status < 400:
        return SUCCESS
    return MINOR_FAILURE if status < 500 else SERIOUS_FAILURE


def record(target: Session | Connection, *events: AuditEvent) -> None:
    """Write events in the caller's transaction: they commit (or roll back) with its change.

    An event that names its patient only by index row (``patient_row``) or by study gets the
    Patient ID read in that same transaction (so a patient or study created by the change is
    found)."""
    if not events:
        return
    for event in events:
        if event.patient_id:
            continue
        if event.patient_row is not None:
            event.patient_id = target.execute(
                select(Patient.patient_id).where(Patient.id == event.patient_row)
            ).scalar()
        if not event.patient_id and event.study_uid:
            event.patient_id = target.execute(
                select(Patient.patient_id)
                .join(Study, Study.patient_fk == Patient.id)
                .where(Study.study_instance_uid == event.study_uid)
            ).scalar()
    target.execute(insert(AuditEventRow), [e.values() for e in events])


def record_change(
    target: Session | Connection,
    event: AuditEvent | None,
    *,
    entity: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
) -> None:
    """Record the audit event a caller gave a domain write (None: none given), in the write's
    transaction, naming what the write knows and the caller did not: the changed resource
    (``entity``, when the event names none or only its type), its patient and its study."""
    if event is None:
        return
    if entity and (not event.entity or "/" not in event.entity):
        event.entity = entity
    event.patient_id = event.patient_id or patient_id
    event.study_uid = event.study_uid or study_uid
    record(target, event)


class StudyEvents:
    """One event per study for a batch of ingests (a STOW-RS request, an import), each
    committed in the index transaction of the batch's first instance of its study (DICOM
    PS3.15 A.5.3.4 / A.5.3.7 describe one event per study, not per instance).

    ``make(study_uid, patient_id)`` builds a study's event. :meth:`for_ingest` gives one ingest
    its ``audit`` (the event when it is the first of its study, else None) and what to call once
    it is over; a study whose carrier failed is claimed again by the next instance of it.
    :meth:`unrecorded` names the stored studies no committed transaction recorded (instances
    of it stored concurrently with a carrier that failed, or only copies of held instances):
    the edge records those after the fact."""

    def __init__(self, make: Callable[[str, str | None], AuditEvent]) -> None:
        self.make = make
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        self.recorded: set[str] = set()

    def for_ingest(
        self,
    ) -> tuple[Callable[[str, str], AuditEvent | None], Callable[[bool], None]]:
        claimed: list[str] = []

        def event(study_uid: str, patient_id: str) -> AuditEvent | None:
            with self._lock:
                if study_uid in self._claimed:
                    return None
                self._claimed.add(study_uid)
            claimed.append(study_uid)
            return self.make(study_uid, patient_id or None)

        def done(audited: bool) -> None:
            if not claimed:
                return
            with self._lock:
                if audited:
                    self.recorded.add(claimed[0])
                else:
                    self._claimed.discard(claimed[0])

        return event, done

    def unrecorded(self, stored: Iterable[str]) -> list[str]:
        with self._lock:
            return sorted({s for s in stored if s} - self.recorded)


def os_user() -> str:
    """``os:LOGIN`` of the process (the agent of command-line changes)."""
    try:
        import pwd

        return f"os:{pwd.getpwuid(os.getuid()).pw_name}"
    except (ImportError, KeyError):
        return f"os:{os.getuid()}"


class AuditLog:
    """The audit trail of one index: in-transaction records, a queue for reads, retention.

    :meth:`submit` does not block and does not touch the database on the caller's thread
    (unless ``max_queued`` events are waiting already: the caller then writes its own): a
    background thread (started on first use, again in a forked child) writes what is queued
    as soon as it can, up to ``batch_size`` events in one INSERT (under load, the events that
    arrive while one batch is written make the next). While the index cannot be written the
    events wait in memory and the thread tries again. :meth:`close` writes what is left. What a
    crash (a killed process, a power loss) can lose are the events still queued: those of the
    requests of the last moments (milliseconds when the index keeps up); the events recorded
    with :func:`record` are in their change's transaction and never lost without it.
    """

    def __init__(
        self,
        db: Database,
        *,
        retention_days: int = 2190,
        flush_interval: float = 0.25,
        batch_size: int = 500,
        max_queued: int = 100_000,
    ) -> None:
        self.db = db
        self.retention_days = retention_days
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_queued = max_queued
        self._queue: queue.SimpleQueue[AuditEvent | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False
        self._flushed = threading.Condition()
        self._pending = 0
        self._prune_interval: float | None = None
        self._next_prune = 0.0

    # --- writing ---------------------------------------------------------------------------
    def submit(self, event: AuditEvent) -> None:
        """Queue an event for the background writer (reads, and changes made elsewhere). With
        ``max_queued`` events waiting already (the index is slow or away), the caller writes
        its own now instead (it waits for the index: :meth:`full` tells an event loop to call
        from a worker thread), so that memory stays bounded. An event that cannot be written
        then is logged whole, at ERROR, as the one record left of it."""
        if self._closed:
            self.write([event])
            return
        self._ensure_thread()
        with self._flushed:
            full = self._pending >= self.max_queued
            if not full:
                self._pending += 1
        if not full:
            self._queue.put(event)
            return
        try:
            self.write([event])
        except Exception:
            log.exception(
                "audit event not written: the queue is full and the index refuses it",
                extra={"audit_event": asdict(event)},
            )

    def full(self) -> bool:
        """Whether :meth:`submit` would write on the caller's thread (``max_queued`` events
        wait already)."""
        return self._pending >= self.max_queued

    def write(self, events: Sequence[AuditEvent]) -> None:
        """Write events now, in a transaction of their own."""
        if not events:
            return
        try:
            self._fill_patients(events)
        except Exception:  # the events are written all the same, without the Patient ID
            log.exception("audit events: patients not looked up")
        with self.db.write_connection() as conn:
            record(conn, *events)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event submitted so far is written (tests, shutdown)."""
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending == 0, timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            if self._pid and self._pid != os.getpid():  # a forked child: a queue of its own
                self._queue = queue.SimpleQueue()
                self._flushed = threading.Condition()
                self._pending = 0
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            self._prune_due()
            batch: list[AuditEvent] = []
            try:
                item = self._queue.get(timeout=self.flush_interval)
            except queue.Empty:
                continue
            if item is None:
                stop = True
            else:
                batch.append(item)
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._write_batch(batch)

    def _write_batch(self, batch: list[AuditEvent]) -> None:
        if not batch:
            return
        attempt = 0
        while True:  # the index is away (a restart, a full disk): wait for it
            try:
                self.write(batch)
                break
            except Exception:
                attempt += 1
                if self._closed and attempt >= 3:
                    log.exception("audit events lost at shutdown", extra={"events": len(batch)})
                    break
                if attempt == 1 or attempt % 20 == 0:
                    log.exception("audit events not written yet", extra={"events": len(batch)})
                threading.Event().wait(min(0.5 * 2 ** min(attempt, 4), 5.0))
        with self._flushed:
            self._pending -= len(batch)
            self._flushed.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the writer thread."""
        self._closed = True
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None

    def _fill_patients(self, events: Sequence[AuditEvent]) -> None:
        """The Patient ID of events that name only a study (a WADO-RS URL, a C-MOVE by Study
        Instance UID) or a patient's index row (a FHIR Patient id): one query each per
        batch."""
        rows = {e.patient_row for e in events if e.patient_row is not None and not e.patient_id}
        studies = {e.study_uid for e in events if e.study_uid and not e.patient_id}
        if not rows and not studies:
            return
        by_row: dict[int, str] = {}
        by_study: dict[str, str] = {}
        with self.db.session() as session:
            if rows:
                by_row = {
                    row_id: pid
                    for row_id, pid in session.execute(
                        select(Patient.id, Patient.patient_id).where(Patient.id.in_(rows))
                    )
                }
            if studies:
                by_study = {
                    uid: pid
                    for uid, pid in session.execute(
                        select(Study.study_instance_uid, Patient.patient_id)
                        .join(Patient, Study.patient_fk == Patient.id)
                        .where(Study.study_instance_uid.in_(studies))
                    )
                }
        for event in events:
            if event.patient_id:
                continue
            if event.patient_row is not None:
                event.patient_id = by_row.get(event.patient_row)
            if not event.patient_id and event.study_uid:
                event.patient_id = by_study.get(event.study_uid)

    # --- retention -------------------------------------------------------------------------
    def keep_pruned(self, interval: float = 3600.0) -> None:
        """Prune now and then every ``interval`` seconds, in the writer's thread (the
        processes that run jobs call this: the periodic maintenance of ``pacsbridge serve``
        and ``pacsbridge worker``)."""
        self._prune_interval = interval
        self._next_prune = 0.0
        self._ensure_thread()

    def _prune_due(self) -> None:
        if self._prune_interval is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self._prune_interval
        try:
            self.prune()
        except Exception:
            log.exception("pruning audit events failed; retrying at the next interval")

    def prune(self, now: datetime | None = None) -> int:
        """Delete events older than the retention period; the number deleted. The one
        deletion of audit events there is."""
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.retention_days)
        with self.db.write_connection() as conn:
            deleted = conn.execute(
                delete(AuditEventRow).where(AuditEventRow.recorded < cutoff)
            ).rowcount
        if deleted:
            log.info("audit events pruned", extra={"deleted": deleted, "before": cutoff})
        return int(deleted or 0)

    # --- reading ---------------------------------------------------------------------------
    def since(self, after_id: int, limit: int = 500) -> list[tuple[int, AuditEvent]]:
        """Events with an id above ``after_id``, oldest first (the export's catch-up)."""
        with self.db.session() as session:
            rows = session.scalars(
                select(AuditEventRow)
                .where(AuditEventRow.id > after_id)
                .order_by(AuditEventRow.id)
                .limit(limit)
            ).all()
        return [(row.id, event_of_row(row)) for row in rows]


def event_of_row(row: AuditEventRow) -> AuditEvent:
    recorded = row.recorded if row.recorded.tzinfo else row.recorded.replace(tzinfo=UTC)
    return AuditEvent(
        action=row.action,
        type_code=row.type_code,
        agent=row.agent,
        source=row.source,
        outcome=row.outcome,
        subtype_code=row.subtype_code,
        outcome_text=row.outcome_text,
        agent_address=row.agent_address,
        patient_id=row.patient_id,
        study_uid=row.study_uid,
        entity=row.entity,
        query=row.query,
        recorded=recorded,
    )
