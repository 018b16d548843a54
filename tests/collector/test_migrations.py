"""Alembic migrations: upgrade from empty matches the models exactly; an outdated schema is refused;
a database of an older schema, with data, upgrades and every value stays readable."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.reads import queries
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store import db, packing, rollups
from numwatch.monitor.store.auth import EVERYTHING
from numwatch.monitor.store.models import Base
from tests.support.collector_docs import TENSORS


def test_upgrade_from_empty_matches_models(database_url: str) -> None:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        db.check_schema(engine)  # current: no error
    finally:
        engine.dispose()


def test_serve_refuses_an_outdated_schema_and_says_what_to_run(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # a database from some other tool/version: tables but no revision
        connection.execute(sa.text("CREATE TABLE runs (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    result = subprocess.run(
        [sys.executable, "-m", "numwatch.monitor.ops.cli", "serve", "--port", "1", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "numwatch db upgrade --database-url" in result.stderr


OLD_REVISION = "0003"  # the schema before compressed arrays and rollups


def _database_at(database_url: str, revision: str) -> None:
    """A database at ``revision``, to hold a run as that version stored it."""
    engine = db.make_engine(database_url)
    with engine.begin() as connection:
        config = db.alembic_config(database_url)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


OLD_NORMS = [np.array([0.5, np.nan, np.inf], np.float32), np.array([0.25, 1e-30, -np.inf], np.float32)]
OLD_LOSS = [3.0, math.nan]  # SQLite held NaN as the text 'NaN'
OLD_NAN = [np.array([0, 4, 0], np.int64), np.array([0, 0, 0], np.int64)]
EXPONENT = np.arange(3 * protocol.EXPONENT_BINS, dtype=np.int64) % 7
LINEAR = np.arange(3 * protocol.LINEAR_BINS, dtype=np.int64)


def _insert_run(connection: sa.Connection, tables: sa.MetaData, name: str, modules: list) -> None:
    """Run 1, as any revision's ``runs`` table holds it."""
    now = datetime.now(timezone.utc)
    connection.execute(
        tables.tables["runs"].insert(),
        [
            {
                "id": 1,
                "name": name,
                "project": "p",
                "format": "fp16",
                "world_size": 1,
                "tensors": TENSORS,
                "modules": modules,
                "config": {},
                "status": "finished",
                "started_at": now,
                "created_at": now,
                "last_seen_at": now,
            },
        ],
    )


