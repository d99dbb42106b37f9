"""DICOMweb benchmark: pacsbridge against Orthanc with its DICOMweb plugin, side by side.

Run from the project root::

    .venv/bin/python -m bench.dicomweb            # 200 x 512² CT, metadata of 200 and 2,000
    .venv/bin/python -m bench.dicomweb --quick    # smoke run: 40 x 256², metadata of 40 and 400

Both servers run on free loopback ports with their own temporary directories and get the same
requests from one HTTP client (httpx, ``Accept-Encoding: gzip``):

- STOW-RS of one CT series in one multipart/related body (MB/s, instances/s);
- WADO-RS retrieve of that study, as stored (``transfer-syntax=*``, what OHIF asks for) and with
  no transfer syntax (MB/s received);
- WADO-RS study metadata of the 200-instance study and of a 2,000-instance study (seconds, and
  per-instance growth from one to the other);
- QIDO-RS: the versions of bench.query's C-FIND searches over its ``--studies`` (10,000)
  one-instance studies, and searches a viewer makes (median latency, result counts checked).

Medians of ``--repeat`` runs; ratios pacsbridge/Orthanc are printed and everything is written
to ``bench/results/dicomweb-<timestamp>.json``. With ``--auth`` both servers authenticate every
request: pacsbridge with ``PACSBRIDGE_AUTH=required`` and an OAuth2 bearer token from its own
issuer, Orthanc with HTTP Basic. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bench.peers import (
    CALLING_AE,
    LOOPBACK,
    ORTHANC_BIN,
    BenchError,
    OrthancTarget,
    PacsbridgeTarget,
    basic_authorization,
    fresh_postgres_database,
    log,
    new_uid,
    pacsbridge_executable,
    run_benchmark,
    wait_idle,
)
from bench.query import RETURN_KEYS, StudyInfo, pacsbridge_stable_settings, study_datasets
from bench.query import queries as find_queries

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOM_JSON = "application/dicom+json"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DEFAULT = 'multipart/related; type="application/dicom"'
CURL = shutil.which("curl")

#: Targets: (pacsbridge/peer) ratio wanted, and whether more is better.
TARGETS = {
    "stow_mb_per_s": (1.0, True),
    "wado_as_stored_mb_per_s": (1.0, True),
    "wado_default_mb_per_s": (1.0, True),
    "metadata_small_s": (0.5, False),
    "metadata_large_s": (0.5, False),
}
#: pacsbridge runs no jobs here: the benchmark times the DICOMweb service alone.
PACSBRIDGE_ENV = {"PACSBRIDGE_WORKER_IN_SERVE": "false"}
#: With ``--auth``: tokens required on every request, and the calling AE title of the start-up
#: C-ECHO declared as a peer allowed nothing but C-ECHO (unknown callers are rejected at
#: association then).
PACSBRIDGE_AUTH_ENV = {
    "PACSBRIDGE_AUTH": "required",
    "PACSBRIDGE_PEERS": json.dumps(
        {"bench": {"ae_title": CALLING_AE, "host": LOOPBACK, "port": 104, "permissions": ["echo"]}}
    ),
}
#: The account each server's requests authenticate as with ``--auth``.
AUTH_USER = "bench"
AUTH_ROLE = "admin"
#: A bearer token is renewed when it has fewer seconds than this left, between requests, so
#: that no timed request carries an expired token or waits for a new one.
TOKEN_RENEW_MARGIN = 60.0
#: QIDO-RS latency wanted, pacsbridge/Orthanc, for each search.
QIDO_TARGET = 1 / 3


# --- data ------------------------------------------------------------------------------------


def part10(ds: Any) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ct_series(
    count: int, size: int, study: str | None = None, **kwargs: Any
) -> tuple[str, str, list[bytes]]:
    from tests.dicom_factory import ct_slice

    study, series = study or new_uid(), new_uid()
    return (
        study,
        series,
        [
            part10(ct_slice(study_uid=study, series_uid=series, index=i, size=size, **kwargs))
            for i in range(count)
        ],
    )


def multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = b"".join(head + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


# --- authentication --------------------------------------------------------------------------


class Credentials(Protocol):
    """What every request to one server carries with ``--auth``."""

    description: str

    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header to send now (called before a request is timed)."""
        ...

    def forged(self) -> dict[str, str]:
        """An ``Authorization`` header of the same kind that the server must refuse."""
        ...


