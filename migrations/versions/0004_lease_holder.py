"""lease holder: the host and process of the attempt that owns a job, so a dead one on the same host is seen at once

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_holder", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_column("lease_holder")
