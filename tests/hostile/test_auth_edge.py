"""Hostile input at the authenticated HTTP edge of a `pacsbridge serve` with
``PACSBRIDGE_AUTH=required``, sent with a valid token (so that it reaches the handlers):
path traversal in FHIR ids and DICOMweb UIDs (``../``, ``%2e%2e%2f``, double-encoded),
an oversized ``Authorization`` header and a JWT of 1 MB, malformed JWTs (bad base64, JSON that
is not an object, a ``patient`` claim that is not an id) and SQL metacharacters in every FHIR
search parameter. Each gets a clean 4xx; nothing outside the data dir is touched, the index
keeps what it held, and the server still serves afterwards. (``alg: none``, HS256 keyed with
the public key, expiry, issuer and audience are tests/test_auth.py's.)"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from archive import Archive
from security.accounts import add_client, add_user
from security.keys import KeyStore
from tests.conftest import Backend, RunningServer, _backend, start_server
from tests.fhir_support import part10
from tests.test_archive_reports import ImagedStudy

PASSWORD = "correct horse battery staple"
SOCKET_WAIT = 60.0


@dataclass
class Edge:
    server: RunningServer
    workdir: Path
    data_dir: Path
    token: str
    patient_token: str
    """A token held to the patient's compartment (``patient/*.rs``)."""
    study: str
    patient: str
    outside: dict[str, tuple[int, int]]
    """Every file of the working directory outside the data dir: (size, mtime_ns)."""

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _outside(workdir: Path, data_dir: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for root, _, files in os.walk(workdir):
        if Path(root).is_relative_to(data_dir):
            continue
        for name in files:
            path = Path(root) / name
            if path.name.startswith("serve-") and path.suffix == ".log":
                continue  # the server's own log
            stat = path.stat()
            found[str(path.relative_to(workdir))] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    workdir = tmp_path_factory.mktemp("auth-edge")

    class _Request:  # _backend needs a request only for PostgreSQL or S3
        def getfixturevalue(self, name: str) -> Any:
            raise AssertionError(name)

    backend: Backend = _backend("sqlite", "file", workdir, _Request())  # type: ignore[arg-type]
    data_dir = Path(backend.settings.data_dir).resolve()
    # What a traversal would reach for: files beside the data dir and above it.
    (workdir / "etc").mkdir()
    (workdir / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (workdir / "secret.dcm").write_bytes(b"DICM" * 64)
    study = ImagedStudy(patient_id="EDGE-1")
    with closing(Archive(backend.settings)) as archive:
        add_user(archive, "root", "admin", PASSWORD)
        for ct in study.cts:
            archive.ingest(part10(ct))
    server = start_server(
        backend,
        workdir,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_WORKER_IN_SERVE="false",
    )
    try:
        answer = httpx.post(
            f"{server.http}/auth/token",
            data={"grant_type": "password", "username": "root", "password": PASSWORD},
        )
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        found = httpx.get(
            f"{server.http}/fhir/Patient",
            params={"identifier": "EDGE-1"},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        assert found["total"] == 1
        patient = found["entry"][0]["resource"]["id"]
        with closing(Archive(backend.settings)) as archive:
            secret = add_client(archive, "portal", "service", "patient/*.rs", patient=patient)
        granted = httpx.post(
            f"{server.http}/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "portal",
                "client_secret": secret,
            },
        )
        assert granted.status_code == 200 and granted.json()["patient"] == patient
        yield Edge(
            server,
            workdir,
            data_dir,
            token,
            granted.json()["access_token"],
            str(study.uid),
            patient,
            _outside(workdir, data_dir),
        )
    finally:
        server.stop()


def assert_intact(edge: Edge) -> None:
    """Nothing outside the data dir changed; the server serves the study and its patient."""
    assert _outside(edge.workdir, edge.data_dir) == edge.outside
    with httpx.Client(base_url=edge.server.http, headers=edge.bearer, timeout=30) as client:
        patient = client.get(f"/fhir/Patient/{edge.patient}")
        assert patient.status_code == 200 and patient.json()["id"] == edge.patient
        study = client.get(f"/fhir/ImagingStudy/{edge.study}")
        assert study.status_code == 200 and study.json()["numberOfInstances"] == 2
        metadata = client.get(f"/dicom-web/studies/{edge.study}/metadata")
        assert metadata.status_code == 200 and len(metadata.json()) == 2
        assert client.get("/fhir/Patient").json()["total"] == 1


def _raw(edge: Edge, method: str, target: str, headers: dict[str, str]) -> httpx.Response:
    """The target goes on the request line as it is: no client normalises ``..``."""
    with httpx.Client(base_url=edge.server.http, timeout=30) as client:
        return client.request(
            method, "/", headers=headers, extensions={"target": target.encode("latin-1")}
        )


# --- path traversal -------------------------------------------------------------------------

TRAVERSALS = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2E%2E%2F%2E%2E%2Fsecret.dcm",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "..%252f..%252fsecret.dcm",
    "..",
    "%2e%2e",
    "..%5c..%5cetc%5cpasswd",
    "%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
]


def test_traversal_in_fhir_ids(edge: Edge) -> None:
    held = {"Authorization": f"Bearer {edge.patient_token}"}
    for kind in ("Patient", "ImagingStudy", "DiagnosticReport", "Observation", "Device"):
        for bad in TRAVERSALS:
            for suffix, bearer in itertools.product(
                ("", "/_history", "/_history/1"), (edge.bearer, held)
            ):
                target = f"/fhir/{kind}/{bad}{suffix}"
                answer = _raw(edge, "GET", target, bearer)
                where = (target, answer.status_code, answer.text[:200])
                # 405: the type has no history (the id is never looked at).
                assert answer.status_code in (400, 404, 405), where
                assert "root:x:0:0" not in answer.text, where
                if answer.headers.get("content-type", "").startswith("application/fhir+json"):
                    assert answer.json()["resourceType"] == "OperationOutcome", where
    assert_intact(edge)


def test_traversal_in_dicomweb_uids(edge: Edge) -> None:
    templates = [
        "/dicom-web/studies/{x}",
        "/dicom-web/studies/{x}/metadata",
        "/dicom-web/studies/{x}/series",
        "/dicom-web/studies/{study}/series/{x}/instances",
        "/dicom-web/studies/{study}/series/{x}/metadata",
        "/dicom-web/studies/{study}/series/1.2/instances/{x}",
        "/dicom-web/studies/{study}/series/1.2/instances/{x}/frames/1",
    ]
    for template in templates:
        for bad in TRAVERSALS:
            target = template.format(x=bad, study=edge.study)
            answer = _raw(edge, "GET", target, edge.bearer)
            where = (target, answer.status_code, answer.text[:200])
            assert answer.status_code in (400, 404), where
            assert b"root:x:0:0" not in answer.content and b"DICMDICM" not in answer.content
    assert_intact(edge)


# --- oversized and malformed tokens ---------------------------------------------------------


def _read_until_closed(sock: socket.socket) -> bytes | None:
    """What the server sent before it closed; None when it reset the connection (it closed
    with bytes of ours unread, RFC 9293 3.6)."""
    sock.settimeout(SOCKET_WAIT)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open; it sent {received[:200]!r}")
    except ConnectionResetError:
        return None
    return received


def _send_header(edge: Edge, value: bytes) -> bytes | None:
    with socket.create_connection(("127.0.0.1", edge.server.http_port)) as sock:
        request = b"GET /fhir/Patient HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request + value + b"\r\n\r\n")
        return _read_until_closed(sock)


def test_oversized_authorization_headers(edge: Edge) -> None:
    too_large = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    # A JWT of 1 MB: refused at the server's 64 KiB of headers (431, and closed); it stops
    # reading there, so the rest of the megabyte may reset the connection before its answer
    # is read.
    segment = base64.urlsafe_b64encode(b"x" * 393_216).rstrip(b"=")
    answer = _send_header(edge, segment + b"." + segment + b"." + b"sig")
    assert answer is None or answer.startswith(too_large), answer[:100]
    # One of 69 KB arrives whole in a read or two: refused for its size too, never checked.
    answer = _send_header(edge, b"e" * 69_000)
    assert answer is not None and answer.startswith(too_large), answer
    # A JWT of 1 MB as a client assertion: the token endpoint reads 16 KiB at most.
    big = "a" * 1_048_576
    refused = httpx.post(
        f"{edge.server.http}/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": f"{big}.{big}.{big}",
        },
        timeout=60,
    )
    assert refused.status_code == 400
    assert refused.json() == {
        "error": "invalid_request",
        "error_description": "the request is too large",
    }
    # Under the header limit (40 KB), a large token is read and refused as a token.
    text = base64.urlsafe_b64encode(b"{" * 15_000).rstrip(b"=").decode()
    read = httpx.get(
        f"{edge.server.http}/fhir/Patient", headers={"Authorization": f"Bearer {text}.{text}.x"}
    )
    assert read.status_code == 401
    assert 'error="invalid_token"' in read.headers["www-authenticate"]
    assert_intact(edge)


