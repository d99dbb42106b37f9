"""Event deliveries: an index by subscription, study and status (the dispatcher's "is this
delivery behind a failed one of its study" lookups)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 21:30:00.000000

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("event_delivery", schema=None) as batch_op:
        batch_op.create_index(
            "ix_event_delivery_subscription_study_status",
            ["subscription_fk", "study_instance_uid", "status"],
            unique=False,
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("event_delivery", schema=None) as batch_op:
        batch_op.drop_index("ix_event_delivery_subscription_study_status")