class BasicCredentials:
    """HTTP Basic (RFC 7617): Orthanc's ``RegisteredUsers``."""

    def __init__(self, user: str, password: str) -> None:
        self._headers = basic_authorization(user, password)
        self._forged = basic_authorization(user, f"not-{password}")
        self.description = (
            f"HTTP Basic (AuthenticationEnabled, RegisteredUsers: {user!r}), sent on every request"
        )

    def headers(self) -> dict[str, str]:
        return self._headers

    def forged(self) -> dict[str, str]:
        return self._forged


class BearerCredentials:
    """An OAuth2 bearer token (RFC 6750 2.1) from pacsbridge's ``POST /auth/token``: the
    password grant (RFC 6749 4.3) once, then the refresh token (RFC 6749 6) whenever the access
    token nears its expiry. Renewal happens in ``headers()``, outside the timed requests."""

    def __init__(self, base_url: str, user: str, password: str, role: str) -> None:
        self.token_url = f"{base_url}/auth/token"
        self.renewals = 0
        answer = self._grant({"grant_type": "password", "username": user, "password": password})
        self.lifetime = self._expires_in
        self.description = (
            f"OAuth2 bearer JWT from the built-in issuer (PACSBRIDGE_AUTH=required; user {user!r}, "
            f"role {role}, password grant; {answer.get('token_type', '?')} token valid "
            f"{self.lifetime:.0f} s, renewed by refresh token), sent on every request"
        )

    def _grant(self, form: dict[str, str]) -> dict[str, Any]:
        import httpx

        try:
            response = httpx.post(self.token_url, data=form, timeout=60)
        except httpx.HTTPError as exc:
            raise BenchError(f"POST {self.token_url} failed: {exc}") from exc
        if response.status_code != 200:
            # RFC 6749 5.2: the body names the error; it holds no secret.
            raise BenchError(
                f"POST {self.token_url} ({form['grant_type']} grant) answered "
                f"{response.status_code}: {response.text[:300]}"
            )
        answer: dict[str, Any] = response.json()
        if answer.get("token_type", "").lower() != "bearer" or not answer.get("refresh_token"):
            raise BenchError(
                f"{self.token_url} answered no bearer token with a refresh token: {sorted(answer)}"
            )
        self._access = str(answer["access_token"])
        self._refresh = str(answer["refresh_token"])
        self._expires_in = float(answer.get("expires_in", 0))
        self._expires_at = time.monotonic() + self._expires_in
        return answer

    def headers(self) -> dict[str, str]:
        if self._expires_at - time.monotonic() < TOKEN_RENEW_MARGIN:
            self._grant({"grant_type": "refresh_token", "refresh_token": self._refresh})
            self.renewals += 1
        return {"Authorization": f"Bearer {self._access}"}

    def forged(self) -> dict[str, str]:
        """The current token with another signature (RFC 7515 7.1: header.payload.signature)."""
        header, payload, _signature = self._access.split(".")
        signature = base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=").decode()
        return {"Authorization": f"Bearer {header}.{payload}.{signature}"}


