"""period coverage: whether a request refuses a period with days without history, and the days it found so

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("require_full_period", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("days_without_history", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_column("days_without_history")
        batch_op.drop_column("require_full_period")
