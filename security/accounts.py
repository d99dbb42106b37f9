"""Users and service clients of the built-in issuer (``pacsbridge users …``, ``clients …``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from archive import Archive
from security.models import AuthClient, AuthUser
from security.passwords import hash_secret, new_secret
from security.roles import ROLES
from security.scopes import parse as parse_scopes
from security.scopes import patient_context

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD = 12


class AccountError(ValueError):
    pass


def _check(name: str, role: str) -> None:
    if not _NAME.fullmatch(name):
        raise AccountError(f"name {name!r}: 1 to 64 letters, digits, '.', '_', '@', '-'")
    if role not in ROLES:
        raise AccountError(f"role {role!r}: one of {', '.join(ROLES)}")


def _password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password has at least {MIN_PASSWORD} characters")
    return hash_secret(password)


def add_user(archive: Archive, name: str, role: str, password: str) -> None:
    _check(name, role)
    hashed = _password(password)
    now = datetime.now(UTC)
    with archive.db.write_session() as session:
        if session.scalar(select(AuthUser.id).where(AuthUser.name == name)) is not None:
            raise AccountError(f"user {name!r} exists")
        session.add(
            AuthUser(
                name=name,
                role=role,
                password_hash=hashed,
                disabled=False,
                created_at=now,
                changed_at=now,
            )
        )


def _user(session: Session, name: str) -> AuthUser:
    user = session.scalars(select(AuthUser).where(AuthUser.name == name)).first()
    if user is None:
        raise AccountError(f"no user {name!r}")
    return user


def set_password(archive: Archive, name: str, password: str) -> None:
    hashed = _password(password)
    with archive.db.write_session() as session:
        user = _user(session, name)
        user.password_hash = hashed
        user.changed_at = datetime.now(UTC)


def disable_user(archive: Archive, name: str) -> None:
    with archive.db.write_session() as session:
        user = _user(session, name)
        user.disabled = True
        user.changed_at = datetime.now(UTC)


def list_users(archive: Archive) -> list[dict[str, object]]:
    with archive.db.session() as session:
        return [
            {
                "name": u.name,
                "role": u.role,
                "disabled": u.disabled,
                "created": u.created_at.isoformat(),
            }
            for u in session.scalars(select(AuthUser).order_by(AuthUser.name))
        ]


def add_client(
    archive: Archive,
    name: str,
    role: str,
    scope: str,
    jwks: dict[str, Any] | None = None,
    patient: str | None = None,
) -> str:
    """Register a service client; returns its secret (shown once, stored only as a hash), or
    ``""`` for a client that authenticates with its keys (``jwks``: its public JWK Set).
    ``patient``: the FHIR Patient id its tokens are bound to (their ``patient`` launch
    context); its ``patient/`` scopes are then held to that patient's compartment."""
    _check(name, role)
    if patient is not None:
        try:
            patient_context(patient)
        except ValueError as exc:
            raise AccountError(f"--patient: {exc}") from exc
        if not any(s.context == "patient" for s in parse_scopes(scope)):
            raise AccountError(
                "a client bound to a patient needs a patient/ scope (e.g. patient/*.rs): its "
                "other scopes are not held to the patient"
            )
    if jwks is not None:
        keys = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(keys, list) or not keys:
            raise AccountError("the JWK Set has no keys")
        for key in keys:
            if (
                not isinstance(key, dict)
                or not key.get("kid")
                or key.get("kty") not in ("RSA", "EC")
            ):
                raise AccountError("every key needs a kid and kty RSA or EC")
            if any(member in key for member in ("d", "p", "q", "dp", "dq", "qi")):
                raise AccountError(f"key {key['kid']!r} holds private members: give public keys")
    secret = new_secret() if jwks is None else ""
    with archive.db.write_session() as session:
        if session.scalar(select(AuthClient.id).where(AuthClient.name == name)) is not None:
            raise AccountError(f"client {name!r} exists")
        session.add(
            AuthClient(
                name=name,
                role=role,
                scope=" ".join(scope.split()),
                secret_hash=hash_secret(secret) if secret else "",
                jwks=jwks,
                disabled=False,
                created_at=datetime.now(UTC),
                patient=patient,
            )
        )
    return secret


def disable_client(archive: Archive, name: str) -> None:
    with archive.db.write_session() as session:
        client = session.scalars(select(AuthClient).where(AuthClient.name == name)).first()
        if client is None:
            raise AccountError(f"no client {name!r}")
        client.disabled = True


def list_clients(archive: Archive) -> list[dict[str, object]]:
    with archive.db.session() as session:
        return [
            {
                "name": c.name,
                "role": c.role,
                "scope": c.scope,
                "patient": c.patient,
                "disabled": c.disabled,
            }
            for c in session.scalars(select(AuthClient).order_by(AuthClient.name))
        ]
