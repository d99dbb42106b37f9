"""Operations: Prometheus ``/metrics`` over every process, JSON logs with request ids, graceful
shutdown of a real ``pacsbridge serve``, and pruning of finished jobs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import func, select, update

from archive import Archive
from archive.jobs import JobStatus
from archive.metrics import JobQueueCollector
from archive.models import Instance, Job
from archive.stable import StableStudyScanner
from billing.models import ChargeItem
from config.logging import JsonFormatter, TextFormatter, bind_request_id
from tests.conftest import RunningServer, start_server
from tests.dicom_factory import ct_slice
from tests.job_handlers import create_execution_table

REPO = Path(__file__).resolve().parent.parent


def _instances(count: int, *, mr: bool = False) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for index in range(count):
        ds = ct_slice(study_uid=study, series_uid=series, index=index, size=16)
        if mr:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.Modality = "MR"
        out.append(ds)
    return out


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae


def _store(server: RunningServer, title: str, datasets: list[Dataset]) -> None:
    assoc = _ae(title).associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def _scrape(server: RunningServer) -> dict[str, Any]:
    """{family name: {(sample name, sorted labels): value}} of one scrape of /metrics."""
    answer = httpx.get(f"{server.http}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(answer.text):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families


def _value(families: dict[str, Any], sample: str, **labels: str) -> float | None:
    family: dict[Any, float] = next(
        (f for f in families.values() if any(s == sample for s, _ in f)), {}
    )
    return family.get((sample, tuple(sorted(labels.items()))))


def _wait(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _server_env(**extra: str) -> dict[str, str]:
    return {
        "PYTHONPATH": str(REPO),  # tests.job_handlers, for the test job kind
        "PACSBRIDGE_EXTRA_HANDLERS": json.dumps(["tests.job_handlers:register"]),
        "PACSBRIDGE_WORKER_POLL_INTERVAL": "0.05",
        "PACSBRIDGE_AI": json.dumps({"enabled": False}),
        **extra,
    }


# --- /metrics ---------------------------------------------------------------------------------


def test_metrics_count_a_workload_across_processes(backend: Any, tmp_path: Path) -> None:
    with closing(Archive(backend.settings)) as archive:
        create_execution_table(archive.db.engine)
    # Two acceptor processes: associations go to either, and one scrape shows them all.
    server = start_server(
        backend,
        tmp_path,
        **_server_env(
            PACSBRIDGE_DIMSE_PROCESSES="2",
            PACSBRIDGE_REQUIRE_CALLED_AE_TITLE="true",
            PACSBRIDGE_BILLING=json.dumps({"enabled": True}),
            PACSBRIDGE_STABLE_AGE="2",
            PACSBRIDGE_STABLE_SCAN_INTERVAL="0.2",
        ),
    )
    try:
        _wait(
            lambda: httpx.get(f"{server.http}/health").json()["dimse_processes"]["ready"] == 2,
            what="the second acceptor process",
        )
        # Nothing yet: no instance, no association.
        before = _scrape(server)
        assert not any(
            k[0] == "pacsbridge_instances_stored_total"
            for k in before.get("pacsbridge_instances_stored", {})
        )
        # The workload: 5 CT instances from MOD_A, 3 MR from MOD_B (one association each).
        _store(server, "MOD_A", _instances(5))
        _store(server, "MOD_B", _instances(3, mr=True))
        # One C-FIND (from FINDSCU), and an association with a wrong called AE title.
        assoc = _ae("FINDSCU").associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        found = [
            ds
            for status, ds in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            )
            if status and status.Status in (0xFF00, 0xFF01)
        ]
        assoc.release()
        assert len(found) == 2
        rejected = _ae("STRANGER").associate("127.0.0.1", server.dimse_port, ae_title="NOT_US")
        assert rejected.is_rejected
        # One QIDO-RS search, one FHIR search.
        studies = httpx.get(f"{server.http}/dicom-web/studies", timeout=30)
        assert studies.status_code == 200 and len(studies.json()) == 2
        bundle = httpx.get(f"{server.http}/fhir/ImagingStudy", timeout=30)
        assert bundle.status_code == 200 and bundle.json()["total"] == 2
        # One job of a test kind, run by the worker inside serve.
        with closing(server.archive()) as archive:
            job_id = archive.jobs.enqueue("test.record", {})
            _wait(
                lambda: (
                    (job := archive.jobs.get(job_id)) is not None and job.status is JobStatus.DONE
                ),
                what="the test job",
            )
            # Both studies become stable: a charge-capture job each, which captures charges.
            _wait(
                lambda: (
                    archive.jobs.counts()["done"] == 3
                    and not archive.jobs.list(status=JobStatus.QUEUED)
                    and not archive.jobs.list(status=JobStatus.RUNNING)
                ),
                what="the charge-capture jobs",
            )
            with archive.db.session() as session:
                stored_bytes = session.scalar(select(func.sum(Instance.size_bytes)))
                charges = session.scalar(select(func.count()).select_from(ChargeItem))
                job_rows = session.execute(
                    select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
                ).all()
        assert charges and charges >= 2  # a technical charge per study at least
        # The gauge of open associations falls back to 0 once each association thread ends.
        _wait(
            lambda: _value(_scrape(server), "pacsbridge_associations_open") == 0.0,
            what="no open association",
        )
        metrics = _scrape(server)
    finally:
        assert server.stop() == 0, server.log()[-3000:]

    stored = {
        labels: value
        for (name, labels), value in metrics["pacsbridge_instances_stored"].items()
        if name == "pacsbridge_instances_stored_total"
    }
    assert stored == {
        (("calling_ae", "MOD_A"), ("sop_class", str(CTImageStorage))): 5.0,
        (("calling_ae", "MOD_B"), ("sop_class", str(MRImageStorage))): 3.0,
    }
    assert stored_bytes is not None
    assert _value(metrics, "pacsbridge_ingest_bytes_total") == float(stored_bytes)
    assert _value(metrics, "pacsbridge_ingest_duration_seconds_count") == 8.0
    assert _value(metrics, "pacsbridge_ingest_duration_seconds_bucket", le="+Inf") == 8.0
    associations = {
        labels: value
        for (name, labels), value in metrics["pacsbridge_associations"].items()
        if name == "pacsbridge_associations_total"
    }
    assert associations == {
        (("calling_ae", "MOD_A"), ("result", "accepted")): 1.0,
        (("calling_ae", "MOD_B"), ("result", "accepted")): 1.0,
        (("calling_ae", "FINDSCU"), ("result", "accepted")): 1.0,
        (("calling_ae", "STRANGER"), ("result", "rejected")): 1.0,
    }
    query = "pacsbridge_query_duration_seconds_count"
    assert _value(metrics, query, service="C-FIND", level="STUDY") == 1.0
    assert _value(metrics, query, service="QIDO-RS", level="STUDY") == 1.0
    fhir = {
        labels: value
        for (name, labels), value in metrics["pacsbridge_fhir_request_duration_seconds"].items()
        if name == "pacsbridge_fhir_request_duration_seconds_count"
    }
    assert fhir == {(("method", "GET"), ("resource_type", "ImagingStudy"), ("status", "200")): 1.0}
    # The job queue as the table holds it, by kind and status.
    depth = {
        dict(labels)["kind"] + "/" + dict(labels)["status"]: value
        for (_name, labels), value in metrics["pacsbridge_jobs"].items()
    }
    assert depth == {f"{kind}/{status}": float(count) for kind, status, count in job_rows}
    assert depth["test.record/done"] == 1.0 and depth["charge-capture/done"] == 2.0
    ages = metrics["pacsbridge_jobs_oldest_age_seconds"]
    assert len(ages) == len(depth) and all(age >= 0 for age in ages.values())
    created = {
        dict(labels)["kind"]: value
        for (name, labels), value in metrics["pacsbridge_charges_created"].items()
        if name == "pacsbridge_charges_created_total"
    }
    assert created == {"technical": float(charges)}


def test_a_worker_process_counts_into_the_scrape_of_serve(
    make_backend: Any, tmp_path: Path
) -> None:
    """A `pacsbridge worker` on the same data dir: the charges its jobs create are in the
    `/metrics` of `serve`, and a worker's counts survive its exit."""
    backend = make_backend("sqlite", "file")
    extra = {
        "PACSBRIDGE_WORKER_IN_SERVE": "false",
        "PACSBRIDGE_BILLING": json.dumps({"enabled": True}),
        "PACSBRIDGE_STABLE_AGE": "1",
        "PACSBRIDGE_STABLE_SCAN_INTERVAL": "0.2",
        "PACSBRIDGE_WORKER_POLL_INTERVAL": "0.05",
        "PACSBRIDGE_AI": json.dumps({"enabled": False}),
        "PACSBRIDGE_LOG_FORMAT": "json",
    }
    server = start_server(backend, tmp_path, **extra)
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "pacsbridge"), "worker"],
        env={**os.environ, **backend.env, **extra},
        cwd=tmp_path,
        stdout=worker_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _store(server, "MOD_W", _instances(2))
        with closing(server.archive()) as archive:
            _wait(
                lambda: archive.jobs.counts()["done"] == 1,
                what="the charge capture by the worker",
            )
            (job,) = archive.jobs.list(status=JobStatus.DONE)
            with archive.db.session() as session:
                charges = session.scalar(select(func.count()).select_from(ChargeItem))
        assert job.kind == "charge-capture"
        _wait(lambda: "job done" in worker_log.read_text(), what="the worker's log line")
        (done,) = [
            line for line in _json_lines(worker_log.read_text()) if line["msg"] == "job done"
        ]
        assert done["job"] == job.id and f":{worker.pid}:" in done["worker"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker_log.read_text()[-3000:]
        # The worker has exited: what it counted is still in the sum.
        metrics = _scrape(server)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        assert server.stop() == 0
    assert charges and charges >= 1
    assert _value(metrics, "pacsbridge_charges_created_total", kind="technical") == float(charges)
    stored = _value(
        metrics, "pacsbridge_instances_stored_total", calling_ae="MOD_W", sop_class=CTImageStorage
    )
    assert stored == 2.0


def test_ai_stage_durations_are_observed() -> None:
    from prometheus_client import REGISTRY

    from ai.stages import Timings

    def count(stage: str) -> float:
        value = REGISTRY.get_sample_value(
            "pacsbridge_ai_stage_duration_seconds_count", {"stage": stage}
        )
        return value or 0.0

    before = count("test-infer")
    timings = Timings()
    for _ in range(3):
        with timings.stage("test-infer"):
            time.sleep(0.001)
    assert count("test-infer") == before + 3
    assert timings.seconds["test-infer"] > 0


def test_metrics_need_the_admin_role_unless_on_loopback(make_backend: Any, tmp_path: Path) -> None:
    from security.roles import allowed

    # The role table: admin only (the route walk in tests/test_auth.py checks it over HTTP).
    assert allowed("admin", "GET", "/metrics")
    for role in ("radiologist", "clinician", "billing", "modality", "service"):
        assert not allowed(role, "GET", "/metrics")
    backend = make_backend("sqlite", "file")
    server = start_server(
        backend,
        tmp_path,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_METRICS_LOOPBACK_WITHOUT_AUTH="true",
    )
    try:
        # From 127.0.0.1 without a token: the metrics; any other route still needs one.
        answer = httpx.get(f"{server.http}/metrics", timeout=30)
        assert answer.status_code == 200
        assert "pacsbridge_ingest_duration_seconds" in answer.text
        assert httpx.get(f"{server.http}/api/jobs", timeout=30).status_code == 401
    finally:
        assert server.stop() == 0
    # From an address that is not loopback, it needs a token.
    from fastapi.testclient import TestClient

    from config import Settings
    from pacsbridge.app import create_app

    settings = Settings(
        data_dir=tmp_path / "other", auth="required", metrics_loopback_without_auth=True
    )
    with closing(Archive(settings)) as archive:
        client = TestClient(create_app(archive, settings), client=("192.0.2.10", 50000))
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")


# --- logs ---------------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.strip():
            lines.append(json.loads(line))  # every line is one JSON object
    return lines


def test_json_logs_carry_the_request_id(make_backend: Any, tmp_path: Path) -> None:
    backend = make_backend("sqlite", "file")
    server = start_server(backend, tmp_path, PACSBRIDGE_LOG_FORMAT="json")
    try:
        with closing(server.archive()) as archive:
            job_id = archive.jobs.enqueue("no-worker-for-this-kind", {})
            with archive.db.write_connection() as conn:
                conn.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(status="dead", finished_at=func.now())
                )
        # A request that logs (a requeue), with the caller's id: echoed, and in its log line.
        answer = httpx.post(
            f"{server.http}/api/jobs/{job_id}/requeue",
            headers={
                "X-Request-ID": "ops-test-42",
                "Authorization": "Bearer eyJhbGciOiJub25lIn0.e30.x",
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-request-id"] == "ops-test-42"
        # An id that is not sane (spaces, too long) is replaced by a fresh one.
        for bad in ("has spaces", "x" * 200, "a\tb"):
            echoed = httpx.get(
                f"{server.http}/health", headers={"X-Request-ID": bad}, timeout=30
            ).headers["x-request-id"]
            assert echoed != bad and len(echoed) == 32 and int(echoed, 16) >= 0
        fresh = httpx.get(f"{server.http}/health", timeout=30).headers["x-request-id"]
        assert len(fresh) == 32
        # The direct GET paths of DICOMweb and FHIR, and an error answer, echo it too.
        for path, status in (
            ("/dicom-web/studies", 200),
            ("/fhir/Patient", 200),
            ("/dicom-web/studies/1.2.3/metadata", 404),
        ):
            answer = httpx.get(
                f"{server.http}{path}", headers={"X-Request-ID": "ops-direct"}, timeout=30
            )
            assert answer.status_code == status, (path, answer.status_code)
            assert answer.headers["x-request-id"] == "ops-direct", path
        _wait(lambda: "ops-test-42" in server.log(), what="the request's log line")
        # Two associations, each storing an instance without Study Instance UID: refused
        # (0xA900), and logged under the association's id.
        for _ in range(2):
            incomplete = _instances(1)[0]
            del incomplete.StudyInstanceUID
            assoc = _ae("LOGTEST").associate(
                "127.0.0.1", server.dimse_port, ae_title=server.ae_title
            )
            assert assoc.is_established
            try:
                assert assoc.send_c_store(incomplete).Status == 0xA900
            finally:
                assoc.release()
        _wait(lambda: server.log().count("C-STORE refused") == 2, what="the refusals' log lines")
    finally:
        assert server.stop() == 0
    lines = _json_lines(server.log())
    refusals = [line for line in lines if line["msg"] == "C-STORE refused"]
    ids = {line["request_id"] for line in refusals}
    assert len(ids) == 2 and all(re.fullmatch("[0-9a-f]{16}", str(i)) for i in ids), refusals
    assert all(line["calling_ae"] == "LOGTEST" for line in refusals)
    assert all({"ts", "level", "logger", "msg", "request_id"} <= set(line) for line in lines)
    (requeued,) = [line for line in lines if line["msg"] == "job requeued"]
    assert requeued["request_id"] == "ops-test-42"
    assert requeued["job"] == job_id and requeued["logger"] == "archive.jobs"
    assert next(line for line in lines if line["msg"] == "pacsbridge ready")["request_id"] is None
    assert "eyJhbGciOiJub25lIn0" not in server.log()


def test_log_lines_never_hold_secrets() -> None:
    record = logging.LogRecord(
        "pacsbridge.test",
        logging.INFO,
        __file__,
        1,
        "token request with Authorization: Bearer %s",
        ("abc.def-ghi",),
        None,
    )
    record.password = "hunter2"
    record.client_assertion = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln"
    record.headers = "authorization: Basic dXNlcjpwYXNz"
    record.study = "1.2.3"
    record.request = {
        "headers": {"Authorization": "Bearer abc.def-ghi", "X-Api-Key": "k-77"},
        "cookies": [{"name": "session", "token": "t-88"}],
        "url": "amqp://pacs:s3cr%2Ft@broker:5672/%2F",
    }
    record.broker = "amqps://events:pw-99@mq.example:5671/vh"
    # "@" and "/" in a password that should have been percent-encoded (RFC 3986 3.2.1).
    record.database = 'url="postgresql://pb:p@ss/w0rd@db:5432/pacs" pool=5'
    with bind_request_id("req-1"):
        payload = json.loads(JsonFormatter().format(record))
        text = TextFormatter().format(record)
    assert payload["msg"] == "token request with Authorization: Bearer [redacted]"
    assert payload["password"] == payload["client_assertion"] == "[redacted]"
    assert payload["headers"] == "authorization: Basic [redacted]"
    assert payload["study"] == "1.2.3" and payload["request_id"] == "req-1"
    assert payload["request"]["headers"] == {
        "Authorization": "[redacted]",
        "X-Api-Key": "[redacted]",
    }
    assert payload["request"]["cookies"] == "[redacted]"
    assert payload["request"]["url"] == "amqp://pacs:[redacted]@broker:5672/%2F"
    assert payload["broker"] == "amqps://events:[redacted]@mq.example:5671/vh"
    assert payload["database"] == 'url="postgresql://pb:[redacted]@db:5432/pacs" pool=5'
    secrets = ("hunter2", "abc.def-ghi", "eyJhbGciOiJFUzI1NiJ9", "dXNlcjpwYXNz", "k-77", "t-88")
    for secret in (*secrets, "s3cr%2Ft", "pw-99", "p@ss", "w0rd"):
        assert secret not in text and secret not in json.dumps(payload)
    assert "request_id=req-1" in text and "study=1.2.3" in text


def test_each_association_has_its_id_in_the_logs() -> None:
    """The id bound on an association's thread is on every record it writes, and apart from
    another thread's."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pacsbridge.test.assoc")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def serve(association_id: str) -> None:
        with bind_request_id(association_id):
            for _ in range(20):
                logger.info("served", extra={"assoc": association_id})

    threads = [threading.Thread(target=serve, args=(f"assoc-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    logger.removeHandler(handler)
    lines = _json_lines(stream.getvalue())
    assert len(lines) == 80
    assert all(line["request_id"] == line["assoc"] for line in lines)


# --- graceful shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sigterm_lets_associations_and_jobs_finish(
    make_backend: Any, tmp_path: Path, processes: str
) -> None:
    backend = make_backend("sqlite", "file")
    with closing(Archive(backend.settings)) as archive:
        create_execution_table(archive.db.engine)
    server = start_server(
        backend,
        tmp_path,
        **_server_env(PACSBRIDGE_DIMSE_PROCESSES=processes, PACSBRIDGE_SHUTDOWN_TIMEOUT="60"),
    )
    datasets = _instances(120)
    statuses: list[int] = []
    sent_enough = threading.Event()
    closed = threading.Event()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            assoc = _ae("MODALITY").associate(
                "127.0.0.1", server.dimse_port, ae_title=server.ae_title
            )
            assert assoc.is_established
            for ds in datasets:
                statuses.append(int(assoc.send_c_store(ds).Status))
                if len(statuses) == 20:
                    # The rest goes after the server began stopping.
                    sent_enough.set()
                    assert closed.wait(60)
            assoc.release()
        except BaseException as exc:
            errors.append(exc)
            sent_enough.set()

    # An HTTP request in progress at the signal: a STOW-RS whose body comes in two halves.
    uploaded = _instances(1)[0]
    buffer = io.BytesIO()
    uploaded.save_as(buffer, enforce_file_format=True)
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    body_begun = threading.Event()
    stow: list[httpx.Response] = []

    def halves() -> Any:
        yield body[: len(body) // 2]
        body_begun.set()  # the first half is written
        assert closed.wait(60)
        yield body[len(body) // 2 :]

    def upload() -> None:
        try:
            stow.append(
                httpx.post(
                    f"{server.http}/dicom-web/studies",
                    content=halves(),
                    headers={
                        "Content-Type": f'multipart/related; type="application/dicom"; '
                        f"boundary={boundary}"
                    },
                    timeout=120,
                )
            )
        except BaseException as exc:
            errors.append(exc)
            body_begun.set()

    try:
        if processes == "2":
            _wait(
                lambda: httpx.get(f"{server.http}/health").json()["dimse_processes"]["ready"] == 2,
                what="the second acceptor process",
            )
        with closing(server.archive()) as archive:
            job_id = archive.jobs.enqueue("test.record", {"sleep": 3})
            _wait(
                lambda: (
                    (job := archive.jobs.get(job_id)) is not None
                    and job.status is JobStatus.RUNNING
                ),
                what="the job to start",
            )
        sender = threading.Thread(target=send)
        sender.start()
        uploader = threading.Thread(target=upload)
        uploader.start()
        assert sent_enough.wait(60) and body_begun.wait(60)
        time.sleep(0.5)  # the server reads the request's head
        server.proc.send_signal(signal.SIGTERM)
        # No new association or HTTP connection: both ports stop listening.
        _wait(lambda: not _listening(server.dimse_port), what="the DICOM port to close")
        _wait(lambda: not _listening(server.http_port), what="the HTTP port to close")
        closed.set()
        sender.join(120)
        uploader.join(120)
        assert not errors, errors
        assert server.proc.wait(60) == 0, server.log()[-3000:]
    finally:
        server.stop()
    assert statuses == [0x0000] * len(datasets)
    (answer,) = stow
    assert answer.status_code == 200, answer.text
    assert answer.json()["00081199"]["Value"][0]["00081155"]["Value"] == [
        str(uploaded.SOPInstanceUID)
    ]
    with closing(server.archive()) as archive:
        with archive.db.session() as session:
            held = set(session.scalars(select(Instance.sop_instance_uid)).all())
        job = archive.jobs.get(job_id)
    assert held == {str(ds.SOPInstanceUID) for ds in [*datasets, uploaded]}
    assert job is not None and job.status is JobStatus.DONE and job.attempts == 1
    assert "pacsbridge stopped" in server.log()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- retention ------------------------------------------------------------------------------------


def test_finished_jobs_are_pruned_after_their_retention(index_backend: Any) -> None:
    with closing(Archive(index_backend.settings)) as archive:
        queue = archive.jobs
        ids = {
            name: queue.enqueue("test.prune", {"name": name})
            for name in ("old-done", "new-done", "old-dead", "queued", "old-failed")
        }
        now = datetime.now(UTC)
        finished = {
            "old-done": ("done", now - timedelta(days=8)),
            "new-done": ("done", now - timedelta(days=6)),
            "old-dead": ("dead", now - timedelta(days=30)),
            "old-failed": ("failed", None),
        }
        with archive.db.write_connection() as conn:
            for name, (status, at) in finished.items():
                conn.execute(
                    update(Job).where(Job.id == ids[name]).values(status=status, finished_at=at)
                )
        week = 7 * 86400.0
        scanner = StableStudyScanner(
            archive.db,
            queue,
            stable_age=60,
            retention={JobStatus.DONE: week, JobStatus.DEAD: 0.0},
            prune_interval=3600,
        )
        assert scanner.prune_due() == {"done": 1}  # dead jobs are kept (retention 0)
        left = {job.payload["name"] for job in queue.list()}
        assert left == {"new-done", "old-dead", "queued", "old-failed"}
        assert scanner.prune_due() == {}  # not due again within the interval
        assert queue.prune({JobStatus.DEAD: 29 * 86400.0}) == {"dead": 1}
        assert {job.payload["name"] for job in queue.list()} == {"new-done", "queued", "old-failed"}
        with pytest.raises(ValueError):
            queue.prune({JobStatus.QUEUED: 1.0})
        # The queue as /metrics reads it: one family each, by kind and status.
        depth, oldest = JobQueueCollector(archive.db).collect()
        assert {tuple(x.labels.values()): x.value for x in depth.samples} == {
            ("test.prune", "done"): 1.0,
            ("test.prune", "queued"): 1.0,
            ("test.prune", "failed"): 1.0,
        }
        assert len(oldest.samples) == 3 and all(0 <= x.value < 600 for x in oldest.samples)


def test_the_scanner_prunes_with_the_settings(make_backend: Any) -> None:
    from pacsbridge.jobs import JobRuntime, job_retention

    backend = make_backend("sqlite", "file", job_retention_days=1, stable_scan_interval=0.05)
    assert job_retention(backend.settings) == {JobStatus.DONE: 86400.0, JobStatus.DEAD: 0.0}
    with closing(Archive(backend.settings)) as archive:
        job_id = archive.jobs.enqueue("test.prune", {})
        with archive.db.write_connection() as conn:
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status="done", finished_at=datetime.now(UTC) - timedelta(days=2))
            )
        from pacsbridge.jobs import HandlerRegistry

        runtime = JobRuntime(archive, backend.settings, HandlerRegistry())
        runtime.start()
        try:
            _wait(lambda: archive.jobs.get(job_id) is None, timeout=30, what="the prune")
        finally:
            assert runtime.stop(timeout=30)
