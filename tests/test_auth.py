"""HTTP access: the built-in token issuer (password, client credentials and refresh grants,
argon2 hashes, ES256 keys in the data dir, rotation with a JWKS), the tokens refused (expired,
not yet valid, wrong signature, issuer or audience, ``alg: none``, HS256 keyed with the public
key, unknown ``kid``), the refusal to listen on a network without authentication, and a walk of
**every** route of the application against a running `pacsbridge serve` with
``PACSBRIDGE_AUTH=required``: no token → 401 with ``WWW-Authenticate``, a role that may not →
403, a role that may → neither (the DICOMweb and FHIR direct GET paths included)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.routing import iter_route_contexts

from archive import Archive
from config import Settings
from fhir_bridge.router import build_providers
from pacsbridge.app import create_app
from security.accounts import AccountError, add_client, add_user, disable_user, set_password
from security.keys import KeyStore
from security.roles import PUBLIC_PATHS, ROLES, allowed
from security.tokens import InvalidToken, TokenError, TokenService
from tests.conftest import Backend, RunningServer, _backend, start_server

PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[TokenService]:
    settings = Settings(data_dir=tmp_path / "data")
    archive = Archive(settings)
    add_user(archive, "alice", "clinician", PASSWORD)
    yield TokenService(archive, settings, KeyStore(tmp_path / "data" / "auth" / "keys"))
    archive.close()


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# --- the issuer -------------------------------------------------------------------------------


def test_password_grant_refresh_rotation_and_keys(issuer: TokenService, tmp_path: Path) -> None:
    answer = issuer.password_grant("alice", PASSWORD)
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 300
    claims = claims_of(answer["access_token"])
    assert (claims["sub"], claims["role"], claims["iss"], claims["aud"]) == (
        "user:alice",
        "clinician",
        "urn:pacsbridge",
        "pacsbridge",
    )
    assert claims["exp"] - claims["iat"] == 300
    principal = issuer.validate(answer["access_token"])
    assert (principal.subject, principal.role) == ("user:alice", "clinician")
    with pytest.raises(TokenError) as wrong:
        issuer.password_grant("alice", "not the password")
    assert wrong.value.error == "invalid_grant"
    with pytest.raises(TokenError):
        issuer.password_grant("nobody", PASSWORD)
    # A refresh token is used once; a password change voids those issued before.
    renewed = issuer.refresh_grant(answer["refresh_token"])
    assert issuer.validate(renewed["access_token"]).subject == "user:alice"
    with pytest.raises(TokenError, match="used"):
        issuer.refresh_grant(answer["refresh_token"])
    time.sleep(0.01)
    set_password(issuer.archive, "alice", PASSWORD + "!")
    with pytest.raises(TokenError, match="log in again"):
        issuer.refresh_grant(renewed["refresh_token"])
    disable_user(issuer.archive, "alice")
    with pytest.raises(TokenError):
        issuer.password_grant("alice", PASSWORD + "!")
    # The key: created 0600 in a 0700 folder, published; a rotation keeps the one before.
    folder = tmp_path / "data" / "auth" / "keys"
    (pem,) = folder.glob("*.pem")
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    first_kid = issuer.keys.signing.kid
    assert [k["kid"] for k in issuer.keys.jwks()["keys"]] == [first_kid]
    assert jwt.get_unverified_header(renewed["access_token"])["kid"] == first_kid
    issuer.keys.rotate()
    assert issuer.keys.jwks()["keys"][0]["kid"] == first_kid
    assert issuer.validate(renewed["access_token"]).subject == "user:alice"
    issuer.keys.rotate()  # the first key is gone now: its tokens are refused
    with pytest.raises(InvalidToken, match="unknown kid"):
        issuer.validate(renewed["access_token"])
    with pytest.raises(AccountError, match="at least 12"):
        add_user(issuer.archive, "bob", "admin", "short")
    with pytest.raises(AccountError, match="role"):
        add_user(issuer.archive, "bob", "superuser", PASSWORD)


def test_client_credentials_and_scopes(issuer: TokenService) -> None:
    secret = add_client(issuer.archive, "ehr", "service", "system/*.rs user/Patient.rs")
    answer = issuer.client_credentials_grant("ehr", secret)
    claims = claims_of(answer["access_token"])
    assert (claims["sub"], claims["role"], claims["client_id"]) == ("client:ehr", "service", "ehr")
    assert claims["scope"] == "system/*.rs user/Patient.rs"
    assert "refresh_token" not in answer
    narrower = issuer.client_credentials_grant("ehr", secret, "system/*.rs")
    assert claims_of(narrower["access_token"])["scope"] == "system/*.rs"
    with pytest.raises(TokenError) as wider:
        issuer.client_credentials_grant("ehr", secret, "system/*.cruds")
    assert wider.value.error == "invalid_scope"
    with pytest.raises(TokenError) as wrong:
        issuer.client_credentials_grant("ehr", secret + "x")
    assert (wrong.value.error, wrong.value.status) == ("invalid_client", 401)


def test_tokens_that_are_refused(issuer: TokenService, tmp_path: Path) -> None:
    key = issuer.keys.signing
    now = int(datetime.now(UTC).timestamp())
    good = {
        "iss": issuer.issuer,
        "aud": issuer.audience,
        "sub": "user:alice",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "role": "admin",
    }

    def signed(claims: dict[str, Any], private: Any = key.private, **header: Any) -> str:
        return jwt.encode(claims, private, algorithm="ES256", headers={"kid": key.kid, **header})

    assert issuer.validate(signed(good)).role == "admin"
    other = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = (
        base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": key.kid}).encode())
        .rstrip(b"=")
        .decode()
        + "."
        + base64.urlsafe_b64encode(json.dumps(good).encode()).rstrip(b"=").decode()
        + "."
    )
    hmac_header = base64.urlsafe_b64encode(
        json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode()
    ).rstrip(b"=")
    import hashlib
    import hmac

    body = base64.urlsafe_b64encode(json.dumps(good).encode()).rstrip(b"=")
    mac = hmac.new(public_pem, hmac_header + b"." + body, hashlib.sha256).digest()
    hs256_with_public_key = (
        hmac_header + b"." + body + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")
    ).decode()
    refused = {
        "expired": signed(good | {"exp": now - 120, "iat": now - 600, "nbf": now - 600}),
        "not yet valid": signed(good | {"nbf": now + 600}),
        "wrong signature": signed(good, private=other),
        "wrong issuer": signed(good | {"iss": "https://elsewhere.example"}),
        "wrong audience": signed(good | {"aud": "another-api"}),
        "alg none": unsigned,
        "HS256 keyed with the public key": hs256_with_public_key,
        "unknown kid": jwt.encode(good, key.private, algorithm="ES256", headers={"kid": "x"}),
        "no role": signed({k: v for k, v in good.items() if k != "role"}),
        "not a JWT": "abc.def",
    }
    for name, token in refused.items():
        with pytest.raises(InvalidToken):
            issuer.validate(token)
            pytest.fail(f"{name} was accepted")


# --- serve: exposure and the route walk -------------------------------------------------------


def test_refuses_to_listen_on_a_network_without_authentication(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env |= {
        "PACSBRIDGE_DATA_DIR": str(tmp_path / "data"),
        "PACSBRIDGE_HTTP_HOST": "0.0.0.0",
        "PACSBRIDGE_DIMSE_PORT": "0",
        "PACSBRIDGE_HTTP_PORT": "0",
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [str(PACSBRIDGE), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join((done.stdout + done.stderr).split())
    assert "refusing to start" in said and "PACSBRIDGE_AUTH=required" in said


ROLE_EXAMPLES = [
    # (role, method, path, allowed): the README's table, named outright.
    ("clinician", "GET", "/dicom-web/studies", True),
    ("clinician", "POST", "/dicom-web/studies", False),
    ("clinician", "GET", "/fhir/Invoice", False),
    ("billing", "GET", "/fhir/Invoice", True),
    ("billing", "GET", "/dicom-web/studies", False),
    ("billing", "GET", "/fhir/Patient", True),
    ("modality", "POST", "/dicom-web/studies", True),
    ("modality", "GET", "/dicom-web/studies", False),
    ("radiologist", "POST", "/fhir/DiagnosticReport", True),
    ("radiologist", "GET", "/api/jobs", False),
    ("service", "PUT", "/fhir/Patient/1", True),
    ("service", "POST", "/fhir/Invoice", False),
    ("admin", "DELETE", "/api/peers/x", True),
    ("admin", "GET", "/fhir/AuditEvent", True),
    ("clinician", "GET", "/fhir/AuditEvent", False),
    ("service", "GET", "/fhir/AuditEvent/1", False),
]


@pytest.mark.parametrize(("role", "method", "path", "expected"), ROLE_EXAMPLES)
def test_role_table(role: str, method: str, path: str, expected: bool) -> None:
    assert allowed(role, method, path) is expected


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict]]:
    """A `pacsbridge serve` with PACSBRIDGE_AUTH=required and one user per role."""
    workdir = tmp_path_factory.mktemp("auth")

    class _Request:  # _backend needs a request only for PostgreSQL or S3
        def getfixturevalue(self, name: str) -> Any:
            raise AssertionError(name)

    backend: Backend = _backend("sqlite", "file", workdir, _Request())  # type: ignore[arg-type]
    with closing(Archive(backend.settings)) as archive:
        for role in ROLES:
            add_user(archive, f"user-{role}", role, PASSWORD)
    server = start_server(
        backend,
        workdir,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_WORKER_IN_SERVE="false",
    )
    try:
        tokens = {}
        for role in ROLES:
            answer = httpx.post(
                f"{server.http}/auth/token",
                data={"grant_type": "password", "username": f"user-{role}", "password": PASSWORD},
            )
            assert answer.status_code == 200, answer.text
            assert answer.headers["cache-control"] == "no-store"
            tokens[role] = answer.json()["access_token"]
        yield server, tokens
    finally:
        server.stop()


def every_route(settings: Settings) -> list[tuple[str, str]]:
    """(method, path with its parameters filled in) of every route the application holds."""
    with closing(Archive(settings)) as archive:
        app = create_app(archive, settings)
        fhir_types = sorted(build_providers(settings))
        routes = []
        for route in iter_route_contexts(app.router.routes):
            path = route.path or ""
            # A FHIR route serves every resource type: walk it for each of them.
            for kind in fhir_types if "{resource_type}" in path else [""]:
                for method in sorted(route.methods or ()):
                    filled = path.replace("{resource_type}", kind)
                    filled = filled.replace("{operation}", "$apply")
                    while "{" in filled:
                        start = filled.index("{")
                        end = filled.index("}", start)
                        name = filled[start + 1 : end].split(":")[0]
                        value = "1.2.3" if name in ("study", "series", "instance") else "1"
                        filled = filled[:start] + value + filled[end + 1 :]
                    routes.append((method, filled))
    return routes


def test_every_route_needs_the_right_role(
    secured: tuple[RunningServer, dict], tmp_path: Path
) -> None:
    server, tokens = secured
    routes = every_route(Settings(data_dir=tmp_path / "walk"))
    assert len(routes) > 50
    assert {p for _, p in routes} >= {"/dicom-web/studies", "/fhir/Patient", "/api/jobs"}
    walked = 0
    with httpx.Client(base_url=server.http, timeout=60) as client:
        for method, path in routes:
            if path in PUBLIC_PATHS:
                assert client.request(method, path).status_code not in (401, 403), path
                continue
            walked += 1
            bare = client.request(method, path)
            assert bare.status_code == 401, (method, path, bare.status_code, bare.text[:200])
            assert bare.headers["www-authenticate"].startswith('Bearer realm="pacsbridge"')
            for role, token in tokens.items():
                answer = client.request(method, path, headers={"Authorization": f"Bearer {token}"})
                where = (role, method, path, answer.status_code, answer.text[:200])
                if allowed(role, method, path):
                    assert answer.status_code not in (401, 403), where
                else:
                    assert answer.status_code == 403, where
                    assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
            if path.startswith("/fhir/"):
                assert bare.json()["resourceType"] == "OperationOutcome"
    assert walked > 40
    # A tampered token, and one signed elsewhere: 401 invalid_token (direct GET path too).
    head, body, signature = tokens["admin"].split(".")
    tampered = ".".join(
        [head, body, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")]
    )
    for path in ("/dicom-web/studies", "/fhir/Patient", "/api/jobs"):
        answer = httpx.get(f"{server.http}{path}", headers={"Authorization": f"Bearer {tampered}"})
        assert answer.status_code == 401
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    # The discovery documents.
    smart = httpx.get(f"{server.http}/.well-known/smart-configuration").json()
    assert smart["token_endpoint"].endswith("/auth/token")
    keys = httpx.get(f"{server.http}/auth/jwks").json()["keys"]
    assert [k["kty"] for k in keys] == ["EC"] and "d" not in keys[0]
    statement = httpx.get(f"{server.http}/fhir/metadata").json()
    (oauth,) = statement["rest"][0]["security"]["extension"]
    assert oauth["extension"] == [{"url": "token", "valueUri": f"{server.http}/auth/token"}]
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    CapabilityStatement.model_validate(statement)


def test_token_endpoint_over_http(secured: tuple[RunningServer, dict]) -> None:
    server, _ = secured
    with closing(Archive(server.backend.settings)) as archive:
        secret = add_client(archive, "ris", "service", "system/*.rs")
    basic = base64.b64encode(f"ris:{secret}".encode()).decode()
    answer = httpx.post(
        f"{server.http}/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    studies = httpx.get(
        f"{server.http}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}
    )
    assert studies.status_code in (200, 204)
    posted = httpx.post(
        f"{server.http}/auth/token",
        data={"grant_type": "client_credentials", "client_id": "ris", "client_secret": "wrong"},
    )
    assert posted.status_code == 401 and posted.json()["error"] == "invalid_client"
    assert posted.headers["www-authenticate"].startswith("Basic")
    unknown = httpx.post(f"{server.http}/auth/token", data={"grant_type": "implicit"})
    assert (unknown.status_code, unknown.json()["error"]) == (400, "unsupported_grant_type")
    as_json = httpx.post(f"{server.http}/auth/token", json={"grant_type": "password"})
    assert (as_json.status_code, as_json.json()["error"]) == (400, "invalid_request")
    user = httpx.post(
        f"{server.http}/auth/token",
        data={"grant_type": "password", "username": "user-admin", "password": PASSWORD},
    ).json()
    renewed = httpx.post(
        f"{server.http}/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": user["refresh_token"]},
    )
    assert renewed.status_code == 200 and renewed.json()["refresh_token"] != user["refresh_token"]
    again = httpx.post(
        f"{server.http}/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": user["refresh_token"]},
    )
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")
    # Expiry is short: a token does not outlive its five minutes.
    claims = claims_of(renewed.json()["access_token"])
    assert claims["exp"] - claims["iat"] == 300
    assert datetime.fromtimestamp(claims["exp"], UTC) < datetime.now(UTC) + timedelta(minutes=6)


def test_users_and_clients_commands(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env |= {"PACSBRIDGE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(PACSBRIDGE), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    added = cli(
        "users", "add", "carol", "--role", "radiologist", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    assert (
        cli(
            "users",
            "add",
            "carol",
            "--role",
            "radiologist",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        ).returncode
        == 1
    )
    listed = json.loads(cli("users", "list", "--json").stdout)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [
        ("carol", "radiologist", False)
    ]
    assert cli("users", "disable", "carol").returncode == 0
    assert json.loads(cli("users", "list", "--json").stdout)[0]["disabled"] is True
    secret = cli("clients", "add", "pacs-ai", "--role", "service", "--scope", "system/*.rs")
    assert secret.returncode == 0 and len(secret.stdout.strip()) >= 40
    bound = cli(
        "clients", "add", "portal", "--role", "clinician", "--scope", "patient/*.rs",
        "--patient", "17",
    )  # fmt: skip
    assert bound.returncode == 0, bound.stderr
    unscoped = cli("clients", "add", "p2", "--role", "clinician", "--patient", "17")
    assert unscoped.returncode == 1 and "needs a patient/ scope" in unscoped.stderr
    clients = json.loads(cli("clients", "list", "--json").stdout)
    assert clients == [
        {
            "name": "pacs-ai",
            "role": "service",
            "scope": "system/*.rs",
            "patient": None,
            "disabled": False,
        },
        {
            "name": "portal",
            "role": "clinician",
            "scope": "patient/*.rs",
            "patient": "17",
            "disabled": False,
        },
    ]
    from security.models import AuthClient, AuthUser

    with (
        closing(Archive(Settings(data_dir=tmp_path / "data"))) as archive,
        archive.db.session() as session,
    ):
        if True:
            stored = session.query(AuthUser.password_hash).scalar()
            assert stored.startswith("$argon2id$") and PASSWORD not in stored
            secret_hash = (
                session.query(AuthClient.secret_hash).filter(AuthClient.name == "pacs-ai").scalar()
            )
            assert secret_hash.startswith("$argon2id$")
    rotated = cli("auth", "rotate-key")
    assert rotated.returncode == 0 and len(rotated.stdout.strip()) == 43


def test_the_audit_of_money_names_the_token_subject(secured: tuple[RunningServer, dict]) -> None:
    server, tokens = secured
    fhir = "application/fhir+json"

    def call(role: str, method: str, path: str, body: Any = None) -> httpx.Response:
        return httpx.request(
            method,
            f"{server.http}/fhir/{path}",
            json=body,
            headers={"Authorization": f"Bearer {tokens[role]}", "Content-Type": fhir},
        )

    patient = call(
        "service",
        "POST",
        "Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:pacsbridge:patient-id", "value": "AUTH-1"}],
            "name": [{"family": "Audit"}],
        },
    )
    assert patient.status_code == 201, patient.text
    charge = call(
        "billing",
        "POST",
        "ChargeItem",
        {
            "resourceType": "ChargeItem",
            "status": "billable",
            "code": {"text": "Copy of the images"},
            "subject": {"reference": f"Patient/{patient.json()['id']}"},
            "priceOverride": {"value": 10, "currency": "EUR"},
        },
    )
    assert charge.status_code == 201, charge.text
    history = call("billing", "GET", f"ChargeItem/{charge.json()['id']}/_history").json()
    (change,) = [
        e for e in history["entry"][0]["resource"]["extension"] if e["url"].endswith(":change")
    ]
    assert {p["url"]: p["valueString"] for p in change["extension"]}["who"] == "user:user-billing"
    # The clinician may read the patient but not write billing.
    assert call("clinician", "GET", f"Patient/{patient.json()['id']}").status_code == 200
    assert (
        call("clinician", "POST", "ChargeItem", {"resourceType": "ChargeItem"}).status_code == 403
    )


SCOPE_CASES = [
    # (scopes, method, path, permitted: None = no SMART scope, the role alone decides)
    ("", "GET", "/fhir/Patient", None),
    ("openid fhirUser", "GET", "/fhir/Patient", None),
    ("system/ImagingStudy.rs", "GET", "/fhir/ImagingStudy", True),
    ("system/ImagingStudy.rs", "GET", "/fhir/ImagingStudy/1.2.3", True),
    ("system/ImagingStudy.rs", "GET", "/fhir/Patient/1", False),
    ("system/ImagingStudy.rs", "POST", "/fhir/ImagingStudy", False),
    ("system/ImagingStudy.s", "GET", "/fhir/ImagingStudy/1.2.3", False),
    ("system/ImagingStudy.r", "GET", "/fhir/ImagingStudy", False),
    ("system/ImagingStudy.r", "POST", "/fhir/ImagingStudy/_search", False),
    ("system/ImagingStudy.s", "POST", "/fhir/ImagingStudy/_search", True),
    ("user/*.cruds", "PUT", "/fhir/Patient/1", True),
    ("user/*.read", "GET", "/fhir/Invoice/3/_history", True),
    ("user/*.read", "POST", "/fhir/Invoice", False),
    ("user/*.write", "POST", "/fhir/Invoice", True),
    ("user/*.*", "DELETE", "/fhir/Patient/1", True),
    ("user/Invoice.u", "PUT", "/fhir/Invoice/3", True),
    ("system/ChargeItemDefinition.r", "POST", "/fhir/ChargeItemDefinition/1/$apply", True),
    ("system/ImagingStudy.rs", "GET", "/dicom-web/studies", True),
    ("system/ImagingStudy.r", "GET", "/dicom-web/studies", False),
    ("system/ImagingStudy.rs", "GET", "/dicom-web/studies/1.2/series/3.4/instances/5.6", True),
    ("system/ImagingStudy.rs", "POST", "/dicom-web/studies", False),
    ("system/ImagingStudy.c", "POST", "/dicom-web/studies", True),
    ("system/ImagingStudy.rs", "GET", "/api/jobs", False),
    ("system/*.rs", "GET", "/api/jobs", True),
    # Granting nothing: a patient scope without a patient launch context (with one:
    # tests/test_patient_compartment.py), a query-narrowed scope, a permission string out of
    # order.
    ("patient/*.rs", "GET", "/fhir/ImagingStudy", False),
    ("system/Observation.rs?category=imaging", "GET", "/fhir/Observation", False),
    ("system/ImagingStudy.sr", "GET", "/fhir/ImagingStudy", False),
]


@pytest.mark.parametrize(("scopes", "method", "path", "expected"), SCOPE_CASES)
def test_smart_scopes(scopes: str, method: str, path: str, expected: bool | None) -> None:
    from security.scopes import permitted

    assert permitted(scopes, method, path) is expected


def test_scopes_narrow_a_client_over_http(secured: tuple[RunningServer, dict]) -> None:
    server, _ = secured
    with closing(Archive(server.backend.settings)) as archive:
        secret = add_client(archive, "viewer-app", "service", "system/ImagingStudy.rs")
    token = httpx.post(
        f"{server.http}/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "viewer-app",
            "client_secret": secret,
        },
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{server.http}/fhir/ImagingStudy", headers=auth).status_code == 200
    assert httpx.get(f"{server.http}/dicom-web/studies", headers=auth).status_code in (200, 204)
    refused = httpx.get(f"{server.http}/fhir/Patient", headers=auth)
    assert refused.status_code == 403  # the role (service) may, the scope may not
    assert "no scope of the token" in refused.json()["issue"][0]["diagnostics"]
    stow = httpx.post(
        f"{server.http}/dicom-web/studies",
        headers={**auth, "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
        content=b"--x--",
    )
    assert stow.status_code == 403


class IdentityProvider:
    """An OpenID provider on 127.0.0.1: a discovery document and a JWKS, served by the standard
    library; it signs tokens (RS256) with a key it can rotate."""

    def __init__(self) -> None:
        import http.server
        import threading

        from cryptography.hazmat.primitives.asymmetric import rsa

        self.fetches = 0
        self.keys: list[tuple[str, Any]] = []
        self.rotate()
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body: dict[str, Any]
                if self.path == "/realms/x/.well-known/openid-configuration":
                    body = {"issuer": idp.issuer, "jwks_uri": f"{idp.issuer}/certs"}
                elif self.path == "/realms/x/certs":
                    idp.fetches += 1
                    body = {"keys": [idp.jwk(kid, key) for kid, key in idp.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._rsa = rsa
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}/realms/x"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def rotate(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.keys.append((f"k{len(self.keys)}", rsa.generate_private_key(65537, 2048)))

    @staticmethod
    def jwk(kid: str, key: Any) -> dict[str, Any]:
        numbers = key.public_key().public_numbers()

        def b64(value: int) -> str:
            raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        return {
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "alg": "RS256",
            "n": b64(numbers.n),
            "e": b64(numbers.e),
        }

    def token(self, roles: list[str], audience: str = "pacsbridge", **extra: Any) -> str:
        kid, key = self.keys[-1]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "sub": "f81d4fae",
            "preferred_username": "dora",
            "iat": now,
            "exp": now + 300,
            "realm_access": {"roles": roles},
            **extra,
        }
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def test_tokens_of_an_external_identity_provider(tmp_path: Path) -> None:
    idp = IdentityProvider()

    class _Request:
        def getfixturevalue(self, name: str) -> Any:
            raise AssertionError(name)

    backend: Backend = _backend("sqlite", "file", tmp_path, _Request())  # type: ignore[arg-type]
    provider = {
        "issuer": idp.issuer,
        "roles_claim": "realm_access.roles",
        "role_map": {"pacs-readers": "clinician", "pacs-admins": "admin"},
        "subject_claim": "preferred_username",
    }
    server = start_server(
        backend,
        tmp_path,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_AUTH_EXTERNAL=json.dumps([provider]),
        PACSBRIDGE_AI=json.dumps({"enabled": False}),
        PACSBRIDGE_WORKER_IN_SERVE="false",
    )
    try:

        def get(path: str, token: str) -> httpx.Response:
            return httpx.get(f"{server.http}{path}", headers={"Authorization": f"Bearer {token}"})

        reader = idp.token(["offline_access", "pacs-readers"])
        assert get("/dicom-web/studies", reader).status_code in (200, 204)
        assert get("/api/jobs", reader).status_code == 403  # mapped to clinician
        assert get("/api/jobs", idp.token(["pacs-readers", "pacs-admins"])).status_code == 200
        unmapped = get("/dicom-web/studies", idp.token(["someone-else"]))
        assert unmapped.status_code == 401 and "no pacsbridge role" in unmapped.text
        wrong_audience = get("/dicom-web/studies", idp.token(["pacs-readers"], audience="other"))
        assert wrong_audience.status_code == 401
        forged = jwt.encode(
            jwt.decode(reader, options={"verify_signature": False}),
            ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256",
            headers={"kid": "k0"},
        )
        assert get("/dicom-web/studies", forged).status_code == 401
        fetched = idp.fetches
        # The provider rotates its key: the new kid makes pacsbridge fetch the JWKS again.
        time.sleep(0.1)
        idp.rotate()
        from security import external

        assert external.REFRESH_SECONDS == 30.0
        rotated = idp.token(["pacs-readers"])
        answer = get("/dicom-web/studies", rotated)
        # Within REFRESH_SECONDS of the first fetch the keys are not fetched again: the new kid
        # is refused until then (a flood of unknown kids cannot hammer the provider).
        assert answer.status_code == 401 and idp.fetches == fetched
    finally:
        server.stop()
        idp.server.shutdown()


def test_external_keys_are_fetched_again_for_a_new_kid(tmp_path: Path, monkeypatch: Any) -> None:
    from config.settings import ExternalIssuerSettings
    from security import external

    idp = IdentityProvider()
    monkeypatch.setattr(external, "REFRESH_SECONDS", 0.0)
    issuer = external.ExternalIssuer(
        ExternalIssuerSettings(
            issuer=idp.issuer, roles_claim="realm_access.roles", role_map={"r": "radiologist"}
        ),
        leeway=30,
    )
    try:
        assert issuer.validate(idp.token(["r"]))[:2] == ("user:f81d4fae", "radiologist")
        assert idp.fetches == 1
        assert issuer.validate(idp.token(["r"]))[1] == "radiologist"
        assert idp.fetches == 1  # cached
        idp.rotate()
        assert issuer.validate(idp.token(["r"]))[1] == "radiologist"
        assert idp.fetches == 2  # an unknown kid: fetched again
        hs256 = jwt.encode(
            {"iss": idp.issuer, "aud": "pacsbridge", "sub": "x", "exp": 2**31},
            "k",
            algorithm="HS256",
        )
        with pytest.raises(external.ExternalError, match="alg"):
            issuer.validate(hs256)
    finally:
        idp.server.shutdown()
    with pytest.raises(ValueError, match="asymmetric"):
        ExternalIssuerSettings(issuer=idp.issuer, algorithms=["HS256"])


def test_fhirclient_smart_backend_services(secured: tuple[RunningServer, dict]) -> None:
    """fhirclient finds the token endpoint in the CapabilityStatement (oauth-uris), signs in
    with a client assertion (private_key_jwt, RS384) and reads ImagingStudy."""
    import uuid

    from cryptography.hazmat.primitives.asymmetric import rsa
    from fhirclient import client as smart_client
    from fhirclient.models.imagingstudy import ImagingStudy

    server, _ = secured
    key = rsa.generate_private_key(65537, 2048)
    public = IdentityProvider.jwk("backend-1", key) | {"alg": "RS384"}
    with closing(Archive(server.backend.settings)) as archive:
        assert (
            add_client(
                archive, "backend-app", "service", "system/ImagingStudy.rs", {"keys": [public]}
            )
            == ""
        )

    def assertion(**changes: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": "backend-app",
            "sub": "backend-app",
            "aud": f"{server.http}/auth/token",
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        } | changes
        return jwt.encode(claims, key, algorithm="RS384", headers={"kid": "backend-1"})

    signed = assertion()
    smart = smart_client.FHIRClient(
        settings={
            "app_id": "backend-app",
            "api_base": f"{server.http}/fhir",
            "jwt_token": signed,
            "scope": "system/ImagingStudy.rs",
        }
    )
    smart.wants_patient = False
    assert smart.prepare() is False  # the server wants a token
    smart.authorize()
    studies = list(ImagingStudy.where({"_count": "5"}).perform_resources_iter(smart.server))
    assert isinstance(studies, list)
    token = smart.server.auth.access_token
    claims = claims_of(token)
    assert (claims["sub"], claims["scope"]) == ("client:backend-app", "system/ImagingStudy.rs")
    # The scope holds: the same token may not read Patient.
    patient = httpx.get(f"{server.http}/fhir/Patient", headers={"Authorization": f"Bearer {token}"})
    assert patient.status_code == 403

    def exchange(value: str, **form: str) -> httpx.Response:
        return httpx.post(
            f"{server.http}/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": value,
                **form,
            },
        )

    replayed = exchange(signed)
    assert (replayed.status_code, replayed.json()["error"]) == (401, "invalid_client")
    assert "used before" in replayed.json()["error_description"]
    for bad in (
        assertion(aud="https://elsewhere.example/token"),
        assertion(exp=int(time.time()) + 3600),
        assertion(exp=int(time.time()) - 3600),
        assertion(sub="someone-else"),
        jwt.encode(
            {
                "iss": "backend-app",
                "sub": "backend-app",
                "aud": f"{server.http}/auth/token",
                "exp": int(time.time()) + 60,
                "jti": "x",
            },
            rsa.generate_private_key(65537, 2048),
            algorithm="RS384",
            headers={"kid": "backend-1"},
        ),
    ):
        answer = exchange(bad)
        assert (answer.status_code, answer.json()["error"]) == (401, "invalid_client"), answer.text
    assert exchange(assertion()).status_code == 200
    no_secret = httpx.post(
        f"{server.http}/auth/token",
        data={"grant_type": "client_credentials", "client_id": "backend-app", "client_secret": ""},
    )
    assert no_secret.status_code == 401


def test_guessing_passwords_is_slowed_down(
    issuer: TokenService, secured: tuple[RunningServer, dict]
) -> None:
    for _ in range(5):
        with pytest.raises(TokenError) as wrong:
            issuer.password_grant("alice", "guess")
        assert wrong.value.error == "invalid_grant"
    with pytest.raises(TokenError):
        issuer.password_grant("alice", "guess")  # the 6th attempt waits a second
    with pytest.raises(TokenError) as slowed:
        issuer.password_grant("alice", PASSWORD)  # even the right password, for now
    assert (slowed.value.error, slowed.value.status) == ("slow_down", 429)
    assert slowed.value.retry_after in (1, 2)
    count, _ = issuer.failures._failed["user:alice"]
    issuer.failures._failed["user:alice"] = (count, time.monotonic() - 3)  # the wait is over
    assert issuer.password_grant("alice", PASSWORD)["access_token"]
    assert "user:alice" not in issuer.failures._failed  # a success forgets
    # Over HTTP: 429 with Retry-After.
    server, _ = secured
    with closing(Archive(server.backend.settings)) as archive:
        add_user(archive, "mallory-target", "clinician", PASSWORD)
    answers = [
        httpx.post(
            f"{server.http}/auth/token",
            data={"grant_type": "password", "username": "mallory-target", "password": "x"},
        )
        for _ in range(6)
    ]
    assert [a.status_code for a in answers[:5]] == [400] * 5  # FailedLogins.FREE
    assert answers[5].status_code == 429 and int(answers[5].headers["retry-after"]) >= 1
    assert answers[5].json()["error"] == "slow_down"
