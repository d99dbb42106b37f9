"""The durable job queue on SQLite and PostgreSQL: claims, leases, retries, dead jobs, requeue,
in-process workers, real `pacsbridge worker` processes (two at once; kill -9), CLI and HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from archive import Archive
from archive.jobs import (
    JobQueue,
    JobRecord,
    JobStateError,
    JobStatus,
    PermanentJobError,
    Worker,
    backoff_delay,
)
from tests.conftest import Backend, start_server
from tests.job_handlers import create_execution_table, executions

REPO = Path(__file__).resolve().parent.parent
PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    with closing(Archive(index_backend.settings)) as archive:
        yield archive


def queue_of(arc: Archive, **options: float) -> JobQueue:
    """A second queue object on the same index (as another worker process would have)."""
    values: dict = {"max_attempts": 3, "lease_seconds": 30.0, "backoff_base": 0.2}
    values |= options
    return JobQueue(arc.db, **values)


def wait_until(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


# --- the queue ------------------------------------------------------------------------------


def test_enqueue_claim_complete(arc: Archive):
    q = queue_of(arc)
    job_id = q.enqueue("alpha", {"n": 1}, study_instance_uid="1.2.3")

    queued = q.get(job_id)
    assert queued is not None
    assert (queued.status, queued.attempts, queued.kind) == (JobStatus.QUEUED, 0, "alpha")
    assert queued.payload == {"n": 1}
    assert queued.study_instance_uid == "1.2.3"
    assert queued.max_attempts == 3
    assert queued.next_run_at.tzinfo is not None

    job = q.claim("w1", ["alpha"])
    assert job is not None and job.id == job_id
    assert (job.status, job.attempts, job.locked_by) == (JobStatus.RUNNING, 1, "w1")
    assert job.locked_until is not None and job.locked_until > job.updated_at
    assert q.claim("w2", ["alpha"]) is None  # leased to w1

    assert q.complete(job)
    done = q.get(job_id)
    assert done is not None
    assert (done.status, done.locked_by, done.locked_until) == (JobStatus.DONE, None, None)
    assert done.finished_at is not None
    assert not q.complete(job)  # a second completion is refused
    assert q.claim("w2", ["alpha"]) is None


def test_claim_takes_only_handled_kinds_that_are_due(arc: Archive):
    q = queue_of(arc)
    later = q.enqueue("alpha", delay=60)
    other = q.enqueue("beta")
    first, second = q.enqueue("alpha"), q.enqueue("alpha")

    assert q.claim("w", []) is None
    assert not q.has_runnable(["gamma"])
    assert q.claim("w", ["gamma"]) is None
    claimed = [q.claim("w", ["alpha"]), q.claim("w", ["alpha"]), q.claim("w", ["alpha"])]
    assert [j.id if j else None for j in claimed] == [first, second, None]  # oldest first
    beta = q.claim("w", ["alpha", "beta"])
    assert beta is not None and beta.id == other
    later_job = q.get(later)
    assert later_job is not None and later_job.status is JobStatus.QUEUED


def test_concurrent_claims_in_threads_never_share_a_job(arc: Archive):
    q = queue_of(arc)
    ids = set(q.enqueue_many([("alpha", {"i": i}, None) for i in range(60)]))
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        own = queue_of(arc)
        while (job := own.claim(name, ["alpha"])) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)


def test_failures_back_off_then_die(arc: Archive):
    q = queue_of(arc, max_attempts=3, backoff_base=0.3)
    job_id = q.enqueue("alpha")
    delays = []
    for attempt in (1, 2, 3):
        wait_until(lambda: q.has_runnable(["alpha"]), what=f"attempt {attempt} due")
        job = q.claim("w", ["alpha"])
        assert job is not None and job.attempts == attempt
        status = q.fail(job, f"boom {attempt}")
        record = q.get(job_id)
        assert record is not None
        assert (record.last_error, record.locked_by, record.attempts) == (
            f"boom {attempt}",
            None,
            attempt,
        )
        if attempt < 3:
            assert status is record.status is JobStatus.FAILED
            assert record.finished_at is None
            delays.append((record.next_run_at - record.updated_at).total_seconds())
            assert q.claim("w", ["alpha"]) is None  # not before next_run_at
        else:
            assert status is record.status is JobStatus.DEAD
            assert record.finished_at is not None
    assert q.claim("w", ["alpha"]) is None
    assert not q.has_runnable(["alpha"])
    # base * 2**(attempts-1), less up to half of it as jitter
    assert 0.149 <= delays[0] <= 0.301, delays
    assert 0.299 <= delays[1] <= 0.601, delays


def test_backoff_delay_doubles_is_capped_and_jittered():
    assert backoff_delay(1, 5, 3600, rand=lambda: 1.0) == 5
    assert backoff_delay(1, 5, 3600, rand=lambda: 0.0) == 2.5
    assert [backoff_delay(n, 5, 3600, rand=lambda: 1.0) for n in (2, 3, 4)] == [10, 20, 40]
    assert backoff_delay(30, 5, 3600, rand=lambda: 1.0) == 3600
    assert backoff_delay(30, 5, 3600, rand=lambda: 0.0) == 1800
    for attempts in range(1, 12):
        assert 0 < backoff_delay(attempts, 5, 3600) <= min(3600, 5 * 2 ** (attempts - 1))


def test_permanent_failure_is_dead_at_once(arc: Archive):
    q = queue_of(arc, max_attempts=5)
    job_id = q.enqueue("alpha")
    job = q.claim("w", ["alpha"])
    assert job is not None
    assert q.fail(job, "bad payload", permanent=True) is JobStatus.DEAD
    dead = q.get(job_id)
    assert dead is not None and (dead.status, dead.attempts) == (JobStatus.DEAD, 1)


def test_requeue_dead_jobs(arc: Archive):
    q = queue_of(arc, max_attempts=1)
    ids = [q.enqueue("alpha", {"i": i}) for i in range(3)] + [q.enqueue("beta")]
    for _ in ids:
        job = q.claim("w", ["alpha", "beta"])
        assert job is not None
        assert q.fail(job, "nope") is JobStatus.DEAD
    assert q.counts()["dead"] == 4

    again = q.requeue(ids[0])
    assert again is not None
    assert (again.status, again.attempts, again.finished_at) == (JobStatus.QUEUED, 0, None)
    assert again.last_error == "nope"  # why it was dead stays visible until it runs again
    assert q.requeue_all(JobStatus.DEAD, kind="alpha") == 2
    assert q.counts() == {"queued": 3, "running": 0, "done": 0, "failed": 0, "dead": 1}
    assert q.requeue_all() == 1
    assert q.requeue(10_000) is None

    job = q.claim("w", ["alpha"])
    assert job is not None and job.attempts == 1
    with pytest.raises(JobStateError):
        q.requeue(job.id)
    with pytest.raises(JobStateError):
        q.requeue_all(JobStatus.RUNNING)
    assert q.complete(job)
    assert q.requeue(job.id) is not None  # a done job may be run again on purpose


def test_expired_lease_is_claimed_again_and_fences_the_old_worker(arc: Archive):
    q = queue_of(arc, lease_seconds=0.5)
    job_id = q.enqueue("alpha")
    first = q.claim("w1", ["alpha"])
    assert first is not None
    assert q.claim("w2", ["alpha"]) is None
    time.sleep(0.7)
    second = q.claim("w2", ["alpha"])
    assert second is not None and second.id == job_id
    assert (second.attempts, second.locked_by) == (2, "w2")
    assert second.last_error is not None and "w1 lost its lease" in second.last_error

    # w1 comes back from its stall: nothing it reports is recorded.
    assert not q.renew(first)
    assert not q.complete(first)
    assert q.fail(first, "late failure") is None
    current = q.get(job_id)
    assert current is not None and (current.status, current.locked_by) == (JobStatus.RUNNING, "w2")

    assert q.complete(second)
    assert not q.complete(second)
    done = q.get(job_id)
    assert done is not None and (done.status, done.attempts) == (JobStatus.DONE, 2)


def test_same_worker_name_is_fenced_by_attempt(arc: Archive):
    q = queue_of(arc, lease_seconds=0.3)
    q.enqueue("alpha")
    stale = q.claim("w", ["alpha"])
    time.sleep(0.5)
    fresh = q.claim("w", ["alpha"])
    assert stale is not None and fresh is not None and fresh.attempts == 2
    assert not q.complete(stale)
    assert q.complete(fresh)


def test_renewed_lease_is_kept(arc: Archive):
    q = queue_of(arc, lease_seconds=0.6)
    q.enqueue("alpha")
    job = q.claim("w1", ["alpha"])
    assert job is not None
    for _ in range(5):
        time.sleep(0.25)
        assert q.renew(job)
        assert q.claim("w2", ["alpha"]) is None
    assert q.complete(job)


def test_lease_lost_on_the_last_attempt_makes_the_job_dead(arc: Archive):
    q = queue_of(arc, max_attempts=1, lease_seconds=0.3)
    job_id = q.enqueue("alpha")
    assert q.claim("w1", ["alpha"]) is not None
    time.sleep(0.5)
    assert q.claim("w2", ["alpha"]) is None
    dead = q.get(job_id)
    assert dead is not None and dead.status is JobStatus.DEAD
    assert dead.last_error is not None and "w1 lost its lease" in dead.last_error


def test_list_filters_and_pages(arc: Archive):
    q = queue_of(arc)
    a = [q.enqueue("alpha", study_instance_uid="1.1") for _ in range(3)]
    b = [q.enqueue("beta", study_instance_uid="1.2") for _ in range(2)]
    job = q.claim("w", ["beta"])
    assert job is not None and job.id == b[0]

    assert [j.id for j in q.list()] == sorted(a + b, reverse=True)
    assert [j.id for j in q.list(kind="alpha")] == sorted(a, reverse=True)
    assert [j.id for j in q.list(study_instance_uid="1.2")] == sorted(b, reverse=True)
    assert [j.id for j in q.list(status=JobStatus.RUNNING)] == [b[0]]
    assert [j.id for j in q.list(status=JobStatus.QUEUED, kind="beta")] == [b[1]]
    assert [j.id for j in q.list(limit=2, offset=1)] == sorted(a + b, reverse=True)[1:3]
    assert q.list(kind="gamma") == []
    with pytest.raises(ValueError):
        q.list(limit=-1)
    assert q.get(10_000) is None


# --- the in-process worker ------------------------------------------------------------------


def test_worker_runs_retries_and_gives_up(arc: Archive):
    q = queue_of(arc, max_attempts=3, backoff_base=0.05)
    runs: Counter[int] = Counter()

    def ok(job: JobRecord) -> None:
        runs[job.id] += 1

    def flaky(job: JobRecord) -> None:
        runs[job.id] += 1
        if job.attempts < 3:
            raise ConnectionError("peer down")

    def broken(job: JobRecord) -> None:
        runs[job.id] += 1
        raise PermanentJobError("cannot ever work")

    worker = Worker(q, name="w-test", poll_interval=0.05)
    worker.register("ok", ok)
    worker.register("flaky", flaky)
    worker.register("broken", broken)
    with pytest.raises(ValueError):
        worker.register("ok", ok)
    ids = {kind: q.enqueue(kind) for kind in ("ok", "flaky", "broken")}
    worker.start()
    try:
        wait_until(
            lambda: q.counts()["done"] == 2 and q.counts()["dead"] == 1, what="three finished"
        )
    finally:
        assert worker.stop(timeout=10)
    assert runs == {ids["ok"]: 1, ids["flaky"]: 3, ids["broken"]: 1}
    flaky_job, broken_job = q.get(ids["flaky"]), q.get(ids["broken"])
    assert flaky_job is not None and flaky_job.status is JobStatus.DONE
    assert flaky_job.last_error is not None and "ConnectionError: peer down" in flaky_job.last_error
    assert broken_job is not None and broken_job.status is JobStatus.DEAD
    assert broken_job.last_error is not None
    assert broken_job.last_error.startswith("PermanentJobError: cannot ever work")


def test_worker_heartbeat_keeps_a_long_job(arc: Archive):
    q = queue_of(arc, lease_seconds=0.6)
    started = threading.Event()

    def slow(job: JobRecord) -> None:
        started.set()
        time.sleep(2.0)

    worker = Worker(q, poll_interval=0.05)
    worker.register("slow", slow)
    job_id = q.enqueue("slow")
    worker.start()
    try:
        assert started.wait(10)
        other = queue_of(arc, lease_seconds=0.6)
        deadline = time.monotonic() + 1.8
        while time.monotonic() < deadline:
            assert other.claim("thief", ["slow"]) is None
            time.sleep(0.1)
        wait_until(lambda: (j := q.get(job_id)) is not None and j.status is JobStatus.DONE)
    finally:
        assert worker.stop(timeout=10)
    done = q.get(job_id)
    assert done is not None and done.attempts == 1


def test_worker_stop_lets_the_running_job_finish(arc: Archive):
    q = queue_of(arc)
    started = threading.Event()

    def slow(job: JobRecord) -> None:
        started.set()
        time.sleep(0.8)

    worker = Worker(q, poll_interval=0.05)
    worker.register("slow", slow)
    job_id = q.enqueue("slow")
    worker.start()
    assert started.wait(10)
    assert worker.stop(timeout=10)
    done = q.get(job_id)
    assert done is not None and done.status is JobStatus.DONE


# --- real `pacsbridge worker` processes -----------------------------------------------------

EXTRA_HANDLERS = json.dumps(["tests.job_handlers:register"])


def worker_env(backend: Backend, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PACSBRIDGE_")}
    env |= backend.env
    env |= {
        "PYTHONPATH": str(REPO),  # so that `tests.job_handlers` can be imported
        "PACSBRIDGE_EXTRA_HANDLERS": EXTRA_HANDLERS,
        "PACSBRIDGE_JOB_LEASE_SECONDS": "2",
        "PACSBRIDGE_WORKER_POLL_INTERVAL": "0.05",
        "PACSBRIDGE_LOG_FORMAT": "json",
        **extra,
    }
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], tmp_path: Path, name: str) -> None:
        self.log_path = tmp_path / f"worker-{name}.log"
        self.proc = subprocess.Popen(
            [str(PACSBRIDGE), "worker"],
            env=env,
            cwd=tmp_path,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            return '"msg": "worker ready"' in self.log()

        wait_until(ready, timeout, what="worker ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def workers(index_backend: Backend, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Starts `pacsbridge worker` processes on request; stops them all at the end."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop()


def start_workers(
    started: list[WorkerProcess], backend: Backend, tmp_path: Path, count: int, **env: str
) -> list[WorkerProcess]:
    new = [
        WorkerProcess(worker_env(backend, **env), tmp_path, f"{len(started) + i}")
        for i in range(count)
    ]
    started.extend(new)
    for w in new:
        w.wait_ready()
    return new


def execution_rows(arc: Archive) -> list:
    with arc.db.engine.connect() as conn:
        return list(conn.execute(select(executions).order_by(executions.c.id)))


def test_two_worker_processes_run_each_of_200_jobs_exactly_once(
    arc: Archive, index_backend: Backend, tmp_path: Path, workers: list[WorkerProcess]
):
    create_execution_table(arc.db.engine)
    pair = start_workers(workers, index_backend, tmp_path, 2)
    ids = arc.jobs.enqueue_many([("test.record", {"sleep": 0.01}, None) for _ in range(200)])

    wait_until(lambda: arc.jobs.counts()["done"] == 200, timeout=180, what="200 jobs done")
    rows = execution_rows(arc)
    assert Counter(r.job_id for r in rows) == dict.fromkeys(ids, 1)  # each ran exactly once
    assert all(r.finished_at is not None and r.attempt == 1 for r in rows)
    pids = Counter(r.pid for r in rows)
    assert set(pids) == {w.proc.pid for w in pair}, pids  # both took part
    jobs = arc.jobs.list(limit=1000)
    assert {(j.status, j.attempts) for j in jobs} == {(JobStatus.DONE, 1)}
    for w in pair:
        assert w.stop() == 0, w.log()
        assert "Traceback" not in w.log()


def test_kill_9_mid_job_is_claimed_again_and_completes_once(
    arc: Archive, index_backend: Backend, tmp_path: Path, workers: list[WorkerProcess]
):
    create_execution_table(arc.db.engine)
    pair = start_workers(workers, index_backend, tmp_path, 2)
    by_pid = {w.proc.pid: w for w in pair}
    job_id = arc.jobs.enqueue("test.record", {"first_attempt_sleep": 120, "sleep": 0.1})

    wait_until(lambda: len(execution_rows(arc)) == 1, what="first attempt started")
    victim = by_pid[execution_rows(arc)[0].pid]
    time.sleep(2.5)  # longer than the lease: the victim's heartbeat must have kept it
    running = arc.jobs.get(job_id)
    assert running is not None and (running.status, running.attempts) == (JobStatus.RUNNING, 1)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)

    wait_until(
        lambda: (j := arc.jobs.get(job_id)) is not None and j.status is JobStatus.DONE,
        timeout=30,
        what="job done by the survivor",
    )
    done = arc.jobs.get(job_id)
    assert done is not None and done.attempts == 2
    assert done.last_error is not None and "lost its lease" in done.last_error
    first, second = execution_rows(arc)
    survivor = next(w for w in pair if w is not victim)
    assert (first.pid, first.attempt, first.finished_at) == (victim.proc.pid, 1, None)
    assert (second.pid, second.attempt) == (survivor.proc.pid, 2)
    assert second.finished_at is not None
    time.sleep(2.5)  # another lease length: nothing runs it a third time
    assert len(execution_rows(arc)) == 2
    assert survivor.stop() == 0


def test_sigterm_lets_the_running_job_finish(
    arc: Archive, index_backend: Backend, tmp_path: Path, workers: list[WorkerProcess]
):
    create_execution_table(arc.db.engine)
    (w,) = start_workers(workers, index_backend, tmp_path, 1)
    job_id = arc.jobs.enqueue("test.record", {"sleep": 1.5})
    wait_until(lambda: len(execution_rows(arc)) == 1, what="job started")
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0, w.log()
    done = arc.jobs.get(job_id)
    assert done is not None and (done.status, done.attempts) == (JobStatus.DONE, 1)
    (row,) = execution_rows(arc)
    assert row.finished_at is not None
    assert '"msg": "worker exited"' in w.log()


def test_worker_with_an_unloadable_handler_exits_2(index_backend: Backend, tmp_path: Path):
    env = worker_env(index_backend, PACSBRIDGE_EXTRA_HANDLERS='["tests.no_such_module:register"]')
    proc = subprocess.run(
        [str(PACSBRIDGE), "worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot load job handlers" in proc.stderr
    assert "tests.no_such_module" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- CLI ------------------------------------------------------------------------------------


def cli(backend: Backend, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = worker_env(backend, COLUMNS="250", NO_COLOR="1")
    return subprocess.run(
        [str(PACSBRIDGE), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_jobs_list_and_requeue(arc: Archive, index_backend: Backend, tmp_path: Path):
    q = queue_of(arc, max_attempts=1)
    ok = q.enqueue("alpha", {"x": 1}, study_instance_uid="1.2.3")
    dead = [q.enqueue("beta"), q.enqueue("beta"), q.enqueue("gamma")]
    for _ in dead:
        job = q.claim("w", ["beta", "gamma"])
        assert job is not None
        q.fail(job, "RuntimeError: peer down\ntraceback line")

    listed = cli(index_backend, tmp_path, "jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == sorted([ok, *dead], reverse=True)
    assert (rows[-1]["kind"], rows[-1]["status"], rows[-1]["study"]) == ("alpha", "queued", "1.2.3")
    assert rows[-1]["payload"] == {"x": 1}

    only_dead = json.loads(
        cli(
            index_backend, tmp_path, "jobs", "list", "--status", "dead", "--kind", "beta", "--json"
        ).stdout
    )
    assert sorted(r["id"] for r in only_dead) == sorted(dead[:2])
    assert only_dead[0]["last_error"].startswith("RuntimeError: peer down")

    table = cli(index_backend, tmp_path, "jobs", "list", "--status", "dead")
    assert table.returncode == 0
    assert "last error: RuntimeError: peer down" in table.stdout
    assert "traceback line" not in table.stdout

    bad = cli(index_backend, tmp_path, "jobs", "list", "--status", "exploded")
    assert bad.returncode == 2
    assert "unknown job status 'exploded'" in bad.stderr and "dead" in bad.stderr

    one = cli(index_backend, tmp_path, "jobs", "requeue", str(dead[2]))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == {"requeued": 1}
    some = cli(index_backend, tmp_path, "jobs", "requeue", "--dead", "--kind", "beta")
    assert json.loads(some.stdout) == {"requeued": 2}
    assert q.counts()["dead"] == 0 and q.counts()["queued"] == 4
    assert cli(index_backend, tmp_path, "jobs", "requeue", "--dead").stdout.strip() == (
        '{"requeued": 0}'
    )

    assert cli(index_backend, tmp_path, "jobs", "requeue", "999999").returncode == 1
    assert cli(index_backend, tmp_path, "jobs", "requeue").returncode == 2
    assert cli(index_backend, tmp_path, "jobs", "requeue", "1", "--dead").returncode == 2
    running = q.claim("w", ["alpha"])
    assert running is not None
    busy = cli(index_backend, tmp_path, "jobs", "requeue", str(running.id))
    assert busy.returncode == 1 and "running" in busy.stderr


# --- HTTP, against a real `pacsbridge serve` with its in-process worker ------------------------


def test_http_jobs_api(index_backend: Backend, tmp_path: Path):
    # Two worker threads: one stays busy with the slow job while the other runs the rest.
    env = worker_env(index_backend, PACSBRIDGE_WORKER_THREADS="2")
    extra = {k: v for k, v in env.items() if k.startswith("PACSBRIDGE_") or k == "PYTHONPATH"}
    server = start_server(index_backend, tmp_path, **extra)
    try:
        with closing(server.archive()) as arc, httpx.Client(base_url=server.http) as http:
            create_execution_table(arc.db.engine)
            marker = tmp_path / "peer-down"
            marker.touch()
            ok = arc.jobs.enqueue("test.record", study_instance_uid="1.2.840.1")
            doomed = arc.jobs.enqueue(
                "test.record", {"fail_while_exists": str(marker)}, max_attempts=1
            )
            slow = arc.jobs.enqueue("test.record", {"first_attempt_sleep": 60})
            unknown_kind = arc.jobs.enqueue("nobody.handles.this")

            def status(job_id: int) -> str:
                return http.get(f"/api/jobs/{job_id}").json()["status"]

            wait_until(
                lambda: (status(ok), status(doomed), status(slow)) == ("done", "dead", "running"),
                what="served worker to run the jobs",
            )
            listed = http.get("/api/jobs")
            assert listed.status_code == 200
            assert [j["id"] for j in listed.json()] == [unknown_kind, slow, doomed, ok]
            body = http.get(f"/api/jobs/{doomed}").json()
            assert body["kind"] == "test.record"
            assert (body["attempts"], body["max_attempts"]) == (1, 1)
            assert body["last_error"].startswith(f"RuntimeError: {marker} exists")
            assert body["finished_at"] is not None
            assert set(body) >= {"next_run_at", "created_at", "updated_at", "payload", "study"}

            def ids(**params: str | int) -> list[int]:
                response = http.get("/api/jobs", params=params)
                assert response.status_code == 200, response.text
                return [j["id"] for j in response.json()]

            assert ids(status="dead") == [doomed]
            assert ids(status="queued") == [unknown_kind]
            assert ids(kind="nobody.handles.this") == [unknown_kind]
            assert ids(study="1.2.840.1") == [ok]
            assert ids(limit=2, offset=1) == [slow, doomed]

            bad_queries: list[tuple[dict[str, str | int], str]] = [
                ({"status": "exploded"}, "queued"),
                ({"limit": -1}, "limit"),
                ({"limit": 0}, "limit"),
                ({"offset": -5}, "offset"),
            ]
            for params, word in bad_queries:
                response = http.get("/api/jobs", params=params)
                assert response.status_code == 422, params
                assert word in response.text, response.text
            missing = http.get("/api/jobs/999999")
            assert missing.status_code == 404
            assert missing.json() == {"detail": "no job 999999"}
            assert http.get("/api/jobs/not-a-number").status_code == 422
            assert http.post("/api/jobs/999999/requeue").status_code == 404

            busy = http.post(f"/api/jobs/{slow}/requeue")
            assert busy.status_code == 409 and "running" in busy.json()["detail"]

            marker.unlink()  # the "peer" is back: requeue the dead job
            requeued = http.post(f"/api/jobs/{doomed}/requeue")
            assert requeued.status_code == 200
            assert (requeued.json()["status"], requeued.json()["attempts"]) == ("queued", 0)
            wait_until(lambda: status(doomed) == "done", what="requeued job done")
    finally:
        server.stop()