def add_pacsbridge_user(target: PacsbridgeTarget, user: str, password: str, role: str) -> None:
    """``pacsbridge users add`` against the target's own data dir and database."""
    result = subprocess.run(
        [str(target.executable), "users", "add", user, "--role", role, "--password-stdin"],
        input=password + "\n",
        env=target.env,
        cwd=target.workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(
            f"`pacsbridge users add {user}` failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


# --- one server --------------------------------------------------------------------------------


class Server:
    def __init__(
        self, name: str, root: str, target: Any, credentials: Credentials | None = None
    ) -> None:
        import httpx

        self.name = name
        self.root = root
        self.target = target
        self.credentials = credentials
        self.client = httpx.Client(timeout=600, headers={"Accept-Encoding": "gzip"})
        self.last_store = 0.0

    def auth(self) -> dict[str, str]:
        return self.credentials.headers() if self.credentials is not None else {}

    def stow(self, parts: Sequence[bytes]) -> tuple[float, int]:
        body, content_type = multipart(parts)
        headers = {"Content-Type": content_type, "Accept": DICOM_JSON, **self.auth()}
        started = time.perf_counter()
        response = self.client.post(f"{self.root}/studies", content=body, headers=headers)
        seconds = time.perf_counter() - started
        self.last_store = time.monotonic()
        if response.status_code != 200:
            raise BenchError(
                f"{self.name} STOW-RS answered {response.status_code}: {response.text[:500]}"
            )
        stored = response.json().get("00081199", {}).get("Value", [])
        if len(stored) != len(parts):
            raise BenchError(f"{self.name} stored {len(stored)} of {len(parts)} instances")
        return seconds, len(body)

    def retrieve(self, study: str, accept: str) -> tuple[float, int] | str:
        """Seconds and bytes of one WADO-RS retrieve, read by curl when it is installed (a C
        client measures the server, not the client), else by httpx."""
        auth = self.auth()
        if CURL:
            # curl reads the Authorization header from its standard input (``-H @-``), so that
            # no credential shows in the process list.
            written = "%{http_code} %{time_total} %{size_download}"
            argv = [CURL, "-s", "-o", "/dev/null", "-w", written, "-H", f"Accept: {accept}"]
            if auth:
                argv += ["-H", "@-"]
            result = subprocess.run(
                [*argv, f"{self.root}/studies/{study}"],
                input="".join(f"{k}: {v}\r\n" for k, v in auth.items()) if auth else None,
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            code, seconds, size = result.stdout.split()
            if code != "200":
                return f"HTTP {code}"
            return float(seconds), int(size)
        started = time.perf_counter()
        received = 0
        with self.client.stream(
            "GET", f"{self.root}/studies/{study}", headers={"Accept": accept, **auth}
        ) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            for chunk in response.iter_raw(1 << 20):
                received += len(chunk)
        return time.perf_counter() - started, received

    def get_json(self, path: str, accept: str = DICOM_JSON) -> tuple[float, Any]:
        headers = {"Accept": accept, **self.auth()}
        started = time.perf_counter()
        response = self.client.get(f"{self.root}{path}", headers=headers)
        content = response.content  # decompressed
        seconds = time.perf_counter() - started
        if response.status_code not in (200, 204):
            raise BenchError(f"{self.name} GET {path} answered {response.status_code}")
        return seconds, json.loads(content) if content else []

    def close(self) -> None:
        self.client.close()


def alternate(
    servers: Sequence[Server], path_of: Callable[[Server], str], repeat: int, warmup: int
) -> dict[str, tuple[list[float], list[int]]]:
    """GET a JSON resource ``repeat`` times from every server, alternating between them so
    that a busy host slows both alike; (seconds, result counts) per server."""
    samples: dict[str, tuple[list[float], list[int]]] = {s.name: ([], []) for s in servers}
    for round_ in range(warmup + repeat):
        for server in servers:
            seconds, body = server.get_json(path_of(server))
            if round_ >= warmup:
                samples[server.name][0].append(seconds)
                samples[server.name][1].append(len(body))
    return samples


# --- the benchmark ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dicomweb",
        description="DICOMweb (STOW-RS, WADO-RS, metadata, QIDO-RS): pacsbridge vs Orthanc",
    )
    parser.add_argument("--slices", type=int, default=200, help="instances of the CT series")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument(
        "--large", type=int, default=2000, help="instances of the large metadata study"
    )
    parser.add_argument(
        "--studies", type=int, default=10000, help="one-instance studies for QIDO-RS"
    )
    parser.add_argument("--seed", type=int, default=1729, help="seed of the QIDO-RS data")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--qido-repeat", type=int, default=30, help="runs per QIDO-RS query")
    parser.add_argument(
        "--database-url",
        help="run pacsbridge on PostgreSQL: a fresh database is created on this server",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="authentication on: pacsbridge with PACSBRIDGE_AUTH=required and a bearer token, "
        "Orthanc with HTTP Basic",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run with small numbers")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.size, args.large, args.studies = 40, 256, 400, 500
        args.repeat, args.qido_repeat = 1, 10
    if min(args.slices, args.size, args.large, args.studies, args.repeat, args.qido_repeat) < 1:
        parser.error("all counts must be >= 1")
    return args


def start_targets(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> list[Server]:
    if not os.access(ORTHANC_BIN, os.X_OK) or not DICOMWEB_PLUGIN.exists():
        raise BenchError(
            f"needs {ORTHANC_BIN} and {DICOMWEB_PLUGIN} (apt-get install orthanc orthanc-dicomweb)"
        )
    database_url = None
    if args.database_url:
        database_url = stack.enter_context(fresh_postgres_database(args.database_url))
    # With --auth each server gets its own random password (argon2id-hashed by pacsbridge,
    # plain in Orthanc's configuration file, which lives in the temporary directory).
    pacsbridge_password = secrets.token_urlsafe(24) if args.auth else ""
    orthanc_password = secrets.token_urlsafe(24) if args.auth else ""
    pacsbridge = PacsbridgeTarget(
        workdir / "pacsbridge",
        pacsbridge_executable(),
        database_url,
        extra_env={**PACSBRIDGE_ENV, **(PACSBRIDGE_AUTH_ENV if args.auth else {})},
    )
    orthanc = OrthancTarget(
        workdir / "orthanc",
        nodelay=True,
        name="orthanc",
        config={
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
        basic_auth=(AUTH_USER, orthanc_password) if args.auth else None,
    )
    servers: list[Server] = []
    for target in (pacsbridge, orthanc):
        stack.callback(target.stop)
        log(f"starting {target.name} ...")
        target.start()
        log(f"  {target.name} {target.version}: {target.http}")
        credentials: Credentials | None = None
        if args.auth and target is pacsbridge:
            add_pacsbridge_user(pacsbridge, AUTH_USER, pacsbridge_password, AUTH_ROLE)
            credentials = BearerCredentials(
                pacsbridge.http, AUTH_USER, pacsbridge_password, AUTH_ROLE
            )
        elif args.auth:
            credentials = BasicCredentials(AUTH_USER, orthanc_password)
        server = Server(target.name, f"{target.http}/dicom-web", target, credentials)
        stack.callback(server.close)
        servers.append(server)
    for server in servers:
        log(f"  {server.name} authentication: {authentication(server)}")
    return servers


def authentication(server: Server) -> str:
    if server.credentials is not None:
        return server.credentials.description
    if server.name == "pacsbridge":
        return "none (PACSBRIDGE_AUTH=auto, HTTP on 127.0.0.1 only)"
    return "none (AuthenticationEnabled false, RemoteAccessAllowed false: loopback only)"


def check_enforced(servers: Sequence[Server], study: dict[str, str]) -> dict[str, Any]:
    """With ``--auth``: the status of each kind of request the benchmark times (QIDO-RS,
    metadata, WADO-RS, STOW-RS) sent without credentials and with forged ones, which must be
    401 (RFC 9110 15.5.2, RFC 6750 3.1), on a study that exists. Raises BenchError otherwise:
    the numbers would not be those of an authenticating server."""
    probes: dict[str, Any] = {}
    failures = []
    _study, _series, parts = ct_series(1, 16)
    body, content_type = multipart(parts)
    for server in servers:
        if server.credentials is None:
            raise BenchError(f"{server.name} has no credentials to forge")
        uid = study[server.name]
        requests = [
            ("QIDO-RS", "GET", f"/studies?StudyInstanceUID={uid}", DICOM_JSON, None),
            ("metadata", "GET", f"/studies/{uid}/metadata", DICOM_JSON, None),
            ("WADO-RS", "GET", f"/studies/{uid}", AS_STORED, None),
            ("STOW-RS", "POST", "/studies", DICOM_JSON, body),
        ]
        probes[server.name] = {}
        for label, method, path, accept, content in requests:
            for how, auth in (("none", {}), ("forged", server.credentials.forged())):
                headers = {"Accept": accept, **auth}
                if content is not None:
                    headers["Content-Type"] = content_type
                response = server.client.request(
                    method, f"{server.root}{path}", headers=headers, content=content
                )
                probes[server.name][f"{label}, credentials {how}"] = response.status_code
                if response.status_code != 401:
                    failures.append(
                        f"{server.name} {method} {path} with credentials {how}: "
                        f"{response.status_code}"
                    )
    if failures:
        raise BenchError("authentication not enforced (expected 401): " + "; ".join(failures))
    return probes


def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    servers = start_targets(args, workdir, stack)
    results: dict[str, dict[str, Any]] = {s.name: {} for s in servers}

    # Warm both up alike (first requests pay for imports, caches and connections).
    warmup_study: dict[str, str] = {}
    for server in servers:
        study, _series, parts = ct_series(5, 64)
        server.stow(parts)
        server.get_json(f"/studies/{study}/metadata")
        server.get_json(f"/studies?StudyInstanceUID={study}")
        server.retrieve(study, AS_STORED)
        warmup_study[server.name] = study
    probes: dict[str, Any] | None = None
    if args.auth:
        probes = check_enforced(servers, warmup_study)
        log("  without credentials or with forged ones, both servers answer 401 to every probe")

    # The archive the searches run on: bench.query's one-instance studies. Loaded first, so that
    # pacsbridge's stable-study work for them is over before anything is timed.
    log(f"loading {args.studies} one-instance studies for QIDO-RS (bench.query's data) ...")
    qido_studies: list[StudyInfo] = []
    small_parts: list[bytes] = []
    for info, ds in study_datasets(args.studies, seed=args.seed):
        qido_studies.append(info)
        small_parts.append(part10(ds))
    for server in servers:
        started = time.perf_counter()
        for start in range(0, len(small_parts), 100):
            server.stow(small_parts[start : start + 100])
        seconds = time.perf_counter() - started
        results[server.name]["qido_load_instances_per_s"] = len(small_parts) / seconds
        log(f"  {server.name:<10} {seconds:.1f} s ({len(small_parts) / seconds:.0f} instances/s)")
    del small_parts

    # STOW-RS: a new series per server and repeat (no duplicates), the last one is kept; runs
    # alternate between the servers.
    log(f"STOW-RS: {args.slices} x {args.size}² CT in one request, {args.repeat} run(s)")
    kept: dict[str, tuple[str, str]] = {}
    stow_runs: dict[str, list[tuple[float, int]]] = {server.name: [] for server in servers}
    for repeat in range(args.repeat):
        for server in servers:
            study, series, parts = ct_series(args.slices, args.size, seed=repeat)
            seconds, size = server.stow(parts)
            stow_runs[server.name].append((seconds, size))
            kept[server.name] = (study, series)
            rate = size / seconds / 1e6
            log(f"  {server.name:<10} {size / 1e6:.0f} MB in {seconds:.2f} s = {rate:.0f} MB/s")
    for server in servers:
        stowed = stow_runs[server.name]
        results[server.name]["stow_mb_per_s"] = statistics.median(z / t / 1e6 for t, z in stowed)
        results[server.name]["stow_instances_per_s"] = args.slices / statistics.median(
            t for t, _z in stowed
        )

    log(f"WADO-RS retrieve of that study (read by {'curl' if CURL else 'httpx'})")
    # Runs alternate between the servers, so that both see the same load on a busy host.
    variants = (("as_stored", AS_STORED), ("default", DEFAULT))
    wado_runs: dict[tuple[str, str], list[float]] = {}
    for server in servers:
        for label, accept in variants:
            outcome = server.retrieve(kept[server.name][0], accept)  # warm-up, and checks
            if isinstance(outcome, str):
                results[server.name][f"wado_{label}_error"] = outcome
                log(f"  {server.name:<10} {label}: {outcome}")
            else:
                wado_runs[(server.name, label)] = []
    for _ in range(max(args.repeat, 7)):
        for server in servers:
            for label, accept in variants:
                if (server.name, label) not in wado_runs:
                    continue
                outcome = server.retrieve(kept[server.name][0], accept)
                if isinstance(outcome, str):
                    raise BenchError(f"{server.name} WADO-RS {label} failed: {outcome}")
                seconds, received = outcome
                wado_runs[(server.name, label)].append(received / seconds / 1e6)
    for server in servers:
        for label, _accept in variants:
            runs = wado_runs.get((server.name, label))
            value = statistics.median(runs) if runs else None
            results[server.name][f"wado_{label}_mb_per_s"] = value
            if runs:
                results[server.name][f"wado_{label}_runs"] = runs
                log(
                    f"  {server.name:<10} {label}: median {value:.0f} MB/s "
                    f"(min {min(runs):.0f}, max {max(runs):.0f})"
                )

    log(f"loading a {args.large}-instance study (64² slices, series of 200) ...")
    large_study = new_uid()
    for server in servers:
        for start in range(0, args.large, 200):
            count = min(200, args.large - start)
            _study, _series, parts = ct_series(count, 64, study=large_study)
            server.stow(parts)

    log("WADO-RS metadata (runs alternate between the servers)")
    for label, count in (("small", args.slices), ("large", args.large)):

        def metadata_path(server: Server, label: str = label) -> str:
            study = kept[server.name][0] if label == "small" else large_study
            return f"/studies/{study}/metadata"

        samples = alternate(servers, metadata_path, max(args.repeat, 5), warmup=1)
        for server in servers:
            times, sizes = samples[server.name]
            if sizes[-1] != count:
                raise BenchError(f"{server.name} metadata held {sizes[-1]} of {count} instances")
            seconds = statistics.median(times)
            results[server.name][f"metadata_{label}_s"] = seconds
            log(f"  {server.name:<10} {count:>5} instances: {seconds * 1000:7.1f} ms")
    for server in servers:
        small = results[server.name]["metadata_small_s"]
        large = results[server.name]["metadata_large_s"]
        results[server.name]["metadata_growth_per_instance"] = (large / args.large) / (
            small / args.slices
        )

    # pacsbridge's stable-study scanner marks each study stable (and enqueues its jobs)
    # stable_age seconds after its last instance: that work must not land in timed searches.
    stable_age, scan_interval = pacsbridge_stable_settings(PACSBRIDGE_ENV)
    last_store = max(server.last_store for server in servers)
    delay = last_store + stable_age + scan_interval + 2 - time.monotonic()
    if delay > 0:
        log(f"waiting {delay:.0f} s: pacsbridge marks studies stable {stable_age:.0f} s after "
            "their last instance ...")  # fmt: skip
        time.sleep(delay)
    processes = [s.target.process for s in servers if s.target.process is not None]
    log(f"  all servers idle after another {wait_idle(processes, timeout=600):.0f} s")

    # The QIDO-RS versions of bench.query's C-FIND searches, on the same data, with the same
    # return keys; then searches a viewer makes. Explicit limits: Orthanc has no default one.
    limit = f"limit={args.studies}&includefield={','.join(RETURN_KEYS)}"
    slices = args.slices
    searches: list[tuple[str, str, int | None]] = []
    for query in find_queries(qido_studies):
        keys = "&".join(f"{k}={v}" for k, v in query.keys.items())
        searches.append((f"C-FIND {query.name}", f"/studies?{keys}&{limit}", query.expected))
    searches += [
        ("viewer: 25 studies", "/studies?limit=25", 25),
        # Up to 100 of the CT studies of the data and of the benchmark's own series: a count
        # the two servers must agree on.
        ("viewer: CT studies, 100", "/studies?ModalitiesInStudy=CT&limit=100", None),
        ("viewer: series of a study", "/studies/{study}/series", 1),
        ("viewer: instances of a series", "/studies/{study}/series/{series}/instances", slices),
    ]
    log(f"QIDO-RS, median of {args.qido_repeat} (runs alternate between the servers)")
    per_query: dict[str, dict[str, Any]] = {server.name: {} for server in servers}
    for label, template, expected in searches:

        def qido_path(server: Server, template: str = template) -> str:
            study, series = kept[server.name]
            return template.format(study=study, series=series)

        samples = alternate(servers, qido_path, args.qido_repeat, warmup=2)
        for server in servers:
            times, counts = samples[server.name]
            seconds = statistics.median(times)
            per_query[server.name][label] = {
                "path": qido_path(server),
                "median_s": seconds,
                "results": counts[-1],
                "expected": expected,
            }
            log(f"  {server.name:<10} {label:<34} {seconds * 1000:7.2f} ms "
                f"({counts[-1]} results)")  # fmt: skip
    for server in servers:
        results[server.name]["qido"] = per_query[server.name]
        results[server.name]["qido_median_s"] = statistics.median(
            q["median_s"] for q in per_query[server.name].values()
        )

    pb, peer = results["pacsbridge"], results["orthanc"]
    ratios: dict[str, Any] = {}
    for key, (wanted, higher_better) in TARGETS.items():
        if pb.get(key) is None or peer.get(key) is None:
            ratios[key] = None
            continue
        ratio = pb[key] / peer[key]
        ratios[key] = {
            "ratio": ratio,
            "target": wanted,
            "met": ratio >= wanted if higher_better else ratio <= wanted,
        }
    for label, _template, _expected in searches:
        pb_q, peer_q = pb["qido"][label], peer["qido"][label]
        expected = pb_q["expected"]  # None: whatever both servers agree on
        counted = pb_q["results"] == peer_q["results"] and expected in (None, pb_q["results"])
        ratio = pb_q["median_s"] / peer_q["median_s"]
        ratios[f"qido {label}"] = {
            "ratio": ratio,
            "target": QIDO_TARGET,
            "met": counted and ratio <= QIDO_TARGET,
            "results": [pb_q["results"], peer_q["results"]],
            "expected": pb_q["expected"],
        }
    print_table(results, ratios, {server.name: authentication(server) for server in servers})
    pacsbridge_target = servers[0].target
    orthanc_target = servers[1].target
    return {
        "benchmark": "dicomweb",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.dicomweb", *sys.argv[1:]],
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "parameters": {
            "slices": args.slices,
            "size": args.size,
            "large": args.large,
            "studies": args.studies,
            "seed": args.seed,
            "repeat": args.repeat,
            "qido_repeat": args.qido_repeat,
            "database": "postgresql" if args.database_url else "sqlite",
            "quick": args.quick,
            "wado_client": "curl" if CURL else "httpx",
            "auth": args.auth,
        },
        "authentication": {
            "enabled": args.auth,
            **{server.name: authentication(server) for server in servers},
            "unauthenticated_probes": probes,
            "token_renewals": getattr(servers[0].credentials, "renewals", None),
        },
        "targets": {
            "pacsbridge": {
                "version": pacsbridge_target.version,
                "durability": pacsbridge_target.durability,
            },
            "orthanc": {
                "version": orthanc_target.version,
                "config": redacted(orthanc_target.config),
                "durability": orthanc_target.durability,
            },
        },
        "results": results,
        "ratios": ratios,
    }


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """Orthanc's configuration without the passwords of ``RegisteredUsers``."""
    users = config.get("RegisteredUsers")
    if not users:
        return config
    return {**config, "RegisteredUsers": dict.fromkeys(users, "(redacted)")}


def print_table(
    results: dict[str, dict[str, Any]], ratios: dict[str, Any], auth: dict[str, str]
) -> None:
    rows = [
        ("STOW-RS MB/s", "stow_mb_per_s", 1),
        ("WADO-RS as stored MB/s", "wado_as_stored_mb_per_s", 1),
        ("WADO-RS default MB/s", "wado_default_mb_per_s", 1),
        ("metadata small (ms)", "metadata_small_s", 1000),
        ("metadata large (ms)", "metadata_large_s", 1000),
    ]
    log("")
    for name, description in auth.items():
        log(f"authentication, {name}: {description}")
    log(f"{'measure':<26}{'pacsbridge':>12}{'orthanc':>12}{'ratio':>8}{'target':>10}  met")
    log("-" * 74)
    for label, key, scale in rows:
        pb = results["pacsbridge"].get(key)
        peer = results["orthanc"].get(key)
        ratio = ratios.get(key)
        cells = [
            f"{pb * scale:12.1f}" if pb is not None else f"{'-':>12}",
            f"{peer * scale:12.1f}" if peer is not None else f"{'-':>12}",
        ]
        if ratio:
            sign = ">=" if TARGETS[key][1] else "<="
            cells.append(f"{ratio['ratio']:8.2f}{sign + format(ratio['target'], '.2f'):>10}  ")
            cells.append("yes" if ratio["met"] else "NO")
        log(f"{label:<26}" + "".join(cells))
    log(f"QIDO-RS searches (target: at most {QIDO_TARGET:.2f} of Orthanc's latency each)")
    for key, ratio in ratios.items():
        if key.startswith("qido ") and ratio:
            pb_ms = results["pacsbridge"]["qido"][key[5:]]["median_s"] * 1000
            peer_ms = results["orthanc"]["qido"][key[5:]]["median_s"] * 1000
            counts = "/".join(str(n) for n in ratio["results"])
            log(
                f"  {key[5:]:<40}{pb_ms:8.2f}{peer_ms:9.2f} ms{ratio['ratio']:7.2f}  "
                f"{'yes' if ratio['met'] else 'NO'}  "
                f"({counts} results, "
                + (f"{ratio['expected']} expected)" if ratio["expected"] else "both agree)")
            )
    for name, data in results.items():
        growth = data.get("metadata_growth_per_instance")
        if growth is not None:
            log(f"  {name}: metadata time per instance, large / small = {growth:.2f}")
    log("")


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("dicomweb", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
