"""invoice line charge + invoice index: whether a charge is on a live invoice, from the index

Invoicing asks of every charge whether one of its lines is on a live invoice. The index on
``invoice_line (charge_fk, invoice_fk)`` answers it without reading the lines themselves (each
holds its priced components): a charge invoiced, cancelled and invoiced again many times costs
index entries, not rows. It replaces the index on ``charge_fk`` alone (its prefix).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 14:35:00.000000

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("invoice_line", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_invoice_line_charge_fk_invoice_fk"),
            ["charge_fk", "invoice_fk"],
            unique=False,
        )
        batch_op.drop_index(batch_op.f("ix_invoice_line_charge_fk"))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("invoice_line", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_invoice_line_charge_fk"), ["charge_fk"], unique=False)
        batch_op.drop_index(batch_op.f("ix_invoice_line_charge_fk_invoice_fk"))
