"""Tables of the built-in token issuer, on the archive's declarative ``Base`` (one schema, one
Alembic history): ``auth_user`` (people, with a password), ``auth_client`` (services, with a
secret) and ``auth_refresh_token`` (refresh tokens of users, stored as SHA-256 digests)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from archive.models import Base

_NEVER_REUSE_IDS = {"sqlite_autoincrement": True}


class AuthUser(Base):
    __tablename__ = "auth_user"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    role: Mapped[str] = mapped_column(String(32), nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    """argon2id (PHC string)."""
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    """When its password, role or state last changed: refresh tokens issued before are void."""


class AuthClient(Base):
    __tablename__ = "auth_client"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    """The client_id."""
    role: Mapped[str] = mapped_column(String(32), nullable=False)
    scope: Mapped[str] = mapped_column(Text, nullable=False, default="")
    """The scopes it may be granted (space separated), as it was registered."""
    secret_hash: Mapped[str] = mapped_column(Text, nullable=False)
    """argon2id of its secret; empty for a client that authenticates with its keys only."""
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Its public keys (a JWK Set) for ``private_key_jwt`` (RFC 7523, SMART Backend
    Services)."""
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    patient: Mapped[str | None] = mapped_column(String(64))
    """The FHIR Patient id its tokens are bound to (the SMART ``patient`` launch context, to
    which its ``patient/`` scopes are held); None for a client of no one patient."""


class AuthRefreshToken(Base):
    __tablename__ = "auth_refresh_token"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    """SHA-256 (hex) of the token: the token itself is never stored."""
    user_fk: Mapped[int] = mapped_column(
        ForeignKey("auth_user.id", ondelete="CASCADE"), nullable=False, index=True
    )
    scope: Mapped[str] = mapped_column(Text, nullable=False, default="")
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    used: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    """Refresh tokens rotate: each is used once (RFC 9700 4.14.2)."""


class AuthClientAssertion(Base):
    """The ``jti`` of client assertions accepted, until they expire: one is never accepted
    twice (RFC 7523 3, SMART Backend Services "replay")."""

    __tablename__ = "auth_client_assertion"
    __table_args__ = (UniqueConstraint("client_fk", "jti"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_fk: Mapped[int] = mapped_column(
        ForeignKey("auth_client.id", ondelete="CASCADE"), nullable=False
    )
    jti: Mapped[str] = mapped_column(String(255), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, index=True
    )
