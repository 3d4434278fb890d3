"""warm deployments: the pool of model servers kept after their job, the jobs attached to each, and whether a job
scored on a warm deployment or a new one

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "warm_deployments",
        sa.Column("name", sa.String(length=63), primary_key=True),
        sa.Column("pool_key", sa.String(length=64), nullable=False),
        sa.Column("deployer", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("endpoint", sa.JSON(), nullable=True),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("jobs_served", sa.Integer(), nullable=False),
    )
    op.create_index("ix_warm_deployments_pool_key", "warm_deployments", ["pool_key"])
    op.create_table(
        "warm_deployment_users",
        sa.Column(
            "deployment_name",
            sa.String(length=63),
            sa.ForeignKey("warm_deployments.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("job_id", sa.Uuid(), primary_key=True),
        sa.Column("attached_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_warm_deployment_users_job_id", "warm_deployment_users", ["job_id"])
    op.add_column("retro_tests", sa.Column("deployment_warm", sa.Boolean(), nullable=True))


def downgrade() -> None:
    op.drop_column("retro_tests", "deployment_warm")
    op.drop_index("ix_warm_deployment_users_job_id", table_name="warm_deployment_users")
    op.drop_table("warm_deployment_users")
    op.drop_index("ix_warm_deployments_pool_key", table_name="warm_deployments")
    op.drop_table("warm_deployments")
