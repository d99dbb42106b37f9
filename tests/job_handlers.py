"""Test-only job kinds, loaded into real ``pacsbridge worker`` / ``serve`` processes through the
``extra_handlers`` setting: ``PACSBRIDGE_EXTRA_HANDLERS='["tests.job_handlers:register"]'``
(with the repository root on ``PYTHONPATH``).

Every execution is recorded in ``test_job_execution`` (its own table, created by the test with
:func:`create_execution_table`): a row when the handler starts, committed at once, and
``finished_at`` when it returns. So a test can count executions and completions exactly, even
of a handler whose process was killed.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    update,
)

from archive import Archive
from archive.jobs import JobHandler, JobRecord, PermanentJobError
from config import Settings
from pacsbridge.jobs import HandlerRegistry

metadata = MetaData()
executions = Table(
    "test_job_execution",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("worker", String(128)),
    Column("study", String(64)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
)


def create_execution_table(engine: Engine) -> None:
    metadata.create_all(engine)


def _recording(archive: Archive, settings: Settings) -> JobHandler:
    """``test.record``: records itself; sleeps ``payload["sleep"]`` seconds (or
    ``payload["first_attempt_sleep"]`` on attempt 1); fails its first ``payload["fail"]``
    attempts, and every attempt while the file ``payload["fail_while_exists"]`` exists;
    ``payload["permanent"]`` raises a permanent error."""

    def handle(job: JobRecord) -> None:
        with archive.db.write_connection() as conn:
            row_id = conn.execute(
                insert(executions)
                .values(
                    job_id=job.id,
                    kind=job.kind,
                    attempt=job.attempts,
                    pid=os.getpid(),
                    worker=job.locked_by,
                    study=job.study_instance_uid,
                    started_at=datetime.now(UTC),
                )
                .returning(executions.c.id)
            ).scalar_one()
        payload = job.payload
        sleep = payload.get("sleep", 0.0)
        if job.attempts == 1 and "first_attempt_sleep" in payload:
            sleep = payload["first_attempt_sleep"]
        time.sleep(sleep)
        if payload.get("permanent"):
            raise PermanentJobError("this payload can never succeed")
        if job.attempts <= payload.get("fail", 0):
            raise RuntimeError(f"planned failure on attempt {job.attempts}")
        if "fail_while_exists" in payload and os.path.exists(payload["fail_while_exists"]):
            raise RuntimeError(f"{payload['fail_while_exists']} exists")
        with archive.db.write_connection() as conn:
            conn.execute(
                update(executions)
                .where(executions.c.id == row_id)
                .values(finished_at=datetime.now(UTC))
            )

    return handle


def register(registry: HandlerRegistry) -> None:
    registry.register("test.record", _recording)


def register_stable(registry: HandlerRegistry) -> None:
    """Two stable-study kinds, both recorded like ``test.record``."""
    registry.register("test.on-stable-a", _recording, on_stable_study=True)
    registry.register("test.on-stable-b", _recording, on_stable_study=True)
