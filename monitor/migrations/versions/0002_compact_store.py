"""compact store: compressed arrays, rollups, run ids never reused, orphans removed

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:40:00

Existing rows are converted in place, a thousand at a time: step stats and histogram
arrays are compressed, and the rollups of every stored step are built.
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from alembic import op
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor import rollups
from numwatch.monitor.ingest import step_view
from numwatch.monitor.models import Histogram, Run, Step
from numwatch.monitor.packing import compress_array, pack_stats

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CHUNK = 1000
CHILD_TABLES = ("steps", "histograms", "events", "rank_state", "conflicts")
# Compressed here already: PostgreSQL's own compression would only spend time failing.
COMPRESSED_COLUMNS = {"steps": ("tensor_stats",), "histograms": ("exponent", "linear_min", "linear_max", "linear"), "rollups": ("data",)}


def _raw_stats(stat_names: str, blob: bytes, n_tensors: int) -> dict[str, bytes]:
    """The 0001 layout: the raw arrays of ``stat_names``, concatenated."""
    out, offset = {}, 0
    for name in filter(None, stat_names.split(",")):
        size = np.dtype(protocol.TENSOR_STATS[name]).itemsize * n_tensors
        out[name] = blob[offset:offset + size]
        offset += size
    return out


def _convert_steps(session: Session, run_id: int, rank: int, n_tensors: int) -> None:
    last = -1
    while True:
        rows = session.execute(
            select(Step).where(Step.run_id == run_id, Step.rank == rank, Step.step > last).order_by(Step.step).limit(CHUNK)
        ).scalars().all()
        if not rows:
            return
        changes, views = [], []
        for row in rows:
            stat_names, blob = pack_stats(_raw_stats(row.stat_names, bytes(row.tensor_stats), n_tensors))
            changes.append({"run_id": run_id, "rank": rank, "step": row.step, "stat_names": stat_names, "tensor_stats": blob})
            view = {column.key: getattr(row, column.key) for column in Step.__table__.columns}
            views.append(step_view({**view, "stat_names": stat_names, "tensor_stats": blob}, n_tensors))
        session.expunge_all()
        session.execute(update(Step), changes)
        rollups.record(session, run_id, rank, views, n_tensors)
        last = rows[-1].step


def _convert_histograms(session: Session) -> None:
    last: tuple = (-1, -1, -1, "")
    key = sa.tuple_(Histogram.run_id, Histogram.rank, Histogram.step, Histogram.kind)
    while True:
        rows = session.execute(select(Histogram).where(key > last).order_by(Histogram.run_id, Histogram.rank, Histogram.step, Histogram.kind).limit(CHUNK)).scalars().all()
        if not rows:
            return
        changes = [
            {"run_id": r.run_id, "rank": r.rank, "step": r.step, "kind": r.kind,
             "exponent": compress_array(bytes(r.exponent), 8), "linear_min": compress_array(bytes(r.linear_min), 4),
             "linear_max": compress_array(bytes(r.linear_max), 4), "linear": compress_array(bytes(r.linear), 8)}
            for r in rows
        ]
        last = (rows[-1].run_id, rows[-1].rank, rows[-1].step, rows[-1].kind)
        session.expunge_all()
        session.execute(update(Histogram), changes)


def upgrade() -> None:
    bind = op.get_bind()
    # Rows of runs deleted by hand (SQLite without foreign keys cascades nothing): a new run must not inherit them.
    for table in CHILD_TABLES:
        op.execute(f"DELETE FROM {table} WHERE run_id NOT IN (SELECT id FROM runs)")
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("runs", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass
    op.create_table(
        "rollups",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("series", sa.String(length=40), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "rank", "series", "level", "bucket"),
    )
    if bind.dialect.name == "postgresql":
        for table, columns in COMPRESSED_COLUMNS.items():
            for column in columns:
                op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTERNAL")
    session = Session(bind=bind)
    tensors = dict(session.execute(select(Run.id, Run.tensors)).all())
    for run_id, rank in session.execute(select(Step.run_id, Step.rank).distinct()).all():
        _convert_steps(session, run_id, rank, len(tensors[run_id]))
    _convert_histograms(session)
    session.flush()


def downgrade() -> None:
    raise NotImplementedError("0002 compresses the stored arrays in place; to go back, restore a backup taken before the upgrade")
