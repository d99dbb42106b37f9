"""Passwords and client secrets: argon2id (RFC 9106) with argon2-cffi's defaults; the
PHC-format hash stores its own parameters, so stronger defaults later rehash on next login."""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher()
#: Verified when a name is unknown, so that an unknown name costs as long as a wrong password.
_DUMMY = _HASHER.hash(secrets.token_urlsafe(16))


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


def verify_secret(stored: str | None, given: str) -> bool:
    try:
        return _HASHER.verify(stored or _DUMMY, given) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_secret() -> str:
    """A client secret: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)
