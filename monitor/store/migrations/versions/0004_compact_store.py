"""compact store: compressed arrays, rollups, run ids never reused, orphans removed

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 20:40:00

Existing rows are converted in place, a thousand at a time: step stats and histogram
arrays are compressed, and the rollups of every stored step are built. The old rows are
read through the tables as they are at this revision (reflected), not through the models,
which later revisions may extend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.store import rollups
from numwatch.monitor.store.packing import compress_histogram_array, pack_stats, unpack_stats

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CHUNK = 1000
CHILD_TABLES = ("steps", "histograms", "events", "rank_state", "conflicts")
# Compressed here already. EXTENDED (the default) and EXTERNAL move a value out of line once the
# row passes ~2 KB, which a 300-tensor step row does: its TOAST chunks and their index cost more
# than the row. MAIN keeps it in the row (three to a page) unless it cannot fit.
COMPRESSED_COLUMNS = {
    "steps": ("tensor_stats",),
    "histograms": ("exponent", "linear_min", "linear_max", "linear"),
    "rollups": ("data",),
}


def _raw_stats(stat_names: str, blob: bytes, n_tensors: int) -> dict[str, bytes]:
    """The 0001 layout: the raw arrays of ``stat_names``, concatenated."""
    out, offset = {}, 0
    for name in filter(None, stat_names.split(",")):
        size = np.dtype(protocol.TENSOR_STATS[name]).itemsize * n_tensors
        out[name] = blob[offset : offset + size]
        offset += size
    return out


def _key(table: sa.Table, names: tuple[str, ...]) -> sa.ColumnElement[bool]:
    return sa.and_(*(table.c[name] == bindparam(f"key_{name}") for name in names))


def _convert_steps(session: Session, steps: sa.Table, run_id: int, rank: int, n_tensors: int) -> None:
    keys = ("run_id", "rank", "step")
    change = (
        steps.update()
        .where(_key(steps, keys))
        .values(stat_names=bindparam("new_names"), tensor_stats=bindparam("new_blob"))
    )
    last = -1
    while True:
        rows = (
            session.execute(
                select(steps)
                .where(steps.c.run_id == run_id, steps.c.rank == rank, steps.c.step > last)
                .order_by(steps.c.step)
                .limit(CHUNK)
            )
            .mappings()
            .all()
        )
        if not rows:
            return
        changes, views = [], []
        for row in rows:
            stat_names, blob = pack_stats(_raw_stats(row["stat_names"], bytes(row["tensor_stats"]), n_tensors))
            changes.append({**{f"key_{name}": row[name] for name in keys}, "new_names": stat_names, "new_blob": blob})
            scalars = {
                name: protocol.decode_float(row[name]) for name in rollups.STEP_SCALARS
            }  # SQLite holds NaN as 'NaN'
            views.append(
                {
                    **row,
                    **scalars,
                    "skipped": bool(row["skipped"]),
                    "tensors": unpack_stats(stat_names, blob, n_tensors),
                }
            )
        session.execute(change, changes)
        rollups.record(session, run_id, rank, views, n_tensors, max(last, 0))
        last = rows[-1]["step"]


def _convert_histograms(session: Session, histograms: sa.Table) -> None:
    keys = ("run_id", "rank", "step", "kind")
    arrays: tuple[protocol.HistogramField, ...] = ("exponent", "linear_min", "linear_max", "linear")
    change = (
        histograms.update().where(_key(histograms, keys)).values(**{name: bindparam(f"new_{name}") for name in arrays})
    )
    order = [histograms.c[name] for name in keys]
    last: tuple[Any, ...] = (-1, -1, -1, "")
    while True:
        rows = (
            session.execute(select(histograms).where(sa.tuple_(*order) > last).order_by(*order).limit(CHUNK))
            .mappings()
            .all()
        )
        if not rows:
            return
        session.execute(
            change,
            [
                {
                    **{f"key_{name}": row[name] for name in keys},
                    **{f"new_{name}": compress_histogram_array(name, bytes(row[name])) for name in arrays},
                }
                for row in rows
            ],
        )
        last = tuple(rows[-1][name] for name in keys)


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
                op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE MAIN")
    tables = sa.MetaData()
    tables.reflect(bind, only=("runs", "steps", "histograms"))
    runs, steps = tables.tables["runs"], tables.tables["steps"]
    session = Session(bind=bind)
    tensors = {row.id: row.tensors for row in session.execute(select(runs.c.id, runs.c.tensors))}
    for run_id, rank in session.execute(select(steps.c.run_id, steps.c.rank).distinct()).all():
        _convert_steps(session, steps, run_id, rank, len(tensors[run_id]))
    _convert_histograms(session, tables.tables["histograms"])
    session.flush()


def downgrade() -> None:
    raise RuntimeError(
        "0004_compact_store compresses the stored arrays in place and cannot be undone: to go back, restore a backup "
        "taken before the upgrade"
    )
