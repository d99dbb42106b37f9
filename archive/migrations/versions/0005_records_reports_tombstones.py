"""Patient records from EHRs, the index of structured reports, tombstones of deleted studies

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 08:18:57.981481

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""

    op.create_table(
        "tombstone",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tombstone")),
        sa.UniqueConstraint("kind", "key", name=op.f("uq_tombstone_kind_key")),
    )
    op.create_table(
        "patient_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_fk", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "document",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_fk"],
            ["patient.id"],
            name=op.f("fk_patient_record_patient_fk_patient"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_record")),
        sa.UniqueConstraint(
            "patient_fk", "version", name=op.f("uq_patient_record_patient_fk_version")
        ),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("patient_record", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_patient_record_patient_fk"), ["patient_fk"], unique=False
        )

    op.create_table(
        "report_document",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_fk", sa.Integer(), nullable=False),
        sa.Column("study_fk", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("root_uid", sa.String(length=64), nullable=False),
        sa.Column("predecessor_uid", sa.String(length=64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("superseded", sa.Boolean(), nullable=False),
        sa.Column("template_id", sa.String(length=16), nullable=True),
        sa.Column("title_scheme", sa.String(length=16), nullable=True),
        sa.Column("title_code", sa.String(length=64), nullable=True),
        sa.Column("title_meaning", sa.String(length=128), nullable=True),
        sa.Column("completion_flag", sa.String(length=16), nullable=True),
        sa.Column("verification_flag", sa.String(length=16), nullable=True),
        sa.Column("content_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verification_datetime", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verifying_observer", sa.String(length=324), nullable=True),
        sa.Column("author", sa.String(length=324), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("conclusion", sa.Text(), nullable=True),
        sa.Column("narrative", sa.Text(), nullable=True),
        sa.Column("algorithm_name", sa.String(length=64), nullable=True),
        sa.Column("algorithm_version", sa.String(length=64), nullable=True),
        sa.Column("manufacturer", sa.String(length=64), nullable=True),
        sa.Column("device_key", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_fk"],
            ["instance.id"],
            name=op.f("fk_report_document_instance_fk_instance"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_fk"],
            ["study.id"],
            name=op.f("fk_report_document_study_fk_study"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_document")),
        sa.UniqueConstraint("instance_fk", name=op.f("uq_report_document_instance_fk")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_report_document_sop_instance_uid")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("report_document", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_report_document_content_datetime"), ["content_datetime"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_document_device_key"), ["device_key"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_document_predecessor_uid"), ["predecessor_uid"], unique=False
        )
        batch_op.create_index(
            "ix_report_document_root_uid_version", ["root_uid", "version"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_report_document_study_fk"), ["study_fk"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_report_document_title_code"), ["title_code"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_document_verification_flag"), ["verification_flag"], unique=False
        )

    op.create_table(
        "report_measurement",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document_fk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("concept_scheme", sa.String(length=16), nullable=False),
        sa.Column("concept_code", sa.String(length=64), nullable=False),
        sa.Column("concept_meaning", sa.String(length=128), nullable=True),
        sa.Column("value_type", sa.String(length=8), nullable=False),
        sa.Column("numeric_value", sa.Float(), nullable=True),
        sa.Column("unit_code", sa.String(length=64), nullable=True),
        sa.Column("unit_meaning", sa.String(length=128), nullable=True),
        sa.Column("value_scheme", sa.String(length=16), nullable=True),
        sa.Column("value_code", sa.String(length=64), nullable=True),
        sa.Column("value_meaning", sa.String(length=128), nullable=True),
        sa.Column("text_value", sa.Text(), nullable=True),
        sa.Column("finding_scheme", sa.String(length=16), nullable=True),
        sa.Column("finding_code", sa.String(length=64), nullable=True),
        sa.Column("finding_meaning", sa.String(length=128), nullable=True),
        sa.Column("site_scheme", sa.String(length=16), nullable=True),
        sa.Column("site_code", sa.String(length=64), nullable=True),
        sa.Column("site_meaning", sa.String(length=128), nullable=True),
        sa.Column("laterality_code", sa.String(length=64), nullable=True),
        sa.Column("tracking_uid", sa.String(length=64), nullable=True),
        sa.Column("tracking_identifier", sa.String(length=64), nullable=True),
        sa.Column("method_meaning", sa.String(length=128), nullable=True),
        sa.Column(
            "referenced",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["document_fk"],
            ["report_document.id"],
            name=op.f("fk_report_measurement_document_fk_report_document"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_measurement")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("report_measurement", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_report_measurement_concept_code"), ["concept_code"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_measurement_document_fk"), ["document_fk"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_measurement_numeric_value"), ["numeric_value"], unique=False
        )

    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.add_column(sa.Column("record_version", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("record_updated_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("record_name", sa.String(length=324), nullable=True))
        batch_op.add_column(sa.Column("record_name_search", sa.String(length=324), nullable=True))
        batch_op.add_column(sa.Column("record_birth_date", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("record_sex", sa.String(length=16), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_patient_record_name_search"), ["record_name_search"], unique=False
        )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("version_floor", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_column("changed_at")
        batch_op.drop_column("version_floor")

    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patient_record_name_search"))
        batch_op.drop_column("record_sex")
        batch_op.drop_column("record_birth_date")
        batch_op.drop_column("record_name_search")
        batch_op.drop_column("record_name")
        batch_op.drop_column("record_updated_at")
        batch_op.drop_column("record_version")

    with op.batch_alter_table("report_measurement", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_measurement_numeric_value"))
        batch_op.drop_index(batch_op.f("ix_report_measurement_document_fk"))
        batch_op.drop_index(batch_op.f("ix_report_measurement_concept_code"))

    op.drop_table("report_measurement")
    with op.batch_alter_table("report_document", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_document_verification_flag"))
        batch_op.drop_index(batch_op.f("ix_report_document_title_code"))
        batch_op.drop_index(batch_op.f("ix_report_document_study_fk"))
        batch_op.drop_index("ix_report_document_root_uid_version")
        batch_op.drop_index(batch_op.f("ix_report_document_predecessor_uid"))
        batch_op.drop_index(batch_op.f("ix_report_document_device_key"))
        batch_op.drop_index(batch_op.f("ix_report_document_content_datetime"))

    op.drop_table("report_document")
    with op.batch_alter_table("patient_record", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patient_record_patient_fk"))

    op.drop_table("patient_record")
    op.drop_table("tombstone")