def _b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def test_malformed_jwts(edge: Edge) -> None:
    keys = KeyStore(edge.data_dir / "auth" / "keys")
    key = keys.signing
    good_claims = jwt.decode(edge.token, options={"verify_signature": False})
    header = {"alg": "ES256", "kid": key.kid, "typ": "at+jwt"}
    now = int(datetime.now(UTC).timestamp())

    def signed(claims: dict[str, Any]) -> str:
        return jwt.encode(claims, key.private, algorithm="ES256", headers={"kid": key.kid})

    good_body = _b64(json.dumps(good_claims).encode())
    signature = edge.token.rsplit(".", 1)[1]
    malformed = {
        "bad base64 in the header": f"e!!!.{good_body}.{signature}",
        "bad base64 in the body": f"{_b64(json.dumps(header).encode())}.@@@@.{signature}",
        "bad base64 in the signature": f"{edge.token.rsplit('.', 1)[0]}.%%%%",
        "a header that is a JSON array": f"{_b64(b'[1, 2]')}.{good_body}.{signature}",
        "a header that is a JSON string": f"{_b64(json.dumps('ES256').encode())}.{good_body}."
        + signature,
        "a header that is not JSON": f"{_b64(b'{alg: ES256')}.{good_body}.{signature}",
        "a body that is a JSON array": signed_raw(key, b"[1, 2, 3]"),
        "a body that is a JSON number": signed_raw(key, b"42"),
        "a header whose kid is an object": (
            f"{_b64(json.dumps({**header, 'kid': {'a': 1}}).encode())}.{good_body}.{signature}"
        ),
        "an alg list": (
            f"{_b64(json.dumps({**header, 'alg': ['ES256']}).encode())}.{good_body}.{signature}"
        ),
        "a patient that is not an id": signed(
            good_claims | {"patient": "../../etc/passwd", "exp": now + 300}
        ),
        "a patient that is an object": signed(
            good_claims | {"patient": {"id": "1"}, "exp": now + 300}
        ),
        "an expiry that is text": signed(good_claims | {"exp": "tomorrow"}),
        "two segments": ".".join(edge.token.split(".")[:2]),
        "four segments": edge.token + ".x",
        "empty": ".",
    }
    for name, token in malformed.items():
        for path in ("/fhir/Patient", "/dicom-web/studies", "/api/jobs"):
            answer = httpx.get(
                f"{edge.server.http}{path}", headers={"Authorization": f"Bearer {token}"}
            )
            where = (name, path, answer.status_code, answer.text[:200])
            assert answer.status_code == 401, where
            assert 'error="invalid_token"' in answer.headers["www-authenticate"], where
    # The same token with a patient that is an id is accepted (the checks above are the
    # patient's, not the signature's) and held to that patient's compartment.
    accepted = signed(
        good_claims | {"patient": edge.patient, "scope": "patient/*.rs", "exp": now + 300}
    )
    answer = httpx.get(
        f"{edge.server.http}/fhir/Patient", headers={"Authorization": f"Bearer {accepted}"}
    )
    assert answer.status_code == 200, answer.text[:200]
    assert [e["resource"]["id"] for e in answer.json().get("entry", [])] == [edge.patient]
    # Held to a patient with no data scope: its role opens nothing (never every patient).
    unscoped = signed(good_claims | {"patient": edge.patient, "scope": "", "exp": now + 300})
    answer = httpx.get(
        f"{edge.server.http}/fhir/Patient", headers={"Authorization": f"Bearer {unscoped}"}
    )
    assert answer.status_code == 403, answer.text[:200]
    assert_intact(edge)


