"""Events: the transactional outbox, subscriptions (AMQP, webhook, rest-hook), their deliveries

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 17:35:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "outbox_event",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("resource", sa.String(length=128), nullable=True),
        sa.Column("data", _JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_event")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_event_id")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("outbox_event", schema=None) as batch_op:
        batch_op.create_index(
            "ix_outbox_event_study_instance_uid", ["study_instance_uid"], unique=False
        )
        batch_op.create_index("ix_outbox_event_created_at", ["created_at"], unique=False)
    op.create_table(
        "event_subscription",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("event_types", sa.Text(), nullable=False),
        sa.Column("criteria", sa.Text(), nullable=True),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("options", _JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", _JSON, nullable=True),
        sa.Column("cursor", _ID, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("locked_by", sa.String(length=128), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "channel IN ('amqp', 'webhook', 'rest-hook')", name=op.f("ck_event_sub_channel")
        ),
        sa.CheckConstraint(
            "status IN ('requested', 'active', 'error', 'off')", name=op.f("ck_event_sub_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_subscription")),
        sa.UniqueConstraint("name", name=op.f("uq_event_subscription_name")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "event_delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subscription_fk", sa.Integer(), nullable=False),
        sa.Column("event_fk", _ID, nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('held', 'failed', 'dead', 'delivered')",
            name=op.f("ck_event_delivery_status"),
        ),
        sa.ForeignKeyConstraint(
            ["event_fk"],
            ["outbox_event.id"],
            name=op.f("fk_event_delivery_event_fk_outbox_event"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["subscription_fk"],
            ["event_subscription.id"],
            name=op.f("fk_event_delivery_subscription_fk_event_subscription"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_delivery")),
        sa.UniqueConstraint(
            "subscription_fk", "event_fk", name=op.f("uq_event_delivery_subscription_fk_event_fk")
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("event_delivery", schema=None) as batch_op:
        batch_op.create_index(
            "ix_event_delivery_subscription_fk_status", ["subscription_fk", "status"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_event_delivery_event_fk"), ["event_fk"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("event_delivery")
    op.drop_table("event_subscription")
    op.drop_table("outbox_event")
