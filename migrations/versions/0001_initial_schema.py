"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 19:18:37.394970
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject_type", sa.String(length=64), nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_subject_id"), ["subject_id"], unique=False)

    op.create_table(
        "partners",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("contact_email", sa.String(length=320), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_partners")),
        sa.UniqueConstraint("code", name=op.f("uq_partners_code")),
    )
    op.create_table(
        "retro_tests",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("partner_id", sa.Uuid(), nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("requested_version", sa.String(length=32), nullable=True),
        sa.Column("requested_alias", sa.String(length=256), nullable=True),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        sa.Column("output_formats", sa.JSON(), nullable=False),
        sa.Column("source_override", sa.JSON(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("model_run_id", sa.String(length=64), nullable=True),
        sa.Column("model_uri", sa.Text(), nullable=False),
        sa.Column("source_table", sa.String(length=512), nullable=False),
        sa.Column("date_column", sa.String(length=256), nullable=False),
        sa.Column("id_columns", sa.JSON(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "queued",
                "resolving",
                "extracting",
                "deploying",
                "scoring",
                "publishing",
                "succeeded",
                "failed",
                "cancelled",
                name="state",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("stage_started", sa.JSON(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rows_total", sa.BigInteger(), nullable=True),
        sa.Column("rows_read", sa.BigInteger(), nullable=False),
        sa.Column("rows_scored", sa.BigInteger(), nullable=False),
        sa.Column("rows_rejected", sa.BigInteger(), nullable=False),
        sa.Column("chunks_total", sa.Integer(), nullable=True),
        sa.Column("chunks_done", sa.Integer(), nullable=False),
        sa.Column("deployment_name", sa.String(length=128), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("result_location", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_retro_tests_partner_id_partners"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retro_tests")),
    )
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_retro_tests_model_name"), ["model_name"], unique=False)
        batch_op.create_index("ix_retro_tests_partner_created", ["partner_id", "created_at"], unique=False)
        batch_op.create_index(
            "uq_retro_tests_active_request",
            ["request_key"],
            unique=True,
            postgresql_where=sa.text("state IN ('queued','resolving','extracting','deploying','scoring','publishing')"),
            sqlite_where=sa.text("state IN ('queued','resolving','extracting','deploying','scoring','publishing')"),
        )

    op.create_table(
        "result_files",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("retro_test_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["retro_test_id"],
            ["retro_tests.id"],
            name=op.f("fk_result_files_retro_test_id_retro_tests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_files")),
        sa.UniqueConstraint("retro_test_id", "name", name=op.f("uq_result_files_retro_test_id")),
    )
    with op.batch_alter_table("result_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_files_retro_test_id"), ["retro_test_id"], unique=False)

    op.create_table(
        "retro_test_chunks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("retro_test_id", sa.Uuid(), nullable=False),
        sa.Column("chunk_key", sa.String(length=32), nullable=False),
        sa.Column("rows_read", sa.BigInteger(), nullable=False),
        sa.Column("rows_scored", sa.BigInteger(), nullable=False),
        sa.Column("rows_rejected", sa.BigInteger(), nullable=False),
        sa.Column("part_path", sa.Text(), nullable=True),
        sa.Column("rejects_path", sa.Text(), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["retro_test_id"],
            ["retro_tests.id"],
            name=op.f("fk_retro_test_chunks_retro_test_id_retro_tests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retro_test_chunks")),
        sa.UniqueConstraint("retro_test_id", "chunk_key", name=op.f("uq_retro_test_chunks_retro_test_id")),
    )
    with op.batch_alter_table("retro_test_chunks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_retro_test_chunks_retro_test_id"), ["retro_test_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("retro_test_chunks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_retro_test_chunks_retro_test_id"))

    op.drop_table("retro_test_chunks")
    with op.batch_alter_table("result_files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_files_retro_test_id"))

    op.drop_table("result_files")
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_retro_tests_active_request",
            postgresql_where=sa.text("state IN ('queued','resolving','extracting','deploying','scoring','publishing')"),
            sqlite_where=sa.text("state IN ('queued','resolving','extracting','deploying','scoring','publishing')"),
        )
        batch_op.drop_index("ix_retro_tests_partner_created")
        batch_op.drop_index(batch_op.f("ix_retro_tests_model_name"))

    op.drop_table("retro_tests")
    op.drop_table("partners")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_subject_id"))
        batch_op.drop_index(batch_op.f("ix_audit_events_at"))

    op.drop_table("audit_events")
