"""rank_state: the last low-precision readiness measurement of the matmuls (gemm_state)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Ranks stored before have measured no matmul operands: an empty state.
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gemm_state", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.drop_column("gemm_state")
