"""durable job queue; stable-study marker

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

Adds the ``job`` table (archive.jobs) and ``study.stable_at`` (archive.stable). Studies already
in the index when this runs are marked stable as of the upgrade, so that upgrading an existing
archive does not fire every stable-study handler for its whole history at once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locked_by", sa.String(length=128), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'dead')", name="ck_job_status"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_kind"), ["kind"], unique=False)
        batch_op.create_index("ix_job_status_next_run_at", ["status", "next_run_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_job_study_instance_uid"), ["study_instance_uid"], unique=False
        )

    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stable_at", sa.DateTime(timezone=True), nullable=True))
    # Existing studies count as stable from now on (see the module docstring). Before the
    # partial index exists, so that the index is built once over the final values.
    op.execute(sa.text("UPDATE study SET stable_at = updated_at"))
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index(
            "ix_study_updated_at_unstable",
            ["updated_at"],
            unique=False,
            postgresql_where=sa.text("stable_at IS NULL"),
            sqlite_where=sa.text("stable_at IS NULL"),
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_updated_at_unstable")
        batch_op.drop_column("stable_at")

    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_study_instance_uid"))
        batch_op.drop_index("ix_job_status_next_run_at")
        batch_op.drop_index(batch_op.f("ix_job_kind"))

    op.drop_table("job")
