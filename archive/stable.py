"""Stable-study detection: a study that received no instance for ``stable_age`` seconds.

Ingest sets ``study.updated_at`` when a study grows (at most once a second per study and
process) and clears ``study.stable_at``. The scanner, run every few seconds by any number of
processes, finds studies with ``stable_at IS NULL`` whose ``updated_at`` is older than
``stable_age``, sets ``stable_at``, ties the study to the order it was made for
(``archive.order_links``), writes the ``study.stable`` outbox event and enqueues one job
per stable-study job kind **in the same transaction**: a crash loses no stabilisation and never
enqueues one twice. A later instance clears ``stable_at`` again, and the study re-stabilises (and
enqueues again) once it is quiet.

Concurrent scanners on PostgreSQL lock the candidate rows ``FOR UPDATE SKIP LOCKED`` and re-check
``stable_at IS NULL`` under the lock, so each stabilisation is claimed by exactly one of them;
on SQLite the scan runs in a ``BEGIN IMMEDIATE`` write transaction.

Precision: because ingest touches ``updated_at`` at most once a second, "no instance for
``stable_age`` seconds" holds to within a second.

The scanner's thread also prunes finished jobs past their retention (``retention``, at most
once per ``prune_interval``): every process that scans prunes, and a delete that finds nothing
costs one indexed statement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Row, Select, Table, select, update

from archive.announce import study_stable
from archive.db import Database
from archive.jobs import JobQueue, JobStatus
from archive.models import Study
from archive.order_links import any_orders, tie_stable_study

log = logging.getLogger(__name__)

_STUDY = cast(Table, Study.__table__)
STABLE_STUDY_PAYLOAD_KEYS = ("study_instance_uid", "updated_at")


@dataclass(frozen=True, slots=True)
class StableStudy:
    study_instance_uid: str
    updated_at: datetime
    """When its last instance arrived (to within a second)."""


class StableStudyScanner:
    """Declares quiet studies stable and enqueues one job per kind in ``kinds`` for each.

    A stable-study job's payload is ``{"study_instance_uid": …, "updated_at": ISO time}``, and
    its ``study_instance_uid`` column is set (``GET /api/jobs?study=…``).
    """

    def __init__(
        self,
        db: Database,
        queue: JobQueue,
        *,
        stable_age: float,
        kinds: Iterable[str] = (),
        batch: int = 200,
        retention: Mapping[JobStatus, float] | None = None,
        prune_interval: float = 3600.0,
    ) -> None:
        self.db = db
        self.queue = queue
        self.stable_age = stable_age
        self.kinds = sorted(set(kinds))
        self.batch = batch
        #: Seconds after which finished jobs of each status are deleted (JobQueue.prune).
        self.retention = dict(retention or {})
        self.prune_interval = prune_interval
        self._next_prune = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _candidates(self, cutoff: datetime) -> Select[tuple[int, str, datetime, int]]:
        return (
            select(
                _STUDY.c.id, _STUDY.c.study_instance_uid, _STUDY.c.updated_at, _STUDY.c.patient_fk
            )
            .where(_STUDY.c.stable_at.is_(None), _STUDY.c.updated_at <= cutoff)
            .order_by(_STUDY.c.updated_at)
            .limit(self.batch)
        )

    def scan(self) -> list[StableStudy]:
        """One pass: declare every quiet study stable. Returns the studies declared."""
        declared: list[StableStudy] = []
        while True:
            batch = self._scan_batch()
            declared.extend(batch)
            if len(batch) < self.batch:
                return declared

    def _scan_batch(self) -> list[StableStudy]:
        now = datetime.now(UTC)
        cutoff = now - timedelta(seconds=self.stable_age)
        query = self._candidates(cutoff)
        # A read first, so that an idle scanner does not take SQLite's write lock every pass.
        with self.db.engine.connect() as conn:
            if conn.execute(query.limit(1)).first() is None:
                return []
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        declared: list[StableStudy] = []
        with self.db.write_connection() as conn:
            rows: list[Row[tuple[int, str, datetime, int]]] = list(conn.execute(query))
            # Studies made for an order are tied to it (archive.order_links) when they become
            # stable; an index without orders pays one row read per batch for it.
            with_orders = bool(rows) and any_orders(conn)
            for row in rows:
                # Guarded again by the condition: under the row lock (PostgreSQL), or alone in
                # the write transaction (SQLite), only one scanner can turn NULL into a time.
                marked = conn.execute(
                    update(_STUDY)
                    .where(_STUDY.c.id == row.id, _STUDY.c.stable_at.is_(None))
                    .values(stable_at=now)
                ).rowcount
                if marked != 1:
                    continue
                updated_at = row.updated_at
                if updated_at.tzinfo is None:
                    updated_at = updated_at.replace(tzinfo=UTC)
                study = StableStudy(row.study_instance_uid, updated_at)
                declared.append(study)
                payload = {
                    "study_instance_uid": study.study_instance_uid,
                    "updated_at": updated_at.isoformat(),
                }
                if with_orders:
                    tie_stable_study(conn, study.study_instance_uid)
                # The ``study.stable`` event (archive.outbox), in the transaction that declares
                # it: announced if and only if the declaration commits.
                study_stable(conn, study.study_instance_uid, row.patient_fk, updated_at)
                if self.kinds:
                    self.queue.enqueue_many(
                        [(kind, payload, study.study_instance_uid) for kind in self.kinds],
                        conn=conn,
                    )
        for study in declared:
            log.info(
                "study stable",
                extra={"study": study.study_instance_uid, "jobs": ",".join(self.kinds) or "-"},
            )
        return declared

    # --- background thread ---------------------------------------------------------------
    def run(self, interval: float) -> None:
        """Scan every ``interval`` seconds until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                log.exception("stable-study scan failed; retrying")
            self.prune_due()
            self._stop.wait(interval)

    def prune_due(self) -> dict[str, int]:
        """Prune finished jobs past their retention, if ``prune_interval`` has passed since
        the last time (the first call always prunes). Returns how many were deleted."""
        now = time.monotonic()
        if not any(seconds > 0 for seconds in self.retention.values()) or now < self._next_prune:
            return {}
        self._next_prune = now + self.prune_interval
        try:
            return self.queue.prune(self.retention)
        except Exception:
            log.exception("pruning finished jobs failed; retrying at the next interval")
            return {}

    def start(self, interval: float) -> threading.Thread:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(interval,), name="stable-study-scanner", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True
