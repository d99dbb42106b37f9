"""Audit trail: the append-only ``audit_event`` table (DICOM PS3.15 A.5, FHIR AuditEvent)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 14:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REFUSAL = "audit events are append-only: an audit_event row cannot be changed"


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "audit_event",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("recorded", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=1), nullable=False),
        sa.Column("type_code", sa.String(length=16), nullable=False),
        sa.Column("subtype_code", sa.String(length=16), nullable=True),
        sa.Column("outcome", sa.SmallInteger(), nullable=False),
        sa.Column("outcome_text", sa.String(length=255), nullable=True),
        sa.Column("agent", sa.String(length=128), nullable=False),
        sa.Column("agent_address", sa.String(length=64), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("entity", sa.String(length=255), nullable=True),
        sa.Column("query", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.create_index("ix_audit_event_agent", ["agent"], unique=False)
        batch_op.create_index("ix_audit_event_patient_id", ["patient_id"], unique=False)
        batch_op.create_index("ix_audit_event_recorded", ["recorded"], unique=False)
        batch_op.create_index("ix_audit_event_study_uid", ["study_uid"], unique=False)
    # Append-only for the application: the database itself refuses to change a row.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_event_refuse_update() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_REFUSAL}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_event_append_only BEFORE UPDATE ON audit_event "
            "FOR EACH ROW EXECUTE FUNCTION audit_event_refuse_update()"
        )
    else:
        op.execute(
            "CREATE TRIGGER audit_event_append_only BEFORE UPDATE ON audit_event "
            f"BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END"
        )


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_event_append_only ON audit_event")
        op.execute("DROP FUNCTION IF EXISTS audit_event_refuse_update()")
    op.drop_table("audit_event")
