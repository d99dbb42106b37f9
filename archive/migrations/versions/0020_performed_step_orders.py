"""Performed procedure steps: every order a step names (the IHE RAD SWF group case), not only
the first; the steps tied to an order so far keep it

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07 23:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0020"
down_revision: str | Sequence[str] | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "performed_step_order",
        sa.Column("step_fk", sa.Integer(), nullable=False),
        sa.Column("order_fk", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_fk"],
            ["imaging_order.id"],
            name=op.f("fk_performed_step_order_order_fk_imaging_order"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["step_fk"],
            ["performed_procedure_step.id"],
            name=op.f("fk_performed_step_order_step_fk_performed_procedure_step"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("step_fk", "order_fk", name=op.f("pk_performed_step_order")),
    )
    with op.batch_alter_table("performed_step_order", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_performed_step_order_order_fk"), ["order_fk"], unique=False
        )
    op.execute(
        "INSERT INTO performed_step_order (step_fk, order_fk) "
        "SELECT id, order_fk FROM performed_procedure_step WHERE order_fk IS NOT NULL"
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("performed_step_order", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_performed_step_order_order_fk"))
    op.drop_table("performed_step_order")
