"""Billing: the price list (price_list, charge_item_definition)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:41:39.956009

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "price_list",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("loaded_by", sa.String(length=64), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_list")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "charge_item_definition",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("price_list_fk", sa.Integer(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("code_system", sa.String(length=16), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("display", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part", sa.String(length=16), nullable=True),
        sa.Column("laterality", sa.String(length=1), nullable=True),
        sa.Column("contrast", sa.Boolean(), nullable=True),
        sa.Column("effective_from", sa.Date(), nullable=False),
        sa.Column("effective_to", sa.Date(), nullable=True),
        sa.Column("base_amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("components", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["price_list_fk"],
            ["price_list.id"],
            name=op.f("fk_charge_item_definition_price_list_fk_price_list"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_charge_item_definition")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("charge_item_definition", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_charge_item_definition_code_system_code"),
            ["code_system", "code"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_charge_item_definition_modality_body_part"),
            ["modality", "body_part"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_charge_item_definition_price_list_fk"), ["price_list_fk"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("charge_item_definition", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_charge_item_definition_price_list_fk"))
        batch_op.drop_index(batch_op.f("ix_charge_item_definition_modality_body_part"))
        batch_op.drop_index(batch_op.f("ix_charge_item_definition_code_system_code"))

    op.drop_table("charge_item_definition")
    op.drop_table("price_list")
