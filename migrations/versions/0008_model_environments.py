"""model environments: the preparing_environment and validating stages, and what each found

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_OLD_STATES = (
    "queued",
    "resolving",
    "extracting",
    "deploying",
    "scoring",
    "publishing",
    "succeeded",
    "failed",
    "cancelled",
)
_NEW_STATES = (
    "queued",
    "resolving",
    "extracting",
    "preparing_environment",
    "deploying",
    "validating",
    "scoring",
    "publishing",
    "succeeded",
    "failed",
    "cancelled",
)
_OLD_ACTIVE = "state IN ('queued','resolving','extracting','deploying','scoring','publishing')"
_NEW_ACTIVE = (
    "state IN ('queued','resolving','extracting','preparing_environment','deploying','validating','scoring',"
    "'publishing')"
)


def _swap(states: tuple[str, ...], length: int, active: str, old_length: int, old_states: tuple[str, ...]) -> None:
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_index("uq_retro_tests_active_request")
        batch_op.alter_column(
            "state",
            existing_type=sa.Enum(*old_states, name="state", native_enum=False, length=old_length),
            type_=sa.Enum(*states, name="state", native_enum=False, length=length),
            existing_nullable=False,
        )
        batch_op.create_index(
            "uq_retro_tests_active_request",
            ["request_key"],
            unique=True,
            postgresql_where=sa.text(active),
            sqlite_where=sa.text(active),
        )


def upgrade() -> None:
    _swap(_NEW_STATES, 32, _NEW_ACTIVE, 16, _OLD_STATES)
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("environment", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("validation", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE retro_tests SET state = 'deploying' WHERE state IN ('preparing_environment', 'validating')")
    with op.batch_alter_table("retro_tests", schema=None) as batch_op:
        batch_op.drop_column("validation")
        batch_op.drop_column("environment")
    _swap(_OLD_STATES, 16, _OLD_ACTIVE, 32, _NEW_STATES)
