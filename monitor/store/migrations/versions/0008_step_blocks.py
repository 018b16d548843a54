"""step blocks: the steps of a (run, rank) stored 64 to a row instead of one each; rollups without last values

Revision ID: 0008
Revises: 0007

Every (run, rank)'s steps are read in step order, a few thousand at a time, through the
``steps`` table as it is at this revision (reflected), and written as blocks of 64
consecutive stored steps; then ``steps`` is dropped. The rollups are built again from the
same steps: their rows no longer hold each bucket's last value.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy import select
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store import rollups
from numwatch.monitor.store.packing import unpack_stats

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CHUNK = 4096
BLOCK = 64
FLOATS = step_blocks.FLOAT_FIELDS


def _step(row: sa.RowMapping, n_tensors: int) -> dict[str, Any]:
    """An old step row as the blocks take it (SQLite held NaN floats as the text 'NaN')."""
    return {
        "step": row["step"],
        **{name: protocol.decode_float(row[name]) for name in FLOATS},
        "scale_decision": row["scale_decision"],
        "skipped": bool(row["skipped"]),
        "clipped": bool(row["clipped"]),
        "lr": row["lr"] or [],
        "scalars": row["scalars"] or {},
        "tensors": unpack_stats(row["stat_names"], bytes(row["tensor_stats"]), n_tensors),
        **{name: None if row[name] is None else bytes(row[name]) for name in step_blocks.ACTIVATION_ARRAYS},
    }


def _convert(session: Session, steps: sa.Table, blocks: sa.Table, run_id: int, rank: int, n_tensors: int) -> None:
    last = None
    while True:
        query = select(steps).where(steps.c.run_id == run_id, steps.c.rank == rank)
        if last is not None:
            query = query.where(steps.c.step > last)
        rows = session.execute(query.order_by(steps.c.step).limit(CHUNK)).mappings().all()
        if not rows:
            return
        converted = [_step(row, n_tensors) for row in rows]
        session.execute(
            blocks.insert(),
            [
                {"run_id": run_id, "rank": rank, **block}
                for start in range(0, len(converted), BLOCK)
                for block in step_blocks.blocks_of(converted[start : start + BLOCK])
            ],
        )
        rollups.record(session, run_id, rank, converted, n_tensors, max(last or 0, 0))
        last = rows[-1]["step"]


def upgrade() -> None:
    bind = op.get_bind()
    blocks = op.create_table(
        "step_blocks",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("names", sa.Text(), nullable=False),
        sa.Column("header", sa.LargeBinary(), nullable=False),
        sa.Column("arrays", sa.LargeBinary(), nullable=False),
        sa.Column("sampled", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "rank", "first_step"),
    )
    op.create_index("ix_step_blocks_last_step", "step_blocks", ["run_id", "rank", "last_step"], unique=False)
    if bind.dialect.name == "postgresql":
        # Compressed already: out of line in full TOAST chunks, without a compression attempt.
        for column in step_blocks.COLUMNS:
            op.execute(f"ALTER TABLE step_blocks ALTER COLUMN {column} SET STORAGE EXTERNAL")
    tables = sa.MetaData()
    tables.reflect(bind, only=("runs", "steps"))
    runs, steps = tables.tables["runs"], tables.tables["steps"]
    session = Session(bind=bind)
    session.execute(sa.text("DELETE FROM rollups"))
    tensors = {row.id: row.tensors for row in session.execute(select(runs.c.id, runs.c.tensors))}
    for run_id, rank in session.execute(
        select(steps.c.run_id, steps.c.rank).distinct().order_by(steps.c.run_id, steps.c.rank)
    ).all():
        if run_id in tensors:  # rows of a run deleted by hand are left behind
            _convert(session, steps, blocks, run_id, rank, len(tensors[run_id]))
    session.flush()
    op.drop_table("steps")


def downgrade() -> None:
    raise RuntimeError(
        "0008_step_blocks moves every step into blocks and cannot be undone: to go back, restore a backup taken "
        "before the upgrade"
    )
