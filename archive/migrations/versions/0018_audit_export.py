"""Audit export: where each export of the audit trail stands (``audit_export``)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 21:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "audit_export",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("cursor", _ID, nullable=False),
        sa.Column("locked_by", sa.String(length=255), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_audit_export")),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("audit_export")
