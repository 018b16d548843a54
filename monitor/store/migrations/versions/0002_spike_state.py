"""rank_state.spike_state: the rolling spike score's bounded state

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing ranks start with no judged values: their score counts from the next batch.
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spike_state", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("rank_state", schema=None) as batch_op:
        batch_op.drop_column("spike_state")
