"""The durable job queue: a table in the index, shared by every process that opens it.

Life of a job::

    queued ──claim──▶ running ──complete──▶ done
      ▲                 │ fail (attempts < max)        │ fail (attempts == max), permanent error
      │                 ▼                               ▼
      └──(next_run_at)─ failed                          dead ──requeue──▶ queued

A claim leases the job to one worker until ``locked_until``; the worker renews the lease while
the handler runs. A worker that dies (``kill -9``, power loss) stops renewing, and once the lease
has expired the job is claimed again (and counts as an attempt). Completion and failure are
conditional on still holding the lease, so a worker whose lease was taken over cannot record a
result twice.

Delivery is therefore **at least once**: a handler may run again after a crash, or after its
worker lost the lease while still running. Handlers must be idempotent (check whether their work
is already done, write results under deterministic keys, tolerate a study that has since been
deleted).

Claiming: PostgreSQL selects the next runnable row ``FOR UPDATE SKIP LOCKED`` and marks it
running in the same transaction, so concurrent workers on any number of machines never claim the
same job. SQLite claims inside a ``BEGIN IMMEDIATE`` write transaction (one writer at a time, so
claims are serialised across threads and processes). Job times come from the database server's
clock on PostgreSQL (workers on several machines share one clock) and from the local clock on
SQLite (one machine).
"""

from __future__ import annotations

import enum
import logging
import os
import random
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    Table,
    and_,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from archive.db import Database
from archive.models import Job

log = logging.getLogger(__name__)

_JOB = cast(Table, Job.__table__)
MAX_ERROR_LENGTH = 8000
#: The largest job id, offset and limit the index can compare: a signed 64-bit integer
#: (SQLite's INTEGER; a bigint on PostgreSQL, whose ids are smaller still). Beyond it SQLite
#: raises OverflowError, so a larger id is no job without asking.
MAX_JOB_ID = 2**63 - 1


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    """Failed; will be retried at ``next_run_at``."""
    DEAD = "dead"
    """Gave up after ``max_attempts`` (or a permanent error); only a requeue revives it."""


class PermanentJobError(Exception):
    """Raised by a handler when retrying cannot help (bad payload…): the job goes dead now."""


class JobStateError(Exception):
    """The job is in a state that does not allow the operation (requeue of a running job)."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    kind: str
    payload: dict[str, Any]
    study_instance_uid: str | None
    status: JobStatus
    attempts: int
    max_attempts: int
    next_run_at: datetime
    locked_by: str | None
    locked_until: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        m = row._mapping
        return cls(
            id=int(m["id"]),
            kind=m["kind"],
            payload=dict(m["payload"] or {}),
            study_instance_uid=m["study_instance_uid"],
            status=JobStatus(m["status"]),
            attempts=int(m["attempts"]),
            max_attempts=int(m["max_attempts"]),
            next_run_at=_aware(m["next_run_at"]),
            locked_by=m["locked_by"],
            locked_until=_aware_or_none(m["locked_until"]),
            last_error=m["last_error"],
            created_at=_aware(m["created_at"]),
            updated_at=_aware(m["updated_at"]),
            finished_at=_aware_or_none(m["finished_at"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status.value,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "study": self.study_instance_uid,
            "payload": self.payload,
            "next_run_at": self.next_run_at.isoformat(),
            "locked_by": self.locked_by,
            "locked_until": self.locked_until.isoformat() if self.locked_until else None,
            "last_error": self.last_error,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


JobList = list[JobRecord]


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _aware_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _aware(value)


def backoff_delay(
    attempts: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before the next try after ``attempts`` failed attempts.

    ``base * 2**(attempts-1)``, capped at ``cap``, then jittered down by up to half so that
    jobs that failed together (a peer was down) do not all retry in the same instant.
    """
    delay = min(cap, base * 2 ** max(0, attempts - 1))
    return delay * (0.5 + 0.5 * rand())


def _runnable(now: ColumnElement[datetime]) -> ColumnElement[bool]:
    return or_(
        and_(
            _JOB.c.status.in_((JobStatus.QUEUED.value, JobStatus.FAILED.value)),
            _JOB.c.next_run_at <= now,
        ),
        and_(_JOB.c.status == JobStatus.RUNNING.value, _JOB.c.locked_until < now),
    )


