"""Ingest: the one path by which instances enter the archive (C-STORE, STOW-RS, import).

Order of work, so that success means durable and a crash loses nothing it acknowledged:
1. parse the header (no pixel decode) and validate the minimum;
2. write the blob (atomic, fsynced);
3. commit the index rows in one transaction.
A crash after 2 and before 3 leaves an orphan blob that the start-up reconciler indexes; there is
never an index row without its blob.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from archive.blobstore import BlobStore, BlobStoreError, OutOfSpace, instance_key
from archive.db import Database
from archive.dicom import InvalidInstance, ParsedInstance, parse_header, valid_uid
from archive.models import Instance, Patient, PendingBlobDeletion, Series, Study
from config import Settings

log = logging.getLogger(__name__)


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


class IngestErrorKind(enum.StrEnum):
    CANNOT_UNDERSTAND = "cannot-understand"  # DIMSE 0xC000, STOW FailureReason 0xC000
    DATASET_MISMATCH = "dataset-mismatch"  # DIMSE 0xA900
    REFUSED = "refused"  # SOP class refused by configuration: DIMSE 0x0122
    OUT_OF_RESOURCES = "out-of-resources"  # DIMSE 0xA700, HTTP 507/503


class IngestError(Exception):
    def __init__(self, kind: IngestErrorKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


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
        self._insert = (
            postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
        )

    def ingest(
        self,
        data: bytes,
        *,
        calling_ae_title: str = "",
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> IngestResult:
        """Store one Part-10 byte stream. Raises :class:`IngestError` when it cannot be stored.

        The ``expected_*`` UIDs come from the protocol envelope (the C-STORE request's Affected
        SOP Class/Instance UID, the STOW-RS URL's study); a data set that contradicts them is
        refused (PS3.4 B.2.3 0xA900, PS3.18 10.5.1).
        """
        try:
            parsed = parse_header(data)
        except InvalidInstance as exc:
            kind = (
                IngestErrorKind.CANNOT_UNDERSTAND
                if exc.cannot_understand
                else IngestErrorKind.DATASET_MISMATCH
            )
            raise IngestError(kind, exc.reason) from exc
        self._check_envelope(
            parsed, expected_sop_class_uid, expected_sop_instance_uid, expected_study_instance_uid
        )
        with self._locks(parsed.sop_instance_uid):
            return self._store(parsed, data, calling_ae_title)

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

    def _store(self, parsed: ParsedInstance, data: bytes, calling_ae_title: str) -> IngestResult:
        key = instance_key(
            parsed.study_instance_uid, parsed.series_instance_uid, parsed.sop_instance_uid
        )
        try:
            with self.db.session() as session:
                existing = session.execute(
                    select(Instance.id, Instance.blob_key).where(
                        Instance.sop_instance_uid == parsed.sop_instance_uid
                    )
                ).first()
            if existing is not None and self.settings.duplicate_policy == "keep":
                return self._result(parsed, IngestOutcome.DUPLICATE)

            self.blobs.check_space(len(data))
            self.blobs.put(key, data)
            with self.db.write_session() as session:
                outcome = self._index(session, parsed, key, calling_ae_title)
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
        return self._result(parsed, outcome)

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
        )

    def _index(
        self, session: Session, parsed: ParsedInstance, key: str, calling_ae_title: str
    ) -> IngestOutcome:
        now = datetime.now(UTC)
        patient_fk = self._get_or_create(
            session,
            Patient,
            {
                "patient_id": parsed.patient["patient_id"],
                "issuer_of_patient_id": parsed.patient["issuer_of_patient_id"],
            },
            parsed.patient,
        )
        study_fk = self._get_or_create(
            session,
            Study,
            {"study_instance_uid": parsed.study_instance_uid},
            {**parsed.study, "patient_fk": patient_fk, "created_at": now, "updated_at": now},
        )
        series_fk = self._get_or_create(
            session,
            Series,
            {"series_instance_uid": parsed.series_instance_uid},
            {**parsed.series, "study_fk": study_fk},
        )
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
        table = cast(Table, Instance.__table__)
        inserted = session.execute(
            self._insert(table)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(table.c.id)
        ).first()
        outcome = IngestOutcome.STORED
        if inserted is None:
            if self.settings.duplicate_policy == "keep":
                # Another process stored it between our check and our insert.
                return IngestOutcome.DUPLICATE
            old_key = session.execute(
                select(Instance.blob_key).where(
                    Instance.sop_instance_uid == parsed.sop_instance_uid
                )
            ).scalar_one()
            session.execute(
                update(Instance)
                .where(Instance.sop_instance_uid == parsed.sop_instance_uid)
                .values(**values)
            )
            if old_key != key:
                session.add(PendingBlobDeletion(blob_key=old_key))
            outcome = IngestOutcome.OVERWRITTEN
        session.execute(update(Study).where(Study.id == study_fk).values(updated_at=now))
        return outcome

    def _get_or_create(
        self,
        session: Session,
        model: type[Patient] | type[Study] | type[Series],
        unique: dict[str, Any],
        values: dict[str, Any],
    ) -> int:
        table = cast(Table, model.__table__)
        where = [table.c[name] == value for name, value in unique.items()]
        row_id = session.execute(select(table.c.id).where(*where)).scalar()
        if row_id is not None:
            return int(row_id)
        # Concurrent associations may create the same row: let the unique constraint decide.
        session.execute(
            self._insert(table)
            .values(**{**values, **unique})
            .on_conflict_do_nothing(index_elements=list(unique))
        )
        return int(session.execute(select(table.c.id).where(*where)).scalar_one())


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
