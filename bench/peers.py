"""Processes the benchmarks (and the differential tests) run side by side: pacsbridge,
Orthanc and DCMTK storescp on free loopback ports with their own temporary directories, stopped
by their own PID; DCMTK storescu senders; a fresh PostgreSQL database."""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOOPBACK = "127.0.0.1"
CALLING_AE = "BENCHSCU"
ORTHANC_BIN = "/usr/sbin/Orthanc"


class BenchError(RuntimeError):
    """The benchmark cannot produce a trustworthy number; the message says why."""


def log(message: str) -> None:
    print(message, flush=True)


# --- processes and ports ---------------------------------------------------------------------


_used_ports: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (bind to port 0), never the same one twice."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise BenchError("could not find a free TCP port on 127.0.0.1")


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without PACSBRIDGE_* and TCP_NODELAY, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PACSBRIDGE_") and k != "TCP_NODELAY"
    }
    env.update(extra)
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class ManagedProcess:
    """A long-running child in its own session, logged to a file, stopped by its own PID."""

    def __init__(
        self, name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path, log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        try:
            self.proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, not it; we stop it in `finally`
            )
        except OSError:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ensure_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(
                f"{self.name} (pid {self.pid}) exited with code {code}; "
                f"last lines of {self.log_path}:\n{tail(self.log_path)}"
            )

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the process group led by our child (storescp --fork children included),
        SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"  {self.name} (pid {self.pid}) ignored SIGTERM for {grace:.0f} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Forked association handlers may outlive the leader; the group id is still ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()


def http_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def basic_authorization(user: str, password: str) -> dict[str, str]:
    """The ``Authorization`` header of HTTP Basic authentication (RFC 7617 2)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def wait_http(
    process: ManagedProcess, url: str, timeout: float, headers: dict[str, str] | None = None
) -> Any:
    """Poll ``url`` until it answers 200 with JSON; fail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        process.ensure_alive()
        try:
            return http_json(url, timeout=2.0, headers=headers)
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise BenchError(
        f"{process.name} not ready at {url} after {timeout:.0f} s ({last_error}); "
        f"last lines of {process.log_path}:\n{tail(process.log_path)}"
    )


