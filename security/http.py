"""Bearer tokens on every HTTP request (RFC 6750), as an ASGI middleware: it runs in front of
every route, the DICOMweb and FHIR direct GET paths included (they run the application's
middleware, dicomweb/direct.py). A request without a valid token answers 401 with
``WWW-Authenticate: Bearer``; one whose role may not do it, 403 (``insufficient_scope``).
Under ``/fhir`` the body is an OperationOutcome, elsewhere ``{"detail": ...}``. The principal
is left in the ASGI scope (``pacsbridge.principal``) for the handlers, and, for a request that
only ``patient/`` scopes grant, the patient whose compartment holds it
(``pacsbridge.compartment``: the FHIR Patient id; security/scopes.py)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from security.roles import PUBLIC_PATHS, allowed
from security.scopes import compartment, permitted
from security.tokens import InvalidToken, Principal, TokenService

REALM = "pacsbridge"
_CACHE_SIZE = 4096


class AuthMiddleware:
    def __init__(self, app: ASGIApp, tokens: TokenService) -> None:
        self.app = app
        self.tokens = tokens
        # Tokens checked recently (a viewer sends hundreds of requests with one token): the
        # signature is verified once; an entry lives until the token's expiry at the latest.
        self._checked: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route takes one: never let one past unchecked
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            await _refuse(scope, send, 401, "authentication required: send a bearer token", None)
            return
        try:
            principal = await self._principal(token)
        except InvalidToken as exc:
            await _refuse(scope, send, 401, f"invalid token: {exc}", "invalid_token")
            return
        # Known from here on, refused or not (the audit names who was refused).
        scope["pacsbridge.principal"] = principal
        if not allowed(principal.role, scope["method"], scope["path"]):
            await _refuse(
                scope,
                send,
                403,
                f"role {principal.role!r} may not {scope['method']} {scope['path']}",
                "insufficient_scope",
            )
            return
        granted = permitted(principal.scope, scope["method"], scope["path"], principal.patient)
        if granted is False:
            await _refuse(
                scope,
                send,
                403,
                f"no scope of the token ({principal.scope}) grants {scope['method']} "
                f"{scope['path']}",
                "insufficient_scope",
            )
            return
        scope["pacsbridge.compartment"] = compartment(
            principal.scope, scope["method"], scope["path"], principal.patient
        )
        await self.app(scope, receive, send)

    async def _principal(self, token: str) -> Principal:
        now = time.time()
        found = self._checked.get(token)
        if found is not None and found[1] > now:
            self._checked.move_to_end(token)
            return found[0]
        # Off the event loop: an external provider's keys may have to be fetched.
        principal = await anyio.to_thread.run_sync(self.tokens.validate, token)
        expires = min(now + 60, principal.expires_at)
        self._checked[token] = (principal, expires)
        if len(self._checked) > _CACHE_SIZE:
            self._checked.popitem(last=False)
        return principal


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _refuse(scope: Scope, send: Send, status: int, message: str, error: str | None) -> None:
    challenge = f'Bearer realm="{REALM}"'
    if error:
        description = message.replace('"', "'")
        challenge += f', error="{error}", error_description="{description}"'
    body: dict[str, Any]
    if scope["path"].startswith("/fhir/") or scope["path"] == "/fhir":
        body = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "login" if status == 401 else "forbidden",
                    "diagnostics": message,
                }
            ],
        }
        media = b"application/fhir+json; charset=utf-8"
    else:
        body = {"detail": message}
        media = b"application/json"
    content = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media),
                (b"content-length", str(len(content)).encode()),
                (b"www-authenticate", challenge.encode("latin-1", "replace")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})
