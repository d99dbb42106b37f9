"""Billing: invoices and payments (invoice, invoice_line, payment, invoice_event)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 10:15:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(precision=12, scale=2)


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "invoice",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_fk", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("net", MONEY, nullable=False),
        sa.Column("tax", MONEY, nullable=False),
        sa.Column("gross", MONEY, nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_on", sa.Date(), nullable=True),
        sa.Column("cancelled_reason", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_fk"],
            ["billing_account.id"],
            name=op.f("fk_invoice_account_fk_billing_account"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("invoice", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_invoice_account_fk"), ["account_fk"], unique=False)
        batch_op.create_index(batch_op.f("ix_invoice_status"), ["status"], unique=False)

    op.create_table(
        "invoice_line",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("invoice_fk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("charge_fk", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("net", MONEY, nullable=False),
        sa.Column("tax", MONEY, nullable=False),
        sa.Column("gross", MONEY, nullable=False),
        sa.Column("components", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["charge_fk"],
            ["charge_item.id"],
            name=op.f("fk_invoice_line_charge_fk_charge_item"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["invoice_fk"],
            ["invoice.id"],
            name=op.f("fk_invoice_line_invoice_fk_invoice"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_line")),
        sa.UniqueConstraint(
            "invoice_fk", "position", name=op.f("uq_invoice_line_invoice_fk_position")
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("invoice_line", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_invoice_line_charge_fk"), ["charge_fk"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_invoice_line_invoice_fk"), ["invoice_fk"], unique=False
        )

    op.create_table(
        "payment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("invoice_fk", sa.Integer(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reference", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["invoice_fk"],
            ["invoice.id"],
            name=op.f("fk_payment_invoice_fk_invoice"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("payment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_payment_invoice_fk"), ["invoice_fk"], unique=False)

    op.create_table(
        "invoice_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("invoice_fk", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("gross", MONEY, nullable=False),
        sa.Column("paid", MONEY, nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_fk"],
            ["invoice.id"],
            name=op.f("fk_invoice_event_invoice_fk_invoice"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_event")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("invoice_event", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_invoice_event_invoice_fk"), ["invoice_fk"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("invoice_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_invoice_event_invoice_fk"))
    op.drop_table("invoice_event")
    with op.batch_alter_table("payment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payment_invoice_fk"))
    op.drop_table("payment")
    with op.batch_alter_table("invoice_line", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_invoice_line_invoice_fk"))
        batch_op.drop_index(batch_op.f("ix_invoice_line_charge_fk"))
    op.drop_table("invoice_line")
    with op.batch_alter_table("invoice", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_invoice_status"))
        batch_op.drop_index(batch_op.f("ix_invoice_account_fk"))
    op.drop_table("invoice")
