"""stage log: every stage a job entered, in order, each pass of a resumed job included

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stage_log", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_column("stage_log")
