"""Passwords and client secrets: argon2id (RFC 9106) with argon2-cffi's defaults; the
PHC-format hash stores its own parameters, so stronger defaults later rehash on next login."""

from __future__ import annotations

import functools
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher()


@functools.cache
def _dummy() -> str:
    """Verified when a name is unknown, so that an unknown name costs as long as a wrong
    password. Made on first use, not at import: a hash takes argon2's 64 MiB for a moment, which
    a process that never checks a password should not pay."""
    return _HASHER.hash(secrets.token_urlsafe(16))


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


def verify_secret(stored: str | None, given: str) -> bool:
    try:
        return _HASHER.verify(stored or _dummy(), given) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_secret() -> str:
    """A client secret: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)
