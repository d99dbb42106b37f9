"""auth client patient: a service client bound to one patient (SMART launch context)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 14:05:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("auth_client", schema=None) as batch_op:
        # Clients registered before are bound to no patient.
        batch_op.add_column(sa.Column("patient", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("auth_client", schema=None) as batch_op:
        batch_op.drop_column("patient")
