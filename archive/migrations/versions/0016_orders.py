"""Orders: imaging orders (ServiceRequest → scheduled procedure step) and performed steps (MPPS)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 17:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "imaging_order",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("intent", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=True),
        sa.Column("patient_fk", sa.Integer(), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=False),
        sa.Column("issuer_of_accession_number", sa.String(length=64), nullable=True),
        sa.Column("requested_procedure_id", sa.String(length=16), nullable=False),
        sa.Column("scheduled_procedure_step_id", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("procedure_scheme", sa.String(length=64), nullable=True),
        sa.Column("procedure_code", sa.String(length=64), nullable=True),
        sa.Column("procedure_display", sa.String(length=64), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("scheduled_station_ae_title", sa.String(length=16), nullable=True),
        sa.Column("scheduled_station_name", sa.String(length=16), nullable=True),
        sa.Column("scheduled_start_date", sa.String(length=8), nullable=True),
        sa.Column("scheduled_start_time", sa.String(length=16), nullable=True),
        sa.Column("scheduled_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("step_status", sa.String(length=16), nullable=False),
        sa.Column("requester", sa.String(length=255), nullable=True),
        sa.Column("requesting_physician", sa.String(length=324), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("document", _JSON, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "status IN ('draft', 'active', 'on-hold', 'revoked', 'completed', "
            "'entered-in-error', 'unknown')",
            name=op.f("ck_imaging_order_status"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_fk"],
            ["patient.id"],
            name=op.f("fk_imaging_order_patient_fk_patient"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_order")),
        sa.UniqueConstraint("accession_number", name=op.f("uq_imaging_order_accession_number")),
        sa.UniqueConstraint("resource_id", name=op.f("uq_imaging_order_resource_id")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_imaging_order_study_instance_uid")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("imaging_order", schema=None) as batch_op:
        batch_op.create_index(
            "ix_imaging_order_worklist", ["status", "scheduled_start_date"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_patient_fk"), ["patient_fk"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_procedure_code"), ["procedure_code"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_imaging_order_modality"), ["modality"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_imaging_order_requested_procedure_id"),
            ["requested_procedure_id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_imaging_order_scheduled_station_ae_title"),
            ["scheduled_station_ae_title"],
            unique=False,
        )
    op.create_table(
        "imaging_order_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_fk", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", _JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_fk"],
            ["imaging_order.id"],
            name=op.f("fk_imaging_order_version_order_fk_imaging_order"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_order_version")),
        sa.UniqueConstraint(
            "order_fk", "version", name=op.f("uq_imaging_order_version_order_fk_version")
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("imaging_order_version", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_imaging_order_version_order_fk"), ["order_fk"], unique=False
        )
    op.create_table(
        "performed_procedure_step",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("order_fk", sa.Integer(), nullable=True),
        sa.Column("patient_fk", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("requested_procedure_id", sa.String(length=16), nullable=True),
        sa.Column("scheduled_procedure_step_id", sa.String(length=16), nullable=True),
        sa.Column("performed_procedure_step_id", sa.String(length=16), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("station_ae_title", sa.String(length=16), nullable=True),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("start_date", sa.String(length=8), nullable=True),
        sa.Column("start_time", sa.String(length=16), nullable=True),
        sa.Column("end_date", sa.String(length=8), nullable=True),
        sa.Column("end_time", sa.String(length=16), nullable=True),
        sa.Column("procedure_scheme", sa.String(length=64), nullable=True),
        sa.Column("procedure_code", sa.String(length=64), nullable=True),
        sa.Column("procedure_display", sa.String(length=64), nullable=True),
        sa.Column("discontinuation_reason", sa.String(length=64), nullable=True),
        sa.Column("dataset", _JSON, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "status IN ('IN PROGRESS', 'COMPLETED', 'DISCONTINUED')",
            name=op.f("ck_performed_procedure_step_status"),
        ),
        sa.ForeignKeyConstraint(
            ["order_fk"],
            ["imaging_order.id"],
            name=op.f("fk_performed_procedure_step_order_fk_imaging_order"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["patient_fk"],
            ["patient.id"],
            name=op.f("fk_performed_procedure_step_patient_fk_patient"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_performed_procedure_step")),
        sa.UniqueConstraint(
            "sop_instance_uid", name=op.f("uq_performed_procedure_step_sop_instance_uid")
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("performed_procedure_step", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_performed_procedure_step_order_fk"), ["order_fk"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_performed_procedure_step_patient_fk"), ["patient_fk"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_performed_procedure_step_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_performed_procedure_step_accession_number"),
            ["accession_number"],
            unique=False,
        )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("performed_procedure_step")
    op.drop_table("imaging_order_version")
    op.drop_table("imaging_order")
