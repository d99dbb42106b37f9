"""Access: users, service clients and refresh tokens of the built-in token issuer

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 12:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "auth_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_user")),
        sa.UniqueConstraint("name", name=op.f("uq_auth_user_name")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "auth_client",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("jwks", sa.JSON(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_client")),
        sa.UniqueConstraint("name", name=op.f("uq_auth_client_name")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "auth_refresh_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("user_fk", sa.Integer(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_fk"],
            ["auth_user.id"],
            name=op.f("fk_auth_refresh_token_user_fk_auth_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_refresh_token")),
        sa.UniqueConstraint("digest", name=op.f("uq_auth_refresh_token_digest")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("auth_refresh_token", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auth_refresh_token_user_fk"), ["user_fk"], unique=False
        )
    op.create_table(
        "auth_client_assertion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("client_fk", sa.Integer(), nullable=False),
        sa.Column("jti", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_fk"],
            ["auth_client.id"],
            name=op.f("fk_auth_client_assertion_client_fk_auth_client"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_client_assertion")),
        sa.UniqueConstraint(
            "client_fk", "jti", name=op.f("uq_auth_client_assertion_client_fk_jti")
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("auth_client_assertion", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auth_client_assertion_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("auth_client_assertion")
    op.drop_table("auth_refresh_token")
    op.drop_table("auth_client")
    op.drop_table("auth_user")
