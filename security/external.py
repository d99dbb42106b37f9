"""Tokens of external identity providers (Keycloak, any OpenID Connect provider): verified by
the keys of the provider's JWKS (RFC 7517), found through its discovery document (OpenID
Connect Discovery 1.0 4), fetched once and again when a token names a ``kid`` not seen yet (at
most every ``REFRESH_SECONDS``), with its issuer, audience, expiry and not-before checked and
only asymmetric algorithms accepted. Its roles or groups map onto pacsbridge's roles by
settings."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx
import jwt

from config.settings import ExternalIssuerSettings
from security.roles import ROLES
from security.scopes import patient_context

log = logging.getLogger(__name__)

REFRESH_SECONDS = 30.0
"""The least time between two fetches of a provider's keys."""
TIMEOUT = 5.0


class ExternalError(Exception):
    """The token is not accepted (the message says why)."""


class ExternalIssuer:
    def __init__(self, settings: ExternalIssuerSettings, leeway: int) -> None:
        self.settings = settings
        self.leeway = leeway
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0

    def _jwks_uri(self) -> str:
        if self.settings.jwks_uri:
            return self.settings.jwks_uri
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = httpx.get(url, timeout=TIMEOUT).raise_for_status().json()
        if document.get("issuer") != self.settings.issuer:
            raise ExternalError(f"{url} names the issuer {document.get('issuer')!r}")
        return str(document["jwks_uri"])

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._fetched < REFRESH_SECONDS and self._fetched:
                return
            self._fetched = time.monotonic()
            try:
                keys = httpx.get(self._jwks_uri(), timeout=TIMEOUT).raise_for_status().json()
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                log.warning(
                    "identity provider keys not fetched",
                    extra={"issuer": self.settings.issuer, "error": str(exc)},
                )
                return
            found = {}
            for item in keys.get("keys", []):
                try:
                    key = jwt.PyJWK(item)
                except jwt.PyJWTError:
                    continue  # a key of a type or use this library does not take
                if item.get("kid") and item.get("use", "sig") == "sig":
                    found[item["kid"]] = key
            self._keys = found

    def _key(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is None:
            self._refresh()
            key = self._keys.get(kid)
        if key is None:
            raise ExternalError(f"unknown kid {kid!r} of {self.settings.issuer}")
        return key

    def validate(self, token: str) -> tuple[str, str, str, float, str | None]:
        """(subject, role, scope, exp, patient launch context) of a valid token."""
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if alg not in self.settings.algorithms:
            raise ExternalError(f"alg {alg!r} is not accepted from {self.settings.issuer}")
        key = self._key(str(header.get("kid") or ""))
        if key.algorithm_name != alg:
            raise ExternalError(f"alg {alg!r} is not the algorithm of key {header.get('kid')!r}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=self.settings.algorithms,
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise ExternalError(str(exc)) from exc
        role = self._role(claims)
        subject = claims.get(self.settings.subject_claim) or claims["sub"]
        scope = claims.get("scope") or ""
        try:
            patient = patient_context(claims.get(self.settings.patient_claim))
        except ValueError as exc:
            raise ExternalError(str(exc)) from exc
        return f"user:{subject}", role, str(scope), float(claims["exp"]), patient

    def _role(self, claims: dict[str, Any]) -> str:
        value: Any = claims
        for part in self.settings.roles_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        given = [value] if isinstance(value, str) else list(value or [])
        mapped = {self.settings.role_map[g] for g in given if g in self.settings.role_map}
        for role in ROLES:  # the strongest role first: admin, then the others in order
            if role in mapped:
                return role
        raise ExternalError(
            f"no pacsbridge role for the token's {self.settings.roles_claim} {given!r} "
            "(auth_external role_map)"
        )
