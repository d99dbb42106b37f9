"""C-STORE ingest benchmark: pacsbridge against Orthanc and DCMTK storescp, side by side.

Run from the project root::

    .venv/bin/python -m bench.ingest            # 200 slices, 4 x 100 concurrent, 3 repeats
    .venv/bin/python -m bench.ingest --quick    # smoke run: 40 slices, 4 x 10, 1 repeat

Every target runs on free loopback ports with its own temporary directory; DCMTK ``storescu``
sends to each of them in three modes (one association with and without TCP_NODELAY on the
sender, and four concurrent senders). Medians of ``--repeat`` runs are printed as instances/s
with the ratios pacsbridge/Orthanc and pacsbridge/storescp, and written as JSON to
``bench/results/ingest-<timestamp>.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOOPBACK = "127.0.0.1"
CALLING_AE = "BENCHSCU"
ORTHANC_BIN = "/usr/sbin/Orthanc"

# DCMTK (libdcmnet, dul.cc / dulfsm.cc) reads the environment variable TCP_NODELAY when it opens
# a connection: a non-zero integer disables Nagle's algorithm on that socket, 0 leaves it on.
# Without the variable the default is compiled in: Nagle stays ON unless DCMTK was built with
# DISABLE_NAGLE_ALGORITHM (Debian's 3.6.7 is not; startup_probe() checks what this build does).
MODES: dict[str, str] = {
    "nodelay": "1 association, TCP_NODELAY=1 (sender Nagle off)",
    "nagle": "1 association, TCP_NODELAY=0 (sender Nagle on)",
    "concurrent": "concurrent senders, TCP_NODELAY=1",
}


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


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


def wait_http(process: ManagedProcess, url: str, timeout: float) -> Any:
    """Poll ``url`` until it answers 200 with JSON; fail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        process.ensure_alive()
        try:
            return http_json(url, timeout=2.0)
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


# --- targets ---------------------------------------------------------------------------------


class Target:
    """One C-STORE SCP under test."""

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

    def start(self) -> None:
        raise NotImplementedError

    def instance_count(self) -> int:
        raise NotImplementedError

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

    def __init__(self, workdir: Path, executable: Path, database_url: str | None) -> None:
        super().__init__(workdir)
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
        }
        if database_url:
            settings["PACSBRIDGE_DATABASE_URL"] = database_url
        self.env = clean_env(**settings)

    def start(self) -> None:
        self.process = ManagedProcess(
            self.name,
            [str(self.executable), "serve"],
            env=self.env,
            cwd=self.workdir,  # no stray .env from the caller's directory
            log_path=self.workdir / "serve.log",
        )
        wait_http(self.process, f"http://{LOOPBACK}:{self.http_port}/health", timeout=120)
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

    def __init__(self, workdir: Path, *, nodelay: bool) -> None:
        super().__init__(workdir, "orthanc-nd" if nodelay else "orthanc")
        self.nodelay = nodelay
        self.http_port = free_port()
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
        }
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.durability = (
            "SyncStorageArea not overridden = default true since 1.7.4 (fdatasync per stored "
            "file, no directory fsync); "
            f"index SQLite WAL synchronous=NORMAL (built in); {peer_accept_note(nodelay)}"
        )

    def start(self) -> None:
        self.process = ManagedProcess(
            self.name,
            [ORTHANC_BIN, str(self.config_path)],
            env=peer_env(self.nodelay),
            cwd=self.workdir,
            log_path=self.workdir / "orthanc.log",
        )
        system = wait_http(self.process, f"http://{LOOPBACK}:{self.http_port}/system", timeout=60)
        self.version = str(system.get("Version", "unknown"))
        wait_echo(self.process, self.ae, self.dimse_port, timeout=30)

    def instance_count(self) -> int:
        try:
            stats = http_json(f"http://{LOOPBACK}:{self.http_port}/statistics", timeout=30)
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


