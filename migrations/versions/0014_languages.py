"""languages: a user's language for pages and messages, a partner's for its report (None: the default)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


# Plain ADD/DROP COLUMN (SQLite has both since 3.35), not a batch: SQLite's batch copies the table and would lose
# the expression index uq_users_username_lower (0011), which SQLAlchemy cannot reflect.
def upgrade() -> None:
    op.add_column("users", sa.Column("language", sa.String(length=8), nullable=True))
    op.add_column("partners", sa.Column("report_language", sa.String(length=8), nullable=True))


def downgrade() -> None:
    op.drop_column("partners", "report_language")
    op.drop_column("users", "language")