def _insert_old_rows(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    tables = sa.MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        _insert_run(connection, tables, "old", [])
        connection.execute(
            tables.tables["steps"].insert(),
            [
                {
                    "run_id": 1,
                    "rank": 0,
                    "step": step,
                    "time": 1e9 + step,
                    "step_time": 0.1,
                    "loss": OLD_LOSS[i],
                    "loss_scale": 1024.0,
                    "new_loss_scale": 1024.0,
                    "scale_decision": "none",
                    "skipped": False,
                    "global_grad_norm": 1.5,
                    "headroom_bits": 3.0,
                    "lr": [0.001],
                    "scalars": {"tokens": 10.0},
                    "stat_names": "grad_norm,nan_count",
                    "tensor_stats": OLD_NORMS[i].tobytes() + OLD_NAN[i].tobytes(),
                    "activation_absmax": None,
                    "activation_nonfinite": None,
                }
                for i, step in enumerate((1, 2))
            ],
        )
        if engine.dialect.name == "sqlite":  # as ExactFloat wrote it there (a REAL column turns NaN into NULL)
            connection.execute(sa.text("UPDATE steps SET loss = 'NaN' WHERE step = 2"))
        connection.execute(
            tables.tables["histograms"].insert(),
            [
                {
                    "run_id": 1,
                    "rank": 0,
                    "step": 1,
                    "kind": "grad",
                    "exponent": EXPONENT.tobytes(),
                    "linear_min": np.array([-1, -2, -3], np.float32).tobytes(),
                    "linear_max": np.array([1, 2, 3], np.float32).tobytes(),
                    "linear": LINEAR.tobytes(),
                },
            ],
        )
        connection.execute(
            tables.tables["rank_state"].insert(),
            [
                {
                    "run_id": 1,
                    "rank": 0,
                    "last_step": 2,
                    "last_step_time": 1e9 + 2,
                    "steps_total": 2,
                    "skipped_steps_total": 0,
                    "nonfinite_steps_total": 1,
                    "nonfinite_loss_total": 0,
                    "loss_scale_backoffs_total": 0,
                    "loss_scale_growths_total": 0,
                    "grad_norm_bucket_counts": [0] * 18,
                    "grad_norm_sum": 3.0,
                    "layers_nonfinite": 2,
                    "lr": [0.001],
                    "events_total": {},
                },
            ],
        )
        if engine.dialect.name == "sqlite":  # a run deleted by hand without foreign keys left its steps behind
            connection.execute(
                tables.tables["steps"].insert(),
                [
                    {
                        **{c.name: None for c in tables.tables["steps"].columns},
                        "run_id": 2,
                        "rank": 0,
                        "step": 1,
                        "time": 0.0,
                        "skipped": False,
                        "lr": [],
                        "scalars": {},
                        "stat_names": "",
                        "tensor_stats": b"",
                    }
                ],
            )
    engine.dispose()


def test_upgrade_from_raw_arrays_with_data_keeps_every_value_readable(database_url: str) -> None:
    _database_at(database_url, OLD_REVISION)
    _insert_old_rows(database_url)
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        db.check_schema(engine)
        with Session(engine) as session:
            run = queries.find_run(session, "old", EVERYTHING)
            for i, step in enumerate((1, 2)):
                record = queries.step_record(session, run, step, 0)
                assert [record["tensors"][t["name"]]["grad_norm"] for t in TENSORS] == [
                    protocol.encode_float(float(v)) for v in OLD_NORMS[i]
                ]
                assert [record["tensors"][t["name"]]["nan_count"] for t in TENSORS] == OLD_NAN[i].tolist()
                assert (record["loss"], record["lr"], record["scalars"]) == (
                    protocol.encode_float(OLD_LOSS[i]),
                    [0.001],
                    {"tokens": 10.0},
                )
                # Stored before clipping was recorded: no clip function seen.
                assert (record["clip_coef"], record["post_clip_grad_norm"], record["clipped"]) == (None, None, False)
            histogram = queries.histograms(session, run, TENSORS[1]["name"], "grad", 0, 1)
            assert [bin_["count"] for bin_ in histogram["linear"]] == LINEAR.reshape(3, -1)[1].tolist()
            assert histogram["linear"][0]["low"] == -2.0 and histogram["linear"][-1]["high"] == 2.0
            binades = range(protocol.EXPONENT_MIN, protocol.EXPONENT_MAX + 1)
            row = EXPONENT.reshape(3, -1)[1]
            assert histogram["exponent"] == [
                {"binade": b, "count": int(c)}
                for b, c in zip(binades, row[: protocol.EXPONENT_BINADES], strict=True)
                if c
            ]
            # Rollups were built from the old rows: a whole-run read from them gives the stored values.
            summary = rollups.read_range(session, run.id, 0, "grad_norm", rollups.LEVELS[0], 0, 0, len(TENSORS), None)[
                0
            ][2]
            assert [repr(float(v)) for v in summary.high] == [repr(0.5), repr(float(np.float32(1e-30))), repr(math.inf)]
            assert summary.nan_at.tolist() == [-1, 1, -1] and summary.count.tolist() == [2, 2, 2]
            # The coarsest bucket is not complete: read from the finest.
            loss = rollups.read_range(session, run.id, 0, "loss", rollups.LEVELS[-1], 0, 0, len(TENSORS), None)[0][2]
            assert (loss.low.tolist(), loss.nan_at.tolist(), loss.nonfinite.tolist()) == ([3.0], [2], [1])
            assert queries.series(session, run, "loss", None, 0, None, None, 1000) == {
                "steps": [1, 2],
                "values": [3.0, "NaN"],
            }
            orphans = session.execute(
                sa.text("SELECT count(*) FROM step_blocks WHERE run_id NOT IN (SELECT id FROM runs)")
            ).scalar()
            assert orphans == 0
            if engine.dialect.name == "sqlite":
                assert (
                    "AUTOINCREMENT"
                    in session.execute(sa.text("SELECT sql FROM sqlite_master WHERE name = 'runs'")).scalar()
                )
                assert session.execute(sa.text("PRAGMA auto_vacuum")).scalar() == db.INCREMENTAL_VACUUM
                assert session.execute(sa.text("PRAGMA page_size")).scalar() == db.PAGE_SIZE
    finally:
        engine.dispose()


COMPACT_STEPS = 1100  # past the raw span: whole-run reads come from the rebuilt rollups


def _compact_steps(rng: np.random.Generator) -> list[dict]:
    """Steps as revision 0007 stored them: a row each, the stats packed, all-zero arrays named only."""
    rows = []
    for step in range(1, COMPACT_STEPS + 1):
        stats = {"grad_norm": rng.lognormal(-3, 1, 3).astype(np.float32), "nan_count": np.zeros(3, np.int64)}
        if step % 50 == 1:
            stats["zeros"] = rng.integers(0, 16, 3).astype(np.int64)
        if step == 700:
            stats["grad_norm"][1] = np.nan
        stat_names, blob = packing.pack_stats({name: values.tobytes() for name, values in stats.items()})
        rows.append(
            {
                "run_id": 1,
                "rank": 0,
                "step": step,
                "time": 1e9 + step,
                "step_time": 0.1,
                "loss": math.nan if step == 900 else float(rng.random()),
                "loss_scale": 1024.0,
                "new_loss_scale": 512.0 if step == 10 else 1024.0,
                "scale_decision": "backoff" if step == 10 else None,
                "skipped": step == 10,
                "global_grad_norm": float(rng.random()),
                "headroom_bits": None,
                "clip_coef": 0.5 if step % 3 == 0 else None,
                "post_clip_grad_norm": 1.0 if step % 3 == 0 else None,
                "clipped": step % 3 == 0,
                "lr": [protocol.encode_float(1e-3 / step)],
                "scalars": {"tokens": float(step)} if step % 2 else {},
                "stat_names": stat_names,
                "tensor_stats": blob,
                "activation_absmax": np.full(2, step, np.float32).tobytes() if step == 5 else None,
                "activation_nonfinite": None,
                "_stats": stats,
            }
        )
    return rows


def test_upgrade_from_a_row_per_step_with_data_keeps_every_value_readable(database_url: str) -> None:
    _database_at(database_url, "0007")
    rows = _compact_steps(np.random.default_rng(8))
    engine = sa.create_engine(database_url)
    tables = sa.MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        _insert_run(connection, tables, "compact", ["a", "b"])
        connection.execute(
            tables.tables["steps"].insert(), [{k: v for k, v in row.items() if k != "_stats"} for row in rows]
        )
        if engine.dialect.name == "sqlite":
            connection.execute(sa.text("UPDATE steps SET loss = 'NaN' WHERE step = 900"))
        # A rollup row of the old layout (it held last values): replaced by the upgrade, not misread.
        connection.execute(
            tables.tables["rollups"].insert(),
            [
                {
                    "run_id": 1,
                    "rank": 0,
                    "series": "grad_norm",
                    "level": 64,
                    "bucket": 0,
                    "data": b"x\x9c\x03\x00\x00\x00\x00\x01",
                }
            ],
        )
    engine.dispose()
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        db.check_schema(engine)
        with Session(engine) as session:
            run = queries.find_run(session, "compact", EVERYTHING)
            for row in rows:
                record = queries.step_record(session, run, row["step"], 0)
                for name, values in row["_stats"].items():
                    assert [record["tensors"][t["name"]][name] for t in TENSORS] == [
                        protocol.encode_float(float(v)) if values.dtype.kind == "f" else int(v) for v in values
                    ]
                assert set(record["tensors"][TENSORS[0]["name"]]) == set(row["_stats"])
                for name in (
                    "step_time",
                    "loss",
                    "loss_scale",
                    "new_loss_scale",
                    "global_grad_norm",
                    "headroom_bits",
                    "clip_coef",
                    "post_clip_grad_norm",
                ):
                    assert record[name] == protocol.encode_float(row[name]), (row["step"], name)
                assert (
                    record["time"],
                    record["skipped"],
                    record["clipped"],
                    record["scale_decision"],
                    record["lr"],
                    record["scalars"],
                ) == (row["time"], row["skipped"], row["clipped"], row["scale_decision"], row["lr"], row["scalars"])
            traced = step_blocks.Reader(session, run.id, 0, len(TENSORS), 2).find(5)
            assert (
                traced["activation_absmax"] == rows[4]["activation_absmax"] and traced["activation_nonfinite"] is None
            )
            # Whole-run reads from the rebuilt rollups keep the NaNs and extremes of the converted steps.
            loss = queries.series(session, run, "loss", None, 0, None, None, 30)
            assert "NaN" in loss["values"] and 900 in loss["steps"]
            norms = np.array([row["_stats"]["grad_norm"][1] for row in rows], np.float64)
            answer = queries.series(session, run, "grad_norm", TENSORS[1]["name"], 0, None, None, 30)
            assert 700 in answer["steps"] and "NaN" in answer["values"]
            assert max(protocol.decode_float(v) for v in answer["values"] if v != "NaN") == np.nanmax(norms)
            zeros = queries.series(session, run, "zeros", TENSORS[0]["name"], 0, 1, 1000, 1000)  # a raw window
            having = [row for row in rows if "zeros" in row["_stats"] and row["step"] <= 1000]
            assert zeros == {
                "steps": [row["step"] for row in having],
                "values": [int(row["_stats"]["zeros"][0]) for row in having],
            }
            assert "steps" not in sa.inspect(session.connection()).get_table_names()
    finally:
        engine.dispose()
