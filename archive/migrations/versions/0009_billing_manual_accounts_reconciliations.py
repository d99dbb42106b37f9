"""Billing: manual charges (no study), account guarantor and coverage, payment reconciliations

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 11:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(precision=12, scale=2)


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("charge_item", schema=None) as batch_op:
        batch_op.alter_column("study_instance_uid", existing_type=sa.String(64), nullable=True)
        batch_op.alter_column("service_kind", existing_type=sa.String(16), nullable=True)
        batch_op.alter_column("service_uid", existing_type=sa.String(64), nullable=True)
        batch_op.add_column(sa.Column("quantity", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("note", sa.Text(), nullable=True))

    with op.batch_alter_table("billing_account", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("guarantor", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("coverage", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "payment_reconciliation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("payment_date", sa.Date(), nullable=False),
        sa.Column("reference", sa.String(length=255), nullable=True),
        sa.Column("disposition", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_reconciliation")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("payment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reconciliation_fk", sa.Integer(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_payment_reconciliation_fk"), ["reconciliation_fk"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_payment_reconciliation_fk_payment_reconciliation"),
            "payment_reconciliation",
            ["reconciliation_fk"],
            ["id"],
            ondelete="RESTRICT",
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("payment", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_payment_reconciliation_fk_payment_reconciliation"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_payment_reconciliation_fk"))
        batch_op.drop_column("reconciliation_fk")
    op.drop_table("payment_reconciliation")
    with op.batch_alter_table("billing_account", schema=None) as batch_op:
        for column in ("updated_at", "version", "coverage", "guarantor", "name"):
            batch_op.drop_column(column)
    # Manual charges keep their rows: empty strings where 0008 wants a value.
    op.execute("UPDATE charge_item SET study_instance_uid = '' WHERE study_instance_uid IS NULL")
    op.execute("UPDATE charge_item SET service_kind = 'none' WHERE service_kind IS NULL")
    op.execute("UPDATE charge_item SET service_uid = '' WHERE service_uid IS NULL")
    with op.batch_alter_table("charge_item", schema=None) as batch_op:
        batch_op.drop_column("note")
        batch_op.drop_column("quantity")
        batch_op.alter_column("service_uid", existing_type=sa.String(64), nullable=False)
        batch_op.alter_column("service_kind", existing_type=sa.String(16), nullable=False)
        batch_op.alter_column("study_instance_uid", existing_type=sa.String(64), nullable=False)