def signed_raw(key: Any, payload: bytes) -> str:
    """A correctly signed JWS over any payload bytes (PyJWT signs only JSON objects)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    head = _b64(json.dumps({"alg": "ES256", "kid": key.kid}).encode())
    body = _b64(payload)
    der = key.private.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{head}.{body}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# --- SQL metacharacters in FHIR search values -------------------------------------------------

METACHARACTERS = [
    "' OR '1'='1",
    "1 OR 1=1",
    "x'; DROP TABLE patient;--",
    'x"; DROP TABLE study;--',
    "') UNION SELECT sqlite_version()--",
    "%",
    "_",
    "\\",
    "\\%",
    "*",
    "1)) OR ((1=1",
    "$1",
    "Patient/1' OR '1'='1",
    "%ff",
]


@pytest.mark.parametrize("held", [False, True], ids=["admin", "patient-token"])
def test_sql_metacharacters_in_every_fhir_search(edge: Edge, held: bool) -> None:
    token = edge.patient_token if held else edge.token
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=edge.server.http, headers=headers, timeout=60) as client:
        statement = client.get("/fhir/metadata").json()
        runs = 0
        wrong: list[tuple[str, str, str, int, str]] = []
        for resource in statement["rest"][0]["resource"]:
            kind = resource["type"]
            if kind == "AuditEvent":
                continue  # admin only, and the audit trail's own tests
            if kind == "Subscription" and held:
                continue  # admin only: a patient's token gets 403 (tests/test_fhir_subscription)
            for param in resource.get("searchParam", []):
                for value in METACHARACTERS:
                    runs += 1
                    answer = client.get(f"/fhir/{kind}", params={param["name"]: value})
                    body = answer.json()
                    if answer.status_code == 200:
                        # Not one value above is a real match of anything stored.
                        if body.get("total") != 0 or body.get("entry"):
                            wrong.append((kind, param["name"], value, 200, str(body)[:200]))
                    elif answer.status_code != 400 or body["resourceType"] != "OperationOutcome":
                        wrong.append(
                            (kind, param["name"], value, answer.status_code, answer.text[:200])
                        )
    assert wrong == [], wrong
    assert runs > 200
    with closing(Archive(edge.server.backend.settings)) as archive:
        from sqlalchemy import func, select

        from archive.models import Instance, Patient, Study

        with archive.db.session() as session:
            counts = [
                session.scalar(select(func.count()).select_from(model))
                for model in (Patient, Study, Instance)
            ]
    assert counts == [1, 1, 2]
    assert_intact(edge)
