"""rank_inbox (each rank's health per step until judged across ranks), rank_judge (per run), and each
rank's last local health in rank_state

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import numwatch.monitor.store.models

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Runs stored before have no per-rank health: nothing to fill in.
    exact = numwatch.monitor.store.models.ExactFloat(precision=53)
    op.create_table(
        "rank_inbox",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("time", sa.Float(precision=53), nullable=False),
        sa.Column("loss", exact, nullable=True),
        sa.Column("local_grad_norm", exact, nullable=True),
        sa.Column("local_nonfinite", sa.BigInteger(), nullable=True),
        sa.Column("compute_time", exact, nullable=True),
        sa.Column("checksum", sa.BigInteger(), nullable=True),
        sa.Column("nonfinite_tensors", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "step", "rank"),
    )
    op.create_table(
        "rank_judge",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("judged_through", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("events_total", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id"),
    )
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("local_grad_norm", exact, nullable=True))
        batch_op.add_column(sa.Column("local_nonfinite", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("compute_time", exact, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.drop_column("compute_time")
        batch_op.drop_column("local_nonfinite")
        batch_op.drop_column("local_grad_norm")
    op.drop_table("rank_judge")
    op.drop_table("rank_inbox")
