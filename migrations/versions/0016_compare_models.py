"""compare model versions: the models of a job that scores every row with several, their rows per chunk, and
whether the job may publish without a model that failed

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retro_test_models",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("retro_test_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("requested_version", sa.String(length=32), nullable=True),
        sa.Column("requested_alias", sa.String(length=256), nullable=True),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("model_info", sa.JSON(), nullable=False),
        sa.Column("column_prefix", sa.String(length=300), nullable=False),
        sa.Column("environment", sa.JSON(), nullable=True),
        sa.Column("validation", sa.JSON(), nullable=True),
        sa.Column("deployment_name", sa.String(length=128), nullable=True),
        sa.Column("score_protocol", sa.String(length=16), nullable=True),
        sa.Column("rows_scored", sa.BigInteger(), nullable=False),
        sa.Column("rows_rejected", sa.BigInteger(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["retro_test_id"],
            ["retro_tests.id"],
            name=op.f("fk_retro_test_models_retro_test_id_retro_tests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retro_test_models")),
        sa.UniqueConstraint("retro_test_id", "position", name=op.f("uq_retro_test_models_retro_test_id")),
    )
    with op.batch_alter_table("retro_test_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_retro_test_models_retro_test_id"), ["retro_test_id"], unique=False)
    op.add_column("retro_test_chunks", sa.Column("model_counts", sa.JSON(), nullable=True))
    op.add_column("retro_tests", sa.Column("allow_partial", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column(
        "retro_tests", sa.Column("compared_models", sa.Integer(), nullable=False, server_default=sa.text("0"))
    )


def downgrade() -> None:
    op.drop_column("retro_tests", "compared_models")
    op.drop_column("retro_tests", "allow_partial")
    op.drop_column("retro_test_chunks", "model_counts")
    with op.batch_alter_table("retro_test_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_retro_test_models_retro_test_id"))
    op.drop_table("retro_test_models")
