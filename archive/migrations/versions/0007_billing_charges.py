"""Billing: charge capture (billing_account, charge_item, charge_event)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 09:46:21.899695

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "billing_account",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_fk", sa.Integer(), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_fk"],
            ["patient.id"],
            name=op.f("fk_billing_account_patient_fk_patient"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_account")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            name=op.f("uq_billing_account_patient_id_issuer_of_patient_id"),
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("billing_account", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_billing_account_patient_fk"), ["patient_fk"], unique=False
        )

    op.create_table(
        "charge_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_fk", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("service_kind", sa.String(length=16), nullable=False),
        sa.Column("service_uid", sa.String(length=64), nullable=False),
        sa.Column("definition_fk", sa.Integer(), nullable=True),
        sa.Column("code_system", sa.String(length=16), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("display", sa.String(length=255), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part", sa.String(length=16), nullable=True),
        sa.Column("laterality", sa.String(length=1), nullable=True),
        sa.Column("contrast", sa.Boolean(), nullable=True),
        sa.Column("performer", sa.String(length=324), nullable=True),
        sa.Column("occurred_on", sa.Date(), nullable=False),
        sa.Column("conditions", sa.JSON(), nullable=False),
        sa.Column("lines", sa.JSON(), nullable=False),
        sa.Column("net", sa.Numeric(precision=12, scale=2), nullable=True),
        sa.Column("tax", sa.Numeric(precision=12, scale=2), nullable=True),
        sa.Column("total", sa.Numeric(precision=12, scale=2), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("review_reason", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_fk"],
            ["billing_account.id"],
            name=op.f("fk_charge_item_account_fk_billing_account"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["definition_fk"],
            ["charge_item_definition.id"],
            name=op.f("fk_charge_item_definition_fk_charge_item_definition"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_charge_item")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_charge_item_idempotency_key")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("charge_item", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_charge_item_account_fk"), ["account_fk"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_charge_item_definition_fk"), ["definition_fk"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_charge_item_patient_id"), ["patient_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_charge_item_status"), ["status"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_charge_item_study_instance_uid"), ["study_instance_uid"], unique=False
        )

    op.create_table(
        "charge_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("charge_fk", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("net", sa.Numeric(precision=12, scale=2), nullable=True),
        sa.Column("total", sa.Numeric(precision=12, scale=2), nullable=True),
        sa.ForeignKeyConstraint(
            ["charge_fk"],
            ["charge_item.id"],
            name=op.f("fk_charge_event_charge_fk_charge_item"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_charge_event")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("charge_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_charge_event_charge_fk"), ["charge_fk"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("charge_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_charge_event_charge_fk"))

    op.drop_table("charge_event")
    with op.batch_alter_table("charge_item", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_charge_item_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_charge_item_status"))
        batch_op.drop_index(batch_op.f("ix_charge_item_patient_id"))
        batch_op.drop_index(batch_op.f("ix_charge_item_definition_fk"))
        batch_op.drop_index(batch_op.f("ix_charge_item_account_fk"))

    op.drop_table("charge_item")
    with op.batch_alter_table("billing_account", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_billing_account_patient_fk"))

    op.drop_table("billing_account")
