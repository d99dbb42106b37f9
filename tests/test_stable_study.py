"""Stable-study detection on SQLite and PostgreSQL: once per stabilisation, again after a new
instance, exactly once with concurrent scanners, and end to end in `pacsbridge serve`."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import cast

import httpx
import pytest
from alembic import command
from pydicom.uid import generate_uid
from sqlalchemy import Table, insert, select

from archive import Archive
from archive.db import Database, alembic_config
from archive.jobs import JobQueue, JobStatus
from archive.models import Patient, Study
from archive.stable import StableStudyScanner
from tests.conftest import Backend, start_server
from tests.dicom_factory import write_series
from tests.job_handlers import create_execution_table, executions

REPO = Path(__file__).resolve().parent.parent
KINDS = ["on-stable-a", "on-stable-b"]


@pytest.fixture(params=["sqlite", "postgresql"])
def arc(request: pytest.FixtureRequest, make_backend) -> Iterator[Archive]:
    backend: Backend = make_backend(request.param, stable_age=1)
    with closing(Archive(backend.settings)) as archive:
        yield archive


def ingest_series(arc: Archive, directory: Path, count: int, study_uid: str) -> None:
    for path in write_series(directory, count, size=8, study_uid=study_uid):
        arc.ingest(path.read_bytes())


def stable_at(arc: Archive, study_uid: str) -> object:
    with arc.db.engine.connect() as conn:
        return conn.execute(
            select(Study.stable_at).where(Study.study_instance_uid == study_uid)
        ).scalar_one()


def job_keys(queue: JobQueue) -> Counter[tuple[str, str | None]]:
    return Counter((j.kind, j.study_instance_uid) for j in queue.list(limit=10_000))


def test_stable_once_then_again_after_a_new_instance(arc: Archive, tmp_path: Path):
    scanner = StableStudyScanner(arc.db, arc.jobs, stable_age=1, kinds=KINDS)
    study = generate_uid()
    ingest_series(arc, tmp_path / "s1", 3, study)

    assert scanner.scan() == []  # still receiving, as far as anyone knows
    assert stable_at(arc, study) is None
    time.sleep(1.2)
    (declared,) = scanner.scan()
    assert declared.study_instance_uid == study
    assert stable_at(arc, study) is not None
    jobs = arc.jobs.list()
    assert sorted(j.kind for j in jobs) == KINDS
    for job in jobs:
        assert job.study_instance_uid == study
        assert job.payload == {
            "study_instance_uid": study,
            "updated_at": declared.updated_at.isoformat(),
        }
        assert job.status is JobStatus.QUEUED
    assert scanner.scan() == []  # stable once, not at every pass
    time.sleep(1.2)
    assert scanner.scan() == []
    assert len(arc.jobs.list()) == 2

    ingest_series(arc, tmp_path / "s2", 1, study)  # a late series: unstable again
    assert stable_at(arc, study) is None
    assert scanner.scan() == []
    time.sleep(1.2)
    (again,) = scanner.scan()
    assert again.study_instance_uid == study
    assert again.updated_at > declared.updated_at
    assert job_keys(arc.jobs) == {(kind, study): 2 for kind in KINDS}
    assert scanner.scan() == []


def test_duplicate_instance_does_not_make_a_study_unstable(arc: Archive, tmp_path: Path):
    scanner = StableStudyScanner(arc.db, arc.jobs, stable_age=1, kinds=KINDS)
    study = generate_uid()
    paths = write_series(tmp_path / "s", 2, size=8, study_uid=study)
    for path in paths:
        arc.ingest(path.read_bytes())
    time.sleep(1.2)
    assert len(scanner.scan()) == 1
    arc.ingest(paths[0].read_bytes())  # duplicate_policy "keep": nothing new arrived
    assert stable_at(arc, study) is not None
    time.sleep(1.2)
    assert scanner.scan() == []


def test_without_stable_study_kinds_studies_are_still_marked(arc: Archive, tmp_path: Path):
    scanner = StableStudyScanner(arc.db, arc.jobs, stable_age=1)
    study = generate_uid()
    ingest_series(arc, tmp_path / "s", 1, study)
    time.sleep(1.2)
    assert [s.study_instance_uid for s in scanner.scan()] == [study]
    assert arc.jobs.list() == []


def test_concurrent_scanners_enqueue_exactly_once(arc: Archive, tmp_path: Path):
    studies = [generate_uid() for _ in range(24)]

    def scan_concurrently() -> list[str]:
        """Four scanners, each with its own engine (own connections), scanning at once."""
        declared: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(4)

        def scan() -> None:
            db = Database(str(arc.db.url.render_as_string(hide_password=False)), pool_size=2)
            try:
                scanner = StableStudyScanner(db, JobQueue(db), stable_age=1, kinds=KINDS, batch=5)
                barrier.wait()
                found = scanner.scan()
                with lock:
                    declared.extend(s.study_instance_uid for s in found)
            finally:
                db.dispose()

        threads = [threading.Thread(target=scan) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return declared

    for i, study in enumerate(studies):
        ingest_series(arc, tmp_path / f"a{i}", 1, study)
    time.sleep(1.2)
    first = scan_concurrently()
    assert sorted(first) == sorted(studies)  # each declared by exactly one scanner
    assert job_keys(arc.jobs) == {(kind, s): 1 for kind in KINDS for s in studies}

    for i, study in enumerate(studies):
        ingest_series(arc, tmp_path / f"b{i}", 1, study)
    time.sleep(1.2)
    second = scan_concurrently()
    assert sorted(second) == sorted(studies)
    assert job_keys(arc.jobs) == {(kind, s): 2 for kind in KINDS for s in studies}


def test_studies_present_before_the_upgrade_count_as_stable(make_backend, tmp_path: Path):
    """Migration 0002 must not fire every handler for an existing archive's whole history."""
    backend: Backend = make_backend("sqlite", stable_age=1)
    with closing(Archive(backend.settings, migrate=False)) as arc:
        with arc.db.engine.connect() as conn:
            cfg = alembic_config(arc.db.engine)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            patient = conn.execute(
                insert(cast(Table, Patient.__table__))
                .values(patient_id="P", issuer_of_patient_id="")
                .returning(Patient.id)
            ).scalar_one()
            conn.execute(
                insert(cast(Table, Study.__table__)).values(
                    study_instance_uid="1.2.3", patient_fk=patient
                )
            )
            conn.commit()
        arc.db.upgrade()
        assert stable_at(arc, "1.2.3") is not None
        scanner = StableStudyScanner(arc.db, arc.jobs, stable_age=1, kinds=KINDS)
        assert scanner.scan() == []