class JobQueue:
    """Enqueue, claim, complete, fail, requeue and list jobs. Thread-safe; one per process."""

    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 8,
        lease_seconds: float = 60.0,
        backoff_base: float = 5.0,
        backoff_max: float = 3600.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.db = db
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    # --- clock ---------------------------------------------------------------------------
    def _now(self) -> ColumnElement[datetime]:
        """The current time as SQL: the server's clock on PostgreSQL, ours on SQLite."""
        if self.db.is_sqlite:
            return literal(datetime.now(UTC), DateTime(timezone=True))
        return func.now()

    def _after(self, seconds: float) -> ColumnElement[datetime]:
        if self.db.is_sqlite:
            return literal(datetime.now(UTC) + timedelta(seconds=seconds), DateTime(timezone=True))
        return func.now() + timedelta(seconds=seconds)

    # --- enqueue -------------------------------------------------------------------------
    def enqueue(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        study_instance_uid: str | None = None,
        max_attempts: int | None = None,
        delay: float = 0.0,
        conn: Connection | None = None,
    ) -> int:
        """Add a job; returns its id. With ``conn``, inside the caller's transaction (so that
        the job exists if and only if the caller's other writes commit)."""
        ids = self.enqueue_many(
            [(kind, dict(payload or {}), study_instance_uid)],
            max_attempts=max_attempts,
            delay=delay,
            conn=conn,
        )
        return ids[0]

    def enqueue_many(
        self,
        jobs: Iterable[tuple[str, dict[str, Any], str | None]],
        *,
        max_attempts: int | None = None,
        delay: float = 0.0,
        conn: Connection | None = None,
    ) -> list[int]:
        """Add ``(kind, payload, study_instance_uid)`` jobs in one transaction."""
        if conn is None:
            with self.db.write_connection() as own:
                return self.enqueue_many(jobs, max_attempts=max_attempts, delay=delay, conn=own)
        ids = []
        now, run_at = self._now(), self._after(delay)
        for kind, payload, study in jobs:
            if not kind or len(kind) > 64:
                raise ValueError(f"a job kind is 1 to 64 characters, not {kind!r}")
            row = conn.execute(
                insert(_JOB)
                .values(
                    kind=kind,
                    payload=payload,
                    study_instance_uid=study,
                    status=JobStatus.QUEUED.value,
                    attempts=0,
                    max_attempts=max_attempts or self.max_attempts,
                    next_run_at=run_at,
                    created_at=now,
                    updated_at=now,
                )
                .returning(_JOB.c.id)
            ).scalar_one()
            ids.append(int(row))
        return ids

    # --- claim ---------------------------------------------------------------------------
    def has_runnable(self, kinds: Iterable[str]) -> bool:
        """A cheap read: is there anything a worker for ``kinds`` could claim now?"""
        kinds = list(kinds)
        if not kinds:
            return False
        with self.db.engine.connect() as conn:
            query = select(_JOB.c.id).where(_runnable(self._now()), _JOB.c.kind.in_(kinds))
            return conn.execute(query.limit(1)).first() is not None

    def claim(self, worker: str, kinds: Iterable[str]) -> JobRecord | None:
        """Lease the next runnable job of one of ``kinds`` to ``worker``, or None."""
        kinds = list(kinds)
        if not kinds:
            return None
        while True:
            with self.db.write_connection() as conn:
                query = (
                    select(
                        _JOB.c.id,
                        _JOB.c.status,
                        _JOB.c.attempts,
                        _JOB.c.max_attempts,
                        _JOB.c.locked_by,
                    )
                    .where(_runnable(self._now()), _JOB.c.kind.in_(kinds))
                    .order_by(_JOB.c.next_run_at, _JOB.c.id)
                    .limit(1)
                )
                if not self.db.is_sqlite:
                    query = query.with_for_update(skip_locked=True)
                found = conn.execute(query).first()
                if found is None:
                    return None
                expired = found.status == JobStatus.RUNNING.value
                lost = f"worker {found.locked_by} lost its lease (crashed or stalled)"
                if expired and found.attempts >= found.max_attempts:
                    # Every attempt so far killed or stalled its worker: give up on it.
                    conn.execute(
                        update(_JOB)
                        .where(_JOB.c.id == found.id)
                        .values(
                            status=JobStatus.DEAD.value,
                            locked_by=None,
                            locked_until=None,
                            last_error=f"{lost}; attempt {found.attempts} of {found.max_attempts}",
                            updated_at=self._now(),
                            finished_at=self._now(),
                        )
                    )
                    log.error(
                        "job dead: lease expired on its last attempt",
                        extra={"job": found.id, "attempts": found.attempts},
                    )
                    continue
                values: dict[str, Any] = {
                    "status": JobStatus.RUNNING.value,
                    "attempts": _JOB.c.attempts + 1,
                    "locked_by": worker[:128],
                    "locked_until": self._after(self.lease_seconds),
                    "updated_at": self._now(),
                }
                if expired:
                    values["last_error"] = lost
                row = conn.execute(
                    update(_JOB).where(_JOB.c.id == found.id).values(**values).returning(*_JOB.c)
                ).one()
            job = JobRecord.from_row(row)
            if expired:
                log.warning(
                    "job re-claimed after lease expiry",
                    extra={"job": job.id, "kind": job.kind, "previous": found.locked_by},
                )
            return job

    def _held(self, job: JobRecord) -> ColumnElement[bool]:
        # ``attempts`` grows at every claim: it fences off a worker whose lease was taken over,
        # even if the job is re-claimed by the same worker name.
        return and_(
            _JOB.c.id == job.id,
            _JOB.c.status == JobStatus.RUNNING.value,
            _JOB.c.locked_by == job.locked_by,
            _JOB.c.attempts == job.attempts,
        )

    def renew(self, job: JobRecord) -> bool:
        """Extend the lease of a running job; False if the lease is no longer ours."""
        with self.db.write_connection() as conn:
            result = conn.execute(
                update(_JOB)
                .where(self._held(job))
                .values(locked_until=self._after(self.lease_seconds))
            )
        return result.rowcount == 1

    def complete(self, job: JobRecord) -> bool:
        """Mark a claimed job done; False (nothing recorded) if the lease is no longer ours."""
        with self.db.write_connection() as conn:
            result = conn.execute(
                update(_JOB)
                .where(self._held(job))
                .values(
                    status=JobStatus.DONE.value,
                    locked_by=None,
                    locked_until=None,
                    updated_at=self._now(),
                    finished_at=self._now(),
                )
            )
        return result.rowcount == 1

    def fail(self, job: JobRecord, error: str, *, permanent: bool = False) -> JobStatus | None:
        """Record a failed attempt: ``failed`` (retried after a backoff) or ``dead``.

        Returns the new status, or None (nothing recorded) if the lease is no longer ours.
        """
        dead = permanent or job.attempts >= job.max_attempts
        values: dict[str, Any] = {
            "locked_by": None,
            "locked_until": None,
            "last_error": error[:MAX_ERROR_LENGTH],
            "updated_at": self._now(),
        }
        if dead:
            values |= {"status": JobStatus.DEAD.value, "finished_at": self._now()}
        else:
            delay = backoff_delay(job.attempts, self.backoff_base, self.backoff_max)
            values |= {"status": JobStatus.FAILED.value, "next_run_at": self._after(delay)}
        with self.db.write_connection() as conn:
            result = conn.execute(update(_JOB).where(self._held(job)).values(**values))
        if result.rowcount != 1:
            return None
        return JobStatus.DEAD if dead else JobStatus.FAILED

    # --- operator actions ----------------------------------------------------------------
    def requeue(self, job_id: int) -> JobRecord | None:
        """Run a job again from scratch (attempts back to 0), now. None if there is no such
        job; :class:`JobStateError` if it is running (its worker holds a valid lease)."""
        if not 0 < job_id <= MAX_JOB_ID:
            return None
        with self.db.write_connection() as conn:
            current = conn.execute(
                select(_JOB.c.status, _JOB.c.locked_until).where(_JOB.c.id == job_id)
            ).first()
            if current is None:
                return None
            if current.status == JobStatus.RUNNING.value:
                raise JobStateError(f"job {job_id} is running; it cannot be requeued now")
            row = conn.execute(
                update(_JOB)
                .where(_JOB.c.id == job_id, _JOB.c.status != JobStatus.RUNNING.value)
                .values(**self._requeued())
                .returning(*_JOB.c)
            ).one()
        log.info("job requeued", extra={"job": job_id})
        return JobRecord.from_row(row)

    def requeue_all(
        self,
        status: JobStatus = JobStatus.DEAD,
        *,
        kind: str | None = None,
        study_instance_uid: str | None = None,
    ) -> int:
        """Requeue every job in ``status`` (not ``running``), optionally of one kind or study.
        Returns how many."""
        if status is JobStatus.RUNNING:
            raise JobStateError("running jobs cannot be requeued")
        where = [_JOB.c.status == status.value]
        if kind is not None:
            where.append(_JOB.c.kind == kind)
        if study_instance_uid is not None:
            where.append(_JOB.c.study_instance_uid == study_instance_uid)
        with self.db.write_connection() as conn:
            count = conn.execute(update(_JOB).where(*where).values(**self._requeued())).rowcount
        log.info("jobs requeued", extra={"status": status.value, "kind": kind, "count": count})
        return int(count)

    def _requeued(self) -> dict[str, Any]:
        return {
            "status": JobStatus.QUEUED.value,
            "attempts": 0,
            "next_run_at": self._now(),
            "locked_by": None,
            "locked_until": None,
            "finished_at": None,
            "updated_at": self._now(),
        }

    # --- reading -------------------------------------------------------------------------
    def get(self, job_id: int) -> JobRecord | None:
        """The job ``job_id``; None if there is none (ids beyond :data:`MAX_JOB_ID` included,
        without asking the index: it could not even compare them)."""
        if not 0 < job_id <= MAX_JOB_ID:
            return None
        with self.db.engine.connect() as conn:
            row = conn.execute(select(_JOB).where(_JOB.c.id == job_id)).first()
        return None if row is None else JobRecord.from_row(row)

    def list(
        self,
        *,
        status: JobStatus | None = None,
        kind: str | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> JobList:
        """Jobs, newest first, filtered by status, kind and study."""
        if not (0 <= limit <= MAX_JOB_ID and 0 <= offset <= MAX_JOB_ID):
            raise ValueError(f"limit and offset must be integers from 0 to {MAX_JOB_ID}")
        query = select(_JOB).order_by(_JOB.c.id.desc()).limit(limit).offset(offset)
        if status is not None:
            query = query.where(_JOB.c.status == JobStatus(status).value)
        if kind is not None:
            query = query.where(_JOB.c.kind == kind)
        if study_instance_uid is not None:
            query = query.where(_JOB.c.study_instance_uid == study_instance_uid)
        with self.db.engine.connect() as conn:
            return [JobRecord.from_row(row) for row in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Number of jobs per status (every status present, zeros included)."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(_JOB.c.status, func.count()).group_by(_JOB.c.status)).all()
        counts = {status.value: 0 for status in JobStatus}
        counts.update({row[0]: int(row[1]) for row in rows})
        return counts

    # --- retention -----------------------------------------------------------------------
    def prune(self, retention: Mapping[JobStatus, float]) -> dict[str, int]:
        """Delete finished jobs (``done``, ``dead``) that finished more than
        ``retention[status]`` seconds ago (a status absent, or 0: kept). Returns how many
        were deleted per status."""
        deleted: dict[str, int] = {}
        for status, seconds in retention.items():
            if status not in (JobStatus.DONE, JobStatus.DEAD):
                raise ValueError(f"only finished jobs are pruned, not {status.value} ones")
            if seconds <= 0:
                continue
            with self.db.write_connection() as conn:
                count = conn.execute(
                    delete(_JOB).where(
                        _JOB.c.status == status.value,
                        _JOB.c.finished_at.is_not(None),
                        _JOB.c.finished_at < self._after(-seconds),
                    )
                ).rowcount
            deleted[status.value] = int(count)
            if count:
                log.info("finished jobs pruned", extra={"status": status.value, "count": count})
        return deleted


JobHandler = Callable[[JobRecord], None]
"""Runs one job. Returning means done; raising means failed (retried, or dead when it raised
:class:`PermanentJobError` or was the last attempt). Must be idempotent: see the module doc."""


def worker_name(suffix: str = "") -> str:
    """``host:pid:random`` — unique per worker, readable in ``locked_by``."""
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return f"{name}:{suffix}" if suffix else name


class Worker:
    """Claims jobs of the registered kinds and runs their handlers, one at a time.

    ``run()`` loops until ``stop()``: claim, run, record; sleeps ``poll_interval`` when idle.
    While a handler runs, a heartbeat thread renews the lease every third of its length.
    ``stop()`` lets the current job finish (its result is recorded) and then returns.
    """

    def __init__(
        self,
        queue: JobQueue,
        *,
        name: str | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.queue = queue
        self.name = name or worker_name()
        self.poll_interval = poll_interval
        self._handlers: dict[str, JobHandler] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    def register(self, kind: str, handler: JobHandler) -> None:
        if kind in self._handlers:
            raise ValueError(f"a handler for job kind {kind!r} is already registered")
        self._handlers[kind] = handler

    # --- running -------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and run one job. False when there was nothing to run."""
        kinds = self.kinds
        # A read first: an idle worker does not take SQLite's write lock at every poll.
        if not self.queue.has_runnable(kinds):
            return False
        job = self.queue.claim(self.name, kinds)
        if job is None:
            return False
        self._run(job)
        return True

    def _run(self, job: JobRecord) -> None:
        fields = {"job": job.id, "kind": job.kind, "attempt": job.attempts, "worker": self.name}
        log.info("job started", extra=fields)
        started = time.monotonic()
        with _Heartbeat(self.queue, job):
            try:
                self._handlers[job.kind](job)
            except Exception as exc:
                elapsed = round(time.monotonic() - started, 3)
                error = f"{type(exc).__name__}: {exc}"
                status = self.queue.fail(
                    job,
                    error + "\n" + traceback.format_exc(limit=20),
                    permanent=isinstance(exc, PermanentJobError),
                )
                log.log(
                    logging.ERROR if status is JobStatus.DEAD else logging.WARNING,
                    "job failed",
                    extra={**fields, "error": error, "status": status, "seconds": elapsed},
                )
                return
        elapsed = round(time.monotonic() - started, 3)
        if self.queue.complete(job):
            log.info("job done", extra={**fields, "seconds": elapsed})
        else:
            log.warning("job finished after its lease was lost; not recorded", extra=fields)

    def run(self) -> None:
        """Run jobs until :meth:`stop` is called."""
        log.info("worker started", extra={"worker": self.name, "kinds": ",".join(self.kinds)})
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:
                # The index is unreachable or the like: keep the worker alive and retry.
                log.exception("worker cannot reach the job queue", extra={"worker": self.name})
                ran = False
            if not ran:
                self._stop.wait(self.poll_interval)
        log.info("worker stopped", extra={"worker": self.name})

    def start(self) -> threading.Thread:
        """Run in a background (daemon) thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"worker-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def request_stop(self) -> None:
        """Ask the loop to stop after the current job, without waiting."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the loop to stop after the current job; True if it stopped within ``timeout``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True


class _Heartbeat:
    """Renews a job's lease every third of its length while the handler runs."""

    def __init__(self, queue: JobQueue, job: JobRecord) -> None:
        self.queue = queue
        self.job = job
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = self.queue.lease_seconds / 3
        while not self._done.wait(interval):
            try:
                held = self.queue.renew(self.job)
            except Exception as exc:
                log.warning("cannot renew job lease", extra={"job": self.job.id, "err": str(exc)})
                continue
            if not held:
                log.warning("job lease lost while running", extra={"job": self.job.id})
                return
