"""steps: what clipping did (clip_coef, post_clip_grad_norm, clipped); rank_state: clipped steps

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import numwatch.monitor.store.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Steps stored before read as "no clip function seen" (null coefficient, not clipped).
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("clip_coef", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )
        batch_op.add_column(
            sa.Column("post_clip_grad_norm", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )
        batch_op.add_column(sa.Column("clipped", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("clipped_steps_total", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.drop_column("clipped_steps_total")
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("clipped")
        batch_op.drop_column("post_clip_grad_norm")
        batch_op.drop_column("clip_coef")
