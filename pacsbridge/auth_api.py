"""The built-in token issuer over HTTP: ``POST /auth/token`` (RFC 6749 4.3 password, 4.4
client credentials, 6 refresh), its JWKS (``/auth/jwks``, also ``/.well-known/jwks.json``)
and the SMART configuration (``/.well-known/smart-configuration``, SMART App Launch 2.0
"Conformance") through which FHIR clients find the token endpoint."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from archive import Archive
from archive.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditEvent
from security.tokens import TokenError, TokenService

router = APIRouter(tags=["auth"])
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 5.1
_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 2.2


def _tokens(request: Request) -> TokenService:
    service: TokenService = request.app.state.tokens
    return service


def _error(exc: TokenError) -> JSONResponse:
    headers = dict(_NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="pacsbridge"'
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status,
        headers=headers,
    )


def _basic(request: Request) -> tuple[str, str] | None:
    """client_secret_basic (RFC 6749 2.3.1): id and secret form-urlencoded, then Basic."""
    header = request.headers.get("authorization", "")
    kind, _, value = header.partition(" ")
    if kind.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client, sep, secret = decoded.partition(":")
    return (unquote(client), unquote(secret)) if sep else None


@router.post("/auth/token")
async def token(request: Request) -> JSONResponse:
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return _error(
            TokenError("invalid_request", "send application/x-www-form-urlencoded (RFC 6749 3.2)")
        )
    body = await request.body()
    if len(body) > 16384:
        return _error(TokenError("invalid_request", "the request is too large"))
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    grant = form.get("grant_type", "")
    service = _tokens(request)
    try:
        answer: dict[str, Any]
        if grant == "password":
            answer = await run_in_threadpool(
                service.password_grant,
                form.get("username", ""),
                form.get("password", ""),
                form.get("scope", ""),
            )
        elif grant == "client_credentials" and form.get("client_assertion_type") == _JWT_BEARER:
            settings = request.app.state.settings
            base = (settings.public_url or str(request.base_url)).rstrip("/")
            answer = await run_in_threadpool(
                service.client_assertion_grant,
                form.get("client_assertion", ""),
                form.get("scope", ""),
                f"{base}/auth/token",
            )
        elif grant == "client_credentials":
            basic = _basic(request)
            client_id, secret = basic or (form.get("client_id", ""), form.get("client_secret", ""))
            answer = await run_in_threadpool(
                service.client_credentials_grant, client_id, secret, form.get("scope", "")
            )
        elif grant == "refresh_token":
            answer = await run_in_threadpool(service.refresh_grant, form.get("refresh_token", ""))
        else:
            raise TokenError(
                "unsupported_grant_type",
                f"grant_type {grant!r}: password, client_credentials or refresh_token",
            )
    except TokenError as exc:
        _audit_login(request, form, exc)
        return _error(exc)
    _audit_login(request, form, None)
    return JSONResponse(answer, headers=_NO_STORE)


def _audit_login(request: Request, form: dict[str, str], failure: TokenError | None) -> None:
    """A login, as DICOM PS3.15 A.5.3.11 User Authentication (110114 / Login 110122): who
    tried (the user or client name, never a password, secret or token), from where, and the
    outcome: 4 for refused credentials, 8 once guessing is being slowed down (429)."""
    grant = form.get("grant_type", "")
    if grant == "password":
        agent = f"user:{form.get('username', '')}"
    elif grant == "client_credentials":
        basic = _basic(request)
        agent = f"client:{(basic[0] if basic else form.get('client_id', '')) or 'assertion'}"
    else:
        agent = f"grant:{grant[:32] or '-'}"
    outcome = SUCCESS
    if failure is not None:
        outcome = SERIOUS_FAILURE if failure.status == 429 else MINOR_FAILURE
    archive: Archive = request.app.state.archive
    archive.audit.submit(
        AuditEvent(
            action="E",
            type_code="110114",
            subtype_code="110122",
            agent=agent,
            agent_address=request.client.host if request.client else None,
            source="auth",
            outcome=outcome,
            outcome_text=failure.error if failure is not None else None,
            entity="/auth/token",
        )
    )


@router.get("/auth/jwks")
@router.get("/.well-known/jwks.json")
def jwks(request: Request) -> JSONResponse:
    return JSONResponse(_tokens(request).keys.jwks())


@router.get("/.well-known/smart-configuration")
def smart_configuration(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    return JSONResponse(
        {
            "issuer": _tokens(request).issuer,
            "jwks_uri": f"{base}/auth/jwks",
            "token_endpoint": f"{base}/auth/token",
            "grant_types_supported": ["password", "client_credentials", "refresh_token"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": [
                "RS384",
                "ES384",
                "RS256",
                "ES256",
            ],
            "scopes_supported": [
                "system/*.rs",
                "system/*.cruds",
                "user/*.rs",
                "user/*.cruds",
                "patient/*.rs",
            ],
            "capabilities": [
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "permission-patient",
                "permission-user",
                "permission-v1",
                "permission-v2",
            ],
            "code_challenge_methods_supported": [],
        }
    )
