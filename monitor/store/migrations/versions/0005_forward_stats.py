"""forward_stats (max attention logit per call, output log Z of sampled steps) and their last values in rank_state

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import numwatch.monitor.store.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Steps stored before have no forward statistics: the new columns stay NULL for them.
    op.create_table(
        "forward_stats",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("attention_calls", sa.JSON(), nullable=False),
        sa.Column("attention_logit_max", sa.JSON(), nullable=False),
        sa.Column("log_z_mean", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True),
        sa.Column("log_z_max", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True),
        sa.Column("logit_absmax", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "rank", "step"),
    )
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("attention_logit_max", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )
        batch_op.add_column(
            sa.Column("log_z_mean", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )
        batch_op.add_column(
            sa.Column("log_z_max", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )
        batch_op.add_column(
            sa.Column("output_logit_absmax", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.drop_column("output_logit_absmax")
        batch_op.drop_column("log_z_max")
        batch_op.drop_column("log_z_mean")
        batch_op.drop_column("attention_logit_max")
    op.drop_table("forward_stats")