def generate_batches(
    directory: Path, *, senders: int, per_sender: int, size: int, layout: str, tag: str
) -> list[list[Path]]:
    """``senders`` lists of ``per_sender`` new CT slices each (new UIDs everywhere)."""
    from tests.dicom_factory import write_series

    batches: list[list[Path]] = []
    study_uid = new_uid()
    for index in range(senders):
        if layout == "studies":
            study_uid = new_uid()
        patient = f"BENCH-{tag}-{index}" if layout == "studies" else f"BENCH-{tag}"
        batches.append(
            write_series(
                directory / f"sender{index}",
                per_sender,
                size=size,
                study_uid=study_uid,
                series_uid=new_uid(),
                patient_id=patient,
                patient_name=f"BENCH^{tag.upper().replace('-', '^')}",
                seed=index,
            )
        )
    return batches


# --- sending ---------------------------------------------------------------------------------


def sender_env(nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1" if nodelay else "0"
    return env


def startup_probe(target: Target) -> dict[str, bool]:
    """Prove what TCP_NODELAY=1 / =0 does in this DCMTK build: libdcmnet logs (debug) right
    before it calls setsockopt(TCP_NODELAY). echoscu uses the same requestor code as storescu."""
    seen = {}
    for value in ("1", "0"):
        output = echo(target.ae, target.dimse_port, env=sender_env(value == "1"), debug=True)
        seen[value] = "disabling Nagle algorithm" in output
    if not seen["1"] or seen["0"]:
        raise BenchError(
            f"DCMTK did not behave as expected: TCP_NODELAY=1 disabled Nagle: {seen['1']}, "
            f"TCP_NODELAY=0 disabled Nagle: {seen['0']}"
        )
    return seen


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


# --- results ---------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    mode: str
    repeat: int
    senders: int
    instances: int
    seconds: float
    settle_seconds: float

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


def summarize(runs: list[Run], targets: list[str], modes: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in modes:
        per_target: dict[str, Any] = {}
        for target in targets:
            mine = [r for r in runs if r.mode == mode and r.target == target]
            if not mine:
                continue
            rates = [r.rate for r in mine]
            per_target[target] = {
                "instances": mine[0].instances,
                "median_instances_per_s": statistics.median(rates),
                "median_seconds": statistics.median(r.seconds for r in mine),
                "min_instances_per_s": min(rates),
                "max_instances_per_s": max(rates),
                "repeats": len(mine),
            }
        ratios = {}
        pb = per_target.get("pacsbridge")
        for peer, cell in per_target.items():
            if pb and peer != "pacsbridge":
                ratios[f"pacsbridge/{peer}"] = (
                    pb["median_instances_per_s"] / cell["median_instances_per_s"]
                )
        summary[mode] = {"targets": per_target, "ratios": ratios}
    return summary


def print_table(summary: dict[str, Any], targets: list[str], mode_labels: dict[str, str]) -> None:
    width = max(len(label) for label in mode_labels.values()) + 2
    peers = [t for t in targets if t != "pacsbridge"]
    header = f"{'mode':<{width}}" + "".join(f"{t:>18}" for t in targets)
    log("")
    log("median instances/s (median seconds per run)")
    log(header)
    log("-" * len(header))
    for mode, label in mode_labels.items():
        row = f"{label:<{width}}"
        for target in targets:
            cell = summary[mode]["targets"].get(target)
            text = (
                f"{cell['median_instances_per_s']:.1f} ({cell['median_seconds']:.2f}s)"
                if cell
                else "-"
            )
            row += f"{text:>18}"
        log(row)
    if "pacsbridge" not in targets or not peers:
        log("")
        return
    log("")
    log("ratio pacsbridge / peer in instances/s (> 1: pacsbridge is faster)")
    header = f"{'mode':<{width}}" + "".join(f"{'pb/' + p:>18}" for p in peers)
    log(header)
    log("-" * len(header))
    for mode, label in mode_labels.items():
        row = f"{label:<{width}}"
        for peer in peers:
            ratio = summary[mode]["ratios"].get(f"pacsbridge/{peer}")
            row += f"{ratio:>18.2f}" if ratio is not None else f"{'-':>18}"
        log(row)
    log("")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="C-STORE ingest: pacsbridge vs Orthanc vs storescp, driven by DCMTK storescu.",
    )
    parser.add_argument("--slices", type=int, default=200, help="slices per single-association run")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu processes")
    parser.add_argument("--per-sender", type=int, default=100, help="slices per concurrent sender")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--repeat", type=int, default=3, help="runs per target and mode (median)")
    parser.add_argument(
        "--layout",
        choices=["studies", "series"],
        default="studies",
        help="concurrent senders send one study each (default) or one series each of one study",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 40 slices, 4 x 10 concurrent, 1 repeat"
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL server for pacsbridge's index, e.g. "
        "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres; a fresh database is created "
        "on it and dropped afterwards (the name in the URL is not used)",
    )
    parser.add_argument(
        "--targets",
        default="pacsbridge,orthanc,storescp",
        help="comma-separated subset of pacsbridge,orthanc,storescp",
    )
    parser.add_argument(
        "--peer-nodelay",
        choices=["both", "unset", "1"],
        default="both",
        help="TCP_NODELAY in the environment of Orthanc and storescp (their accept side): "
        "'unset' = as shipped (Nagle on), '1' = Nagle off, 'both' = run each peer both ways "
        "(default; names orthanc/storescp and orthanc-nd/storescp-nd)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one send may take before failing"
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.per_sender, args.repeat = 40, 10, 1
    known = {"pacsbridge", "orthanc", "storescp"}
    args.target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.target_names or set(args.target_names) - known:
        parser.error(f"--targets must name some of {sorted(known)}")
    if min(args.slices, args.senders, args.per_sender, args.repeat, args.size) < 1:
        parser.error("--slices, --senders, --per-sender, --repeat and --size must be >= 1")
    return args


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


def check_tools(names: list[str]) -> None:
    needed = ["storescu", "echoscu"]
    if "storescp" in names:
        needed.append("storescp")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if "orthanc" in names and not os.access(ORTHANC_BIN, os.X_OK):
        missing.append(ORTHANC_BIN)
    if missing:
        raise BenchError(f"missing programs: {', '.join(missing)} (apt-get install dcmtk orthanc)")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    check_tools(args.target_names)
    database_url = None
    if args.database_url and "pacsbridge" in args.target_names:
        database_url = stack.enter_context(fresh_postgres_database(args.database_url))

    targets: list[Target] = []

    def stop_targets() -> None:
        for target in reversed(targets):
            log(f"stopping {target.name} ...")
            target.stop()

    stack.callback(stop_targets)
    peer_variants = {"both": [False, True], "unset": [False], "1": [True]}[args.peer_nodelay]
    planned: list[Target] = []
    for name in args.target_names:
        if name == "pacsbridge":
            executable = pacsbridge_executable()
            planned.append(PacsbridgeTarget(workdir / "pacsbridge", executable, database_url))
        for nodelay in peer_variants:
            suffix = "-nd" if nodelay else ""
            if name == "orthanc":
                planned.append(OrthancTarget(workdir / f"orthanc{suffix}", nodelay=nodelay))
            elif name == "storescp":
                planned.append(StorescpTarget(workdir / f"storescp{suffix}", nodelay=nodelay))
    for target in planned:
        targets.append(target)  # before start(): a half-started target is stopped as well
        log(f"starting {target.name} ...")
        target.start()
        assert target.process is not None
        log(
            f"  {target.name} {target.version}: pid {target.process.pid}, AE {target.ae}, "
            f"DIMSE {LOOPBACK}:{target.dimse_port}"
        )

    nagle = startup_probe(targets[0])
    log(
        "TCP_NODELAY probe (echoscu -d, same libdcmnet as storescu): "
        f"=1 disables Nagle: {nagle['1']}, =0 disables Nagle: {nagle['0']}"
    )

    modes = {
        "nodelay": (1, args.slices, True),
        "nagle": (1, args.slices, False),
        "concurrent": (args.senders, args.per_sender, True),
    }
    labels = {
        "nodelay": f"a) 1 assoc x {args.slices}, TCP_NODELAY=1",
        "nagle": f"b) 1 assoc x {args.slices}, TCP_NODELAY=0",
        "concurrent": f"c) {args.senders} x {args.per_sender} concurrent, TCP_NODELAY=1",
    }
    expected = {t.name: t.instance_count() for t in targets}
    runs: list[Run] = []
    data_root = workdir / "data"
    logdir = workdir / "senders"
    logdir.mkdir()
    for repeat in range(args.repeat):
        order = targets[repeat % len(targets) :] + targets[: repeat % len(targets)]
        for mode, (senders, per_sender, nodelay) in modes.items():
            count = senders * per_sender
            directory = data_root / f"r{repeat}-{mode}"
            t0 = time.perf_counter()
            batches = generate_batches(
                directory,
                senders=senders,
                per_sender=per_sender,
                size=args.size,
                layout=args.layout,
                tag=f"{repeat}-{mode}",
            )
            os.sync()
            log(
                f"[{repeat + 1}/{args.repeat}] {labels[mode]}: generated {count} slices "
                f"in {time.perf_counter() - t0:.1f} s"
            )
            for target in order:
                os.sync()  # do not let one target's write-back land in the next one's run
                target.ensure_alive()
                seconds = send(
                    target, batches, nodelay=nodelay, timeout=args.timeout, logdir=logdir
                )
                expected[target.name] += count
                settle = verify_count(target, expected[target.name])
                runs.append(
                    Run(target.name, mode, repeat + 1, senders, count, seconds, round(settle, 3))
                )
                note = f" (+{settle:.1f} s until counted)" if settle else ""
                log(
                    f"    {target.name:<10} {count} instances in {seconds:6.2f} s = "
                    f"{count / seconds:7.1f} inst/s, verified {expected[target.name]} held{note}"
                )
            shutil.rmtree(directory, ignore_errors=True)

    names = [t.name for t in targets]
    summary = summarize(runs, names, list(modes))
    print_table(summary, names, labels)
    log("durability and receive-side settings in effect:")
    for target in targets:
        log(f"  {target.name:<11} {target.durability}")
    return {
        "benchmark": "ingest",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.ingest", *sys.argv[1:]],
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "parameters": {
            "slices": args.slices,
            "senders": args.senders,
            "per_sender": args.per_sender,
            "size": args.size,
            "repeat": args.repeat,
            "layout": args.layout,
            "peer_nodelay": args.peer_nodelay,
            "transfer_syntax": "Explicit VR Little Endian",
            "database": "postgresql" if database_url else "sqlite",
            "quick": args.quick,
        },
        "modes": labels,
        "tcp_nodelay": {
            "semantics": "DCMTK reads env TCP_NODELAY: non-zero disables Nagle, 0 keeps it; "
            "unset = compiled default (Nagle on in this build)",
            "probe": nagle,
        },
        "targets": {
            t.name: {
                "version": t.version,
                "ae": t.ae,
                "durability": t.durability,
                **({"orthanc_config": t.config} if isinstance(t, OrthancTarget) else {}),
            }
            for t in targets
        },
        "storescu": dcmtk_version("storescu"),
        "runs": [asdict(r) | {"instances_per_s": r.rate} for r in runs],
        "summary": summary,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:  # `tests.dicom_factory` lives in the project, not installed
        sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="pacsbridge-bench-"))
    log(f"working in {workdir}")
    code = 1
    stack = contextlib.ExitStack()
    try:
        result = run(args, workdir, stack)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS_DIR / f"ingest-{stamp}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"results written to {out.relative_to(ROOT)}")
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
            stack.close()  # stops the targets, then drops the PostgreSQL database
        finally:
            if args.keep_temp:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
