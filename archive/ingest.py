"""Ingest: the one path by which instances enter the archive (C-STORE, STOW-RS, import).

Order of work, so that success means durable and a crash loses nothing it acknowledged:
1. parse the header (no pixel decode) and validate the minimum;
2. write the blob (atomic, fsynced);
3. commit the index rows in one transaction.
A crash after 2 and before 3 leaves an orphan blob that the start-up reconciler indexes; there is
never an index row without its blob.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from archive.announce import INSTANCE_STORED_KEYS, instance_stored, study_deleted
from archive.audit import AuditEvent, AuditEventRow
from archive.blobstore import BlobNotFound, BlobStore, BlobStoreError, OutOfSpace, instance_key
from archive.db import Database, DirectConnection
from archive.dicom import InvalidInstance, ParsedInstance, parse_header, valid_uid
from archive.metrics import observe_ingest
from archive.models import Instance, Patient, PendingBlobDeletion, Series, Study
from archive.outbox import OutboxEvent
from archive.reports import index_report, is_report, retire_reports, tombstone
from config import Settings
from config.settings import dicom_zone

log = logging.getLogger(__name__)


_PATIENT = cast(Table, Patient.__table__)
_STUDY = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCE = cast(Table, Instance.__table__)
_PENDING_DELETION = cast(Table, PendingBlobDeletion.__table__)
_PARENT_CACHE_SIZE = 10_000
_AUDIT_EVENT = cast(Table, AuditEventRow.__table__)
_OUTBOX_EVENT = cast(Table, OutboxEvent.__table__)
_AUDIT_KEYS = [name for name in AuditEvent.__dataclass_fields__ if name != "patient_row"]
# Where an instance is held: (SOP Class UID, Series Instance UID, Study Instance UID, blob key).
_HELD = (
    select(
        _INSTANCE.c.sop_class_uid,
        _SERIES.c.series_instance_uid,
        _STUDY.c.study_instance_uid,
        _INSTANCE.c.blob_key,
    )
    .select_from(
        _INSTANCE.join(_SERIES, _INSTANCE.c.series_fk == _SERIES.c.id).join(
            _STUDY, _SERIES.c.study_fk == _STUDY.c.id
        )
    )
    .where(_INSTANCE.c.sop_instance_uid == bindparam("sop"))
)
# The study a series belongs to.
_SERIES_STUDY = (
    select(_STUDY.c.study_instance_uid)
    .select_from(_SERIES.join(_STUDY, _SERIES.c.study_fk == _STUDY.c.id))
    .where(_SERIES.c.series_instance_uid == bindparam("series"))
)
# A study that grows is no longer stable (archive.stable declares it stable again later).
_FILL_PATIENT = (
    update(_PATIENT)
    .where(
        _PATIENT.c.id == bindparam("patient_fk"),
        _PATIENT.c.record_version.is_not(None),
        _PATIENT.c.patient_name.is_(None),
    )
    .values(
        patient_name=bindparam("patient_name"),
        patient_name_search=bindparam("patient_name_search"),
        patient_birth_date=bindparam("patient_birth_date"),
        patient_sex=bindparam("patient_sex"),
    )
)

_TOUCH_STUDY = (
    update(_STUDY)
    .where(_STUDY.c.id == bindparam("study_fk"))
    .values(updated_at=bindparam("now"), stable_at=None)
)


class _DirectStatement:
    """A Core statement compiled once for the engine's dialect and run on the connection's
    DBAPI cursor, inside the same transaction.

    Ingest runs up to eight small statements per instance. SQLAlchemy's per-execution
    machinery (execution context, events, result objects) costs several times what SQLite
    takes to run each of them; here only the parameters still go through the statement's
    bind processors (JSON, date-times on SQLite), exactly as SQLAlchemy would send them.
    DBAPI errors are raised as SQLAlchemy's (``IntegrityError``, ``DBAPIError``...).
    """

    def __init__(self, statement: Any, engine: Any, keys: list[str]) -> None:
        dialect = engine.dialect
        self._compiled = compiled = statement.compile(dialect=dialect, column_keys=keys)
        self._sql = compiled.string
        self._positions = list(compiled.positiontup) if compiled.positional else None
        self._processors = dict(compiled._bind_processors)
        self._dbapi_error = dialect.loaded_dbapi.Error
        self._dialect = dialect
        # When every bind parameter is a value the caller passes (no literal in the statement),
        # its parameters are the caller's values through their processors, in the driver's
        # order: no need for SQLAlchemy's general construct_params.
        self._plan: list[tuple[str, Any]] | None = None
        if all(
            name == b.key
            and (b.required or b.value is None)
            and b.callable is None
            and not b.expanding
            for name, b in compiled.binds.items()
        ):
            names = self._positions or list(compiled.binds)
            self._plan = [(name, self._processors.get(name)) for name in names]

    def _parameters(self, params: dict[str, Any]) -> Any:
        if self._plan is not None:
            try:
                values = [
                    params[name] if process is None else process(params[name])
                    for name, process in self._plan
                ]
            except KeyError:
                pass  # a missing parameter: SQLAlchemy's message
            else:
                if self._positions is not None:
                    return tuple(values)
                return dict(zip((name for name, _ in self._plan), values, strict=True))
        bound = self._compiled.construct_params(params)
        for name, process in self._processors.items():
            if name in bound:
                bound[name] = process(bound[name])
        return bound if self._positions is None else tuple(bound[n] for n in self._positions)

    def execute(self, conn: Connection | Any, params: dict[str, Any]) -> Any:
        """Run the statement in the transaction of ``conn`` (a SQLAlchemy connection or a DBAPI
        connection of ``Database.direct``); returns the first row (for RETURNING) or
        None."""
        if isinstance(conn, Connection):
            conn = conn.connection.dbapi_connection
        return self._run(conn, params)

    def _run(self, dbapi_connection: Any, params: dict[str, Any]) -> Any:
        parameters = self._parameters(params)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self._sql, parameters)
            return cursor.fetchone() if cursor.description else None
        except self._dbapi_error as exc:
            raise DBAPIError.instance(
                self._sql, parameters, exc, self._dbapi_error, dialect=self._dialect
            ) from exc
        finally:
            cursor.close()


class _NeedsConnection(Exception):
    """Raised inside a direct (DBAPI) index transaction by a step that needs a SQLAlchemy
    connection; the transaction is rolled back and run again on one."""


IndexWriter = Connection | Any
"""A SQLAlchemy connection, or a DBAPI connection of ``Database.direct``."""

IndexListener = Callable[[Connection, ParsedInstance, str], None]
"""``(connection, parsed instance, calling AE title)``, inside the ingest transaction."""

IngestAudit = AuditEvent | Callable[[str, str], AuditEvent | None]
"""The audit event of an ingest, recorded in its index transaction: an event, or a function of
the Study Instance UID and Patient ID read from the header that returns one (or None when the
edge records nothing for this instance, as C-STORE after a study's first instance)."""


class _PendingAudit:
    """The audit event of one ingest and whether the index transaction that committed holds
    it (each attempt of the transaction starts again from ``recorded = False``)."""

    __slots__ = ("event", "recorded")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.recorded = False


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    """Already held; the policy ``keep`` left the stored copy as it was."""
    OVERWRITTEN = "overwritten"


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: IngestOutcome
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size: int
    warning: str | None = None
    """Stored, but the data set does not quite match its SOP Class (DIMSE warning 0xB007,
    PS3.4 B.2.3; STOW-RS WarningReason): why, in words (:attr:`ParsedInstance.warning`)."""
    audited: bool = False
    """The audit event given to :meth:`IngestService.ingest` was committed with the index rows.
    False when none was given, or when no index row changed (a copy of a held instance under
    ``keep``): the edge then records the event by itself."""


class IngestErrorKind(enum.StrEnum):
    CANNOT_UNDERSTAND = "cannot-understand"  # DIMSE 0xC000, STOW FailureReason 0xC000
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported-transfer-syntax"  # DIMSE 0xC000, STOW 0xC122
    DATASET_MISMATCH = "dataset-mismatch"  # DIMSE 0xA900
    CONFLICT = "conflict"  # the SOP Instance UID is held elsewhere: DIMSE and STOW 0x0111
    REFUSED = "refused"  # SOP class refused by configuration: DIMSE 0x0122
    OUT_OF_RESOURCES = "out-of-resources"  # DIMSE 0xA700, HTTP 507/503


class IngestError(Exception):
    def __init__(
        self,
        kind: IngestErrorKind,
        reason: str,
        *,
        sop_class_uid: str = "",
        sop_instance_uid: str = "",
    ) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        #: The instance's UIDs, when its header was read (for the STOW-RS FailedSOPSequence).
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


class _Conflict(Exception):
    """Raised inside an index transaction: the SOP Instance UID is held elsewhere (under the
    blob key ``blob_key``)."""

    def __init__(self, reason: str, blob_key: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.blob_key = blob_key


class _SeriesElsewhere(Exception):
    """Raised inside an index transaction: the Series Instance UID is held in another study
    (``study``, its Study Instance UID, once known)."""

    def __init__(self, study: str = "") -> None:
        super().__init__(study)
        self.study = study


def _series_elsewhere(study: str) -> IngestError:
    return IngestError(
        IngestErrorKind.DATASET_MISMATCH,
        f"Series Instance UID already held in another study: {study}",
    )


def conflict_reason(parsed: ParsedInstance, held: tuple[str, str, str]) -> str | None:
    """Why ``parsed`` cannot be stored as a copy of the instance ``held`` (its SOP Class,
    Series and Study Instance UIDs), or None when it is a copy of it.

    A SOP Instance UID names one instance for ever (PS3.3 C.12.1.1.1): the same UID under
    another study or series, or of another SOP Class, is not a second copy of the instance
    held but a different one, and storing it would lose one of the two.
    """
    sop_class, series, study = held
    if study != parsed.study_instance_uid:
        return f"SOP Instance UID already held in another study: {study}"
    if series != parsed.series_instance_uid:
        return f"SOP Instance UID already held in another series: {series}"
    if sop_class != parsed.sop_class_uid:
        return f"SOP Instance UID already held as another SOP Class: {sop_class}"
    return None


class _StripedLocks:
    """Serialises concurrent ingests of the same SOP Instance UID within one process."""

    def __init__(self, stripes: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def __call__(self, key: str) -> threading.Lock:
        digest = hashlib.blake2b(key.encode(), digest_size=2).digest()
        return self._locks[int.from_bytes(digest) % len(self._locks)]


class IngestService:
    def __init__(self, db: Database, blobs: BlobStore, settings: Settings) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.refused_sop_classes = resolve_sop_classes(settings.refused_sop_classes)
        self._locks = _StripedLocks()
        # series UID -> (series id, study id, study UID); study id -> when this process last
        # touched it
        self._parents: dict[str, tuple[int, int, str]] = {}
        self._study_touched: dict[int, float] = {}
        #: Called inside the index transaction of every stored instance, e.g. to enqueue jobs
        #: that must exist if and only if the instance does (routing on arrival).
        self.listeners: list[IndexListener] = []
        self._insert = (
            postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
        )
        self._parent_statements: dict[
            tuple[str, tuple[str, ...], str | None], tuple[_DirectStatement, _DirectStatement]
        ] = {}
        self._insert_instance: _DirectStatement | None = None
        self._touch_study = _DirectStatement(_TOUCH_STUDY, db.engine, ["study_fk", "now"])
        self._held = _DirectStatement(_HELD, db.engine, ["sop"])
        self._insert_audit = _DirectStatement(insert(_AUDIT_EVENT), db.engine, _AUDIT_KEYS)
        # PostgreSQL: the event is inserted by the instance's INSERT (a data-modifying WITH).
        self._event_in_insert = db.engine.dialect.name == "postgresql"
        self._insert_event = _DirectStatement(
            insert(_OUTBOX_EVENT), db.engine, INSTANCE_STORED_KEYS
        )
        self._series_study = _DirectStatement(_SERIES_STUDY, db.engine, ["series"])
        self._max_inflated_size = settings.max_inflated_size_mb * 2**20
        self._zone = dicom_zone(settings.dicom_timezone)
        self._fill_patient = _DirectStatement(
            _FILL_PATIENT,
            db.engine,
            [
                "patient_fk",
                "patient_name",
                "patient_name_search",
                "patient_birth_date",
                "patient_sex",
            ],
        )

    def ingest(
        self,
        data: bytes,
        *,
        calling_ae_title: str = "",
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
        report_status: str | None = None,
        audit: IngestAudit | None = None,
    ) -> IngestResult:
        """Store one Part-10 byte stream. Raises :class:`IngestError` when it cannot be stored.

        The ``expected_*`` UIDs come from the protocol envelope (the C-STORE request's Affected
        SOP Class/Instance UID, the STOW-RS URL's study); a data set that contradicts them is
        refused (PS3.4 B.2.3 0xA900, PS3.18 10.5.1). ``report_status``: for a structured report
        an edge wrote, the status it asked for, indexed in the same transaction. ``audit``:
        the edge's audit event of this change (:data:`IngestAudit`), inserted in the index
        transaction so that the instance and its record commit together (DICOM PS3.15 A.5.3.4,
        issue 15 item 5); the study and patient it lacks are taken from the header, and
        :attr:`IngestResult.audited` says whether it was committed.
        """
        started = time.perf_counter()
        try:
            parsed = parse_header(data, max_inflated_size=self._max_inflated_size)
        except InvalidInstance as exc:
            kind = (
                IngestErrorKind.UNSUPPORTED_TRANSFER_SYNTAX
                if exc.unsupported_transfer_syntax
                else IngestErrorKind.CANNOT_UNDERSTAND
                if exc.cannot_understand
                else IngestErrorKind.DATASET_MISMATCH
            )
            raise IngestError(kind, exc.reason) from exc
        self._check_envelope(
            parsed, expected_sop_class_uid, expected_sop_instance_uid, expected_study_instance_uid
        )
        parsed.report_status = report_status
        pending = self._pending_audit(parsed, audit)
        with self._locks(parsed.sop_instance_uid):
            try:
                result = self._store(parsed, data, calling_ae_title, pending)
            except IngestError as exc:
                exc.sop_class_uid = exc.sop_class_uid or parsed.sop_class_uid
                exc.sop_instance_uid = exc.sop_instance_uid or parsed.sop_instance_uid
                raise
        observe_ingest(
            calling_ae_title,
            result.sop_class_uid,
            len(data),
            result.outcome is not IngestOutcome.DUPLICATE,
            time.perf_counter() - started,
        )
        if pending is not None and pending.recorded:
            return dataclasses.replace(result, audited=True)
        return result

    @staticmethod
    def _pending_audit(parsed: ParsedInstance, audit: IngestAudit | None) -> _PendingAudit | None:
        patient_id = str(parsed.patient.get("patient_id") or "")
        event = audit(parsed.study_instance_uid, patient_id) if callable(audit) else audit
        if event is None:
            return None
        event.study_uid = event.study_uid or parsed.study_instance_uid
        event.patient_id = event.patient_id or patient_id or None
        return _PendingAudit(event)

    def _check_envelope(
        self,
        parsed: ParsedInstance,
        sop_class: str | None,
        sop_instance: str | None,
        study: str | None,
    ) -> None:
        if parsed.sop_class_uid in self.refused_sop_classes:
            raise IngestError(
                IngestErrorKind.REFUSED, f"SOP Class {parsed.sop_class_uid} is refused by this node"
            )
        if sop_class and parsed.sop_class_uid != sop_class:
            raise IngestError(
                IngestErrorKind.DATASET_MISMATCH,
                f"data set SOP Class {parsed.sop_class_uid} differs from the request's {sop_class}",
            )
        if sop_instance and parsed.sop_instance_uid != sop_instance:
            raise IngestError(
                IngestErrorKind.DATASET_MISMATCH,
                f"data set SOP Instance {parsed.sop_instance_uid} differs from the request's "
                f"{sop_instance}",
            )
        if study and parsed.study_instance_uid != study:
            raise IngestError(
                IngestErrorKind.DATASET_MISMATCH,
                f"data set Study Instance UID {parsed.study_instance_uid} differs from {study}",
            )

    def _store(
        self,
        parsed: ParsedInstance,
        data: bytes,
        calling_ae_title: str,
        pending: _PendingAudit | None = None,
    ) -> IngestResult:
        key = instance_key(
            parsed.study_instance_uid, parsed.series_instance_uid, parsed.sop_instance_uid
        )
        keep = self.settings.duplicate_policy == "keep"
        written = False
        try:
            if keep or parsed.series_instance_uid not in self._parents:
                with self.db.direct() as direct:
                    if keep:
                        held = self._held.execute(direct.dbapi, {"sop": parsed.sop_instance_uid})
                        if held is not None:
                            # A copy of a held instance is answered as stored; anything else
                            # that reuses its UID is refused.
                            reason = conflict_reason(parsed, (held[0], held[1], held[2]))
                            if reason is not None:
                                raise IngestError(IngestErrorKind.CONFLICT, reason)
                            return self._result(parsed, IngestOutcome.DUPLICATE)
                    self._check_series(direct.dbapi, parsed)
            else:
                self._check_series(None, parsed)  # the parent cache answers
            # No database connection is held while the blob is written (to S3, say).
            self.blobs.check_space(len(data))
            if keep:
                # Under keep a blob, once written, is never replaced: another process may have
                # stored this key since the check above, and its index row describes its bytes.
                written, indexed = self._put_once(key, data, parsed)
            else:
                self.blobs.put(key, data)
                written, indexed = True, parsed
            try:
                outcome = self._index_blob(indexed, key, calling_ae_title, pending)
            except _Conflict as exc:
                # Another process stored the UID elsewhere between the check and the insert:
                # the blob written here is no instance's, unless the held one has its key.
                self._parents.pop(parsed.series_instance_uid, None)
                if written and exc.blob_key != key:
                    self.blobs.delete(key)
                raise IngestError(IngestErrorKind.CONFLICT, exc.reason) from exc
            except _SeriesElsewhere as exc:
                # Another process put the series in another study between the check and the
                # insert (the transaction, and any study row it created, is rolled back).
                self._parents.pop(parsed.series_instance_uid, None)
                if written:
                    self.blobs.delete(key)
                raise _series_elsewhere(exc.study) from exc
        except OutOfSpace as exc:
            raise IngestError(IngestErrorKind.OUT_OF_RESOURCES, str(exc)) from exc
        except BlobStoreError as exc:
            log.error("blob store failed", extra={"sop": parsed.sop_instance_uid, "err": str(exc)})
            raise IngestError(IngestErrorKind.OUT_OF_RESOURCES, f"storage failed: {exc}") from exc
        except (DBAPIError, SQLAlchemyError) as exc:
            log.error("index write failed", extra={"sop": parsed.sop_instance_uid, "err": str(exc)})
            raise IngestError(
                IngestErrorKind.OUT_OF_RESOURCES, f"index unavailable: {type(exc).__name__}"
            ) from exc
        if indexed is not parsed:
            # The key holds another copy, stored first: it is the instance held.
            reason = conflict_reason(
                parsed,
                (indexed.sop_class_uid, indexed.series_instance_uid, indexed.study_instance_uid),
            )
            if reason is not None:
                raise IngestError(IngestErrorKind.CONFLICT, reason)
            outcome = IngestOutcome.DUPLICATE
        return self._result(parsed, outcome)

    def _put_once(
        self, key: str, data: bytes, parsed: ParsedInstance
    ) -> tuple[bool, ParsedInstance]:
        """Write the blob unless ``key`` holds one already: (whether it was written here, the
        data set the blob under ``key`` holds). A blob already there was written by another
        process that has indexed it, is indexing it, or died before (an orphan the start-up
        reconciliation would index): whoever indexes the key indexes what it holds."""
        for _attempt in range(3):
            if self.blobs.put_if_absent(key, data):
                return True, parsed
            try:
                held = self.blobs.read(key)
            except BlobNotFound:
                continue  # removed since (a writer that lost its own race): write again
            if held == data:
                return False, parsed
            try:
                found = parse_header(held, max_inflated_size=self._max_inflated_size)
            except InvalidInstance as exc:
                raise BlobStoreError(
                    f"{key} holds a blob that is no instance: {exc.reason}"
                ) from exc
            if (
                found.sop_instance_uid,
                found.series_instance_uid,
                found.study_instance_uid,
            ) != (parsed.sop_instance_uid, parsed.series_instance_uid, parsed.study_instance_uid):
                raise BlobStoreError(f"{key} holds the blob of another instance")
            return False, found
        raise BlobStoreError(f"{key} was written and removed again while this copy was stored")

    def _index_blob(
        self,
        parsed: ParsedInstance,
        key: str,
        calling_ae_title: str,
        pending: _PendingAudit | None = None,
    ) -> IngestOutcome:
        """Index the blob under ``key`` (holding ``parsed``) in one transaction: on the driver
        directly when possible, else on a SQLAlchemy connection."""
        outcome = None
        # Listeners and the report index (archive.reports) are given a SQLAlchemy connection.
        on_connection = bool(self.listeners) or is_report(parsed.sop_class_uid)
        if not on_connection:
            with self.db.direct() as direct:
                outcome = self._index_direct(direct, parsed, key, calling_ae_title, pending)
        if outcome is None:
            # After a direct attempt its cached ids may be gone: look everything up again.
            outcome = self._index_on_connection(
                parsed, key, calling_ae_title, pending, use_cache=on_connection
            )
        return outcome

    def _check_series(self, dbapi: Any | None, parsed: ParsedInstance) -> None:
        """Refuse an instance whose Series Instance UID the archive holds in another study: it
        would be indexed in that study, away from where its own data set (and its RetrieveURL)
        puts it. The parent cache answers for a series it holds (its study was read from the
        index); else the index, when ``dbapi`` is given. The index transaction checks again
        (:meth:`_parent_ids`): a series may be created by another process in between."""
        cached = self._parents.get(parsed.series_instance_uid)
        study: str | None
        if cached is not None:
            study = cached[2]
        elif dbapi is None:
            return
        else:
            row = self._series_study.execute(dbapi, {"series": parsed.series_instance_uid})
            study = None if row is None else row[0]
        if study is not None and study != parsed.study_instance_uid:
            raise _series_elsewhere(study)

    def _index_direct(
        self,
        direct: DirectConnection,
        parsed: ParsedInstance,
        key: str,
        calling_ae_title: str,
        pending: _PendingAudit | None = None,
    ) -> IngestOutcome | None:
        """Index a stored blob in one transaction on the driver directly; None when it must
        run on a SQLAlchemy connection instead: the rare steps (an overwrite, a patient
        without an ID) need one, and a cached parent row that is gone is looked up there."""
        try:
            with direct.transaction() as dbapi:
                return self._index(dbapi, parsed, key, calling_ae_title, pending, use_cache=True)
        except _NeedsConnection:
            return None
        except IntegrityError:
            self._parents.clear()  # a cached parent row was deleted by another process
            return None

    def _index_on_connection(
        self,
        parsed: ParsedInstance,
        key: str,
        calling_ae_title: str,
        pending: _PendingAudit | None = None,
        *,
        use_cache: bool,
    ) -> IngestOutcome:
        if use_cache:
            try:
                with self.db.write_connection() as conn:
                    return self._index(conn, parsed, key, calling_ae_title, pending, use_cache=True)
            except IntegrityError:
                # A cached parent row was deleted by another process: look everything up again.
                self._parents.clear()
        with self.db.write_connection() as conn:
            return self._index(conn, parsed, key, calling_ae_title, pending, use_cache=False)

    def forget_cached_parents(self) -> None:
        """Drop cached patient/study/series ids (after deletes)."""
        self._parents.clear()
        self._study_touched.clear()

    @staticmethod
    def _result(parsed: ParsedInstance, outcome: IngestOutcome) -> IngestResult:
        return IngestResult(
            outcome=outcome,
            sop_class_uid=parsed.sop_class_uid,
            sop_instance_uid=parsed.sop_instance_uid,
            study_instance_uid=parsed.study_instance_uid,
            series_instance_uid=parsed.series_instance_uid,
            transfer_syntax_uid=parsed.transfer_syntax_uid,
            size=parsed.size,
            # A copy not stored (keep) leaves the one held, which was judged when it came.
            warning=None if outcome is IngestOutcome.DUPLICATE else parsed.warning,
        )

    def _parent_ids(
        self, conn: IndexWriter, parsed: ParsedInstance, now: datetime
    ) -> tuple[int, int, bool]:
        """(series id, study id, whether the study row was created), creating patient, study
        and series rows as needed. Raises :class:`_SeriesElsewhere` when the series row exists
        in another study: two first instances of a series may arrive at once with different
        Study Instance UIDs, and the unique constraint lets only one create it."""
        patient_fk, patient_created = self._get_or_create(
            conn,
            _PATIENT,
            {
                "patient_id": parsed.patient["patient_id"],
                "issuer_of_patient_id": parsed.patient["issuer_of_patient_id"],
            },
            parsed.patient,
        )
        if not patient_created and parsed.patient.get("patient_name") is not None:
            # A patient an EHR created before its images has no DICOM demographics yet: the
            # first header fills them (C-FIND and QIDO-RS match on them). Once per series.
            self._fill_patient.execute(conn, {"patient_fk": patient_fk, **parsed.patient})
        study_fk, study_created = self._get_or_create(
            conn,
            _STUDY,
            {"study_instance_uid": parsed.study_instance_uid},
            {**parsed.study, "patient_fk": patient_fk, "created_at": now, "updated_at": now},
        )
        # A series reaches this point with its first instance (later ones find its id in the
        # cache): it is almost always new, so try to create it first.
        try:
            series_fk, _ = self._get_or_create(
                conn,
                _SERIES,
                {"series_instance_uid": parsed.series_instance_uid},
                {**parsed.series, "study_fk": study_fk},
                create_first=True,
                same="study_fk",
            )
        except _SeriesElsewhere as exc:
            row = self._series_study.execute(conn, {"series": parsed.series_instance_uid})
            raise _SeriesElsewhere("" if row is None else row[0]) from exc
        return series_fk, study_fk, study_created

    def _index(
        self,
        conn: IndexWriter,
        parsed: ParsedInstance,
        key: str,
        calling_ae_title: str,
        pending: _PendingAudit | None = None,
        *,
        use_cache: bool,
    ) -> IngestOutcome:
        now = datetime.now(UTC)
        if pending is not None:
            pending.recorded = False  # a new attempt of the transaction
        cached = self._parents.get(parsed.series_instance_uid) if use_cache else None
        study_created = False
        if cached is None:
            # The series row is in this study (created here, or checked): cache it.
            series_fk, study_fk, study_created = self._parent_ids(conn, parsed, now)
            cached = (series_fk, study_fk, parsed.study_instance_uid)
            self._parents[parsed.series_instance_uid] = cached
            if len(self._parents) > _PARENT_CACHE_SIZE:
                self._parents.pop(next(iter(self._parents)))
        elif cached[2] != parsed.study_instance_uid:
            raise _SeriesElsewhere(cached[2])
        series_fk, study_fk, _ = cached
        values: dict[str, Any] = {
            **parsed.instance,
            "sop_instance_uid": parsed.sop_instance_uid,
            "sop_class_uid": parsed.sop_class_uid,
            "series_fk": series_fk,
            "transfer_syntax_uid": parsed.transfer_syntax_uid,
            "size_bytes": parsed.size,
            "sha256": parsed.sha256,
            "blob_key": key,
            "calling_ae_title": calling_ae_title[:16] or None,
            "dicom_json": parsed.dicom_json,
            "received_at": now,
        }
        event = instance_stored(parsed, now)
        if self._insert_instance is None:
            statement = (
                self._insert(_INSTANCE)
                .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                .returning(_INSTANCE.c.id)
            )
            keys = list(values)
            if self._event_in_insert:
                statement, keys = _with_event(statement, keys)
            self._insert_instance = _DirectStatement(statement, self.db.engine, keys)
        params = values
        if self._event_in_insert:
            params = {**values, **{_EVENT_PARAM + key: value for key, value in event.items()}}
        inserted = self._insert_instance.execute(conn, params)
        outcome = IngestOutcome.STORED
        instance_id = inserted[0] if inserted is not None else None
        if inserted is None:
            if self.settings.duplicate_policy == "keep":
                # Another association stored the UID between our check and our insert.
                held = self._held.execute(conn, {"sop": parsed.sop_instance_uid})
                if held is not None:
                    reason = conflict_reason(parsed, (held[0], held[1], held[2]))
                    if reason is not None:
                        raise _Conflict(reason, held[3])
                return IngestOutcome.DUPLICATE
            if not isinstance(conn, Connection):
                raise _NeedsConnection
            where = _INSTANCE.c.sop_instance_uid == parsed.sop_instance_uid
            instance_id, old_key, old_series_fk, old_sop_class = conn.execute(
                select(
                    _INSTANCE.c.id,
                    _INSTANCE.c.blob_key,
                    _INSTANCE.c.series_fk,
                    _INSTANCE.c.sop_class_uid,
                ).where(where)
            ).one()
            raise_study_versions(conn, {_series_study_fk(conn, old_series_fk), study_fk}, now)
            conn.execute(update(_INSTANCE).where(where).values(**values))
            if old_key != key:
                conn.execute(insert(_PENDING_DELETION).values(blob_key=old_key, created_at=now))
            if is_report(old_sop_class) and not is_report(parsed.sop_class_uid):
                retire_reports(conn, [instance_id], now)
            if old_series_fk != series_fk:
                self._prune_series(conn, old_series_fk, now)
            outcome = IngestOutcome.OVERWRITTEN
        if is_report(parsed.sop_class_uid):
            if not isinstance(conn, Connection):
                raise _NeedsConnection
            assert instance_id is not None
            index_report(
                conn,
                instance_id=int(instance_id),
                study_fk=study_fk,
                parsed=parsed,
                now=now,
                zone=self._zone,
            )
        # Stable-study detection needs to know when the study last grew; a second is precise
        # enough, so a burst of instances updates the study row once per second, not each time.
        # A study row created in this transaction already says "now" and "not stable".
        mono = time.monotonic()
        if study_created or mono - self._study_touched.get(study_fk, 0.0) >= 1.0 or not use_cache:
            if not study_created:
                self._touch_study.execute(conn, {"study_fk": study_fk, "now": now})
            self._study_touched[study_fk] = mono
            if len(self._study_touched) > _PARENT_CACHE_SIZE:
                self._study_touched.pop(next(iter(self._study_touched)))
        # The ``instance.stored`` event (archive.outbox), in the transaction that stores the
        # instance: one INSERT, its values from the header (no lookup). Not for a duplicate.
        # On PostgreSQL the instance's INSERT wrote it (one round trip), unless overwritten.
        if not self._event_in_insert or outcome is IngestOutcome.OVERWRITTEN:
            self._insert_event.execute(conn, event)
        if pending is not None:
            # The edge's record of this change, in its transaction (one INSERT, and only for
            # the instances the edge gives an event: C-STORE gives one per study and
            # association).
            self._insert_audit.execute(conn, pending.event.values())
            pending.recorded = True
        for listener in self.listeners:
            listener(cast(Connection, conn), parsed, calling_ae_title)
        return outcome

    def _prune_series(self, conn: Connection, series_fk: int, now: datetime) -> None:
        """Remove a series an overwrite left without instances, and its study and patient when
        they are left empty too (as deletes do: the study leaves a tombstone, and a patient
        with an EHR record stays)."""
        count = select(func.count()).select_from
        if conn.execute(count(_INSTANCE).where(_INSTANCE.c.series_fk == series_fk)).scalar():
            return
        study_fk = conn.execute(
            select(_SERIES.c.study_fk).where(_SERIES.c.id == series_fk)
        ).scalar()
        conn.execute(delete(_SERIES).where(_SERIES.c.id == series_fk))
        self._parents.clear()
        if (
            study_fk is None
            or conn.execute(count(_SERIES).where(_SERIES.c.study_fk == study_fk)).scalar()
        ):
            return
        study = conn.execute(
            select(_STUDY.c.study_instance_uid, _STUDY.c.patient_fk).where(_STUDY.c.id == study_fk)
        ).first()
        if study is None:
            return
        # Its reports moved with the overwritten instance (nothing else is left in it).
        tombstone(conn, "study", study.study_instance_uid, now)
        study_deleted(conn, study.study_instance_uid, study.patient_fk)
        conn.execute(delete(_STUDY).where(_STUDY.c.id == study_fk))
        patient_fk = study.patient_fk
        if conn.execute(count(_STUDY).where(_STUDY.c.patient_fk == patient_fk)).scalar():
            return
        # A patient an EHR sent a record of outlives its images.
        conn.execute(
            delete(_PATIENT).where(_PATIENT.c.id == patient_fk, _PATIENT.c.record_version.is_(None))
        )

    def _get_or_create(
        self,
        conn: IndexWriter,
        table: Table,
        unique: dict[str, Any],
        values: dict[str, Any],
        *,
        create_first: bool = False,
        same: str | None = None,
    ) -> tuple[int, bool]:
        """(row id, whether this call created the row). A row found (not created) must hold
        ``values[same]`` in its column ``same``, else :class:`_SeriesElsewhere` is raised."""
        if any(value is None for value in unique.values()):
            return self._get_or_create_null(conn, table, unique, values)
        row = {**values, **unique}
        shape = (table.name, tuple(row), same)
        statements = self._parent_statements.get(shape)
        if statements is None:
            # Compiled once per table (and set of columns).
            found_columns = [table.c.id] + ([table.c[same]] if same else [])
            statements = (
                _DirectStatement(
                    select(*found_columns).where(
                        *(table.c[name] == bindparam(name) for name in unique)
                    ),
                    self.db.engine,
                    list(unique),
                ),
                _DirectStatement(
                    self._insert(table)
                    .on_conflict_do_nothing(index_elements=list(unique))
                    .returning(table.c.id),
                    self.db.engine,
                    list(row),
                ),
            )
            self._parent_statements[shape] = statements
        lookup, create = statements
        found = None if create_first else lookup.execute(conn, unique)
        if found is None:
            # Concurrent associations may create the same row: the unique constraint decides,
            # and the loser reads the winner's row.
            created = create.execute(conn, row)
            if created is not None:
                return int(created[0]), True
            found = lookup.execute(conn, unique)
            if found is None:
                raise SQLAlchemyError(f"the {table.name} row {unique} vanished while created")
        if same is not None and found[1] != row[same]:
            raise _SeriesElsewhere()
        return int(found[0]), False

    def _get_or_create_null(
        self, conn: IndexWriter, table: Table, unique: dict[str, Any], values: dict[str, Any]
    ) -> tuple[int, bool]:
        if not isinstance(conn, Connection):
            raise _NeedsConnection
        where = [table.c[name] == value for name, value in unique.items()]  # IS NULL for None
        row_id = conn.execute(select(table.c.id).where(*where)).scalar()
        if row_id is not None:
            return int(row_id), False
        inserted = conn.execute(
            self._insert(table)
            .values(**{**values, **unique})
            .on_conflict_do_nothing(index_elements=list(unique))
        ).rowcount
        return int(conn.execute(select(table.c.id).where(*where)).scalar_one()), inserted == 1


_EVENT_PARAM = "event_"


def _with_event(statement: Any, keys: list[str]) -> tuple[Any, list[str]]:
    """The instance's ``INSERT … ON CONFLICT DO NOTHING RETURNING id`` that also inserts the
    ``instance.stored`` outbox row when (and only when) it inserted the instance, in one
    statement: ``WITH inserted AS (INSERT …), announced AS (INSERT INTO outbox_event SELECT …
    FROM inserted) SELECT id FROM inserted`` (PostgreSQL runs every data-modifying WITH).
    The event's values are the parameters ``event_<column>``."""
    inserted = statement.values(
        {key: bindparam(key, type_=_INSTANCE.c[key].type) for key in keys}
    ).cte("inserted")
    columns = list(INSTANCE_STORED_KEYS)
    announced = (
        insert(_OUTBOX_EVENT)
        .from_select(
            columns,
            select(
                *(
                    bindparam(_EVENT_PARAM + c, type_=_OUTBOX_EVENT.c[c].type).label(c)
                    for c in columns
                )
            ).select_from(inserted),
        )
        .cte("announced")
    )
    combined = select(inserted.c.id).add_cte(announced)
    return combined, keys + [_EVENT_PARAM + c for c in columns]


def _series_study_fk(conn: Connection, series_fk: int) -> int:
    return int(
        conn.execute(select(_SERIES.c.study_fk).where(_SERIES.c.id == series_fk)).scalar_one()
    )


VERSION_STEP = 2**20
"""A study's version is its newest instance row id * this, or its version floor when higher
(``Study.version_floor``): up to this many deletes and overwrites of a study between two
instances stored anywhere in the archive each move it too."""


def raise_study_versions(conn: Connection, study_fks: Iterable[int], now: datetime) -> None:
    """Mark studies whose instances are about to be deleted or overwritten as changed: the
    version floor goes one above both the version they have and the newest instance row id
    of the archive * ``VERSION_STEP`` (so that any instance stored later, whose row id is
    higher, raises the version again). Call it before the instance rows change."""
    archive_newest = conn.execute(select(func.max(_INSTANCE.c.id))).scalar() or 0
    for study_fk in set(study_fks):
        newest = conn.execute(
            select(func.max(_INSTANCE.c.id))
            .join(_SERIES, _INSTANCE.c.series_fk == _SERIES.c.id)
            .where(_SERIES.c.study_fk == study_fk)
        ).scalar()
        floor = conn.execute(select(_STUDY.c.version_floor).where(_STUDY.c.id == study_fk)).scalar()
        if floor is None:
            continue
        version = max(int(newest or 0) * VERSION_STEP, int(floor), archive_newest * VERSION_STEP)
        conn.execute(
            update(_STUDY)
            .where(_STUDY.c.id == study_fk)
            .values(version_floor=version + 1, changed_at=now)
        )


def resolve_sop_classes(values: list[str]) -> frozenset[str]:
    """SOP Class UIDs from UIDs or keywords of PS3.6 Annex A (``CTImageStorage``)."""
    from pydicom._uid_dict import UID_dictionary

    by_keyword = {entry[4]: uid for uid, entry in UID_dictionary.items() if entry[4]}
    resolved: set[str] = set()
    for value in values:
        value = value.strip()
        if valid_uid(value):
            resolved.add(value)
        elif value in by_keyword:
            resolved.add(by_keyword[value])
        else:
            raise ValueError(f"unknown SOP Class {value!r}: give a UID or a PS3.6 keyword")
    return frozenset(resolved)