def echo(ae: str, port: int, *, env: dict[str, str] | None = None, debug: bool = False) -> str:
    """C-ECHO with DCMTK echoscu; returns its output, raises BenchError on failure."""
    argv = ["echoscu", "-aet", CALLING_AE, "-aec", ae, LOOPBACK, str(port)]
    if debug:
        argv.insert(1, "-d")
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"echoscu to {ae}@{port} timed out") from exc
    if result.returncode != 0:
        raise BenchError(f"echoscu to {ae}@{port} failed:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


def wait_echo(process: ManagedProcess, ae: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        process.ensure_alive()
        try:
            echo(ae, port)
            return
        except BenchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def process_group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (a target and
    the children it started: pacsbridge's DIMSE processes, storescp's forks), from /proc."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime stime
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_idle(
    processes: Sequence[ManagedProcess],
    *,
    threshold: float = 0.05,
    quiet_seconds: int = 3,
    timeout: float = 600.0,
) -> float:
    """Wait until every process group uses less than ``threshold`` CPU (cores) in each of
    ``quiet_seconds`` consecutive one-second windows. Returns the seconds waited; raises
    BenchError after ``timeout``."""
    started = time.monotonic()
    quiet = 0
    last = {p.pid: process_group_cpu_seconds(p.pid) for p in processes}
    while quiet < quiet_seconds:
        if time.monotonic() - started > timeout:
            busy = ", ".join(p.name for p in processes)
            raise BenchError(f"{busy} still busy after {timeout:.0f} s")
        time.sleep(1.0)
        now = {p.pid: process_group_cpu_seconds(p.pid) for p in processes}
        for process in processes:
            process.ensure_alive()
        quiet = quiet + 1 if all(now[k] - last[k] < threshold for k in now) else 0
        last = now
    return time.monotonic() - started


# --- targets ---------------------------------------------------------------------------------


class Target(abc.ABC):
    """One C-STORE SCP under test (pacsbridge, Orthanc, storescp implement it)."""

    kind = ""
    ae = ""

    def __init__(self, workdir: Path, name: str = "") -> None:
        self.name = name or self.kind
        self.workdir = workdir
        workdir.mkdir(parents=True)
        self.dimse_port = free_port()
        self.process: ManagedProcess | None = None
        self.version = "unknown"
        self.durability = "unknown"

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def instance_count(self) -> int: ...

    def ensure_alive(self) -> None:
        if self.process is None:
            raise BenchError(f"{self.name} was never started")
        self.process.ensure_alive()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log_tail(self) -> str:
        if self.process is None:
            return "(not started)"
        return f"last lines of {self.process.log_path}:\n{tail(self.process.log_path)}"


class PacsbridgeTarget(Target):
    kind = "pacsbridge"
    ae = "PACSBRIDGE"

    def __init__(
        self,
        workdir: Path,
        executable: Path,
        database_url: str | None,
        *,
        name: str = "",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir, name)
        self.executable = executable
        self.database_url = database_url
        self.http_port = free_port()
        settings = {
            "PACSBRIDGE_DATA_DIR": str(workdir / "data"),
            "PACSBRIDGE_DIMSE_HOST": LOOPBACK,
            "PACSBRIDGE_DIMSE_PORT": str(self.dimse_port),
            "PACSBRIDGE_HTTP_HOST": LOOPBACK,
            "PACSBRIDGE_HTTP_PORT": str(self.http_port),
            "PACSBRIDGE_LOG_LEVEL": "WARNING",
            # The models that run on every stable study are not what these benchmarks time
            # (bench/ai.py does): their results would add instances to the counts checked and
            # their CPU would land in whatever run comes next. A benchmark may turn them on.
            "PACSBRIDGE_AI": '{"enabled": false}',
        }
        if database_url:
            settings["PACSBRIDGE_DATABASE_URL"] = database_url
        settings.update(extra_env or {})
        self.env = clean_env(**settings)

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self) -> None:
        self.process = ManagedProcess(
            self.name,
            [str(self.executable), "serve"],
            env=self.env,
            cwd=self.workdir,  # no stray .env from the caller's directory
            log_path=self.workdir / "serve.log",
        )
        health = f"http://{LOOPBACK}:{self.http_port}/health"
        wait_http(self.process, health, timeout=120)
        # Every DICOM acceptor process ready, so that concurrent senders are spread over them.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            acceptors = http_json(health, timeout=2.0).get("dimse_processes")
            if acceptors is None or acceptors["ready"] >= acceptors["configured"]:
                break
            time.sleep(0.2)
        wait_echo(self.process, self.ae, self.dimse_port, timeout=30)
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            self.version = version("pacsbridge")
        self.durability = pacsbridge_durability(self.database_url)

    def stats(self) -> dict[str, Any]:
        try:
            result = subprocess.run(
                [str(self.executable), "stats", "--json"],
                env=self.env,
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError("`pacsbridge stats --json` timed out after 120 s") from exc
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            raise BenchError(
                f"`pacsbridge stats --json` failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        try:
            data: dict[str, Any] = json.loads(lines[-1])
        except ValueError as exc:
            raise BenchError(
                f"`pacsbridge stats --json` printed no JSON:\n{result.stdout}"
            ) from exc
        return data

    def instance_count(self) -> int:
        return int(self.stats()["instances"])


PACSBRIDGE_ACCEPT_NOTE = "accept side: pacsbridge sets TCP_NODELAY on accepted sockets"


def pacsbridge_durability(database_url: str | None) -> str:
    """What a power loss can cost pacsbridge, from the Settings defaults (we override none)."""
    try:
        from config import Settings

        fields = Settings.model_fields
        fsync = fields["storage_fsync"].default
        synchronous = fields["sqlite_synchronous"].default
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    blobs = f"blob fsync={'on' if fsync else 'off'} (file + directory, before the C-STORE-RSP)"
    if database_url:
        index = f"index PostgreSQL ({postgres_durability(database_url)})"
        return f"{blobs}; {index}; {PACSBRIDGE_ACCEPT_NOTE}"
    return f"{blobs}; index SQLite WAL synchronous={synchronous}; {PACSBRIDGE_ACCEPT_NOTE}"


def peer_env(nodelay: bool) -> dict[str, str]:
    """Environment of a DCMTK-based receiver: as shipped (TCP_NODELAY unset, so its accepted
    sockets keep Nagle on) or with TCP_NODELAY=1 (libdcmnet disables Nagle on accept)."""
    return clean_env(TCP_NODELAY="1") if nodelay else clean_env()


def peer_accept_note(nodelay: bool) -> str:
    if nodelay:
        return "accept side TCP_NODELAY=1 in its env (Nagle off for its responses)"
    return "accept side as shipped: TCP_NODELAY unset (DCMTK default, Nagle on for its responses)"


class OrthancTarget(Target):
    kind = "orthanc"
    ae = "ORTHANC"

    def __init__(
        self,
        workdir: Path,
        *,
        nodelay: bool,
        name: str = "",
        config: dict[str, Any] | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        """``config`` entries override or extend the minimal configuration below.
        ``basic_auth`` (user, password) turns Orthanc's HTTP Basic authentication on with that
        one registered user, and this target's own requests send it."""
        super().__init__(workdir, name or ("orthanc-nd" if nodelay else "orthanc"))
        self.nodelay = nodelay
        self.http_port = free_port()
        self.http_headers = basic_authorization(*basic_auth) if basic_auth else {}
        self.config_path = workdir / "orthanc.json"
        self.config: dict[str, Any] = {
            "Name": "pacsbridge-bench",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": self.ae,
            "DicomPort": self.dimse_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomServerEnabled": True,
            "Plugins": [],
            "StorageCompression": False,
            **(config or {}),
        }
        if basic_auth:
            self.config["AuthenticationEnabled"] = True
            self.config["RegisteredUsers"] = {basic_auth[0]: basic_auth[1]}
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.durability = (
            "SyncStorageArea not overridden = default true since 1.7.4 (fdatasync per stored "
            "file, no directory fsync); "
            f"index SQLite WAL synchronous=NORMAL (built in); {peer_accept_note(nodelay)}"
        )

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self) -> None:
        self.process = ManagedProcess(
            self.name,
            [ORTHANC_BIN, str(self.config_path)],
            env=peer_env(self.nodelay),
            cwd=self.workdir,
            log_path=self.workdir / "orthanc.log",
        )
        system = wait_http(
            self.process,
            f"http://{LOOPBACK}:{self.http_port}/system",
            timeout=60,
            headers=self.http_headers,
        )
        self.version = str(system.get("Version", "unknown"))
        wait_echo(self.process, self.ae, self.dimse_port, timeout=30)

    def instance_count(self) -> int:
        try:
            stats = http_json(
                f"http://{LOOPBACK}:{self.http_port}/statistics",
                timeout=30,
                headers=self.http_headers,
            )
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BenchError(f"Orthanc /statistics failed: {exc}\n{self.log_tail()}") from exc
        return int(stats["CountInstances"])


class StorescpTarget(Target):
    kind = "storescp"
    ae = "STORESCP"

    def __init__(self, workdir: Path, *, nodelay: bool) -> None:
        super().__init__(workdir, "storescp-nd" if nodelay else "storescp")
        self.nodelay = nodelay
        self.output = workdir / "received"
        self.output.mkdir()
        self.durability = f"no fsync, no index (plain files); {peer_accept_note(nodelay)}"

    def start(self) -> None:
        # DCMTK 3.6.7's storescp has no bind-address option: it listens on all interfaces.
        self.process = ManagedProcess(
            self.name,
            ["storescp", "--fork", "-aet", self.ae, "-od", str(self.output), str(self.dimse_port)],
            env=peer_env(self.nodelay),
            cwd=self.workdir,
            log_path=self.workdir / "storescp.log",
        )
        wait_echo(self.process, self.ae, self.dimse_port, timeout=30)
        self.version = dcmtk_version("storescp")

    def instance_count(self) -> int:
        return sum(1 for path in self.output.rglob("*") if path.is_file())


def dcmtk_version(tool: str) -> str:
    try:
        result = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (result.stdout or result.stderr).strip().splitlines()
    return first[0].strip("$ ").removeprefix("dcmtk: ") if first else "unknown"


# --- PostgreSQL ------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_postgres_database(url: str) -> Iterator[str]:
    """Create an empty database on the server of ``url`` and drop it afterwards.

    The database name in ``url`` is ignored (never created, never dropped): the benchmark works
    in its own ``pacsbridge_bench_<time>_<pid>`` database, created from the ``postgres`` db."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    base = make_url(url)
    if not base.drivername.startswith("postgresql"):
        raise BenchError(f"--database-url must be a postgresql URL, not {base.drivername}")
    name = f"pacsbridge_bench_{datetime.now(UTC):%Y%m%d%H%M%S}_{os.getpid()}"
    admin = create_engine(
        base.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        raise BenchError(f"cannot create database {name}: {exc}") from exc
    log(f"created PostgreSQL database {name}")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            log(f"dropped PostgreSQL database {name}")
        except Exception as exc:
            log(f"WARNING: could not drop database {name}: {exc}")
        admin.dispose()


def postgres_durability(url: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            values = {
                key: conn.execute(text(f"SHOW {key}")).scalar()
                for key in ("fsync", "synchronous_commit", "wal_sync_method")
            }
        return ", ".join(f"{k}={v}" for k, v in values.items())
    except Exception as exc:
        return f"settings unknown: {exc}"
    finally:
        engine.dispose()


# --- data ------------------------------------------------------------------------------------


def new_uid() -> str:
    from pydicom.uid import generate_uid

    # 2.25.<uuid>: at most 44 characters, so the factory's FrameOfReferenceUID (study + ".1")
    # stays within the 64 characters of a UI value.
    return str(generate_uid(prefix=None))


# --- sending ---------------------------------------------------------------------------------


def sender_env(nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1" if nodelay else "0"
    return env


def send(
    target: Target,
    batches: list[list[Path]],
    *,
    nodelay: bool,
    timeout: float,
    logdir: Path,
) -> float:
    """Run one storescu per batch, all at once; wall seconds from the first start to the last
    exit. Raises BenchError if any storescu fails."""
    env = sender_env(nodelay)
    logs = [open(logdir / f"storescu-{i}.log", "wb") for i in range(len(batches))]  # noqa: SIM115
    argvs = [
        [
            "storescu",
            "-aet",
            CALLING_AE,
            "-aec",
            target.ae,
            "-R",  # propose only the SOP classes of the files
            LOOPBACK,
            str(target.dimse_port),
            *map(str, batch),
        ]
        for batch in batches
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        for argv, out in zip(argvs, logs, strict=True):
            procs.append(
                subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                )
            )
        deadline = started + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired as exc:
                raise BenchError(
                    f"storescu to {target.name} still running after {timeout:.0f} s\n"
                    f"{target.log_tail()}"
                ) from exc
        elapsed = time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for out in logs:
            out.close()
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        details = "\n".join(
            f"storescu #{i} exit {procs[i].returncode}:\n{tail(logdir / f'storescu-{i}.log', 15)}"
            for i in failed
        )
        raise BenchError(f"sending to {target.name} failed\n{details}\n{target.log_tail()}")
    return elapsed


def verify_count(target: Target, expected: int, settle: float = 20.0) -> float:
    """Wait until the target holds exactly ``expected`` instances. Returns 0 when the first look
    (right after storescu exited) found them all, else the seconds until the count was right: an
    SCP that answers before it has stored would get an unfair head start in the timing."""
    started = time.monotonic()
    first = True
    while True:
        target.ensure_alive()
        count = target.instance_count()
        waited = time.monotonic() - started
        if count == expected:
            return 0.0 if first else waited
        if count > expected or waited > settle:
            raise BenchError(
                f"{target.name} holds {count} instances, expected {expected}\n{target.log_tail()}"
            )
        first = False
        time.sleep(0.2)


def pacsbridge_executable() -> Path:
    local = Path(sys.executable).parent / "pacsbridge"
    if local.exists():
        return local
    found = shutil.which("pacsbridge")
    if not found:
        raise BenchError(
            "pacsbridge executable not found (run with the project's .venv/bin/python)"
        )
    return Path(found)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


Run = Callable[[Namespace, Path, contextlib.ExitStack], dict[str, Any]]


def run_benchmark(name: str, args: Namespace, run: Run) -> int:
    """Run one benchmark in a fresh work directory and write its results to
    ``bench/results/<name>-<timestamp>.json``; the process exit code (0, 1 failed, 130
    interrupted). ``run`` registers what it starts on the exit stack, which is closed (servers
    stopped, databases dropped) however the run ends; ``--keep-temp`` keeps the directory."""
    if str(ROOT) not in sys.path:  # `tests.dicom_factory` lives in the project, not installed
        sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix=f"pacsbridge-bench-{name}-"))
    log(f"working in {workdir}")
    code = 1
    stack = contextlib.ExitStack()
    try:
        result = run(args, workdir, stack)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS_DIR / f"{name}-{stamp}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        took = f" ({result['wall_seconds']:.0f} s)" if "wall_seconds" in result else ""
        log(f"results written to {out.relative_to(ROOT)}{took}")
        code = 0
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the clean-up on a second Ctrl-C
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            if args.keep_temp:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return code
