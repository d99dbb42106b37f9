"""Shared pieces of the FHIR tests: a validator that every FHIR response of a test module passes
through (``fhir.resources.R4B``), hooked into each client the tests use (httpx, fhirclient's
``requests`` session, fhirpy's sync ``requests`` and async ``aiohttp`` calls), and the clients
themselves, built with the hook installed."""

from __future__ import annotations

import io
import json
import subprocess
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx
import pydicom
import requests
from fhir.resources.R4B import get_fhir_model_class
from fhirclient import client as smart_client
from fhirpy import AsyncFHIRClient, SyncFHIRClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from config import Settings
from tests.conftest import Backend, RunningServer, require_tool, start_server

FHIR_JSON = "application/fhir+json"
FHIR_PATH = "/fhir"


def expected_media_type(url: str, accept: str | None) -> str:
    """The media type a FHIR response must carry for a request (FHIR R4 http.html#mime):
    ``application/json`` only when the client asked for exactly that (``_format`` wins over
    ``Accept``), else ``application/fhir+json`` (errors about the format too)."""
    formats = parse_qs(urlsplit(url).query).get("_format")
    if formats:
        return (
            "application/json" if formats[-1].strip().lower() == "application/json" else FHIR_JSON
        )
    media = [part.split(";", 1)[0].strip().lower() for part in (accept or "").split(",")]
    if any(m in (FHIR_JSON, "application/json+fhir", "*/*", "") for m in media):
        return FHIR_JSON
    if "application/json" in media:
        return "application/json"
    return FHIR_JSON


# Required value-set bindings (FHIR R4) of the coded elements this server writes: the R4B models
# check structure and types but not codes.
_ISSUE_TYPES = frozenset(
    [
        "invalid",
        "structure",
        "required",
        "value",
        "invariant",
        "security",
        "login",
        "unknown",
        "expired",
        "forbidden",
        "suppressed",
        "processing",
        "not-supported",
        "duplicate",
        "multiple-matches",
        "not-found",
        "deleted",
        "too-long",
        "code-invalid",
        "extension",
        "too-costly",
        "business-rule",
        "conflict",
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
        "informational",
    ]
)

REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("ImagingStudy", "status"): frozenset(
        {"registered", "available", "cancelled", "entered-in-error", "unknown"}
    ),
    ("DiagnosticReport", "status"): frozenset(
        {
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("Observation", "status"): frozenset(
        {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("Endpoint", "status"): frozenset(
        {"active", "suspended", "error", "off", "entered-in-error", "test"}
    ),
    ("Device", "status"): frozenset({"active", "inactive", "entered-in-error", "unknown"}),
    ("Bundle", "type"): frozenset(
        {
            "document",
            "message",
            "transaction",
            "transaction-response",
            "batch",
            "batch-response",
            "history",
            "searchset",
            "collection",
        }
    ),
    ("CapabilityStatement", "status"): frozenset({"draft", "active", "retired", "unknown"}),
}
_SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
_SEARCH_MODES = frozenset({"match", "include", "outcome"})


def _check_codes(where: str, resource: dict[str, Any]) -> None:
    kind = resource["resourceType"]
    for (of, element), codes in REQUIRED_CODES.items():
        if of == kind and element in resource:
            value = resource[element]
            assert value in codes, f"{where}: {kind}.{element} {value!r} is not in its value set"
    if kind == "OperationOutcome":
        for position, item in enumerate(resource.get("issue") or []):
            assert item.get("severity") in _SEVERITIES, f"{where}: issue[{position}].severity"
            assert item.get("code") in _ISSUE_TYPES, f"{where}: issue[{position}].code"
    if kind == "Bundle":
        for position, entry in enumerate(resource.get("entry") or []):
            mode = (entry.get("search") or {}).get("mode")
            assert mode is None or mode in _SEARCH_MODES, f"{where}: entry[{position}] mode"


class FHIRValidator:
    """Validates FHIR response bodies with the R4B models and counts them per client.

    A body that does not validate is recorded (``failures``) and raised as AssertionError in
    the client's call; the tests also assert ``failures`` is empty after each test, in case a
    client swallowed the exception."""

    def __init__(self) -> None:
        self.validated: Counter[str] = Counter()
        self.resources: Counter[str] = Counter()
        self.failures: list[str] = []
        self.clients: set[str] = set()
        """The clients built with the hook (each must have had a body validated)."""
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.validated.values())

    # --- the check ---------------------------------------------------------------------------
    def check(
        self,
        *,
        client: str,
        method: str,
        url: str,
        status: int,
        content_type: str | None,
        accept: str | None,
        body: bytes,
    ) -> None:
        if FHIR_PATH not in urlsplit(url).path:
            return
        if status == 304 or not body.strip():
            return
        where = f"{client}: {method} {url} -> {status}"
        try:
            self._check_body(where, url, content_type, accept, body)
        except AssertionError as exc:
            with self._lock:
                self.failures.append(str(exc))
            raise
        with self._lock:
            self.validated[client] += 1

    def _check_body(
        self, where: str, url: str, content_type: str | None, accept: str | None, body: bytes
    ) -> None:
        media, _, params = (content_type or "").partition(";")
        wanted = expected_media_type(url, accept)
        assert media.strip().lower() == wanted, (
            f"{where}: Content-Type {content_type!r}, not {wanted}"
        )
        charset = params.strip().lower()
        assert charset in ("", "charset=utf-8"), f"{where}: Content-Type {content_type!r}"
        try:
            document = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AssertionError(f"{where}: the body is not UTF-8 JSON: {exc}") from exc
        assert isinstance(document, dict), f"{where}: the body is not a JSON object"
        self._validate(where, document)
        if document.get("resourceType") == "Bundle":
            for position, entry in enumerate(document.get("entry") or []):
                resource = entry.get("resource")
                assert isinstance(resource, dict), f"{where}: entry[{position}] has no resource"
                self._validate(f"{where} entry[{position}]", resource)
                full_url = entry.get("fullUrl") or ""
                mode = (entry.get("search") or {}).get("mode")
                if mode in ("match", "include") or document.get("type") == "history":
                    tail = f"/{resource['resourceType']}/{resource.get('id')}"
                    assert full_url.startswith("http") and full_url.endswith(tail), (
                        f"{where} entry[{position}]: fullUrl {full_url!r} is not absolute or "
                        f"does not name {tail}"
                    )

    def _validate(self, where: str, resource: dict[str, Any]) -> None:
        kind = resource.get("resourceType")
        assert isinstance(kind, str) and kind, f"{where}: no resourceType"
        try:
            model = get_fhir_model_class(kind)
        except Exception as exc:
            raise AssertionError(f"{where}: resourceType {kind!r} is not an R4B resource") from exc
        try:
            model.model_validate(resource)
        except Exception as exc:  # pydantic.ValidationError and the model's own checks
            raise AssertionError(f"{where}: the {kind} is not valid R4B: {exc}") from exc
        _check_codes(where, resource)
        with self._lock:
            self.resources[kind] += 1

    # --- hooks for each client library --------------------------------------------------------
    def httpx_hook(self, client: str = "httpx") -> Callable[[httpx.Response], None]:
        def hook(response: httpx.Response) -> None:
            response.read()
            self.check(
                client=client,
                method=response.request.method,
                url=str(response.request.url),
                status=response.status_code,
                content_type=response.headers.get("content-type"),
                accept=response.request.headers.get("accept"),
                body=response.content,
            )

        return hook

    def requests_hook(self, client: str) -> Callable[..., None]:
        def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            request = response.request
            accept = request.headers.get("accept")
            self.check(
                client=client,
                method=str(request.method),
                url=str(request.url),
                status=response.status_code,
                content_type=response.headers.get("content-type"),
                accept=accept.decode() if isinstance(accept, bytes) else accept,
                body=response.content,
            )

        return hook

    def aiohttp_middleware(
        self, client: str
    ) -> Callable[
        [
            aiohttp.ClientRequest,
            Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
        ],
        Awaitable[aiohttp.ClientResponse],
    ]:
        async def middleware(
            request: aiohttp.ClientRequest,
            handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
        ) -> aiohttp.ClientResponse:
            response = await handler(request)
            body = await response.read()  # kept by the response for the caller's .text()
            self.check(
                client=client,
                method=request.method,
                url=str(request.url),
                status=response.status,
                content_type=response.headers.get("content-type"),
                accept=request.headers.get("accept"),
                body=body,
            )
            return response

        return middleware

    # --- clients with the hook installed ------------------------------------------------------
    def httpx_client(self, base: str, **kwargs: Any) -> httpx.Client:
        self.clients.add("httpx")
        return httpx.Client(
            base_url=base, timeout=60, event_hooks={"response": [self.httpx_hook()]}, **kwargs
        )

    def fhirclient(self, base: str) -> smart_client.FHIRClient:
        self.clients.add("fhirclient")
        smart = smart_client.FHIRClient(settings={"app_id": "pacsbridge-tests", "api_base": base})
        smart.server.session.hooks["response"].append(self.requests_hook("fhirclient"))
        return smart

    def fhirpy_sync(self, base: str) -> SyncFHIRClient:
        self.clients.add("fhirpy-sync")
        return SyncFHIRClient(
            base,
            requests_config={
                "hooks": {"response": [self.requests_hook("fhirpy-sync")]},
                "timeout": 60,
            },
        )

    def fhirpy_async(self, base: str) -> AsyncFHIRClient:
        self.clients.add("fhirpy-async")
        return AsyncFHIRClient(
            base, aiohttp_config={"middlewares": (self.aiohttp_middleware("fhirpy-async"),)}
        )


# --- a server, and DICOM in and out of it -----------------------------------------------------

SERVER_ENV = {
    "PACSBRIDGE_AI": json.dumps({"enabled": False}),
    # DICOM dates and times are read in a fixed zone, so that ImagingStudy.started is known.
    "PACSBRIDGE_DICOM_TIMEZONE": "Europe/Berlin",
}


def start_fhir_server(tmp: Path, database_url: str | None = None) -> RunningServer:
    """A `pacsbridge serve` with the FHIR bridge and no AI, on SQLite (or ``database_url``)."""
    values: dict[str, Any] = {"data_dir": str(tmp / "data")}
    if database_url:
        values["database_url"] = database_url
    env = {f"PACSBRIDGE_{k.upper()}": str(v) for k, v in values.items()}
    backend = Backend("postgresql" if database_url else "sqlite", "file", Settings(**values), env)
    return start_server(backend, tmp, **SERVER_ENV)


def new_uid() -> str:
    return str(generate_uid(prefix=None))


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def storescu(server: RunningServer, paths: Sequence[Path]) -> None:
    """Send files with DCMTK storescu (one association)."""
    tool = require_tool("storescu")
    result = subprocess.run(
        [tool, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port), *map(str, paths)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def findscu(server: RunningServer, out: Path, keys: Sequence[str]) -> list[Dataset]:
    """A Study Root C-FIND with DCMTK findscu; the responses as data sets."""
    tool = require_tool("findscu")
    out.mkdir(parents=True, exist_ok=True)
    args = [tool, "-S", "-X", "-od", str(out), "-aec", server.ae_title]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(server.dimse_port)]
    result = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
