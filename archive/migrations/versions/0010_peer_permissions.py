"""peer permissions: the DIMSE services a peer may use, and whether its host is checked

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 11:45:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Every permission, as archive.peers writes them: the peers stored before keep what they could
#: do (they were declared to be C-MOVE destinations; any AE could query then).
ALL_PERMISSIONS = "echo,store,find,move,get"


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("peer", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "permissions",
                sa.String(length=64),
                nullable=False,
                server_default=ALL_PERMISSIONS,
            )
        )
        batch_op.add_column(
            sa.Column("check_host", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("peer", schema=None) as batch_op:
        batch_op.drop_column("check_host")
        batch_op.drop_column("permissions")
