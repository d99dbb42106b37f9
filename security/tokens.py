"""OAuth2 access tokens of the built-in issuer: JWTs (RFC 9068 profile) signed ``ES256``,
short-lived, checked on every request by signature (the ``kid`` among the published keys),
issuer, audience, expiry and not-before — and nothing else is accepted: no ``alg: none``, no
HMAC (an HS256 token keyed with the public key is refused), no unknown ``kid``.

Grants (RFC 6749): ``password`` (a user's name and password; a refresh token comes with the
access token), ``client_credentials`` (a client's id and secret) and ``refresh_token`` (each
refresh token is used once and replaced: rotation, RFC 9700 4.14.2)."""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import delete, select

from archive import Archive
from config import Settings
from security.external import ExternalError, ExternalIssuer
from security.keys import ALGORITHM, KeyStore
from security.models import AuthClient, AuthClientAssertion, AuthRefreshToken, AuthUser
from security.passwords import verify_secret
from security.scopes import patient_context

LEEWAY = 30
"""Seconds of clock difference tolerated on ``exp`` and ``nbf``."""


class TokenError(Exception):
    """A token request refused: ``error`` is the RFC 6749 5.2 code."""

    def __init__(
        self, error: str, description: str, status: int = 400, retry_after: int | None = None
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.retry_after = retry_after


class InvalidToken(Exception):
    """A bearer token that does not authenticate (RFC 6750 3.1 ``invalid_token``)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid token speaks for."""

    subject: str
    """``user:<name>`` or ``client:<name>``."""
    role: str
    scope: str
    token_id: str
    expires_at: float
    """``exp`` (seconds since the epoch)."""
    patient: str | None = None
    """The patient launch context (the ``patient`` claim: a FHIR Patient id, SMART App Launch
    2.0 "Launch context"), to which the token's ``patient/`` scopes are held."""


def issuer_of(settings: Settings) -> str:
    return settings.auth_issuer or (settings.public_url or "urn:pacsbridge").rstrip("/")


class TokenService:
    def __init__(self, archive: Archive, settings: Settings, keys: KeyStore) -> None:
        self.archive = archive
        self.settings = settings
        self.keys = keys
        self.issuer = issuer_of(settings)
        self.audience = settings.auth_audience
        self.failures = FailedLogins()
        self.external = {
            provider.issuer: ExternalIssuer(provider, LEEWAY) for provider in settings.auth_external
        }

    # --- issuing ----------------------------------------------------------------------------
    def _access_token(
        self, subject: str, role: str, scope: str, client_id: str, patient: str | None = None
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        lifetime = self.settings.auth_token_seconds
        key = self.keys.signing
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int((now + timedelta(seconds=lifetime)).timestamp()),
            "jti": str(uuid.uuid4()),
            "client_id": client_id,
            "role": role,
            "scope": scope,
        }
        if patient:
            # The launch context travels in the token and in the answer (SMART App Launch
            # 2.0 "Launch context arrives with your access_token").
            claims["patient"] = patient
        token = jwt.encode(
            claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "at+jwt"}
        )
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }
        if patient:
            answer["patient"] = patient
        return answer

    def password_grant(self, name: str, password: str, scope: str = "") -> dict[str, Any]:
        self.failures.check(f"user:{name}")
        with self.archive.db.session() as session:
            user = session.scalars(select(AuthUser).where(AuthUser.name == name)).first()
        if not verify_secret(user.password_hash if user else None, password) or user is None:
            self.failures.failed(f"user:{name}")
            raise TokenError("invalid_grant", "unknown user or wrong password")
        if user.disabled:
            raise TokenError("invalid_grant", "unknown user or wrong password")
        self.failures.succeeded(f"user:{name}")
        answer = self._access_token(f"user:{user.name}", user.role, scope, "pacsbridge")
        answer["refresh_token"] = self._refresh_token(user.id, scope)
        return answer

    def client_credentials_grant(
        self, client_id: str, secret: str, scope: str = ""
    ) -> dict[str, Any]:
        self.failures.check(f"client:{client_id}")
        with self.archive.db.session() as session:
            client = session.scalars(select(AuthClient).where(AuthClient.name == client_id)).first()
        if not verify_secret(client.secret_hash if client else None, secret) or client is None:
            self.failures.failed(f"client:{client_id}")
            raise TokenError("invalid_client", "unknown client or wrong secret", 401)
        self.failures.succeeded(f"client:{client_id}")
        if client.disabled:
            raise TokenError("invalid_client", "unknown client or wrong secret", 401)
        granted = _granted(client.scope, scope)
        return self._access_token(
            f"client:{client.name}", client.role, granted, client.name, client.patient
        )

    def client_assertion_grant(
        self, assertion: str, scope: str, token_endpoint: str
    ) -> dict[str, Any]:
        """``client_credentials`` with ``private_key_jwt`` (RFC 7523 2.2, SMART Backend
        Services): the client signs a short-lived JWT with a key of its registered JWK Set —
        ``iss`` = ``sub`` = its client_id, ``aud`` = this token endpoint, ``exp`` at most five
        minutes ahead, a ``jti`` never used before."""
        refused = TokenError("invalid_client", "the client assertion is not accepted", 401)
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenError("invalid_client", f"not a JWT: {exc}", 401) from exc
        client_id = str(unverified.get("iss") or "")
        if not client_id or unverified.get("sub") != client_id:
            raise TokenError("invalid_client", "iss and sub must both be the client_id", 401)
        with self.archive.db.session() as session:
            client = session.scalars(select(AuthClient).where(AuthClient.name == client_id)).first()
        if client is None or client.disabled or not client.jwks:
            raise refused
        alg = header.get("alg")
        if alg not in ASSERTION_ALGORITHMS:
            raise TokenError(
                "invalid_client", f"alg {alg!r}: {', '.join(ASSERTION_ALGORITHMS)}", 401
            )
        key = _client_key(client.jwks, str(header.get("kid") or ""), str(alg))
        if key is None:
            raise TokenError("invalid_client", f"no key {header.get('kid')!r} of {client_id}", 401)
        try:
            claims = jwt.decode(
                assertion,
                key.key,
                algorithms=[str(alg)],
                audience=token_endpoint,
                issuer=client_id,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise TokenError("invalid_client", f"client assertion: {exc}", 401) from exc
        now = datetime.now(UTC)
        expires = datetime.fromtimestamp(float(claims["exp"]), UTC)
        if expires > now + timedelta(seconds=300 + LEEWAY):
            raise TokenError("invalid_client", "the assertion expires more than 5 min ahead", 401)
        with self.archive.db.write_session() as session:
            session.execute(delete(AuthClientAssertion).where(AuthClientAssertion.expires_at < now))
            seen = session.scalar(
                select(AuthClientAssertion.id).where(
                    AuthClientAssertion.client_fk == client.id,
                    AuthClientAssertion.jti == str(claims["jti"]),
                )
            )
            if seen is not None:
                raise TokenError("invalid_client", "the assertion's jti was used before", 401)
            session.add(
                AuthClientAssertion(client_fk=client.id, jti=str(claims["jti"]), expires_at=expires)
            )
        granted = _granted(client.scope, scope)
        return self._access_token(
            f"client:{client.name}", client.role, granted, client.name, client.patient
        )

    def _refresh_token(self, user_id: int, scope: str) -> str:
        token = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self.archive.db.write_session() as session:
            # The user's expired refresh tokens go: the table holds the live ones only.
            session.execute(
                delete(AuthRefreshToken).where(
                    AuthRefreshToken.user_fk == user_id, AuthRefreshToken.expires_at < now
                )
            )
            session.add(
                AuthRefreshToken(
                    digest=_digest(token),
                    user_fk=user_id,
                    scope=scope,
                    issued_at=now,
                    expires_at=now + timedelta(seconds=self.settings.auth_refresh_seconds),
                    used=False,
                )
            )
        return token

    def refresh_grant(self, token: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        with self.archive.db.write_session() as session:
            row = session.scalars(
                select(AuthRefreshToken)
                .where(AuthRefreshToken.digest == _digest(token))
                .with_for_update()
            ).first()
            if row is None or row.used or _aware(row.expires_at) <= now:
                raise TokenError("invalid_grant", "unknown, used or expired refresh token")
            user = session.get(AuthUser, row.user_fk)
            if user is None or user.disabled or _aware(user.changed_at) > _aware(row.issued_at):
                raise TokenError("invalid_grant", "the user changed or was disabled: log in again")
            row.used = True
            user_id, name, role, scope = user.id, user.name, user.role, row.scope
        answer = self._access_token(f"user:{name}", role, scope, "pacsbridge")
        answer["refresh_token"] = self._refresh_token(user_id, scope)
        return answer

    # --- checking ---------------------------------------------------------------------------
    def validate(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"not a JWT: {exc}") from exc
        external = self.external.get(str(issuer))
        if external is not None:
            try:
                found = external.validate(token)
            except (ExternalError, jwt.PyJWTError) as exc:
                raise InvalidToken(str(exc)) from exc
            return Principal(found[0], found[1], found[2], "", found[3], found[4])
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(f"alg {header.get('alg')!r} is not accepted ({ALGORITHM} only)")
        key = self.keys.find(str(header.get("kid") or ""))
        if key is None:
            raise InvalidToken(f"unknown kid {header.get('kid')!r}")
        try:
            claims = jwt.decode(
                token,
                key.private.public_key(),
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        role = claims.get("role")
        if not isinstance(role, str):
            raise InvalidToken("the token names no role")
        try:
            patient = patient_context(claims.get("patient"))
        except ValueError as exc:
            raise InvalidToken(str(exc)) from exc
        return Principal(
            str(claims["sub"]),
            role,
            str(claims.get("scope") or ""),
            str(claims.get("jti")),
            float(claims["exp"]),
            patient,
        )


ASSERTION_ALGORITHMS = ("RS384", "ES384", "RS256", "ES256")
"""Client assertion signatures taken (SMART Backend Services requires RS384 and ES384)."""


def _client_key(jwks: dict[str, Any], kid: str, alg: str) -> jwt.PyJWK | None:
    for item in jwks.get("keys", []):
        if item.get("kid") != kid:
            continue
        try:
            key = jwt.PyJWK(item, algorithm=alg)
        except jwt.PyJWTError:
            return None
        return key
    return None


class FailedLogins:
    """Guessing passwords is slowed down: after ``FREE`` failures for one name (a user or a
    client id), each further attempt for it waits ``2 ** (failures - FREE)`` seconds (at most
    ``MAX_WAIT``) after the last failure — the right password included — and is refused sooner
    with ``slow_down``. A success forgets the failures. Kept per process."""

    FREE = 5
    MAX_WAIT = 900.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed: dict[str, tuple[int, float]] = {}

    def check(self, name: str) -> None:
        with self._lock:
            count, last = self._failed.get(name, (0, 0.0))
        if count < self.FREE:
            return
        wait = min(2.0 ** (count - self.FREE), self.MAX_WAIT) - (time.monotonic() - last)
        if wait > 0:
            raise TokenError(
                "slow_down",
                f"{count} failed attempts for {name.split(':', 1)[1]!r}: try again in "
                f"{math.ceil(wait)} s",
                429,
                retry_after=math.ceil(wait),
            )

    def failed(self, name: str) -> None:
        with self._lock:
            count, _ = self._failed.get(name, (0, 0.0))
            self._failed[name] = (count + 1, time.monotonic())
            if len(self._failed) > 100_000:  # a flood of names: start over
                self._failed.clear()

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failed.pop(name, None)


def _granted(allowed: str, asked: str) -> str:
    """The scopes asked for that the client may have (all of its own when it asks none). The
    server may grant fewer than asked (RFC 6749 3.3): scopes it was not registered with, such as
    ``launch/patient``, are left out; asking only for those is refused."""
    mine = allowed.split()
    if not asked.strip():
        return " ".join(mine)
    granted = [s for s in asked.split() if s in mine]
    if not granted:
        raise TokenError("invalid_scope", f"none of {asked!r} is granted to this client")
    return " ".join(granted)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    """SQLite gives back naive datetimes (stored as UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
