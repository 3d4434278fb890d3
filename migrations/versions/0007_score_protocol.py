"""score protocol: the inference protocol a job's rows were scored with (v2-grpc, v2-rest or seldon)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("score_protocol", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_column("score_protocol")