# --- end to end: `pacsbridge serve` scans, enqueues and runs the handlers -------------------


def serve_env(**extra: str) -> dict[str, str]:
    return {
        "PYTHONPATH": str(REPO),
        "PACSBRIDGE_EXTRA_HANDLERS": json.dumps(["tests.job_handlers:register_stable"]),
        "PACSBRIDGE_STABLE_AGE": "1",
        "PACSBRIDGE_STABLE_SCAN_INTERVAL": "0.2",
        "PACSBRIDGE_WORKER_POLL_INTERVAL": "0.1",
        "PACSBRIDGE_AI": json.dumps({"enabled": False}),  # only the test kinds on stable
        **extra,
    }


def test_serve_runs_stable_study_handlers(backend: Backend, tmp_path: Path):
    server = start_server(backend, tmp_path, **serve_env())
    try:
        with closing(server.archive()) as arc, httpx.Client(base_url=server.http) as http:
            create_execution_table(arc.db.engine)
            study = generate_uid()
            ingest_series(arc, tmp_path / "s", 4, study)

            def finished() -> list[dict]:
                jobs = http.get("/api/jobs", params={"study": study}).json()
                return [j for j in jobs if j["status"] == "done"]

            deadline = time.monotonic() + 30
            while len(finished()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sorted(j["kind"] for j in finished()) == ["test.on-stable-a", "test.on-stable-b"]
            with arc.db.engine.connect() as conn:
                rows = list(conn.execute(select(executions)))
            assert sorted(r.kind for r in rows) == ["test.on-stable-a", "test.on-stable-b"]
            assert {(r.study, r.pid, r.attempt) for r in rows} == {(study, server.proc.pid, 1)}
            time.sleep(1.5)  # quiet study, more scans: no second round
            assert len(http.get("/api/jobs").json()) == 2
    finally:
        assert server.stop() == 0, server.log()


def test_serve_without_in_process_worker_leaves_jobs_to_workers(make_backend, tmp_path: Path):
    backend: Backend = make_backend("sqlite")
    server = start_server(backend, tmp_path, **serve_env(PACSBRIDGE_WORKER_IN_SERVE="false"))
    try:
        with closing(server.archive()) as arc:
            study = generate_uid()
            ingest_series(arc, tmp_path / "s", 1, study)
            job_id = arc.jobs.enqueue("test.on-stable-a")
            time.sleep(2.0)
            job = arc.jobs.get(job_id)
            assert job is not None and job.status is JobStatus.QUEUED
            assert stable_at(arc, study) is None  # no scanner in this process either
    finally:
        assert server.stop() == 0, server.log()
    assert "job workers and stable-study scanner started" not in server.log()
    assert os.path.exists(server.log_path)
