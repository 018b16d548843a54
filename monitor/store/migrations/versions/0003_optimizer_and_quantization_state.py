"""rank_state: Adam-health means and the lowest quantization SQNR per scheme

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import numwatch.monitor.store.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Steps stored before keep their stats; these fill from the next sampled or quantization step.
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("adam_update_rms", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )
        batch_op.add_column(
            sa.Column("adam_eps_dominated", numwatch.monitor.store.models.ExactFloat(precision=53), nullable=True)
        )
        batch_op.add_column(sa.Column("quant_sqnr_min", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.drop_column("quant_sqnr_min")
        batch_op.drop_column("adam_eps_dominated")
        batch_op.drop_column("adam_update_rms")
