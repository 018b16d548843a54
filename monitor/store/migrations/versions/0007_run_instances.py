"""run_instances: one row per watching process, naming the run its data goes to

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Runs registered before have no instance: protocol 1 and 2 documents keep sharing them by name.
    op.create_table(
        "run_instances",
        sa.Column("instance", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("requested_name", sa.String(length=512), nullable=False),
        sa.Column("step_offset", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("instance"),
    )
    op.create_index(op.f("ix_run_instances_run_id"), "run_instances", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_run_instances_run_id"), table_name="run_instances")
    op.drop_table("run_instances")
