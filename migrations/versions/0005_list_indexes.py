"""list indexes: the list's order (created_at DESC, id), alone and within a state

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.create_index("ix_retro_tests_created_at_id", [sa.text("created_at DESC"), "id"], unique=False)
        batch_op.create_index(
            "ix_retro_tests_state_created_at_id", ["state", sa.text("created_at DESC"), "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_index("ix_retro_tests_state_created_at_id")
        batch_op.drop_index("ix_retro_tests_created_at_id")
