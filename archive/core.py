"""The archive as the edges see it: ingest, delete, statistics and start-up reconciliation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from archive import orders, outbox  # noqa: F401  (the order and event tables are part of the index)
from archive.announce import study_deleted
from archive.audit import MINOR_FAILURE, AuditEvent, AuditLog
from archive.audit import record as record_audit
from archive.blobstore import BlobNotFound, BlobStore, FileBlobStore, open_blob_store
from archive.db import Database
from archive.dicom import InvalidInstance, configure_pydicom, parse_header
from archive.ingest import (
    IngestAudit,
    IngestError,
    IngestOutcome,
    IngestResult,
    IngestService,
    raise_study_versions,
)
from archive.jobs import JobQueue
from archive.models import Instance, Patient, PendingBlobDeletion, ReportDocument, Series, Study
from archive.peers import PeerRegistry
from archive.reports import (
    REPORT_SOP_CLASSES,
    index_report,
    is_report,
    retire_reports,
    tombstone,
)
from config import Settings
from config.settings import dicom_zone

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ArchiveStats:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int


@dataclass(slots=True)
class ReconcileReport:
    reindexed: int = 0
    rejected: int = 0
    deleted_blobs: int = 0
    removed_partials: int = 0


class Archive:
    """One index and one blob store, and the services that keep them consistent."""

    def __init__(self, settings: Settings, *, migrate: bool | None = None) -> None:
        configure_pydicom()
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(
            settings.resolved_database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_size=settings.database_pool_size,
        )
        if settings.migrate_on_start if migrate is None else migrate:
            self.db.upgrade()
        self.blobs: BlobStore = open_blob_store(settings)
        self.ingestor = IngestService(self.db, self.blobs, settings)
        self.peers = PeerRegistry(self.db, settings.peers)
        self.audit = AuditLog(
            self.db,
            retention_days=settings.audit.retention_days,
            max_queued=settings.audit.max_queued,
        )
        self.jobs = JobQueue(
            self.db,
            max_attempts=settings.job_max_attempts,
            lease_seconds=settings.job_lease_seconds,
            backoff_base=settings.job_backoff_base,
            backoff_max=settings.job_backoff_max,
        )

    # --- ingest ------------------------------------------------------------------------
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
        return self.ingestor.ingest(
            data,
            calling_ae_title=calling_ae_title,
            expected_sop_class_uid=expected_sop_class_uid,
            expected_sop_instance_uid=expected_sop_instance_uid,
            expected_study_instance_uid=expected_study_instance_uid,
            report_status=report_status,
            audit=audit,
        )

    # --- statistics --------------------------------------------------------------------
    def stats(self) -> ArchiveStats:
        with self.db.session() as s:
            patients = s.scalar(select(func.count()).select_from(Patient)) or 0
            studies = s.scalar(select(func.count()).select_from(Study)) or 0
            series = s.scalar(select(func.count()).select_from(Series)) or 0
            instances, size = s.execute(
                select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
            ).one()
        return ArchiveStats(int(patients), int(studies), int(series), int(instances), int(size))

    # --- delete ------------------------------------------------------------------------
    # ``audit``: the event of the deletion, recorded in its transaction (archive.audit).
    def delete_instance(self, sop_instance_uid: str, *, audit: AuditEvent | None = None) -> int:
        return self._delete(
            select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid),
            audit=audit,
        )

    def delete_series(self, series_instance_uid: str, *, audit: AuditEvent | None = None) -> int:
        return self._delete(
            select(Instance.id)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.series_instance_uid == series_instance_uid),
            series_uids=[series_instance_uid],
            audit=audit,
        )

    def delete_study(self, study_instance_uid: str, *, audit: AuditEvent | None = None) -> int:
        return self._delete(
            select(Instance.id)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Study.study_instance_uid == study_instance_uid),
            study_uids=[study_instance_uid],
            audit=audit,
        )

    def delete_patient(
        self, patient_id: str, issuer_of_patient_id: str = "", *, audit: AuditEvent | None = None
    ) -> int:
        return self._delete(
            select(Instance.id)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .join(Patient, Study.patient_fk == Patient.id)
            .where(
                Patient.patient_id == patient_id,
                Patient.issuer_of_patient_id == issuer_of_patient_id,
            ),
            patient_key=(patient_id, issuer_of_patient_id),
            audit=audit,
        )

    def _delete(
        self,
        instance_ids: object,
        *,
        series_uids: list[str] | None = None,
        study_uids: list[str] | None = None,
        patient_key: tuple[str, str] | None = None,
        audit: AuditEvent | None = None,
    ) -> int:
        """Remove index rows and record their blobs for deletion in one transaction, then
        delete the blobs. Parents left without children are removed too (a patient with an EHR
        record stays). Deleted studies, and reports of which no version is left, leave
        tombstones. Returns the number of instances deleted."""
        now = datetime.now(UTC)
        with self.db.write_session() as s:
            rows = s.execute(
                select(
                    Instance.id, Instance.blob_key, Instance.series_fk, Instance.sop_class_uid
                ).where(
                    Instance.id.in_(instance_ids)  # type: ignore[arg-type]
                )
            ).all()
            series_fks = {r.series_fk for r in rows}
            if series_uids:
                series_fks |= set(
                    s.scalars(select(Series.id).where(Series.series_instance_uid.in_(series_uids)))
                )
            if audit is not None:
                if audit.study_uid and not audit.patient_id:
                    audit.patient_id = s.scalar(
                        select(Patient.patient_id)
                        .join(Study, Study.patient_fk == Patient.id)
                        .where(Study.study_instance_uid == audit.study_uid)
                    )
                if not rows:
                    audit.outcome, audit.outcome_text = MINOR_FAILURE, "nothing to delete"
                record_audit(s, audit)
            for r in rows:
                s.add(PendingBlobDeletion(blob_key=r.blob_key))
            ids = [r.id for r in rows]
            # Before the instance rows go: the studies that keep instances change version
            # (Study.version_floor), and reports' rows go with their instances.
            if series_fks:
                raise_study_versions(
                    s.connection(),
                    list(s.scalars(select(Series.study_fk).where(Series.id.in_(series_fks)))),
                    now,
                )
            reports = [r.id for r in rows if is_report(r.sop_class_uid)]
            if reports:
                retire_reports(s.connection(), reports, now)
            for start in range(0, len(ids), 500):
                s.execute(delete(Instance).where(Instance.id.in_(ids[start : start + 500])))
            study_fks = (
                set(s.scalars(select(Series.study_fk).where(Series.id.in_(series_fks))))
                if series_fks
                else set()
            )
            if study_uids:
                study_fks |= set(
                    s.scalars(select(Study.id).where(Study.study_instance_uid.in_(study_uids)))
                )
            self._prune(s, series_fks, study_fks, patient_key, now)
        self.ingestor.forget_cached_parents()
        self.flush_pending_deletions()
        return len(rows)

    @staticmethod
    def _prune(
        s: Session,
        series_fks: set[int],
        study_fks: set[int],
        patient_key: tuple[str, str] | None,
        now: datetime,
    ) -> None:
        for series_fk in series_fks:
            if s.scalar(select(func.count()).where(Instance.series_fk == series_fk)) == 0:
                s.execute(delete(Series).where(Series.id == series_fk))
        patient_fks: set[int] = set()
        for study_fk in study_fks:
            if s.scalar(select(func.count()).where(Series.study_fk == study_fk)) == 0:
                study = s.execute(
                    select(Study.study_instance_uid, Study.patient_fk).where(Study.id == study_fk)
                ).first()
                if study is None:
                    continue
                patient_fks.add(study.patient_fk)
                tombstone(s.connection(), "study", study.study_instance_uid, now)
                study_deleted(s.connection(), study.study_instance_uid, study.patient_fk)
                s.execute(delete(Study).where(Study.id == study_fk))
        if patient_key is not None:
            patient_fks |= set(
                s.scalars(
                    select(Patient.id).where(
                        Patient.patient_id == patient_key[0],
                        Patient.issuer_of_patient_id == patient_key[1],
                    )
                )
            )
        for patient_fk in patient_fks:
            if s.scalar(select(func.count()).where(Study.patient_fk == patient_fk)) == 0:
                # A patient an EHR sent a record of outlives its images.
                s.execute(
                    delete(Patient).where(
                        Patient.id == patient_fk, Patient.record_version.is_(None)
                    )
                )

    def flush_pending_deletions(self) -> int:
        """Delete blobs recorded for deletion, unless an instance uses the key again."""
        deleted = 0
        with self.db.session() as s:
            pending = s.execute(select(PendingBlobDeletion.id, PendingBlobDeletion.blob_key)).all()
        for row in pending:
            with self.db.write_session() as s:
                in_use = s.scalar(select(func.count()).where(Instance.blob_key == row.blob_key))
                if not in_use:
                    self.blobs.delete(row.blob_key)
                    deleted += 1
                s.execute(delete(PendingBlobDeletion).where(PendingBlobDeletion.id == row.id))
        return deleted

    # --- reconciliation ----------------------------------------------------------------
    def reconcile(
        self, progress: Callable[[int], None] | None = None, batch: int = 500
    ) -> ReconcileReport:
        """Make blobs and index agree after a crash.

        Finishes pending deletions, removes partial files, and indexes every blob that has no
        index row (it was written but the process died before the index commit, so the sender
        was never told it was stored; indexing it keeps the data instead of losing it).
        """
        report = ReconcileReport()
        report.deleted_blobs = self.flush_pending_deletions()
        if isinstance(self.blobs, FileBlobStore):
            report.removed_partials = self.blobs.remove_partials()
        seen = 0
        for keys in _batched(self.blobs.keys("studies/"), batch):
            with self.db.session() as s:
                known = set(s.scalars(select(Instance.blob_key).where(Instance.blob_key.in_(keys))))
            for key in keys:
                if key in known:
                    continue
                try:
                    result = self.ingestor.ingest(self.blobs.read(key), calling_ae_title="")
                except IngestError as exc:
                    log.error(
                        "orphan blob cannot be indexed", extra={"key": key, "err": exc.reason}
                    )
                    report.rejected += 1
                    continue
                if result.outcome is not IngestOutcome.DUPLICATE:
                    report.reindexed += 1
            seen += len(keys)
            if progress:
                progress(seen)
        return report

    def reindex_reports(self, progress: Callable[[int], None] | None = None) -> int:
        """Read every structured report again from its stored file: its DICOM JSON and its
        rows in the report index (``archive.reports``), for reports stored before the index
        existed or by an older version. The status an edge asked for is kept. Returns how many
        were indexed."""
        with self.db.session() as s:
            rows = s.execute(
                select(Instance.id, Instance.blob_key, Series.study_fk, ReportDocument.status)
                .join(Series, Instance.series_fk == Series.id)
                .outerjoin(ReportDocument, ReportDocument.instance_fk == Instance.id)
                .where(Instance.sop_class_uid.in_(REPORT_SOP_CLASSES))
                .order_by(Instance.id)
            ).all()
        done = 0
        for row in rows:
            try:
                parsed = parse_header(self.blobs.read(row.blob_key))
            except (InvalidInstance, BlobNotFound) as exc:
                log.error("report not re-indexed", extra={"key": row.blob_key, "err": str(exc)})
                continue
            parsed.report_status = row.status
            with self.db.write_connection() as conn:
                conn.execute(
                    update(Instance)
                    .where(Instance.id == row.id)
                    .values(dicom_json=parsed.dicom_json)
                )
                index_report(
                    conn,
                    instance_id=row.id,
                    study_fk=row.study_fk,
                    parsed=parsed,
                    now=datetime.now(UTC),
                    zone=dicom_zone(self.settings.dicom_timezone),
                    announce=False,
                )
            done += 1
            if progress:
                progress(done)
        return done

    def close(self) -> None:
        self.audit.close()
        self.db.dispose()


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
