"""Shared fixtures: real PostgreSQL, real S3 (moto over HTTP), a real `pacsbridge serve`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from archive import Archive
from config import Settings

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_ADMIN_URL = os.environ.get(
    "PACSBRIDGE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def require_tool(name: str) -> str:
    """Path of an external program; skip (or fail in CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install dcmtk orthanc dicom3tools)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        message = f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    finally:
        engine.dispose()
    yield POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"pacsbridge_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_admin).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- S3 (moto's server over real HTTP) ------------------------------------------------------


@dataclass
class S3Server:
    endpoint: str
    access_key: str = "pacsbridge-test"
    secret_key: str = "pacsbridge-test-secret"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    exe = VENV_BIN / "moto_server"
    if not exe.exists():
        exe = Path(shutil.which("moto_server") or "moto_server")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, proc=proc)
        yield S3Server(endpoint=f"127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# --- settings for every backend pair --------------------------------------------------------


@dataclass
class Backend:
    index: str
    storage: str
    settings: Settings
    env: dict[str, str] = field(default_factory=dict)


def _backend(
    index: str,
    storage: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    **overrides: object,
) -> Backend:
    # Most tests query and retrieve with DCMTK and pynetdicom under arbitrary calling AE titles:
    # let any AE use C-FIND/C-MOVE/C-GET here. tests/test_dimse_access.py proves the default
    # (only declared peers may) with dimse_query_from_any_ae=False.
    values: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "dimse_query_from_any_ae": True,
    }
    if index == "postgresql":
        values["database_url"] = request.getfixturevalue("postgres_url")
    if storage == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        values |= {
            "storage_url": f"s3://pb-{uuid.uuid4().hex[:12]}",
            "s3_endpoint": s3.endpoint,
            "s3_access_key": s3.access_key,
            "s3_secret_key": s3.secret_key,
            "s3_secure": False,
        }
    values |= overrides
    env = {
        f"PACSBRIDGE_{key.upper()}": value if isinstance(value, str) else json.dumps(value)
        for key, value in values.items()
    }
    settings = Settings(**values)  # type: ignore[arg-type]
    return Backend(index, storage, settings, env)


@pytest.fixture(params=["sqlite", "postgresql"])
def index_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _backend(request.param, "file", tmp_path, request)


@pytest.fixture(params=["file", "s3"])
def storage_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _backend("sqlite", request.param, tmp_path, request)


@pytest.fixture(params=[("sqlite", "file"), ("postgresql", "s3")], ids=["sqlite-file", "pg-s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    index, storage = request.param
    return _backend(index, storage, tmp_path, request)


@pytest.fixture
def make_backend(request: pytest.FixtureRequest, tmp_path: Path):
    """Build a backend with setting overrides: ``make_backend("sqlite", "file", x=1)``."""

    def make(index: str = "sqlite", storage: str = "file", **overrides: object) -> Backend:
        return _backend(index, storage, tmp_path, request, **overrides)

    return make


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """Send files' data sets byte for byte as they are on disk (even when broken)."""
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


@pytest.fixture(scope="session")
def pynetdicom_patched() -> None:
    """pynetdicom as ``pacsbridge`` runs it (``dicom_node.patches.install()``), for tests that
    run a DimseServer or the node's SCU paths in the test process. Stays for the session."""
    from dicom_node import patches

    patches.install()


@pytest.fixture
def archive(backend: Backend) -> Iterator[Archive]:
    arc = Archive(backend.settings)
    yield arc
    arc.close()


# --- a running `pacsbridge serve` -----------------------------------------------------------


@dataclass
class RunningServer:
    proc: subprocess.Popen
    dimse_port: int
    http_port: int
    ae_title: str
    backend: Backend
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def archive(self) -> Archive:
        return Archive(self.backend.settings, migrate=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                # Not stopped: every thread's stack of it and its children into the log
                # (SIGUSR1, config.logging.dump_stacks_on_sigusr1), then kill it.
                for pid in (self.proc.pid, *child_pids(self.proc.pid, spawned=True)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGUSR1)
                time.sleep(1.0)
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def child_pids(pid: int, *, spawned: bool = False) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc); ``spawned``: only those it started
    with multiprocessing (the DICOM acceptors, the event delivery), not its resource tracker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            if spawned and b"spawn_main" not in (entry / "cmdline").read_bytes():
                continue
            found.append(int(entry.name))
    return found


def start_server(backend: Backend, tmp_path: Path, **extra_env: str) -> RunningServer:
    dimse_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        # Any calling AE may query and retrieve, as in _backend, unless the backend or
        # extra_env says otherwise (tests/test_dimse_access.py).
        "PACSBRIDGE_DIMSE_QUERY_FROM_ANY_AE": "true",
        **backend.env,
        "PACSBRIDGE_DIMSE_HOST": "127.0.0.1",
        "PACSBRIDGE_DIMSE_PORT": str(dimse_port),
        "PACSBRIDGE_HTTP_PORT": str(http_port),
        **extra_env,
    }
    log_path = tmp_path / f"serve-{dimse_port}.log"
    proc = subprocess.Popen(
        [str(VENV_BIN / "pacsbridge"), "serve"],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    server = RunningServer(
        proc, dimse_port, http_port, env.get("PACSBRIDGE_AE_TITLE", "PACSBRIDGE"), backend, log_path
    )
    try:
        wait_for_port(http_port, timeout=60, proc=proc)
        wait_for_port(dimse_port, timeout=10, proc=proc)
        assert httpx.get(f"{server.http}/health", timeout=10).json()["status"] == "ok"
    except Exception:
        server.stop()
        raise RuntimeError(f"pacsbridge serve did not start:\n{server.log()}") from None
    return server


@pytest.fixture
def server(backend: Backend, tmp_path: Path) -> Iterator[RunningServer]:
    srv = start_server(backend, tmp_path)
    yield srv
    assert srv.stop() == 0, f"pacsbridge serve did not stop cleanly:\n{srv.log()[-3000:]}"
